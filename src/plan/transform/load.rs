//! Loading, as MindSpore does: the source files of each rank in load
//! order (which fixes the record order), the parameters borrowed from
//! their owner rank in a set saved with redundancy removed, and the owner
//! rules of de-duplicated sources and outputs.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Held, TransformInput};
use crate::error::{Error, Result};
use crate::formats::strategy::LayoutTable;
use crate::formats::tree::FileFormat;
use crate::formats::EntryValue;
use crate::layout::redundancy::{Holder, Ownership};
use crate::plan::FilePlan;

/// The source files of each rank, and the owner rule when the set was saved
/// with redundancy removed.
pub(super) struct ByRank<'a> {
    pub(super) files: &'a HashMap<usize, Vec<usize>>,
    pub(super) dedup: Option<&'a Ownership>,
}

impl ByRank<'_> {
    pub(super) fn len(&self) -> usize {
        self.files.len()
    }
    pub(super) fn contains_key(&self, rank: &usize) -> bool {
        self.files.contains_key(rank)
    }
}

impl std::ops::Index<&usize> for ByRank<'_> {
    type Output = Vec<usize>;
    fn index(&self, rank: &usize) -> &Vec<usize> {
        &self.files[rank]
    }
}

/// The owner rule of a de-duplicated source (`None` for a source that keeps
/// every copy).
pub(super) fn source_ownership(
    input: &TransformInput<'_>,
    table: &LayoutTable,
    stage_base: u64,
) -> Result<Option<Ownership>> {
    if !input.deduplicated {
        return Ok(None);
    }
    Ownership::from_table(table, stage_base).map(Some)
}

/// The owner rule of the destination when it is written without redundancy.
pub(super) fn output_ownership(
    input: &TransformInput<'_>,
    dst: Option<&LayoutTable>,
) -> Result<Option<Ownership>> {
    if !input.remove_redundancy {
        return Ok(None);
    }
    if input.format != FileFormat::Safetensors {
        return Err(Error::usage_of(
            "remove_redundancy",
            "writes safetensors only (MindSpore flags such sets in the \
             safetensors metadata; a .ckpt has no place for the flag, and mindformers refuses \
             remove_redundancy with checkpoint_format ckpt)",
        ));
    }
    let Some(dst) = dst else {
        return Err(Error::usage_of(
            "remove_redundancy",
            "needs a destination strategy: a single full checkpoint has no \
             redundant copies (MindSpore refuses it in stand-alone mode)",
        ));
    };
    Ownership::from_table(dst, 0).map(Some)
}

/// Drops from each destination file the tensors its rank does not own, and
/// flags the file as MindSpore does.
pub(super) fn deduplicate_outputs(
    mut files: Vec<FilePlan>,
    keep: Option<&Ownership>,
) -> Vec<FilePlan> {
    let Some(keep) = keep else {
        return files;
    };
    for f in &mut files {
        let rank = f.rank as u64;
        f.tensors.retain(|t| keep.keeps(&t.name, rank));
        f.metadata = Some(
            [
                ("format".to_string(), "ms".to_string()),
                ("remove_redundancy".to_string(), "True".to_string()),
            ]
            .into(),
        );
    }
    files
}

/// The parameters of the loaded files: names in first-seen order, and per
/// name the entry held by each local source rank (the last file loaded wins,
/// as in MindSpore's `param_total_dict`).
pub(super) struct Loaded {
    pub(super) order: Vec<String>,
    pub(super) table: HashMap<String, BTreeMap<u64, Held>>,
    pub(super) first_local: HashMap<String, u64>,
}

