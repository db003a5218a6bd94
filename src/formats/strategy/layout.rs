//! The per-parameter layout table: MindSpore's `_convert_to_list` (spec 2.5).

use std::collections::HashMap;

use super::{LayoutItem, Strategy};
use crate::error::{Error, Result};

/// How each tensor dimension maps onto device axes.
///
/// Axes count from the right of the dev matrix (axis `a` is
/// `dev_matrix[len - 1 - a]`); -1 means "not split".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorMap {
    /// One device axis (or -1) per tensor dimension: the usual form.
    Flat(Vec<i32>),
    /// Several device axes per tensor dimension, outermost first (the
    /// "Layout" API); `[-1]` for an unsplit dimension. Written as one
    /// `TensorMap` record per dimension; empty records are dropped, as
    /// MindSpore drops them.
    Nested(Vec<Vec<i32>>),
}

impl TensorMap {
    /// Builds the map from a layout item's `tensor_map` records the way
    /// `_convert_to_list` does: more than one record means nested.
    pub fn from_records(records: &[Vec<i32>]) -> TensorMap {
        match records {
            [one] => TensorMap::Flat(one.clone()),
            many => TensorMap::Nested(many.iter().filter(|m| !m.is_empty()).cloned().collect()),
        }
    }

    /// Whether this is the nested form.
    pub fn is_nested(&self) -> bool {
        matches!(self, TensorMap::Nested(_))
    }

    /// Number of tensor dimensions described.
    pub fn ndim(&self) -> usize {
        match self {
            TensorMap::Flat(v) => v.len(),
            TensorMap::Nested(v) => v.len(),
        }
    }

    /// The device axes of tensor dimension `i`, outermost first: one entry
    /// in the flat form (`[-1]` when not split). Panics if `i >= ndim()`.
    pub fn dim(&self, i: usize) -> &[i32] {
        match self {
            TensorMap::Flat(v) => std::slice::from_ref(&v[i]),
            TensorMap::Nested(v) => &v[i],
        }
    }

    /// The device axes of every tensor dimension, as [`TensorMap::dim`].
    pub fn dims(&self) -> impl Iterator<Item = &[i32]> + '_ {
        (0..self.ndim()).map(move |i| self.dim(i))
    }

    /// The nested form of this map: a flat `[a, b]` becomes `[[a], [b]]`.
    pub fn to_nested(&self) -> Vec<Vec<i32>> {
        self.dims().map(<[i32]>::to_vec).collect()
    }

    /// As MindSpore's `_convert_to_list` gives it: a list of ints, or a list
    /// of lists for the nested form.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TensorMap::Flat(v) => serde_json::json!(v),
            TensorMap::Nested(v) => serde_json::json!(v),
        }
    }
}

/// The layout of one parameter, as `_convert_to_list` lists it:
/// `[dev_matrix, tensor_map, param_split_shape, field, opt_step, opt_size,
/// stage_list]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    /// Device matrix (of one pipeline stage), leftmost outermost.
    pub dev_matrix: Vec<u64>,
    /// Tensor map.
    pub tensor_map: TensorMap,
    /// Manual split sizes, usually empty; ignored by the transform.
    pub param_split_shape: Vec<i64>,
    /// Embedding field size, normally 0; ignored by the transform.
    pub field: i32,
    /// `opt_weight_shard_step`: rank stride inside an optimizer-shard group.
    pub opt_weight_shard_step: i32,
    /// `opt_weight_shard_size`: 0 none, -1 all repeated devices.
    pub opt_weight_shard_size: i32,
    /// Pipeline stages holding the parameter, in the order met (several for
    /// shared parameters such as embeddings).
    pub stages: Vec<u32>,
}

