//! The one error type of the library.
//!
//! Parsers report *what* is wrong at the lowest level (a byte offset, a
//! length); callers wrap that with *where* it happened (`InRecord`, `InFile`)
//! so the message a user sees names the file, the record index and the
//! tensor: `model.ckpt: record 3 ('model.wq.weight'): content is 20 bytes but
//! shape [2, 3] of Float32 needs 24`.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across reshard.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in reshard's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error (the file is named by an `InFile` wrapper).
    #[error("{0}")]
    Io(#[from] io::Error),

    /// The input ends before a field it announces.
    #[error("truncated: {what} at byte {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Byte offset where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the input.
        available: u64,
    },

    /// Bytes that are not the protobuf (or other encoding) they should be.
    #[error("malformed data at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset of the offending field.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A dtype string reshard does not know.
    #[error("unknown dtype {0:?}")]
    UnknownDtype(String),

    /// A dtype that exists but that this operation cannot handle.
    #[error("unsupported dtype {dtype} for {op}")]
    UnsupportedDtype {
        /// The dtype's name.
        dtype: String,
        /// The operation that refused it.
        op: &'static str,
    },

    /// Tensor bytes whose length does not match dtype × shape.
    #[error("content is {got} bytes but shape {shape:?} of {dtype} needs {expected}")]
    ContentLength {
        /// Dtype name.
        dtype: String,
        /// Shape as recorded.
        shape: Vec<i64>,
        /// Bytes needed by the shape.
        expected: u64,
        /// Bytes present.
        got: u64,
    },

    /// A shape that cannot be (negative dim, overflow).
    #[error("invalid shape {shape:?}: {reason}")]
    InvalidShape {
        /// The shape as recorded.
        shape: Vec<i64>,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// The same tensor name appears twice, not as consecutive chunks.
    #[error("duplicate tensor name (first seen at record {first_record})")]
    DuplicateName {
        /// Record index of the first occurrence.
        first_record: usize,
    },

    /// A stored CRC32 that does not match the content.
    #[error("CRC mismatch: trailer says {stored:#010x} but the records give {computed:#010x}; the file is damaged")]
    CrcMismatch {
        /// CRC stored in the file.
        stored: u64,
        /// CRC computed over the content.
        computed: u32,
    },

    /// A file whose bytes are not the ones recorded for it (its manifest's
    /// length and hash): damaged, or changed since it was written.
    #[error("{0}")]
    Damaged(String),

    /// A file that is encrypted, read without a key.
    #[error("the file is encrypted ({mode}) and no decryption key was given")]
    EncryptedWithoutKey {
        /// Cipher mode found in the header.
        mode: &'static str,
    },

    /// Decryption failed: wrong key, wrong mode, or a tampered block.
    #[error("cannot decrypt block {block} (at byte {offset}): {reason}")]
    Decrypt {
        /// Block index, from 0.
        block: usize,
        /// Byte offset of the block header.
        offset: u64,
        /// What failed.
        reason: String,
    },

    /// A pickle (PyTorch `.bin`/`.pt`) that asks for something a state dict
    /// never needs — a global outside the tensor/storage/OrderedDict list
    /// (`os.system`, `builtins.eval`, any class), or an opcode that builds an
    /// arbitrary object. Refused before anything is built; nothing runs.
    #[error("refused to unpickle {what}: a PyTorch state dict needs only tensors, storages and OrderedDicts, and reshard runs no code from a pickle")]
    PickleRefused {
        /// The offending global (`global os.system`) or opcode.
        what: String,
    },
    /// A strategy file or layout that makes no sense.
    #[error("{0}")]
    Strategy(String),

    /// A tensor not found by name.
    #[error("no tensor named {0:?}")]
    TensorNotFound(String),

    /// A rank set saved with `remove_redundancy=True` lacks the one saved
    /// copy of a parameter that a rank needs: the rank that owns it under
    /// MindSpore's rule (spec safetensors-era §2.4) does not hold it.
    #[error("parameter {param:?} of rank {rank}: the checkpoint was saved with redundancy removed, {}", match owner {
        Some(o) if o == rank => "and this rank, which owns it, does not hold it".to_string(),
        Some(o) => format!("so it is read from rank {o}, which owns it, but rank {o} does not hold it"),
        None => "and no rank of its redundancy group owns it (MindSpore drops groups the optimizer-shard size does not divide)".to_string(),
    })]
    RedundancyOwnerMissing {
        /// The parameter.
        param: String,
        /// The rank whose copy is needed.
        rank: u64,
        /// The rank that owns the parameter for `rank`, if any.
        owner: Option<u64>,
    },

    /// A caller error: an option missing, out of range or contradicting
    /// another. `option` is the library's name for the setting (the field of
    /// the options struct, e.g. `src_strategy`); front ends render it in
    /// their own spelling (the CLI as `--src-strategy`), the library never
    /// spells a command-line flag.
    #[error("{}{message}", option.map(|o| format!("{o}: ")).unwrap_or_default())]
    Usage {
        /// The setting at fault, by its library (options-struct) name.
        option: Option<&'static str>,
        /// What is wrong with it.
        message: String,
    },

    /// An input file whose content is not what it must be (a bad header, a
    /// layout of files that is not a checkpoint, contradicting records),
    /// where no more specific variant applies.
    #[error("{0}")]
    BadInput(String),

    /// A rank, shard, file or tensor the operation needs is not there.
    #[error("{0}")]
    Missing(String),

    /// Shapes, dtypes or sizes of inputs that disagree with each other.
    #[error("{0}")]
    Mismatch(String),

    /// A well-formed input or request reshard does not handle.
    #[error("{0}")]
    Unsupported(String),

    /// The destination holds entries a run did not write (and `resume` or
    /// `force` was not asked for).
    #[error("destination is not empty ({}); {hint}", entry.display())]
    DestinationNotEmpty {
        /// The first foreign entry found.
        entry: PathBuf,
        /// What the caller can do.
        hint: &'static str,
    },

    /// A device backend failed, or is not available: what kind of failure,
    /// and the vendor's text (for Ascend, the failing C function, its code
    /// and `aclGetRecentErrMsg`).
    #[error("{backend} backend: {message}")]
    Device {
        /// The backend (`ascend`).
        backend: &'static str,
        /// What kind of failure.
        kind: DeviceErrorKind,
        /// The details.
        message: String,
    },

    /// A rank of a distributed run cannot go on because of the job as a
    /// whole (see [`JobErrorKind`]); HCCL timeouts are [`Error::Device`].
    #[error("{message}")]
    Job {
        /// What went wrong.
        kind: JobErrorKind,
        /// The details (ranks, files).
        message: String,
    },

    /// A source file changed (length, modification time, inode, or pages
    /// cut off by truncation) while it was being read: output made from it
    /// is not written.
    #[error("changed while being read: {what}; was another process writing it?")]
    SourceChanged {
        /// What changed.
        what: String,
    },

    /// Another reshard run holds the destination's lock.
    #[error("another reshard run is writing here{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The process holding the lock, when it could be read.
        pid: Option<u32>,
    },

    /// A destination reshard refuses to write through (a symbolic link it
    /// did not create, a non-directory where a directory belongs).
    #[error("refusing to write through {reason}")]
    UnsafeDestination {
        /// What was found.
        reason: String,
    },

    /// An input declares more of something than reshard accepts.
    #[error("{what} is {got}, above the limit of {limit}")]
    LimitExceeded {
        /// What is counted.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// What the input declares.
        got: u64,
    },

    /// A bug in reshard: a worker thread panicked (its temporaries were
    /// removed). Please report it with the message.
    #[error("internal error (please report): {0}")]
    Internal(String),

    /// The run was interrupted by a signal (SIGINT, SIGTERM); temporaries
    /// were removed.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),

    /// Context: the error happened in record `index` (tensor `name`, when known).
    #[error("record {index}{}: {source}", name.as_deref().map(|n| format!(" ({n:?})")).unwrap_or_default())]
    InRecord {
        /// Record index in the file, from 0.
        index: usize,
        /// Tensor name of the record, when it could be read.
        name: Option<String>,
        /// The underlying error.
        source: Box<Error>,
    },

    /// Context: the error happened for tensor `name`.
    #[error("tensor {name:?}: {source}")]
    InTensor {
        /// Tensor (parameter) name.
        name: String,
        /// The underlying error.
        source: Box<Error>,
    },

    /// Context: the error happened in file `path`.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: Box<Error>,
    },
}

