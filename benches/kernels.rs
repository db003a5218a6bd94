//! The CPU backend's kernels: box copies (contiguous, strided, tiny rows),
//! casts between f32 and bf16/f16, and the LoRA GEMM-add at ranks 8–64.
//!
//! `cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use reshard::backend::{cast_slice, Backend, CpuBackend, Src};
use reshard::layout::boxes::{BoxCopy, LoraAdd};
use reshard::DType;

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("box_copy");
    g.sample_size(20);
    let backend = CpuBackend::new(1);
    let src = vec![3u8; 64 << 20];
    let cases = [
        (
            "contiguous_64MiB",
            [4096u64, 4096],
            [4096u64, 4096],
            [0u64, 0],
        ),
        (
            "strided_half_columns",
            [4096, 4096],
            [4096, 2048],
            [0, 2048],
        ),
        ("tiny_rows_8_bytes", [262144, 64], [262144, 2], [0, 7]),
    ];
    for (name, src_shape, extent, offset) in cases {
        let copy = BoxCopy {
            src_shape: src_shape.to_vec(),
            src_dtype: DType::F32,
            src_offset: offset.to_vec(),
            dst_shape: extent.to_vec(),
            dst_dtype: DType::F32,
            dst_offset: vec![0, 0],
            extent: extent.to_vec(),
            src_axes: Vec::new(),
        };
        let mut dst = backend.alloc((extent[0] * extent[1] * 4) as usize).unwrap();
        g.throughput(Throughput::Bytes(extent[0] * extent[1] * 4));
        g.bench_function(name, |b| {
            b.iter(|| backend.box_copy(Src::Host(&src), &mut dst, &copy).unwrap())
        });
    }
    g.finish();
}

fn casts(c: &mut Criterion) {
    let mut g = c.benchmark_group("cast_one_core");
    g.sample_size(20);
    let n = 16 << 20; // elements
    let f32s = vec![0x3fu8; n * 4];
    let halves = vec![0x3fu8; n * 2];
    let mut out4 = vec![0u8; n * 4];
    let mut out2 = vec![0u8; n * 2];
    g.throughput(Throughput::Bytes((n * 4) as u64));
    for to in [DType::BF16, DType::F16] {
        g.bench_function(format!("f32_to_{to}"), |b| {
            b.iter(|| cast_slice(DType::F32, &f32s, to, &mut out2).unwrap())
        });
        g.bench_function(format!("{to}_to_f32"), |b| {
            b.iter(|| cast_slice(to, &halves, DType::F32, &mut out4).unwrap())
        });
    }
    g.finish();
}

fn lora(c: &mut Criterion) {
    let mut g = c.benchmark_group("lora_add");
    g.sample_size(10);
    let backend = CpuBackend::default();
    let (m, n) = (4096usize, 4096usize);
    let w0 = backend.alloc(m * n * 4).unwrap();
    g.throughput(Throughput::Bytes((m * n * 2) as u64)); // bytes of a bf16 W
    for k in [8usize, 16, 32, 64] {
        let b = backend.alloc(m * k * 4).unwrap();
        let a = backend.alloc(k * n * 4).unwrap();
        let op = LoraAdd::whole(m, n, k, 0.5);
        let mut w = w0.clone();
        g.bench_function(format!("4096x4096_rank_{k}"), |bn| {
            bn.iter(|| backend.lora_add(&mut w, &b, &a, &op).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, copies, casts, lora);
criterion_main!(benches);
