//! The resharding path: the CPU backend's strided box copy (with and without
//! a cast) and a whole `transform` of a synthetic checkpoint, 2 → 4 ranks.
//!
//! `cargo bench --bench transform`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reshard::backend::{Backend, CpuBackend, Src};
use reshard::formats::ckpt::{CkptWriter, WriteOptions};
use reshard::layout::boxes::BoxCopy;
use reshard::ops::strategy_gen::{write_strategies, StrategyOptions};
use reshard::ops::transform::{transform, TransformOptions};
use reshard::DType;

fn box_copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("box_copy");
    group.sample_size(20);
    // Half the columns of a [4096, 4096] f32 tensor: a column split.
    let src = vec![1u8; 4096 * 4096 * 4];
    let columns = BoxCopy {
        src_shape: vec![4096, 4096],
        src_dtype: DType::F32,
        src_offset: vec![0, 2048],
        dst_shape: vec![4096, 2048],
        dst_dtype: DType::F32,
        dst_offset: vec![0, 0],
        extent: vec![4096, 2048],
        src_axes: Vec::new(),
    };
    group.throughput(Throughput::Bytes(4096 * 2048 * 4));
    for threads in [1, 2] {
        let backend = CpuBackend::new(threads);
        let mut dst = backend.alloc(4096 * 2048 * 4).unwrap();
        group.bench_function(format!("f32_columns_{threads}_threads"), |b| {
            b.iter(|| {
                backend
                    .box_copy(Src::Host(&src), &mut dst, &columns)
                    .unwrap()
            })
        });
    }
    let cast = BoxCopy {
        dst_dtype: DType::BF16,
        ..columns.clone()
    };
    let backend = CpuBackend::new(2);
    let mut dst = backend.alloc(4096 * 2048 * 2).unwrap();
    group.bench_function("f32_to_bf16_columns_2_threads", |b| {
        b.iter(|| backend.box_copy(Src::Host(&src), &mut dst, &cast).unwrap())
    });
    group.finish();
}

fn whole_transform(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.ckpt");
    let mut w = CkptWriter::create(&full, WriteOptions::default()).unwrap();
    let data = vec![7u8; 1024 * 1024 * 2];
    let mut bytes = 0u64;
    for l in 0..8 {
        for name in ["wq", "wk", "wv", "wo"] {
            w.write_tensor(
                &format!("model.layers.{l}.attention.{name}.weight"),
                DType::BF16,
                &[1024, 1024],
                &data,
            )
            .unwrap();
            bytes += data.len() as u64;
        }
    }
    w.finish().unwrap();
    let strategy = |name: &str, mp| {
        let out = dir.path().join(name);
        write_strategies(&StrategyOptions {
            checkpoint: full.clone(),
            out_dir: out.clone(),
            dp: 1,
            mp,
            pp: 1,
            opt_shard: 0,
            vocab_emb_dp: true,
        })
        .unwrap();
        out
    };
    let (two, four) = (strategy("mp2", 2), strategy("mp4", 4));
    let options = |src, dst, s: Option<&std::path::Path>, d: &std::path::Path| TransformOptions {
        workers: 2,
        ..TransformOptions::new(src, dst, s.map(|p| p.to_path_buf()), Some(d.to_path_buf()))
    };
    transform(&options(
        full.clone(),
        dir.path().join("ranks2"),
        None,
        &two,
    ))
    .unwrap();
    let mut group = c.benchmark_group("transform");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    let out = dir.path().join("ranks4");
    group.bench_function("mp2_to_mp4_64MiB_bf16", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&out);
            transform(&options(
                dir.path().join("ranks2"),
                out.clone(),
                Some(&two),
                &four,
            ))
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, box_copy, whole_transform);
criterion_main!(benches);
