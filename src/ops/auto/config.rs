//! The settings of an auto conversion: the mindformers YAML keys that govern
//! loading, reshard's own settings (from CLI flags or the C ABI's JSON), and
//! the launcher's environment (`RANK_ID`, `RANK_SIZE`,
//! `DEVICE_NUM_PER_NODE`), resolved into [`AutoOptions`].
//!
//! Values are read the way mindformers reads them (PyYAML, YAML 1.1):
//! `True`/`False`/`yes`/`no` are booleans, and an empty string, `null`, `~`
//! or the string `None` leave a path unset. `base_config` lists (paths
//! relative to the YAML file) are read first and overridden by the file, as
//! `MindFormerConfig` does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

use super::{AutoOptions, ParallelConfig};
use crate::error::{Error, Result, ResultExt};
use crate::formats::tree::FileFormat;

/// The mindformers YAML keys reshard reads; every other key of the YAML is
/// ignored.
pub const YAML_KEYS: &[&str] = &[
    "load_checkpoint",
    "src_strategy_path_or_dir",
    "auto_trans_ckpt",
    "transform_process_num",
    "transform_by_rank",
    "npu_num_per_node",
    "use_parallel",
    "only_save_strategy",
    "output_dir",
    "load_ckpt_format",
    "parallel_config",
    "remove_redundancy",
    "resume_training",
];

/// reshard's own settings, given as CLI flags or in the C ABI's JSON (not
/// read from the YAML, whose other keys are ignored).
pub const RESHARD_KEYS: &[&str] = &[
    "rank_id",
    "world_size",
    "node_local",
    "dst_strategy",
    "workers",
    "timeout_s",
    "heartbeat_timeout_s",
    "poll_ms",
    "force",
    "exchange",
    "rendezvous",
];

/// The `parallel_config` keys reshard reads.
const PARALLEL_KEYS: &[&str] = &["data_parallel", "model_parallel", "pipeline_stage"];

/// Settings before resolution: the YAML's keys overlaid with overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    values: Map<String, Value>,
    /// Where the values came from, for messages (`run.yaml`, `--set`, …).
    origin: String,
}

impl Settings {
    /// No settings: every key takes its default.
    pub fn new() -> Settings {
        Settings {
            values: Map::new(),
            origin: "settings".into(),
        }
    }

    /// Reads the keys of [`YAML_KEYS`] from a mindformers YAML file (and its
    /// `base_config` files).
    pub fn from_yaml_file(path: &Path) -> Result<Settings> {
        let map = read_yaml_tree(path, 0)?;
        let mut values = Map::new();
        for (k, v) in map {
            if YAML_KEYS.contains(&k.as_str()) {
                values.insert(k, v);
            }
        }
        Ok(Settings {
            values,
            origin: path.display().to_string(),
        })
    }

    /// Parses YAML text (no `base_config` handling: there is no file to be
    /// relative to).
    pub fn from_yaml_str(text: &str) -> Result<Settings> {
        let map = yaml_text_to_map(text)?;
        let mut values = Map::new();
        for (k, v) in map {
            if YAML_KEYS.contains(&k.as_str()) {
                values.insert(k, v);
            }
        }
        Ok(Settings {
            values,
            origin: "YAML".into(),
        })
    }

    /// Parses a JSON object of settings (the C ABI's form): keys of
    /// [`YAML_KEYS`] and [`RESHARD_KEYS`]; an unknown key is an error.
    pub fn from_json_str(text: &str) -> Result<Settings> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::usage(format!("the settings are not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::usage("the settings must be a JSON object"));
        };
        let mut s = Settings {
            values: Map::new(),
            origin: "JSON settings".into(),
        };
        for (k, v) in map {
            s.set(&k, v)?;
        }
        Ok(s)
    }

