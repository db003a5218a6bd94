//! Finding and `dlopen`ing the CANN libraries, and the process-wide table.
//!
//! Search order for the install root (the first with a `lib64/libascendcl.so`
//! wins): `ASCEND_TOOLKIT_HOME`, `ASCEND_HOME_PATH`, `ASCEND_CUSTOM_PATH`,
//! `/usr/local/Ascend/cann` (8.5 / 9.x layout),
//! `/usr/local/Ascend/ascend-toolkit/latest` (≤ 8.x), and
//! `$HOME/Ascend/ascend-toolkit/latest` (non-root install); then the bare
//! sonames, i.e. `LD_LIBRARY_PATH` as `set_env.sh` sets it. Library names
//! differ between CANN versions: the aclnn ops are in `libopapi.so` (8.x) or
//! split into `libopapi_math.so`, `libopapi_nn.so`, … (9.x), and HCCL's
//! communicator functions moved from `libhccl.so` to `libhcomm.so` (9.x).
//! Every library found is opened and each symbol is looked up in all of
//! them, so it does not matter which one exports it.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::table::Api;

/// Why the CANN libraries could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// No `libascendcl.so` anywhere.
    NotFound {
        /// The roots searched, with where each came from.
        searched: Vec<String>,
    },
    /// A library exists but `dlopen` failed (missing driver, wrong arch).
    Open {
        /// The file.
        path: String,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// A required symbol is exported by none of the libraries.
    MissingSymbol {
        /// The symbol.
        symbol: String,
        /// The libraries opened.
        libraries: Vec<String>,
    },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NotFound { searched } => write!(
                f,
                "CANN is not installed: no libascendcl.so in {} or on LD_LIBRARY_PATH \
                 (install the CANN toolkit and kernels packages and `source <root>/set_env.sh`, \
                 or use --backend cpu / auto)",
                searched.join(", ")
            ),
            LoadError::Open { path, reason } => {
                write!(f, "cannot load {path}: {reason}")?;
                if reason.contains("libascend_hal") || reason.contains("libdrvdsmi") {
                    write!(
                        f,
                        " (the NPU driver's libraries are missing: install the Ascend driver, or add \
                         /usr/local/Ascend/driver/lib64/common and /usr/local/Ascend/driver/lib64/driver \
                         to LD_LIBRARY_PATH)"
                    )
                } else {
                    write!(
                        f,
                        " (run `source <CANN root>/set_env.sh` so LD_LIBRARY_PATH has the toolkit's \
                         and the driver's lib64 directories)"
                    )
                }
            }
            LoadError::MissingSymbol { symbol, libraries } => write!(
                f,
                "this CANN is too old or incomplete: {symbol} is in none of {}",
                libraries.join(", ")
            ),
        }
    }
}

impl std::error::Error for LoadError {}

pub use super::roots::candidate_roots;

/// Library directories under a root.
fn lib_dirs(root: &Path) -> Vec<PathBuf> {
    let arch = if cfg!(target_arch = "aarch64") {
        "aarch64-linux"
    } else {
        "x86_64-linux"
    };
    vec![
        root.join("lib64"),
        root.join("runtime/lib64"),
        root.join(arch).join("lib64"),
    ]
}

/// Every library file reshard opens, in lookup order (required first).
/// `libascendcl` and `libnnopbase` are required; the rest optional.
pub const LIBRARIES: &[&str] = &[
    "libascendcl.so",
    "libnnopbase.so",
    "libopapi.so",
    "libopapi_math.so",
    "libopapi_nn.so",
    "libaclnn_ops_infer.so",
    "libaclnn_math.so",
    "libhccl.so",
    "libhcomm.so",
];

/// The directory holding `libascendcl.so`, or `None` (then the bare
/// sonames are tried).
pub fn find_lib_dir() -> Result<Option<PathBuf>, LoadError> {
    for (_, root) in candidate_roots() {
        for dir in lib_dirs(&root) {
            if dir.join("libascendcl.so").exists() {
                return Ok(Some(dir));
            }
        }
    }
    Ok(None)
}

/// A loaded table and the libraries that back it (kept open for good).
pub struct Loaded {
    /// The table.
    pub api: Api,
    /// `(library, path)` of each library opened.
    pub libraries: Vec<String>,
    _libs: Vec<libloading::Library>,
}