impl ParamLayout {
    /// Builds the layout of one record (stage list left empty).
    fn from_item(item: &LayoutItem) -> Result<ParamLayout> {
        item.validate()?;
        Ok(ParamLayout {
            dev_matrix: item.dev_matrix[0].iter().map(|&d| u64::from(d)).collect(),
            tensor_map: TensorMap::from_records(&item.tensor_map),
            param_split_shape: item.param_split_shape[0].clone(),
            field: item.field,
            opt_weight_shard_step: item.opt_weight_shard_step,
            opt_weight_shard_size: item.opt_weight_shard_size,
            stages: Vec::new(),
        })
    }

    /// Number of devices of the dev matrix (devices per pipeline stage).
    /// Saturates instead of overflowing; tables built by
    /// [`Strategy::layout_table`] are checked not to overflow.
    pub fn device_num(&self) -> u64 {
        self.dev_matrix
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// The `_convert_to_list` list for this parameter, as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!([
            self.dev_matrix,
            self.tensor_map.to_json(),
            self.param_split_shape,
            self.field,
            self.opt_weight_shard_step,
            self.opt_weight_shard_size,
            self.stages,
        ])
    }
}

/// The most devices per pipeline stage reshard accepts (a strategy
/// declaring 2^32 made the planner allocate per-rank tables of 32 GiB).
pub const MAX_DEVICES: u64 = 1 << 20;

/// One [`ParamLayout`] per parameter, in MindSpore's order (first appearance
/// of the name without its stage prefix).
///
/// Built by [`Strategy::layout_table`] with the rules of `_convert_to_list`:
/// - Layout items with the same name in one file: the last one counts, at the
///   position of the first (Python dict semantics).
/// - A name `"<stage>-<name>"` (a merged file) gives the stage; a name
///   without `-` is stage 0; a name with more than one `-` is an error, as in
///   MindSpore.
/// - When a name appears in several stages (shared parameters), every stage
///   is added to the stage list, and:
///   - without a rank, the layout of the lowest stage wins;
///   - with `rank_id`, a later occurrence in stage `s` replaces the layout
///     when `rank_id / device_num == 0 && s == 0` or `rank_id / device_num > 0
///     && s > 0` (`device_num` of that occurrence's dev matrix).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayoutTable {
    entries: Vec<(String, ParamLayout)>,
    index: HashMap<String, usize>,
}

impl LayoutTable {
    /// `_convert_to_list(strategy, rank_id)`.
    pub(super) fn build(strategy: &Strategy, rank_id: Option<u64>) -> Result<LayoutTable> {
        // The Python dict built from the file: last value, first position.
        let mut order: Vec<&str> = Vec::new();
        let mut latest: HashMap<&str, &LayoutItem> = HashMap::new();
        for item in &strategy.layout_items {
            if latest.insert(&item.param_name, item).is_none() {
                order.push(&item.param_name);
            }
        }
        let mut table = LayoutTable::default();
        for name in order {
            let item = latest[name];
            let (stage, origin) = split_stage_prefix(name).map_err(|e| e.in_tensor(name))?;
            let mut layout = ParamLayout::from_item(item).map_err(|e| e.in_tensor(name))?;
            let Some(&i) = table.index.get(origin) else {
                layout.stages = vec![stage];
                table.index.insert(origin.to_string(), table.entries.len());
                table.entries.push((origin.to_string(), layout));
                continue;
            };
            let entry = &mut table.entries[i].1;
            let mut stages = std::mem::take(&mut entry.stages);
            stages.push(stage);
            let replace = match rank_id {
                Some(rank) => {
                    let stage_of_rank = rank / layout.device_num();
                    (stage_of_rank == 0 && stage == 0) || (stage_of_rank > 0 && stage > 0)
                }
                None => stages.iter().all(|&s| stage <= s),
            };
            if replace {
                *entry = layout;
            }
            entry.stages = stages;
        }
        Ok(table)
    }

