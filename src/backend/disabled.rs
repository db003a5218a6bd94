//! What `--backend ascend` gets from a build without the `ascend` feature:
//! the same names as `backend/ascend/`, and a constructor that always fails
//! with a clear message. The types cannot be constructed, so the dispatch
//! in [`super::AnyBackend`] compiles the same either way and its Ascend
//! arms are unreachable.

use super::{Backend, SourceKey, Src};
use crate::error::{DeviceErrorKind, Error, Result};
use crate::layout::boxes::{BoxCopy, LoraAdd};

/// Uninhabited: no value of the disabled backend exists.
#[derive(Debug, Clone, Copy)]
enum Never {}

/// Options of the Ascend backend (accepted, unused, in this build).
#[derive(Debug, Clone, Default)]
pub struct AscendOptions {
    /// Device id.
    pub device: i32,
}

impl AscendOptions {
    /// The defaults (nothing to read in this build).
    pub fn from_env() -> Self {
        AscendOptions::default()
    }

    /// The same options (no LoRA products run in this build).
    pub fn lora_bit_exact(self) -> Self {
        self
    }
}

/// The Ascend backend, compiled out.
#[derive(Debug)]
pub struct AscendBackend {
    never: Never,
}

/// A buffer of the compiled-out Ascend backend.
#[derive(Debug)]
pub struct AscendBuffer {
    _never: Never,
}

/// The message of every attempt to use the backend in this build.
pub const NOT_COMPILED: &str = "this reshard was built without Ascend support; rebuild it with \
`cargo build --release --features ascend` (the CANN toolkit is only needed at run time) or use \
the cpu backend (backend auto falls back to the CPU by itself)";

impl AscendBackend {
    /// Always fails: the `ascend` feature is off.
    pub fn new(_options: AscendOptions) -> Result<AscendBackend> {
        Err(Error::Device {
            backend: "ascend",
            kind: DeviceErrorKind::Unavailable,
            message: NOT_COMPILED.into(),
        })
    }

    /// Unreachable (no value exists).
    pub fn describe(&self) -> String {
        match self.never {}
    }
}

impl Backend for AscendBackend {
    type Buffer = AscendBuffer;

    fn name(&self) -> &'static str {
        "ascend"
    }

    fn alloc(&self, _bytes: usize) -> Result<AscendBuffer> {
        match self.never {}
    }

    fn upload(&self, _host: &[u8], _dst: &mut AscendBuffer, _offset: usize) -> Result<()> {
        match self.never {}
    }

    fn download(&self, _src: &AscendBuffer, _offset: usize, _host: &mut [u8]) -> Result<()> {
        match self.never {}
    }

    fn host_bytes<'a>(&self, _buffer: &'a AscendBuffer) -> Option<&'a [u8]> {
        match self.never {}
    }

    fn box_copy(
        &self,
        _src: Src<'_, AscendBuffer>,
        _dst: &mut AscendBuffer,
        _copy: &BoxCopy,
    ) -> Result<()> {
        match self.never {}
    }

    fn box_copy_source(
        &self,
        _key: &SourceKey,
        _src: &[u8],
        _dst: &mut AscendBuffer,
        _copy: &BoxCopy,
    ) -> Result<()> {
        match self.never {}
    }

    fn forget_sources(&self, _job: u64) {
        match self.never {}
    }

    fn lora_add(
        &self,
        _w: &mut AscendBuffer,
        _b: &AscendBuffer,
        _a: &AscendBuffer,
        _op: &LoraAdd,
    ) -> Result<()> {
        match self.never {}
    }

    fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascend_without_the_feature_says_how_to_get_it() {
        let e = AscendBackend::new(AscendOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Device {
                    kind: DeviceErrorKind::Unavailable,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("--features ascend"), "{e}");
    }
}
