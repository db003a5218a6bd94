//! PyTorch `.bin` inputs: a faithful writer of `torch.save`'s zip format
//! (protocol-2 pickle of an `OrderedDict` state dict with `_metadata`,
//! storages as 64-byte-aligned stored members), read back tensor for tensor;
//! malicious and damaged files refused with typed errors and nothing
//! written; llama `.bin` (single and sharded with
//! `pytorch_model.bin.index.json`) converting to the same bytes as its
//! safetensors twin; PEFT `adapter_model.bin` merging like its safetensors twin.

use std::path::Path;
use std::process::Command;

use reshard::formats::torch::{TorchEntry, TorchFile};
use reshard::DType;

use crate::util::hf::{bytes, spec, write_hf};
use crate::util::{f32s, json_f32s, reshard_bin, tempdir};

pub mod writer;

fn le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read(path: &Path) -> Vec<(TorchEntry, Vec<u8>)> {
    let f = TorchFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    f.entries()
        .iter()
        .map(|e| (e.clone(), f.bytes(e).to_vec()))
        .collect()
}

#[test]
fn reads_what_torch_save_writes() {
    let dir = tempdir();
    // Two tensors in one storage (the second at an offset, as tied or
    // sliced weights are saved), plus bf16, i64 and a scalar.
    let shared: Vec<f32> = (0..20).map(|i| i as f32 * 0.5).collect();
    let bf: Vec<u8> = (0..12u16)
        .flat_map(|i| (0x3f80 + i).to_le_bytes())
        .collect();
    let ids: Vec<u8> = (0..3i64).flat_map(|i| (i - 1).to_le_bytes()).collect();
    let ts = [
        writer::T {
            name: "a.weight",
            dtype: DType::F32,
            shape: vec![3, 4],
            key: "0",
            offset: 0,
        },
        writer::T {
            name: "b.weight",
            dtype: DType::F32,
            shape: vec![2, 4],
            key: "0",
            offset: 12,
        },
        writer::T {
            name: "c.weight",
            dtype: DType::BF16,
            shape: vec![2, 3, 2],
            key: "1",
            offset: 0,
        },
        writer::T {
            name: "ids",
            dtype: DType::I64,
            shape: vec![3],
            key: "2",
            offset: 0,
        },
        writer::T {
            name: "scale",
            dtype: DType::F32,
            shape: vec![],
            key: "3",
            offset: 0,
        },
    ];
    let numel = [("0", 20), ("1", 12), ("2", 3), ("3", 1)]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    let pkl = writer::state_dict_pickle(&ts, &numel);
    let storages = [
        ("0", le(&shared)),
        ("1", bf.clone()),
        ("2", ids.clone()),
        ("3", le(&[7.5])),
    ];
    let path = dir.path().join("pytorch_model.bin");
    std::fs::write(&path, writer::archive("pytorch_model", pkl, &storages)).unwrap();
    let got = read(&path);
    let names: Vec<&str> = got.iter().map(|(e, _)| e.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "b.weight", "c.weight", "ids", "scale"]);
    assert_eq!(got[0].0.shape, [3, 4]);
    assert_eq!(got[0].1, le(&shared[..12]));
    assert_eq!(got[1].1, le(&shared[12..20]));
    assert_eq!((got[2].0.dtype, got[2].1.clone()), (DType::BF16, bf));
    assert_eq!((got[3].0.dtype, got[3].1.clone()), (DType::I64, ids));
    assert_eq!(
        (got[4].0.shape.clone(), got[4].1.clone()),
        (vec![], le(&[7.5]))
    );
    // Storages are 64-byte aligned in the file and read in place.
    assert_eq!(got[0].0.range.start % 64, 0);
}

/// A `.bin` whose data.pkl is `pkl`, with one real storage beside it.
fn bin_with_pickle(path: &Path, pkl: Vec<u8>) {
    std::fs::write(
        path,
        writer::archive("archive", pkl, &[("0", le(&[1.0; 4]))]),
    )
    .unwrap();
}

fn refused_global(path: &Path) -> String {
    match TorchFile::open(path) {
        Err(e) => match e.root() {
            reshard::Error::PickleRefused { what } => what.clone(),
            other => panic!("expected PickleRefused, got {other}"),
        },
        Ok(_) => panic!("{} was read", path.display()),
    }
}