    /// The layout of parameter `name` (without stage prefix).
    pub fn get(&self, name: &str) -> Option<&ParamLayout> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// Whether the table has a parameter `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Parameters and layouts, in table order.
    pub fn iter(&self) -> LayoutTableIter<'_> {
        self.into_iter()
    }

    /// Parameter names, in table order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps only the parameters for which `keep` returns true (as
    /// MindSpore pops parameters of other stages), preserving the order.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &ParamLayout) -> bool) {
        self.entries.retain(|(n, l)| keep(n, l));
        self.index = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
    }

    /// Devices per pipeline stage: the device count of the first parameter's
    /// dev matrix (`_get_device_num_from_strategy`).
    ///
    /// Unlike MindSpore, every other parameter's dev matrix must have the
    /// same device count (MindSpore's layouts always cover every device of
    /// the stage; a layout covering fewer, such as `[1, 3]` in a set of
    /// `[1, 4]`, made ranks silently disappear from the result), and the
    /// count is at most `MAX_DEVICES` (2^20).
    pub fn device_num_per_stage(&self) -> Result<u64> {
        let Some((_, first)) = self.entries.first() else {
            return Err(Error::Strategy("the strategy has no parameters".into()));
        };
        if first.dev_matrix.is_empty() {
            return Err(Error::Strategy(
                "the strategy only contains pipeline parallelism (empty dev_matrix), which is not \
                 supported for conversion"
                    .into(),
            ));
        }
        let n = first
            .dev_matrix
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::Strategy("the dev_matrix has more than 2^64 devices".into()))?;
        if n > MAX_DEVICES {
            return Err(Error::LimitExceeded {
                what: "devices per pipeline stage",
                limit: MAX_DEVICES,
                got: n,
            }
            .in_tensor(&self.entries[0].0));
        }
        for (name, l) in &self.entries[1..] {
            if !l.dev_matrix.is_empty() && l.device_num() != n {
                return Err(Error::Strategy(format!(
                    "its dev_matrix {:?} covers {} devices but the strategy's first parameter {:?} \
                     covers {n}: every layout of a stage covers all its devices; is the strategy \
                     file damaged or assembled from different jobs?",
                    l.dev_matrix,
                    l.device_num(),
                    self.entries[0].0
                ))
                .in_tensor(name));
            }
        }
        Ok(n)
    }

    /// Number of pipeline stages: the number of distinct stages in the stage
    /// lists, which must be exactly `0..n` (`_extract_pipeline_stage_num`).
    pub fn stage_num(&self) -> Result<usize> {
        let mut stages: Vec<u32> = self
            .entries
            .iter()
            .flat_map(|(_, l)| l.stages.iter().copied())
            .collect();
        stages.sort_unstable();
        stages.dedup();
        if stages.iter().enumerate().any(|(i, &s)| s as usize != i) {
            return Err(Error::Strategy(format!(
                "the strategy for pipeline parallelism does not contain all stages: it has stages \
                 {stages:?}, expected 0..{}",
                stages.len()
            )));
        }
        Ok(stages.len())
    }

    /// The whole table as `_convert_to_list` returns it: an object from name
    /// to `[dev_matrix, tensor_map, param_split_shape, field, opt_step,
    /// opt_size, stage_list]`, in table order.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.entries
                .iter()
                .map(|(n, l)| (n.clone(), l.to_json()))
                .collect(),
        )
    }
}

/// Iterator over a [`LayoutTable`]'s parameters and layouts.
pub type LayoutTableIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (String, ParamLayout)>,
    fn(&'a (String, ParamLayout)) -> (&'a String, &'a ParamLayout),
>;

impl<'a> IntoIterator for &'a LayoutTable {
    type Item = (&'a String, &'a ParamLayout);
    type IntoIter = LayoutTableIter<'a>;

    fn into_iter(self) -> LayoutTableIter<'a> {
        self.entries.iter().map(|(n, l)| (n, l))
    }
}

