"""Exceptions raised by reshard.

Every error of the Rust library arrives as a subclass of :class:`ReshardError`
carrying reshard's message (``file: record N ("tensor"): cause``) and, as
attributes, ``path`` (the file), ``record`` (the record index) and
``tensor`` (the tensor name), each ``None`` when the error names none;
``kind``, the library's name for the kind of failure (``"usage"``,
``"bad_input"``, ``"missing"``, ``"mismatch"``, ``"destination"``, ...,
the same names as ``reshard --output-format json``), and ``option``, the
setting a usage error is about (``"src_strategy"``), else ``None``.
The class follows the kind: one class per kind (an I/O error by what the
operating system said, a tensor not found by :class:`TensorNotFoundError`).
Each class also derives from the built-in exception a MindSpore caller
already catches for that kind of failure (``ValueError`` for bad data or
arguments, ``FileNotFoundError`` for a missing file, ``RuntimeError`` for a
device or internal failure), so ``except ValueError`` code keeps working.
The classes split from :class:`InvalidArgumentError` (missing, mismatch,
destination, ...) derive from it, so older ``except InvalidArgumentError``
code keeps catching them.
"""


class ReshardError(Exception):
    """Base of every reshard error."""

    path = None
    record = None
    tensor = None
    kind = None
    option = None


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


class MissingError(InvalidArgumentError):
    """A rank, shard, file or tensor the operation needs is not there."""


class MismatchError(InvalidArgumentError):
    """Shapes, dtypes or sizes of inputs that disagree with each other."""


class DestinationError(InvalidArgumentError):
    """A destination that cannot be written: not empty, locked, or unsafe."""


class SourceChangedError(InvalidArgumentError):
    """A source file changed while it was being read."""


class LimitError(InvalidArgumentError):
    """An input that declares more of something than reshard accepts."""


class JobError(InvalidArgumentError):
    """A distributed job that failed as a whole (a peer died, ranks disagree)."""


class SignalInterruptedError(InvalidArgumentError):
    """The run was interrupted by a signal; temporaries were removed."""


class TensorNotFoundError(MissingError, KeyError):
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
    "DeviceError", "InternalError", "MissingError", "MismatchError", "DestinationError",
    "SourceChangedError", "LimitError", "JobError", "SignalInterruptedError",
]
