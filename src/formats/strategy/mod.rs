//! MindSpore parallel strategy files: the `node_strategy.proto` protobuf
//! variant, the JSON variant, directories of per-rank files, and the pipeline
//! merge (`merge_pipeline_strategys`).
//!
//! The pieces:
//! - [`load`] reads any strategy argument (a protobuf file, a `.json` file or
//!   a directory of per-rank files, merged in memory) into a [`Strategy`]: the
//!   raw records of the file, kept so that it can be written back unchanged.
//! - [`Strategy::layout_table`] turns the records into a [`LayoutTable`], one
//!   [`ParamLayout`] per parameter, with the semantics of MindSpore's
//!   `_convert_to_list` (stage prefixes, shared parameters). The layout algebra
//!   works from that table.
//! - [`merge_pipeline`] merges the files of several pipeline stages;
//!   [`merge_pipeline_strategys`] and [`write_merged`] also write the result.
//! - [`write()`], [`write_protobuf`] and [`write_json`] write a [`Strategy`]
//!   through a temporary file renamed into place.
//!
//! ```no_run
//! # fn main() -> reshard::Result<()> {
//! use reshard::formats::strategy;
//! let s = strategy::load("output/strategy".as_ref())?;
//! let table = s.layout_table(None)?;
//! println!("{} stages, {} devices per stage", table.stage_num()?, table.device_num_per_stage()?);
//! # Ok(()) }
//! ```
//!
//! Every error names the file it concerns. A file that is not a strategy (a
//! checkpoint, random bytes, an empty file, a file without layouts) fails
//! with a message containing "not a strategy file".

mod json;
mod layout;
mod merge;
pub mod proto;

use std::fs;
use std::path::Path;

use prost::Message;

use crate::error::{Error, Result, ResultExt};
use crate::formats::atomic::AtomicFile;

pub use layout::{LayoutTable, LayoutTableIter, ParamLayout, TensorMap};
pub use merge::{
    merge_pipeline, merge_pipeline_strategys, strategy_files_in, write_merged, MERGED_FILE_NAME,
};

/// The records of a strategy file, as written (spec 2.1 and 2.3).
///
/// Nothing is interpreted here: [`Strategy::layout_table`] does that. Writing
/// a `Strategy` read from a MindSpore protobuf file gives back the same bytes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strategy {
    /// `current_stage`: a C++ counter without meaning; 1 in merged files.
    pub current_stage: u32,
    /// The operator strategies (`parallel_strategy_item`), in file order.
    pub strategy_items: Vec<StrategyItem>,
    /// The parameter layouts (`parallel_layout_item`), in file order.
    pub layout_items: Vec<LayoutItem>,
}

/// One `parallel_strategy_item`: an operator, its stage and input strategies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StrategyItem {
    /// Operator name.
    pub node_name: String,
    /// Pipeline stage the operator runs in.
    pub stage: u32,
    /// Split counts per input, per tensor dimension.
    pub strategy: Vec<Vec<u32>>,
}

/// One `parallel_layout_item`, field by field as in the file.
///
/// Every list keeps all its protobuf entries (MindSpore writes exactly one
/// `dev_matrix`, `param_split_shape` and `indices_offset`, and one
/// `tensor_map` or one per tensor dimension).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayoutItem {
    /// Parameter name; `"<stage>-<name>"` in merged files.
    pub param_name: String,
    /// `dev_matrix` entries; only the first is used.
    pub dev_matrix: Vec<Vec<u32>>,
    /// `tensor_map` entries: one (plain) or several (nested, spec 2.2).
    pub tensor_map: Vec<Vec<i32>>,
    /// `param_split_shape` entries; only the first is used.
    pub param_split_shape: Vec<Vec<i64>>,
    /// `indices_offset` entries; not used by the transform.
    pub indices_offset: Vec<Vec<i64>>,
    /// Embedding field size, normally 0.
    pub field: i32,
    /// Rank stride inside an optimizer-shard group (0: no optimizer shard).
    pub opt_weight_shard_step: i32,
    /// Optimizer-shard group size (0: none, -1: all repeated devices).
    pub opt_weight_shard_size: i32,
    /// The full tensor shape. Only the JSON variant records it; `None` for
    /// protobuf files.
    pub tensor_shape: Option<Vec<i64>>,
}

impl Strategy {
    /// Decodes the protobuf variant and checks it with [`Strategy::validate`].
    pub fn from_protobuf(bytes: &[u8]) -> Result<Strategy> {
        if bytes.is_empty() {
            return Err(not_a_strategy("the file is empty"));
        }
        let strategy = Strategy::from(proto::decode_strategy_map(bytes)?);
        strategy.validate()?;
        Ok(strategy)
    }

    /// Encodes the protobuf variant, byte for byte as MindSpore would.
    pub fn to_protobuf(&self) -> Vec<u8> {
        proto::ParallelStrategyMap::from(self).encode_to_vec()
    }

