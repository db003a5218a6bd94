//! Smoke test of the Ascend path for anyone with an Atlas 800T A2 (910B):
//! loads CANN, opens a device, runs each backend operation once against the
//! CPU backend (bytes must match), a 2-rank HCCL AllGather, and H2D / D2H /
//! D2D bandwidth probes. Please send us its output.
//!
//! ```sh
//! source /usr/local/Ascend/ascend-toolkit/set_env.sh
//! cargo run --release --features ascend --example npu_smoke -- [--mib 256]
//! cargo run --release --features ascend --example npu_smoke -- --emulated   # no NPU: the host emulator
//! ```
//! On the emulator the checks exercise the code paths only and the
//! bandwidth figures are meaningless.

use std::sync::Arc;
use std::time::Instant;

use ascendcl_sys::safe::{self, Comm, Context, DeviceMem, Event, PinnedHost, Stream};
use ascendcl_sys::sys::{self as acl, Api};
use reshard::backend::ascend::{AscendOptions, CopyPath, LoraMode};
use reshard::backend::{AscendBackend, Backend, BoxCopy, CpuBackend, LoraAdd, Src};
use reshard::DType;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn check(name: &str, ok: bool, failures: &mut u32) {
    println!("  {:<44} {}", name, if ok { "ok" } else { "MISMATCH" });
    if !ok {
        *failures += 1;
    }
}

fn on<B: Backend>(b: &B, c: &BoxCopy, src: &[u8]) -> R<Vec<u8>> {
    let n = c.dst_shape.iter().product::<u64>() as usize * c.dst_dtype.size();
    let mut out = b.alloc(n)?;
    b.upload(&vec![0u8; n], &mut out, 0)?;
    b.box_copy(Src::Host(src), &mut out, c)?;
    b.synchronize()?;
    let mut host = vec![0u8; n];
    b.download(&out, 0, &mut host)?;
    b.synchronize()?;
    Ok(host)
}

fn ops(api: &'static Api, failures: &mut u32) -> R<()> {
    let cpu = CpuBackend::default();
    let f32s: Vec<u8> = (0..1024 * 768)
        .flat_map(|i| ((i as f32 * 0.37).sin() * 3.0).to_le_bytes())
        .collect();
    let cases = [
        (
            "slice rows (memcpy)",
            BoxCopy {
                src_offset: vec![256, 0],
                extent: vec![512, 768],
                dst_shape: vec![512, 768],
                ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F32)
            },
        ),
        (
            "slice columns (2-D / strided)",
            BoxCopy {
                src_offset: vec![0, 384],
                extent: vec![1024, 384],
                dst_shape: vec![1024, 384],
                ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F32)
            },
        ),
        (
            "whole cast f32 → bf16",
            BoxCopy::whole(&[1024, 768], DType::F32, DType::BF16),
        ),
        (
            "column slice + cast f32 → f16",
            BoxCopy {
                src_offset: vec![0, 100],
                extent: vec![1024, 300],
                dst_shape: vec![1024, 300],
                ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F16)
            },
        ),
        (
            "transpose + cast f32 → bf16",
            BoxCopy {
                src_axes: vec![1, 0],
                dst_shape: vec![768, 1024],
                extent: vec![768, 1024],
                ..BoxCopy::whole(&[1024, 768], DType::F32, DType::BF16)
            },
        ),
    ];
    for (path_name, path) in [("auto", CopyPath::Auto), ("aclnn", CopyPath::Aclnn)] {
        let b = AscendBackend::with_api(
            api,
            AscendOptions {
                path,
                ..Default::default()
            },
        )?;
        println!("backend ({path_name} path): {}", b.describe());
        for (name, c) in &cases {
            let ok = on(&b, c, &f32s)? == on(&cpu, c, &f32s)?;
            check(&format!("{name} [{path_name}]"), ok, failures);
        }
        println!("  paths taken: {:?}", b.stats().paths);
    }
    // LoRA GEMM-add: host GEMM (bit-identical) and aclnnInplaceAddmm.
    let (m, n, k) = (512usize, 640usize, 16usize);
    let val = |i: usize| ((i as f32) * 0.011).cos();
    let bytes = |v: Vec<f32>| -> Vec<u8> { v.into_iter().flat_map(f32::to_le_bytes).collect() };
    let (w, bm, am) = (
        bytes((0..m * n).map(val).collect()),
        bytes((0..m * k).map(|i| val(i + 3)).collect()),
        bytes((0..k * n).map(|i| val(i + 7)).collect()),
    );
    let op = LoraAdd {
        global: [m, n],
        k,
        w_shape: [m, n],
        w_transposed: false,
        w_offset: [0, 0],
        origin: [0, 0],
        block: [m, n],
        b_rows: 0..m,
        a_cols: 0..n,
        scale: 0.5,
    };
    let want = lora(&cpu, &w, &bm, &am, &op)?;
    for mode in [LoraMode::HostGemm, LoraMode::DeviceAddmm] {
        let be = AscendBackend::with_api(
            api,
            AscendOptions {
                lora: mode,
                ..Default::default()
            },
        )?;
        let got = lora(&be, &w, &bm, &am, &op)?;
        let worst = got
            .chunks_exact(4)
            .zip(want.chunks_exact(4))
            .map(|(x, y)| {
                let (x, y) = (
                    f32::from_le_bytes(x.try_into().unwrap()),
                    f32::from_le_bytes(y.try_into().unwrap()),
                );
                (x - y).abs() / y.abs().max(1e-6)
            })
            .fold(0f32, f32::max);
        match mode {
            LoraMode::HostGemm => check("lora_add, host GEMM (must be bit-identical)", got == want, failures),
            LoraMode::DeviceAddmm => println!("  lora_add, aclnnInplaceAddmm: max relative difference {worst:e} (bitwise equal: {})", got == want),
        }
    }
    Ok(())
}