    /// Sets one key; `parallel_config.pipeline_stage` style dotted keys set
    /// one field of `parallel_config`. An unknown key is an error naming the
    /// closest known one.
    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        if let Some(sub) = key.strip_prefix("parallel_config.") {
            check_key(sub, PARALLEL_KEYS)?;
            let entry = self
                .values
                .entry("parallel_config")
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            entry
                .as_object_mut()
                .expect("just made an object")
                .insert(sub.to_string(), value);
            return Ok(());
        }
        let known: Vec<&str> = YAML_KEYS.iter().chain(RESHARD_KEYS).copied().collect();
        check_key(key, &known)?;
        if key == "parallel_config" {
            let Value::Object(fields) = value else {
                return Err(Error::usage("parallel_config must be an object"));
            };
            for (k, v) in fields {
                self.set(&format!("parallel_config.{k}"), v)?;
            }
            return Ok(());
        }
        self.values.insert(key.to_string(), value);
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Overlays `other` on `self`: its keys win (`parallel_config` field by
    /// field).
    pub fn overlay(&mut self, other: &Settings) {
        for (k, v) in &other.values {
            match (k.as_str(), v, self.values.get_mut(k)) {
                ("parallel_config", Value::Object(new), Some(Value::Object(old))) => {
                    for (f, x) in new {
                        old.insert(f.clone(), x.clone());
                    }
                }
                _ => {
                    self.values.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// Resolves the settings with the launcher's environment into the
    /// options of an auto conversion. Relative paths are taken relative to
    /// the current directory, as mindformers does.
    ///
    /// Precedence: rank and world size from the settings (`rank_id`,
    /// `world_size`), else `RANK_ID` / `RANK_SIZE`, else 0 and 1; node size
    /// from `npu_num_per_node`, else `DEVICE_NUM_PER_NODE`, else 8
    /// (`TransformCkpt`'s order).
    pub fn resolve(&self, env: &JobEnv) -> Result<AutoOptions> {
        let mut notes = Vec::new();
        let rank = match self.usize_opt("rank_id")? {
            Some(r) => r,
            None => env_usize(&env.rank_id, "RANK_ID")?.unwrap_or(0),
        };
        let world = match self.usize_opt("world_size")? {
            Some(w) => w,
            None => env_usize(&env.rank_size, "RANK_SIZE")?.unwrap_or(1),
        };
        if world == 0 {
            return Err(Error::usage(
                "the world size (RANK_SIZE) must be at least 1",
            ));
        }
        let npu_num_per_node = match self.usize_opt("npu_num_per_node")? {
            Some(n) => n,
            None => env_usize(&env.device_num_per_node, "DEVICE_NUM_PER_NODE")?.unwrap_or(8),
        };
        let use_parallel = self.bool_opt("use_parallel")?.unwrap_or(world > 1);
        let (rank, world) = if use_parallel {
            (rank, world)
        } else {
            if rank > 0 {
                return Err(self.err(format!(
                    "use_parallel is False, so the job runs on one device, but this process is \
                     rank {rank} of {world} (RANK_ID/RANK_SIZE): run one process, or set \
                     use_parallel: True"
                )));
            }
            if world > 1 {
                notes.push(format!(
                    "use_parallel is False: the job runs on one device (RANK_SIZE {world} is not used)"
                ));
            }
            (0, 1)
        };
        if rank >= world {
            return Err(Error::usage(format!(
                "rank {rank} does not exist in a job of {world} ranks (RANK_ID must be below RANK_SIZE)"
            )));
        }
        let load_ckpt_format = match self.string_opt("load_ckpt_format")?.as_deref() {
            None | Some("ckpt") => FileFormat::Ckpt,
            Some("safetensors") => FileFormat::Safetensors,
            Some(other) => {
                return Err(self.err(format!(
                    "load_ckpt_format must be 'ckpt' or 'safetensors', not {other:?}"
                )))
            }
        };
        let parallel = match self.values.get("parallel_config") {
            None | Some(Value::Null) => ParallelConfig::default(),
            Some(Value::Object(m)) => {
                let field = |k: &str| -> Result<Option<usize>> {
                    m.get(k)
                        .map(|v| {
                            as_usize(v).map_err(|e| self.err(format!("parallel_config.{k} {e}")))
                        })
                        .transpose()
                        .map(Option::flatten)
                };
                ParallelConfig {
                    data_parallel: field("data_parallel")?,
                    model_parallel: field("model_parallel")?,
                    pipeline_stage: field("pipeline_stage")?.unwrap_or(1).max(1),
                }
            }
            Some(_) => return Err(self.err("parallel_config must be a mapping".into())),
        };
        let seconds = |key: &str, default: f64| -> Result<Duration> {
            let s = self.f64_opt(key)?.unwrap_or(default);
            if !(s.is_finite() && s > 0.0) {
                return Err(self.err(format!("{key} must be a positive number of seconds")));
            }
            Ok(Duration::from_secs_f64(s))
        };
        let options = AutoOptions {
            load_checkpoint: self.path_opt("load_checkpoint")?,
            src_strategy: self.path_opt("src_strategy_path_or_dir")?,
            auto_trans_ckpt: self.bool_opt("auto_trans_ckpt")?.unwrap_or(false),
            transform_process_num: self.usize_opt("transform_process_num")?.unwrap_or(1),
            transform_by_rank: self.bool_opt("transform_by_rank")?.unwrap_or(false),
            npu_num_per_node,
            use_parallel,
            only_save_strategy: self.bool_opt("only_save_strategy")?.unwrap_or(false),
            output_dir: self
                .path_opt("output_dir")?
                .unwrap_or_else(|| absolute(Path::new("./output"))),
            load_ckpt_format,
            remove_redundancy: self.bool_opt("remove_redundancy")?,
            resume_training: match self.values.get("resume_training") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => None,
                Some(v @ Value::String(s)) if as_bool(v).is_some() || is_unset(s) => None,
                Some(Value::String(s)) => Some(s.trim().to_string()),
                Some(v) => {
                    return Err(self.err(format!(
                        "resume_training must be True, False or a checkpoint file name, not {v}"
                    )))
                }
            },
            parallel,
            rank,
            world_size: world,
            node_local: self.bool_opt("node_local")?.unwrap_or(false),
            dst_strategy: self.path_opt("dst_strategy")?,
            workers: self
                .usize_opt("workers")?
                .unwrap_or_else(crate::exec::default_workers)
                .max(1),
            timeout: seconds("timeout_s", 7200.0)?,
            heartbeat_timeout: seconds("heartbeat_timeout_s", 120.0)?,
            poll: Duration::from_millis(self.usize_opt("poll_ms")?.unwrap_or(1000).max(1) as u64),
            force: self.bool_opt("force")?.unwrap_or(false),
            notes,
            exchange: super::Exchange::parse(
                self.string_opt("exchange")?.as_deref(),
                self.string_opt("rendezvous")?
                    .or_else(|| scheduler_rendezvous(env)),
            )
            .map_err(|e| self.err(e.to_string()))?,
            device_id: env_usize(&env.device_id, "DEVICE_ID")?,
        };
        Ok(options)
    }

    fn err(&self, msg: String) -> Error {
        Error::usage(format!("{}: {msg}", self.origin))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => as_bool(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be True or False, not {v}"))),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => as_usize(v).map_err(|e| self.err(format!("{key} {e}"))),
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.err(format!("{key} must be a number, not {s:?}"))),
            Some(v) => Err(self.err(format!("{key} must be a number, not {v}"))),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<String>> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if is_unset(s) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(v) => Err(self.err(format!("{key} must be a string, not {v}"))),
        }
    }

    /// A path setting: unset for `''`, `None`, `null`; a URL (`obs://…`) is
    /// refused: reshard reads and writes plain paths only.
    fn path_opt(&self, key: &str) -> Result<Option<PathBuf>> {
        let Some(s) = self.string_opt(key)? else {
            return Ok(None);
        };
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(self.err(format!(
                    "{key} is a URL ({s}); reshard reads and writes plain paths only: mount the \
                     bucket (on ModelArts, the job's local or mounted directory) and give the \
                     mount point"
                )));
            }
        }
        Ok(Some(absolute(Path::new(&s))))
    }
}

/// The launcher's environment variables (unparsed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobEnv {
    /// `RANK_ID`.
    pub rank_id: Option<String>,
    /// `RANK_SIZE`.
    pub rank_size: Option<String>,
    /// `DEVICE_NUM_PER_NODE`.
    pub device_num_per_node: Option<String>,
    /// `DEVICE_ID`: the card of this rank (default: the rank modulo the
    /// cards per node).
    pub device_id: Option<String>,
    /// `MS_SCHED_HOST` and `MS_SCHED_PORT`, as msrun sets them: the default
    /// HCCL rendezvous is the port after the scheduler's.
    pub scheduler: Option<(String, String)>,
}

