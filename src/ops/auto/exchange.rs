//! `exchange: hccl`: the ranks of the job convert together, without a
//! shared disk and without copying weights between nodes by hand. Every
//! rank runs as one rank of an HCCL communicator (root info from rank 0
//! through a TCP rendezvous on the master address, or a file on a shared
//! path), and:
//!
//! 1. lists the source files on its own disk and learns everyone's lists
//!    (file names and tensor indexes, no tensor bytes);
//! 2. plans the whole conversion, the same on every rank (a source rank on
//!    no node is an error on every rank, naming it);
//! 3. runs its part through the one executor ([`crate::exec::execute_on`]):
//!    each source file is read by exactly one rank that has it, the boxes
//!    other ranks need travel card to card, and each rank writes its own
//!    `rank_{r}/checkpoint_{r}.ckpt` (temporary name, manifest, rename).
//!
//! A failure on any rank, a rank that dies, or an HCCL timeout fails every
//! rank with a typed error and leaves no output file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::source::{Entry, EntryKind};
use super::{Action, AutoOptions, EntryReport};
#[cfg(not(feature = "ascend"))]
use crate::error::DeviceErrorKind;
use crate::error::{Error, JobErrorKind, Result};
use crate::exec::ExchangeReport;
use crate::formats::strategy::Strategy;
use crate::formats::tree::RankSource;
use crate::formats::{EntryValue, Source, SourceEntry};

/// How the ranks of a job get the source bytes they lack.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Exchange {
    /// Through files: each converting rank reads what it needs from its
    /// disk (shared, or holding what the node's ranks need).
    #[default]
    Files,
    /// Card to card over HCCL (feature `ascend`): each rank reads only what
    /// is on its node's disk.
    Hccl {
        /// `host:port` of the root-info rendezvous (when not set,
        /// [`super::Settings::resolve`] takes `MS_SCHED_HOST` and
        /// `MS_SCHED_PORT` + 1, as msrun sets them; else a file under
        /// `output_dir`, which then must be shared).
        rendezvous: Option<String>,
    },
}

impl Exchange {
    /// Parses the `exchange` setting (`files` or `hccl`).
    pub fn parse(value: Option<&str>, rendezvous: Option<String>) -> Result<Exchange> {
        match value.map(str::trim) {
            None | Some("") | Some("files") | Some("none") => Ok(Exchange::Files),
            Some("hccl") => Ok(Exchange::Hccl { rendezvous }),
            Some(other) => Err(Error::usage_of(
                "exchange",
                format!("exchange must be 'files' or 'hccl', not {other:?}"),
            )),
        }
    }
}

/// The rendezvous of the job's root info.
#[cfg_attr(not(feature = "ascend"), allow(dead_code))]
fn root_info(o: &AutoOptions, rendezvous: &Option<String>) -> crate::comm::RootInfo {
    match rendezvous.clone() {
        Some(addr) => crate::comm::RootInfo::Tcp {
            addr,
            world: o.world_size,
            timeout: o.timeout,
        },
        None => crate::comm::RootInfo::File(o.transformed_dir().join(".hccl_root_info"), o.timeout),
    }
}

/// The files of `entry` on this node: (source rank, path).
fn local_files(entry: &Entry) -> Vec<(usize, PathBuf)> {
    match &entry.kind {
        EntryKind::Complete(f) => f.is_file().then(|| (0, f.clone())).into_iter().collect(),
        EntryKind::Tree { files, .. } => files.iter().map(|(k, p)| (*k, p.clone())).collect(),
    }
}

fn entry_json(e: &SourceEntry) -> Value {
    let (kind, dtype) = match &e.value {
        EntryValue::Tensor(d) => ("tensor", d.mindspore_name().to_string()),
        EntryValue::Str => ("str", String::new()),
        EntryValue::MapTensor => ("map", String::new()),
    };
    json!([e.name, kind, dtype, e.dims])
}