/// Opens the CANN libraries (plus `extra`, e.g. reshard's kernel library)
/// and resolves the table.
pub fn load(extra: &[PathBuf]) -> Result<Loaded, LoadError> {
    let dir = find_lib_dir()?;
    let mut libs = Vec::new();
    let mut names = Vec::new();
    for (i, name) in LIBRARIES.iter().enumerate() {
        let path = match &dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        };
        if dir.is_some() && !path.exists() {
            if i < 2 {
                return Err(LoadError::NotFound {
                    searched: vec![path.display().to_string()],
                });
            }
            continue;
        }
        // SAFETY: loading a CANN library runs its initialisers; that is the
        // documented way to use CANN.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                names.push(path.display().to_string());
                libs.push(lib);
            }
            Err(e) if i < 2 => {
                return Err(if dir.is_none() {
                    LoadError::NotFound {
                        searched: candidate_roots()
                            .into_iter()
                            .map(|(o, r)| format!("{} ({o})", r.display()))
                            .collect(),
                    }
                } else {
                    LoadError::Open {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })
            }
            Err(_) => {}
        }
    }
    for path in extra {
        // SAFETY: as above; reshard's kernel library has no initialisers
        // beyond those the CANN compiler adds.
        if let Ok(lib) = unsafe { libloading::Library::new(path) } {
            names.push(path.display().to_string());
            libs.push(lib);
        }
    }
    let find = |name: &str| -> *mut c_void {
        for lib in &libs {
            // SAFETY: looking up a symbol's address; it is only called
            // through the pointer type the table declares for it.
            if let Ok(sym) = unsafe { lib.get::<*mut c_void>(name.as_bytes()) } {
                return *sym;
            }
        }
        std::ptr::null_mut()
    };
    // SAFETY: the table's signatures are CANN's (pinned by the `cann`
    // feature's compile-time check where headers are available).
    let api =
        unsafe { Api::resolve("dlopen", find) }.map_err(|symbol| LoadError::MissingSymbol {
            symbol,
            libraries: names.clone(),
        })?;
    Ok(Loaded {
        api,
        libraries: names,
        _libs: libs,
    })
}

static INSTALLED: OnceLock<&'static Api> = OnceLock::new();
static LOADED: OnceLock<Result<Loaded, LoadError>> = OnceLock::new();

/// Installs `api` as the process-wide table (the host emulator does this in
/// tests). Only the first install counts; returns whether this one did.
/// Must happen before the first [`api`] call that would `dlopen`.
pub fn install(api: &'static Api) -> bool {
    INSTALLED.set(api).is_ok()
}

/// Extra libraries [`api`] loads with CANN: `$RESHARD_KERNELS_LIB` if set.
fn extra_libraries() -> Vec<PathBuf> {
    std::env::var_os("RESHARD_KERNELS_LIB")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect()
}

/// The process-wide table: the installed one, else CANN loaded once with
/// `dlopen` (a failure is remembered and returned every time), with
/// `$RESHARD_KERNELS_LIB` as an extra library.
pub fn api() -> Result<&'static Api, LoadError> {
    api_with(&[])
}

/// As [`api`], with more extra libraries (reshard's kernel library) for
/// the first load; later calls get the table the first one made.
pub fn api_with(extra: &[PathBuf]) -> Result<&'static Api, LoadError> {
    if let Some(api) = INSTALLED.get() {
        return Ok(api);
    }
    match LOADED.get_or_init(|| {
        let mut libs = extra_libraries();
        libs.extend(extra.iter().cloned());
        load(&libs)
    }) {
        Ok(l) => Ok(&l.api),
        Err(e) => Err(e.clone()),
    }
}

/// The libraries the process-wide table was loaded from (empty for an
/// installed table or a failed load).
pub fn loaded_libraries() -> Vec<String> {
    match LOADED.get() {
        Some(Ok(l)) => l.libraries.clone(),
        _ => Vec::new(),
    }
}

/// Whether a CANN runtime can be loaded (or a table is installed), without
/// panicking or printing.
pub fn is_present() -> bool {
    api().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_that_does_not_open_names_the_fix() {
        let e = LoadError::Open {
            path: "/x/lib64/libascendcl.so".into(),
            reason: "libascend_hal.so: cannot open shared object file".into(),
        };
        assert!(
            e.to_string().contains("NPU driver's libraries are missing"),
            "{e}"
        );
        let e = LoadError::Open {
            path: "/x/lib64/libascendcl.so".into(),
            reason: "libruntime.so: cannot open shared object file".into(),
        };
        assert!(e.to_string().contains("set_env.sh"), "{e}");
    }
}