impl JobEnv {
    /// Reads the variables above from this process's environment (empty
    /// values count as unset); the library reads no other process global.
    pub fn from_process() -> JobEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        JobEnv {
            rank_id: var("RANK_ID"),
            // msrun exports MS_WORKER_NUM (and RANK_ID).
            rank_size: var("RANK_SIZE").or_else(|| var("MS_WORKER_NUM")),
            device_num_per_node: var("DEVICE_NUM_PER_NODE"),
            device_id: var("DEVICE_ID"),
            scheduler: var("MS_SCHED_HOST").zip(var("MS_SCHED_PORT")),
        }
    }
}

/// msrun's scheduler address with the next port: where the job's ranks
/// meet to share HCCL's root info.
fn scheduler_rendezvous(env: &JobEnv) -> Option<String> {
    let (host, port) = env.scheduler.as_ref()?;
    let port: u16 = port.trim().parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(1)?))
}

fn env_usize(value: &Option<String>, name: &str) -> Result<Option<usize>> {
    value
        .as_deref()
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| Error::usage(format!("{name}={v:?} is not a non-negative integer")))
        })
        .transpose()
}

/// `''`, `None`, `none`, `null`: what mindformers treats as "no path".
fn is_unset(s: &str) -> bool {
    matches!(s.trim(), "" | "None" | "none" | "null" | "~")
}

