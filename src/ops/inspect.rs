//! `reshard inspect`: what a checkpoint, strategy file or `rank_x` tree
//! holds. Index only: no tensor byte is read (unless a CRC check is asked).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::formats::ckpt::{self, Checkpoint, EncMode, EntryKind, ReadOptions};
use crate::formats::safetensors::SafetensorsFile;
use crate::formats::strategy;
use crate::formats::tree::{self, FileFormat};

/// Options of [`inspect`].
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Decryption key and mode for encrypted `.ckpt` files.
    pub decryption: Option<(Vec<u8>, EncMode)>,
    /// Verify CRCs (reads every byte; off by default so inspect is instant).
    pub verify_crc: bool,
}

/// One tensor (or string, or map tensor) of a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    /// Name.
    pub name: String,
    /// Dtype (`Float32`, …), `str`, or `MapTensor`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Content bytes.
    pub bytes: u64,
    /// Records (chunks) the content is stored in.
    pub records: usize,
    /// The value, for string entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl TensorRow {
    /// A tensor stored in one piece at `range` (safetensors, PyTorch).
    fn stored<D: Copy + TryInto<i64>>(
        name: &str,
        dtype: crate::DType,
        shape: &[D],
        range: &std::ops::Range<usize>,
    ) -> TensorRow {
        TensorRow {
            name: name.to_string(),
            dtype: dtype.to_string(),
            shape: shape
                .iter()
                .map(|&d| d.try_into().unwrap_or(i64::MAX))
                .collect(),
            bytes: range.len() as u64,
            records: 1,
            value: None,
        }
    }
}

/// CRC state of a file.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CrcState {
    /// No CRC stored.
    Absent,
    /// Stored, not checked.
    Present,
    /// Stored and checked.
    Verified,
}

/// What one checkpoint file holds.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// `ckpt`, `safetensors` or `pytorch`.
    pub format: &'static str,
    /// Cipher mode, for an encrypted `.ckpt`.
    pub encryption: Option<String>,
    /// CRC state.
    pub crc: CrcState,
    /// safetensors `__metadata__`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<(String, String)>,
    /// Entries in file order.
    pub tensors: Vec<TensorRow>,
    /// Sum of tensor bytes.
    pub total_bytes: u64,
}

/// One parameter layout of a strategy.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutRow {
    /// Parameter name (without the stage prefix).
    pub name: String,
    /// Device matrix.
    pub dev_matrix: Vec<i64>,
    /// Tensor map; nested maps as lists.
    pub tensor_map: serde_json::Value,
    /// Optimizer shard step.
    pub opt_shard_step: i64,
    /// Optimizer shard size.
    pub opt_shard_size: i64,
    /// Pipeline stages holding the parameter.
    pub stages: Vec<i64>,
}

/// What a strategy file (or directory of them) holds.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    /// The file or directory.
    pub path: PathBuf,
    /// Pipeline stages.
    pub stages: usize,
    /// Devices per stage (product of the dev matrix).
    pub devices_per_stage: u64,
    /// Layouts, sorted by name.
    pub layouts: Vec<LayoutRow>,
}

/// One rank of a `rank_x` tree.
#[derive(Debug, Clone, Serialize)]
pub struct RankReport {
    /// Rank number.
    pub rank: usize,
    /// The file MindSpore would load for it, and what it holds.
    pub file: FileReport,
}

/// The result of [`inspect`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// A single checkpoint file.
    Checkpoint(FileReport),
    /// A strategy file or directory.
    Strategy(StrategyReport),
    /// A `rank_x/` tree.
    Tree {
        /// The directory.
        path: PathBuf,
        /// Which form it is in.
        form: DirForm,
        /// Per-rank files.
        ranks: Vec<RankReport>,
    },
    /// A complete checkpoint kept as a directory of files.
    Complete {
        /// The directory.
        path: PathBuf,
        /// Which form it is in.
        form: DirForm,
        /// Its files (data files, then `hyper_param.safetensors`).
        files: Vec<FileReport>,
    },
}

/// The form a checkpoint directory is in (MindSpore's and HuggingFace's
/// conventions; `inspect` says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirForm {
    /// `rank_x/*.ckpt`: distributed, ckpt era.
    DistributedCkpt,
    /// `rank_x/*.safetensors`, each rank complete for its slice.
    DistributedSafetensors,
    /// `rank_x/*.safetensors` saved with `remove_redundancy=True` (each rank
    /// holds only the parameters it owns).
    DistributedSafetensorsDeduplicated,
    /// MindSpore's unified layout (`mindspore.unified_safetensors`).
    Unified,
    /// HuggingFace's sharded layout (`model.safetensors.index.json`).
    HfSharded,
    /// One `.safetensors` file in a directory.
    SingleSafetensors,
    /// Several `.safetensors` files, no map: one checkpoint.
    SafetensorsFolder,
    /// mindformers Checkpoint 2.0: `iteration_XXXXXXXX/` with
    /// `metadata.json` (or the directory holding the tracker).
    Checkpoint2,
}