    /// Parses the JSON variant (spec 2.3) and checks it with
    /// [`Strategy::validate`].
    pub fn from_json(bytes: &[u8]) -> Result<Strategy> {
        let strategy = json::parse(bytes)?;
        strategy.validate()?;
        Ok(strategy)
    }

    /// Serialises the JSON variant. Fails for what the variant cannot hold: a
    /// nested tensor map, or a layout without exactly one dev matrix.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        json::serialize(self)
    }

    /// The pipeline stage of a per-rank file: the stage of its first
    /// `parallel_strategy_item`, as `_merge_protobuf_strategy` reads it.
    /// `None` when the file has no strategy items.
    pub fn stage(&self) -> Option<u32> {
        self.strategy_items.first().map(|item| item.stage)
    }

    /// Checks what every reader of a strategy relies on, so that a file that
    /// merely happens to decode as protobuf is refused:
    /// - at least one layout item;
    /// - every layout item has a non-empty `param_name` and at least one
    ///   `dev_matrix`, `tensor_map` and `param_split_shape` entry (MindSpore
    ///   indexes entry 0 of each);
    /// - the first dev matrix is non-empty, every axis is at least 1, and the
    ///   device count fits in 64 bits;
    /// - every tensor-map value is -1 or a device axis of that dev matrix.
    pub fn validate(&self) -> Result<()> {
        if self.layout_items.is_empty() {
            return Err(not_a_strategy("it has no parallel_layout_item records"));
        }
        for (index, item) in self.layout_items.iter().enumerate() {
            item.validate().map_err(|e| {
                if item.param_name.is_empty() {
                    e.in_record(index, None)
                } else {
                    e.in_tensor(&item.param_name)
                }
            })?;
        }
        Ok(())
    }

    /// The layout of every parameter, with the exact semantics of MindSpore's
    /// `_convert_to_list(strategy, rank_id)` (spec 2.5). See [`LayoutTable`].
    pub fn layout_table(&self, rank_id: Option<u64>) -> Result<LayoutTable> {
        LayoutTable::build(self, rank_id)
    }
}

impl LayoutItem {
    /// The checks of [`Strategy::validate`] for one item.
    pub fn validate(&self) -> Result<()> {
        if self.param_name.is_empty() {
            return Err(not_a_strategy("a parallel_layout_item has no param_name"));
        }
        let Some(dev_matrix) = self.dev_matrix.first() else {
            return Err(not_a_strategy("the layout has no dev_matrix"));
        };
        if self.tensor_map.is_empty() {
            return Err(not_a_strategy("the layout has no tensor_map"));
        }
        if self.param_split_shape.is_empty() {
            return Err(not_a_strategy("the layout has no param_split_shape"));
        }
        if dev_matrix.is_empty() {
            return Err(Error::Strategy(
                "the dev_matrix is empty (a strategy with only pipeline parallelism is not \
                 supported, as in MindSpore)"
                    .into(),
            ));
        }
        if dev_matrix.contains(&0) {
            return Err(Error::Strategy(format!(
                "dev_matrix {dev_matrix:?} has an axis of size 0"
            )));
        }
        dev_matrix
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
            .ok_or_else(|| {
                Error::Strategy(format!(
                    "dev_matrix {dev_matrix:?} has more than 2^64 devices"
                ))
            })?;
        let axes = dev_matrix.len() as i64;
        for map in &self.tensor_map {
            if let Some(bad) = map.iter().find(|&&a| a < -1 || i64::from(a) >= axes) {
                return Err(Error::Strategy(format!(
                    "tensor_map {map:?} has value {bad}, but dev_matrix {dev_matrix:?} has \
                     device axes 0..{axes} (or -1 for not split)"
                )));
            }
        }
        Ok(())
    }
}

/// Reads a strategy argument: a directory of per-rank files (see
/// [`strategy_files_in`]; one file is loaded as it is, several are merged
/// with [`merge_pipeline`]), a `.json` file (the JSON variant) or any other
/// file (protobuf), the way MindSpore tells them apart.
pub fn load(path: &Path) -> Result<Strategy> {
    let meta = fs::metadata(path).in_file(path)?;
    if meta.is_dir() {
        let files = strategy_files_in(path)?;
        match files.as_slice() {
            [one] => load_file(one),
            _ => merge_pipeline(&files),
        }
    } else {
        load_file(path)
    }
}

/// Reads one strategy file: the JSON variant when the name ends in `.json`,
/// protobuf otherwise.
pub fn load_file(path: &Path) -> Result<Strategy> {
    let bytes = fs::read(path).in_file(path)?;
    parse_file_bytes(path, &bytes)
}

/// Parses `bytes` read from `path` (the name picks the variant).
pub(crate) fn parse_file_bytes(path: &Path, bytes: &[u8]) -> Result<Strategy> {
    if is_json_name(path) {
        Strategy::from_json(bytes)
    } else {
        Strategy::from_protobuf(bytes)
    }
    .in_file(path)
}

