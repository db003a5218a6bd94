//! The acceptance test an Atlas 800T A2 (910B) owner runs: loads CANN,
//! opens a device, runs each route — memcpy, memcpy2d device-to-device,
//! reshard's kernel, aclnnCast, aclnnInplaceCopy, LoRA on the device and
//! `--lora-bit-exact`, HCCL with two ranks — against the CPU backend, checks
//! the route was really taken, and prints a pass / fail / skip table with
//! each route's measured device bandwidth, plus H2D / D2H / D2D memcpy
//! bandwidth. Please send us its output (with `npu-smi info` and the CANN
//! version).
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
use reshard::backend::{AscendBackend, Backend, CpuBackend, Src};
use reshard::layout::boxes::{BoxCopy, LoraAdd};
use reshard::DType;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One line of the acceptance table.
struct Row {
    route: String,
    result: &'static str,
    gbs: Option<f64>,
    note: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(
        &mut self,
        route: impl Into<String>,
        result: &'static str,
        gbs: Option<f64>,
        note: impl Into<String>,
    ) {
        let row = Row {
            route: route.into(),
            result,
            gbs,
            note: note.into(),
        };
        println!(
            "  {:<40} {:<5} {:>9} {}",
            row.route,
            row.result,
            row.gbs.map(|g| format!("{g:.1} GB/s")).unwrap_or_default(),
            row.note
        );
        self.rows.push(row);
    }

    fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.result == "FAIL").count()
    }

    fn print(&self) {
        println!("\n| route | result | device GB/s | note |\n|---|---|---|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} |",
                r.route,
                r.result,
                r.gbs
                    .map(|g| format!("{g:.1}"))
                    .unwrap_or_else(|| "–".into()),
                r.note
            );
        }
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

/// Device-to-device time of `c` from a device-resident source: (bytes read
/// + written) / seconds, best of 3.
fn device_gbs(b: &AscendBackend, c: &BoxCopy, src: &[u8]) -> R<f64> {
    let mut sb = b.alloc(src.len())?;
    b.upload(src, &mut sb, 0)?;
    let n = c.dst_shape.iter().product::<u64>() as usize * c.dst_dtype.size();
    let mut out = b.alloc(n)?;
    b.synchronize()?;
    let moved = (c.elements() as usize * (c.src_dtype.size() + c.dst_dtype.size())) as f64;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        b.box_copy(Src::Buffer(&sb), &mut out, c)?;
        b.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(moved / best / 1e9)
}