impl DirForm {
    /// A one-line description for people.
    pub fn describe(self) -> &'static str {
        match self {
            DirForm::DistributedCkpt => "distributed .ckpt (rank_x/ folders)",
            DirForm::DistributedSafetensors => "distributed safetensors (rank_x/ folders)",
            DirForm::DistributedSafetensorsDeduplicated => {
                "distributed safetensors saved with remove_redundancy=True (rank_x/ folders; each rank holds only what it owns)"
            }
            DirForm::Unified => {
                "unified safetensors (mindspore.unified_safetensors: param_name_map.json, part*.safetensors)"
            }
            DirForm::HfSharded => "complete weights, HuggingFace sharded (model.safetensors.index.json)",
            DirForm::SingleSafetensors => "complete weights, one .safetensors file",
            DirForm::SafetensorsFolder => {
                "complete weights in several .safetensors files (no name map; read as one)"
            }
            DirForm::Checkpoint2 => {
                "mindformers Checkpoint 2.0 (iteration_XXXXXXXX/ with metadata.json; files by storage rank)"
            }
        }
    }
}

/// What `path` is, judged by its bytes rather than its name (strategy
/// files are called `*.ckpt` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A MindSpore checkpoint (plain or encrypted).
    Ckpt,
    /// A safetensors file.
    Safetensors,
    /// A strategy file (protobuf or JSON).
    Strategy,
}

/// Sniffs the kind of a file: a checkpoint record starts `0a <len> 0a`
/// (Checkpoint.value → Value.tag); a strategy map starts `08`
/// (ParallelStrategyMap.current_stage); encrypted checkpoints start with a
/// cipher magic; safetensors starts with a little-endian header length
/// followed by `{`.
pub fn detect(path: &Path) -> Result<Detected> {
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        return Ok(Detected::Strategy);
    }
    let map = ckpt::map_file(path)?;
    let head = &map[..map.len().min(16)];
    if ckpt::crypt::detect(head).is_some() {
        return Ok(Detected::Ckpt);
    }
    if head.len() > 8 && head[8] == b'{' {
        return Ok(Detected::Safetensors);
    }
    match head.first() {
        Some(0x0a) => Ok(Detected::Ckpt),
        Some(0x08) => Ok(Detected::Strategy),
        None => Err(Error::bad_input("empty file").in_file(path)),
        _ => match FileFormat::of_path(path) {
            Some(FileFormat::Safetensors) => Ok(Detected::Safetensors),
            _ => Err(Error::bad_input(
                "not a MindSpore checkpoint, safetensors or strategy file (unrecognised first bytes)",
            )
            .in_file(path)),
        },
    }
}

/// Inspects each rank's checkpoint file.
fn rank_reports(files: Vec<(usize, PathBuf)>, options: &InspectOptions) -> Result<Vec<RankReport>> {
    files
        .into_iter()
        .map(|(rank, file)| {
            Ok(RankReport {
                rank,
                file: inspect_checkpoint(&file, options)?,
            })
        })
        .collect()
}

/// Inspects a checkpoint, strategy file, strategy directory or `rank_x` tree.
pub fn inspect(path: &Path, options: &InspectOptions) -> Result<Report> {
    if crate::formats::checkpoint2::is_checkpoint2(path) {
        let ck = crate::formats::checkpoint2::open(path)?;
        let ranks = rank_reports(crate::formats::checkpoint2::files(&ck.params), options)?;
        return Ok(Report::Tree {
            path: ck.dir,
            form: DirForm::Checkpoint2,
            ranks,
        });
    }
    if path.is_dir() {
        if tree::is_rank_tree(path) {
            let (format, files) = tree::tree_checkpoints(path)?;
            let ranks = rank_reports(files, options)?;
            let dedup = ranks.iter().any(|r| {
                r.file
                    .metadata
                    .iter()
                    .any(|(k, v)| k == "remove_redundancy" && v == "True")
            });
            let form = match (format, dedup) {
                (FileFormat::Ckpt, _) => DirForm::DistributedCkpt,
                (FileFormat::Safetensors, false) => DirForm::DistributedSafetensors,
                (FileFormat::Safetensors, true) => DirForm::DistributedSafetensorsDeduplicated,
            };
            return Ok(Report::Tree {
                path: path.to_path_buf(),
                form,
                ranks,
            });
        }
        if let Some(dir) = tree::complete_dir(path)? {
            let form = match dir.kind {
                tree::CompleteKind::Unified => DirForm::Unified,
                tree::CompleteKind::HfIndex => DirForm::HfSharded,
                tree::CompleteKind::SingleFile => DirForm::SingleSafetensors,
                tree::CompleteKind::Folder => DirForm::SafetensorsFolder,
            };
            let files = dir
                .files
                .iter()
                .map(|f| inspect_checkpoint(f, options))
                .collect::<Result<_>>()?;
            return Ok(Report::Complete {
                path: path.to_path_buf(),
                form,
                files,
            });
        }
        return Ok(Report::Strategy(inspect_strategy(path)?));
    }
    if crate::formats::torch::is_torch_path(path) {
        return Ok(Report::Checkpoint(inspect_checkpoint(path, options)?));
    }
    match detect(path)? {
        Detected::Strategy => Ok(Report::Strategy(inspect_strategy(path)?)),
        _ => Ok(Report::Checkpoint(inspect_checkpoint(path, options)?)),
    }
}

