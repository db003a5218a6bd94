//! Checks of a transform's inputs against each other, and the cut of a
//! complete directory's plan to a destination strategy.

use std::path::Path;

use super::AbsentParameters;
use crate::error::{Error, Result};
use crate::formats::strategy::Strategy;
use crate::formats::tree::{self, RankSource};
use crate::plan::{Content, Plan};

/// Names of optimizer states (mindformers' prefixes): a training strategy
/// lists them, a weights-only checkpoint does not hold them.
fn is_optimizer_state(name: &str) -> bool {
    ["adam_m.", "adam_v.", "accu_grads.", "moments.", "accum."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Destination-strategy parameters (optimizer states aside) that no source
/// file holds: a warning, or an error by `policy` (issue 19 item 12).
pub(super) fn absent_parameters(
    dst: &Strategy,
    sources: &[RankSource],
    src_path: &Path,
    policy: AbsentParameters,
) -> Result<Option<String>> {
    let table = dst.layout_table(None)?;
    let held: std::collections::HashSet<&str> = sources
        .iter()
        .flat_map(|s| s.entries.iter().map(|e| e.name.as_str()))
        .collect();
    let weights: Vec<&str> = table.names().filter(|n| !is_optimizer_state(n)).collect();
    let absent: Vec<&str> = weights
        .iter()
        .copied()
        .filter(|n| !held.contains(n))
        .collect();
    if absent.is_empty() {
        return Ok(None);
    }
    let shown: Vec<&str> = absent.iter().take(3).copied().collect();
    let msg = format!(
        "the destination strategy names {} of its {} parameters that {} does not hold ({}{}): \
         they are not written; is the checkpoint truncated, or another model's?",
        absent.len(),
        weights.len(),
        src_path.display(),
        shown.join(", "),
        if absent.len() > 3 { ", …" } else { "" }
    );
    let error = match policy {
        AbsentParameters::Warn => false,
        AbsentParameters::ErrorIfMost => absent.len() * 2 > weights.len(),
        AbsentParameters::Error => true,
    };
    if error {
        return Err(Error::Strategy(msg));
    }
    Ok(Some(msg))
}

/// Bytes of a tensor's head and of its tail that [`sample_digest`] reads.
const SAMPLE_BYTES: usize = 4096;

/// A digest of a tensor's length, first and last [`SAMPLE_BYTES`] bytes
/// (all of it when smaller): equal for replicas, and different for two
/// slices of a trained tensor, while reading a few pages per tensor rather
/// than the whole checkpoint before the transform reads it.
fn sample_digest(chunks: &[&[u8]]) -> u64 {
    let len: usize = chunks.iter().map(|c| c.len()).sum();
    let mut h = crate::formats::hash::Hasher::new();
    h.update(&(len as u64).to_le_bytes());
    let (mut at, tail) = (0usize, len.saturating_sub(SAMPLE_BYTES));
    for c in chunks {
        let end = at + c.len();
        // The parts of this chunk in [0, SAMPLE_BYTES) and [tail, len).
        let head = at.min(SAMPLE_BYTES)..end.min(SAMPLE_BYTES);
        let rest = at.max(tail).max(head.end)..end;
        for r in [head, rest] {
            if r.start < r.end {
                h.update(&c[r.start - at..r.end - at]);
            }
        }
        at = end;
    }
    h.digest()
}

/// Checks the source strategy against the source files (issue 19 item 5):
/// every slice's shape and its bytes: replicas equal, and not every split
/// parameter a copy across ranks said to differ (another layout's strategy
/// with the same rank count). The bytes are the tensor hashes of the
/// files' manifests (reshard wrote them), else a sample of each tensor
/// ([`sample_digest`]: MindSpore's files have no manifest). Only for a
/// whole tree (one file per rank of every stage); other cases are checked
/// by the planner.
pub(super) fn check_source_strategy(
    src: &Strategy,
    sources: &[RankSource],
    read: &crate::formats::ckpt::ReadOptions,
) -> Result<()> {
    use crate::plan::consistency::{check_layouts, Held, HeldTensor};
    let Ok(table) = src.layout_table(None) else {
        return Ok(());
    };
    let (Ok(per), Ok(stages)) = (table.device_num_per_stage(), table.stage_num()) else {
        return Ok(());
    };
    if sources.len() < 2 || per.saturating_mul(stages as u64) != sources.len() as u64 {
        return Ok(());
    }
    // Ranks that are one file (stand-ins for ranks a run does not read)
    // say nothing about the layout.
    let mut files = std::collections::HashSet::new();
    for RankSource { path, .. } in sources {
        if !files.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone())) {
            return Ok(());
        }
    }
    let mut held = Held::new();
    for RankSource {
        rank,
        path,
        entries,
    } in sources
    {
        let manifest = crate::formats::manifest::Manifest::read(path)
            .ok()
            .flatten()
            .filter(|m| m.check_length(path));
        let sampled = manifest.is_none();
        let hashes: std::collections::HashMap<String, u64> = match manifest {
            Some(m) => m.tensors.into_iter().map(|t| (t.name, t.xxh3)).collect(),
            None => {
                let source = crate::formats::Source::open(path, read)?;
                entries
                    .iter()
                    .filter(|e| matches!(e.value, crate::formats::EntryValue::Tensor(_)))
                    .map(|e| Ok((e.name.clone(), sample_digest(&source.chunks(&e.name)?))))
                    .collect::<Result<_>>()?
            }
        };
        held.insert(
            *rank,
            entries
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        HeldTensor {
                            shape: e.dims.iter().map(|&d| d.max(0) as u64).collect(),
                            hash: hashes.get(&e.name).copied(),
                            sampled,
                        },
                    )
                })
                .collect(),
        );
    }
    // A parameter missing from a file is reported by the planner, which
    // knows whether the destination needs it.
    let problems: Vec<_> = check_layouts(src, &held)?
        .into_iter()
        .filter(|p| {
            p.tensor.as_ref().map_or(true, |t| {
                held.get(&p.rank).is_some_and(|m| m.contains_key(t))
            })
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = problems
        .iter()
        .take(3)
        .map(|p| {
            format!(
                "rank {}{}: {}",
                p.rank,
                p.tensor
                    .as_deref()
                    .map(|t| format!(" {t:?}"))
                    .unwrap_or_default(),
                p.problem
            )
        })
        .collect();
    Err(Error::Strategy(format!(
        "the source strategy does not fit the source files ({} problem(s)): {}{}",
        problems.len(),
        shown.join("; "),
        if problems.len() > 3 { "; …" } else { "" }
    )))
}

/// `load_distributed_checkpoint(predict_strategy=S, unified_safetensors_dir=U)`:
/// of the tensors the name map lists, only those the strategy names are
/// written; the other entries (`hyper_param.safetensors`: `global_step`, …)
/// go to every rank, as transform copies them.
pub(super) fn complete_to_strategy(
    plan: &mut Plan,
    complete: &tree::CompleteDir,
    dst: &Strategy,
) -> Result<()> {
    let table = dst.layout_table(None)?;
    let hyper: std::collections::HashSet<&str> = match &complete.hyper {
        Some(h) => plan
            .sources
            .iter()
            .position(|s| &s.path == h)
            .map(|i| {
                plan.files
                    .iter()
                    .flat_map(|f| &f.tensors)
                    .filter(|t| match &t.content {
                        Content::Str { source, .. } => *source == i,
                        c => c.steps().iter().any(|s| s.source == i),
                    })
                    .map(|t| t.name.as_str())
                    .collect()
            })
            .unwrap_or_default(),
        None => Default::default(),
    };
    let keep: Vec<Vec<bool>> = plan
        .files
        .iter()
        .map(|f| {
            f.tensors
                .iter()
                .map(|t| table.contains(&t.name) || hyper.contains(t.name.as_str()))
                .collect()
        })
        .collect();
    // MindSpore writes the strategy's parameters in the strategy's order,
    // then the hyper parameters (the order a ckpt output keeps).
    let order: std::collections::HashMap<&str, usize> =
        table.names().enumerate().map(|(i, n)| (n, i)).collect();
    for (f, keep) in plan.files.iter_mut().zip(keep) {
        let mut k = keep.into_iter();
        f.tensors.retain(|_| k.next().unwrap_or(true));
        f.tensors
            .sort_by_key(|t| order.get(t.name.as_str()).copied().unwrap_or(usize::MAX));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_digest_reads_the_head_and_tail_whatever_the_chunks() {
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = sample_digest(&[&bytes]);
        assert_eq!(
            sample_digest(&[&bytes[..3], &bytes[3..9000], &bytes[9000..]]),
            whole
        );
        // The middle is not read; the head, the tail and the length are.
        let mut middle = bytes.clone();
        middle[10_000] ^= 1;
        assert_eq!(sample_digest(&[&middle]), whole);
        for at in [0, 4095, 20_000 - 4096, 19_999] {
            let mut other = bytes.clone();
            other[at] ^= 1;
            assert_ne!(sample_digest(&[&other]), whole, "{at}");
        }
        assert_ne!(sample_digest(&[&bytes[..19_999]]), whole);
        // A small tensor is read whole.
        let small = &bytes[..6000];
        let mut flipped = small.to_vec();
        flipped[5000] ^= 1;
        assert_ne!(sample_digest(&[&flipped]), sample_digest(&[small]));
    }
}