#[test]
fn malicious_pickles_are_refused_and_nothing_runs_or_is_written() {
    let dir = tempdir();
    let marker = dir.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    // os.system(cmd) through __reduce__, as pickle.dumps writes it (protocol 2).
    let mut p = writer::Pickler::default();
    p.out.extend([0x80, 2]);
    p.global("posix", "system");
    p.str(&cmd);
    p.out.extend([0x85, b'R', b'.']);
    let os_system = dir.path().join("os_system.bin");
    bin_with_pickle(&os_system, p.out);
    assert_eq!(refused_global(&os_system), "global posix.system");
    // builtins.eval through STACK_GLOBAL (protocol 4).
    let mut p = writer::Pickler::default();
    p.out.extend([0x80, 4]);
    for s in ["builtins", "eval"] {
        p.out.push(0x8c);
        p.out.push(s.len() as u8);
        p.out.extend(s.as_bytes());
    }
    p.out.push(0x93);
    p.str("__import__('os').system('true')");
    p.out.extend([0x85, b'R', b'.']);
    let eval = dir.path().join("eval.bin");
    bin_with_pickle(&eval, p.out);
    assert_eq!(refused_global(&eval), "global builtins.eval");
    // A tensor rebuilt by an arbitrary function hidden inside a state dict.
    let mut p = writer::Pickler::default();
    p.out.extend([0x80, 2]);
    p.empty_ordered_dict();
    p.str("w");
    p.global("subprocess", "Popen");
    p.str("true");
    p.out.extend([0x85, b'R', b's', b'.']);
    let popen = dir.path().join("popen.bin");
    bin_with_pickle(&popen, p.out);
    assert_eq!(refused_global(&popen), "global subprocess.Popen");

    // Through convert: a clear error naming the global, no output.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        serde_json::to_vec(&spec("llama").config).unwrap(),
    )
    .unwrap();
    std::fs::copy(&os_system, hf.join("pytorch_model.bin")).unwrap();
    let out = dir.path().join("out.ckpt");
    let o = Command::new(reshard_bin())
        .args(["convert", "--model", "llama", "--input_path"])
        .arg(&hf)
        .arg("--output_path")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pytorch_model.bin")
            && err.contains("refused to unpickle global posix.system"),
        "{err}"
    );
    assert!(!out.exists() && !marker.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
}

/// An archive whose tensor "w" (f32, `shape`, from element `offset`) views
/// storage "0", which the pickle says has `numel` elements but which holds 10.
fn w_over_ten_floats(shape: Vec<u64>, offset: u64, numel: u64) -> Vec<u8> {
    let ts = [writer::T {
        name: "w",
        dtype: DType::F32,
        shape,
        key: "0",
        offset,
    }];
    let numel = [("0".to_string(), numel)].into_iter().collect();
    let pkl = writer::state_dict_pickle(&ts, &numel);
    writer::archive("archive", pkl, &[("0", le(&[1.0; 10]))])
}

