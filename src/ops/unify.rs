//! `reshard unify`: merge a distributed safetensors checkpoint (`rank_x/`
//! files and their strategy) into MindSpore's unified layout, byte-identical
//! with `mindspore.unified_safetensors` (MindSpore 2.10,
//! `parallel/transform_safetensors.py`; spec safetensors-era §3):
//!
//! - `part{i}.safetensors`: the full tensors, split into parts of about
//!   3 GiB by MindSpore's balancing rule (sizes descending, each to the
//!   lightest part, first-seen order on ties);
//! - `param_name_map.json`: name → part, `json.dumps(indent=4)` byte for byte;
//! - `hyper_param.safetensors`: rank 0's entries that are not unified
//!   (`global_step`, `epoch_num`, …, and `accu_grads*` or filtered
//!   parameters as rank 0's local slices, as MindSpore stores them).
//!
//! The merge itself is the transform planner's merge to one full
//! checkpoint (`plan::transform` with no destination strategy); this module
//! only distributes its tensors into parts and runs the one executor, so
//! every tensor streams from the mapped sources into its part.
//!
//! Ties between equal-size parameters go by first-seen order, which
//! MindSpore takes from `glob` (the directory's listing order); reshard
//! visits the rank folders in that same order, so the parts are the same
//! as MindSpore's on the same directory (and may differ from a copy of it
//! listed in another order, as MindSpore's do).
//!
//! Deviations, on purpose: MindSpore copies the sources' `crc_num` into
//! every part, where it no longer matches (a `crc_check` load then fails);
//! reshard drops it. MindSpore's metadata key order is random per
//! process; reshard's is sorted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::BackendChoice;
use crate::error::{Error, Result};
use crate::exec::{ExecReport, OutputControl};
use crate::formats::ckpt::ReadOptions;
use crate::formats::safetensors::{SafetensorsFile, STRING_KEY_PREFIX};
use crate::formats::strategy;
use crate::formats::tree::{self, FileFormat, RankSource};
use crate::ops::write::{write_job, DestinationCheck, ExtraContent, ExtraFile, Job, WriteSettings};
use crate::plan::transform::{needed_sources, plan, TransformInput};
use crate::plan::{Content, FilePlan, Plan, PlanSummary, TensorPlan};

/// MindSpore's part size: `split_num = ceil(total / 3 GiB)`.
pub const PART_BYTES: u64 = 3 << 30;

/// The name of the name map in a unified directory.
pub const NAME_MAP: &str = "param_name_map.json";

/// The name of the hyper-parameter file in a unified directory.
pub const HYPER_PARAM: &str = "hyper_param.safetensors";

/// Which parameters are unified, and under which names (MindSpore's
/// `choice_func`, as data).
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// Parameters whose name matches one of these shell patterns (`*`, `?`)
    /// are left out of the parts (`choice_func` returning `False`); as in
    /// MindSpore, rank 0's slice of them goes to `hyper_param.safetensors`.
    pub drop: Vec<String>,
    /// Parameters renamed in the parts and the name map (`choice_func`
    /// returning a string): source name → name written.
    pub rename: BTreeMap<String, String>,
}

impl Choice {
    /// `None` to drop `name`, else the name it is written under.
    pub fn apply<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.drop.iter().any(|p| glob_match(p, name)) {
            return None;
        }
        Some(self.rename.get(name).map_or(name, String::as_str))
    }
}

