"""Error types. Every error a user can cause is a ``FedmergeError`` whose message
names the file, key, field or sender at fault; the CLI prints it on one line."""


class FedmergeError(Exception):
    """Base class for errors caused by bad input (not by bugs)."""


class CheckpointError(FedmergeError):
    """A checkpoint is unreadable, truncated, or not a safetensors file."""


class ValidationError(FedmergeError):
    """Tensors do not match what was expected (keys, shapes, dtypes, finiteness, size)."""


class ConfigError(FedmergeError):
    """A config value, CLI parameter or spec is unknown or out of range."""


class StorageError(FedmergeError):
    """The file system refused a write or read (disk full, read-only, permission denied)."""
