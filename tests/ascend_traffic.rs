//! Issue 15 item 4 on the host emulator: host↔device traffic, per byte.
//!
//! Each source byte the device needs crosses host→device at most once, and
//! each destination byte the device produces crosses device→host at most
//! once — per byte, not only in aggregate. The emulator counts the bytes of
//! every accepted transfer each way; the test computes from the plan the
//! distinct source bytes that device-filled tensors read (a byte read by k
//! destination files counted once) and the destination bytes filled on the
//! device. The device must receive every one of those source bytes at least
//! once and return every one of those destination bytes at least once, so
//! totals no larger than these sets mean every byte crossed exactly once.

use std::collections::HashMap;
use std::path::Path;

use ascend_stub::Emulator;
use reshard::backend::ascend::{AscendOptions, CopyPath, LoraMode};
use reshard::backend::AscendBackend;
use reshard::exec::{self, ExecOptions};
use reshard::formats::tree::FileFormat;
use reshard::layout::boxes::BoxCopy;
use reshard::ops::transform::{plan_transform, TransformOptions};
use reshard::plan::{Content, Plan};
use reshard::DType;

use crate::util::distributed::{sharded, the_plan};
use crate::util::model::strategy_files;
use crate::util::tempdir;

/// Whether the executor writes this copy straight from the mapped source
/// (the whole source tensor, unchanged), never touching the device.
fn plain(c: &BoxCopy) -> bool {
    c.src_dtype == c.dst_dtype
        && c.src_shape == c.dst_shape
        && c.extent == c.src_shape
        && c.src_axes.iter().enumerate().all(|(d, &a)| d == a)
}

/// What the device must move for `plan`: `(source bytes, destination
/// bytes)`. Source bytes: the union, per source tensor, of the boxes read by
/// tensors filled on the device. Destination bytes: those tensors' bytes.
fn device_bytes(plan: &Plan) -> (u64, u64) {
    // (source, tensor) → (element size, element bitmap).
    let mut seen: HashMap<(usize, &str), (u64, Vec<bool>)> = HashMap::new();
    let mut down = 0u64;
    for t in plan.files.iter().flat_map(|f| &f.tensors) {
        let steps = t.content.steps();
        let direct = matches!(&t.content,
            Content::Tensor { steps, .. } if steps.len() == 1 && plain(&steps[0].copy));
        if steps.is_empty() || direct {
            continue;
        }
        down += t.bytes();
        for s in steps {
            let c = &s.copy;
            let n = c.src_shape.len();
            let count = c.src_shape.iter().product::<u64>() as usize;
            let (_, map) = seen
                .entry((s.source, s.tensor.as_str()))
                .or_insert_with(|| (c.src_dtype.size() as u64, vec![false; count]));
            let mut len = vec![1u64; n];
            for d in 0..n {
                len[c.src_axis(d)] = c.extent[d];
            }
            let total: u64 = len.iter().product();
            for i in 0..total {
                let (mut rest, mut flat, mut stride) = (i, 0u64, 1u64);
                for a in (0..n).rev() {
                    flat += (c.src_offset[a] + rest % len[a]) * stride;
                    rest /= len[a];
                    stride *= c.src_shape[a];
                }
                map[flat as usize] = true;
            }
        }
    }
    let up = seen
        .values()
        .map(|(es, map)| es * map.iter().filter(|b| **b).count() as u64)
        .sum();
    (up, down)
}

/// Host↔device bytes of one plan on a fresh emulator (Auto path, kernel
/// off, 64 KiB stages, default device cache).
struct Traffic {
    h2d: u64,
    d2h: u64,
    /// What the device must move at least once ([`device_bytes`]).
    need_up: u64,
    need_down: u64,
    /// The plan's own counts (`PlanSummary`: a source byte read for k
    /// destination files counts k times).
    read: u64,
    written: u64,
}

impl Traffic {
    fn line(&self, what: &str) -> String {
        format!(
            "{what}: h2d {} B = {:.3}x distinct needed, {:.3}x read; d2h {} B = {:.3}x device-filled, {:.3}x written",
            self.h2d,
            self.h2d as f64 / self.need_up.max(1) as f64,
            self.h2d as f64 / self.read as f64,
            self.d2h,
            self.d2h as f64 / self.need_down.max(1) as f64,
            self.d2h as f64 / self.written as f64,
        )
    }
}