/// Each box-copy route: correct against the CPU backend, actually taken
/// (the backend's path counters), and its device bandwidth.
fn routes(api: &'static Api, table: &mut Table) -> R<()> {
    let cpu = CpuBackend::default();
    let f32s: Vec<u8> = (0..1024 * 768)
        .flat_map(|i| ((i as f32 * 0.37).sin() * 3.0).to_le_bytes())
        .collect();
    let rows = BoxCopy {
        src_offset: vec![256, 0],
        extent: vec![512, 768],
        dst_shape: vec![512, 768],
        ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F32)
    };
    let columns = BoxCopy {
        src_offset: vec![0, 384],
        extent: vec![1024, 384],
        dst_shape: vec![1024, 384],
        ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F32)
    };
    let column_cast = BoxCopy {
        src_offset: vec![0, 100],
        extent: vec![1024, 300],
        dst_shape: vec![1024, 300],
        ..BoxCopy::whole(&[1024, 768], DType::F32, DType::F16)
    };
    let transpose_cast = BoxCopy {
        src_axes: vec![1, 0],
        dst_shape: vec![768, 1024],
        extent: vec![768, 1024],
        ..BoxCopy::whole(&[1024, 768], DType::F32, DType::BF16)
    };
    let whole_cast = BoxCopy::whole(&[1024, 768], DType::F32, DType::BF16);
    // (route, path, kernel opt-in, case, counter the route must bump)
    let cases: [(&str, CopyPath, bool, &BoxCopy, &str); 6] = [
        (
            "memcpy: aligned row slice",
            CopyPath::Auto,
            false,
            &rows,
            "memcpy",
        ),
        (
            "memcpy2d D2D: column slice",
            CopyPath::Auto,
            false,
            &columns,
            "memcpy2d",
        ),
        (
            "kernel: column slice + f32→f16",
            CopyPath::Kernel,
            true,
            &column_cast,
            "kernel",
        ),
        (
            "kernel: transpose + f32→bf16",
            CopyPath::Kernel,
            true,
            &transpose_cast,
            "kernel",
        ),
        (
            "aclnnCast: whole f32→bf16",
            CopyPath::Auto,
            false,
            &whole_cast,
            "cast",
        ),
        (
            "aclnnInplaceCopy: transpose + f32→bf16",
            CopyPath::Aclnn,
            false,
            &transpose_cast,
            "inplace_copy",
        ),
    ];
    for (route, path, kernel, c, counter) in cases {
        let b = AscendBackend::with_api(
            api,
            AscendOptions {
                path,
                kernel,
                ..Default::default()
            },
        )?;
        if kernel && !api.has("reshard_box_copy") {
            table.add(
                route,
                "SKIP",
                None,
                "no kernel library loaded (build with a CANN toolkit and cmake)",
            );
            continue;
        }
        let ok = on(&b, c, &f32s)? == on(&cpu, c, &f32s)?;
        let taken = b.stats().paths.contains_key(counter);
        if !taken {
            let why = b.stats().fallbacks.join("; ");
            table.add(
                route,
                if ok { "SKIP" } else { "FAIL" },
                None,
                format!(
                    "route not taken ({why}); bytes {}",
                    if ok { "match" } else { "DIFFER" }
                ),
            );
            continue;
        }
        let gbs = device_gbs(&b, c, &f32s)?;
        table.add(
            route,
            if ok { "pass" } else { "FAIL" },
            Some(gbs),
            if ok {
                "bytes = CPU"
            } else {
                "bytes DIFFER from CPU"
            },
        );
    }
    // LoRA GEMM-add: device (default) and --lora-bit-exact.
    let (m, n, k) = (512usize, 640usize, 16usize);
    let val = |i: usize| ((i as f32) * 0.011).cos();
    let bytes = |v: Vec<f32>| -> Vec<u8> { v.into_iter().flat_map(f32::to_le_bytes).collect() };
    let (w, bm, am) = (
        bytes((0..m * n).map(val).collect()),
        bytes((0..m * k).map(|i| val(i + 3)).collect()),
        bytes((0..k * n).map(|i| val(i + 7)).collect()),
    );
    let op = LoraAdd::whole(m, n, k, 0.5);
    let want = lora(&cpu, &w, &bm, &am, &op)?;
    for mode in [LoraMode::DeviceAddmm, LoraMode::HostGemm] {
        let be = AscendBackend::with_api(
            api,
            AscendOptions {
                lora: mode,
                ..Default::default()
            },
        )?;
        let t = Instant::now();
        let got = lora(&be, &w, &bm, &am, &op)?;
        let secs = t.elapsed().as_secs_f64();
        let worst = got
            .chunks_exact(4)
            .zip(want.chunks_exact(4))
            .map(|(x, y)| {
                let (x, y) = (
                    f32::from_le_bytes(x.try_into().unwrap()),
                    f32::from_le_bytes(y.try_into().unwrap()),
                );
                (x - y).abs() / y.abs().max(1.0)
            })
            .fold(0f32, f32::max);
        // The whole call (uploads, GEMM, download): not a device figure.
        let note = format!("{:.1} ms end to end", secs * 1e3);
        match mode {
            LoraMode::HostGemm => table.add(
                "LoRA --lora-bit-exact (host tiles)",
                if got == want { "pass" } else { "FAIL" },
                None,
                format!("must equal CPU bit for bit; {note}"),
            ),
            LoraMode::DeviceAddmm => {
                let used = be.stats().paths.contains_key("addmm");
                table.add(
                    "LoRA device (aclnnInplaceAddmm, default)",
                    if !used {
                        "SKIP"
                    } else if worst <= 1e-5 {
                        "pass"
                    } else {
                        "FAIL"
                    },
                    None,
                    format!(
                        "max |Δ|/max(1,|x|) {worst:e} (bound 1e-5); {note}{}",
                        if used {
                            ""
                        } else {
                            "; Addmm missing, fell back"
                        }
                    ),
                )
            }
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

fn all_gather(api: &'static Api, table: &mut Table) -> R<()> {
    if safe::device_count(api)? < 2 {
        table.add("HCCL AllGather, 2 ranks", "SKIP", None, "one device");
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
        table.add(
            format!("HCCL AllGather, 2 ranks (rank {r})"),
            if ok { "pass" } else { "FAIL" },
            None,
            "1 MiB per rank",
        );
    }
    Ok(())
}

fn bandwidth(api: &'static Api, mib: usize, table: &mut Table) -> R<()> {
    let ctx: Arc<Context> = Context::new(api, 0)?;
    let bytes = mib << 20;
    let st = Stream::new(&ctx)?;
    let mut host = PinnedHost::new(&ctx, bytes)?;
    host.as_mut_slice().fill(1);
    let (a, b) = (DeviceMem::new(&ctx, bytes)?, DeviceMem::new(&ctx, bytes)?);
    let (e0, e1) = (Event::new(&ctx)?, Event::new(&ctx)?);
    let mut probe =
        |name: &str, dst: *mut std::ffi::c_void, src: *const std::ffi::c_void, kind| -> R<()> {
            let mut best = 0f64;
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
                best = best.max(gbs);
                let _ = ms;
            }
            table.add(
                format!("aclrtMemcpyAsync {name}"),
                "info",
                Some(best),
                format!("{mib} MiB × 4, pinned host"),
            );
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
        // A machine of its own with every symbol, reshard's kernel launcher
        // included (the emulated contract, not the kernel).
        Box::leak(Box::new(ascend_stub::Emulator::new())).api()
    } else {
        // Opening the backend once with the kernel opted in loads the CANN
        // libraries *and* reshard's kernel library into the process-wide
        // table (and runs the start-up checks, whose errors name the fix).
        AscendBackend::new(AscendOptions {
            kernel: true,
            ..Default::default()
        })?;
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
    let mut table = Table::default();
    println!("routes vs the CPU backend:");
    routes(api, &mut table)?;
    all_gather(api, &mut table)?;
    bandwidth(api, mib, &mut table)?;
    table.print();
    if emulated {
        println!("\n(host emulator: pass/fail checks code paths only; GB/s are meaningless)");
    }
    let failures = table.failures();
    if failures > 0 {
        return Err(format!("{failures} check(s) failed").into());
    }
    println!("no check failed (SKIP rows were not run: see their notes)");
    Ok(())
}
