"""Exceptions with messages a user can act on. Every error the package raises on bad input is one of these."""


class HvaeError(Exception):
    """Base class of hvae-dist's user-facing errors."""


class ConfigError(HvaeError, ValueError):
    """A config key, type or value is wrong. The message names the key, the value and what is allowed."""


class DatasetUnavailableError(HvaeError, FileNotFoundError):
    """A dataset name/split cannot be loaded here. The message says how to get it."""


class CheckpointError(HvaeError):
    """A checkpoint is missing, unreadable or from an incompatible run."""


class ScoreFileError(HvaeError):
    """A score shard/file is corrupt, incomplete or inconsistent. The message names the file and the problem."""


class TrainingDivergedError(HvaeError):
    """Too many updates were skipped (non-finite or too-large gradient norm)."""


class SubmitError(HvaeError):
    """SLURM is not reachable or refused a job."""


class LockedError(HvaeError):
    """A run dir or shard file is held by another live process. The message names the holder."""


class DataError(HvaeError, ValueError):
    """A dataset file holds what the package cannot score (a wrong shape, dtype or value; an unreadable image).
    The message names the file (and the row) and what was expected."""
