//! `reshard bench` smoke test: a tiny model through every step. Not a timed
//! test — it checks the report, not the speed.

use std::process::Command;

use crate::util::{reshard_bin, tempdir};

#[test]
fn bench_runs_every_step_and_reports_json() {
    let dir = tempdir();
    let out = Command::new(reshard_bin())
        .args([
            "bench",
            "--params",
            "12M",
            "--lora-rank",
            "8",
            "--json",
            "--dir",
        ])
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    for s in steps {
        assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(s["seconds"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["fraction_of_copy_bound"].as_f64().unwrap() > 0.0, "{s}");
    }
    assert!(report["copy_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["model"]["largest"].as_u64().unwrap() > 0);
}
