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

use super::{AutoOptions, ParallelConfig};
use crate::error::{Error, Result};
use crate::formats::tree::FileFormat;
use crate::formats::yaml::{is_unset, read_yaml_tree, yaml_text_to_map};

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
    "unified_checkpoint",
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
        Ok(Settings::of_yaml(
            read_yaml_tree(path, 0)?,
            path.display().to_string(),
        ))
    }

    /// Parses YAML text (no `base_config` handling: there is no file to be
    /// relative to).
    pub fn from_yaml_str(text: &str) -> Result<Settings> {
        Ok(Settings::of_yaml(yaml_text_to_map(text)?, "YAML".into()))
    }

    /// The keys of a YAML that reshard reads ([`YAML_KEYS`]).
    fn of_yaml(map: Map<String, Value>, origin: String) -> Settings {
        let values = map
            .into_iter()
            .filter(|(k, _)| YAML_KEYS.contains(&k.as_str()))
            .collect();
        Settings { values, origin }
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
            unified_checkpoint: self.bool_opt("unified_checkpoint")?.unwrap_or(false),
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

#[cfg(test)]
mod tests;
