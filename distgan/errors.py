"""The errors distgan raises on purpose, and the exit codes they map to.

A user mistake (a bad config key, an impossible value, a missing dataset) is a `UserError`: the command line
prints its one-line message and exits with code 2, before any process group is started where possible.
Anything else is a bug or an environment failure and keeps its traceback.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake the user can fix; the message is one line that says what and how."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """The configuration (YAML file or a command-line override) is invalid."""


class DataError(UserError):
    """The dataset cannot be found, read or used with this configuration."""


class LaunchError(UserError):
    """The launcher and the training process disagree (world size, precision, devices)."""


class CheckpointError(UserError):
    """A checkpoint cannot be used to resume this run."""
