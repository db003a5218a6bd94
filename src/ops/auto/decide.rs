//! Does a checkpoint already have the job's layout? Two layouts match when
//! they have the same pipeline stages (devices per stage, stage count, and
//! the stage of every parameter) and every parameter's slice on every rank
//! is identical: the same layout, or, when the layouts are written
//! differently, equal `rank_slice`s and slice shapes for the parameter's
//! real global shape. A complete checkpoint matches a job only when the job
//! keeps every parameter whole on every rank in a single stage.
//!
//! Only parameters in both strategies are compared; the others are copied
//! unchanged by a transform anyway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::source::EntryKind;
use crate::error::Result;
use crate::formats::ckpt::ReadOptions;
use crate::formats::strategy::Strategy;
use crate::formats::{EntryValue, Source};
use crate::layout::Layout;

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Whether the rank can load the checkpoint as it is.
    pub matches: bool,
    /// Why, in words.
    pub reason: String,
}

fn yes(reason: impl Into<String>) -> Result<Verdict> {
    Ok(Verdict {
        matches: true,
        reason: reason.into(),
    })
}

fn no(reason: impl Into<String>) -> Result<Verdict> {
    Ok(Verdict {
        matches: false,
        reason: reason.into(),
    })
}

/// Tensor shapes of a checkpoint (a file, or a complete folder's files),
/// from the indexes only.
fn shapes(path: &Path) -> Result<HashMap<String, Vec<u64>>> {
    if crate::formats::checkpoint2::is_checkpoint2(path) {
        let ck = crate::formats::checkpoint2::open(path)?;
        return Ok(ck
            .params
            .into_iter()
            .map(|p| (p.name, p.global_shape))
            .collect());
    }
    let (_, files) = crate::ops::transform::source_files(path)?;
    let mut out = HashMap::new();
    for (_, file) in files {
        let source = Source::open(
            &file,
            &ReadOptions {
                verify_crc: false,
                ..ReadOptions::default()
            },
        )?;
        out.extend(
            source
                .entries()
                .into_iter()
                .filter(|e| matches!(e.value, EntryValue::Tensor(_)))
                .map(|e| (e.name, e.dims.iter().map(|&d| d.max(0) as u64).collect())),
        );
    }
    Ok(out)
}

/// Compares the entry's layout (its source strategy `src`, `None` for a
/// complete checkpoint) with the job's (`dst`, `None` for a one-device job).
pub(crate) fn compare(
    kind: &EntryKind,
    src: Option<&Strategy>,
    dst: Option<&Strategy>,
) -> Result<Verdict> {
    match (kind, src) {
        (EntryKind::Complete(file), _) => complete_vs_job(file, dst),
        (EntryKind::Tree { files, .. }, None) => match files.get(&0) {
            Some(f) => complete_vs_job(f, dst),
            None => no("rank_0's file is not here, so its layout cannot be read"),
        },
        (EntryKind::Tree { files, .. }, Some(src)) => sharded_vs_job(files, src, dst),
    }
}

fn complete_vs_job(file: &Path, dst: Option<&Strategy>) -> Result<Verdict> {
    let Some(dst) = dst else {
        return yes("the checkpoint is complete and the job runs on one device");
    };
    let table = dst.layout_table(None)?;
    let stages = table.stage_num()?;
    if stages > 1 {
        return no(format!(
            "the checkpoint is complete but the job has {stages} pipeline stages: each rank holds \
             only its stage's parameters"
        ));
    }
    let dims = shapes(file)?;
    let mut absent = 0;
    for (name, pl) in table.iter() {
        let Some(global) = dims.get(name) else {
            absent += 1;
            continue;
        };
        let layout = Layout::from_param(pl);
        match layout.slice_shape(global) {
            Ok(s) if &s == global => {}
            Ok(s) => {
                return no(format!(
                    "the checkpoint is complete but the job splits {name} ({global:?}) into \
                     slices of {s:?}"
                ))
            }
            Err(e) => return no(format!("{name}: {e}")),
        }
    }
    yes(format!(
        "the checkpoint is complete and the job keeps every parameter whole on every rank{}",
        absent_note(absent)
    ))
}

