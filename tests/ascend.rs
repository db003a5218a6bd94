//! The Ascend backend, on the host emulator (`ffi/ascend-stub`) — nothing
//! here touches an NPU. `extra_backends` lets conformance bodies run a
//! second time on emulated Ascend (`cargo test --features ascend`); the
//! `emulated` tests compare every device path with the CPU backend byte for
//! byte, exercise the faults of the issue, and show each emulator rule
//! firing.

/// N ranks, each reading only its share of the sources: the plan's plain
/// and LoRA-merged tensors, in ckpt and safetensors, exchanged between
/// ranks (in-process communicator, CPU backend).
mod distributed {
    use std::path::Path;
    use std::time::Duration;

    use reshard::backend::CpuBackend;
    use reshard::comm::InProcess;
    use reshard::formats::tree::FileFormat;
    use reshard::DType;

    use crate::util::distributed::{on_every_rank, sharded, the_plan};
    use crate::util::fs::contents as tree;
    use crate::util::tempdir;

    /// The manifests under `dir` without the command line that wrote them.
    pub fn manifests(dir: &Path) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = crate::util::fs::walk(dir)
            .into_iter()
            .filter(|p| crate::util::fs::is_manifest(p))
            .map(|p| {
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                m.as_object_mut().unwrap().remove("command");
                m
            })
            .collect();
        out.sort_by_key(|m| m["file"].to_string());
        out
    }

    #[test]
    fn ranks_read_disjoint_sources_and_write_what_one_process_writes() {
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = sharded(root, DType::BF16);
        for (lora, format, hash_sources) in [
            (false, FileFormat::Ckpt, true),
            (true, FileFormat::Ckpt, false),
            (true, FileFormat::Safetensors, true),
        ] {
            let tag = format!("{lora}-{format:?}-{hash_sources}");
            let options = reshard::exec::ExecOptions {
                control: reshard::exec::OutputControl {
                    hash_sources,
                    ..Default::default()
                },
                ..Default::default()
            };
            let single = root.join(format!("single-{tag}"));
            let p = the_plan(&shards, &mp4, &mp2, &single, lora, format);
            reshard::exec::execute(&p, &CpuBackend::new(1), &options).unwrap();
            let multi = root.join(format!("multi-{tag}"));
            let p = the_plan(&shards, &mp4, &mp2, &multi, lora, format);
            let comms = InProcess::group(3, Duration::from_secs(30));
            let reports = on_every_rank(&comms, |c| {
                reshard::exec::execute_on(&p, &CpuBackend::new(1), c, &options).unwrap()
            });
            // Each source read by exactly one rank; each file written once.
            let mut read: Vec<usize> = reports
                .iter()
                .flat_map(|r| r.1.sources_read.clone())
                .collect();
            read.sort();
            assert_eq!(read, (0..4).collect::<Vec<_>>(), "{tag}");
            let sent: u64 = reports.iter().map(|r| r.1.bytes_sent).sum();
            let received: u64 = reports.iter().map(|r| r.1.bytes_received).sum();
            assert!(
                received > 0 && sent == received,
                "{tag}: {sent} sent, {received} received"
            );
            // With --hash-sources, manifests hashed every source once, by
            // its reader (the same as a local run's); without, each reader
            // read only the source tensors it used.
            let source_bytes: u64 = reports.iter().map(|r| r.1.bytes_read).sum();
            let on_disk: u64 = (0..4)
                .map(|k| {
                    let d = shards.join(format!("rank_{k}"));
                    std::fs::read_dir(&d)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .filter(|p| !p.to_string_lossy().ends_with(".json"))
                        .map(|p| p.metadata().unwrap().len())
                        .sum::<u64>()
                })
                .sum();
            if hash_sources {
                assert_eq!(source_bytes, on_disk, "{tag}");
            } else {
                assert!(0 < source_bytes && source_bytes < on_disk, "{tag}");
            }
            let (a, b) = (tree(&single), tree(&multi));
            assert_eq!(a.len(), 2, "{tag}");
            assert!(a == b, "{tag}: distributed output differs");
            assert_eq!(manifests(&single), manifests(&multi), "{tag}");
        }
    }

    /// `--resume` and progress hold for a distributed run: a second run
    /// finds every file complete (its manifest matches), skips it on every
    /// rank and exchanges nothing; progress counts what each rank wrote.
    #[test]
    fn distributed_runs_resume_and_report_progress() {
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = sharded(root, DType::F32);
        let out = root.join("out");
        let p = the_plan(&shards, &mp4, &mp2, &out, false, FileFormat::Ckpt);
        let run = |resume: bool| {
            let comms = InProcess::group(3, Duration::from_secs(30));
            on_every_rank(&comms, |c| {
                let progress = reshard::exec::Progress::new();
                let options = reshard::exec::ExecOptions {
                    resume,
                    control: reshard::exec::OutputControl {
                        progress: Some(progress.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let r = reshard::exec::execute_on(&p, &CpuBackend::new(1), c, &options).unwrap();
                (r, progress.bytes(), progress.total())
            })
        };
        let first = run(false);
        let before = tree(&out);
        assert_eq!(before.len(), 2);
        for ((e, x), done, total) in &first {
            assert_eq!(*done, *total, "rank {}", x.rank);
            assert_eq!(*done, e.bytes_written, "rank {}", x.rank);
            assert!(e.files.iter().all(|f| !f.skipped));
        }
        let second = run(true);
        for ((e, x), done, total) in &second {
            assert!(e.files.iter().all(|f| f.skipped), "rank {}: {e:?}", x.rank);
            assert_eq!(x.bytes_sent + x.bytes_received, 0, "rank {}", x.rank);
            assert_eq!(*done, *total, "rank {}", x.rank);
        }
        assert!(tree(&out) == before);
    }

    /// A source the plan needs on no rank's disk: every rank fails with
    /// the same typed error naming it, before anything is written.
    #[test]
    fn a_source_on_no_rank_fails_every_rank() {
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = sharded(root, DType::F32);
        let out = root.join("out");
        let p = the_plan(&shards, &mp4, &mp2, &out, false, FileFormat::Ckpt);
        let gone = p.sources[2].path.clone();
        std::fs::remove_file(&gone).unwrap();
        let comms = InProcess::group(2, Duration::from_secs(30));
        let results = on_every_rank(&comms, |c| {
            reshard::exec::execute_on(&p, &CpuBackend::new(1), c, &Default::default())
        });
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(
                    e,
                    reshard::Error::Job {
                        kind: reshard::error::JobErrorKind::SourceMissing,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains(&gone.display().to_string()), "{e}");
        }
        assert!(tree(&out).is_empty());
    }

    /// A rank whose check of its written files (`--verify`) fails fails the
    /// job: every rank removes what it wrote.
    #[test]
    fn a_failed_check_on_one_rank_removes_every_ranks_files() {
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = sharded(root, DType::F32);
        let out = root.join("out");
        let p = the_plan(&shards, &mp4, &mp2, &out, false, FileFormat::Ckpt);
        let local = vec![true; p.sources.len()];
        let comms = InProcess::group(2, Duration::from_secs(30));
        let results = on_every_rank(&comms, |c| {
            use reshard::comm::Communicator;
            let me = c.rank();
            let check = |plan: &reshard::plan::Plan| {
                assert!(plan.files.iter().all(|f| f.path.is_file()));
                if me == 1 {
                    Err(reshard::Error::mismatch("the check failed"))
                } else {
                    Ok(())
                }
            };
            reshard::exec::execute_on_local(
                &p,
                &CpuBackend::new(1),
                c,
                &Default::default(),
                &local,
                Some(&check),
            )
        });
        let kinds: Vec<reshard::ErrorKind> = results
            .iter()
            .map(|r| r.as_ref().unwrap_err().kind())
            .collect();
        assert_eq!(
            kinds,
            [reshard::ErrorKind::Job, reshard::ErrorKind::Mismatch]
        );
        let errors: Vec<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert!(errors[1].contains("the check failed"), "{errors:?}");
        assert!(errors[0].contains("rank(s) [1]"), "{errors:?}");
        assert!(tree(&out).is_empty(), "{:?}", tree(&out).len());
    }

    #[test]
    fn a_rank_that_dies_fails_the_job_and_leaves_no_file() {
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = sharded(root, DType::F32);
        let out = root.join("out");
        let p = the_plan(&shards, &mp4, &mp2, &out, true, FileFormat::Ckpt);
        let mut comms = InProcess::group(3, Duration::from_secs(5));
        drop(comms.pop()); // rank 2 dies before the job
        let results = on_every_rank(&comms, |c| {
            reshard::exec::execute_on(&p, &CpuBackend::new(1), c, &Default::default())
        });
        for r in &results {
            let e = r.as_ref().unwrap_err();
            // A peer that left is a communicator timeout, as with HCCL.
            assert_eq!(e.kind(), reshard::ErrorKind::Device, "{e}");
            assert!(e.to_string().contains("rank 2"), "{e}");
        }
        assert!(
            tree(&out).is_empty(),
            "{:?}",
            tree(&out).iter().map(|f| &f.0).collect::<Vec<_>>()
        );
    }
}

#[cfg(feature = "ascend")]
mod emulated {
    use std::ffi::c_void;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use ascend_stub::Emulator;
    use ascendcl_sys::safe::{self, Context, DeviceMem, Stream, Tensor};
    use ascendcl_sys::sys::{self as acl, Api};
    use proptest::prelude::*;
    use reshard::backend::ascend::{AscendOptions, CopyPath, LoraMode};
    use reshard::backend::{AscendBackend, Backend, BackendChoice, CpuBackend, Src};
    use reshard::error::{DeviceErrorKind, Error};
    use reshard::exec::{self, ExecOptions};
    use reshard::formats::ckpt::{CkptWriter, WriteOptions};
    use reshard::formats::tree::FileFormat;
    use reshard::layout::boxes::{BoxCopy, LoraAdd};
    use reshard::ops::merge_lora::{merge_lora, MergeLoraOptions};
    use reshard::ops::transform::{plan_transform, transform, TransformOptions};
    use reshard::DType;

    use crate::util::lora::{lora_model, strategies};
    use crate::util::model::strategy_files;
    use crate::util::tempdir;

    fn opts(path: CopyPath, stage: usize) -> AscendOptions {
        AscendOptions {
            device: 0,
            stage_bytes: stage,
            path,
            lora: LoraMode::HostGemm,
            threads: 2,
            kernel: false,
            cache_bytes: None,
        }
    }

    /// The four ways a box copy can run: kernel, aclnn with memcpy
    /// shortcuts, aclnn only, host.
    fn configs() -> Vec<(&'static str, Emulator, CopyPath)> {
        vec![
            ("kernel", Emulator::new(), CopyPath::Kernel),
            (
                "aclnn+memcpy",
                Emulator::without(&["reshard_box_copy"]),
                CopyPath::Auto,
            ),
            (
                "aclnn",
                Emulator::without(&["reshard_box_copy"]),
                CopyPath::Aclnn,
            ),
            ("host", Emulator::new(), CopyPath::Host),
        ]
    }

    fn arb_copy() -> impl Strategy<Value = BoxCopy> {
        let pairs = vec![
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::U8, DType::U8),
            (DType::C128, DType::C128),
            (DType::F32, DType::BF16),
            (DType::F32, DType::F16),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F32),
            (DType::F64, DType::BF16),
            (DType::F32, DType::F64),
            (DType::BF16, DType::F16),
        ];
        (
            proptest::collection::vec((1u64..7, 1u64..7), 1..5),
            proptest::sample::select(pairs),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_flat_map(|(dims, (sd, dd), seed, permute)| {
                let n = dims.len();
                let mut axes: Vec<usize> = (0..n).collect();
                if permute {
                    for i in (1..n).rev() {
                        axes.swap(i, (seed >> (i * 3)) as usize % (i + 1));
                    }
                }
                let src_shape: Vec<u64> = dims.iter().map(|d| d.0).collect();
                // Destination dims in destination order.
                let dst_shape: Vec<u64> = (0..n).map(|d| dims[axes[d]].1).collect();
                let per: Vec<_> = (0..n)
                    .map(|d| {
                        let (s, t) = (src_shape[axes[d]], dst_shape[d]);
                        (1..=s.min(t)).prop_flat_map(move |e| (Just(e), 0..=s - e, 0..=t - e))
                    })
                    .collect();
                (
                    Just(src_shape),
                    Just(dst_shape),
                    per,
                    Just(axes),
                    Just((sd, dd)),
                )
            })
            .prop_map(|(src_shape, dst_shape, per, axes, (sd, dd))| {
                let n = src_shape.len();
                let mut src_offset = vec![0; n];
                for (d, p) in per.iter().enumerate() {
                    src_offset[axes[d]] = p.1;
                }
                BoxCopy {
                    src_shape,
                    src_dtype: sd,
                    src_offset,
                    dst_shape,
                    dst_dtype: dd,
                    dst_offset: per.iter().map(|p| p.2).collect(),
                    extent: per.iter().map(|p| p.0).collect(),
                    src_axes: if axes.iter().enumerate().all(|(i, a)| i == *a) {
                        Vec::new()
                    } else {
                        axes
                    },
                }
            })
    }

    fn cpu_result(c: &BoxCopy, src: &[u8], init: &[u8]) -> Vec<u8> {
        let cpu = CpuBackend::new(1);
        let mut out = cpu.alloc(init.len()).unwrap();
        cpu.upload(init, &mut out, 0).unwrap();
        cpu.box_copy(Src::Host(src), &mut out, c).unwrap();
        out.bytes().to_vec()
    }

    fn device_result(
        b: &AscendBackend,
        c: &BoxCopy,
        src: &[u8],
        init: &[u8],
        via_buffer: bool,
    ) -> Vec<u8> {
        let mut out = b.alloc(init.len()).unwrap();
        b.upload(init, &mut out, 0).unwrap();
        if via_buffer {
            let mut s = b.alloc(src.len()).unwrap();
            b.upload(src, &mut s, 0).unwrap();
            b.box_copy(Src::Buffer(&s), &mut out, c).unwrap();
        } else {
            b.box_copy(Src::Host(src), &mut out, c).unwrap();
        }
        b.synchronize().unwrap();
        let mut host = vec![0u8; init.len()];
        b.download(&out, 0, &mut host).unwrap();
        b.synchronize().unwrap();
        host
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// Every device path of the box copy (fused kernel, memcpy /
        /// memcpy2d, aclnnCast, aclnnInplaceCopy on views, host fallback),
        /// from host memory through the double-buffered stages and from a
        /// device buffer, gives the CPU backend's bytes.
        #[test]
        fn box_copies_match_the_cpu_backend_on_every_path(
            c in arb_copy(), seed in any::<u8>(), via_buffer in any::<bool>(), stage in 64usize..600,
        ) {
            let src: Vec<u8> = (0..c.src_shape.iter().product::<u64>() as usize * c.src_dtype.size())
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            let init = vec![0xAAu8; c.dst_shape.iter().product::<u64>() as usize * c.dst_dtype.size()];
            let want = cpu_result(&c, &src, &init);
            for (name, emu, path) in configs() {
                let b = AscendBackend::with_api(emu.api(), opts(path, stage)).unwrap();
                let got = device_result(&b, &c, &src, &init, via_buffer);
                prop_assert!(got == want, "path {name}: {c:?}");
                drop(b);
                prop_assert!(emu.violations().is_empty(), "{name}: {:?}", emu.violations());
            }
        }
    }

    #[test]
    fn each_path_is_taken_and_bad_copies_fail_like_on_the_cpu() {
        let c = BoxCopy {
            src_offset: vec![1, 0],
            extent: vec![2, 64],
            dst_shape: vec![2, 64],
            ..BoxCopy::whole(&[4, 64], DType::F32, DType::BF16)
        };
        let src: Vec<u8> = (0..4 * 64 * 4).map(|i| i as u8).collect();
        let init = vec![0u8; 2 * 64 * 2];
        for (name, emu, path) in configs() {
            let b = AscendBackend::with_api(emu.api(), opts(path, 1 << 20)).unwrap();
            device_result(&b, &c, &src, &init, true);
            let want = match name {
                "kernel" => "kernel",
                "host" => "host",
                _ => "inplace_copy",
            };
            assert!(
                b.stats().paths.contains_key(want),
                "{name}: {:?}",
                b.stats()
            );
        }
        // Whole-tensor casts use aclnnCast; aligned same-dtype runs a memcpy;
        // rows a device-to-device memcpy2d where this CANN has it.
        let emu = Emulator::without(&["reshard_box_copy"]);
        emu.configure(0, |c| c.memcpy2d_d2d = true);
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 1 << 20)).unwrap();
        let whole = BoxCopy::whole(&[4, 64], DType::F32, DType::BF16);
        device_result(&b, &whole, &src, &vec![0; 512], true);
        let same = BoxCopy::whole(&[4, 64], DType::F32, DType::F32);
        device_result(&b, &same, &src, &vec![0; 1024], true);
        let rows = BoxCopy {
            src_offset: vec![0, 3],
            extent: vec![4, 5],
            dst_shape: vec![4, 5],
            ..BoxCopy::whole(&[4, 64], DType::F32, DType::F32)
        };
        device_result(&b, &rows, &src, &[0; 80], true);
        let s = b.stats();
        for p in ["cast", "memcpy", "memcpy2d"] {
            assert!(s.paths.contains_key(p), "{p}: {s:?}");
        }
        // The CPU backend's errors, before any device work.
        let mut out = b.alloc(16).unwrap();
        let mut bad = BoxCopy::whole(&[2, 2], DType::F32, DType::F32);
        bad.extent = vec![3, 2];
        let e = b.box_copy(Src::Host(&[0; 16]), &mut out, &bad).unwrap_err();
        assert_eq!(e.kind(), reshard::ErrorKind::Mismatch, "{e}");
        assert!(e.to_string().contains("out of bounds"), "{e}");
        let mut out = b.alloc(4).unwrap();
        let e = b
            .box_copy(
                Src::Host(&[0; 8]),
                &mut out,
                &BoxCopy::whole(&[2], DType::I32, DType::F16),
            )
            .unwrap_err();
        assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e}");
    }

    #[test]
    fn memcpy2d_device_to_device_is_probed_once_and_falls_back_by_default() {
        // The emulator follows the documented contract (H2D / D2H only): the
        // start-up probe fails, rows go to aclnn, nothing is violated.
        let rows = BoxCopy {
            src_offset: vec![0, 3],
            extent: vec![4, 5],
            dst_shape: vec![4, 5],
            ..BoxCopy::whole(&[4, 64], DType::F32, DType::F32)
        };
        let src: Vec<u8> = (0..4 * 64 * 4).map(|i| (i * 3) as u8).collect();
        let want = cpu_result(&rows, &src, &[0; 80]);
        let emu = Emulator::without(&["reshard_box_copy"]);
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 1 << 20)).unwrap();
        assert_eq!(device_result(&b, &rows, &src, &[0; 80], true), want);
        let s = b.stats();
        assert!(!s.paths.contains_key("memcpy2d"), "{s:?}");
        assert!(
            s.fallbacks
                .iter()
                .any(|f| f.contains("aclrtMemcpy2dAsync") && f.contains("ACL_ERROR_INVALID_PARAM")),
            "{s:?}"
        );
        drop(b);
        assert_clean(&emu);
        // Where the probe passes, rows take memcpy2d.
        let emu = Emulator::without(&["reshard_box_copy"]);
        emu.configure(0, |c| c.memcpy2d_d2d = true);
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 1 << 20)).unwrap();
        assert_eq!(device_result(&b, &rows, &src, &[0; 80], true), want);
        assert!(b.stats().paths.contains_key("memcpy2d"), "{:?}", b.stats());
        assert!(b.stats().fallbacks.is_empty(), "{:?}", b.stats());
    }

    #[test]
    fn backend_auto_says_why_it_chose_ascend() {
        crate::util::extra_backends();
        let b = BackendChoice::Auto.open().unwrap();
        let d = b.describe();
        assert!(
            d.starts_with("ascend") && d.contains("backend auto: chose Ascend"),
            "{d}"
        );
        assert!(
            b.note().unwrap().contains("device opened"),
            "{:?}",
            b.note()
        );
    }

    #[test]
    fn a_device_without_free_memory_at_start_up_names_the_fix() {
        let emu = Emulator::new();
        emu.configure(0, |c| c.malloc_budget = Some(0));
        let e = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 1 << 20)).unwrap_err();
        assert_eq!(e.kind(), reshard::ErrorKind::Device, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("device 0 has no free memory") && text.contains("npu-smi info"),
            "{text}"
        );
    }

    #[test]
    fn the_kernel_is_opt_in_and_never_gets_a_pair_it_cannot_do() {
        let src: Vec<u8> = (0..4 * 64 * 4).map(|i| (i * 13) as u8).collect();
        let strided = BoxCopy {
            src_offset: vec![1, 0],
            extent: vec![2, 64],
            dst_shape: vec![2, 64],
            ..BoxCopy::whole(&[4, 64], DType::F32, DType::BF16)
        };
        // Built and present, but not opted in: Auto takes aclnn.
        let emu = Emulator::new();
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 1 << 20)).unwrap();
        device_result(&b, &strided, &src, &[0; 256], true);
        assert!(!b.stats().paths.contains_key("kernel"), "{:?}", b.stats());
        drop(b);
        // Opted in: the kernel, with its descriptor uploaded to the device.
        let on = AscendOptions {
            kernel: true,
            ..opts(CopyPath::Auto, 1 << 20)
        };
        let b = AscendBackend::with_api(emu.api(), on.clone()).unwrap();
        let want = cpu_result(&strided, &src, &[0; 256]);
        assert_eq!(device_result(&b, &strided, &src, &[0; 256], true), want);
        assert!(b.stats().paths.contains_key("kernel"), "{:?}", b.stats());
        // f16 <-> bf16 is no A2 Cast pair: never routed to the kernel.
        for (s, d) in [(DType::F16, DType::BF16), (DType::BF16, DType::F16)] {
            let c = BoxCopy {
                src_offset: vec![1, 0],
                extent: vec![2, 64],
                dst_shape: vec![2, 64],
                ..BoxCopy::whole(&[4, 64], s, d)
            };
            let src16 = &src[..4 * 64 * 2];
            let want = cpu_result(&c, src16, &[0; 256]);
            assert_eq!(
                device_result(&b, &c, src16, &[0; 256], true),
                want,
                "{s} -> {d}"
            );
        }
        drop(b);
        assert_clean(&emu);
    }

    #[test]
    fn the_emulated_launcher_refuses_what_the_kernel_cannot_do() {
        use ascendcl_sys::sys::{ReshardBoxDesc, ACL_BF16, ACL_ERROR_INVALID_PARAM, ACL_FLOAT16};
        let emu = Emulator::new();
        let api = emu.api();
        let launch = api.reshard_box_copy.unwrap();
        let b = AscendBackend::with_api(api, opts(CopyPath::Kernel, 1 << 20)).unwrap();
        let (src, dst, desc_dev) = (
            b.alloc(256).unwrap(),
            b.alloc(256).unwrap(),
            b.alloc(512).unwrap(),
        );
        let mut d = ReshardBoxDesc {
            rank: 1,
            src_dtype: ACL_FLOAT16.0,
            dst_dtype: ACL_BF16.0,
            ..Default::default()
        };
        d.extent[0] = 64;
        d.src_stride[0] = 1;
        d.dst_stride[0] = 1;
        let (s, t, dd) = (
            b.device_ptr(&src).unwrap(),
            b.device_ptr(&dst).unwrap(),
            b.device_ptr(&desc_dev).unwrap(),
        );
        // SAFETY: live device buffers of the emulator; `d` outlives the call.
        let code = unsafe { launch(1, std::ptr::null_mut(), s, t, dd, &d) };
        assert_eq!(code as i32, ACL_ERROR_INVALID_PARAM);
        assert!(
            fired(&emu, "does not implement ACL_FLOAT16 -> ACL_BF16"),
            "{:?}",
            emu.violations()
        );
        // A host descriptor where the kernel needs a device one.
        d.dst_dtype = ascendcl_sys::sys::ACL_FLOAT.0;
        let host = (&d as *const ReshardBoxDesc).cast_mut().cast::<c_void>();
        // SAFETY: as above; the emulator refuses before touching anything.
        let code = unsafe { launch(1, std::ptr::null_mut(), s, t, host, &d) };
        assert_eq!(code as i32, ACL_ERROR_INVALID_PARAM);
        assert!(
            fired(&emu, "must be in device memory"),
            "{:?}",
            emu.violations()
        );
    }

    #[test]
    fn upload_and_download_round_trip_through_small_stages() {
        let emu = Emulator::new();
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 100)).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut buf = b.alloc(1200).unwrap();
        b.upload(&data, &mut buf, 150).unwrap();
        let mut back = vec![0u8; 1000];
        b.download(&buf, 150, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(b.upload(&data, &mut buf, 201).is_err());
        drop((buf, b));
        assert_clean(&emu);
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn lora_case(
        m: usize,
        n: usize,
        k: usize,
        r: (usize, usize),
        c: (usize, usize),
        t: bool,
        seed: u32,
    ) -> (LoraAdd, Vec<u8>, Vec<u8>, Vec<u8>) {
        let val =
            |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 997.0 - 1.0;
        let [br, ac] = LoraAdd::needed([m, n], [r.0, c.0], [r.1, c.1]);
        let b: Vec<f32> = (0..br.len() * k).map(|i| val(i + 7)).collect();
        let a: Vec<f32> = (0..k * ac.len()).map(|i| val(i + 13)).collect();
        // A local W bigger than the block, block at (1, 2).
        let shape = if t {
            [c.1 + 3, r.1 + 2]
        } else {
            [r.1 + 2, c.1 + 3]
        };
        let w: Vec<f32> = (0..shape[0] * shape[1]).map(|i| val(i) * 3.0).collect();
        let op = LoraAdd {
            global: [m, n],
            k,
            w_shape: shape,
            w_transposed: t,
            w_offset: [1, 2],
            origin: [r.0, c.0],
            block: [r.1, c.1],
            b_rows: br,
            a_cols: ac,
            scale: 0.37,
        };
        (op, f32s(&w), f32s(&b), f32s(&a))
    }

    fn run_lora<B: Backend>(be: &B, op: &LoraAdd, w: &[u8], b: &[u8], a: &[u8]) -> Vec<u8> {
        let up = |x: &[u8]| {
            let mut buf = be.alloc(x.len()).unwrap();
            be.upload(x, &mut buf, 0).unwrap();
            buf
        };
        let (mut wb, bb, ab) = (up(w), up(b), up(a));
        be.lora_add(&mut wb, &bb, &ab, op).unwrap();
        be.synchronize().unwrap();
        let mut out = vec![0u8; w.len()];
        be.download(&wb, 0, &mut out).unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The LoRA GEMM-add on the device equals the CPU backend's, bit for
        /// bit (host tile products, device add), W transposed or not.
        #[test]
        fn lora_add_is_bit_identical_to_the_cpu_backend(
            m in 1usize..300, n in 1usize..300, k in 1usize..20,
            r in (0usize..300, 1usize..300), c in (0usize..300, 1usize..300),
            t in any::<bool>(), seed in any::<u32>(),
        ) {
            let (r0, c0) = (r.0 % m, c.0 % n);
            let rows = 1 + (r.1 - 1) % (m - r0);
            let cols = 1 + (c.1 - 1) % (n - c0);
            let (op, w, b, a) = lora_case(m, n, k, (r0, rows), (c0, cols), t, seed);
            let want = run_lora(&CpuBackend::new(2), &op, &w, &b, &a);
            let emu = Emulator::new();
            let be = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 4096)).unwrap();
            let got = run_lora(&be, &op, &w, &b, &a);
            prop_assert!(got == want);
            prop_assert!(be.stats().paths.contains_key("add"));
        }
    }

    /// ulp distance between two f32 values (0 for equal, incl. ±0).
    fn ulps(x: f32, y: f32) -> u64 {
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b < 0x8000_0000 {
                b
            } else {
                0x8000_0000 - b
            }
        };
        (key(x) - key(y)).unsigned_abs()
    }

    /// The LoRA default (device GEMM) against the CPU backend on the
    /// emulator: the measured ulp distance, reported for docs/ascend.md.
    #[test]
    fn device_lora_ulp_distance_from_the_cpu_backend_is_small_and_measured() {
        let mut worst = 0u64;
        let mut worst_abs = 0f32;
        let mut differing = (0usize, 0usize);
        for (i, (m, n, k)) in [(64, 96, 8), (200, 300, 16), (128, 128, 64)]
            .into_iter()
            .enumerate()
        {
            let (op, w, b, a) =
                lora_case(m, n, k, (3, m - 5), (1, n - 2), i % 2 == 0, 11 + i as u32);
            let want = run_lora(&CpuBackend::new(1), &op, &w, &b, &a);
            let emu = Emulator::new();
            let dev = AscendOptions {
                lora: LoraMode::DeviceAddmm,
                ..opts(CopyPath::Auto, 4096)
            };
            let be = AscendBackend::with_api(emu.api(), dev).unwrap();
            let got = run_lora(&be, &op, &w, &b, &a);
            for (x, y) in got.chunks_exact(4).zip(want.chunks_exact(4)) {
                let (x, y) = (
                    f32::from_le_bytes(x.try_into().unwrap()),
                    f32::from_le_bytes(y.try_into().unwrap()),
                );
                let d = ulps(x, y);
                // ulp near 0 (W and s·B·A cancelling) says nothing: count
                // ulp where |y| ≥ 1/16, absolute error everywhere.
                if y.abs() >= 0.0625 {
                    worst = worst.max(d);
                }
                worst_abs = worst_abs.max((x - y).abs());
                differing.0 += (d > 0) as usize;
                differing.1 += 1;
            }
        }
        eprintln!(
            "device LoRA vs CPU on the emulator: max {worst} ulp where |value| >= 1/16, max \
             absolute difference {worst_abs:e}, {} of {} f32 values differ",
            differing.0, differing.1
        );
        assert!(
            worst <= 64 && worst_abs <= 2e-6,
            "max {worst} ulp, {worst_abs:e}"
        );
    }

    #[test]
    fn device_addmm_is_close_and_falls_back_where_cann_lacks_it() {
        let (op, w, b, a) = lora_case(200, 300, 8, (10, 150), (20, 260), true, 5);
        let want = run_lora(&CpuBackend::new(1), &op, &w, &b, &a);
        let emu = Emulator::new();
        let dev = AscendOptions {
            lora: LoraMode::DeviceAddmm,
            ..opts(CopyPath::Auto, 4096)
        };
        let be = AscendBackend::with_api(emu.api(), dev.clone()).unwrap();
        let got = run_lora(&be, &op, &w, &b, &a);
        assert!(be.stats().paths.contains_key("addmm"));
        let f = |x: &[u8]| -> Vec<f32> {
            x.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        for (x, y) in f(&got).iter().zip(f(&want)) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
        // An older CANN without aclnnInplaceAddmm: typed fallback, exact bits.
        let old = Emulator::without(&["aclnnInplaceAddmm"]);
        let be = AscendBackend::with_api(old.api(), dev).unwrap();
        assert_eq!(run_lora(&be, &op, &w, &b, &a), want);
        let s = be.stats();
        assert!(
            s.fallbacks
                .iter()
                .any(|f| f.contains("aclnnInplaceAddmm is unsupported on this CANN")),
            "{s:?}"
        );
        // The typed error itself.
        let e = ascendcl_sys::result::require(
            old.api(),
            "aclnnInplaceAddmm",
            old.api().aclnnInplaceAddmm,
        )
        .map(|_| ())
        .unwrap_err();
        assert!(e.is_unsupported(), "{e}");
        let e = reshard::backend::ascend::device_error(e);
        assert!(
            matches!(
                e,
                Error::Device {
                    kind: DeviceErrorKind::Unsupported,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("unsupported on this CANN"), "{e}");
    }

    /// Every output file (not manifests) of two trees is byte-identical.
    fn assert_same_outputs(a: &Path, b: &Path, what: &str) {
        let (fa, fb) = (crate::util::fs::contents(a), crate::util::fs::contents(b));
        let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&fa), names(&fb), "{what}: different files");
        assert!(!fa.is_empty(), "{what}: no output");
        for ((f, x), (_, y)) in fa.iter().zip(&fb) {
            assert!(x == y, "{what}: {} differs", f.display());
        }
    }

    /// The engine's transform and LoRA suites, run through
    /// `BackendChoice::Ascend` (the ops' own entry, on the shared emulator):
    /// the very bytes of the CPU run, for fp32, bf16 and fp16.
    #[test]
    fn transforms_and_merges_through_ops_are_byte_identical_on_ascend() {
        crate::util::extra_backends();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let dir = tempdir();
            let root = dir.path();
            let model = root.join("model.ckpt");
            lora_model(&model, dtype, 3);
            let (mp2, mp4) = (
                strategies(&model, &root.join("mp2"), 2),
                strategies(&model, &root.join("mp4"), 4),
            );
            for (backend, tag) in [(BackendChoice::Cpu, "cpu"), (BackendChoice::Ascend, "npu")] {
                let t =
                    |src: PathBuf, out: &str, s: Option<&PathBuf>, d: Option<&PathBuf>, format| {
                        let r = transform(&TransformOptions {
                            workers: 2,
                            backend,
                            output_format: format,
                            ..TransformOptions::new(
                                src,
                                root.join(tag).join(out),
                                s.cloned(),
                                d.cloned(),
                            )
                        })
                        .unwrap();
                        assert!(
                            r.backend
                                .starts_with(if tag == "cpu" { "cpu" } else { "ascend" }),
                            "{}",
                            r.backend
                        );
                    };
                t(model.clone(), "n2", None, Some(&mp2), None);
                t(
                    root.join(tag).join("n2"),
                    "n4",
                    Some(&mp2),
                    Some(&mp4),
                    None,
                );
                t(root.join(tag).join("n4"), "full", Some(&mp4), None, None);
                t(
                    root.join(tag).join("n2"),
                    "st4",
                    Some(&mp2),
                    Some(&mp4),
                    Some(FileFormat::Safetensors),
                );
                merge_lora(&MergeLoraOptions {
                    scale: 0.3,
                    backend,
                    ..MergeLoraOptions::new(&model, root.join(tag).join("merged"))
                })
                .unwrap();
                merge_lora(&MergeLoraOptions {
                    src_strategy: Some(mp2.clone()),
                    dst_strategy: Some(mp4.clone()),
                    workers: 2,
                    scale: 0.3,
                    backend,
                    ..MergeLoraOptions::new(
                        root.join(tag).join("n2"),
                        root.join(tag).join("merged4"),
                    )
                })
                .unwrap();
                merge_lora(&MergeLoraOptions {
                    fan_in_fan_out: false,
                    format: FileFormat::Safetensors,
                    backend,
                    ..MergeLoraOptions::new(&model, root.join(tag).join("merged_st"))
                })
                .unwrap();
            }
            for out in ["n2", "n4", "full", "st4", "merged", "merged4", "merged_st"] {
                assert_same_outputs(
                    &root.join("cpu").join(out),
                    &root.join("npu").join(out),
                    &format!("{dtype} {out}"),
                );
            }
        }
        assert!(
            ascend_stub::shared_violations().is_empty(),
            "{:?}",
            ascend_stub::shared_violations()
        );
    }

    /// A model with tensors large enough to need several staging chunks
    /// and to exceed a small device.
    fn big_model(path: &Path) -> PathBuf {
        let mut w = CkptWriter::create(path, WriteOptions::default()).unwrap();
        for (i, (name, shape)) in [
            ("model.layers.0.attention.wq.weight", [256i64, 192]),
            ("model.layers.0.attention.wo.weight", [192, 256]),
            ("model.layers.0.feed_forward.w1.weight", [384, 192]),
            ("model.layers.0.feed_forward.w2.weight", [192, 384]),
        ]
        .into_iter()
        .enumerate()
        {
            let n = (shape[0] * shape[1]) as usize;
            let bytes: Vec<u8> = (0..n * 2).map(|j| (j * 13 + i * 7) as u8).collect();
            w.write_tensor(name, DType::BF16, &shape, &bytes).unwrap();
        }
        w.finish().unwrap();
        strategy_files(path, &path.parent().unwrap().join("s2"), 1, 2, 1, 0, true)
    }

    /// Reshards `model` to the strategy `s2` into `out` on `b`.
    fn run_plan_with<B: Backend>(
        model: &Path,
        s2: &Path,
        out: &Path,
        b: &B,
        workers: usize,
    ) -> reshard::Result<()> {
        let o = TransformOptions::new(model, out, None, Some(s2.to_path_buf()));
        let plan = plan_transform(&o)?;
        exec::execute(
            &plan,
            b,
            &ExecOptions {
                workers,
                ..Default::default()
            },
        )
        .map(|_| ())
    }

    /// [`big_model`] in a temporary `m/`, resharded to mp2 by each backend
    /// into its own folder of the same temporary directory.
    struct BigJob {
        dir: tempfile::TempDir,
        model: PathBuf,
        s2: PathBuf,
    }

    impl BigJob {
        fn new() -> Self {
            let dir = tempdir();
            let model = dir.path().join("m/model.ckpt");
            std::fs::create_dir_all(model.parent().unwrap()).unwrap();
            let s2 = big_model(&model);
            BigJob { dir, model, s2 }
        }

        /// With the CPU backend's outputs in `cpu/`: the bytes every device
        /// run must give.
        fn with_cpu_outputs() -> Self {
            let job = Self::new();
            job.run(&job.dir.path().join("cpu"), &CpuBackend::new(2), 2)
                .unwrap();
            job
        }

        fn run<B: Backend>(&self, out: &Path, b: &B, workers: usize) -> reshard::Result<()> {
            run_plan_with(&self.model, &self.s2, out, b, workers)
        }

        /// Runs on `b` into `name/`, which must equal `cpu/`.
        fn run_as_cpu<B: Backend>(&self, name: &str, b: &B, workers: usize, what: &str) {
            let out = self.dir.path().join(name);
            self.run(&out, b, workers).unwrap();
            assert_same_outputs(&self.dir.path().join("cpu"), &out, what);
        }
    }

    #[test]
    fn kernel_and_aclnn_paths_with_many_chunks_give_the_cpu_bytes() {
        let job = BigJob::with_cpu_outputs();
        for (name, emu, path) in configs() {
            let b = AscendBackend::with_api(emu.api(), opts(path, 20_000)).unwrap();
            job.run_as_cpu(name, &b, 2, name);
            drop(b);
            assert!(
                emu.violations().is_empty(),
                "{name}: {:?}",
                emu.violations()
            );
        }
    }

    #[test]
    fn device_out_of_memory_spills_and_shrinks_stages_with_the_same_bytes() {
        let job = BigJob::with_cpu_outputs();
        // 200 KiB of HBM: 8 MiB stages do not fit (they shrink), and the
        // larger tensors do not either (they spill to host memory).
        let emu = Emulator::new();
        emu.configure(0, |c| c.memory = 200 << 10);
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 8 << 20)).unwrap();
        assert!(
            b.stage_bytes() < 8 << 20 && b.stage_bytes() >= 64 << 10,
            "{}",
            b.stage_bytes()
        );
        job.run_as_cpu("small", &b, 2, "spilled");
        let s = b.stats();
        assert!(s.spills > 0, "{s:?}");
        assert!(emu.stats().malloc_failures > 0);
        // An allocation budget: every allocation after the 3rd fails.
        let emu = Emulator::new();
        emu.configure(0, |c| c.malloc_budget = Some(3));
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 64 << 10)).unwrap();
        job.run_as_cpu("budget", &b, 2, "budget");
        assert!(b.stats().spills > 0);
        // A source cache allowed more than the device has: allocations for
        // the job's buffers fail until the cache is dropped (issue 15 item
        // 4's rule: the cache yields), and the bytes are the same. (Only
        // the column splits reach the device: row splits are written
        // straight from the mapped source.) One worker: with two, whether
        // a job buffer is asked for while the cache holds blocks depends on
        // timing, and so would the eviction.
        let emu = Emulator::new();
        emu.configure(0, |c| c.memory = 256 << 10);
        let o = AscendOptions {
            cache_bytes: Some(1 << 30),
            ..opts(CopyPath::Auto, 64 << 10)
        };
        let b = AscendBackend::with_api(emu.api(), o).unwrap();
        job.run_as_cpu("cache", &b, 1, "cache over the device");
        let s = b.stats().cache;
        assert!(s.evicted_bytes > 0 && s.uploaded_bytes > 0, "{s:?}");
        assert_eq!(s.held_bytes, 0, "{s:?}");
        drop(b);
        assert_clean(&emu);
    }

    #[test]
    fn a_device_fault_mid_job_leaves_no_output() {
        let job = BigJob::new();
        for n in [3u64, 25] {
            let emu = Emulator::new();
            emu.configure(0, |c| c.fail_op_at = Some(n));
            let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 64 << 10)).unwrap();
            let out = job.dir.path().join(format!("fault{n}"));
            let e = job.run(&out, &b, 2).unwrap_err();
            assert_eq!(e.kind(), reshard::ErrorKind::Device, "{e}");
            assert!(e.to_string().contains("injected failure"), "{e}");
            assert!(
                e.to_string().contains("ACL_ERROR_RT_AICORE_EXCEPTION"),
                "{e}"
            );
            let left = crate::util::fs::walk(&out);
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }

    #[test]
    fn without_inplace_copy_box_copies_fall_back_to_the_host_typed() {
        let emu = Emulator::without(&["reshard_box_copy", "aclnnInplaceCopy", "aclnnCast"]);
        emu.configure(0, |c| c.memcpy2d_d2d = false);
        let b = AscendBackend::with_api(emu.api(), opts(CopyPath::Auto, 4096)).unwrap();
        let c = BoxCopy {
            src_offset: vec![1, 2],
            extent: vec![3, 5],
            dst_shape: vec![3, 5],
            ..BoxCopy::whole(&[4, 8], DType::F32, DType::F32)
        };
        let src: Vec<u8> = (0..128).collect();
        let want = cpu_result(&c, &src, &[0; 60]);
        assert_eq!(device_result(&b, &c, &src, &[0; 60], true), want);
        let s = b.stats();
        assert!(s.paths.contains_key("host"), "{s:?}");
        assert!(
            s.fallbacks
                .iter()
                .any(|f| f.contains("aclnnInplaceCopy is unsupported on this CANN")),
            "{s:?}"
        );
        assert!(
            s.fallbacks.iter().any(|f| f.contains("aclrtMemcpy2dAsync")),
            "{s:?}"
        );
    }

    #[test]
    fn no_cann_is_a_clear_error() {
        // No CANN on this machine: the real loader says so, typed.
        let e = ascendcl_sys::sys::load::load(&[])
            .err()
            .expect("no CANN here");
        assert!(e.to_string().contains("CANN is not installed"), "{e}");
        let e = reshard::backend::ascend::device_error(e.into());
        assert!(
            matches!(
                e,
                Error::Device {
                    kind: DeviceErrorKind::Unavailable,
                    ..
                }
            ),
            "{e}"
        );
        // A device that does not exist.
        let emu = Emulator::new();
        let e = AscendBackend::with_api(
            emu.api(),
            AscendOptions {
                device: 99,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), reshard::ErrorKind::Device, "{e}");
        assert!(e.to_string().contains("no Ascend device 99"), "{e}");
    }

    // ---- the emulator's rules, each shown firing ----

    /// A context on device 0 of a fresh machine.
    /// Raw `aclrtMemcpy` of `n` bytes (`destMax` = `count` = `n`).
    ///
    /// # Safety
    /// Both ends hold `n` bytes (or the call is one the emulator refuses
    /// before touching memory).
    unsafe fn memcpy(
        api: &Api,
        dst: *mut c_void,
        src: *const c_void,
        n: usize,
        kind: acl::aclrtMemcpyKind,
    ) -> acl::aclError {
        (api.aclrtMemcpy)(dst, n, src, n, kind)
    }

    /// Raw `aclrtMemcpyAsync` of `n` bytes on `stream`, as [`memcpy`].
    ///
    /// # Safety
    /// As [`memcpy`].
    unsafe fn memcpy_async(
        api: &Api,
        dst: *mut c_void,
        src: *const c_void,
        n: usize,
        kind: acl::aclrtMemcpyKind,
        stream: acl::aclrtStream,
    ) -> acl::aclError {
        (api.aclrtMemcpyAsync)(dst, n, src, n, kind, stream)
    }

    fn machine() -> (Emulator, &'static Api, std::sync::Arc<Context>) {
        let emu = Emulator::new();
        let api = emu.api();
        let ctx = Context::new(api, 0).unwrap();
        (emu, api, ctx)
    }

    fn fired(emu: &Emulator, text: &str) -> bool {
        emu.violations().iter().any(|v| v.contains(text))
    }

    /// No emulator rule fired.
    fn assert_clean(emu: &Emulator) {
        assert!(emu.violations().is_empty(), "{:?}", emu.violations());
    }

    #[test]
    fn rule_executor_single_use_and_workspace() {
        let (emu, api, ctx) = machine();
        let s = Stream::new(&ctx).unwrap();
        let m = DeviceMem::new(&ctx, 64).unwrap();
        let t = Tensor::contiguous(api, acl::ACL_FLOAT, &[4], m.ptr()).unwrap();
        let u = Tensor::contiguous(api, acl::ACL_FLOAT, &[4], m.at(16)).unwrap();
        let (mut ws, mut ex) = (0u64, std::ptr::null_mut());
        let p1 = api.aclnnInplaceCopyGetWorkspaceSize.unwrap();
        let p2 = api.aclnnInplaceCopy.unwrap();
        // SAFETY: live descriptors, out-pointers.
        unsafe {
            assert_eq!(p1(u.raw(), t.raw(), &mut ws, &mut ex), 0);
            assert_eq!(p2(std::ptr::null_mut(), ws, ex, s.raw()), 0);
            assert_eq!(
                p2(std::ptr::null_mut(), ws, ex, s.raw()),
                acl::ACLNN_ERR_PARAM_INVALID
            );
        }
        assert!(fired(&emu, "single use"));
        let msg = ascendcl_sys::result::recent_message(api).unwrap();
        assert!(msg.contains("single use"), "{msg}");
        // Shapes that differ are refused in phase 1.
        let v = Tensor::new(api, acl::ACL_FLOAT, &[2], &[2], 0, &[4], m.ptr()).unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                p1(u.raw(), v.raw(), &mut ws, &mut ex),
                acl::ACLNN_ERR_PARAM_INVALID
            );
        }
        // A cast needs a workspace here; none given.
        let w = Tensor::new(api, acl::ACL_FLOAT, &[4], &[1], 0, &[4], m.ptr()).unwrap();
        let x = Tensor::contiguous(api, acl::ACL_FLOAT16, &[4], m.at(32)).unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(p1(x.raw(), w.raw(), &mut ws, &mut ex), 0);
            assert!(ws > 0);
            assert_eq!(
                p2(std::ptr::null_mut(), 0, ex, s.raw()),
                acl::ACLNN_ERR_PARAM_INVALID
            );
        }
        assert!(fired(&emu, "needs a device workspace"));
        s.synchronize().unwrap();
    }

    #[test]
    fn rule_view_bounds_rank_and_format() {
        let (emu, api, ctx) = machine();
        let m = DeviceMem::new(&ctx, 64).unwrap();
        assert!(Tensor::new(api, acl::ACL_FLOAT, &[4], &[2], 1, &[8], m.ptr()).is_ok());
        assert!(Tensor::new(api, acl::ACL_FLOAT, &[4], &[2], 2, &[8], m.ptr()).is_err());
        assert!(fired(&emu, "reaches element 8 of a storage of 8"));
        assert!(Tensor::new(api, acl::ACL_FLOAT, &[32], &[1], 0, &[32], m.ptr()).is_err());
        assert!(fired(&emu, "not inside a live device allocation"));
        assert!(Tensor::new(api, acl::ACL_FLOAT, &[1; 9], &[1; 9], 0, &[1], m.ptr()).is_err());
        assert!(fired(&emu, "rank 9 > 8"));
        // SAFETY: a raw call with a wrong format (offset/format swapped).
        let p = unsafe {
            (api.aclCreateTensor)(
                [4i64].as_ptr(),
                1,
                acl::ACL_FLOAT,
                [1i64].as_ptr(),
                2,
                acl::aclFormat(0),
                [16i64].as_ptr(),
                1,
                m.ptr(),
            )
        };
        assert!(p.is_null());
        assert!(fired(&emu, "did offset and format swap"));
    }

    #[test]
    fn rule_alignment_memcpy2d_limits_and_kinds() {
        let (emu, api, ctx) = machine();
        let s = Stream::new(&ctx).unwrap();
        let (a, b) = (
            DeviceMem::new(&ctx, 256).unwrap(),
            DeviceMem::new(&ctx, 256).unwrap(),
        );
        // SAFETY: device ranges inside the allocations.
        let code = unsafe {
            memcpy_async(
                api,
                b.at(1),
                a.ptr(),
                64,
                acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                s.raw(),
            )
        };
        assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
        assert!(fired(&emu, "64-byte aligned"));
        // 2-D copies: a row wider than its pitch, then too many rows.
        for ([dpitch, spitch, width, height], why) in [
            ([8, 16, 12, 4], "width 12 must be ≤ dpitch 8"),
            ([1, 1, 1, 6 << 20], "height 6291456"),
        ] {
            // SAFETY: as above.
            let code = unsafe {
                (api.aclrtMemcpy2dAsync)(
                    b.ptr(),
                    dpitch,
                    a.ptr(),
                    spitch,
                    width,
                    height,
                    acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                    s.raw(),
                )
            };
            assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
            assert!(fired(&emu, why), "{why}");
        }
        // A host pointer passed as a device one.
        let host = [0u8; 64];
        // SAFETY: as above.
        let code = unsafe {
            memcpy_async(
                api,
                b.ptr(),
                host.as_ptr().cast(),
                64,
                acl::ACL_MEMCPY_DEVICE_TO_DEVICE,
                s.raw(),
            )
        };
        assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
        assert!(fired(&emu, "wrong memcpy kind"));
        s.synchronize().unwrap();
    }

    #[test]
    fn rule_missing_synchronize_is_caught() {
        let (emu, api, ctx) = machine();
        let (s1, s2) = (Stream::new(&ctx).unwrap(), Stream::new(&ctx).unwrap());
        let m = DeviceMem::new(&ctx, 128).unwrap();
        let mut pinned = safe::PinnedHost::new(&ctx, 128).unwrap();
        pinned.as_mut_slice().fill(7);
        // SAFETY: pinned source, device destination.
        unsafe {
            assert_eq!(
                memcpy_async(
                    api,
                    m.ptr(),
                    pinned.ptr(),
                    128,
                    acl::ACL_MEMCPY_HOST_TO_DEVICE,
                    s1.raw()
                ),
                0
            );
        }
        // Reading it back synchronously before synchronising s1.
        let mut out = [0u8; 128];
        // SAFETY: as above.
        let code = unsafe {
            memcpy(
                api,
                out.as_mut_ptr().cast(),
                m.ptr(),
                128,
                acl::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
        assert!(fired(&emu, "synchronize the stream first"));
        // Another stream writing it with no event in between.
        // SAFETY: as above.
        let code = unsafe {
            memcpy_async(
                api,
                m.ptr(),
                pinned.ptr(),
                128,
                acl::ACL_MEMCPY_HOST_TO_DEVICE,
                s2.raw(),
            )
        };
        assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
        assert!(fired(&emu, "no event ordering them"));
        // With an event it is fine.
        let e = safe::Event::new(&ctx).unwrap();
        e.record(&s1).unwrap();
        s2.wait(&e).unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                memcpy_async(
                    api,
                    m.ptr(),
                    pinned.ptr(),
                    128,
                    acl::ACL_MEMCPY_HOST_TO_DEVICE,
                    s2.raw()
                ),
                0
            );
        }
        // Freeing memory a queued op uses.
        // SAFETY: raw free of a live allocation (then done properly below).
        let code = unsafe { (api.aclrtFree)(m.ptr()) };
        assert_eq!(code, acl::ACL_ERROR_INVALID_PARAM);
        assert!(fired(&emu, "synchronize before freeing"));
        s2.synchronize().unwrap();
        s1.synchronize().unwrap();
        // SAFETY: as above, now synchronised.
        let code = unsafe {
            memcpy(
                api,
                out.as_mut_ptr().cast(),
                m.ptr(),
                128,
                acl::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        assert_eq!(code, 0);
        assert_eq!(out, [7u8; 128]);
    }

    #[test]
    fn rule_descriptors_live_until_the_op_ran_and_contexts_per_thread() {
        let (emu, api, ctx) = machine();
        let s = Stream::new(&ctx).unwrap();
        let m = DeviceMem::new(&ctx, 64).unwrap();
        let (mut ws, mut ex) = (0u64, std::ptr::null_mut());
        {
            let t = Tensor::contiguous(api, acl::ACL_INT32, &[4], m.ptr()).unwrap();
            let u = Tensor::contiguous(api, acl::ACL_INT32, &[4], m.at(32)).unwrap();
            // SAFETY: live descriptors.
            unsafe {
                assert_eq!(
                    api.aclnnInplaceCopyGetWorkspaceSize.unwrap()(
                        u.raw(),
                        t.raw(),
                        &mut ws,
                        &mut ex
                    ),
                    0
                );
                assert_eq!(
                    api.aclnnInplaceCopy.unwrap()(std::ptr::null_mut(), ws, ex, s.raw()),
                    0
                );
            }
        } // destroyed here, before the stream ran the op
        assert!(s.synchronize().is_err());
        assert!(fired(&emu, "descriptors was destroyed"));
        // A thread with no current context.
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut p = std::ptr::null_mut();
                // SAFETY: out-pointer.
                let code = unsafe { (api.aclrtMalloc)(&mut p, 64, acl::ACL_MEM_MALLOC_HUGE_FIRST) };
                assert_eq!(code, acl::ACL_ERROR_RT_CONTEXT_NULL);
                ctx.bind().unwrap();
                assert!(DeviceMem::new(&ctx, 64).is_ok());
            });
        });
    }

    #[test]
    fn rule_leaks_at_reset_and_finalize() {
        let emu = Emulator::new();
        let api = emu.api();
        let ctx = Context::new(api, 1).unwrap();
        let mut p = std::ptr::null_mut();
        // SAFETY: out-pointer; the allocation is leaked on purpose.
        assert_eq!(
            unsafe { (api.aclrtMalloc)(&mut p, 64, acl::ACL_MEM_MALLOC_HUGE_FIRST) },
            0
        );
        drop(ctx);
        assert!(fired(
            &emu,
            "leaks at aclrtResetDevice(1): 1 device allocation(s)"
        ));
        let ctx = Context::new(api, 2).unwrap();
        let s = Stream::new(&ctx).unwrap();
        std::mem::forget(s);
        let e = safe::finalize(api).unwrap_err();
        assert!(e.to_string().contains("leaks at aclFinalize"), "{e}");
        assert!(fired(&emu, "1 stream(s)"));
        std::mem::forget(ctx);
    }

    /// Runs `f(rank, ctx, comm)` on `n` threads, one device each.
    fn ranks<T: Send>(
        emu: &Emulator,
        n: u32,
        f: impl Fn(u32, &std::sync::Arc<Context>, &safe::Comm) -> T + Sync,
    ) -> Vec<ascendcl_sys::Result<T>> {
        let api = emu.api();
        let root = {
            let ctx = Context::new(api, 0).unwrap();
            let r = safe::Comm::root_info(&ctx).unwrap();
            drop(ctx);
            r
        };
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let f = &f;
                    s.spawn(move || {
                        let ctx = Context::new(api, r as i32)?;
                        let comm = safe::Comm::init(&ctx, n, &root, r)?;
                        Ok(f(r, &ctx, &comm))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Which side of a point-to-point transfer [`hccl_p2p`] calls.
    #[derive(Clone, Copy)]
    enum P2p {
        Send,
        Recv,
    }

    /// `HcclSend` (of `m` to `peer`) or `HcclRecv` (into `m` from `peer`) of
    /// `count` bytes on `s`.
    ///
    /// # Safety
    /// `m` holds at least `count` bytes.
    unsafe fn hccl_p2p(
        api: &Api,
        op: P2p,
        m: &DeviceMem,
        count: u64,
        peer: u32,
        comm: &safe::Comm,
        s: &Stream,
    ) -> acl::HcclResult {
        let call = match op {
            P2p::Send => api.HcclSend,
            P2p::Recv => api.HcclRecv,
        };
        call.unwrap()(
            m.ptr(),
            count,
            acl::HCCL_DATA_TYPE_UINT8,
            peer,
            comm.raw(),
            s.raw(),
        )
    }

    /// `HcclAllGather` of `count` bytes of `send` into `recv` on `s`.
    ///
    /// # Safety
    /// `send` holds `count` bytes and `recv` `count` × ranks (or the call is
    /// one the emulator refuses before touching memory).
    unsafe fn hccl_all_gather(
        api: &Api,
        send: &DeviceMem,
        recv: &DeviceMem,
        count: u64,
        comm: &safe::Comm,
        s: &Stream,
    ) -> acl::HcclResult {
        api.HcclAllGather.unwrap()(
            send.ptr(),
            recv.ptr(),
            count,
            acl::HCCL_DATA_TYPE_UINT8,
            comm.raw(),
            s.raw(),
        )
    }

    fn dev_with(ctx: &std::sync::Arc<Context>, bytes: &[u8]) -> DeviceMem {
        let m = DeviceMem::new(ctx, bytes.len()).unwrap();
        // SAFETY: host source, device destination of the same size.
        let code = unsafe {
            memcpy(
                ctx.api(),
                m.ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                acl::ACL_MEMCPY_HOST_TO_DEVICE,
            )
        };
        assert_eq!(code, 0);
        m
    }

    fn host_of(ctx: &std::sync::Arc<Context>, m: &DeviceMem) -> Vec<u8> {
        let mut out = vec![0u8; m.len()];
        // SAFETY: as above.
        let code = unsafe {
            memcpy(
                ctx.api(),
                out.as_mut_ptr().cast(),
                m.ptr(),
                m.len(),
                acl::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        assert_eq!(code, 0);
        out
    }

    #[test]
    fn hccl_collectives_and_point_to_point_across_threads() {
        let emu = Emulator::new();
        let api = emu.api();
        let out = ranks(&emu, 3, |r, ctx, comm| {
            let s = Stream::new(ctx).unwrap();
            let send = dev_with(ctx, &[r as u8; 4]);
            let recv = DeviceMem::new(ctx, 12).unwrap();
            let bc = dev_with(ctx, &if r == 1 { [9u8; 5] } else { [0u8; 5] });
            // AlltoAllV: rank r sends j+1 bytes of value 10r+j to rank j.
            let pieces: Vec<u8> = (0..3u8)
                .flat_map(|j| vec![10 * r as u8 + j; j as usize + 1])
                .collect();
            let a2a_send = dev_with(ctx, &pieces);
            let a2a_recv = DeviceMem::new(ctx, 3 * (r as usize + 1)).unwrap();
            let (sc, sd): (Vec<u64>, Vec<u64>) = ((1..=3).collect(), vec![0, 1, 3]);
            let rc: Vec<u64> = vec![r as u64 + 1; 3];
            let rd: Vec<u64> = (0..3).map(|j| j * (r as u64 + 1)).collect();
            let p2p = dev_with(ctx, &[r as u8 + 100; 8]);
            // SAFETY: device buffers of the right sizes, host count arrays.
            unsafe {
                assert_eq!(
                    hccl_all_gather(api, &send, &recv, 4, comm, &s),
                    acl::HCCL_SUCCESS
                );
                assert_eq!(
                    api.HcclBroadcast.unwrap()(
                        bc.ptr(),
                        5,
                        acl::HCCL_DATA_TYPE_UINT8,
                        1,
                        comm.raw(),
                        s.raw()
                    ),
                    acl::HCCL_SUCCESS
                );
                assert_eq!(
                    api.HcclAlltoAllV.unwrap()(
                        a2a_send.ptr(),
                        sc.as_ptr().cast(),
                        sd.as_ptr().cast(),
                        acl::HCCL_DATA_TYPE_UINT8,
                        a2a_recv.ptr(),
                        rc.as_ptr().cast(),
                        rd.as_ptr().cast(),
                        acl::HCCL_DATA_TYPE_UINT8,
                        comm.raw(),
                        s.raw()
                    ),
                    acl::HCCL_SUCCESS
                );
                // A ring: send to r+1, receive from r-1 (rank 0 receives first).
                let (next, prev) = ((r + 1) % 3, (r + 2) % 3);
                let ring = [(P2p::Send, &send, next), (P2p::Recv, &p2p, prev)];
                for (op, m, peer) in if r == 0 { [ring[1], ring[0]] } else { ring } {
                    assert_eq!(hccl_p2p(api, op, m, 4, peer, comm, &s), acl::HCCL_SUCCESS);
                }
            }
            s.synchronize().unwrap();
            (
                host_of(ctx, &recv),
                host_of(ctx, &bc),
                host_of(ctx, &a2a_recv),
                host_of(ctx, &p2p)[..4].to_vec(),
            )
        });
        for (r, o) in out.into_iter().enumerate() {
            let (gathered, bc, a2a, ring) = o.unwrap();
            assert_eq!(gathered, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
            assert_eq!(bc, [9; 5]);
            let want: Vec<u8> = (0..3u8)
                .flat_map(|j| vec![10 * j + r as u8; r + 1])
                .collect();
            assert_eq!(a2a, want, "rank {r}");
            assert_eq!(ring, [((r + 2) % 3) as u8; 4]);
        }
        assert_clean(&emu);
    }

    #[test]
    fn rule_unpaired_send_recv_and_timeouts() {
        let emu = Emulator::new();
        for d in 0..2 {
            emu.configure(d, |c| c.hccl_timeout = Duration::from_secs(2));
        }
        let api = emu.api();
        // Sizes differ: 4 bytes sent, 6 expected.
        let r = ranks(&emu, 2, |r, ctx, comm| {
            let s = Stream::new(ctx).unwrap();
            let m = DeviceMem::new(ctx, 8).unwrap();
            // SAFETY: device buffer of 8 bytes.
            unsafe {
                if r == 0 {
                    hccl_p2p(api, P2p::Send, &m, 4, 1, comm, &s);
                } else {
                    hccl_p2p(api, P2p::Recv, &m, 6, 0, comm, &s);
                }
            }
            s.synchronize().map_err(|e| e.to_string())
        });
        assert!(r.iter().all(|x| x.as_ref().unwrap().is_err()), "{r:?}");
        assert!(fired(
            &emu,
            "unpaired HcclSend/HcclRecv: rank 0 sends 4 bytes, rank 1 receives 6"
        ));
        // A rank that dies before the collective: the other times out,
        // with HCCL_E_TIMEOUT as the communicator's asynchronous error.
        let r = ranks(&emu, 2, |r, ctx, comm| {
            if r == 1 {
                return Ok(()); // dies
            }
            let s = Stream::new(ctx).unwrap();
            let (a, b) = (
                DeviceMem::new(ctx, 4).unwrap(),
                DeviceMem::new(ctx, 8).unwrap(),
            );
            // SAFETY: device buffers of the right sizes.
            unsafe { hccl_all_gather(api, &a, &b, 4, comm, &s) };
            let e = s.synchronize().unwrap_err();
            assert!(comm.async_error().unwrap_err().is_timeout());
            Err(e)
        });
        let e = r[0].as_ref().unwrap().as_ref().unwrap_err();
        assert!(
            e.is_timeout() && e.to_string().contains("rank(s) [1] did not take part"),
            "{e}"
        );
        // AllGather with too small a receive buffer.
        let r = ranks(&emu, 2, |_, ctx, comm| {
            let s = Stream::new(ctx).unwrap();
            let (a, b) = (
                DeviceMem::new(ctx, 4).unwrap(),
                DeviceMem::new(ctx, 4).unwrap(),
            );
            // SAFETY: the call is refused before touching memory.
            unsafe { hccl_all_gather(api, &a, &b, 4, comm, &s) }
        });
        assert!(
            r.iter()
                .all(|x| matches!(x, Ok(c) if *c == acl::HCCL_E_PARA)),
            "{r:?}"
        );
        assert!(fired(&emu, "sendCount × rankSize"));
        // A rank that never joins: init times out.
        let ctx = Context::new(api, 0).unwrap();
        let root = safe::Comm::root_info(&ctx).unwrap();
        let e = safe::Comm::init(&ctx, 2, &root, 0).err().unwrap();
        assert!(e.is_timeout(), "{e}");
    }

    #[test]
    fn smoke_the_descriptor_ops_cat_and_slice() {
        let (emu, api, ctx) = machine();
        let s = Stream::new(&ctx).unwrap();
        let a = dev_with(&ctx, &f32s(&[1.0, 2.0, 3.0, 4.0]));
        let b = dev_with(&ctx, &f32s(&[5.0, 6.0]));
        let out = DeviceMem::new(&ctx, 24).unwrap();
        let ta = Tensor::contiguous(api, acl::ACL_FLOAT, &[2, 2], a.ptr()).unwrap();
        let tb = Tensor::contiguous(api, acl::ACL_FLOAT, &[1, 2], b.ptr()).unwrap();
        let to = Tensor::contiguous(api, acl::ACL_FLOAT, &[3, 2], out.ptr()).unwrap();
        let list = safe::TensorList::new(api, vec![ta, tb]).unwrap();
        let ws = DeviceMem::new(&ctx, 4096).unwrap();
        safe::run_op(
            api,
            "aclnnCat",
            |w, x| unsafe { api.aclnnCatGetWorkspaceSize.unwrap()(list.raw(), 0, to.raw(), w, x) },
            api.aclnnCat.unwrap(),
            &s,
            |_| Ok(ws.ptr()),
        )
        .unwrap();
        let sl = DeviceMem::new(&ctx, 8).unwrap();
        let ts = Tensor::contiguous(api, acl::ACL_FLOAT, &[3, 2], out.ptr()).unwrap();
        let tsl = Tensor::contiguous(api, acl::ACL_FLOAT, &[1, 2], sl.ptr()).unwrap();
        safe::run_op(
            api,
            "aclnnSlice",
            |w, x| unsafe {
                api.aclnnSliceGetWorkspaceSize.unwrap()(ts.raw(), 0, 1, 3, 2, tsl.raw(), w, x)
            },
            api.aclnnSlice.unwrap(),
            &s,
            |_| Ok(ws.ptr()),
        )
        .unwrap();
        s.synchronize().unwrap();
        assert_eq!(host_of(&ctx, &out), f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(host_of(&ctx, &sl), f32s(&[3.0, 4.0]));
        assert_clean(&emu);
        let _: *mut c_void = ws.ptr();
    }

    /// Runs `body` on three threads, one per rank: rank `r` opens the
    /// Ascend backend on the device `place(r)` gives (an emulator's API and
    /// a device id) and joins a three-rank HCCL group through `info`;
    /// returns what each rank's `body` returned.
    fn on_three_hccl_ranks<T: Send>(
        info: &reshard::comm::RootInfo,
        place: impl Fn(usize) -> (&'static Api, i32),
        body: impl Fn(usize, &AscendBackend, &reshard::comm::hccl::HcclCommunicator) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let ((api, device), body) = (place(r), &body);
                    s.spawn(move || {
                        let b = AscendBackend::with_api(
                            api,
                            AscendOptions {
                                device,
                                ..opts(CopyPath::Auto, 1 << 16)
                            },
                        )
                        .unwrap();
                        let c = reshard::comm::hccl::HcclCommunicator::new(&b, r, 3, info).unwrap();
                        body(r, &b, &c)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn hccl_ranks_exchange_device_to_device_and_match_one_process() {
        use reshard::comm::RootInfo;
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = crate::util::distributed::sharded(root, DType::F16);
        let single = root.join("single");
        let p = crate::util::distributed::the_plan(
            &shards,
            &mp4,
            &mp2,
            &single,
            true,
            FileFormat::Ckpt,
        );
        exec::execute(&p, &CpuBackend::new(1), &Default::default()).unwrap();
        let multi = root.join("multi");
        let p =
            crate::util::distributed::the_plan(&shards, &mp4, &mp2, &multi, true, FileFormat::Ckpt);
        let emu = Emulator::new();
        let info = RootInfo::File(root.join("hccl_root_info"), Duration::from_secs(30));
        let reports = on_three_hccl_ranks(
            &info,
            |r| (emu.api(), r as i32),
            |_, b, c| reshard::exec::execute_on(&p, b, c, &Default::default()).unwrap(),
        );
        assert!(reports.iter().map(|r| r.1.bytes_received).sum::<u64>() > 0);
        let (a, b) = (
            crate::util::fs::contents(&single),
            crate::util::fs::contents(&multi),
        );
        assert!(a == b && a.len() == 2, "HCCL-distributed output differs");
        assert_clean(&emu);
        assert!(
            emu.stats().ops.contains_key("HcclSend"),
            "{:?}",
            emu.stats().ops
        );
    }

    /// Ranks on two emulated machines (as in two processes: neither sees
    /// the other's devices or communicators) meet through the emulated
    /// network's folder, exchange device to device, and write what one
    /// process writes.
    #[test]
    fn hccl_ranks_on_two_machines_meet_through_the_emulated_network() {
        use reshard::comm::RootInfo;
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = crate::util::distributed::sharded(root, DType::BF16);
        let plan = |out: &std::path::Path| {
            crate::util::distributed::the_plan(&shards, &mp4, &mp2, out, true, FileFormat::Ckpt)
        };
        let single = root.join("single");
        exec::execute(&plan(&single), &CpuBackend::new(1), &Default::default()).unwrap();
        let multi = root.join("multi");
        let p = plan(&multi);
        let net = root.join("net");
        std::fs::create_dir(&net).unwrap();
        let machines = [Emulator::new(), Emulator::new()];
        for m in &machines {
            m.set_hccl_network(&net);
        }
        let info = RootInfo::File(root.join("hccl_root_info"), Duration::from_secs(30));
        let reports = on_three_hccl_ranks(
            &info,
            |r| (machines[r / 2].api(), (r % 2) as i32),
            |_, b, c| reshard::exec::execute_on(&p, b, c, &Default::default()).unwrap(),
        );
        assert!(reports.iter().map(|r| r.1.bytes_received).sum::<u64>() > 0);
        let (a, b) = (
            crate::util::fs::contents(&single),
            crate::util::fs::contents(&multi),
        );
        assert!(a == b && a.len() == 2, "output over the network differs");
        for m in &machines {
            assert!(m.violations().is_empty(), "{:?}", m.violations());
            assert!(m.stats().ops.contains_key("HcclAllGather"));
        }
        // The last rank out removed the group's folder.
        assert_eq!(std::fs::read_dir(&net).unwrap().count(), 0);
    }

    /// Ranks that disagree on the job's size fail at once, on both sides.
    #[test]
    fn hccl_ranks_with_different_world_sizes_fail_to_join() {
        use reshard::comm::hccl::HcclCommunicator;
        use reshard::comm::RootInfo;
        let dir = tempdir();
        let net = dir.path().join("net");
        std::fs::create_dir(&net).unwrap();
        let machines = [Emulator::new(), Emulator::new()];
        for m in &machines {
            m.set_hccl_network(&net);
        }
        let info = RootInfo::File(dir.path().join("root_info"), Duration::from_secs(30));
        let t = std::time::Instant::now();
        let errors: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = [(0, 2), (1, 3)]
                .into_iter()
                .map(|(r, n)| {
                    let (info, api) = (&info, machines[r].api());
                    s.spawn(move || {
                        let b =
                            AscendBackend::with_api(api, opts(CopyPath::Auto, 1 << 16)).unwrap();
                        match HcclCommunicator::new(&b, r, n, info) {
                            Ok(_) => "joined".to_string(),
                            Err(e) => e.to_string(),
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        for e in &errors {
            assert!(e.contains("nRanks"), "{e}");
        }
    }

    #[test]
    fn hccl_timeout_when_a_rank_dies_fails_every_rank_and_leaves_no_file() {
        use reshard::comm::RootInfo;
        let dir = tempdir();
        let root = dir.path();
        let (shards, mp4, mp2) = crate::util::distributed::sharded(root, DType::F32);
        let out = root.join("out");
        let p =
            crate::util::distributed::the_plan(&shards, &mp4, &mp2, &out, false, FileFormat::Ckpt);
        let emu = Emulator::new();
        for d in 0..3 {
            emu.configure(d, |c| c.hccl_timeout = Duration::from_secs(2));
        }
        let info = RootInfo::File(root.join("hccl_root_info"), Duration::from_secs(30));
        let results = on_three_hccl_ranks(
            &info,
            |r| (emu.api(), r as i32),
            |r, b, c| {
                // Rank 2 dies after joining.
                (r != 2).then(|| reshard::exec::execute_on(&p, b, c, &Default::default()))
            },
        );
        for r in results.iter().flatten() {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(
                    e.root(),
                    Error::Device {
                        kind: DeviceErrorKind::Timeout,
                        ..
                    }
                ),
                "{e}"
            );
        }
        assert!(crate::util::fs::contents(&out).is_empty());
    }
}