/// Whether `name` matches the shell pattern `pattern` (`*` any run, `?` any
/// one character; everything else literal).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Options of [`unify`].
#[derive(Debug, Clone)]
pub struct UnifyOptions {
    /// The directory of `rank_x/` folders holding `.safetensors` files.
    pub src_dir: PathBuf,
    /// The source strategy: file, merged file, or directory of per-rank files.
    pub src_strategy: PathBuf,
    /// Output directory (created if needed).
    pub dst_dir: PathBuf,
    /// `merge_with_redundancy`: the sources are complete (not saved with
    /// `remove_redundancy=True`). A file's own `remove_redundancy` flag
    /// overrides it, as in MindSpore.
    pub has_redundancy: bool,
    /// Only files ending `{suffix}.safetensors`, with MindSpore's rules.
    pub file_suffix: Option<String>,
    /// The rank files to read, instead of picking them in `src_dir` by
    /// `file_suffix` (`auto` passes the files it picked).
    pub files: Option<Vec<(usize, PathBuf)>>,
    /// Which parameters, under which names.
    pub choice: Choice,
    /// `split_dst_file = (k, n)`: this is machine `k` (1-based) of `n`, and
    /// writes only its share of the parts (machine 1 also the name map and
    /// the hyper parameters).
    pub split_dst_file: Option<(usize, usize)>,
    /// The part size the part count is computed from (MindSpore: 3 GiB).
    pub part_bytes: u64,
    /// Worker threads.
    pub workers: usize,
    /// How sources are read.
    pub read: ReadOptions,
    /// Write `<file>.manifest.json` beside each part (default on).
    pub manifest: bool,
    /// Re-read every output and check it against its manifest.
    pub verify: bool,
    /// Plan only; write nothing.
    pub dry_run: bool,
    /// Which backend runs the plan.
    pub backend: BackendChoice,
    /// Durability and progress.
    pub control: OutputControl,
}

impl UnifyOptions {
    /// MindSpore's defaults: complete sources, every file, 3 GiB parts.
    pub fn new(
        src_dir: impl Into<PathBuf>,
        src_strategy: impl Into<PathBuf>,
        dst_dir: impl Into<PathBuf>,
    ) -> UnifyOptions {
        UnifyOptions {
            src_dir: src_dir.into(),
            src_strategy: src_strategy.into(),
            dst_dir: dst_dir.into(),
            has_redundancy: true,
            file_suffix: None,
            files: None,
            choice: Choice::default(),
            split_dst_file: None,
            part_bytes: PART_BYTES,
            workers: 1,
            read: ReadOptions::default(),
            manifest: true,
            verify: false,
            dry_run: false,
            backend: BackendChoice::Cpu,
            control: OutputControl::default(),
        }
    }
}

/// A planned unify: the tensor files as one [`Plan`], and the name map.
#[derive(Debug, Clone)]
pub struct UnifyPlan {
    /// Parts (this machine's) and `hyper_param.safetensors`.
    pub plan: Plan,
    /// Number of parts of the whole job (`split_num`).
    pub parts: usize,
    /// The parts this machine writes.
    pub written: Range<usize>,
    /// `param_name_map.json`'s text, when this machine writes it.
    pub name_map: Option<String>,
    /// `total_size`: bytes of the unified parameters.
    pub total_size: u64,
    /// Parameters unified.
    pub params: usize,
    /// Things MindSpore would log as warnings.
    pub warnings: Vec<String>,
}

/// What [`unify`] did.
#[derive(Debug, Clone, Serialize)]
pub struct UnifyReport {
    /// The plan's summary.
    pub plan: PlanSummary,
    /// The execution, unless this was a dry run.
    pub executed: Option<ExecReport>,
    /// The backend that ran it.
    pub backend: String,
    /// Parts of the whole job.
    pub parts: usize,
    /// Parameters unified.
    pub params: usize,
    /// `total_size` of the name map.
    pub total_size: u64,
    /// The name map, when this run wrote it.
    pub name_map: Option<PathBuf>,
    /// Warnings (file flags overriding `--has-redundancy`, …).
    pub warnings: Vec<String>,
}

/// `_split_weight_dict`: parameters (in first-seen order, with sizes) into
/// `n` parts: stable sort by size descending, each to the part with the
/// smallest running total (the lowest index on ties). Returns indexes into
/// `sizes`, per part, in assignment order.
pub fn split_parts(sizes: &[u64], n: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut parts = vec![Vec::new(); n];
    let mut totals = vec![0u64; n];
    for i in order {
        let Some((k, _)) = totals.iter().enumerate().min_by_key(|&(k, t)| (*t, k)) else {
            break;
        };
        parts[k].push(i);
        totals[k] += sizes[i];
    }
    parts
}

/// The parts machine `k` of `n` writes (`split_dst_file`), of `parts`.
pub fn machine_parts(parts: usize, k: usize, n: usize) -> Range<usize> {
    let (a, r) = (parts / n, parts % n);
    let start = a * (k - 1) + (k - 1).min(r);
    start..start + a + usize::from(k <= r)
}

