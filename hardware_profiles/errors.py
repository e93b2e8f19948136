"""Errors raised while reading hardware profiles."""

from __future__ import annotations


class ProfileError(Exception):
    """Base of every hardware-profile error: bad input, so the CLI exits with status 2."""

    exit_code = 2


class ProfileNotFoundError(ProfileError):
    """No profile of that name in the built-in set or the user's profile folders."""


class InvalidProfileError(ProfileError):
    """A profile file that is not YAML, or does not match the schema."""