fn entry_from_json(v: &Value) -> Option<SourceEntry> {
    let a = v.as_array()?;
    let value = match a.get(1)?.as_str()? {
        "tensor" => EntryValue::Tensor(crate::DType::from_mindspore_name(a.get(2)?.as_str()?)?),
        "str" => EntryValue::Str,
        _ => EntryValue::MapTensor,
    };
    Some(SourceEntry {
        name: a.first()?.as_str()?.to_string(),
        value,
        dims: a
            .get(3)?
            .as_array()?
            .iter()
            .map(Value::as_i64)
            .collect::<Option<_>>()?,
    })
}

/// This node's files with their indexes, as JSON.
fn local_index(files: &[(usize, PathBuf)]) -> Result<Vec<u8>> {
    let mut list = Vec::new();
    for (k, path) in files {
        let source = Source::open(path, &Default::default())?;
        list.push(json!({
            "rank": k,
            "path": path.to_string_lossy(),
            "entries": source.entries().iter().map(entry_json).collect::<Vec<_>>(),
        }));
    }
    Ok(serde_json::to_vec(&list).expect("JSON"))
}

/// Every rank's index merged: per source rank, the first description (by
/// rank) and whether this rank has it.
#[allow(clippy::type_complexity)]
fn merge_indexes(
    all: &[Vec<u8>],
    me: usize,
) -> Result<BTreeMap<usize, (PathBuf, Vec<SourceEntry>, Option<PathBuf>)>> {
    let mut out: BTreeMap<usize, (PathBuf, Vec<SourceEntry>, Option<PathBuf>)> = BTreeMap::new();
    for (r, bytes) in all.iter().enumerate() {
        let damaged = |why: String| Error::Job {
            kind: JobErrorKind::Mismatch,
            message: format!(
                "rank {r} sent a list of its files this rank cannot read ({why}): do all ranks \
                 run the same reshard?"
            ),
        };
        let list: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))?;
        for item in list {
            let bad = || damaged("an entry lacks its rank, path or tensors".into());
            let k = item["rank"].as_u64().ok_or_else(bad)? as usize;
            let path = PathBuf::from(item["path"].as_str().ok_or_else(bad)?);
            let entries = item["entries"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(entry_from_json)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?;
            let slot = out
                .entry(k)
                .or_insert_with(|| (path.clone(), entries, None));
            if r == me {
                slot.2 = Some(path);
            }
        }
    }
    Ok(out)
}

/// What this rank did for one entry.
pub(super) struct Converted {
    pub entry: EntryReport,
    pub exchange: ExchangeReport,
}

/// A job's communicator, opened at the first conversion.
#[cfg(feature = "ascend")]
pub(super) struct Job {
    backend: &'static crate::backend::AscendBackend,
    comm: crate::comm::hccl::HcclCommunicator<'static>,
}

/// A job's communicator (none without feature `ascend`).
#[cfg(not(feature = "ascend"))]
pub(super) enum Job {}

impl Job {
    /// Joins the job's HCCL communicator as this rank.
    pub(super) fn open(o: &AutoOptions, rendezvous: &Option<String>) -> Result<Job> {
        #[cfg(feature = "ascend")]
        {
            use crate::backend::ascend::AscendOptions;
            let device = o.device_id.unwrap_or(o.rank % o.npu_num_per_node.max(1));
            let backend = crate::backend::AscendBackend::new(AscendOptions {
                device: device as i32,
                ..crate::backend::ascend_options()
            })?;
            // One per process, alive until it exits (HCCL's communicator
            // borrows it).
            let backend: &'static _ = Box::leak(Box::new(backend));
            let comm = crate::comm::hccl::HcclCommunicator::new(
                backend,
                o.rank,
                o.world_size,
                &root_info(o, rendezvous),
            )?;
            Ok(Job { backend, comm })
        }
        #[cfg(not(feature = "ascend"))]
        {
            let _ = (o, rendezvous);
            Err(Error::Device {
                backend: "hccl",
                kind: DeviceErrorKind::Unavailable,
                message: "exchange: hccl needs a reshard built with --features ascend".into(),
            })
        }
    }
}