/// `json.dumps(s)` of a string (ASCII-escaped, as Python's default).
fn py_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `param_name_map.json` as `json.dumps(obj, indent=4)` writes it.
pub fn name_map_json(total_size: u64, weight_map: &[(String, String)]) -> String {
    let mut s = String::new();
    s.push_str("{\n    \"metadata\": {\n        \"total_size\": ");
    s.push_str(&total_size.to_string());
    s.push_str("\n    },\n    \"weight_map\": ");
    if weight_map.is_empty() {
        s.push_str("{}");
    } else {
        s.push('{');
        for (i, (name, file)) in weight_map.iter().enumerate() {
            s.push_str(if i == 0 { "\n        " } else { ",\n        " });
            py_json_string(name, &mut s);
            s.push_str(": ");
            py_json_string(file, &mut s);
        }
        s.push_str("\n    }");
    }
    s.push_str("\n}");
    s
}

/// `_check_remove_redundancy` over every file: a file's
/// `remove_redundancy` flag overrides the caller's choice (with a warning).
fn effective_redundancy(
    files: &[(usize, PathBuf, BTreeMap<String, String>)],
    mut has_redundancy: bool,
    warnings: &mut Vec<String>,
) -> bool {
    for (_, path, meta) in files {
        match meta.get("remove_redundancy").map(String::as_str) {
            Some("True") if has_redundancy => {
                warnings.push(format!(
                    "{} was saved with redundancy removed, but has_redundancy is true: following the file",
                    path.display()
                ));
                has_redundancy = false;
            }
            Some("False") if !has_redundancy => {
                warnings.push(format!(
                    "{} was saved with redundancy, but has_redundancy is false: following the file",
                    path.display()
                ));
                has_redundancy = true;
            }
            _ => {}
        }
    }
    has_redundancy
}