/// Simulates MindSpore loading the files of `ranks`, in that order. A name
/// held by two files of one rank is an error (it would be ambiguous).
pub(super) fn load_table(
    input: &TransformInput<'_>,
    ranks: &[u64],
    src_per_stage: u64,
    by_rank: &ByRank<'_>,
) -> Result<Loaded> {
    let mut loaded = Loaded {
        order: Vec::new(),
        table: HashMap::new(),
        first_local: HashMap::new(),
    };
    let all_names: Option<HashSet<&str>> = by_rank.dedup.map(|_| {
        input
            .sources
            .iter()
            .flat_map(|s| s.entries.iter().map(|e| e.name.as_str()))
            .collect()
    });
    for &k in ranks {
        let local = k % src_per_stage;
        let files = &by_rank[&(k as usize)];
        let mut list: Vec<Held> = files
            .iter()
            .flat_map(|&source| {
                (0..input.sources[source].entries.len()).map(move |entry| Held { source, entry })
            })
            .collect();
        if let (Some(own), Some(all)) = (by_rank.dedup, &all_names) {
            borrow_owned(input, own, all, k, by_rank, &mut list)?;
        }
        for held in list {
            let Held { source, entry } = held;
            let e = &input.sources[source].entries[entry];
            if !loaded.table.contains_key(&e.name) {
                loaded.order.push(e.name.clone());
                loaded.first_local.insert(e.name.clone(), local);
            }
            let previous = loaded
                .table
                .entry(e.name.clone())
                .or_default()
                .insert(local, held);
            if let Some(prev) = previous.filter(|p| files.contains(&p.source) && p.source != source)
            {
                return Err(Error::bad_input(format!(
                    "tensor {:?} is in both {} and {}",
                    e.name,
                    input.sources[prev.source].path.display(),
                    input.sources[source].path.display()
                )));
            }
        }
    }
    Ok(loaded)
}

/// For source rank `k` of a set saved with redundancy removed, adds to its
/// entries `list` the strategy parameters of its stage that its own files
/// do not hold, each taken from the rank that owns it, and orders the whole
/// as a file that kept every copy would be (MindSpore's safetensors order:
/// dtype rank descending, then name), so the output does not depend on
/// which copies were saved. Parameters no file of the set holds are left to
/// the strategy check, which names them.
pub(super) fn borrow_owned(
    input: &TransformInput<'_>,
    own: &Ownership,
    all_names: &HashSet<&str>,
    k: u64,
    by_rank: &ByRank<'_>,
    list: &mut Vec<Held>,
) -> Result<()> {
    let held: HashSet<&str> = list
        .iter()
        .map(|h| input.sources[h.source].entries[h.entry].name.as_str())
        .collect();
    let missing = |owner: Option<u64>, name: &str| Error::RedundancyOwnerMissing {
        param: name.to_string(),
        rank: k,
        owner,
    };
    let mut borrowed = false;
    for name in own.stage_params(k) {
        if held.contains(name) || !all_names.contains(name) {
            continue;
        }
        let owner = match own.holder(name, k) {
            Holder::Everyone => continue,
            Holder::Nobody => return Err(missing(None, name)),
            Holder::Owner(o) if o == k => {
                let file = by_rank[&(k as usize)][0];
                return Err(missing(Some(k), name).in_file(&input.sources[file].path));
            }
            Holder::Owner(o) => o,
        };
        let Some(files) = by_rank.files.get(&(owner as usize)) else {
            return Err(Error::missing(format!(
                "parameter {name:?} of rank {k}: the checkpoint was saved with redundancy \
                 removed and rank {owner}, which owns it, has no checkpoint (rank_{owner}/ is missing)"
            )));
        };
        let found = files.iter().find_map(|&s| {
            input.sources[s]
                .entries
                .iter()
                .position(|e| e.name == name)
                .map(|entry| Held { source: s, entry })
        });
        match found {
            Some(at) => {
                list.push(at);
                borrowed = true;
            }
            None => {
                return Err(missing(Some(owner), name).in_file(&input.sources[files[0]].path));
            }
        }
    }
    if borrowed {
        let key = |h: &Held| {
            let entry = &input.sources[h.source].entries[h.entry];
            match entry.value {
                EntryValue::Tensor(d) => (
                    0u8,
                    std::cmp::Reverse(crate::formats::safetensors::to_st_dtype(d).ok()),
                    entry.name.clone(),
                ),
                _ => (1, std::cmp::Reverse(None), String::new()),
            }
        };
        list.sort_by_cached_key(key);
    }
    Ok(())
}
