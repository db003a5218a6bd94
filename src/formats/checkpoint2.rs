//! mindformers Checkpoint 2.0 directories (`use_legacy_format: False`,
//! spec safetensors-era §6): `iteration_XXXXXXXX/` with `metadata.json`,
//! `common.json` and `[prefix-]model|opt-IIIIIII-TTTTTTT.safetensors`, and
//! the `latest_checkpointed_iteration.txt` tracker beside them.
//!
//! Reading only: [`open`] finds the iteration directory, parses
//! `metadata.json` (the 1.7/1.8 schema, `indent=4`, storage entries
//! `{file_name, storage_rank}`; and 2.1's compact one, which adds
//! `rank_group`) and turns every shard into a box of its parameter's global
//! tensor stored in one file. `global_offset` is mindformers' `(slice_id,)`:
//! the row-major index of the shard in the grid `axis_fragmentations`, not
//! an element offset. Every referenced file must exist and hold the tensor
//! with the shard's shape, and the shards of a parameter must tile its
//! global shape exactly: a missing file, a missing or overlapping shard is
//! an error naming the file and the parameter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result, ResultExt};

/// The tracker file mindformers writes last.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
/// The metadata file of an iteration directory.
pub const METADATA: &str = "metadata.json";

/// One stored shard: a box of the parameter's global tensor, held by
/// tensor `name` of `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Shard index (`global_offset[0]`).
    pub slice_id: u64,
    /// First global index per dim.
    pub start: Vec<u64>,
    /// The shard's shape (`local_shape`).
    pub shape: Vec<u64>,
    /// The file holding it (first `storage_data` entry).
    pub file: PathBuf,
    /// `storage_rank` of that entry.
    pub storage_rank: usize,
}

/// One parameter of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Name.
    pub name: String,
    /// `properties.dtype` (MindSpore's `str(dtype)`).
    pub dtype: String,
    /// Global shape.
    pub global_shape: Vec<u64>,
    /// Shards, in `chunk` order.
    pub shards: Vec<Shard>,
}

/// An opened Checkpoint 2.0 iteration directory.
#[derive(Debug, Clone)]
pub struct Checkpoint2 {
    /// The `iteration_XXXXXXXX/` directory.
    pub dir: PathBuf,
    /// Parameters in `state_dict_metadata` order.
    pub params: Vec<Param>,
}

/// Whether `path` is a Checkpoint 2.0 directory: an iteration directory
/// (`metadata.json` with `state_dict_metadata`) or a checkpoint directory
/// with the tracker.
pub fn is_checkpoint2(path: &Path) -> bool {
    path.is_dir() && (path.join(TRACKER).is_file() || is_iteration_dir(path))
}

fn is_iteration_dir(path: &Path) -> bool {
    std::fs::read(path.join(METADATA))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v.get("state_dict_metadata").is_some())
}

/// The iteration directory `path` stands for: itself, or the one the
/// tracker names.
pub fn iteration_dir(path: &Path) -> Result<PathBuf> {
    if path.join(METADATA).is_file() {
        return Ok(path.to_path_buf());
    }
    let tracker = path.join(TRACKER);
    let text = std::fs::read_to_string(&tracker).in_file(&tracker)?;
    let it: u64 = text.trim().parse().map_err(|_| {
        Error::bad_input(format!("{text:?} is not an iteration number")).in_file(&tracker)
    })?;
    let dir = path.join(format!("iteration_{it:08}"));
    if !dir.join(METADATA).is_file() {
        return Err(Error::missing(format!(
            "the tracker names iteration {it}, but {} has no {METADATA}",
            dir.display()
        ))
        .in_file(&tracker));
    }
    Ok(dir)
}

/// Python's `repr` of a `str`, as in mindformers' storage keys.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::new();
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The `storage_data` key of a shard: `str((name, tuple(global_offset)))`.
pub fn storage_key(name: &str, offset: &[u64]) -> String {
    let items = match offset {
        [one] => format!("{one},"),
        many => many
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!("({}, ({items}))", py_repr(name))
}

fn u64s(v: &Value, what: &str) -> Result<Vec<u64>> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| Error::bad_input(format!("{what} must be a list of non-negative integers")))
}

/// Parses an iteration directory's `metadata.json` and checks it against
/// the files: see the module documentation.
pub fn open(path: &Path) -> Result<Checkpoint2> {
    let dir = iteration_dir(path)?;
    let meta_path = dir.join(METADATA);
    let bytes = std::fs::read(&meta_path).in_file(&meta_path)?;
    let meta: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::bad_input(format!("not valid JSON: {e}")).in_file(&meta_path))?;
    let params = parse(&meta, &dir).map_err(|e| e.in_file(&meta_path))?;
    Ok(Checkpoint2 { dir, params })
}

