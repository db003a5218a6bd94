//! What a caller sets on the Ascend backend ([`AscendOptions`]: device,
//! staging, copy path, LoRA mode, kernel, cache budget; defaults that read
//! nothing, and the user's environment through
//! [`AscendOptions::from_env`]) and what it reports ([`AscendStats`]).

use std::collections::BTreeMap;

use super::cache::CacheStats;

/// How box copies run on the device (tests force each path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyPath {
    /// The first path that applies (see the module docs).
    #[default]
    Auto,
    /// reshard's kernel where built, else as `Aclnn`.
    Kernel,
    /// aclnn only (no memcpy shortcuts, no kernel).
    Aclnn,
    /// Everything on the host (download, CPU copy, upload): the fallback.
    Host,
}

/// How `lora_add` computes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Tile products on the host, the add on the device: bit-identical to
    /// the CPU backend (`--lora-bit-exact`).
    HostGemm,
    /// `aclnnInplaceAddmm` on the device (f32, `cubeMathType` 0): the
    /// default; within a few ulp of the CPU backend.
    #[default]
    DeviceAddmm,
}

/// Options of [`AscendBackend`](super::AscendBackend).
#[derive(Debug, Clone)]
pub struct AscendOptions {
    /// Device id (default 0; [`AscendOptions::from_env`]:
    /// `$RESHARD_ASCEND_DEVICE`).
    pub device: i32,
    /// Bytes per pinned staging chunk (two are allocated).
    pub stage_bytes: usize,
    /// Box-copy path.
    pub path: CopyPath,
    /// LoRA GEMM-add mode.
    pub lora: LoraMode,
    /// Host threads for the LoRA tile products.
    pub threads: usize,
    /// Whether `CopyPath::Auto` may use reshard's kernel (`kernels/`):
    /// opt-in (`RESHARD_ASCEND_KERNEL=1`) until `examples/npu_smoke.rs` has
    /// passed on hardware; `CopyPath::Kernel` uses it regardless.
    pub kernel: bool,
    /// Device bytes the source cache may hold (see `cache.rs`): `None`, a
    /// quarter of the HBM free when the backend opens; `Some(0)` turns the
    /// cache off. Default `None`; [`AscendOptions::from_env`]:
    /// `$RESHARD_ASCEND_CACHE_BYTES` if set.
    pub cache_bytes: Option<usize>,
}

impl Default for AscendOptions {
    /// Device 0, 8 MiB stages, the first copy path that applies, the
    /// device GEMM for LoRA, a thread per core, no kernel, the cache sized
    /// from free HBM. Reads nothing from the environment (see
    /// [`AscendOptions::from_env`]).
    fn default() -> Self {
        AscendOptions {
            device: 0,
            stage_bytes: 8 << 20,
            path: CopyPath::Auto,
            lora: LoraMode::DeviceAddmm,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: false,
            cache_bytes: None,
        }
    }
}

impl AscendOptions {
    /// The defaults with the settings a user gives the command line
    /// through the environment: `RESHARD_ASCEND_DEVICE`,
    /// `RESHARD_ASCEND_KERNEL=1`, `RESHARD_ASCEND_CACHE_BYTES`, and
    /// bit-exact LoRA products (`RESHARD_LORA_BIT_EXACT=1`). Front ends
    /// (the CLI, the Python module) declare these with
    /// [`set_ascend_options`](crate::backend::set_ascend_options); the
    /// library's own defaults never read the environment.
    pub fn from_env() -> Self {
        let defaults = AscendOptions::default();
        AscendOptions {
            device: std::env::var("RESHARD_ASCEND_DEVICE")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(defaults.device),
            lora: if std::env::var("RESHARD_LORA_BIT_EXACT").as_deref() == Ok("1") {
                LoraMode::HostGemm
            } else {
                defaults.lora
            },
            kernel: std::env::var("RESHARD_ASCEND_KERNEL").as_deref() == Ok("1"),
            cache_bytes: std::env::var("RESHARD_ASCEND_CACHE_BYTES")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            ..defaults
        }
    }
}

impl AscendOptions {
    /// These settings with LoRA products computed on the host,
    /// bit-identical to the CPU backend (`--lora-bit-exact`).
    pub fn lora_bit_exact(self) -> Self {
        AscendOptions {
            lora: LoraMode::HostGemm,
            ..self
        }
    }
}

/// What the backend did, for tests and `--json` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AscendStats {
    /// Buffers that spilled to host memory (device out of memory).
    pub spills: u64,
    /// Operations run per path (`memcpy`, `memcpy2d`, `kernel`, `cast`,
    /// `inplace_copy`, `host`, `add`, `addmm`, …).
    pub paths: BTreeMap<&'static str, u64>,
    /// Why a path was abandoned (each reason once).
    pub fallbacks: Vec<String>,
    /// The device-resident source cache.
    pub cache: CacheStats,
}
