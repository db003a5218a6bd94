//! The distributed-plan fixtures: a LoRA model sharded mp4 and the plan of
//! its shards to mp2 (shared by the Ascend and device-traffic tests).

use std::path::{Path, PathBuf};

use reshard::comm::InProcess;
use reshard::formats::strategy;
use reshard::formats::tree::{FileFormat, RankSource};
use reshard::formats::Source;
use reshard::ops::merge_lora::lora_pairs;
use reshard::ops::transform::{source_files, transform, TransformOptions};
use reshard::plan::transform::{plan, LoraSpec, TransformInput};
use reshard::plan::Plan;
use reshard::DType;

use crate::util::lora::{lora_model, strategies};

/// A sharded (mp4) LoRA model under `root`: (shards, mp4, mp2).
pub fn sharded(root: &Path, dtype: DType) -> (PathBuf, PathBuf, PathBuf) {
    let model = root.join("model.ckpt");
    lora_model(&model, dtype, 9);
    let (mp4, mp2) = (
        strategies(&model, &root.join("mp4"), 4),
        strategies(&model, &root.join("mp2"), 2),
    );
    transform(&TransformOptions::new(
        &model,
        root.join("shards"),
        None,
        Some(mp4.clone()),
    ))
    .unwrap();
    (root.join("shards"), mp4, mp2)
}

/// The plan of shards (mp4) → `out` (mp2), merging LoRA when `lora`.
pub fn the_plan(
    shards: &Path,
    mp4: &Path,
    mp2: &Path,
    out: &Path,
    lora: bool,
    format: FileFormat,
) -> Plan {
    let (_, files) = source_files(shards).unwrap();
    let mut sources = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (rank, path) in files {
        let entries = Source::open(&path, &Default::default()).unwrap().entries();
        names.extend(entries.iter().map(|e| e.name.clone()));
        sources.push(RankSource::new(rank, path, entries));
    }
    let (s, d) = (strategy::load(mp4).unwrap(), strategy::load(mp2).unwrap());
    plan(&TransformInput {
        sources,
        src_strategy: Some(&s),
        dst_strategy: Some(&d),
        dst_dir: out,
        prefix: "checkpoint_",
        ranks: None,
        format,
        lora: lora.then(|| LoraSpec {
            pairs: lora_pairs(&names).unwrap(),
            scale: 0.3,
            fan_in_fan_out: false,
            transposed: Default::default(),
        }),
        deduplicated: false,
        remove_redundancy: false,
    })
    .unwrap()
}

/// Runs `f` once per rank of `comms`, each on its own thread: the results
/// in rank order (a rank that panics fails the test).
pub fn on_every_rank<T: Send>(comms: &[InProcess], f: impl Fn(&InProcess) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