fn traffic(plan: &Plan, what: &str, o: AscendOptions) -> Traffic {
    let emu = Emulator::new();
    let b = AscendBackend::with_api(emu.api(), o).unwrap();
    let before = emu.stats();
    exec::execute(
        plan,
        &b,
        &ExecOptions {
            workers: 2,
            ..Default::default()
        },
    )
    .unwrap();
    drop(b);
    let s = emu.stats();
    assert!(
        emu.violations().is_empty(),
        "{what}: {:?}",
        emu.violations()
    );
    let sum = plan.summary(2);
    assert!(sum.bytes_read > 0 && sum.bytes_written > 0, "{what}");
    let (need_up, need_down) = device_bytes(plan);
    Traffic {
        h2d: s.h2d_bytes - before.h2d_bytes,
        d2h: s.d2h_bytes - before.d2h_bytes,
        need_up,
        need_down,
        read: sum.bytes_read,
        written: sum.bytes_written,
    }
}

fn options(lora: LoraMode) -> AscendOptions {
    AscendOptions {
        device: 0,
        stage_bytes: 1 << 16,
        path: CopyPath::Auto,
        lora,
        threads: 2,
        kernel: false,
        cache_bytes: None,
    }
}

/// The plans of the traffic test, on a bf16 LoRA model sharded mp4.
fn plans(root: &Path) -> Vec<(&'static str, Plan)> {
    let (shards, mp4, mp2) = sharded(root, DType::BF16);
    let model = root.join("model.ckpt");
    // dp 2 · mp 2: every mp2 slab is held by two destination files, so each
    // source byte of a sharded tensor is needed twice (a replicated slab).
    let dp2 = strategy_files(&model, &root.join("dp2mp2"), 2, 2, 1, 0, true);
    vec![
        (
            "split 1→4",
            plan_transform(&TransformOptions::new(
                &model,
                root.join("split"),
                None,
                Some(mp4.clone()),
            ))
            .unwrap(),
        ),
        (
            "N→M 4→2",
            the_plan(
                &shards,
                &mp4,
                &mp2,
                &root.join("n2m"),
                false,
                FileFormat::Ckpt,
            ),
        ),
        (
            "merge 4→1",
            plan_transform(&TransformOptions::new(
                &shards,
                root.join("merge"),
                Some(mp4.clone()),
                None,
            ))
            .unwrap(),
        ),
        (
            "LoRA 4→2",
            the_plan(
                &shards,
                &mp4,
                &mp2,
                &root.join("lora"),
                true,
                FileFormat::Ckpt,
            ),
        ),
        (
            "N→M 4→dp2·mp2 (replicated)",
            the_plan(
                &shards,
                &mp4,
                &dp2,
                &root.join("n2m-dp2"),
                false,
                FileFormat::Ckpt,
            ),
        ),
        (
            "LoRA 4→dp2·mp2 (replicated)",
            the_plan(
                &shards,
                &mp4,
                &dp2,
                &root.join("lora-dp2"),
                true,
                FileFormat::Safetensors,
            ),
        ),
    ]
}

/// Issue 15 item 4: for split, N→M, merge and LoRA — and plans where one
/// source range is needed by several destination files — every source byte
/// crosses host→device at most once and every destination byte
/// device→host at most once (device LoRA, the default).
#[test]
fn each_byte_crosses_host_and_device_at_most_once() {
    let dir = tempdir();
    let plans = plans(dir.path());
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for (what, plan) in &plans {
        let t = traffic(plan, what, options(LoraMode::DeviceAddmm));
        let line = t.line(what);
        assert!(
            t.need_up > 0 && t.need_down > 0,
            "{line}: nothing on the device"
        );
        if t.h2d > t.need_up || t.d2h > t.need_down || t.h2d > t.read || t.d2h > t.written {
            failed.push(line.clone());
        }
        report.push(line);
    }
    // --lora-bit-exact computes the tile products on the host from B and A
    // downloaded once per merged weight, and uploads each product block for
    // the device add: reported, not bounded (the opt-in exact path).
    for (what, plan) in plans.iter().filter(|(w, _)| w.starts_with("LoRA")) {
        let t = traffic(plan, what, options(LoraMode::HostGemm));
        report.push(t.line(&format!("{what} --lora-bit-exact")));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failed.is_empty(),
        "over once per byte:\n{}",
        failed.join("\n")
    );
}

/// Every output file (manifests aside) under two directories, byte for byte.
fn same_tree(a: &Path, b: &Path, what: &str) {
    let (ta, tb) = (crate::util::fs::contents(a), crate::util::fs::contents(b));
    assert!(!ta.is_empty(), "{what}: no output");
    assert!(ta == tb, "{what}: outputs differ from the CPU's");
}

