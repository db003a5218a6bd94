//! Bad input: each gives one clear error naming the file, the record and the
//! tensor, never a panic, and never leaves an output file behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use reshard::formats::ckpt::{Checkpoint, CkptWriter, EncMode, ReadOptions, WriteOptions};
use reshard::ops::rewrite::{rewrite, RewriteOptions};
use reshard::{DType, Error, ErrorKind};

use crate::util::{reshard_bin, tempdir};

/// A small valid checkpoint: `a` [2,3] f32, `b.weight` [4] i32, `s` string.
fn valid_ckpt(dir: &Path, options: WriteOptions) -> PathBuf {
    let path = dir.join("good.ckpt");
    let mut w = CkptWriter::create(&path, options).unwrap();
    w.write_tensor("a", DType::F32, &[2, 3], &[1u8; 24])
        .unwrap();
    w.write_tensor("b.weight", DType::I32, &[4], &[2u8; 16])
        .unwrap();
    w.write_string("s", "text").unwrap();
    w.finish().unwrap();
    path
}

fn open(path: &Path) -> Result<Checkpoint, Error> {
    Checkpoint::open(
        path,
        &ReadOptions {
            verify_crc: true,
            ..Default::default()
        },
    )
}

/// Writes `bytes` to `bad.ckpt`, checks the error is of `kind`, names the
/// file and holds each of `needles` (the record and tensor it names), and
/// that rewriting it leaves no output.
fn assert_bad(dir: &Path, bytes: &[u8], kind: ErrorKind, needles: &[&str]) -> Error {
    let path = dir.join("bad.ckpt");
    std::fs::write(&path, bytes).unwrap();
    let err = open(&path).err().expect("corrupt file was accepted");
    let msg = err.to_string();
    assert_eq!(err.kind(), kind, "{msg}");
    assert_eq!(err.file(), Some(path.as_path()), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "error lacks {n:?}: {msg}");
    }
    let out = dir.join("out/x.safetensors");
    assert!(rewrite(&path, &out, &RewriteOptions::default()).is_err());
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("out"))
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(
        leftovers.iter().all(|&n| n == 0),
        "temporary files left behind"
    );
    err
}

fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}

#[test]
fn truncated_file() {
    let dir = tempdir();
    let good = std::fs::read(valid_ckpt(dir.path(), WriteOptions::default())).unwrap();
    // Cut inside the content of record 1 ("b.weight").
    let cut = good.windows(5).position(|w| w == b"Int32").unwrap() + 10;
    let err = assert_bad(
        dir.path(),
        &good[..cut],
        ErrorKind::BadInput,
        &["record 1", "\"b.weight\"", "truncated"],
    );
    assert!(matches!(err.root(), Error::Truncated { .. }), "{err}");
}