/// Converts `entry` as one rank of the job (see the module docs).
pub(super) fn convert(
    o: &AutoOptions,
    job: &Job,
    entry: &Entry,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
    why: &str,
) -> Result<Converted> {
    let out = o.transformed_dir().join(&entry.name);
    let files = local_files(entry);
    let index = local_index(&files)?;
    let all = job.all_gather_bytes(&index)?;
    let merged = merge_indexes(&all, o.rank)?;
    let count = match &entry.kind {
        EntryKind::Complete(_) => 1,
        EntryKind::Tree { .. } => crate::plan::transform::source_rank_count(src)?,
    };
    let missing: Vec<usize> = (0..count).filter(|k| !merged.contains_key(k)).collect();
    if !missing.is_empty() {
        return Err(Error::Job {
            kind: JobErrorKind::SourceMissing,
            message: format!(
                "source rank(s) {missing:?} of {} are on no node of the job (no rank_k/ folder \
                 holding a .{} file on any node)",
                entry.source().display(),
                o.load_ckpt_format.extension()
            ),
        });
    }
    if let Some(extra) = merged.keys().find(|&&k| k >= count) {
        return Err(Error::strategy(format!(
            "a node holds rank_{extra}/ but the strategy describes {count} rank(s): is \
             src_strategy_path_or_dir this checkpoint's strategy?"
        ))
        .in_file(entry.source()));
    }
    let mut local = Vec::new();
    let sources: Vec<RankSource> = merged
        .into_iter()
        .map(|(k, (path, entries, mine))| {
            local.push(mine.is_some());
            RankSource::new(k, mine.unwrap_or(path), entries)
        })
        .collect();
    let plan = crate::plan::transform::plan(&crate::plan::transform::TransformInput {
        sources,
        src_strategy: src,
        dst_strategy: dst,
        dst_dir: &out,
        prefix: "checkpoint_",
        ranks: None,
        format: o.load_ckpt_format,
        lora: None,
        // Not every rank's file is on this node, so the files'
        // remove_redundancy flags cannot all be read here: the exchange
        // takes sets that keep every copy (a de-duplicated set lacks
        // tensors, which the planner reports by name).
        deduplicated: false,
        remove_redundancy: false,
    })?;
    for f in plan
        .files
        .iter()
        .filter(|f| f.rank % o.world_size == o.rank)
    {
        if let Some(d) = f.path.parent().filter(|d| d.exists()) {
            std::fs::remove_dir_all(d).map_err(|e| Error::from(e).in_file(d))?;
        }
    }
    let options = crate::exec::ExecOptions {
        workers: o.workers,
        ..Default::default()
    };
    let (_, exchange) = job.execute(&plan, &options, &local)?;
    let path = plan
        .files
        .iter()
        .find(|f| f.rank == o.rank)
        .map(|f| f.path.clone())
        .ok_or_else(|| {
            Error::strategy(format!(
                "the job's strategy has no destination rank {}",
                o.rank
            ))
        })?;
    Ok(Converted {
        entry: EntryReport {
            name: entry.name.clone(),
            source: entry.source().to_path_buf(),
            action: Action::Converted,
            reason: format!("converted, because {why}"),
            path,
            converted_by: Some(o.rank),
            reused: false,
        },
        exchange,
    })
}

#[cfg(feature = "ascend")]
impl Job {
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        crate::exec::all_gather_bytes(self.backend, &self.comm, mine)
    }

    fn execute(
        &self,
        plan: &crate::plan::Plan,
        options: &crate::exec::ExecOptions,
        local: &[bool],
    ) -> Result<(crate::exec::ExecReport, ExchangeReport)> {
        // Each rank re-reads what it wrote against the manifests before the
        // ranks confirm success to each other (as `--verify` does).
        let verify = |p: &crate::plan::Plan| crate::ops::verify::verify_outputs(p);
        crate::exec::execute_on_local(
            plan,
            self.backend,
            &self.comm,
            options,
            local,
            Some(&verify),
        )
    }
}

#[cfg(not(feature = "ascend"))]
impl Job {
    fn all_gather_bytes(&self, _: &[u8]) -> Result<Vec<Vec<u8>>> {
        match *self {}
    }

    fn execute(
        &self,
        _: &crate::plan::Plan,
        _: &crate::exec::ExecOptions,
        _: &[bool],
    ) -> Result<(crate::exec::ExecReport, ExchangeReport)> {
        match *self {}
    }
}
