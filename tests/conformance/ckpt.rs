//! `.ckpt` and safetensors against MindSpore 2.10: our reader agrees with
//! `load_checkpoint` on every tensor, our writer's bytes equal
//! `save_checkpoint`'s, and MindSpore loads what we write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reshard::formats::ckpt::{
    crypt, Checkpoint, CkptWriter, EntryKind, ReadOptions, SplitMode, WriteOptions,
};
use reshard::formats::safetensors::SafetensorsFile;
use reshard::ops::rewrite::{rewrite, RewriteOptions};
use serde_json::{json, Value};

use crate::util::{mindspore_python, run_py, tempdir};

/// What MindSpore loaded for one entry (see `py/common.py::describe`).
fn describe_ckpt(ck: &Checkpoint) -> Vec<Value> {
    ck.entries()
        .iter()
        .map(|e| match &e.kind {
            EntryKind::Str => {
                json!({"name": e.name, "kind": "str", "value": ck.string_value(e).unwrap()})
            }
            EntryKind::Tensor(d) => {
                let bytes = ck.tensor_bytes(e);
                // MindSpore's loader turns dims [0] of a non-string into a scalar.
                let shape: Vec<i64> = if e.dims == [0] {
                    vec![]
                } else {
                    e.dims.clone()
                };
                json!({"name": e.name, "kind": "tensor", "dtype": d.to_string(), "shape": shape,
                       "nbytes": bytes.len(), "crc32": crc32fast::hash(&bytes)})
            }
            EntryKind::MapTensor(parts) => {
                let parts: Vec<Value> = parts
                    .iter()
                    .map(|p| {
                        let bytes: Vec<u8> = p.chunks.iter().flat_map(|r| ck.bytes()[r.clone()].to_vec()).collect();
                        json!({"dtype": p.type_name, "shape": p.dims, "crc32": crc32fast::hash(&bytes)})
                    })
                    .collect();
                json!({"name": e.name, "kind": "map", "parts": parts})
            }
        })
        .collect()
}