/// The cache's budget rule: with the cache off every destination file
/// uploads its own copy of a replicated slab (twice the distinct bytes, the
/// old path); with a budget too small for the job, evicted entries are the
/// only bytes uploaded again (h2d ≤ distinct + evicted); with the default
/// budget nothing is evicted. The bytes written are the CPU's every time,
/// and the cache is empty once the job is done.
#[test]
fn cache_budget_evicts_and_rereads_only_what_it_must() {
    let dir = tempdir();
    let root = dir.path();
    let (shards, mp4, _) = sharded(root, DType::BF16);
    let dp2 = strategy_files(
        &root.join("model.ckpt"),
        &root.join("dp2mp2"),
        2,
        2,
        1,
        0,
        true,
    );
    let cpu_out = root.join("cpu");
    let cpu_plan = the_plan(&shards, &mp4, &dp2, &cpu_out, true, FileFormat::Ckpt);
    exec::execute(
        &cpu_plan,
        &reshard::backend::CpuBackend::new(2),
        &ExecOptions::default(),
    )
    .unwrap();
    for (budget, tag) in [(Some(0), "off"), (Some(1024), "1 KiB"), (None, "default")] {
        let out = root.join(format!("dev-{tag}"));
        let plan = the_plan(&shards, &mp4, &dp2, &out, true, FileFormat::Ckpt);
        let emu = Emulator::new();
        let b = AscendBackend::with_api(
            emu.api(),
            AscendOptions {
                cache_bytes: budget,
                ..options(LoraMode::DeviceAddmm)
            },
        )
        .unwrap();
        let before = emu.stats().h2d_bytes;
        exec::execute(&plan, &b, &ExecOptions::default()).unwrap();
        let h2d = emu.stats().h2d_bytes - before;
        let stats = b.stats().cache;
        drop(b);
        assert!(emu.violations().is_empty(), "{tag}: {:?}", emu.violations());
        same_tree(&out, &cpu_out, tag);
        let (need, _) = device_bytes(&plan);
        eprintln!("cache {tag}: h2d {h2d} B for {need} distinct needed, {stats:?}");
        assert_eq!(stats.held_bytes, 0, "{tag}: the job's entries outlived it");
        if budget != Some(0) {
            assert_eq!(
                h2d,
                stats.uploaded_bytes + stats.uncached_bytes,
                "{tag}: every upload is a source upload"
            );
        }
        match budget {
            Some(0) => {
                assert_eq!(stats.uploaded_bytes, 0, "{tag}");
                assert!(
                    h2d > need,
                    "{tag}: the replicated slabs are uploaded per file"
                );
            }
            Some(_) => {
                assert!(stats.evicted_bytes > 0, "{tag}: {stats:?}");
                assert!(
                    h2d <= need + stats.evicted_bytes,
                    "{tag}: {h2d} > {need} + evicted"
                );
            }
            None => {
                assert_eq!(stats.evicted_bytes, 0, "{tag}");
                assert_eq!(stats.uncached_bytes, 0, "{tag}");
                assert!(h2d <= need, "{tag}: {h2d} > {need}");
            }
        }
    }
}

/// A bad copy from a source tensor is refused with a typed error before
/// anything moves: a source slice of the wrong length, an unsupported cast.
#[test]
fn bad_source_copies_are_refused() {
    let emu = Emulator::new();
    let b = AscendBackend::with_api(emu.api(), options(LoraMode::DeviceAddmm)).unwrap();
    let key = reshard::backend::SourceKey {
        job: reshard::backend::SourceKey::new_job(),
        source: 0,
        tensor: "w".into(),
    };
    let mut dst = reshard::backend::Backend::alloc(&b, 64).unwrap();
    let copy = BoxCopy::whole(&[16], DType::F32, DType::F32);
    let e = reshard::backend::Backend::box_copy_source(&b, &key, &[0; 60], &mut dst, &copy)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("box copy buffers are 60 and 64 bytes"),
        "{e}"
    );
    let cast = BoxCopy::whole(&[16], DType::F32, DType::Bool);
    let mut small = reshard::backend::Backend::alloc(&b, 16).unwrap();
    let e = reshard::backend::Backend::box_copy_source(&b, &key, &[0; 64], &mut small, &cast)
        .unwrap_err();
    assert!(
        matches!(e, reshard::Error::UnsupportedDtype { .. }),
        "{e:?}"
    );
    assert_eq!(b.stats().cache.uploaded_bytes, 0);
    assert!(emu.violations().is_empty(), "{:?}", emu.violations());
}
