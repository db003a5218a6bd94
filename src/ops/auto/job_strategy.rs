//! The job's strategy as one rank reads it: its own file, or with pipeline
//! stages, the merge of every stage's file once all exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::sync::Patience;
use super::{sync, AutoOptions};
use crate::error::{Error, Result, ResultExt};
use crate::formats::strategy::{self, Strategy, MERGED_FILE_NAME};

/// The job's strategy, as this rank reads it.
pub(super) struct JobStrategy {
    pub(super) strategy: Strategy,
    /// With one pipeline stage: the strategy folder, where each converting
    /// rank's own file is.
    pub(super) per_rank: Option<PathBuf>,
}

/// The job's strategy; `None` for a one-device job. With `wait`, waits for
/// the strategy files the job writes; without, uses them only if they are
/// already there.
pub(super) fn load(
    o: &AutoOptions,
    wait: bool,
    notes: &mut Vec<String>,
) -> Result<Option<JobStrategy>> {
    if o.world_size == 1 {
        return Ok(None);
    }
    if let Some(p) = &o.dst_strategy {
        let s = strategy::load(p)?;
        check_job_geometry(o, &s, &p.display().to_string())?;
        return Ok(Some(JobStrategy {
            strategy: s,
            per_rank: None,
        }));
    }
    let dir = o.strategy_dir();
    let patience = if wait {
        o.patience()
    } else {
        Patience {
            timeout: std::time::Duration::ZERO,
            ..o.patience()
        }
    };
    let w = o.world_size;
    let pp = o.parallel.pipeline_stage.max(1);
    let wanted: Vec<usize> = if pp == 1 {
        vec![o.rank]
    } else {
        if w % pp != 0 {
            return Err(Error::usage(format!(
                "parallel_config.pipeline_stage {pp} does not divide the world size {w}"
            )));
        }
        (0..w).collect()
    };
    let files = match wait_rank_strategy_files(o, &dir, &wanted, &patience) {
        Ok(f) => f,
        Err(e) if !wait => {
            notes.push(format!(
                "the layouts were not compared: the job's strategy is not there yet ({e})"
            ));
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if pp == 1 {
        let path = &files[&o.rank];
        let s = load_with_retry(std::slice::from_ref(path), &patience)?
            .pop()
            .expect("one file");
        check_job_geometry(o, &s, &path.display().to_string())?;
        return Ok(Some(JobStrategy {
            strategy: s,
            per_rank: Some(dir),
        }));
    }
    // Pipeline stages: the merge of one file per stage (every file of a
    // stage holds the same layouts; `merge_pipeline` keeps one per stage).
    let per_stage = w / pp;
    let paths: Vec<PathBuf> = (0..pp).map(|s| files[&(s * per_stage)].clone()).collect();
    let strategies = load_with_retry(&paths, &patience)?;
    for (s, (st, p)) in strategies.iter().zip(&paths).enumerate() {
        if st.stage() != Some(s as u32) {
            return Err(Error::strategy(format!(
                "this strategy file is of pipeline stage {:?}, but with {w} ranks and \
                 pipeline_stage {pp} its rank is in stage {s}",
                st.stage()
            ))
            .in_file(p));
        }
    }
    let merged = strategy::merge_pipeline(&paths)?;
    if o.is_main() {
        let out = dir.join(MERGED_FILE_NAME);
        strategy::write_protobuf(&merged, &out)?;
        notes.push(format!("wrote {}", out.display()));
    }
    check_job_geometry(
        o,
        &merged,
        &format!("the merge of {}'s files", dir.display()),
    )?;
    Ok(Some(JobStrategy {
        strategy: merged,
        per_rank: None,
    }))
}

impl JobStrategy {
    /// The strategy converting rank `c` converts with: with one pipeline
    /// stage, `c`'s own `*_rank_{c}.ckpt` (as mindformers does), else the
    /// merged strategy.
    pub(super) fn for_converter(&self, o: &AutoOptions, c: usize) -> Result<Strategy> {
        match &self.per_rank {
            Some(dir) if c != o.rank => {
                let files = wait_rank_strategy_files(o, dir, &[c], &o.patience())?;
                let s = load_with_retry(std::slice::from_ref(&files[&c]), &o.patience())?
                    .pop()
                    .expect("one file");
                check_job_geometry(o, &s, &files[&c].display().to_string())?;
                Ok(s)
            }
            _ => Ok(self.strategy.clone()),
        }
    }
}

/// mindformers' safetensors flow keeps the merged source and job
/// strategies in `<output>/merged_strategy/` (`src_strategy.ckpt`,
/// `dst_strategy.ckpt`: `merge_pipeline_strategys` of each folder, spec
/// safetensors-era §5.3); the main rank writes them as it does, so tools
/// that read them there find them. A strategy given as one file is copied.
/// A one-device job (`has_job_strategy` false) has no job strategy to
/// merge.
pub(super) fn write_merged(
    o: &AutoOptions,
    has_job_strategy: bool,
    notes: &mut Vec<String>,
) -> Result<()> {
    let job = o.dst_strategy.clone().unwrap_or_else(|| o.strategy_dir());
    let sources = [
        ("src_strategy.ckpt", o.src_strategy.as_ref()),
        ("dst_strategy.ckpt", has_job_strategy.then_some(&job)),
    ];
    if sources.iter().all(|(_, from)| from.is_none()) {
        return Ok(());
    }
    let dir = o.output_dir.join("merged_strategy");
    super::convert::make_dir(&o.output_dir, &dir)?;
    for (name, from) in sources {
        let Some(from) = from else { continue };
        let merged = if from.is_dir() {
            // The per-rank files only: `merged_ckpt_strategy.ckpt` beside
            // them is reshard's (and the ckpt flow's) own merge.
            let files: Vec<PathBuf> = rank_strategy_files(from).into_values().flatten().collect();
            strategy::merge_pipeline(&files).in_file(from)?
        } else {
            strategy::load(from)?
        };
        strategy::write_protobuf(&merged, &dir.join(name))?;
    }
    notes.push(format!(
        "wrote the merged strategies to {} as mindformers does",
        dir.display()
    ));
    Ok(())
}

/// Waits until `dir` holds exactly one `*_rank_{r}.ckpt` for every rank of
/// `wanted`; returns them.
pub(super) fn wait_rank_strategy_files(
    o: &AutoOptions,
    dir: &Path,
    wanted: &[usize],
    patience: &Patience,
) -> Result<BTreeMap<usize, PathBuf>> {
    sync::poll_until(
        patience,
        || {
            let listing = rank_strategy_files(dir);
            let mut out = BTreeMap::new();
            for &r in wanted {
                match listing.get(&r).map(Vec::as_slice) {
                    None | Some([]) => return Ok(None),
                    Some([one]) => {
                        out.insert(r, one.clone());
                    }
                    Some(many) => {
                        return Err(Error::bad_input(format!(
                            "there can be only one strategy file for rank {r}, but {} has {}",
                            dir.display(),
                            many.iter()
                                .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                }
            }
            Ok(Some(out))
        },
        || {
            let listing = rank_strategy_files(dir);
            let missing: Vec<usize> = wanted
                .iter()
                .copied()
                .filter(|r| !listing.contains_key(r))
                .collect();
            format!(
                "the job's strategy files in {} ({} of {} present; missing {}{}). The job writes \
                 them when its model is built (run it once with only_save_strategy: True, or \
                 write them with `reshard strategy`){}",
                dir.display(),
                wanted.len() - missing.len(),
                wanted.len(),
                missing
                    .iter()
                    .take(8)
                    .map(|r| format!("*_rank_{r}.ckpt"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if missing.len() > 8 { ", …" } else { "" },
                if o.node_local {
                    "; without a shared disk, every node needs these files: copy them, or give \
                     dst_strategy"
                } else {
                    ""
                }
            )
        },
    )
}

/// Parses strategy files, retrying while one fails to parse (the job may
/// still be writing it) until the timeout.
pub(super) fn load_with_retry(paths: &[PathBuf], patience: &Patience) -> Result<Vec<Strategy>> {
    let last_error: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    sync::poll_until(
        patience,
        || match paths.iter().map(|p| strategy::load_file(p)).collect() {
            Ok(list) => Ok(Some(list)),
            Err(e) => {
                *last_error.borrow_mut() = Some(e.to_string());
                Ok(None)
            }
        },
        || {
            format!(
                "readable strategy files ({})",
                last_error.borrow().clone().unwrap_or_default()
            )
        },
    )
}

/// The job's strategy must describe `world_size` ranks in
/// `pipeline_stage` stages.
pub(super) fn check_job_geometry(o: &AutoOptions, s: &Strategy, origin: &str) -> Result<()> {
    let table = s.layout_table(None)?;
    let (per, stages) = (table.device_num_per_stage()?, table.stage_num()?);
    let total = per as usize * stages;
    let pp = o.parallel.pipeline_stage.max(1);
    if total != o.world_size || (o.dst_strategy.is_none() && pp == 1 && s.stage().unwrap_or(0) != 0)
    {
        return Err(Error::strategy(format!(
            "the job's strategy ({origin}) describes {total} rank(s) ({stages} stage(s) of {per}, \
             file stage {:?}), but the job has {} ranks and parallel_config.pipeline_stage {pp}{}",
            s.stage(),
            o.world_size,
            if pp == 1 {
                "; with pipeline parallelism set parallel_config.pipeline_stage"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The `*_rank_{r}.ckpt` files of a strategy folder, by rank.
pub(super) fn rank_strategy_files(dir: &Path) -> BTreeMap<usize, Vec<PathBuf>> {
    let mut out: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Some(stem) = name.strip_suffix(".ckpt") else {
            continue;
        };
        let Some((_, r)) = stem.rsplit_once("_rank_") else {
            continue;
        };
        if r.is_empty() || !r.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(r) = r.parse::<usize>() {
            out.entry(r).or_default().push(e.path());
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}
