//! The sources of a running plan: opened once, on first use, shared by
//! the workers; their digests (for manifests) taken once; in a distributed
//! run, what other ranks read for this one.

use std::sync::OnceLock;

use super::exchange;
use crate::error::{Error, Result};
use crate::formats::atomic::FileDigest;
use crate::formats::ckpt::ReadOptions;
use crate::formats::manifest::{self, Manifest};
use crate::formats::Source;
use crate::plan::{CopyStep, Plan};

/// Sources opened once, on first use, shared by the workers.
pub(super) struct Sources<'p> {
    pub(super) plan: &'p Plan,
    pub(super) read: &'p ReadOptions,
    pub(super) opened: Vec<OnceLock<std::result::Result<Source, String>>>,
    pub(super) digests: Vec<OnceLock<std::result::Result<FileDigest, String>>>,
    /// In a distributed run: what other ranks read for this one.
    pub(super) remote: Option<&'p exchange::Received>,
    /// This run's [`SourceKey`] job: a device backend keeps what it uploads
    /// of a source tensor under it until the run ends.
    pub(super) job: u64,
}

impl<'p> Sources<'p> {
    /// The length and hash of source `i`, computed once.
    ///
    /// A source with a manifest of its own (a reshard output) must match
    /// it: a source changed since it was written is an error naming it.
    pub(super) fn digest(&self, i: usize) -> Result<FileDigest> {
        if let Some(d) = self.remote.and_then(|r| r.digests.get(&i)) {
            return Ok(*d);
        }
        self.digests[i]
            .get_or_init(|| {
                let path = &self.plan.sources[i].path;
                let d = manifest::digest_file(path).map_err(|e| e.to_string())?;
                if let Ok(Some(m)) = Manifest::read(path) {
                    if m.digest != d {
                        return Err(Error::SourceChanged {
                            what: format!(
                                "it does not match its manifest ({} bytes with xxh3 {:016x}; the \
                                 manifest says {} bytes with xxh3 {:016x}; if it was changed on \
                                 purpose, remove {})",
                                d.bytes,
                                d.xxh3,
                                m.digest.bytes,
                                m.digest.xxh3,
                                manifest::manifest_path(path).display()
                            ),
                        }
                        .in_file(path)
                        .to_string());
                    }
                }
                Ok(d)
            })
            .clone()
            .map_err(Error::invalid)
    }

    pub(super) fn get(&self, i: usize) -> Result<&Source> {
        self.opened[i]
            .get_or_init(|| {
                Source::open(&self.plan.sources[i].path, self.read).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::invalid(e.clone()))
    }

    /// The box of `step` as another rank cut it (dense, in the
    /// destination dtype), when that rank reads its source.
    pub(super) fn received(&self, step: &CopyStep) -> Option<&'p [u8]> {
        self.remote.and_then(|r| r.get(step))
    }

    /// The value of string entry `tensor` of source `i`.
    pub(super) fn string(&self, i: usize, tensor: &str) -> Result<String> {
        if let Some(v) = self
            .remote
            .and_then(|r| r.strings.get(&(i, tensor.to_string())))
        {
            return Ok(v.clone());
        }
        self.get(i)?.string(tensor)
    }
}