/// [`open`] on parsed JSON; files are looked up in `dir`.
pub fn parse(meta: &Value, dir: &Path) -> Result<Vec<Param>> {
    let sd = meta
        .get("state_dict_metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_input("no state_dict_metadata object"))?;
    let storage = meta
        .get("storage_data")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_input("no storage_data object"))?;
    let mut exists: HashMap<String, bool> = HashMap::new();
    let mut params = Vec::with_capacity(sd.len());
    for (name, m) in sd {
        let p = parse_param(name, m, storage, dir, &mut exists).map_err(|e| e.in_tensor(name))?;
        params.push(p);
    }
    Ok(params)
}

fn parse_param(
    name: &str,
    m: &Value,
    storage: &serde_json::Map<String, Value>,
    dir: &Path,
    exists: &mut HashMap<String, bool>,
) -> Result<Param> {
    let dtype = m
        .pointer("/properties/dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_input("no properties.dtype"))?
        .to_string();
    let global = u64s(&m["global_shape"], "global_shape")?;
    let frags = u64s(&m["axis_fragmentations"], "axis_fragmentations")?;
    if frags.len() != global.len() || frags.contains(&0) {
        return Err(Error::bad_input(format!(
            "axis_fragmentations {frags:?} does not fit global_shape {global:?}"
        )));
    }
    let chunks = m
        .get("chunk")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::bad_input("no chunk list"))?;
    let mut shards: Vec<Shard> = Vec::with_capacity(chunks.len());
    for c in chunks {
        let offset = u64s(&c["global_offset"], "global_offset")?;
        let shape = u64s(&c["local_shape"], "local_shape")?;
        let [slice_id] = offset[..] else {
            return Err(Error::unsupported(format!(
                "global_offset {offset:?} is not mindformers' (slice_id,)"
            )));
        };
        if shape.len() != global.len() {
            return Err(Error::bad_input(format!(
                "local_shape {shape:?} does not fit global_shape {global:?}"
            )));
        }
        // Row-major coordinate of the shard in the fragmentation grid.
        let mut coord = vec![0u64; frags.len()];
        let mut rest = slice_id;
        for d in (0..frags.len()).rev() {
            coord[d] = rest % frags[d];
            rest /= frags[d];
        }
        if rest != 0 {
            return Err(Error::bad_input(format!(
                "shard {slice_id} is outside the grid axis_fragmentations {frags:?}"
            )));
        }
        let start: Vec<u64> = coord.iter().zip(&shape).map(|(c, s)| c * s).collect();
        if start
            .iter()
            .zip(&shape)
            .zip(&global)
            .any(|((b, l), g)| b + l > *g)
        {
            return Err(Error::bad_input(format!(
                "shard {slice_id} (local_shape {shape:?}) reaches past global_shape {global:?}"
            )));
        }
        let key = storage_key(name, &offset);
        let entries = storage
            .get(&key)
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Error::bad_input(format!(
                    "storage_data has no entry {key:?} for shard {slice_id}"
                ))
            })?;
        let mut first = None;
        for e in entries {
            let file = e
                .get("file_name")
                .and_then(Value::as_str)
                .filter(|f| !f.contains(['/', '\\']) && *f != ".." && !f.is_empty())
                .ok_or_else(|| {
                    Error::bad_input(format!(
                        "storage entry of shard {slice_id} has no plain file_name"
                    ))
                })?;
            let rank = e.get("storage_rank").and_then(Value::as_u64).unwrap_or(0) as usize;
            let present = *exists
                .entry(file.to_string())
                .or_insert_with(|| dir.join(file).is_file());
            if !present {
                return Err(Error::missing(format!(
                    "metadata.json says shard {slice_id} is in {file}, which is missing from {}",
                    dir.display()
                )));
            }
            first.get_or_insert((dir.join(file), rank));
        }
        let (file, storage_rank) = first.expect("non-empty");
        shards.push(Shard {
            slice_id,
            start,
            shape,
            file,
            storage_rank,
        });
    }
    check_tiling(&global, &shards)?;
    Ok(Param {
        name: name.to_string(),
        dtype,
        global_shape: global,
        shards,
    })
}

