//! `reshard bench` smoke tests: a tiny model through every step. Not timed
//! tests — they check the report's structure and sanity, not the speed.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::util::{mindspore_python, reshard_bin, tempdir};

const ALL: [&str; 5] = ["split", "transform", "merge", "convert", "lora"];

/// Runs `reshard bench --params 4M --json --dir DIR ARGS…`; returns the report.
fn bench(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(reshard_bin())
        .args([
            "bench",
            "--params",
            "4M",
            "--lora-rank",
            "8",
            "--json",
            "--dir",
        ])
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    crate::util::assert_success(&out);
    serde_json::from_slice(&out.stdout).expect("bench --json prints JSON")
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

/// Checks one step's figures; `repeat` samples of each kind.
fn check_step(s: &Value, repeat: usize) {
    let name = s["step"].as_str().unwrap();
    assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["files"].as_u64().unwrap() > 0, "{s}");
    for kind in ["warm", "fsync"] {
        let t = &s[kind];
        let what = format!("{name} {kind}");
        positive(&t["seconds"], &what);
        positive(&t["gb_per_s"], &what);
        positive(&t["copy_bound_seconds"], &what);
        positive(&t["fraction_of_copy_bound"], &what);
        let samples = t["samples"].as_array().unwrap();
        assert_eq!(samples.len(), repeat, "{what}");
        // One copy of the model file right before each run: the step's bound.
        let copies = t["copy_samples"].as_array().unwrap();
        assert_eq!(copies.len(), repeat, "{what}");
        positive(&t["copy_bound_gb_per_s"], &what);
        for x in samples {
            positive(x, &what);
        }
    }
    assert!(s["peak_anon_mib"].as_f64().unwrap() >= 0.0, "{s}");
}

/// Everything left in the working directory is a strategy file: every
/// checkpoint the steps wrote was removed.
fn assert_cleaned(dir: &Path) {
    let left: Vec<std::path::PathBuf> = crate::util::fs::walk(dir)
        .into_iter()
        .filter(|path| {
            !path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n.to_string_lossy().starts_with("s_"))
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bench_runs_every_step_and_reports_json() {
    let dir = tempdir();
    let work = dir.path().join("b");
    let report = bench(&work, &["--repeat", "1"]);
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ALL);
    for s in steps {
        check_step(s, 1);
        assert!(s["mindspore"].is_null() && s["speedup"].is_null(), "{s}");
    }
    for bound in ["copy_bound_warm", "copy_bound_fsync"] {
        positive(&report[bound]["gb_per_s"], bound);
        assert_eq!(report[bound]["samples"].as_array().unwrap().len(), 1);
    }
    assert_eq!(report["repeat"], 1);
    assert_eq!(report["cold"], false);
    assert_eq!(report["dtype"], "BFloat16");
    assert!(report["model"]["largest"].as_u64().unwrap() > 0);
    assert_cleaned(&work);
}

#[test]
fn bench_times_selected_steps_and_makes_their_inputs() {
    // merge needs split's and transform's outputs: they are made untimed.
    let dir = tempdir();
    let work = dir.path().join("b");
    let report = bench(
        &work,
        &[
            "--steps",
            "merge,lora",
            "--dtype",
            "fp16",
            "--repeat",
            "2",
            "--cold",
        ],
    );
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ["merge", "lora"]);
    for s in steps {
        check_step(s, 2);
    }
    assert_eq!(report["dtype"], "Float16");
    // `--cold`: the runs with fsync started from the disk.
    assert_eq!(report["cold"], true);
    assert_cleaned(&work);
}

/// `--steps exchange`: the 8 → 4 transform as 4 ranks; each source file is
/// read by one rank, and what ranks send, others receive.
#[test]
fn bench_exchange_reports_bytes_per_rank() {
    let dir = tempdir();
    let work = dir.path().join("b");
    let report = bench(&work, &["--steps", "exchange", "--repeat", "1"]);
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    let s = &steps[0];
    check_step(s, 1);
    let ranks = s["exchange"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    let mut read: Vec<u64> = ranks
        .iter()
        .flat_map(|r| r["sources_read"].as_array().unwrap().clone())
        .map(|v| v.as_u64().unwrap())
        .collect();
    read.sort();
    assert_eq!(read, (0..8).collect::<Vec<_>>(), "{s}");
    let total = |k: &str| ranks.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    assert!(total("bytes_sent") > 0, "{s}");
    assert_eq!(total("bytes_sent"), total("bytes_received"), "{s}");
    assert!(total("bytes_read") > 0, "{s}");
    // Every receiving rank held what it received in its bounded inbox.
    for r in ranks
        .iter()
        .filter(|r| r["bytes_received"].as_u64().unwrap() > 0)
    {
        let peak = r["inbox_peak_bytes"].as_u64().unwrap();
        assert!(peak > 0 && peak <= 64 << 20, "{r}");
    }
    assert_cleaned(&work);
}

#[test]
fn bench_rejects_an_unknown_step() {
    let out = Command::new(reshard_bin())
        .args(["bench", "--steps", "split,copy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a bench step"));
}

#[test]
fn bench_vs_mindspore_times_every_step() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let dir = tempdir();
    let work = dir.path().join("b");
    let report = bench(
        &work,
        &[
            "--repeat",
            "1",
            "--vs-mindspore",
            "--python",
            python.to_str().unwrap(),
        ],
    );
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), ALL.len());
    for s in steps {
        let name = s["step"].as_str().unwrap();
        positive(&s["mindspore"]["seconds"], name);
        assert_eq!(s["mindspore"]["samples"].as_array().unwrap().len(), 1);
        positive(&s["speedup"], name);
    }
    assert_cleaned(&work);
}