fn lora<B: Backend>(be: &B, w: &[u8], b: &[u8], a: &[u8], op: &LoraAdd) -> R<Vec<u8>> {
    let up = |x: &[u8]| -> R<B::Buffer> {
        let mut buf = be.alloc(x.len())?;
        be.upload(x, &mut buf, 0)?;
        Ok(buf)
    };
    let (mut wb, bb, ab) = (up(w)?, up(b)?, up(a)?);
    be.lora_add(&mut wb, &bb, &ab, op)?;
    be.synchronize()?;
    let mut out = vec![0u8; w.len()];
    be.download(&wb, 0, &mut out)?;
    Ok(out)
}

fn all_gather(api: &'static Api, failures: &mut u32) -> R<()> {
    if safe::device_count(api)? < 2 {
        println!("  HCCL AllGather: skipped (one device)");
        return Ok(());
    }
    let root = {
        let ctx = Context::new(api, 0)?;
        Comm::root_info(&ctx)?
    };
    let results: Vec<R<Vec<u8>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u32)
            .map(|r| {
                s.spawn(move || -> R<Vec<u8>> {
                    let ctx = Context::new(api, r as i32)?;
                    let comm = Comm::init(&ctx, 2, &root, r)?;
                    let st = Stream::new(&ctx)?;
                    let (send, recv) = (
                        DeviceMem::new(&ctx, 1 << 20)?,
                        DeviceMem::new(&ctx, 2 << 20)?,
                    );
                    let mine = vec![r as u8 + 1; 1 << 20];
                    // SAFETY: host → device copy of 1 MiB into a 1 MiB buffer.
                    ascendcl_sys::result::acl(api, "aclrtMemcpy", unsafe {
                        (api.aclrtMemcpy)(
                            send.ptr(),
                            1 << 20,
                            mine.as_ptr().cast(),
                            1 << 20,
                            acl::ACL_MEMCPY_HOST_TO_DEVICE,
                        )
                    })?;
                    let f = api.HcclAllGather.ok_or("no HcclAllGather")?;
                    // SAFETY: device buffers of 1 and 2 MiB.
                    ascendcl_sys::result::hccl(api, "HcclAllGather", unsafe {
                        f(
                            send.ptr(),
                            recv.ptr(),
                            1 << 20,
                            acl::HCCL_DATA_TYPE_UINT8,
                            comm.raw(),
                            st.raw(),
                        )
                    })?;
                    st.synchronize()?;
                    let mut out = vec![0u8; 2 << 20];
                    // SAFETY: device → host copy of 2 MiB.
                    ascendcl_sys::result::acl(api, "aclrtMemcpy", unsafe {
                        (api.aclrtMemcpy)(
                            out.as_mut_ptr().cast(),
                            2 << 20,
                            recv.ptr(),
                            2 << 20,
                            acl::ACL_MEMCPY_DEVICE_TO_HOST,
                        )
                    })?;
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    for (r, res) in results.into_iter().enumerate() {
        let out = res?;
        let ok = out[..1 << 20].iter().all(|b| *b == 1) && out[1 << 20..].iter().all(|b| *b == 2);
        check(&format!("HCCL AllGather, 2 ranks (rank {r})"), ok, failures);
    }
    Ok(())
}

fn bandwidth(api: &'static Api, mib: usize) -> R<()> {
    let ctx: Arc<Context> = Context::new(api, 0)?;
    let bytes = mib << 20;
    let st = Stream::new(&ctx)?;
    let mut host = PinnedHost::new(&ctx, bytes)?;
    host.as_mut_slice().fill(1);
    let (a, b) = (DeviceMem::new(&ctx, bytes)?, DeviceMem::new(&ctx, bytes)?);
    let (e0, e1) = (Event::new(&ctx)?, Event::new(&ctx)?);
    let probe =
        |name: &str, dst: *mut std::ffi::c_void, src: *const std::ffi::c_void, kind| -> R<()> {
            for _ in 0..2 {
                e0.record(&st)?;
                for _ in 0..4 {
                    // SAFETY: `bytes` on both sides.
                    ascendcl_sys::result::acl(api, "aclrtMemcpyAsync", unsafe {
                        (api.aclrtMemcpyAsync)(dst, bytes, src, bytes, kind, st.raw())
                    })?;
                }
                e1.record(&st)?;
                let t = Instant::now();
                e1.synchronize()?;
                let ms = e1
                    .elapsed_ms(&e0)
                    .unwrap_or(t.elapsed().as_secs_f32() * 1000.0);
                let gbs = 4.0 * bytes as f64 / (ms as f64 / 1000.0) / 1e9;
                println!("  {name:<6} {mib} MiB × 4: {ms:8.2} ms, {gbs:7.1} GB/s");
            }
            Ok(())
        };
    probe("H2D", a.ptr(), host.ptr(), acl::ACL_MEMCPY_HOST_TO_DEVICE)?;
    probe("D2H", host.ptr(), a.ptr(), acl::ACL_MEMCPY_DEVICE_TO_HOST)?;
    probe("D2D", b.ptr(), a.ptr(), acl::ACL_MEMCPY_DEVICE_TO_DEVICE)?;
    println!("  (ceilings: HBM ≈1.6 TB/s so D2D ≤ ≈800 GB/s; PCIe unknown — please report)");
    Ok(())
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let emulated = args.iter().any(|a| a == "--emulated");
    let mib = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if emulated { 16 } else { 256 });
    let api: &'static Api = if emulated {
        println!("*** HOST EMULATOR: no NPU is used; results only exercise code paths ***");
        ascend_stub::install_shared()
    } else {
        ascendcl_sys::api()?
    };
    safe::init(api)?;
    println!(
        "CANN runtime {}, {} device(s), libraries: {:?}",
        ascendcl_sys::result::version(api),
        safe::device_count(api)?,
        ascendcl_sys::sys::load::loaded_libraries()
    );
    let missing: Vec<&str> = acl::table::OPTIONAL
        .iter()
        .chain(acl::table::EXTRA)
        .copied()
        .filter(|s| !api.has(s))
        .collect();
    println!("optional symbols missing: {missing:?}");
    let mut failures = 0;
    println!("operations vs the CPU backend:");
    ops(api, &mut failures)?;
    println!("collectives:");
    all_gather(api, &mut failures)?;
    println!("bandwidth:");
    bandwidth(api, mib)?;
    if failures > 0 {
        return Err(format!("{failures} check(s) failed").into());
    }
    println!("all checks passed");
    Ok(())
}
