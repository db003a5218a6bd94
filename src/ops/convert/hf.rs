//! HuggingFace model directories: reading `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`
//! (indexes only, every shard memory-mapped), and writing the index and
//! `config.json` of a converted model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::engine::InTensor;
use crate::dtype::DType;
use crate::error::{Error, Result, ResultExt};
use crate::formats::safetensors::SafetensorsFile;

/// `model.safetensors.index.json`.
pub const INDEX: &str = "model.safetensors.index.json";

/// An opened HuggingFace checkpoint: its shard files and tensors.
#[derive(Debug)]
pub struct HfInput {
    /// Shard files, in order.
    pub files: Vec<PathBuf>,
    /// Tensors, file by file in data order.
    pub tensors: Vec<InTensor>,
    /// `config.json` beside the weights, if there is one.
    pub config: Option<PathBuf>,
}

fn is_pytorch(path: &Path) -> bool {
    crate::formats::torch::is_torch_path(path)
}

/// `pytorch_model.bin.index.json`, the index of sharded PyTorch weights.
pub const TORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// The shard files an index names, checked to exist.
fn indexed_files(dir: &Path, index: &Path, map: &BTreeMap<String, String>) -> Result<Vec<PathBuf>> {
    let mut files: Vec<String> = map.values().cloned().collect();
    files.sort();
    files.dedup();
    let mut paths = Vec::with_capacity(files.len());
    for f in &files {
        let p = dir.join(f);
        if !p.is_file() {
            let first = map.iter().find(|(_, v)| *v == f).map(|(k, _)| k.as_str());
            return Err(Error::missing(format!(
                "shard {f:?} named in the index (for {:?} and others) is missing",
                first.unwrap_or("")
            ))
            .in_file(index));
        }
        paths.push(p);
    }
    Ok(paths)
}

/// Opens the HuggingFace checkpoint at `path`: a model directory or one
/// `.safetensors` file.
pub fn open(path: &Path) -> Result<HfInput> {
    if !path.exists() {
        return Err(Error::missing("no such file or directory").in_file(path));
    }
    if path.is_file() {
        if !is_pytorch(path) && path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            let hint = if path.extension().and_then(|e| e.to_str()) == Some("ckpt") {
                "this is a MindSpore checkpoint; convert it reversed, to HuggingFace"
            } else {
                "give a HuggingFace model directory, a .safetensors file or PyTorch .bin/.pt weights"
            };
            return Err(Error::bad_input(hint).in_file(path));
        }
        let config = path
            .parent()
            .map(|d| d.join("config.json"))
            .filter(|c| c.is_file());
        return read_files(vec![path.to_path_buf()], None, config);
    }
    let config = Some(path.join("config.json")).filter(|c| c.is_file());
    for name in [INDEX, TORCH_INDEX] {
        let index = path.join(name);
        if index.is_file() {
            let map = read_index(&index)?;
            let paths = indexed_files(path, &index, &map)?;
            return read_files(paths, Some((&index, &map)), config);
        }
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return read_files(vec![single], None, config);
    }
    let mut shards = Vec::new();
    let mut pickles = Vec::new();
    for e in std::fs::read_dir(path).in_file(path)? {
        let p = e.in_file(path)?.path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => shards.push(p),
            Some("bin" | "pt" | "pth") if p.is_file() => pickles.push(p),
            _ => {}
        }
    }
    shards.sort();
    if !shards.is_empty() {
        return read_files(shards, None, config);
    }
    // PyTorch weights: pytorch_model.bin, or its shards without an index
    // (training_args.bin and the like are not weights).
    pickles.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pytorch_model") || n.starts_with("model"))
    });
    pickles.sort();
    if !pickles.is_empty() {
        return read_files(pickles, None, config);
    }
    Err(Error::missing(
        "no model.safetensors, model.safetensors.index.json, *.safetensors, pytorch_model.bin \
         or pytorch_model.bin.index.json here",
    )
    .in_file(path))
}

fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let bytes = std::fs::read(index).in_file(index)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(index))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_input("no \"weight_map\" object").in_file(index))?;
    map.iter()
        .map(|(k, v)| {
            v.as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                .map(|f| (k.clone(), f.to_string()))
                .ok_or_else(|| {
                    Error::bad_input(format!("weight_map[{k:?}] is not a shard file name"))
                        .in_file(index)
                })
        })
        .collect()
}

struct Listed {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
}

