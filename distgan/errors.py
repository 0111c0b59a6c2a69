"""The errors distgan raises on purpose, and the exit codes they map to.

    0  done: trained to train.total_kimg
    1  a bug or an environment failure (Python's own exit code for an uncaught exception; traceback kept)
    2  a user mistake: bad config, data, checkpoint path or launch; or no room on disk for a checkpoint.
       One line says what and how to fix it; nothing already saved is touched.
    3  stopped on request (SIGTERM / SIGUSR1): every rank saved the same step; run the same command to resume
    4  diverged: non-finite losses or gradients persisted through train.max_rollbacks rollbacks
    5  a rank hung: no progress within train.hang_timeout_s; the message names the rank(s)

A user mistake is a `UserError`, raised where possible before any process group is started. Codes 3-5 are
`Stop`s: the run ends on purpose, resumable from the last committed checkpoint.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3
EXIT_DIVERGED = 4
EXIT_HUNG = 5


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
    """A checkpoint cannot be used to resume this run, or cannot be written (disk full)."""


class Stop(Exception):
    """The run ends on purpose with a documented exit code (one line, no traceback)."""

    exit_code = 1


class Interrupted(Stop):
    """A stop signal arrived; every rank saved a checkpoint at the same step."""

    exit_code = EXIT_INTERRUPTED


class Diverged(Stop):
    """Non-finite values kept coming back after every allowed rollback."""

    exit_code = EXIT_DIVERGED


class PhaseError(RuntimeError):
    """A network was used against the rules of the adversarial phases (distgan/distributed/nets.py): a bug in the
    caller, never a user mistake (exit code 1, traceback kept)."""