/// Splits `"<stage>-<name>"` into the stage and the name; a name without `-`
/// is stage 0. Like MindSpore, a name with more than one `-` is an error, and
/// the stage must be an integer (Python `int()`: surrounding whitespace, a
/// leading `+` and `_` between digits are accepted).
pub(crate) fn split_stage_prefix(name: &str) -> Result<(u32, &str)> {
    let Some((prefix, rest)) = name.split_once('-') else {
        return Ok((0, name));
    };
    if rest.contains('-') {
        return Err(Error::Strategy(format!(
            "the parameter name contains more than one '-': MindSpore reads the text before '-' \
             as the pipeline stage of a merged strategy, so such names cannot be used \
             (name {name:?})"
        )));
    }
    let stage = parse_python_uint(prefix).ok_or_else(|| {
        Error::Strategy(format!(
            "the parameter name has a '-', so MindSpore reads {prefix:?} as its pipeline stage, \
             but that is not a stage number (name {name:?})"
        ))
    })?;
    Ok((stage, rest))
}

/// Python `int(s)` for non-negative values that fit in `u32`.
fn parse_python_uint(s: &str) -> Option<u32> {
    let s = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let s = s.strip_prefix('+').unwrap_or(s);
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_digit() || !bytes[bytes.len() - 1].is_ascii_digit() {
        return None;
    }
    let mut value = 0u32;
    let mut prev_underscore = false;
    for &b in bytes {
        if b == b'_' {
            if prev_underscore {
                return None;
            }
            prev_underscore = true;
            continue;
        }
        prev_underscore = false;
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::formats::strategy::tests::item;

    fn strategy(items: Vec<LayoutItem>) -> Strategy {
        Strategy {
            current_stage: 1,
            strategy_items: vec![],
            layout_items: items,
        }
    }

    #[test]
    fn plain_entry() {
        let mut it = item("w", &[2, 4], &[-1, 0]);
        it.param_split_shape = vec![vec![3, 5]];
        it.field = 7;
        it.opt_weight_shard_step = 4;
        it.opt_weight_shard_size = -1;
        let t = strategy(vec![it]).layout_table(None).unwrap();
        let l = t.get("w").unwrap();
        assert_eq!(l.dev_matrix, vec![2, 4]);
        assert_eq!(l.tensor_map, TensorMap::Flat(vec![-1, 0]));
        assert_eq!(l.param_split_shape, vec![3, 5]);
        assert_eq!(
            (l.field, l.opt_weight_shard_step, l.opt_weight_shard_size),
            (7, 4, -1)
        );
        assert_eq!(l.stages, vec![0]);
        assert_eq!(
            l.to_json(),
            serde_json::json!([[2, 4], [-1, 0], [3, 5], 7, 4, -1, [0]])
        );
        assert_eq!(t.device_num_per_stage().unwrap(), 8);
        assert_eq!(t.stage_num().unwrap(), 1);
    }

    #[test]
    fn nested_map_drops_empty_records() {
        let mut it = item("w", &[2, 2, 2], &[]);
        it.tensor_map = vec![vec![2, 0], vec![-1]];
        let mut one_d = item("b", &[2, 2, 2], &[]);
        one_d.tensor_map = vec![vec![1, 0], vec![]];
        let t = strategy(vec![it, one_d]).layout_table(None).unwrap();
        let w = &t.get("w").unwrap().tensor_map;
        assert_eq!(w, &TensorMap::Nested(vec![vec![2, 0], vec![-1]]));
        assert_eq!(w.ndim(), 2);
        assert_eq!(w.dim(0), &[2, 0]);
        let b = &t.get("b").unwrap().tensor_map;
        assert_eq!(b, &TensorMap::Nested(vec![vec![1, 0]]));
        assert_eq!(b.to_json(), serde_json::json!([[1, 0]]));
        let flat = TensorMap::Flat(vec![1, -1]);
        assert_eq!(flat.to_nested(), vec![vec![1], vec![-1]]);
        assert_eq!(flat.dims().collect::<Vec<_>>(), vec![&[1][..], &[-1][..]]);
    }

    #[test]
    fn duplicate_in_one_file_last_value_first_position() {
        let t = strategy(vec![
            item("a", &[2], &[0]),
            item("b", &[2], &[0]),
            item("a", &[4], &[-1]),
        ])
        .layout_table(None)
        .unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(t.get("a").unwrap().dev_matrix, vec![4]);
        assert_eq!(t.get("a").unwrap().stages, vec![0]);
    }

    fn shared(order: &[u32]) -> Strategy {
        // The embedding in stage 0 has map [0, -1], stage 1 [-1, 0], stage 2 [-1, -1].
        let maps = [[0, -1], [-1, 0], [-1, -1]];
        strategy(
            order
                .iter()
                .map(|&s| item(&format!("{s}-emb"), &[2, 2], &maps[s as usize]))
                .collect(),
        )
    }

    fn map_of(t: &LayoutTable) -> &TensorMap {
        &t.get("emb").unwrap().tensor_map
    }

    #[test]
    fn shared_param_without_rank_lowest_stage_wins() {
        for order in [[0, 1], [1, 0]] {
            let t = shared(&order).layout_table(None).unwrap();
            assert_eq!(map_of(&t), &TensorMap::Flat(vec![0, -1]), "{order:?}");
            assert_eq!(t.get("emb").unwrap().stages, order.to_vec());
        }
        let t = shared(&[2, 0, 1]).layout_table(None).unwrap();
        assert_eq!(map_of(&t), &TensorMap::Flat(vec![0, -1]));
        assert_eq!(t.get("emb").unwrap().stages, vec![2, 0, 1]);
        assert_eq!(t.stage_num().unwrap(), 3);
    }

    #[test]
    fn shared_param_with_rank() {
        // 4 devices per stage: ranks 0..4 are stage 0.
        for rank in 0..4 {
            for order in [[0, 1], [1, 0]] {
                let t = shared(&order).layout_table(Some(rank)).unwrap();
                assert_eq!(
                    map_of(&t),
                    &TensorMap::Flat(vec![0, -1]),
                    "{rank} {order:?}"
                );
            }
        }
        for rank in 4..12 {
            for order in [[0, 1], [1, 0]] {
                let t = shared(&order).layout_table(Some(rank)).unwrap();
                assert_eq!(
                    map_of(&t),
                    &TensorMap::Flat(vec![-1, 0]),
                    "{rank} {order:?}"
                );
                assert_eq!(t.get("emb").unwrap().stages, order.to_vec());
            }
        }
        // Among non-zero stages, the last one met wins.
        let t = shared(&[0, 2, 1]).layout_table(Some(5)).unwrap();
        assert_eq!(map_of(&t), &TensorMap::Flat(vec![-1, 0]));
        let t = shared(&[0, 1, 2]).layout_table(Some(5)).unwrap();
        assert_eq!(map_of(&t), &TensorMap::Flat(vec![-1, -1]));
        // The first occurrence is never compared: stage 1 first, rank 0 keeps
        // it until a stage-0 occurrence comes.
        let t = shared(&[1, 2]).layout_table(Some(0)).unwrap();
        assert_eq!(map_of(&t), &TensorMap::Flat(vec![-1, 0]));
    }

    #[test]
    fn stage_prefix_rules() {
        assert_eq!(split_stage_prefix("w").unwrap(), (0, "w"));
        assert_eq!(split_stage_prefix("3-w.x").unwrap(), (3, "w.x"));
        assert_eq!(split_stage_prefix(" +1_0 -w").unwrap(), (10, "w"));
        assert_eq!(split_stage_prefix("0-").unwrap(), (0, ""));
        for bad in ["a-w", "-w", "1__0-w", "_1-w", "99999999999-w"] {
            let err = split_stage_prefix(bad).unwrap_err();
            assert!(matches!(err, Error::Strategy(_)), "{bad}: {err}");
        }
        let err = split_stage_prefix("0-a-b").unwrap_err();
        assert!(err.to_string().contains("more than one '-'"), "{err}");
        let err = strategy(vec![item("0-a-b", &[2], &[0])])
            .layout_table(None)
            .unwrap_err();
        assert!(err.to_string().contains("0-a-b"), "{err}");
        assert!(err.to_string().contains("more than one '-'"), "{err}");
    }

    #[test]
    fn stage_num_requires_all_stages() {
        let s = strategy(vec![item("0-a", &[2], &[0]), item("2-b", &[2], &[0])]);
        let t = s.layout_table(None).unwrap();
        let err = t.stage_num().unwrap_err();
        assert!(matches!(err.root(), Error::Strategy(_)), "{err}");
        assert!(
            err.to_string().contains("does not contain all stages"),
            "{err}"
        );
        let s = strategy(vec![item("1-a", &[2], &[0])]);
        assert!(s.layout_table(None).unwrap().stage_num().is_err());
        let s = strategy(vec![item("1-a", &[2], &[0]), item("0-b", &[2], &[0])]);
        assert_eq!(s.layout_table(None).unwrap().stage_num().unwrap(), 2);
    }

    #[test]
    fn device_num_uses_first_param() {
        let s = strategy(vec![item("a", &[2, 3], &[0]), item("b", &[6], &[0])]);
        assert_eq!(
            s.layout_table(None)
                .unwrap()
                .device_num_per_stage()
                .unwrap(),
            6
        );
        // Issue 19 item 5: a layout covering other devices than the first
        // (MindSpore takes the first and silently drops ranks).
        let s = strategy(vec![item("a", &[2, 3], &[0]), item("b", &[8], &[0])]);
        let err = s
            .layout_table(None)
            .unwrap()
            .device_num_per_stage()
            .unwrap_err();
        assert!(matches!(err.root(), Error::Strategy(_)), "{err}");
        assert!(
            err.to_string().contains("\"b\"") && err.to_string().contains("covers 8 devices"),
            "{err}"
        );
        // Item 7: 2^32 devices is refused before anything is sized by it.
        let s = strategy(vec![item("a", &[1 << 16, 1 << 16], &[0])]);
        let err = s
            .layout_table(None)
            .unwrap()
            .device_num_per_stage()
            .unwrap_err();
        assert!(matches!(err.root(), Error::LimitExceeded { .. }), "{err}");
        let empty = LayoutTable::default();
        assert!(empty.device_num_per_stage().is_err());
        assert_eq!(empty.stage_num().unwrap(), 0);
    }

    #[test]
    fn invalid_items_are_errors_not_panics() {
        let mut no_dev = item("a", &[2], &[0]);
        no_dev.dev_matrix.clear();
        let mut no_split = item("a", &[2], &[0]);
        no_split.param_split_shape.clear();
        let mut no_map = item("a", &[2], &[0]);
        no_map.tensor_map.clear();
        for it in [
            no_dev,
            no_split,
            no_map,
            item("a", &[], &[]),
            item("a", &[2, 0], &[0]),
            item("a", &[2], &[1]),
            item("a", &[2], &[-2]),
            item("a", &[u32::MAX, u32::MAX, u32::MAX], &[0]),
        ] {
            let err = strategy(vec![it.clone()]).layout_table(None).unwrap_err();
            assert!(matches!(err.root(), Error::Strategy(_)), "{it:?}: {err}");
            assert!(err.to_string().contains("\"a\""), "{err}");
        }
    }

    #[test]
    fn retain_keeps_order_and_index() {
        let s = strategy(vec![
            item("a", &[2], &[0]),
            item("b", &[2], &[0]),
            item("c", &[2], &[0]),
        ]);
        let mut t = s.layout_table(None).unwrap();
        t.retain(|n, _| n != "b");
        assert_eq!(t.names().collect::<Vec<_>>(), vec!["a", "c"]);
        assert!(t.get("c").is_some() && !t.contains("b"));
        assert_eq!(t.len(), 2);
        assert_eq!((&t).into_iter().count(), 2);
    }
}