fn absent_note(absent: usize) -> String {
    if absent == 0 {
        String::new()
    } else {
        format!(" ({absent} of the job's parameters are not in the checkpoint)")
    }
}

fn sharded_vs_job(
    files: &std::collections::BTreeMap<usize, PathBuf>,
    src: &Strategy,
    dst: Option<&Strategy>,
) -> Result<Verdict> {
    let src_full = src.layout_table(None)?;
    let (sp, ss) = (
        src_full.device_num_per_stage()?,
        src_full.stage_num()? as u64,
    );
    let (dp, ds, dst_per_rank): (u64, u64, Box<dyn Fn(u64) -> Result<_>>) = match dst {
        Some(d) => {
            let full = d.layout_table(None)?;
            (
                full.device_num_per_stage()?,
                full.stage_num()? as u64,
                Box::new(move |r| d.layout_table(Some(r)).map(Some)),
            )
        }
        None => (1, 1, Box::new(|_| Ok(None))),
    };
    if (sp, ss) != (dp, ds) {
        return no(format!(
            "the checkpoint has {} ranks ({ss} stage(s) of {sp}) and the job {} ({ds} stage(s) of {dp})",
            sp * ss,
            dp * ds
        ));
    }
    let mut absent = 0;
    for stage in 0..ss {
        let first = stage * sp;
        let st = src.layout_table(Some(first))?;
        let dt = dst_per_rank(first)?;
        let mut stage_shapes: Option<HashMap<String, Vec<u64>>> = None;
        // A one-device job: every parameter whole.
        let names: Vec<String> = match &dt {
            Some(t) => t
                .iter()
                .filter(|(_, l)| l.stages.contains(&(stage as u32)))
                .map(|(n, _)| n.clone())
                .collect(),
            None => st.names().map(str::to_owned).collect(),
        };
        for name in names {
            let Some(sl) = st.get(&name) else {
                absent += 1;
                continue;
            };
            if !sl.stages.contains(&(stage as u32)) {
                return no(format!(
                    "{name} is in pipeline stage {stage} for the job but in stage(s) {:?} in the checkpoint",
                    sl.stages
                ));
            }
            let from = Layout::from_param(sl);
            let to = match &dt {
                Some(t) => Layout::from_param(t.get(&name).expect("listed from the table")),
                None => Layout::unsharded(from.ndim()),
            };
            if from == to {
                continue;
            }
            if stage_shapes.is_none() {
                let Some(file) = (first..first + sp).find_map(|r| files.get(&(r as usize))) else {
                    return no(format!(
                        "no source file of pipeline stage {stage} is here to read {name}'s shape"
                    ));
                };
                stage_shapes = Some(shapes(file)?);
            }
            let Some(dims) = stage_shapes.as_ref().and_then(|s| s.get(&name)) else {
                return no(format!(
                    "the source files of stage {stage} do not hold {name}, which the strategy lists"
                ));
            };
            let global = match from.global_shape(dims) {
                Ok(g) => g,
                Err(e) => return no(format!("{name}: {e}")),
            };
            let (a, b) = (from.slice_shape(&global), to.slice_shape(&global));
            match (a, b) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(a), Ok(b)) => {
                    return no(format!(
                        "{name} ({global:?}) is held in slices of {a:?} by the checkpoint but of {b:?} by the job"
                    ))
                }
                (Err(e), _) | (_, Err(e)) => return no(format!("{name}: {e}")),
            }
            for k in 0..sp {
                if from.rank_slice(&global, k)? != to.rank_slice(&global, k)? {
                    return no(format!(
                        "{name}: rank {} holds a different part of the tensor in the checkpoint \
                         than in the job",
                        first + k
                    ));
                }
            }
        }
    }
    match dst {
        None => yes(format!(
            "every rank of the checkpoint holds whole tensors, so rank_0's file is complete{}",
            absent_note(absent)
        )),
        Some(_) => yes(format!(
            "the checkpoint's layout is the job's: {} ranks in {ss} stage(s), and every \
             parameter's slice is the same on every rank{}",
            sp * ss,
            absent_note(absent)
        )),
    }
}
