//! Library errors → the exception classes of `reshard/errors.py`, by
//! [`ErrorKind`]; each exception also carries the kind's name (`kind`) and,
//! for a usage error, the setting at fault (`option`).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use reshard::error::{Error, ErrorKind};

/// The class name (in `reshard.errors`) for an error, by its kind (an I/O
/// error by its OS kind, a tensor not found by its own class).
fn class_of(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::Io => match e.root() {
            Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => "CheckpointNotFoundError",
            Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                "CheckpointPermissionError"
            }
            _ => "CheckpointIOError",
        },
        ErrorKind::Usage => "InvalidArgumentError",
        ErrorKind::BadInput => "CheckpointFormatError",
        ErrorKind::Damaged => "CrcMismatchError",
        ErrorKind::Encrypted => "DecryptionError",
        ErrorKind::Strategy => "StrategyError",
        ErrorKind::Missing => match e.root() {
            Error::TensorNotFound(_) => "TensorNotFoundError",
            _ => "MissingError",
        },
        ErrorKind::Mismatch => "MismatchError",
        ErrorKind::Unsupported => "UnsupportedError",
        ErrorKind::Destination => "DestinationError",
        ErrorKind::SourceChanged => "SourceChangedError",
        ErrorKind::Limit => "LimitError",
        ErrorKind::Device => "DeviceError",
        ErrorKind::Job => "JobError",
        ErrorKind::Interrupted => "SignalInterruptedError",
        ErrorKind::Internal => "InternalError",
        // A kind added to the library later: the generic class, its name
        // still in `kind`.
        _ => "ReshardError",
    }
}

/// Where the error happened: the innermost file, record and tensor named.
fn context(e: &Error) -> (Option<String>, Option<usize>, Option<String>) {
    let (mut path, mut record, mut tensor) = (None, None, None);
    let mut cur = e;
    loop {
        match cur {
            Error::InFile { path: p, source } => {
                path = Some(p.to_string_lossy().into_owned());
                cur = source;
            }
            Error::InRecord {
                index,
                name,
                source,
            } => {
                record = Some(*index);
                if name.is_some() {
                    tensor = name.clone();
                }
                cur = source;
            }
            Error::InTensor { name, source } => {
                tensor = Some(name.clone());
                cur = source;
            }
            _ => return (path, record, tensor),
        }
    }
}

fn build(py: Python<'_>, class: &str, message: &str, e: Option<&Error>) -> PyResult<PyErr> {
    let module = py.import("reshard.errors")?;
    let cls = module.getattr(class)?;
    let exc = cls.call1((message,))?;
    let (path, record, tensor) = e.map(context).unwrap_or_default();
    exc.setattr("path", path)?;
    exc.setattr("record", record)?;
    exc.setattr("tensor", tensor)?;
    let kind = e.map_or(ErrorKind::Internal, Error::kind);
    exc.setattr("kind", kind.name())?;
    exc.setattr("option", e.and_then(Error::option))?;
    Ok(PyErr::from_value(exc))
}

/// The Python exception for a library error.
pub fn to_py(py: Python<'_>, e: &Error) -> PyErr {
    let message = e.to_string();
    build(py, class_of(e), &message, Some(e)).unwrap_or_else(|_| PyRuntimeError::new_err(message))
}

/// `reshard.errors.InternalError` (a caught panic, a report that would not
/// serialize).
pub fn internal(py: Python<'_>, message: &str) -> PyErr {
    build(py, "InternalError", message, None)
        .unwrap_or_else(|_| PyRuntimeError::new_err(message.to_string()))
}