fn describe_st(f: &SafetensorsFile) -> Vec<Value> {
    let mut out: Vec<Value> = f
        .entries()
        .iter()
        .map(|e| {
            let bytes = f.bytes(e);
            json!({"name": e.name, "kind": "tensor", "dtype": e.dtype.to_string(), "shape": e.shape,
                   "nbytes": bytes.len(), "crc32": crc32fast::hash(bytes)})
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

fn sorted_by_name(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    v
}

fn read_options(options: &Value) -> ReadOptions {
    ReadOptions {
        decryption: options["key_hex"].as_str().map(|k| {
            (
                crypt::parse_key(&format!("hex:{k}")).unwrap(),
                options["mode"].as_str().unwrap().parse().unwrap(),
            )
        }),
        verify_crc: true,
    }
}

struct Generated {
    dir: tempfile::TempDir,
    manifest: BTreeMap<String, Value>,
}

impl Generated {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn generate(python: &Path, big: bool) -> Generated {
    let dir = tempdir();
    let out = dir.path().to_str().unwrap();
    let args: Vec<&str> = if big { vec![out, "--big"] } else { vec![out] };
    run_py(python, "ckpt_gen.py", &args);
    let manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    Generated { dir, manifest }
}

/// Our reader on every MindSpore-written file gives what `load_checkpoint` gives.
fn assert_reader_agrees(g: &Generated) {
    for (name, spec) in &g.manifest {
        let want: Vec<Value> = serde_json::from_value(spec["entries"].clone()).unwrap();
        let path = g.path(name);
        if name.ends_with(".safetensors") {
            let f = SafetensorsFile::open(&path, spec["options"]["crc"].as_bool().unwrap_or(false))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(describe_st(&f), sorted_by_name(want), "{name}");
        } else {
            let ck = Checkpoint::open(&path, &read_options(&spec["options"]))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(describe_ckpt(&ck), want, "{name}");
        }
    }
}

/// Reading a MindSpore file and writing it back gives the same bytes.
fn assert_writer_identical(g: &Generated, name: &str) {
    let spec = &g.manifest[name]["options"];
    let src = g.path(name);
    let ck = Checkpoint::open(&src, &read_options(spec)).unwrap();
    let out = g
        .dir
        .path()
        .join(format!("ours-{}", name.replace('/', "-")));
    let split = if spec["split"] == "rows" {
        SplitMode::Rows
    } else {
        SplitMode::Bytes
    };
    let mut w = CkptWriter::create(
        &out,
        WriteOptions {
            crc: ck.has_crc(),
            encryption: None,
            split,
        },
    )
    .unwrap();
    ck.copy_into(&mut w).unwrap();
    w.finish().unwrap();
    let (ours, theirs) = (std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    assert!(
        ours == theirs,
        "{name}: our bytes differ from MindSpore's ({} vs {} bytes)",
        ours.len(),
        theirs.len()
    );
    std::fs::remove_file(out).unwrap();
}

#[test]
fn ckpt_and_safetensors_match_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let g = generate(&python, false);
    assert_reader_agrees(&g);
    // Map tensors are reported, never dropped: rewriting one is refused.
    let err = rewrite(
        &g.path("maptensor.ckpt"),
        &g.path("x.ckpt"),
        &RewriteOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), reshard::ErrorKind::Unsupported, "{err}");
    assert_eq!(err.tensor(), Some("embedding.map"), "{err}");
    assert!(err.to_string().contains("MapTensor"), "{err}");
    assert!(!g.path("x.ckpt").exists());

    for name in [
        "dtypes.ckpt",
        "crc.ckpt",
        "tensors.ckpt",
        "back/tensors.ckpt",
    ] {
        assert_writer_identical(&g, name);
    }

    // Every encrypted file decrypts to exactly the plain file's bytes.
    let plain = std::fs::read(g.path("dtypes.ckpt")).unwrap();
    for (name, spec) in g.manifest.iter().filter(|(n, _)| n.starts_with("enc_")) {
        let (key, mode) = read_options(&spec["options"]).decryption.unwrap();
        let decrypted = crypt::decrypt(&std::fs::read(g.path(name)).unwrap(), &key, mode).unwrap();
        assert!(
            decrypted == plain,
            "{name}: plaintext differs from dtypes.ckpt"
        );
    }

    // Format conversion is byte-identical to ms.ckpt_to_safetensors / safetensors_to_ckpt.
    let ours_st = g.path("ours.safetensors");
    rewrite(
        &g.path("tensors.ckpt"),
        &ours_st,
        &RewriteOptions::default(),
    )
    .unwrap();
    assert!(
        std::fs::read(&ours_st).unwrap()
            == std::fs::read(g.path("converted/tensors.safetensors")).unwrap()
    );
    let ours_back = g.path("ours-back.ckpt");
    rewrite(
        &g.path("converted/tensors.safetensors"),
        &ours_back,
        &RewriteOptions::default(),
    )
    .unwrap();
    assert!(
        std::fs::read(&ours_back).unwrap() == std::fs::read(g.path("back/tensors.ckpt")).unwrap()
    );

    // MindSpore loads what we write: CRC, every cipher, safetensors with CRC,
    // and strings carried through safetensors metadata.
    let mut checks = Vec::new();
    let crc_out = g.path("ours-crc.ckpt");
    rewrite(
        &g.path("dtypes.ckpt"),
        &crc_out,
        &RewriteOptions {
            crc: true,
            ..Default::default()
        },
    )
    .unwrap();
    checks.push(json!({"file": crc_out, "expect": "dtypes.ckpt", "crc": true}));
    for (name, spec) in g.manifest.iter().filter(|(n, _)| n.starts_with("enc_")) {
        let out = g.path(&format!("ours-{name}"));
        let options = RewriteOptions {
            encryption: read_options(&spec["options"]).decryption,
            ..Default::default()
        };
        rewrite(&g.path("dtypes.ckpt"), &out, &options).unwrap();
        checks.push(
            json!({"file": out, "expect": name, "key_hex": spec["options"]["key_hex"],
                           "mode": spec["options"]["mode"]}),
        );
    }
    let st_crc = g.path("ours-crc.safetensors");
    rewrite(
        &g.path("crc.safetensors"),
        &st_crc,
        &RewriteOptions {
            crc: true,
            ..Default::default()
        },
    )
    .unwrap();
    checks.push(json!({"file": st_crc, "expect": "crc.safetensors", "format": "safetensors", "crc": true, "sorted": true}));
    let via_st = g.path("via.safetensors");
    rewrite(&g.path("dtypes.ckpt"), &via_st, &RewriteOptions::default()).unwrap();
    let round = g.path("round.ckpt");
    rewrite(&via_st, &round, &RewriteOptions::default()).unwrap();
    checks.push(json!({"file": round, "expect": "dtypes.ckpt", "sorted": true}));
    let checks_path = g.path("checks.json");
    std::fs::write(&checks_path, serde_json::to_vec(&checks).unwrap()).unwrap();
    let out = run_py(
        &python,
        "ckpt_verify.py",
        &[
            g.path("manifest.json").to_str().unwrap(),
            checks_path.to_str().unwrap(),
        ],
    );
    assert!(out.trim() == format!("ok {}", checks.len()), "{out}");
}

#[test]
fn tensors_above_512_mib_split_and_join_like_mindspore() {
    let Some(python) = mindspore_python() else {
        return;
    };
    let g = generate(&python, true);
    let ck = Checkpoint::open(
        g.path("big.ckpt"),
        &ReadOptions {
            verify_crc: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        ck.get("big.weight").unwrap().records,
        2,
        "sync path: 512 MiB + remainder"
    );
    let ck = Checkpoint::open(g.path("big_async.ckpt"), &ReadOptions::default()).unwrap();
    let rows = ck.get("big.rows").unwrap();
    let lens: Vec<usize> = rows.chunks.iter().map(|c| c.len()).collect();
    assert_eq!(lens, vec![268437472, 268437440], "async path: dim-0 split");
    drop(ck);
    assert_reader_agrees(&g);
    assert_writer_identical(&g, "big.ckpt");
    assert_writer_identical(&g, "big_async.ckpt");
}
