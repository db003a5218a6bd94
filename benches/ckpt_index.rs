//! Indexing and writing `.ckpt` files: `inspect` must open a multi-GB
//! checkpoint instantly, because indexing never touches tensor bytes.
//!
//! `cargo bench --bench ckpt_index`

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use reshard::formats::ckpt::{Checkpoint, CkptWriter, ReadOptions, WriteOptions};
use reshard::DType;

/// Writes `count` bf16 tensors of `bytes_each` bytes.
fn synthetic(path: &Path, count: usize, bytes_each: usize) {
    let data = vec![0x3fu8; bytes_each];
    let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
    for i in 0..count {
        let name = format!("model.layers.{}.attention.w{}.weight", i / 4, i % 4);
        w.write_tensor(&name, DType::BF16, &[(bytes_each / 2) as i64], &data)
            .unwrap();
    }
    w.finish().unwrap();
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("ckpt_index");
    group.sample_size(20);
    // A 4 GiB file of 512 tensors (a 2B-parameter bf16 model), and a file
    // of 20 000 tiny records.
    for (label, count, each) in [
        ("4GiB_512_tensors", 512usize, 8usize << 20),
        ("20k_records", 20_000, 64),
    ] {
        let path = dir.path().join(format!("{label}.ckpt"));
        synthetic(&path, count, each);
        let no_crc = ReadOptions {
            verify_crc: false,
            ..Default::default()
        };
        group.throughput(Throughput::Elements(count as u64));
        group.bench_with_input(BenchmarkId::new("open", label), &path, |b, p| {
            b.iter(|| Checkpoint::open(p, &no_crc).unwrap().entries().len())
        });
        std::fs::remove_file(&path).unwrap();
    }
    group.finish();
}

fn write(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("ckpt_write");
    group.sample_size(10);
    let bytes = 64usize << 20;
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("64MiB_16_tensors", |b| {
        b.iter(|| synthetic(&dir.path().join("w.ckpt"), 16, bytes / 16))
    });
    group.finish();
}

criterion_group!(benches, index, write);
criterion_main!(benches);