#[test]
fn damaged_archives_are_typed_errors() {
    let dir = tempdir();
    let good = writer::save(&[(
        "w".into(),
        DType::F32,
        vec![64, 64],
        le(&vec![0.25; 64 * 64]),
    )]);
    // Cut short: the end record (and a member's tail) is gone.
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let e = TorchFile::open(&cut).err().unwrap();
    assert!(matches!(e.root(), reshard::Error::Truncated { .. }), "{e}");
    assert_eq!(e.kind(), reshard::ErrorKind::BadInput, "{e}");
    assert_eq!(e.file(), Some(cut.as_path()), "{e}");
    // A storage shorter than the tensor viewing it.
    let short = dir.path().join("short.bin");
    std::fs::write(&short, w_over_ten_floats(vec![4, 4], 0, 16)).unwrap();
    let e = TorchFile::open(&short).err().unwrap();
    assert!(
        matches!(e.root(), reshard::Error::ContentLength { .. }),
        "{e}"
    );
    assert_eq!(e.tensor(), Some("w"), "{e}");
    // An offset past the storage's end.
    std::fs::write(&short, w_over_ten_floats(vec![4], 8, 10)).unwrap();
    let e = TorchFile::open(&short).err().unwrap();
    assert!(
        matches!(e.root(), reshard::Error::ContentLength { .. }),
        "{e}"
    );
    // A legacy file cut after its magic number; a file that is not torch at all.
    let legacy = dir.path().join("legacy.bin");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let e = TorchFile::open(&legacy).err().unwrap();
    assert!(matches!(e.root(), reshard::Error::Truncated { .. }), "{e}");
    std::fs::write(&legacy, b"PK\x05\x06 not torch").unwrap();
    assert!(TorchFile::open(&legacy).is_err());
    std::fs::write(&legacy, b"GGUF").unwrap();
    let e = TorchFile::open(&legacy).err().unwrap();
    assert_eq!(e.kind(), reshard::ErrorKind::BadInput, "{e}");
    assert!(e.to_string().contains("not a PyTorch zip archive"), "{e}");
    // A real legacy file cut inside its storages.
    let real = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lpips-0.1.4/alex.pth"),
    )
    .unwrap();
    std::fs::write(&legacy, &real[..real.len() - 100]).unwrap();
    let e = TorchFile::open(&legacy).err().unwrap();
    assert!(matches!(e.root(), reshard::Error::Truncated { .. }), "{e}");
}

/// A llama fixture as `pytorch_model.bin` (or shards with an index) converts
/// to exactly the bytes its safetensors twin does.
#[test]
fn llama_bin_converts_like_its_safetensors_twin() {
    let dir = tempdir();
    let s = spec("llama");
    let st = write_hf(&s, &dir.path().join("st"), 1);
    let tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)> = s
        .tensors
        .iter()
        .map(|(n, d, sh)| {
            (
                n.clone(),
                *d,
                sh.iter().map(|&x| x as u64).collect(),
                bytes(n, *d, sh),
            )
        })
        .collect();
    let one = dir.path().join("bin");
    std::fs::create_dir(&one).unwrap();
    std::fs::copy(st.join("config.json"), one.join("config.json")).unwrap();
    std::fs::write(one.join("pytorch_model.bin"), writer::save(&tensors)).unwrap();
    // Sharded: two .bin files and pytorch_model.bin.index.json.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(st.join("config.json"), sharded.join("config.json")).unwrap();
    let half = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("pytorch_model-0000{}-of-00002.bin", i + 1);
        std::fs::write(sharded.join(&file), writer::save(part)).unwrap();
        for t in part {
            map.insert(t.0.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        sharded.join("pytorch_model.bin.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let convert = |input: &Path, out: &str| {
        let o = Command::new(reshard_bin())
            .args(["convert", "--model", "llama", "--input_path"])
            .arg(input)
            .arg("--output_path")
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        crate::util::assert_success(&o);
        std::fs::read(dir.path().join(out)).unwrap()
    };
    let want = convert(&st, "st.ckpt");
    assert!(
        convert(&one, "bin.ckpt") == want,
        ".bin differs from safetensors"
    );
    assert!(
        convert(&sharded, "sharded.ckpt") == want,
        "sharded .bin differs"
    );
    assert!(
        convert(&one.join("pytorch_model.bin"), "file.ckpt") == want,
        "a .bin file given directly differs"
    );

    // An index naming a shard that is not there: an error naming it, nothing written.
    std::fs::remove_file(sharded.join("pytorch_model-00002-of-00002.bin")).unwrap();
    let o = Command::new(reshard_bin())
        .args(["convert", "--model", "llama", "--input_path"])
        .arg(&sharded)
        .arg("--output_path")
        .arg(dir.path().join("missing.ckpt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("pytorch_model.bin.index.json")
            && err.contains("\"pytorch_model-00002-of-00002.bin\"")
            && err.contains("is missing"),
        "{err}"
    );
    assert!(!dir.path().join("missing.ckpt").exists());
}

/// merge-lora --adapter with PEFT's `adapter_model.bin` gives the same files
/// as with its `adapter_model.safetensors` twin.
#[test]
fn peft_bin_adapter_merges_like_its_safetensors_twin() {
    use reshard::formats::safetensors::SafetensorsFile;
    let dir = tempdir();
    let (base, adapter) = crate::util::lora::hf_model_and_adapter(dir.path(), false);
    let st = SafetensorsFile::open(adapter.join("adapter_model.safetensors"), false).unwrap();
    let tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)> = st
        .entries()
        .iter()
        .map(|e| {
            let shape = e.shape.iter().map(|&d| d as u64).collect();
            (e.name.clone(), e.dtype, shape, st.bytes(e).to_vec())
        })
        .collect();
    let bin = crate::util::lora::bin_adapter(&adapter, dir.path(), &writer::save(&tensors));
    let merge = |adapter: &Path, out: &str| {
        let o = Command::new(reshard_bin())
            .args(["merge-lora", "--src_ckpt_path_or_dir"])
            .arg(&base)
            .arg("--adapter")
            .arg(adapter)
            .arg("--dst_ckpt_dir")
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        crate::util::assert_success(&o);
    };
    merge(&adapter, "from_st");
    merge(&bin, "from_bin");
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(
            std::fs::read(dir.path().join("from_st").join(f)).unwrap()
                == std::fs::read(dir.path().join("from_bin").join(f)).unwrap(),
            "{f} differs"
        );
    }
}