/// Plans a unify (reads the strategy and the files' headers only).
pub fn plan_unify(o: &UnifyOptions) -> Result<UnifyPlan> {
    if o.src_dir.is_file() {
        return Err(Error::usage_of(
            "src_dir",
            "must be a directory of rank_<n>/ folders, not a file",
        )
        .in_file(&o.src_dir));
    }
    if !o.src_dir.is_dir() {
        return Err(Error::missing("no such directory").in_file(&o.src_dir));
    }
    if crate::formats::checkpoint2::is_checkpoint2(&o.src_dir) {
        return Err(Error::unsupported(
            "a Checkpoint 2.0 directory is one complete checkpoint already, read as it is by \
             every command; to have it as one file, transform it without a destination strategy",
        )
        .in_file(&o.src_dir));
    }
    if let Some((k, n)) = o.split_dst_file {
        if k == 0 || k > n {
            return Err(Error::usage_of(
                "split_dst_file",
                format!("{k}/{n}: the machine number must be between 1 and the machine count"),
            ));
        }
    }
    if o.part_bytes == 0 {
        return Err(Error::usage_of("part_bytes", "must be positive"));
    }
    let files = match &o.files {
        Some(files) => files.clone(),
        None => tree::tree_safetensors(&o.src_dir, o.file_suffix.as_deref())?,
    };
    let strategy = strategy::load(&o.src_strategy)?;
    let table = strategy.layout_table(None)?;
    let mut warnings = Vec::new();
    let with_meta: Vec<(usize, PathBuf, BTreeMap<String, String>)> = files
        .iter()
        .map(|(r, p)| {
            Ok((
                *r,
                p.clone(),
                SafetensorsFile::open(p, false)?.metadata().clone(),
            ))
        })
        .collect::<Result<_>>()?;
    // A set saved with redundancy removed: the planner reads each
    // parameter from the rank that owns it (spec safetensors-era §3.6).
    let deduplicated = !effective_redundancy(&with_meta, o.has_redundancy, &mut warnings);
    let sources = tree::index_sources(files.clone(), &o.read)?;
    // The merge to one full checkpoint, as `transform` plans it.
    let mut whole = plan(&TransformInput {
        sources: sources.clone(),
        src_strategy: Some(&strategy),
        dst_strategy: None,
        dst_dir: &o.dst_dir,
        prefix: "",
        ranks: None,
        format: FileFormat::Safetensors,
        lora: None,
        deduplicated,
        remove_redundancy: false,
    })?;
    let merged = whole.files.pop().expect("one destination file");
    let mut by_name: HashMap<String, TensorPlan> = merged
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();

    // Parameters unified, first seen over the ranks (ascending) and each
    // file's header order, with their full sizes.
    let mut seen: HashSet<&str> = HashSet::new();
    let mut names: Vec<(&str, &str)> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    let mut kept: HashSet<&str> = HashSet::new();
    let listing = tree::rank_dirs_in_listing_order(&o.src_dir)?;
    let visit = listing
        .iter()
        .filter_map(|(rank, _)| sources.iter().find(|s| s.rank == *rank));
    for RankSource { path, entries, .. } in visit {
        for e in entries {
            let name = e.name.as_str();
            if !table.contains(name) || name.starts_with("accu_grads") || !seen.insert(name) {
                continue;
            }
            let Some(out) = o.choice.apply(name) else {
                continue;
            };
            let t = by_name.get(name).ok_or_else(|| {
                Error::Internal("the merge of the rank files does not produce it".into())
                    .in_tensor(name)
                    .in_file(path)
            })?;
            names.push((name, out));
            sizes.push(t.bytes());
            kept.insert(name);
        }
    }
    if names.is_empty() {
        return Err(Error::Strategy(format!(
            "no parameter of the strategy {} is in the checkpoint (or every one is filtered out); \
             is it the strategy of these files?",
            o.src_strategy.display()
        )));
    }
    let renamed: HashSet<&str> = names.iter().map(|n| n.1).collect();
    if renamed.len() != names.len() {
        return Err(Error::usage_of(
            "choice",
            "the renames give two parameters the same name",
        ));
    }
    let total_size: u64 = sizes.iter().sum();
    let split_num = (total_size.div_ceil(o.part_bytes) as usize).clamp(1, names.len());
    let parts = split_parts(&sizes, split_num);
    let written = match o.split_dst_file {
        Some((k, n)) => machine_parts(split_num, k, n),
        None => 0..split_num,
    };
    let first_machine = o.split_dst_file.map_or(true, |(k, _)| k == 1);

    // The parts' metadata: {"format": "ms"} updated with each needed file's
    // metadata, the highest rank first (so the lowest wins); a
    // `remove_redundancy` becomes "False"; the stale `crc_num` is dropped.
    let needed = needed_sources(Some(&strategy), None, &[0])?;
    let mut part_meta: BTreeMap<String, String> = [("format".into(), "ms".into())].into();
    for k in needed.get(&0).into_iter().flatten() {
        if let Some((_, _, m)) = with_meta.iter().find(|(r, _, _)| r == k) {
            part_meta.extend(m.iter().map(|(a, b)| (a.clone(), b.clone())));
        }
    }
    if let Some(v) = part_meta.get_mut("remove_redundancy") {
        *v = "False".into();
    }
    part_meta.remove("crc_num");
    part_meta.retain(|k, _| !k.starts_with(STRING_KEY_PREFIX));

    let mut out_files = Vec::new();
    let mut weight_map = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let file = format!("part{i}.safetensors");
        let mut tensors = Vec::with_capacity(part.len());
        for &p in part {
            let (name, out) = names[p];
            weight_map.push((out.to_string(), file.clone()));
            if written.contains(&i) {
                let mut t = by_name.remove(name).expect("planned above");
                t.name = out.to_string();
                tensors.push(t);
            }
        }
        if written.contains(&i) {
            out_files.push(FilePlan {
                rank: i,
                path: o.dst_dir.join(&file),
                format: FileFormat::Safetensors,
                tensors,
                metadata: Some(part_meta.clone()),
            });
        }
    }
    if first_machine {
        if let Some(hyper) = hyper_file(o, &whole, &sources, &kept)? {
            out_files.push(hyper);
        }
    }
    whole.files = out_files;
    Ok(UnifyPlan {
        plan: whole,
        parts: split_num,
        written,
        name_map: first_machine.then(|| name_map_json(total_size, &weight_map)),
        total_size,
        params: names.len(),
        warnings,
    })
}