/// What kind of failure an [`Error`] is, for callers that branch on it (the
/// C ABI's status codes and Python's exception classes are made from it).
/// [`Error::kind`] looks through the file/record/tensor context wrappers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A caller error: a bad option or option combination.
    Usage,
    /// An input file that is not a valid checkpoint/strategy/config (bad
    /// bytes, a wrong layout of files).
    BadInput,
    /// A stored checksum or the file's manifest does not match: the file
    /// is damaged.
    Damaged,
    /// Encrypted input without a key, or a wrong key.
    Encrypted,
    /// A strategy that makes no sense or does not fit the checkpoint.
    Strategy,
    /// A rank, shard, file or tensor that is needed is missing.
    Missing,
    /// Shapes, dtypes or sizes that disagree.
    Mismatch,
    /// Something reshard does not handle.
    Unsupported,
    /// An operating-system I/O error.
    Io,
    /// The destination cannot be written: locked, unsafe, not empty.
    Destination,
    /// A source changed while it was read.
    SourceChanged,
    /// An input declares more than reshard accepts.
    Limit,
    /// A device backend failed or is unavailable.
    Device,
    /// A distributed job failed as a whole (peer died, ranks disagree).
    Job,
    /// Interrupted by a signal.
    Interrupted,
    /// A bug in reshard (a worker panicked).
    Internal,
}