/// A boolean the way PyYAML (YAML 1.1) and Python's truthiness of a config
/// value read it.
fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|i| i != 0),
        Value::String(s) => match s.trim() {
            "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "1" => {
                Some(true)
            }
            "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "0" | ""
            | "None" => Some(false),
            _ => None,
        },
        Value::Null => Some(false),
        _ => None,
    }
}

fn as_usize(v: &Value) -> std::result::Result<Option<usize>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(|u| Some(u as usize))
            .ok_or_else(|| format!("must be a non-negative integer, not {n}")),
        Value::String(s) if is_unset(s) => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| format!("must be a non-negative integer, not {s:?}")),
        other => Err(format!("must be a non-negative integer, not {other}")),
    }
}

fn check_key(key: &str, known: &[&str]) -> Result<()> {
    if known.contains(&key) {
        return Ok(());
    }
    let closest = known
        .iter()
        .min_by_key(|k| edit_distance(k, key))
        .filter(|k| edit_distance(k, key) <= 3);
    Err(Error::usage(match closest {
        Some(k) => format!("unknown setting {key:?}; did you mean {k:?}?"),
        None => format!("unknown setting {key:?}; known: {}", known.join(", ")),
    }))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `path` made absolute against the current directory, without resolving
/// links (a mounted remote root stays as given).
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Reads a YAML file and the `base_config` files it names, depth first; the
/// file's own keys override its bases' (objects merged key by key).
fn read_yaml_tree(path: &Path, depth: usize) -> Result<Map<String, Value>> {
    if depth > 8 {
        return Err(
            Error::bad_input("base_config nests more than 8 levels (a cycle?)").in_file(path),
        );
    }
    let len = std::fs::metadata(path).in_file(path)?.len();
    if len > MAX_YAML_BYTES {
        return Err(Error::LimitExceeded {
            what: "YAML file length (bytes)",
            limit: MAX_YAML_BYTES,
            got: len,
        }
        .in_file(path));
    }
    let text = std::fs::read_to_string(path).in_file(path)?;
    let own = yaml_text_to_map(&text).map_err(|e| e.in_file(path))?;
    if own.is_empty() {
        // Issue 19 item 10: an empty (or NUL-filled) file used to read as
        // "nothing to load" and exit 0.
        return Err(Error::bad_input(
            "holds no settings (an empty YAML document); is this the right file?",
        )
        .in_file(path));
    }
    let bases: Vec<String> = match own.get("base_config") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if is_unset(s) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(
                Error::bad_input("base_config must be a path or a list of paths").in_file(path),
            )
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut merged = Map::new();
    for base in bases {
        let base_map = read_yaml_tree(&dir.join(base), depth + 1)?;
        deep_merge(&mut merged, base_map);
    }
    deep_merge(&mut merged, own);
    Ok(merged)
}

fn deep_merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(old)), Value::Object(new)) => deep_merge(old, new),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The largest YAML file read (a mindformers run file is a few KiB).
pub const MAX_YAML_BYTES: u64 = 16 << 20;
/// The most nodes a YAML document may expand to, aliases included (a
/// 700-byte "billion laughs" document expands to billions).
pub const MAX_YAML_NODES: u64 = 1_000_000;
/// The deepest nesting of sequences and mappings.
pub const MAX_YAML_DEPTH: u64 = 128;

