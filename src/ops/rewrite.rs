//! `reshard rewrite SRC DST`: copy a checkpoint into another file, changing
//! format (`.ckpt` ⇄ `.safetensors`, by DST's extension), CRC or encryption.
//! The tensors move losslessly; the order rules follow MindSpore's
//! `ckpt_to_safetensors` / `safetensors_to_ckpt` (safetensors → ckpt writes
//! names in sorted order, as `safe_open().keys()` yields them).
//!
//! A rewrite is planned like every other job: one [`Plan`] whose tensors
//! are whole copies out of the source (renamed by the name map), written
//! by `ops::write` — so it has manifests, progress and
//! verification, and a source that changes while it is read is not
//! copied. A `.ckpt` CRC, encryption or records cut by rows are the
//! executor's `.ckpt` encoding; a safetensors CRC is computed from the
//! source while planning (it goes into the header, before the data).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::exec::OutputControl;
use crate::formats::ckpt::writer::CkptEncoding;
use crate::formats::ckpt::{EncMode, ReadOptions, SplitMode, WriteOptions};
use crate::formats::safetensors::{self as st, SafetensorsFile, STRING_KEY_PREFIX};
use crate::formats::tree::FileFormat;
use crate::formats::Source;
use crate::ops::inspect::{detect, Detected};
use crate::ops::write::{write_job, DestinationCheck, Job, WriteSettings};
use crate::plan::{Content, FilePlan, Plan, SourceFile, TensorPlan};

/// Options of [`rewrite`].
#[derive(Debug, Clone, Default)]
pub struct RewriteOptions {
    /// How to read the source (decryption key, CRC verification).
    pub read: ReadOptions,
    /// Append a CRC (`crc_num` trailer for `.ckpt`, metadata for safetensors).
    pub crc: bool,
    /// Encrypt the `.ckpt` output.
    pub encryption: Option<(Vec<u8>, EncMode)>,
    /// How `.ckpt` output cuts tensors above 512 MiB.
    pub split: SplitMode,
    /// Rename entries (old → new; others keep their names), as
    /// `ckpt_to_safetensors(name_map=…)`.
    pub name_map: Option<BTreeMap<String, String>>,
    /// Write `<file>.manifest.json` beside each output (off by default:
    /// MindSpore's functions write none).
    pub manifest: bool,
    /// Re-read every output and check it against its manifest and the
    /// plan (needs `manifest`).
    pub verify: bool,
    /// Durability (`fsync`) and progress reporting.
    pub control: OutputControl,
}

/// What [`rewrite`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RewriteReport {
    /// Output file.
    pub output: PathBuf,
    /// Entries written.
    pub entries: usize,
    /// Tensor bytes written.
    pub bytes: u64,
}

/// The output format of `dst`, and a refusal to write over `src` or to
/// encode it in a way MindSpore cannot read.
fn check_paths(src: &Path, dst: &Path, options: &RewriteOptions) -> Result<FileFormat> {
    let format = FileFormat::of_path(dst)
        .ok_or_else(|| Error::usage_of("dst", "must end in .ckpt or .safetensors").in_file(dst))?;
    match format {
        FileFormat::Ckpt => {
            CkptEncoding::new(&ckpt_options(options), dst)?;
        }
        FileFormat::Safetensors if options.encryption.is_some() => {
            return Err(
                Error::usage_of("encryption", "safetensors files cannot be encrypted").in_file(dst),
            );
        }
        FileFormat::Safetensors => {}
    }
    if src
        .canonicalize()
        .ok()
        .is_some_and(|s| Some(s) == dst.canonicalize().ok())
    {
        return Err(Error::usage_of("dst", "output is the input file").in_file(dst));
    }
    Ok(format)
}

/// How `.ckpt` outputs are encoded.
fn ckpt_options(options: &RewriteOptions) -> WriteOptions {
    WriteOptions {
        crc: options.crc,
        encryption: options.encryption.clone(),
        split: options.split,
    }
}

/// Refuses a strategy file as a source.
fn check_source_kind(src: &Path) -> Result<()> {
    if let Detected::Strategy = detect(src)? {
        return Err(Error::bad_input("this is a strategy file, not a checkpoint").in_file(src));
    }
    Ok(())
}

