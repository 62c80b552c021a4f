"""The errors deit_jax raises for problems a user fixes (a config value, a data set, a file).

`python -m deit_jax.main` prints a `UserError` as one `error: ...` line (exit code 2 for a
`ConfigError`, 1 for the others) and lets any other exception, a bug, show its traceback. Each
class also derives from the builtin exception that callers caught before it existed
(`ValueError`, `FileNotFoundError`), so `except ValueError` keeps working. `Preempted` is no
error: a run stopped by SIGTERM after saving its checkpoint (exit code 0).
"""

from __future__ import annotations


class Preempted(Exception):
    """SIGTERM stopped a run after saving a checkpoint (not an error: running the same command
    again resumes from it)."""


class UserError(Exception):
    """A problem with the user's config, data or files; the message says what to change."""


class ConfigError(UserError, ValueError):
    """Bad config values; the message is one line per problem (`config.<key>=<value>: ...`)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(UserError, ValueError):
    """A data set that cannot be used as configured (empty split, undecodable images, ...)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set that is not where the config says, or is not prepared there."""


class CheckpointError(UserError, ValueError):
    """Weights or checkpoints that cannot be read, or do not fit the model that loads them."""


class CheckpointMismatchError(CheckpointError):
    """Stored arrays that do not fit the model or config that loads them (all problems listed at
    once): an Orbax training checkpoint, a PyTorch state dict or a weights directory."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Weights, a teacher or a checkpoint that do not exist at the configured path."""


class DependencyError(UserError, ImportError):
    """An optional dependency the configured feature needs is not installed."""