fn read_files(
    files: Vec<PathBuf>,
    index: Option<(&Path, &BTreeMap<String, String>)>,
    config: Option<PathBuf>,
) -> Result<HfInput> {
    let mut tensors = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (shard, path) in files.iter().enumerate() {
        let listed: Vec<(String, DType, Vec<u64>)> = if is_pytorch(path) {
            crate::formats::torch::TorchFile::open(path)?
                .entries()
                .iter()
                .map(|e| (e.name.clone(), e.dtype, e.shape.clone()))
                .collect()
        } else {
            SafetensorsFile::open(path, false)?
                .entries()
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        e.dtype,
                        e.shape.iter().map(|&d| d as u64).collect(),
                    )
                })
                .collect()
        };
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        for (name, dtype, shape) in listed {
            let e = Listed { name, dtype, shape };
            if let Some(&other) = seen.get(&e.name) {
                return Err(Error::bad_input(format!(
                    "tensor {:?} is in both {} and {}",
                    e.name,
                    files[other].display(),
                    path.display()
                )));
            }
            if let Some((index_path, map)) = index {
                match map.get(&e.name) {
                    Some(f) if f == file_name => {}
                    Some(f) => {
                        return Err(Error::bad_input(format!(
                            "the index puts {:?} in {f:?} but it is in {file_name:?} (a duplicate or a stale index)",
                            e.name
                        ))
                        .in_file(index_path))
                    }
                    None => {
                        return Err(Error::bad_input(format!(
                            "{:?} (in {file_name:?}) is not in the index",
                            e.name
                        ))
                        .in_file(index_path))
                    }
                }
            }
            seen.insert(e.name.clone(), shard);
            tensors.push(InTensor {
                name: e.name,
                dtype: e.dtype,
                shape: e.shape,
                shard,
            });
        }
    }
    if let Some((index_path, map)) = index {
        if let Some(missing) = map.keys().find(|k| !seen.contains_key(*k)) {
            return Err(Error::missing(format!(
                "the index names {missing:?} in {:?} but that shard does not hold it",
                map[missing]
            ))
            .in_file(index_path));
        }
    }
    Ok(HfInput {
        files,
        tensors,
        config,
    })
}

/// Parses a `--max-shard-size` like transformers: `5GB` (10⁹), `500MB`,
/// `2GiB` (2³⁰), `100KB`, or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::usage_of("max_shard_size", format!("{s:?} is not a size like 5GB")))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => {
            return Err(Error::usage_of(
                "max_shard_size",
                format!("{s:?}: unknown unit {other:?} (B, KB, MB, GB, KiB, MiB, GiB)"),
            ))
        }
    };
    let bytes = (n * mult as f64) as u64;
    if bytes == 0 {
        return Err(Error::usage_of("max_shard_size", "must be positive"));
    }
    Ok(bytes)
}

/// Splits tensors (in order, with their byte sizes) into shards of at most
/// `max` bytes, like transformers' `split_torch_state_dict_into_shards`: a
/// tensor that does not fit starts a new shard; one larger than `max` gets
/// a shard of its own.
pub fn shard(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if shards.is_empty() || (current + s > max && current > 0) {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("pushed").push(i);
        current += s;
    }
    shards
}

/// Shard file names: `model.safetensors`, or `model-0000i-of-0000n.safetensors`.
pub fn shard_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// `model.safetensors.index.json` as transformers writes it
/// (`json.dumps(index, indent=2, sort_keys=True)` plus a newline).
pub fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut metadata = Map::new();
    metadata.insert("total_size".into(), total_size.into());
    let mut root = BTreeMap::new();
    root.insert("metadata", Value::Object(metadata));
    root.insert(
        "weight_map",
        Value::Object(
            weight_map
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    let mut text = serde_json::to_string_pretty(&root)
        .map_err(|e| Error::Internal(format!("cannot serialise {INDEX}: {e}")))?;
    text.push('\n');
    Ok(text.into_bytes())
}

/// transformers' `torch_dtype` spelling of a dtype.
pub fn torch_dtype_name(d: DType) -> Option<&'static str> {
    match d {
        DType::F16 => Some("float16"),
        DType::BF16 => Some("bfloat16"),
        DType::F32 => Some("float32"),
        DType::F64 => Some("float64"),
        _ => None,
    }
}

/// The dtype of a transformers `torch_dtype` string.
pub fn dtype_of_torch_name(s: &str) -> Option<DType> {
    match s {
        "float16" | "half" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        "float32" | "float" => Some(DType::F32),
        "float64" | "double" => Some(DType::F64),
        _ => None,
    }
}

/// `config.json`: `raw` as given, with `torch_dtype` set when `dtype` is.
/// Four-space-free JSON with two-space indent, like `to_json_string`.
pub fn config_json(raw: &Map<String, Value>, dtype: Option<DType>) -> Result<Vec<u8>> {
    let mut raw = raw.clone();
    if let Some(name) = dtype.and_then(torch_dtype_name) {
        raw.insert("torch_dtype".into(), Value::String(name.into()));
    }
    let mut text = serde_json::to_string_pretty(&Value::Object(raw))
        .map_err(|e| Error::Internal(format!("cannot serialise config.json: {e}")))?;
    text.push('\n');
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        for bad in ["5 parsecs", "0", "five"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Usage, "{e}");
            assert_eq!(e.option(), Some("max_shard_size"), "{e}");
        }
    }

    #[test]
    fn sharding_starts_a_new_shard_when_full() {
        assert_eq!(shard(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
        assert_eq!(shard(&[10, 1, 1], 8), vec![vec![0], vec![1, 2]]);
        assert_eq!(shard(&[1, 10, 1], 8), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(shard(&[], 8), Vec::<Vec<usize>>::new());
        assert_eq!(shard_names(1), ["model.safetensors"]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
    }
}