/// Adds to `plan` the rewrite of `src` into `dst`: every entry, in
/// MindSpore's order, as a whole copy out of `src` under its (renamed)
/// name. Returns the entries and tensor bytes written.
fn plan_file(
    src: &Path,
    dst: &Path,
    format: FileFormat,
    options: &RewriteOptions,
    plan: &mut Plan,
) -> Result<(usize, u64)> {
    check_source_kind(src)?;
    let source = Source::open(src, &options.read)?;
    let mut entries = source.entries();
    let from_safetensors = FileFormat::of_path(src) == Some(FileFormat::Safetensors);
    let mut metadata = BTreeMap::new();
    if from_safetensors {
        // safe_open().keys() order, strings among the tensors.
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        metadata = SafetensorsFile::open(src, false)?
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with(STRING_KEY_PREFIX) && k.as_str() != "crc_num")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
    metadata
        .entry("format".into())
        .or_insert_with(|| "ms".into());
    let index = plan.sources.len();
    plan.sources.push(SourceFile {
        rank: 0,
        path: src.to_path_buf(),
    });
    let mut seen = std::collections::HashSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    let mut bytes = 0;
    for e in entries {
        let name = options
            .name_map
            .as_ref()
            .and_then(|m| m.get(&e.name))
            .cloned()
            .unwrap_or_else(|| e.name.clone());
        if !seen.insert(name.clone()) {
            return Err(Error::usage_of("name_map", "gives two entries this name")
                .in_tensor(name)
                .in_file(src));
        }
        let Some(content) = Content::whole(index, &e) else {
            return Err(Error::UnsupportedDtype {
                dtype: "MapTensor".into(),
                op: "rewrite",
            }
            .in_tensor(&e.name)
            .in_file(src));
        };
        let t = TensorPlan { name, content };
        bytes += t.bytes();
        tensors.push(t);
    }
    if format == FileFormat::Safetensors && options.crc {
        metadata.insert(
            "crc_num".into(),
            safetensors_crc(&source, &tensors).in_file(src)?.to_string(),
        );
    }
    let entries = tensors.len();
    plan.files.push(FilePlan {
        rank: 0,
        path: dst.to_path_buf(),
        format,
        tensors,
        metadata: (format == FileFormat::Safetensors).then_some(metadata),
    });
    Ok((entries, bytes))
}

/// MindSpore's safetensors CRC of `tensors` (whole copies out of
/// `source`, renamed), read from the source: it goes into the header, which
/// is written before the data.
fn safetensors_crc(source: &Source, tensors: &[TensorPlan]) -> Result<u32> {
    let mut sorted = Vec::with_capacity(tensors.len());
    for t in tensors {
        if let Content::Tensor {
            dtype,
            shape,
            steps,
        } = &t.content
        {
            sorted.push(st::CrcTensor {
                name: &t.name,
                dtype: *dtype,
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                chunks: source.chunks(&steps[0].tensor)?,
            });
        }
    }
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    st::mindspore_crc(sorted.into_iter())
}

/// Writes a planned rewrite.
fn write(
    plan: &Plan,
    options: &RewriteOptions,
    destination: Option<&Path>,
    check: DestinationCheck,
) -> Result<()> {
    write_job(
        plan,
        &WriteSettings {
            manifest: options.manifest,
            verify: options.verify,
            destination,
            ..WriteSettings::new(&options.read, &options.control)
        },
        &Job {
            check,
            ckpt: ckpt_options(options),
            ..Job::default()
        },
    )
    .map(|_| ())
}

/// Copies `src` into `dst` (replaced if it exists).
pub fn rewrite(src: &Path, dst: &Path, options: &RewriteOptions) -> Result<RewriteReport> {
    let format = check_paths(src, dst, options)?;
    let mut plan = Plan {
        sources: Vec::new(),
        files: Vec::new(),
    };
    let (entries, bytes) = plan_file(src, dst, format, options, &mut plan)?;
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).in_file(parent)?;
    }
    write(&plan, options, None, DestinationCheck::Replace)?;
    Ok(RewriteReport {
        output: dst.to_path_buf(),
        entries,
        bytes,
    })
}

/// Options of [`rewrite_tree`].
#[derive(Debug, Clone)]
pub struct TreeRewriteOptions {
    /// The format written (the other one is read).
    pub to: FileFormat,
    /// Only files whose name this regular expression matches (searched
    /// anywhere in the name, as Python's `re.search`).
    pub file_name_regex: Option<String>,
    /// How each file is rewritten.
    pub file: RewriteOptions,
}

