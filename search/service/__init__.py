"""The hub service: HTTP API for remote agents and read access to stored searches."""

from __future__ import annotations

from search.service.app import HubSettings, create_app

__all__ = ["HubSettings", "create_app"]
