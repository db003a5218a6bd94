//! Choosing a backend at run time: [`BackendChoice`] (`--backend
//! cpu|ascend|auto`) opens an [`AnyBackend`], an enum over the compiled
//! backends that implements [`Backend`] by dispatch, so operations stay
//! generic-free (`exec::execute(&plan, &choice.open()?, …)`) and no `cfg`
//! reaches them: in a build without the `ascend` feature the Ascend variant
//! holds an uninhabited type.

use super::ascend::{AscendBackend, AscendBuffer};
use super::cpu::{CpuBackend, HostBuffer};
use super::{Backend, SourceKey, Src};
use crate::error::{Error, Result};
use crate::layout::boxes::{BoxCopy, LoraAdd};

/// Which backend runs a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The CPU backend (default).
    #[default]
    Cpu,
    /// The Ascend NPU backend; an error if it cannot be opened.
    Ascend,
    /// Ascend when a runtime and a device are found, else the CPU.
    Auto,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<BackendChoice> {
        match s {
            "cpu" => Ok(BackendChoice::Cpu),
            "ascend" | "npu" => Ok(BackendChoice::Ascend),
            "auto" => Ok(BackendChoice::Auto),
            other => Err(Error::usage_of(
                "backend",
                format!("must be cpu, ascend or auto, not {other:?}"),
            )),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendChoice::Cpu => "cpu",
            BackendChoice::Ascend => "ascend",
            BackendChoice::Auto => "auto",
        })
    }
}

impl BackendChoice {
    /// Opens the chosen backend, Ascend with the settings the host program
    /// declared ([`super::set_ascend_options`]; the CLI's are the user's
    /// `RESHARD_ASCEND_*` variables and flags). `Auto` never fails for
    /// want of a device: it falls back to the CPU and says why in
    /// [`AnyBackend::note`].
    pub fn open(self) -> Result<AnyBackend> {
        match self {
            BackendChoice::Cpu => Ok(AnyBackend::Cpu(CpuBackend::default(), None)),
            BackendChoice::Ascend => Ok(AnyBackend::Ascend(
                AscendBackend::new(super::ascend_options())?,
                None,
            )),
            BackendChoice::Auto => match AscendBackend::new(super::ascend_options()) {
                Ok(b) => Ok(AnyBackend::Ascend(
                    b,
                    Some(
                        "backend auto: chose Ascend (a CANN runtime loaded and the device opened)"
                            .into(),
                    ),
                )),
                Err(e) => Ok(AnyBackend::Cpu(
                    CpuBackend::default(),
                    Some(format!("backend auto: using the CPU ({e})")),
                )),
            },
        }
    }
}

/// One of the compiled backends.
// One value per job, never moved in a hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyBackend {
    /// The CPU backend, with the reason when `auto` fell back to it.
    Cpu(CpuBackend, Option<String>),
    /// The Ascend backend, with why `auto` chose it.
    Ascend(AscendBackend, Option<String>),
}

impl AnyBackend {
    /// This backend for an executor running `workers` workers, each filling
    /// one tensor at a time: the CPU backend then spreads one copy or LoRA
    /// product over its share of the cores, not over all of them — with as
    /// many workers as cores, a fill on every core only takes them from the
    /// workers writing (merge-lora of the 250M bench, `-j 2` on 2 cores: 0.82–
    /// 0.89× of the copy bound with two threads per product, 0.95–1.00× with
    /// one). A device backend is unchanged.
    pub fn shared_by(self, workers: usize) -> AnyBackend {
        match self {
            AnyBackend::Cpu(_, note) => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                AnyBackend::Cpu(CpuBackend::new(cores / workers.max(1)), note)
            }
            other => other,
        }
    }

    /// Why `auto` fell back to the CPU, if it did.
    pub fn note(&self) -> Option<&str> {
        match self {
            AnyBackend::Cpu(_, note) => note.as_deref(),
            AnyBackend::Ascend(_, note) => note.as_deref(),
        }
    }

    /// A one-line description: `cpu`, or the device, runtime and SoC.
    pub fn describe(&self) -> String {
        match self {
            AnyBackend::Cpu(_, None) => "cpu".into(),
            AnyBackend::Cpu(_, Some(n)) => format!("cpu ({n})"),
            AnyBackend::Ascend(b, None) => b.describe(),
            AnyBackend::Ascend(b, Some(n)) => format!("{} ({n})", b.describe()),
        }
    }
}