/// Counts the nodes a YAML stream expands to (each alias counts as the
/// size of what it names) and its nesting depth, without building it.
#[derive(Default)]
struct NodeCounter {
    total: u64,
    depth: u64,
    max_depth: u64,
    /// Open collections: anchor id and the node count at their start.
    open: Vec<(usize, u64)>,
    /// Expanded size of each anchor.
    sizes: std::collections::HashMap<usize, u64>,
}

impl yaml_rust2::parser::EventReceiver for NodeCounter {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event) {
        use yaml_rust2::parser::Event;
        match ev {
            Event::Scalar(_, _, anchor, _) => {
                self.total = self.total.saturating_add(1);
                if anchor > 0 {
                    self.sizes.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((anchor, self.total));
                self.total = self.total.saturating_add(1);
                self.depth += 1;
                self.max_depth = self.max_depth.max(self.depth);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.depth = self.depth.saturating_sub(1);
                if let Some((anchor, start)) = self.open.pop() {
                    if anchor > 0 {
                        self.sizes.insert(anchor, self.total - start);
                    }
                }
            }
            Event::Alias(id) => {
                let size = self.sizes.get(&id).copied().unwrap_or(1);
                self.total = self.total.saturating_add(size);
            }
            _ => {}
        }
    }
}

/// Refuses YAML that would be too large to build: a NUL byte (binary
/// data, not a text config), more than [`MAX_YAML_NODES`] nodes once
/// aliases are expanded, or nesting deeper than [`MAX_YAML_DEPTH`].
fn check_yaml_limits(text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::bad_input(
            "contains a NUL byte: not a YAML text file",
        ));
    }
    if text.len() as u64 > MAX_YAML_BYTES {
        return Err(Error::LimitExceeded {
            what: "YAML text length (bytes)",
            limit: MAX_YAML_BYTES,
            got: text.len() as u64,
        });
    }
    let mut counter = NodeCounter::default();
    yaml_rust2::parser::Parser::new_from_str(text)
        .load(&mut counter, true)
        .map_err(|e| Error::bad_input(format!("not valid YAML: {e}")))?;
    if counter.max_depth > MAX_YAML_DEPTH {
        return Err(Error::LimitExceeded {
            what: "YAML nesting depth",
            limit: MAX_YAML_DEPTH,
            got: counter.max_depth,
        });
    }
    if counter.total > MAX_YAML_NODES {
        return Err(Error::LimitExceeded {
            what: "YAML node count with aliases expanded",
            limit: MAX_YAML_NODES,
            got: counter.total,
        });
    }
    Ok(())
}

