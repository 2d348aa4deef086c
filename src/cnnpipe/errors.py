"""Errors a user can fix. Stage entries turn them into one line and exit code 2, never a traceback."""


class CnnpipeError(Exception):
    """Base for every error caused by the user's input (config, data, paths)."""


class ConfigError(CnnpipeError):
    """A config key has a bad value; the message names the key and the value."""


class DataError(CnnpipeError):
    """Input data cannot be used; the message names the file or folder."""