/// A buffer of an [`AnyBackend`].
pub enum AnyBuffer {
    /// Host memory of the CPU backend.
    Cpu(HostBuffer),
    /// Memory of the Ascend backend.
    Ascend(AscendBuffer),
}

fn mismatch(op: &str) -> Error {
    Error::Internal(format!(
        "{op}: a buffer of one backend was passed to another"
    ))
}

impl Backend for AnyBackend {
    type Buffer = AnyBuffer;

    fn name(&self) -> &'static str {
        match self {
            AnyBackend::Cpu(b, _) => b.name(),
            AnyBackend::Ascend(b, _) => b.name(),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<AnyBuffer> {
        match self {
            AnyBackend::Cpu(b, _) => b.alloc(bytes).map(AnyBuffer::Cpu),
            AnyBackend::Ascend(b, _) => b.alloc(bytes).map(AnyBuffer::Ascend),
        }
    }

    fn upload(&self, host: &[u8], dst: &mut AnyBuffer, offset: usize) -> Result<()> {
        match (self, dst) {
            (AnyBackend::Cpu(b, _), AnyBuffer::Cpu(d)) => b.upload(host, d, offset),
            (AnyBackend::Ascend(b, _), AnyBuffer::Ascend(d)) => b.upload(host, d, offset),
            _ => Err(mismatch("upload")),
        }
    }

    fn download(&self, src: &AnyBuffer, offset: usize, host: &mut [u8]) -> Result<()> {
        match (self, src) {
            (AnyBackend::Cpu(b, _), AnyBuffer::Cpu(s)) => b.download(s, offset, host),
            (AnyBackend::Ascend(b, _), AnyBuffer::Ascend(s)) => b.download(s, offset, host),
            _ => Err(mismatch("download")),
        }
    }

    fn host_bytes<'a>(&self, buffer: &'a AnyBuffer) -> Option<&'a [u8]> {
        match (self, buffer) {
            (AnyBackend::Cpu(b, _), AnyBuffer::Cpu(x)) => b.host_bytes(x),
            (AnyBackend::Ascend(b, _), AnyBuffer::Ascend(x)) => b.host_bytes(x),
            _ => None,
        }
    }

    fn box_copy(&self, src: Src<'_, AnyBuffer>, dst: &mut AnyBuffer, copy: &BoxCopy) -> Result<()> {
        match (self, dst) {
            (AnyBackend::Cpu(b, _), AnyBuffer::Cpu(d)) => match src {
                Src::Host(h) => b.box_copy(Src::Host(h), d, copy),
                Src::Buffer(AnyBuffer::Cpu(s)) => b.box_copy(Src::Buffer(s), d, copy),
                Src::Buffer(_) => Err(mismatch("box copy")),
            },
            (AnyBackend::Ascend(b, _), AnyBuffer::Ascend(d)) => match src {
                Src::Host(h) => b.box_copy(Src::Host(h), d, copy),
                Src::Buffer(AnyBuffer::Ascend(s)) => b.box_copy(Src::Buffer(s), d, copy),
                Src::Buffer(_) => Err(mismatch("box copy")),
            },
            _ => Err(mismatch("box copy")),
        }
    }

    fn box_copy_source(
        &self,
        key: &SourceKey,
        src: &[u8],
        dst: &mut AnyBuffer,
        copy: &BoxCopy,
    ) -> Result<()> {
        match (self, dst) {
            (AnyBackend::Cpu(b, _), AnyBuffer::Cpu(d)) => b.box_copy_source(key, src, d, copy),
            (AnyBackend::Ascend(b, _), AnyBuffer::Ascend(d)) => {
                b.box_copy_source(key, src, d, copy)
            }
            _ => Err(mismatch("box copy")),
        }
    }

    fn forget_sources(&self, job: u64) {
        match self {
            AnyBackend::Cpu(b, _) => b.forget_sources(job),
            AnyBackend::Ascend(b, _) => b.forget_sources(job),
        }
    }

    fn lora_add(
        &self,
        w: &mut AnyBuffer,
        b: &AnyBuffer,
        a: &AnyBuffer,
        op: &LoraAdd,
    ) -> Result<()> {
        match (self, w, b, a) {
            (AnyBackend::Cpu(x, _), AnyBuffer::Cpu(w), AnyBuffer::Cpu(b), AnyBuffer::Cpu(a)) => {
                x.lora_add(w, b, a, op)
            }
            (
                AnyBackend::Ascend(x, _),
                AnyBuffer::Ascend(w),
                AnyBuffer::Ascend(b),
                AnyBuffer::Ascend(a),
            ) => x.lora_add(w, b, a, op),
            _ => Err(mismatch("lora_add")),
        }
    }

    fn synchronize(&self) -> Result<()> {
        match self {
            AnyBackend::Cpu(b, _) => b.synchronize(),
            AnyBackend::Ascend(b, _) => b.synchronize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn choice_parses_and_cpu_dispatches() {
        assert_eq!(
            "auto".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        let e = "gpu".parse::<BackendChoice>().unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
        assert_eq!(e.option(), Some("backend"));
        let b = BackendChoice::Cpu.open().unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = |b: &AnyBackend| match b {
            AnyBackend::Cpu(c, _) => c.threads(),
            _ => unreachable!("the CPU backend"),
        };
        assert_eq!(threads(&b), cores);
        // As many workers as cores: one thread per fill; one worker: all.
        let shared = |w| threads(&BackendChoice::Cpu.open().unwrap().shared_by(w));
        assert_eq!(shared(cores), 1);
        assert_eq!(shared(4 * cores), 1);
        assert_eq!(shared(1), cores);
        assert_eq!(shared(0), cores);
        assert_eq!(b.describe(), "cpu");
        let mut out = b.alloc(8).unwrap();
        b.box_copy(
            Src::Host(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]),
            &mut out,
            &BoxCopy::whole(&[2], DType::F32, DType::F32),
        )
        .unwrap();
        b.synchronize().unwrap();
        assert_eq!(
            b.host_bytes(&out).unwrap(),
            [0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]
        );
    }

    #[cfg(not(feature = "ascend"))]
    #[test]
    fn auto_falls_back_and_ascend_explains_without_the_feature() {
        let b = BackendChoice::Auto.open().unwrap();
        assert!(
            b.note().unwrap().contains("--features ascend"),
            "{:?}",
            b.note()
        );
        let e = BackendChoice::Ascend.open().unwrap_err();
        assert!(e.to_string().contains("--features ascend"), "{e}");
    }

    #[cfg(feature = "ascend")]
    #[test]
    fn auto_falls_back_to_the_cpu_without_cann() {
        // The library's unit tests never install the emulator; on a machine
        // with CANN this test has nothing to show.
        if ascendcl_sys::api().is_ok() {
            return;
        }
        let b = BackendChoice::Auto.open().unwrap();
        assert!(matches!(b, AnyBackend::Cpu(..)));
        assert!(
            b.note().unwrap().contains("CANN is not installed"),
            "{:?}",
            b.note()
        );
        let e = BackendChoice::Ascend.open().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Device {
                    kind: crate::error::DeviceErrorKind::Unavailable,
                    ..
                }
            ),
            "{e}"
        );
    }
}