/// `hyper_param.safetensors`: every entry of rank 0's file that is not
/// unified, as rank 0 holds it; `None` when there is none.
fn hyper_file(
    o: &UnifyOptions,
    plan: &Plan,
    sources: &[RankSource],
    kept: &HashSet<&str>,
) -> Result<Option<FilePlan>> {
    let Some(source) = plan.sources.iter().position(|s| s.rank == 0) else {
        return Err(Error::missing("rank_0 has no .safetensors file").in_file(&o.src_dir));
    };
    let entries = &sources
        .iter()
        .find(|s| s.rank == 0)
        .expect("rank 0 is a source")
        .entries;
    let mut tensors = Vec::new();
    for e in entries.iter().filter(|e| !kept.contains(e.name.as_str())) {
        let Some(content) = Content::whole(source, e) else {
            return Err(
                Error::unsupported("a map tensor cannot be stored in safetensors")
                    .in_tensor(&e.name)
                    .in_file(&plan.sources[source].path),
            );
        };
        tensors.push(TensorPlan {
            name: e.name.clone(),
            content,
        });
    }
    Ok((!tensors.is_empty()).then(|| FilePlan {
        rank: 0,
        path: o.dst_dir.join(HYPER_PARAM),
        format: FileFormat::Safetensors,
        tensors,
        metadata: Some([("format".into(), "ms".into())].into()),
    }))
}

/// Runs a unify: plans, refuses to overwrite, writes the tensor files
/// through the executor, then the name map.
pub fn unify(o: &UnifyOptions) -> Result<UnifyReport> {
    let planned = plan_unify(o)?;
    let summary = planned.plan.summary(o.workers);
    let map_path = o.dst_dir.join(NAME_MAP);
    let report = |executed, backend| UnifyReport {
        plan: summary.clone(),
        executed,
        backend,
        parts: planned.parts,
        params: planned.params,
        total_size: planned.total_size,
        name_map: planned.name_map.as_ref().map(|_| map_path.clone()),
        warnings: planned.warnings.clone(),
    };
    if o.dry_run {
        return Ok(report(None, o.backend.to_string()));
    }
    // The name map is written once every tensor file is, so a failed run
    // leaves nothing.
    let extra = planned
        .name_map
        .as_ref()
        .map(|text| ExtraFile {
            path: map_path.clone(),
            content: ExtraContent::Bytes(text.clone().into_bytes()),
        })
        .into_iter()
        .collect();
    let (executed, backend) = write_job(
        &planned.plan,
        &WriteSettings {
            workers: o.workers,
            manifest: o.manifest,
            verify: o.verify,
            backend: o.backend,
            destination: Some(&o.dst_dir),
            ..WriteSettings::new(&o.read, &o.control)
        },
        // Machines of a split job each write their share of the parts.
        &Job {
            check: DestinationCheck::Absent,
            extra,
            ..Job::default()
        },
    )?;
    Ok(report(Some(executed), backend))
}

/// Whether `dir` is a unified directory (holds `param_name_map.json`).
pub fn is_unified_dir(dir: &Path) -> bool {
    dir.join(NAME_MAP).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_mindspore_balancing() {
        // Sizes descending, stable; each to the lightest part, lowest index on ties.
        let sizes = [4, 8, 8, 2, 1, 8];
        assert_eq!(
            split_parts(&sizes, 3),
            vec![vec![1, 0], vec![2, 3], vec![5, 4]]
        );
        assert_eq!(split_parts(&sizes, 1), vec![vec![1, 2, 5, 0, 3, 4]]);
    }

    #[test]
    fn split_dst_file_shares() {
        // Spec §3.7: P=4, n=3 → {0,1}, {2}, {3}.
        assert_eq!(machine_parts(4, 1, 3), 0..2);
        assert_eq!(machine_parts(4, 2, 3), 2..3);
        assert_eq!(machine_parts(4, 3, 3), 3..4);
        assert_eq!(machine_parts(1, 2, 2), 1..1);
    }

    #[test]
    fn name_map_is_python_json_dumps_indent_4() {
        let text = name_map_json(
            12,
            &[
                ("a".into(), "part0.safetensors".into()),
                ("é\"".into(), "part1.safetensors".into()),
            ],
        );
        assert_eq!(
            text,
            "{\n    \"metadata\": {\n        \"total_size\": 12\n    },\n    \"weight_map\": {\n        \
             \"a\": \"part0.safetensors\",\n        \"\\u00e9\\\"\": \"part1.safetensors\"\n    }\n}"
        );
        assert!(name_map_json(0, &[]).ends_with("\"weight_map\": {}\n}"));
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "model.layers.3.*",
            "model.layers.3.attention.wq.weight"
        ));
        assert!(!glob_match("model.layers.3.*", "model.layers.30"));
        assert!(glob_match("*norm*", "model.norm_out.weight"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
    }
}