/// Whether MindSpore reads `path` as the JSON variant (`name[-5:] == ".json"`).
pub(crate) fn is_json_name(path: &Path) -> bool {
    path.as_os_str().as_encoded_bytes().ends_with(b".json")
}

/// Reads a group-info file (`ParallelGroupMap`) and returns its
/// `ckpt_restore_rank_list`, like MindSpore's `restore_group_info_list`.
pub fn load_group_info(path: &Path) -> Result<Vec<u32>> {
    let bytes = fs::read(path).in_file(path)?;
    if bytes.is_empty() {
        return Err(
            Error::Strategy("not a group-info file: the file is empty".into()).in_file(path),
        );
    }
    let map = proto::decode_group_map(&bytes).in_file(path)?;
    Ok(map.ckpt_restore_rank_list.dim)
}

/// Writes the protobuf variant to `path`, through a temporary file in the
/// same directory that is renamed into place once complete.
pub fn write_protobuf(strategy: &Strategy, path: &Path) -> Result<()> {
    write_atomic(path, &strategy.to_protobuf())
}

/// Writes the JSON variant to `path` (see [`Strategy::to_json`]), through a
/// temporary file renamed into place.
pub fn write_json(strategy: &Strategy, path: &Path) -> Result<()> {
    let bytes = strategy.to_json().in_file(path)?;
    write_atomic(path, &bytes)
}

/// Writes the variant MindSpore would read back from `path`: JSON when the
/// name ends in `.json`, protobuf otherwise.
pub fn write(strategy: &Strategy, path: &Path) -> Result<()> {
    if is_json_name(path) {
        write_json(strategy, path)
    } else {
        write_protobuf(strategy, path)
    }
}

/// Writes `bytes` to a sibling temporary file, then renames it to `path`, so
/// that `path` is never seen half-written.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// The error for input that is not a strategy file at all.
pub(crate) fn not_a_strategy(why: &str) -> Error {
    Error::Strategy(format!("not a strategy file: {why}"))
}

impl From<proto::ParallelStrategyMap> for Strategy {
    fn from(map: proto::ParallelStrategyMap) -> Strategy {
        Strategy {
            current_stage: map.current_stage,
            strategy_items: map
                .parallel_strategy_item
                .into_iter()
                .map(|item| StrategyItem {
                    node_name: item.node_name,
                    stage: item.parallel_strategys.stage,
                    strategy: item
                        .parallel_strategys
                        .parallel_strategy
                        .into_iter()
                        .map(|s| s.dim)
                        .collect(),
                })
                .collect(),
            layout_items: map
                .parallel_layout_item
                .into_iter()
                .map(|item| {
                    let l = item.parallel_layouts;
                    LayoutItem {
                        param_name: item.param_name,
                        dev_matrix: l.dev_matrix.into_iter().map(|d| d.dim).collect(),
                        tensor_map: l.tensor_map.into_iter().map(|d| d.dim).collect(),
                        param_split_shape: l.param_split_shape.into_iter().map(|d| d.dim).collect(),
                        indices_offset: l.indices_offset.into_iter().map(|d| d.dim).collect(),
                        field: l.field,
                        opt_weight_shard_step: l.opt_weight_shard_step,
                        opt_weight_shard_size: l.opt_weight_shard_size,
                        tensor_shape: None,
                    }
                })
                .collect(),
        }
    }
}

impl From<&Strategy> for proto::ParallelStrategyMap {
    fn from(s: &Strategy) -> proto::ParallelStrategyMap {
        proto::ParallelStrategyMap {
            current_stage: s.current_stage,
            parallel_strategy_item: s
                .strategy_items
                .iter()
                .map(|item| proto::ParallelStrategyItem {
                    node_name: item.node_name.clone(),
                    parallel_strategys: proto::ParallelStrategys {
                        stage: item.stage,
                        parallel_strategy: item
                            .strategy
                            .iter()
                            .map(|dim| proto::ParallelStrategy { dim: dim.clone() })
                            .collect(),
                    },
                })
                .collect(),
            parallel_layout_item: s
                .layout_items
                .iter()
                .map(|item| proto::ParallelLayoutItem {
                    param_name: item.param_name.clone(),
                    parallel_layouts: proto::ParallelLayouts {
                        dev_matrix: item
                            .dev_matrix
                            .iter()
                            .map(|dim| proto::DevMatrix { dim: dim.clone() })
                            .collect(),
                        tensor_map: item
                            .tensor_map
                            .iter()
                            .map(|dim| proto::TensorMap { dim: dim.clone() })
                            .collect(),
                        param_split_shape: item
                            .param_split_shape
                            .iter()
                            .map(|dim| proto::ParamSplitShape { dim: dim.clone() })
                            .collect(),
                        indices_offset: item
                            .indices_offset
                            .iter()
                            .map(|dim| proto::IndicesOffset { dim: dim.clone() })
                            .collect(),
                        field: item.field,
                        opt_weight_shard_step: item.opt_weight_shard_step,
                        opt_weight_shard_size: item.opt_weight_shard_size,
                    },
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