/// `mindspore.ckpt_to_safetensors` / `safetensors_to_ckpt` on a directory:
/// every file of the other format in each top-level folder whose name
/// starts with `rank` is rewritten to `dst/<folder>/<name with the
/// extension replaced>`. Existing outputs are refused; if one file fails,
/// the files this run wrote are removed.
pub fn rewrite_tree(
    src: &Path,
    dst: &Path,
    options: &TreeRewriteOptions,
) -> Result<Vec<RewriteReport>> {
    let (from, to) = match options.to {
        FileFormat::Safetensors => (".ckpt", ".safetensors"),
        FileFormat::Ckpt => (".safetensors", ".ckpt"),
    };
    let regex = options
        .file_name_regex
        .as_deref()
        .map(|r| {
            regex::Regex::new(r).map_err(|e| {
                Error::usage_of(
                    "file_name_regex",
                    format!("{r:?} is not a valid regular expression: {e}"),
                )
            })
        })
        .transpose()?;
    let mut rank_dirs: Vec<PathBuf> = std::fs::read_dir(src)
        .in_file(src)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rank") && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    rank_dirs.sort();
    if rank_dirs.is_empty() {
        return Err(Error::missing("no directories starting with 'rank' here").in_file(src));
    }
    let mut tasks = Vec::new();
    for dir in &rank_dirs {
        let out_dir = dst.join(dir.file_name().expect("a directory name"));
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .in_file(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                p.is_file()
                    && name.ends_with(from)
                    && regex.as_ref().map_or(true, |r| r.is_match(&name))
            })
            .collect();
        files.sort();
        for f in files {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .replace(from, to);
            let out = out_dir.join(name);
            tasks.push((f, out));
        }
    }
    if tasks.is_empty() {
        return Err(Error::missing(format!(
            "no {from} file{} in the rank directories",
            if regex.is_some() {
                " matching the file name pattern"
            } else {
                ""
            }
        ))
        .in_file(src));
    }
    // One plan, one write: every output or none.
    let mut plan = Plan {
        sources: Vec::new(),
        files: Vec::new(),
    };
    let mut done = Vec::with_capacity(tasks.len());
    for (input, output) in &tasks {
        check_paths(input, output, &options.file)?;
        let (entries, bytes) = plan_file(input, output, options.to, &options.file, &mut plan)?;
        done.push(RewriteReport {
            output: output.clone(),
            entries,
            bytes,
        });
    }
    write(&plan, &options.file, Some(dst), DestinationCheck::Absent)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ckpt::{Checkpoint, CkptWriter};
    use crate::DType;

    fn small_ckpt(path: &Path) {
        streamed(path, WriteOptions::default());
    }

    fn renamed(map: &[(&str, &str)]) -> RewriteOptions {
        RewriteOptions {
            name_map: Some(
                map.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn renamed_entries_keep_their_place_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        small_ckpt(&src);
        let out = dir.path().join("r.ckpt");
        rewrite(&src, &out, &renamed(&[("b.w", "z.w")])).unwrap();
        let names: Vec<String> = Checkpoint::open(&out, &ReadOptions::default())
            .unwrap()
            .entries()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(names, ["z.w", "a.w", "note"]);

        let bad = dir.path().join("d.safetensors");
        let e = rewrite(&src, &bad, &renamed(&[("b.w", "a.w")])).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage, "{e}");
        assert_eq!(e.tensor(), Some("a.w"), "{e}");
        assert!(e.to_string().contains("m.ckpt"), "{e}");
        assert!(!bad.exists());
    }

    #[test]
    fn a_rewrite_has_manifests_progress_and_verification() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        small_ckpt(&src);
        for ext in ["ckpt", "safetensors"] {
            let planned = dir.path().join(format!("p.{ext}"));
            let progress = crate::exec::Progress::new();
            let o = RewriteOptions {
                manifest: true,
                verify: true,
                control: OutputControl {
                    fsync: false,
                    progress: Some(progress.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let r = rewrite(&src, &planned, &o).unwrap();
            assert_eq!((r.entries, r.bytes), (3, 12));
            assert_eq!(progress.bytes(), 12);
            assert!(crate::formats::manifest::manifest_path(&planned).is_file());
        }
    }

    /// A small checkpoint written by the streaming `.ckpt` writer with
    /// these options.
    fn streamed(path: &Path, options: WriteOptions) {
        let mut w = CkptWriter::create(path, options).unwrap();
        w.write_tensor("b.w", DType::F32, &[2], &[0u8; 8]).unwrap();
        w.write_tensor("a.w", DType::F32, &[1], &[1u8; 4]).unwrap();
        w.write_string("note", "kept").unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn encoded_outputs_are_the_format_writers_bytes_through_the_executor() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.ckpt");
        small_ckpt(&src);
        let checked = |o: RewriteOptions| RewriteOptions {
            manifest: true,
            verify: true,
            ..o
        };
        // A CRC trailer and records cut by rows: the same bytes.
        for (crc, split) in [
            (true, SplitMode::Bytes),
            (false, SplitMode::Rows),
            (true, SplitMode::Rows),
        ] {
            let planned = dir.path().join("p.ckpt");
            let o = RewriteOptions {
                crc,
                split,
                ..Default::default()
            };
            rewrite(&src, &planned, &checked(o.clone())).unwrap();
            let reference = dir.path().join("s.ckpt");
            streamed(&reference, ckpt_options(&o));
            assert_eq!(
                std::fs::read(&planned).unwrap(),
                std::fs::read(&reference).unwrap()
            );
            std::fs::remove_file(&planned).unwrap();
            std::fs::remove_file(crate::formats::manifest::manifest_path(&planned)).unwrap();
        }
        // Encrypted (a random IV per block): the same entries once
        // decrypted, and `verify` reads it back with the key.
        let key = b"0123456789abcdef".to_vec();
        let o = RewriteOptions {
            encryption: Some((key.clone(), EncMode::AesGcm)),
            ..Default::default()
        };
        let planned = dir.path().join("e.ckpt");
        rewrite(&src, &planned, &checked(o)).unwrap();
        let read = ReadOptions {
            decryption: Some((key, EncMode::AesGcm)),
            ..Default::default()
        };
        let (a, b) = (
            Checkpoint::open(&planned, &read).unwrap(),
            Checkpoint::open(&src, &ReadOptions::default()).unwrap(),
        );
        assert_eq!(a.entries().len(), b.entries().len());
        for (x, y) in a.entries().iter().zip(b.entries()) {
            assert_eq!((&x.name, &x.dims), (&y.name, &y.dims));
            assert_eq!(a.chunks(x).concat(), b.chunks(y).concat());
        }
        assert!(Checkpoint::open(&planned, &ReadOptions::default()).is_err());
        // A safetensors CRC: MindSpore's rule, over the renamed tensors.
        let planned = dir.path().join("c.safetensors");
        let o = RewriteOptions {
            crc: true,
            ..renamed(&[("b.w", "c.w")])
        };
        rewrite(&src, &planned, &checked(o)).unwrap();
        let f = SafetensorsFile::open(&planned, true).unwrap();
        let mut h = crc32fast::Hasher::new();
        for (name, bytes) in [("a.w", [1u8; 4].as_slice()), ("c.w", [0u8; 8].as_slice())] {
            h.update(name.as_bytes());
            h.update(bytes);
        }
        assert_eq!(f.metadata()["crc_num"], h.finalize().to_string());
        // What MindSpore cannot read back is refused before anything is written.
        let both = RewriteOptions {
            crc: true,
            encryption: Some((b"0123456789abcdef".to_vec(), EncMode::AesGcm)),
            ..Default::default()
        };
        let out = dir.path().join("x.ckpt");
        assert_eq!(
            rewrite(&src, &out, &both).unwrap_err().kind(),
            crate::error::ErrorKind::Usage
        );
        let out = dir.path().join("x.safetensors");
        assert_eq!(
            rewrite(&src, &out, &both).unwrap_err().kind(),
            crate::error::ErrorKind::Usage
        );
        assert!(!out.exists() && !dir.path().join("x.ckpt").exists());
    }

    #[test]
    fn a_tree_rewrite_refuses_existing_outputs_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for r in 0..2 {
            std::fs::create_dir_all(dir.path().join(format!("src/rank_{r}"))).unwrap();
            small_ckpt(&dir.path().join(format!("src/rank_{r}/c{r}.ckpt")));
        }
        let dst = dir.path().join("dst");
        std::fs::create_dir_all(dst.join("rank_1")).unwrap();
        std::fs::write(dst.join("rank_1/c1.safetensors"), b"keep").unwrap();
        let o = TreeRewriteOptions {
            to: FileFormat::Safetensors,
            file_name_regex: None,
            file: RewriteOptions::default(),
        };
        let e = rewrite_tree(&dir.path().join("src"), &dst, &o).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Destination, "{e}");
        assert!(!dst.join("rank_0/c0.safetensors").exists());
        assert_eq!(
            std::fs::read(dst.join("rank_1/c1.safetensors")).unwrap(),
            b"keep"
        );
    }
}
