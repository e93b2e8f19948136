"""Errors of the search side. Each carries the CLI exit status it maps to."""

from __future__ import annotations


class SearchError(Exception):
    """Base of every search-side error; a failure at run time (exit status 1) unless a subclass says."""

    exit_code = 1


class ConfigError(SearchError):
    """A configuration, flag or environment value that cannot be used."""

    exit_code = 2


class ModelLoadError(SearchError):
    """A model plugin that cannot be imported or returns the wrong thing."""

    exit_code = 2


class PlanError(SearchError):
    """A plan that does not fit its space: unknown names, ratios out of range, bad patterns."""

    exit_code = 2


class PruningError(SearchError):
    """torch-pruning failed to apply a valid plan."""


class ExportError(SearchError):
    """ONNX export failed or the exported model disagrees with torch."""


class StorageError(SearchError):
    """The database cannot be reached or refused an operation."""


class SchemaError(SearchError):
    """The database schema is not the one this hwprune expects."""

    exit_code = 2


class SearchNotFoundError(SearchError):
    """No search of that name in the database."""

    exit_code = 2


class TrialsKeepFailing(SearchError):
    """Several trials in a row failed: something is wrong beyond one bad candidate."""