fn yaml_text_to_map(text: &str) -> Result<Map<String, Value>> {
    check_yaml_limits(text)?;
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| Error::bad_input(format!("not valid YAML: {e}")))?;
    match docs.into_iter().next().map(yaml_to_json) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(Error::bad_input(
            "the YAML's top level must be a mapping of keys to values",
        )),
    }
}

fn yaml_to_json(y: Yaml) -> Value {
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::String(s)),
        Yaml::Integer(i) => Value::from(i),
        Yaml::String(s) => Value::String(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Array(a) => Value::Array(a.into_iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s,
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        Yaml::Real(s) => s,
                        _ => String::new(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINDFORMERS_YAML: &str = r#"
seed: 0
output_dir: './output' # path to save checkpoint/strategy
load_checkpoint: '/data/llama2_7b/'
src_strategy_path_or_dir: ''
auto_trans_ckpt: True  # If true, auto transform load_checkpoint to load in distributed model
only_save_strategy: False
resume_training: False
use_parallel: True
run_mode: 'finetune'
load_ckpt_format: 'ckpt'
train_dataset: &train_dataset
  data_loader:
    type: MindDataset
    dataset_dir: ""
    shuffle: True
  input_columns: ["input_ids", "labels"]
train_dataset_task:
  type: CausalLanguageModelDataset
  dataset_config: *train_dataset
parallel_config:
  data_parallel: 2
  model_parallel: 2
  pipeline_stage: 2
  use_seq_parallel: False
  micro_batch_num: 16
  vocab_emb_dp: True
  gradient_aggregation_group: 4
micro_batch_interleave_num: 1
"#;

    fn env(rank: &str, size: &str) -> JobEnv {
        JobEnv {
            rank_id: Some(rank.into()),
            rank_size: Some(size.into()),
            ..JobEnv::default()
        }
    }

    #[test]
    fn reads_a_mindformers_yaml() {
        let s = Settings::from_yaml_str(MINDFORMERS_YAML).unwrap();
        assert!(s.get("seed").is_none() && s.get("train_dataset").is_none());
        let o = s.resolve(&env("3", "8")).unwrap();
        assert_eq!((o.rank, o.world_size, o.npu_num_per_node), (3, 8, 8));
        assert!(o.auto_trans_ckpt && o.use_parallel && !o.only_save_strategy);
        assert_eq!(o.load_checkpoint, Some(PathBuf::from("/data/llama2_7b/")));
        assert_eq!(o.src_strategy, None);
        assert_eq!(o.transform_process_num, 1);
        assert_eq!(o.parallel.pipeline_stage, 2);
        assert_eq!(o.parallel.data_parallel, Some(2));
        assert!(o.output_dir.is_absolute() && o.output_dir.ends_with("output"));
    }

    #[test]
    fn overrides_env_and_python_spellings() {
        let mut s = Settings::from_yaml_str(
            "auto_trans_ckpt: 'True'\nload_checkpoint: None\nnpu_num_per_node: 4\nuse_parallel: yes\n",
        )
        .unwrap();
        let mut over = Settings::new();
        over.set("rank_id", Value::from(5)).unwrap();
        over.set("parallel_config.pipeline_stage", Value::from(2))
            .unwrap();
        s.overlay(&over);
        let e = JobEnv {
            device_num_per_node: Some("16".into()),
            ..env("1", "8")
        };
        let o = s.resolve(&e).unwrap();
        assert_eq!(o.rank, 5, "an explicit rank wins over RANK_ID");
        assert_eq!(
            o.npu_num_per_node, 4,
            "the YAML wins over DEVICE_NUM_PER_NODE"
        );
        assert!(o.auto_trans_ckpt && o.use_parallel);
        assert_eq!(o.load_checkpoint, None);
        assert_eq!(o.parallel.pipeline_stage, 2);
        let o = Settings::new()
            .resolve(&JobEnv {
                device_num_per_node: Some("16".into()),
                ..env("1", "8")
            })
            .unwrap();
        assert_eq!(o.npu_num_per_node, 16);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let e = Settings::from_json_str(r#"{"load_checkpont": "/x"}"#).unwrap_err();
        assert!(
            e.to_string().contains("did you mean \"load_checkpoint\""),
            "{e}"
        );
        let s = Settings::from_yaml_str("transform_process_num: two\n").unwrap();
        let e = s.resolve(&env("0", "8")).unwrap_err().to_string();
        assert!(
            e.contains("transform_process_num") && e.contains("two"),
            "{e}"
        );
        let e = Settings::new()
            .resolve(&env("8", "8"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 8 does not exist"), "{e}");
        let e = Settings::new()
            .resolve(&JobEnv {
                rank_id: Some("x".into()),
                ..JobEnv::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK_ID"), "{e}");
        let s = Settings::from_yaml_str("output_dir: obs://bucket/out\n").unwrap();
        let e = s.resolve(&env("0", "1")).unwrap_err().to_string();
        assert!(e.contains("plain paths"), "{e}");
    }

    #[test]
    fn use_parallel_false_is_one_device() {
        let s = Settings::from_yaml_str("use_parallel: False\n").unwrap();
        let o = s.resolve(&env("0", "8")).unwrap();
        assert_eq!((o.rank, o.world_size), (0, 1));
        assert_eq!(o.notes.len(), 1);
        let e = s.resolve(&env("3", "8")).unwrap_err().to_string();
        assert!(e.contains("run one process"), "{e}");
    }

    #[test]
    fn yaml_bombs_empty_and_nul_files_are_refused() {
        // Issue 19 item 7: a 700-byte alias bomb made `auto` take 4 GB.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = (b'a' + i - 1) as char;
            let name = (b'a' + i) as char;
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(bomb.len() < 1000);
        let err = Settings::from_yaml_str(&bomb).unwrap_err();
        assert!(matches!(err.root(), Error::LimitExceeded { .. }), "{err}");
        let deep = format!("a: {}{}\n", "[".repeat(200), "]".repeat(200));
        let err = Settings::from_yaml_str(&deep).unwrap_err();
        assert!(err.to_string().contains("nesting depth"), "{err}");
        // Deeper still: the parser's own recursion limit answers first.
        let deeper = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert!(Settings::from_yaml_str(&deeper).is_err());
        // Small legitimate aliases still work.
        let ok = Settings::from_yaml_str("base: &b {data_parallel: 2}\nparallel_config: *b\n");
        assert!(ok.is_ok(), "{:?}", ok.err());
        // Item 10: empty and NUL files are errors naming the file.
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("empty.yaml", &b""[..]),
            ("nul.yaml", &[0u8; 64][..]),
            ("comments.yaml", &b"# nothing\n"[..]),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let err = Settings::from_yaml_file(&p).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn base_config_is_read_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        std::fs::write(
            dir.path().join("base/common.yaml"),
            "auto_trans_ckpt: True\nparallel_config:\n  data_parallel: 4\n  pipeline_stage: 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("run.yaml"),
            "base_config: ['base/common.yaml']\nparallel_config:\n  data_parallel: 2\n",
        )
        .unwrap();
        let o = Settings::from_yaml_file(&dir.path().join("run.yaml"))
            .unwrap()
            .resolve(&env("0", "4"))
            .unwrap();
        assert!(o.auto_trans_ckpt);
        assert_eq!(o.parallel.data_parallel, Some(2));
        assert_eq!(o.parallel.pipeline_stage, 2);
    }
}