/// A deterministic sweep in the spirit of the fuzz target (fuzz/fuzz_targets/
/// torch_archive.rs): every truncation and a byte flip at every position of
/// a small archive give tensors inside the bytes or an error, never a panic.
#[test]
fn every_cut_and_flip_of_an_archive_is_handled() {
    let good = writer::save(&[
        (
            "w".into(),
            DType::F32,
            vec![2, 2],
            le(&[1.0, 2.0, 3.0, 4.0]),
        ),
        ("b".into(), DType::BF16, vec![3], vec![1u8; 6]),
    ]);
    let check = |data: &[u8]| {
        if let Ok(entries) = reshard::formats::torch::index(data) {
            for e in &entries {
                let numel: u64 = e.shape.iter().product();
                assert!(e.range.end <= data.len());
                assert_eq!(
                    (e.range.end - e.range.start) as u64,
                    numel * e.dtype.size() as u64
                );
            }
        }
    };
    for n in 0..good.len() {
        check(&good[..n]);
    }
    for i in 0..good.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= x;
            check(&bad);
        }
    }
}

/// Real PyTorch files a registry package ships: lpips 0.1.4's weights
/// (legacy torch.save format, Python 2 pickles; tests/data/lpips-0.1.4/README.md).
/// Names, shapes, dtype and sign as lpips documents them; with
/// RESHARD_MINDSPORE_PYTHON set, every value equal to an independent reader's.
#[test]
fn reads_lpips_weights_shipped_on_pypi() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lpips-0.1.4");
    let documented: [(&str, &[u64]); 3] = [
        ("alex", &[64, 192, 384, 256, 256]),
        ("vgg", &[64, 128, 256, 512, 512]),
        ("squeeze", &[64, 128, 256, 384, 384, 512, 512]),
    ];
    let mut read_all = Vec::new();
    for (net, chns) in documented {
        let path = data.join(format!("{net}.pth"));
        let got = read(&path);
        let names: Vec<String> = got.iter().map(|(e, _)| e.name.clone()).collect();
        let want: Vec<String> = (0..chns.len())
            .map(|i| format!("lin{i}.model.1.weight"))
            .collect();
        assert_eq!(names, want, "{net}");
        for ((e, b), &c) in got.iter().zip(chns) {
            assert_eq!(
                (e.dtype, e.shape.clone()),
                (DType::F32, vec![1, c, 1, 1]),
                "{net}"
            );
            let v = f32s(b);
            assert!(
                v.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{net} {}",
                e.name
            );
            assert!(v.iter().any(|x| *x > 0.0), "{net} {}", e.name);
        }
        read_all.push((path, got));
    }
    let Some(python) = crate::util::mindspore_python() else {
        return;
    };
    let paths: Vec<&str> = read_all.iter().map(|(p, _)| p.to_str().unwrap()).collect();
    let oracle: serde_json::Value = serde_json::from_str(&crate::util::run_py(
        &python,
        "torch_legacy_oracle.py",
        &paths,
    ))
    .unwrap();
    for (path, got) in &read_all {
        let theirs = &oracle[path.to_str().unwrap()];
        for (e, b) in got {
            let want = json_f32s(&theirs[&e.name]["values"]);
            let ours = f32s(b);
            assert_eq!(ours, want, "{} {}", path.display(), e.name);
        }
    }
}

