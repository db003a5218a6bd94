//! Reading a mindformers YAML as its `MindFormerConfig` does (`base_config`
//! files first, then the file's own keys), within limits on size, node
//! count and nesting: auto's run YAML and the model YAML glm-n's converter
//! takes.

use std::path::Path;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::error::{Error, Result, ResultExt};
use crate::formats::check_limit;

/// `''`, `None`, `none`, `null`: what mindformers treats as "no path".
pub(crate) fn is_unset(s: &str) -> bool {
    matches!(s.trim(), "" | "None" | "none" | "null" | "~")
}

/// Reads a YAML file and the `base_config` files it names, depth first; the
/// file's own keys override its bases' (objects merged key by key).
pub(crate) fn read_yaml_tree(path: &Path, depth: usize) -> Result<Map<String, Value>> {
    if depth > 8 {
        return Err(
            Error::bad_input("base_config nests more than 8 levels (a cycle?)").in_file(path),
        );
    }
    let len = std::fs::metadata(path).in_file(path)?.len();
    check_limit("YAML file length (bytes)", MAX_YAML_BYTES, len).map_err(|e| e.in_file(path))?;
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
    check_limit(
        "YAML text length (bytes)",
        MAX_YAML_BYTES,
        text.len() as u64,
    )?;
    let mut counter = NodeCounter::default();
    yaml_rust2::parser::Parser::new_from_str(text)
        .load(&mut counter, true)
        .map_err(|e| Error::bad_input(format!("not valid YAML: {e}")))?;
    check_limit("YAML nesting depth", MAX_YAML_DEPTH, counter.max_depth)?;
    check_limit(
        "YAML node count with aliases expanded",
        MAX_YAML_NODES,
        counter.total,
    )
}

pub(crate) fn yaml_text_to_map(text: &str) -> Result<Map<String, Value>> {
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