impl ErrorKind {
    /// A stable lower-case name (`bad_input`), used by `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::BadInput => "bad_input",
            ErrorKind::Damaged => "damaged",
            ErrorKind::Encrypted => "encrypted",
            ErrorKind::Strategy => "strategy",
            ErrorKind::Missing => "missing",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "io",
            ErrorKind::Destination => "destination",
            ErrorKind::SourceChanged => "source_changed",
            ErrorKind::Limit => "limit",
            ErrorKind::Device => "device",
            ErrorKind::Job => "job",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Kinds of [`Error::Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceErrorKind {
    /// No runtime or no device (or a build without the backend).
    Unavailable,
    /// Device memory exhausted.
    OutOfMemory,
    /// An operation this runtime version does not provide.
    Unsupported,
    /// A collective or stream timed out (a peer rank died or hung).
    Timeout,
    /// Any other failure of a device call.
    Failed,
}

/// Kinds of [`Error::Job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobErrorKind {
    /// A source file the plan needs is on no rank's disk.
    SourceMissing,
    /// Another rank failed (its files and this rank's were removed).
    PeerFailed,
    /// The ranks disagree on the job (world size, plan).
    Mismatch,
    /// Another rank did not do its part in time (it never started, or its
    /// step did not finish within the job's patience).
    Timeout,
}

impl Error {
    /// Wraps `self` with the file it concerns.
    pub fn in_file(self, path: impl AsRef<Path>) -> Error {
        Error::InFile {
            path: path.as_ref().to_path_buf(),
            source: Box::new(self),
        }
    }

    /// Wraps `self` with the tensor it concerns.
    pub fn in_tensor(self, name: impl Into<String>) -> Error {
        Error::InTensor {
            name: name.into(),
            source: Box::new(self),
        }
    }

    /// Wraps `self` with the record it concerns.
    pub fn in_record(self, index: usize, name: Option<String>) -> Error {
        Error::InRecord {
            index,
            name,
            source: Box::new(self),
        }
    }

    /// The innermost error, looking through the context wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::InRecord { source, .. }
            | Error::InTensor { source, .. }
            | Error::InFile { source, .. } => source.root(),
            other => other,
        }
    }