#[test]
fn malformed_varint() {
    let dir = tempdir();
    let mut bytes = std::fs::read(valid_ckpt(dir.path(), WriteOptions::default())).unwrap();
    bytes.extend_from_slice(&[
        0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    let err = assert_bad(
        dir.path(),
        &bytes,
        ErrorKind::BadInput,
        &["record 3", "varint"],
    );
    assert!(matches!(err.root(), Error::Malformed { .. }), "{err}");
}

#[test]
fn unknown_dtype_string() {
    let dir = tempdir();
    let good = std::fs::read(valid_ckpt(dir.path(), WriteOptions::default())).unwrap();
    let err = assert_bad(
        dir.path(),
        &replace(&good, b"Int32", b"Int33"),
        ErrorKind::BadInput,
        &["record 1", "\"b.weight\"", "Int33"],
    );
    assert!(matches!(err.root(), Error::UnknownDtype(_)), "{err}");
}

#[test]
fn content_length_not_matching_shape() {
    let dir = tempdir();
    let good = std::fs::read(valid_ckpt(dir.path(), WriteOptions::default())).unwrap();
    // dims [2,3] → [2,4]: 32 bytes needed, 24 present.
    let bad = replace(&good, b"\x08\x02\x08\x03", b"\x08\x02\x08\x04");
    let err = assert_bad(
        dir.path(),
        &bad,
        ErrorKind::BadInput,
        &["record 0", "\"a\"", "needs 32"],
    );
    assert!(
        matches!(
            err.root(),
            Error::ContentLength {
                expected: 32,
                got: 24,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn duplicate_names() {
    let dir = tempdir();
    let good = std::fs::read(valid_ckpt(dir.path(), WriteOptions::default())).unwrap();
    // Append record 0 again, after other records: not a split tensor.
    let first_len = 2 + good[1] as usize;
    let mut bad = good.clone();
    bad.extend_from_slice(&good[..first_len]);
    let err = assert_bad(
        dir.path(),
        &bad,
        ErrorKind::BadInput,
        &["record 3", "\"a\"", "duplicate", "record 0"],
    );
    assert!(
        matches!(err.root(), Error::DuplicateName { first_record: 0 }),
        "{err}"
    );
}

#[test]
fn crc_mismatch() {
    let dir = tempdir();
    let path = valid_ckpt(
        dir.path(),
        WriteOptions {
            crc: true,
            ..Default::default()
        },
    );
    let good = std::fs::read(&path).unwrap();
    assert!(open(&path).is_ok());
    let mut bad = good.clone();
    let at = good.windows(2).position(|w| w == [1, 1]).unwrap();
    bad[at] = 9; // a tensor byte
    let err = assert_bad(dir.path(), &bad, ErrorKind::Damaged, &["CRC mismatch"]);
    assert!(matches!(err.root(), Error::CrcMismatch { .. }), "{err}");
}

#[test]
fn wrong_key_and_tampered_block() {
    let dir = tempdir();
    let key = b"0123456789abcdef".to_vec();
    let path = valid_ckpt(
        dir.path(),
        WriteOptions {
            encryption: Some((key.clone(), EncMode::AesGcm)),
            ..Default::default()
        },
    );
    let read = |k: &[u8], p: &Path| {
        Checkpoint::open(
            p,
            &ReadOptions {
                decryption: Some((k.to_vec(), EncMode::AesGcm)),
                verify_crc: false,
            },
        )
    };
    assert_eq!(read(&key, &path).unwrap().entries().len(), 3);
    let err = read(b"fedcba9876543210", &path).err().unwrap();
    assert!(
        matches!(err.root(), Error::Decrypt { block: 0, .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Encrypted, "{err}");
    assert_eq!(err.file(), Some(path.as_path()), "{err}");
    assert!(err.to_string().contains("wrong key"), "{err}");

    let mut tampered = std::fs::read(&path).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40;
    let bad = dir.path().join("tampered.ckpt");
    std::fs::write(&bad, tampered).unwrap();
    let err = read(&key, &bad).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Encrypted, "{err}");
    assert_eq!(err.file(), Some(bad.as_path()), "{err}");
    assert!(err.to_string().contains("tampered block"), "{err}");

    let err = open(&path).err().unwrap();
    assert!(
        matches!(err.root(), Error::EncryptedWithoutKey { mode: "AES-GCM" }),
        "{err}"
    );
}

#[test]
fn arbitrary_garbage_is_rejected_cleanly() {
    let dir = tempdir();
    for (i, bytes) in [
        &b""[..],
        b"\x00",
        b"\x0a",
        b"\x0a\x02\x0a\x05",
        b"PK\x03\x04 zip file",
        &[0x0a, 0x03, 0x12, 0x01, 0x00],
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path().join(format!("g{i}.ckpt"));
        std::fs::write(&path, bytes).unwrap();
        if let Ok(ck) = open(&path) {
            assert!(ck.entries().is_empty(), "garbage {i} parsed to entries");
        }
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(reshard_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_reports_errors_once_with_exit_status_1() {
    let dir = tempdir();
    let good = valid_ckpt(dir.path(), WriteOptions::default());
    let (ok, stdout, _) = cli(&["inspect", good.to_str().unwrap()]);
    assert!(ok);
    assert!(
        stdout.contains("b.weight") && stdout.contains("Int32") && stdout.contains("[4]"),
        "{stdout}"
    );
    let (ok, stdout, _) = cli(&["inspect", "--json", good.to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["kind"], "checkpoint");
    assert_eq!(v["tensors"][2]["value"], "text");

    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.ckpt");
    std::fs::write(&bad, replace(&bytes, b"Int32", b"Int33")).unwrap();
    let out = Command::new(reshard_bin())
        .args(["inspect", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("Int33").count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("record 1 (\"b.weight\")"),
        "{stderr}"
    );

    let out = Command::new(reshard_bin())
        .args(["inspect"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "hello").unwrap();
    let (ok, _, stderr) = cli(&["inspect", notes.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("notes.txt") && stderr.contains("not a MindSpore checkpoint"),
        "{stderr}"
    );
}

#[test]
fn rewrite_refuses_to_overwrite_its_input_and_bad_extensions() {
    let dir = tempdir();
    let good = valid_ckpt(dir.path(), WriteOptions::default());
    let (ok, _, stderr) = cli(&["rewrite", good.to_str().unwrap(), good.to_str().unwrap()]);
    assert!(!ok && stderr.contains("output is the input"), "{stderr}");
    let (ok, _, stderr) = cli(&[
        "rewrite",
        good.to_str().unwrap(),
        dir.path().join("x.bin").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains(".ckpt or .safetensors"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn strategy_that_is_not_a_strategy() {
    let dir = tempdir();
    // Starts like a strategy map (field 1 varint) but field 2 holds garbage.
    let bad = dir.path().join("ckpt_strategy_rank_0.ckpt");
    std::fs::write(&bad, [0x08, 0x01, 0x12, 0x03, 0xff, 0xff, 0xff]).unwrap();
    let (ok, _, stderr) = cli(&["inspect", bad.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("ckpt_strategy_rank_0.ckpt")
            && stderr.contains("not a strategy file"),
        "{stderr}"
    );
    // A checkpoint handed where a strategy is expected.
    let ckpt = valid_ckpt(dir.path(), WriteOptions::default());
    let err = reshard::formats::strategy::load(&ckpt).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadInput, "{err}");
    assert_eq!(err.file(), Some(ckpt.as_path()));
    assert!(err.to_string().contains("not a strategy file"), "{err}");
    // A directory with no strategy files.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, stderr) = cli(&["inspect", empty.to_str().unwrap()]);
    assert!(!ok && stderr.contains("empty"), "{stderr}");
}
