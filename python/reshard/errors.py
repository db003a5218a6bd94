"""Exceptions raised by reshard.

Every error of the Rust library arrives as a subclass of :class:`ReshardError`
carrying reshard's message (``file: record N ("tensor"): cause``) and, as
attributes, ``path`` (the file), ``record`` (the record index) and
``tensor`` (the tensor name), each ``None`` when the error names none.
Each class also derives from the built-in exception a MindSpore caller
already catches for that kind of failure (``ValueError`` for bad data or
arguments, ``FileNotFoundError`` for a missing file, ``RuntimeError`` for a
device or internal failure), so ``except ValueError`` code keeps working.
"""


class ReshardError(Exception):
    """Base of every reshard error."""

    path = None
    record = None
    tensor = None


class InvalidArgumentError(ReshardError, ValueError):
    """A bad argument or option combination, a source that does not fit."""


class CheckpointFormatError(ReshardError, ValueError):
    """Bytes that are not a valid checkpoint (truncated, malformed, wrong sizes)."""


class CrcMismatchError(CheckpointFormatError):
    """A stored CRC that does not match the content: the file is damaged."""


class DecryptionError(ReshardError, ValueError):
    """An encrypted file without a key, or a wrong key or mode."""


class UnsupportedError(ReshardError, ValueError):
    """A dtype or entry kind this operation cannot handle."""


class StrategyError(ReshardError, ValueError):
    """A strategy file that does not fit the checkpoint or makes no sense."""


class TensorNotFoundError(ReshardError, KeyError):
    """A tensor the operation needs is not in the checkpoint."""

    def __str__(self):  # KeyError would quote the message
        return Exception.__str__(self)


class CheckpointNotFoundError(ReshardError, FileNotFoundError):
    """A file or directory that does not exist."""


class CheckpointPermissionError(ReshardError, PermissionError):
    """A file reshard may not read or write."""


class CheckpointIOError(ReshardError, OSError):
    """Any other operating-system error while reading or writing."""


class DeviceError(ReshardError, RuntimeError):
    """The device backend failed or is not available."""


class InternalError(ReshardError, RuntimeError):
    """A bug in reshard (a panic, caught before it reached Python)."""


__all__ = [
    "ReshardError", "InvalidArgumentError", "CheckpointFormatError", "CrcMismatchError",
    "DecryptionError", "UnsupportedError", "StrategyError", "TensorNotFoundError",
    "CheckpointNotFoundError", "CheckpointPermissionError", "CheckpointIOError",
    "DeviceError", "InternalError",
]