/// A real zip-format (torch >= 1.6) file a registry package ships:
/// pesto-pitch 2.0.1's `mir-1k.ckpt`, a Lightning checkpoint
/// (tests/data/pesto-pitch-2.0.1/README.md). Names, shapes and dtype as its
/// `hparams` and pesto's `model.py` document them; with
/// RESHARD_MINDSPORE_PYTHON set, every value equal to an independent
/// reader's (zipfile + pickle with stub classes + numpy).
#[test]
fn reads_pesto_zip_checkpoint_shipped_on_pypi() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pesto-pitch-2.0.1/mir-1k.ckpt");
    let got = read(&path);
    let documented: [(&str, &[u64]); 16] = [
        ("shift", &[]),
        ("encoder.layernorm.weight", &[1, 264]),
        ("encoder.layernorm.bias", &[1, 264]),
        ("encoder.conv1.0.weight", &[40, 1, 15]),
        ("encoder.conv1.0.bias", &[40]),
        ("encoder.prefilt_layers.0.weight", &[40, 40, 15]),
        ("encoder.prefilt_layers.0.bias", &[40]),
        ("encoder.conv_layers.0.weight", &[30, 40, 1]),
        ("encoder.conv_layers.0.bias", &[30]),
        ("encoder.conv_layers.3.weight", &[30, 30, 1]),
        ("encoder.conv_layers.3.bias", &[30]),
        ("encoder.conv_layers.6.weight", &[10, 30, 1]),
        ("encoder.conv_layers.6.bias", &[10]),
        ("encoder.conv_layers.9.weight", &[3, 10, 1]),
        ("encoder.conv_layers.9.bias", &[3]),
        ("encoder.fc.weight", &[1, 1, 1175]),
    ];
    let ours: Vec<(String, DType, Vec<u64>)> = got
        .iter()
        .map(|(e, _)| (e.name.clone(), e.dtype, e.shape.clone()))
        .collect();
    let want: Vec<(String, DType, Vec<u64>)> = documented
        .iter()
        .map(|(n, s)| (format!("state_dict.{n}"), DType::F32, s.to_vec()))
        .collect();
    assert_eq!(ours, want);
    for (e, b) in &got {
        let v = f32s(b);
        assert!(v.iter().all(|x| x.is_finite()), "{}", e.name);
        assert!(v.iter().any(|x| *x != 0.0), "{} is all zeros", e.name);
    }
    let Some(python) = crate::util::mindspore_python() else {
        return;
    };
    let oracle: serde_json::Value = serde_json::from_str(&crate::util::run_py(
        &python,
        "torch_zip_oracle.py",
        &[path.to_str().unwrap()],
    ))
    .unwrap();
    let theirs = oracle[path.to_str().unwrap()].as_object().unwrap();
    assert_eq!(theirs.len(), got.len());
    for (e, b) in &got {
        let t = &theirs[&e.name];
        let shape: Vec<u64> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(
            (&shape, t["dtype"].as_str()),
            (&e.shape, Some("float32")),
            "{}",
            e.name
        );
        let want = json_f32s(&t["values"]);
        let ours = f32s(b);
        assert_eq!(ours, want, "{}", e.name);
    }
}

/// `reshard inspect` lists a `.bin`'s tensors (index only, nothing run).
#[test]
fn inspect_lists_a_bin() {
    let dir = tempdir();
    let path = dir.path().join("pytorch_model.bin");
    std::fs::write(
        &path,
        writer::save(&[("w".into(), DType::F16, vec![2, 3], vec![0u8; 12])]),
    )
    .unwrap();
    let o = Command::new(reshard_bin())
        .args(["inspect", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    crate::util::assert_success(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = v.to_string();
    assert!(
        text.contains("\"pytorch\"") && text.contains("\"w\"") && text.contains("[2,3]"),
        "{text}"
    );
}