/// `--backend` reaches every step: each backend the build has (with the
/// `ascend` feature, Ascend on the host emulator — emulated, not an NPU)
/// runs the whole bench in-process and says it did.
#[test]
fn bench_runs_every_step_on_each_backend() {
    use reshard::ops::bench::{bench, BenchOptions};
    let backends = std::iter::once((reshard::backend::BackendChoice::Cpu, "cpu"))
        .chain(crate::util::extra_backends());
    for (backend, label) in backends {
        let dir = tempdir();
        let report = bench(&BenchOptions {
            repeat: 1,
            lora_rank: 8,
            backend,
            ..BenchOptions::new(4_000_000, dir.path().join("b"))
        })
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        // The library runs every step, unify included (the command line's default list leaves it out).
        assert_eq!(
            report.steps.len(),
            reshard::ops::bench::BenchStepKind::ALL.len(),
            "{label}"
        );
        let want = label.split('-').next().unwrap();
        assert!(
            report.backend.to_lowercase().contains(want),
            "{label}: ran on {}",
            report.backend
        );
        for s in &report.steps {
            assert!(s.bytes > 0 && s.warm.seconds > 0.0, "{label}: {s:?}");
        }
    }
}

/// `--manifest-cost`: every run has a twin without manifests; the ratio is
/// the median of the pairs' ratios. The steps still hand their outputs on
/// (transform and merge read split's and transform's, with manifests).
#[test]
fn bench_manifest_cost_pairs_each_run_with_one_without_manifests() {
    let dir = tempdir();
    let work = dir.path().join("b");
    let report = bench(
        &work,
        &[
            "--steps",
            "split,transform,merge",
            "--repeat",
            "3",
            "--manifest-cost",
            "--hash-sources",
        ],
    );
    assert_eq!(report["manifest"], true);
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    for s in steps {
        check_step(s, 3);
        for kind in ["warm", "fsync"] {
            let cost = &s["manifest_cost"][kind];
            let samples = |v: &Value| -> Vec<f64> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| positive(x, "a sample"))
                    .collect()
            };
            let with = samples(&s[kind]["samples"]);
            let without = samples(&cost["samples_without"]);
            assert_eq!(without.len(), 3, "{s}");
            let mut ratios: Vec<f64> = with.iter().zip(&without).map(|(w, b)| w / b).collect();
            ratios.sort_by(f64::total_cmp);
            // (JSON numbers come back within an ulp, not bit for bit.)
            let ratio = positive(&cost["ratio"], "ratio");
            assert!((ratio - ratios[1]).abs() <= 1e-12 * ratio, "{s}");
            let mut sorted = without.clone();
            sorted.sort_by(f64::total_cmp);
            let median = positive(&cost["seconds_without"], "seconds without");
            assert!((median - sorted[1]).abs() <= 1e-12 * median, "{s}");
        }
    }
    assert_cleaned(&work);
    // Without the flag there is no such field.
    let plain = bench(&work, &["--steps", "split", "--repeat", "1"]);
    assert!(plain["steps"][0].get("manifest_cost").is_none());
}

#[test]
fn bench_manifest_cost_needs_manifests() {
    let dir = tempdir();
    for flag in ["--manifest-cost", "--hash-sources"] {
        let out = Command::new(reshard_bin())
            .args(["bench", "--params", "4M", "--no-manifest", flag, "--dir"])
            .arg(dir.path().join("b"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains("--no-manifest"), "{err}");
    }
    // The library refuses it too, naming the option.
    for (cost, hash) in [(true, false), (false, true)] {
        let e = reshard::ops::bench::bench(&reshard::ops::bench::BenchOptions {
            manifest: false,
            manifest_cost: cost,
            hash_sources: hash,
            ..reshard::ops::bench::BenchOptions::new(4_000_000, dir.path().join("c"))
        })
        .unwrap_err();
        assert_eq!(e.kind(), reshard::ErrorKind::Usage, "{e}");
        assert!(!dir.path().join("c").exists());
    }
}
