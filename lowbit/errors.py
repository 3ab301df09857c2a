"""Errors lowbit raises on bad input; the CLI prints them as one line and exits non-zero."""


class LowbitError(Exception):
    """Base class: a problem with the user's input, stated with how to fix it."""


class DataError(LowbitError):
    """A dataset is missing, corrupt or inconsistent."""


class ConfigError(LowbitError, ValueError):
    """A configuration (spec file, CLI flags) is invalid."""


class FormatError(LowbitError):
    """A .lowbit file or checkpoint is corrupt, truncated, tampered or of an unknown version."""