/// Inspects one `.ckpt` or `.safetensors` file.
pub fn inspect_checkpoint(path: &Path, options: &InspectOptions) -> Result<FileReport> {
    if crate::formats::torch::is_torch_path(path) {
        // PyTorch weights, through the restricted unpickler (no code runs).
        let f = crate::formats::torch::TorchFile::open(path)?;
        let tensors: Vec<TensorRow> = f
            .entries()
            .iter()
            .map(|e| TensorRow::stored(&e.name, e.dtype, &e.shape, &e.range))
            .collect();
        return Ok(FileReport {
            path: path.to_path_buf(),
            format: "pytorch",
            encryption: None,
            crc: CrcState::Absent,
            metadata: Vec::new(),
            total_bytes: tensors.iter().map(|t| t.bytes).sum(),
            tensors,
        });
    }
    if detect(path)? == Detected::Safetensors {
        let f = SafetensorsFile::open(path, options.verify_crc)?;
        let tensors: Vec<TensorRow> = f
            .entries()
            .iter()
            .map(|e| TensorRow::stored(&e.name, e.dtype, &e.shape, &e.range))
            .chain(f.strings().map(|(name, value)| TensorRow {
                name: name.to_string(),
                dtype: "str".into(),
                shape: vec![0],
                bytes: 0,
                records: 0,
                value: Some(value.to_string()),
            }))
            .collect();
        let crc = match (f.metadata().contains_key("crc_num"), options.verify_crc) {
            (false, _) => CrcState::Absent,
            (true, false) => CrcState::Present,
            (true, true) => CrcState::Verified,
        };
        return Ok(FileReport {
            path: path.to_path_buf(),
            format: "safetensors",
            encryption: None,
            crc,
            metadata: f
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            total_bytes: tensors.iter().map(|t| t.bytes).sum(),
            tensors,
        });
    }
    let ck = Checkpoint::open(
        path,
        &ReadOptions {
            decryption: options.decryption.clone(),
            verify_crc: options.verify_crc,
        },
    )?;
    let mut tensors = Vec::with_capacity(ck.entries().len());
    for e in ck.entries() {
        let (dtype, shape, value) = match &e.kind {
            EntryKind::Tensor(d) => (d.to_string(), e.dims.clone(), None),
            EntryKind::Str => (
                "str".to_string(),
                e.dims.clone(),
                Some(ck.string_value(e).in_file(path)?),
            ),
            EntryKind::MapTensor(parts) => (
                format!(
                    "MapTensor({})",
                    parts
                        .iter()
                        .map(|p| p.type_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                parts.first().map(|p| p.dims.clone()).unwrap_or_default(),
                None,
            ),
        };
        let bytes = match &e.kind {
            EntryKind::MapTensor(parts) => parts
                .iter()
                .flat_map(|p| p.chunks.iter())
                .map(|r| (r.end - r.start) as u64)
                .sum(),
            _ => e.nbytes(),
        };
        tensors.push(TensorRow {
            name: e.name.clone(),
            dtype,
            shape,
            bytes,
            records: e.records,
            value,
        });
    }
    let crc = match (ck.has_crc(), options.verify_crc) {
        (false, _) => CrcState::Absent,
        (true, false) => CrcState::Present,
        (true, true) => CrcState::Verified,
    };
    Ok(FileReport {
        path: path.to_path_buf(),
        format: "ckpt",
        encryption: ck.encryption().map(|m| m.name().to_string()),
        crc,
        metadata: Vec::new(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
    })
}

/// Inspects a strategy file or a directory of per-rank strategy files.
pub fn inspect_strategy(path: &Path) -> Result<StrategyReport> {
    let strategy = strategy::load(path)?;
    let table = strategy.layout_table(None).in_file(path)?;
    let layouts = table
        .iter()
        .map(|(name, l)| LayoutRow {
            name: name.clone(),
            dev_matrix: l.dev_matrix.iter().map(|&d| d as i64).collect(),
            tensor_map: l.tensor_map.to_json(),
            opt_shard_step: l.opt_weight_shard_step as i64,
            opt_shard_size: l.opt_weight_shard_size as i64,
            stages: l.stages.iter().map(|&s| s as i64).collect(),
        })
        .collect();
    Ok(StrategyReport {
        path: path.to_path_buf(),
        stages: table.stage_num().in_file(path)?,
        devices_per_stage: table.device_num_per_stage().in_file(path)?,
        layouts,
    })
}