/// The shards must cover the global tensor exactly once.
fn check_tiling(global: &[u64], shards: &[Shard]) -> Result<()> {
    for (i, a) in shards.iter().enumerate() {
        for b in &shards[..i] {
            let overlap = a
                .start
                .iter()
                .zip(&a.shape)
                .zip(b.start.iter().zip(&b.shape))
                .all(|((&sa, &la), (&sb, &lb))| sa < sb + lb && sb < sa + la);
            if overlap && !a.shape.contains(&0) {
                return Err(Error::bad_input(format!(
                    "shards {} and {} overlap (starts {:?} and {:?}, shapes {:?} and {:?})",
                    b.slice_id, a.slice_id, b.start, a.start, b.shape, a.shape
                )));
            }
        }
    }
    let covered: u64 = shards.iter().map(|s| s.shape.iter().product::<u64>()).sum();
    let total: u64 = global.iter().product();
    if covered != total {
        return Err(Error::missing(format!(
            "the shards cover {covered} of the {total} elements of global_shape {global:?}: some are missing"
        )));
    }
    Ok(())
}

/// The distinct files of the checkpoint with their storage rank, sorted.
pub fn files(params: &[Param]) -> Vec<(usize, PathBuf)> {
    let mut seen: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for p in params {
        for s in &p.shards {
            seen.entry(s.file.clone()).or_insert(s.storage_rank);
        }
    }
    let mut out: Vec<(usize, PathBuf)> = seen.into_iter().map(|(f, r)| (r, f)).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use serde_json::json;

    #[test]
    fn storage_keys_are_python_reprs() {
        assert_eq!(storage_key("w_row", &[0]), "('w_row', (0,))");
        assert_eq!(storage_key("it's", &[3]), "(\"it's\", (3,))");
        assert_eq!(storage_key("a\\b", &[1, 2]), "('a\\\\b', (1, 2))");
    }

    fn meta(frags: [u64; 2], chunks: Value, storage: Value) -> Value {
        json!({"state_dict_metadata": {"w": {
            "properties": {"dtype": "BFloat16", "replica_id": [0, 0, 1, 1]},
            "global_shape": [8, 4], "axis_fragmentations": frags,
            "layout": null, "chunk": chunks}},
            "storage_data": storage})
    }

    #[test]
    fn spec_example_both_schemas() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["m-0.safetensors", "m-2.safetensors"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let chunks = json!([{"global_offset": [0], "local_shape": [4, 4]},
                            {"global_offset": [1], "local_shape": [4, 4]}]);
        // 2.1: rank_group; 1.7/1.8: without.
        for with_group in [true, false] {
            let entry = |f: &str, r: u64| {
                if with_group {
                    json!([{"file_name": f, "storage_rank": r, "rank_group": [0, 2]}])
                } else {
                    json!([{"file_name": f, "storage_rank": r}])
                }
            };
            let storage = json!({"('w', (0,))": entry("m-0.safetensors", 0),
                                 "('w', (1,))": entry("m-2.safetensors", 2)});
            let p = parse(&meta([2, 1], chunks.clone(), storage), dir.path()).unwrap();
            assert_eq!(p[0].shards[1].start, vec![4, 0]);
            assert_eq!(p[0].shards[1].storage_rank, 2);
            assert_eq!(files(&p).len(), 2);
        }
    }

    #[test]
    fn missing_files_and_bad_shards_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.safetensors"), b"").unwrap();
        let one = |id: u64, shape: [u64; 2]| json!({"global_offset": [id], "local_shape": shape});
        let st = |ids: &[u64], f: &str| {
            let mut m = serde_json::Map::new();
            for id in ids {
                m.insert(
                    format!("('w', ({id},))"),
                    json!([{"file_name": f, "storage_rank": 0}]),
                );
            }
            Value::Object(m)
        };
        let err = |m: Value| parse(&m, dir.path()).unwrap_err();
        let e = err(meta(
            [2, 1],
            json!([one(0, [4, 4]), one(1, [4, 4])]),
            st(&[0, 1], "gone.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
        assert_eq!(e.tensor(), Some("w"));
        assert!(e.to_string().contains("gone.safetensors"), "{e}");
        let e = err(meta(
            [2, 1],
            json!([one(0, [4, 4])]),
            st(&[0], "a.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
        let e = err(meta(
            [2, 1],
            json!([one(0, [8, 4]), one(1, [4, 4])]),
            st(&[0, 1], "a.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        let e = err(meta(
            [1, 1],
            json!([one(0, [8, 4]), one(0, [8, 4])]),
            st(&[0], "a.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        assert!(e.to_string().contains("overlap"), "{e}");
        let e = err(meta(
            [2, 1],
            json!([one(0, [4, 4]), one(1, [4, 4])]),
            st(&[0], "a.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        assert!(e.to_string().contains("no entry"), "{e}");
        let e = err(meta(
            [2, 1],
            json!([one(5, [4, 4])]),
            st(&[5], "a.safetensors"),
        ));
        assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        assert!(e.to_string().contains("outside the grid"), "{e}");
    }
}