    /// A caller error not tied to one setting.
    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage {
            option: None,
            message: msg.into(),
        }
    }

    /// A caller error about `option` (the options-struct field name, e.g.
    /// `src_strategy`; never a CLI flag spelling).
    pub fn usage_of(option: &'static str, msg: impl Into<String>) -> Error {
        Error::Usage {
            option: Some(option),
            message: msg.into(),
        }
    }

    /// See [`Error::BadInput`].
    pub fn bad_input(msg: impl Into<String>) -> Error {
        Error::BadInput(msg.into())
    }

    /// See [`Error::Missing`].
    pub fn missing(msg: impl Into<String>) -> Error {
        Error::Missing(msg.into())
    }

    /// See [`Error::Mismatch`].
    pub fn mismatch(msg: impl Into<String>) -> Error {
        Error::Mismatch(msg.into())
    }

    /// See [`Error::Unsupported`].
    pub fn unsupported(msg: impl Into<String>) -> Error {
        Error::Unsupported(msg.into())
    }

    /// See [`Error::Damaged`].
    pub fn damaged(msg: impl Into<String>) -> Error {
        Error::Damaged(msg.into())
    }

    /// See [`Error::Job`].
    pub fn job(kind: JobErrorKind, msg: impl Into<String>) -> Error {
        Error::Job {
            kind,
            message: msg.into(),
        }
    }

    /// See [`Error::Strategy`].
    pub fn strategy(msg: impl Into<String>) -> Error {
        Error::Strategy(msg.into())
    }

    /// The kind of failure, looking through the context wrappers.
    pub fn kind(&self) -> ErrorKind {
        match self.root() {
            Error::Io(_) => ErrorKind::Io,
            Error::Truncated { .. }
            | Error::Malformed { .. }
            | Error::UnknownDtype(_)
            | Error::ContentLength { .. }
            | Error::InvalidShape { .. }
            | Error::DuplicateName { .. }
            | Error::PickleRefused { .. }
            | Error::BadInput(_) => ErrorKind::BadInput,
            Error::UnsupportedDtype { .. } | Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::CrcMismatch { .. } | Error::Damaged(_) => ErrorKind::Damaged,
            Error::EncryptedWithoutKey { .. } | Error::Decrypt { .. } => ErrorKind::Encrypted,
            Error::Strategy(_) => ErrorKind::Strategy,
            Error::TensorNotFound(_) | Error::RedundancyOwnerMissing { .. } | Error::Missing(_) => {
                ErrorKind::Missing
            }
            Error::Mismatch(_) => ErrorKind::Mismatch,
            Error::Usage { .. } => ErrorKind::Usage,
            Error::DestinationNotEmpty { .. }
            | Error::Locked { .. }
            | Error::UnsafeDestination { .. } => ErrorKind::Destination,
            Error::SourceChanged { .. } => ErrorKind::SourceChanged,
            Error::LimitExceeded { .. } => ErrorKind::Limit,
            Error::Device { .. } => ErrorKind::Device,
            Error::Job { .. } => ErrorKind::Job,
            Error::Interrupted(_) => ErrorKind::Interrupted,
            Error::Internal(_) => ErrorKind::Internal,
            Error::InRecord { .. } | Error::InTensor { .. } | Error::InFile { .. } => {
                unreachable!("root() looks through every wrapper")
            }
        }
    }

    /// The innermost file the error names, if any.
    pub fn file(&self) -> Option<&Path> {
        let mut found = None;
        let mut cur = self;
        loop {
            match cur {
                Error::InFile { path, source } => {
                    found = Some(path.as_path());
                    cur = source;
                }
                Error::InRecord { source, .. } | Error::InTensor { source, .. } => cur = source,
                _ => return found,
            }
        }
    }

    /// The innermost tensor the error names, if any.
    pub fn tensor(&self) -> Option<&str> {
        let mut found = None;
        let mut cur = self;
        loop {
            match cur {
                Error::InRecord { name, source, .. } => {
                    if let Some(n) = name {
                        found = Some(n.as_str());
                    }
                    cur = source;
                }
                Error::InTensor { name, source } => {
                    found = Some(name.as_str());
                    cur = source;
                }
                Error::InFile { source, .. } => cur = source,
                _ => return found,
            }
        }
    }

    /// The setting a usage error is about (options-struct field name).
    pub fn option(&self) -> Option<&'static str> {
        match self.root() {
            Error::Usage { option, .. } => *option,
            _ => None,
        }
    }
}

/// The text of a caught panic's payload (a `&str` or `String` for `panic!`
/// with a message), for the [`Error::Internal`] a front end or a worker
/// pool makes of it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Adds file context to a `Result`.
pub trait ResultExt<T> {
    /// Wraps an error with the file it concerns.
    fn in_file(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| e.into().in_file(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_context_look_through_wrappers() {
        let e = Error::missing("rank 3 has no file")
            .in_tensor("model.wq.weight")
            .in_file("/ckpt/rank_3/a.ckpt");
        assert_eq!(e.kind(), ErrorKind::Missing);
        assert_eq!(e.file(), Some(Path::new("/ckpt/rank_3/a.ckpt")));
        assert_eq!(e.tensor(), Some("model.wq.weight"));
        let u = Error::usage_of("src_strategy", "needed: the source has 4 ranks");
        assert_eq!(u.kind(), ErrorKind::Usage);
        assert_eq!(u.option(), Some("src_strategy"));
        assert_eq!(
            u.to_string(),
            "src_strategy: needed: the source has 4 ranks"
        );
        assert_eq!(
            Error::CrcMismatch {
                stored: 1,
                computed: 2
            }
            .kind(),
            ErrorKind::Damaged
        );
    }
}
