//! The synthetic llama-shaped model and its strategy files, shared by the
//! transform, unify, by-rank, redundancy, robust, trust and checkpoint2
//! tests.

use std::path::{Path, PathBuf};

use reshard::formats::ckpt::{CkptWriter, WriteOptions};
use reshard::ops::strategy_gen::{write_strategies, StrategyOptions};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;

/// A llama-shaped full checkpoint: `layers` layers, hidden 16, ffn 48, vocab 48.
pub fn synthetic_model(path: &Path, layers: usize, dtype: DType, seed: u8) {
    let mut shapes: Vec<(String, Vec<i64>)> =
        vec![("model.tok_embeddings.embedding_weight".into(), vec![48, 16])];
    for l in 0..layers {
        for w in ["wq", "wk", "wv", "wo"] {
            shapes.push((
                format!("model.layers.{l}.attention.{w}.weight"),
                vec![16, 16],
            ));
        }
        shapes.push((
            format!("model.layers.{l}.feed_forward.w1.weight"),
            vec![48, 16],
        ));
        shapes.push((
            format!("model.layers.{l}.feed_forward.w2.weight"),
            vec![16, 48],
        ));
        shapes.push((format!("model.layers.{l}.attention_norm.weight"), vec![16]));
    }
    shapes.push(("lm_head.weight".into(), vec![48, 16]));
    let states: Vec<(String, Vec<i64>)> = shapes
        .iter()
        .map(|(n, s)| (format!("adam_m.{n}"), s.clone()))
        .collect();
    shapes.extend(states);
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product::<i64>() as usize * dtype.size();
        let data: Vec<u8> = (0..n)
            .map(|b| (b as u8).wrapping_mul(31).wrapping_add(i as u8 ^ seed))
            .collect();
        w.write_tensor(name, dtype, shape, &data).unwrap();
    }
    w.write_tensor("global_step", DType::I32, &[1], &7i32.to_le_bytes())
        .unwrap();
    w.write_string("note", "kept").unwrap();
    w.finish().unwrap();
}

/// Strategy files (dp · mp · pp, optimizer shard `opt`) for the model at
/// `model`, written into `dir`; returns `dir`.
pub fn strategies(model: &Path, dir: &Path, dp: u32, mp: u32, pp: u32, opt: i32) -> PathBuf {
    strategy_files(model, dir, dp, mp, pp, opt, mp % 2 == 1)
}

/// [`write_strategies`] for the checkpoint `model` into `dir` (dp · mp · pp,
/// optimizer shard `opt`, the vocabulary embedding data-parallel or not);
/// returns `dir`. Every test's strategy files come through here.
pub fn strategy_files(
    model: &Path,
    dir: &Path,
    dp: u32,
    mp: u32,
    pp: u32,
    opt: i32,
    vocab_emb_dp: bool,
) -> PathBuf {
    write_strategies(&StrategyOptions {
        checkpoint: model.to_path_buf(),
        out_dir: dir.to_path_buf(),
        dp,
        mp,
        pp,
        opt_shard: opt,
        vocab_emb_dp,
    })
    .unwrap();
    dir.to_path_buf()
}

/// A fresh `dir/model.ckpt` (`layers` layers, f32, seed 5) and its
/// strategy files in `dir/s` (dp · mp, one stage, no optimizer shard).
pub fn model_and_strategy(dir: &Path, layers: usize, dp: u32, mp: u32) -> (PathBuf, PathBuf) {
    let model = dir.join("model.ckpt");
    synthetic_model(&model, layers, DType::F32, 5);
    let s = strategies(&model, &dir.join("s"), dp, mp, 1, 0);
    (model, s)
}

/// `model` split by the strategy `s` into the rank folders of `out`;
/// returns `out`.
pub fn shards(model: &Path, s: &Path, out: &Path) -> PathBuf {
    transform(&TransformOptions::new(
        model,
        out,
        None,
        Some(s.to_path_buf()),
    ))
    .unwrap();
    out.to_path_buf()
}
