//! A mindformers Checkpoint 2.0 directory as the source of `transform` and
//! `verify` (spec safetensors-era §6): each parameter is assembled from its
//! shards (box copies out of the files `metadata.json` names), and, for a
//! destination strategy, the transform planner's copies out of that
//! (virtual) full tensor are composed with the assembly, so each rank's
//! slice is read straight from the shard files. One plan, one executor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::checkpoint2::{self, Checkpoint2};
use crate::formats::strategy::Strategy;
use crate::formats::tree::FileFormat;
use crate::formats::{EntryValue, SourceEntry};
use crate::layout::boxes::BoxCopy;
use crate::plan::compose::VirtualSource;
use crate::plan::transform::{plan as plan_transform, TransformInput};
use crate::plan::{Content, CopyStep, FilePlan, Plan, SourceFile, TensorPlan};

/// What to make of a Checkpoint 2.0 source.
pub(crate) struct Target<'a> {
    /// Destination strategy (`None`: one full checkpoint).
    pub dst: Option<&'a Strategy>,
    /// Output directory (`rank_{r}/{prefix}{r}.{ext}`).
    pub dst_dir: &'a Path,
    /// File name prefix.
    pub prefix: &'a str,
    /// Only these destination ranks.
    pub ranks: Option<Vec<usize>>,
    /// Output format.
    pub format: FileFormat,
    /// Write without redundant copies.
    pub remove_redundancy: bool,
}

/// The Checkpoint 2.0 directory at `src`, assembled: each parameter's full
/// tensor as box copies from its shard files, as one virtual complete
/// checkpoint that every planner can read (transform, verify, merge-lora,
/// convert).
pub(crate) fn open_assembled(src: &Path) -> Result<VirtualSource> {
    assemble(&checkpoint2::open(src)?)
}

/// A Checkpoint 2.0 source describes its own layout: no source strategy.
pub(crate) fn refuse_src_strategy(src: &Path, given: bool) -> Result<()> {
    if given {
        return Err(Error::usage_of(
            "src_strategy",
            "not for a Checkpoint 2.0 directory, which describes its layout in metadata.json",
        )
        .in_file(src));
    }
    Ok(())
}

/// Each parameter's full tensor as box copies from the shard files.
pub(crate) fn assemble(ck: &Checkpoint2) -> Result<VirtualSource> {
    let files = checkpoint2::files(&ck.params);
    let mut index: HashMap<PathBuf, (usize, HashMap<String, SourceEntry>)> = HashMap::new();
    let mut sources = Vec::with_capacity(files.len());
    for (i, (rank, path)) in files.into_iter().enumerate() {
        let entries = crate::formats::tree::index_entries(&path, &Default::default())?;
        let by_name = entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        index.insert(path.clone(), (i, by_name));
        sources.push(SourceFile { rank, path });
    }
    let mut tensors = Vec::with_capacity(ck.params.len());
    for p in &ck.params {
        let global: Vec<u64> = p.global_shape.clone();
        let mut dtype: Option<DType> = None;
        let mut steps = Vec::with_capacity(p.shards.len());
        for s in &p.shards {
            let (source, entries) = &index[&s.file];
            let err = |msg: String| Error::bad_input(msg).in_tensor(&p.name).in_file(&s.file);
            let e = entries.get(&p.name).ok_or_else(|| {
                err(format!(
                    "metadata.json says shard {} is here, but the file has no such tensor",
                    s.slice_id
                ))
            })?;
            let EntryValue::Tensor(d) = e.value else {
                return Err(err("not a tensor".into()));
            };
            let dims: Vec<u64> = e.dims.iter().map(|&d| d.max(0) as u64).collect();
            if dims != s.shape {
                return Err(err(format!(
                    "shard {} has shape {:?} here but local_shape {:?} in metadata.json",
                    s.slice_id, dims, s.shape
                )));
            }
            match dtype {
                Some(first) if first != d => {
                    return Err(err(format!("dtype {d} here, {first} in another shard")))
                }
                _ => dtype = Some(d),
            }
            steps.push(CopyStep {
                source: *source,
                tensor: p.name.clone(),
                copy: BoxCopy {
                    src_shape: s.shape.clone(),
                    src_dtype: d,
                    src_offset: vec![0; s.shape.len()],
                    dst_shape: global.clone(),
                    dst_dtype: d,
                    dst_offset: s.start.clone(),
                    extent: s.shape.clone(),
                    src_axes: Vec::new(),
                },
            });
        }
        let dtype = dtype
            .ok_or_else(|| Error::bad_input("metadata.json lists no shard").in_tensor(&p.name))?;
        tensors.push(TensorPlan {
            name: p.name.clone(),
            content: Content::Tensor {
                dtype,
                shape: global.iter().map(|&d| d as i64).collect(),
                steps,
            },
        });
    }
    Ok(VirtualSource {
        sources,
        tensors,
        path: ck.dir.join("assembled.safetensors"),
    })
}

/// The plan of a transform whose source is the Checkpoint 2.0 directory
/// `src`.
pub(crate) fn plan(src: &Path, t: &Target<'_>) -> Result<Plan> {
    let assembled = open_assembled(src)?;
    let Some(dst) = t.dst else {
        if t.remove_redundancy {
            return Err(Error::usage_of(
                "remove_redundancy",
                "needs a destination strategy: a single full checkpoint has no redundant copies",
            ));
        }
        let path = t
            .dst_dir
            .join("rank_0")
            .join(format!("{}0.{}", t.prefix, t.format.extension()));
        return Ok(Plan {
            sources: assembled.sources,
            files: vec![FilePlan {
                rank: 0,
                path,
                format: t.format,
                tensors: assembled.tensors,
                metadata: None,
            }],
        });
    };
    // A full, unsharded source: the transform planner cuts each rank's
    // slices out of it.
    let planned = plan_transform(&TransformInput {
        sources: vec![assembled.rank_source()?],
        src_strategy: None,
        dst_strategy: Some(dst),
        dst_dir: t.dst_dir,
        prefix: t.prefix,
        ranks: t.ranks.clone(),
        format: t.format,
        lora: None,
        deduplicated: false,
        remove_redundancy: t.remove_redundancy,
    })?;
    assembled.compose(planned)
}
