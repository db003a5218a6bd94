//! Library errors → the exception classes of `reshard/errors.py`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use reshard::error::Error;

/// The class name (in `reshard.errors`) for an error, by its innermost kind.
fn class_of(e: &Error) -> &'static str {
    match e.root() {
        Error::Io(io) => match io.kind() {
            std::io::ErrorKind::NotFound => "CheckpointNotFoundError",
            std::io::ErrorKind::PermissionDenied => "CheckpointPermissionError",
            _ => "CheckpointIOError",
        },
        Error::Truncated { .. }
        | Error::Malformed { .. }
        | Error::ContentLength { .. }
        | Error::InvalidShape { .. }
        | Error::DuplicateName { .. }
        | Error::UnknownDtype(_) => "CheckpointFormatError",
        Error::CrcMismatch { .. } => "CrcMismatchError",
        Error::EncryptedWithoutKey { .. } | Error::Decrypt { .. } => "DecryptionError",
        Error::UnsupportedDtype { .. } => "UnsupportedError",
        Error::Strategy(_) => "StrategyError",
        Error::TensorNotFound(_) => "TensorNotFoundError",
        Error::Device { .. } => "DeviceError",
        _ => "InvalidArgumentError",
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
