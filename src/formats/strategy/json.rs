//! The JSON variant of strategy files (spec 2.3), written by MindSpore's C++
//! when the strategy file name ends in `.json`:
//!
//! ```text
//! {"current_stage": n,
//!  "parallel_strategy_item": {node: {"stage": s, "parallel_strategy": [[…]]}},
//!  "parallel_layout_item": {param: {"dev_matrix": [..], "tensor_map": [..],
//!    "tensor_shape": [..], "field": f, "opt_weight_shard_step": s,
//!    "opt_weight_shard_size": z, "param_split_shape"?: [..], "indices_offset"?: [..]}}}
//! ```
//!
//! Reading follows MindSpore's `_build_json_strategy`: one dev matrix, one
//! flat tensor map, `field` and the two opt-shard values required, the split
//! lists optional. Unknown keys are ignored. Objects keep their order; a
//! repeated key keeps its first position and its last value, as Python does.

use serde_json::{Map, Value};

use super::{not_a_strategy, LayoutItem, Strategy, StrategyItem};
use crate::error::{Error, Result};

/// Parses the JSON variant (no semantic validation).
pub(super) fn parse(bytes: &[u8]) -> Result<Strategy> {
    if bytes.is_empty() {
        return Err(not_a_strategy("the file is empty"));
    }
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| not_a_strategy(&format!("it is not valid JSON ({e})")))?;
    let Value::Object(root) = root else {
        return Err(not_a_strategy("the JSON root is not an object"));
    };
    let Some(layouts) = root.get("parallel_layout_item") else {
        return Err(not_a_strategy("it has no \"parallel_layout_item\" key"));
    };
    let Value::Object(layouts) = layouts else {
        return Err(not_a_strategy("\"parallel_layout_item\" is not an object"));
    };
    let current_stage = match root.get("current_stage") {
        None => 0,
        Some(v) => as_int::<u32>(v, "current_stage")?,
    };
    let strategy_items = match root.get("parallel_strategy_item") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(items)) => items
            .iter()
            .map(|(name, v)| parse_strategy_item(name, v).map_err(|e| e.in_tensor(name)))
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(Error::Strategy(
                "\"parallel_strategy_item\" is not an object".into(),
            ))
        }
    };
    let layout_items = layouts
        .iter()
        .map(|(name, v)| parse_layout_item(name, v).map_err(|e| e.in_tensor(name)))
        .collect::<Result<_>>()?;
    Ok(Strategy {
        current_stage,
        strategy_items,
        layout_items,
    })
}

fn parse_strategy_item(name: &str, v: &Value) -> Result<StrategyItem> {
    let Value::Object(obj) = v else {
        return Err(Error::Strategy("the strategy item is not an object".into()));
    };
    let stage = as_int::<u32>(required(obj, "stage")?, "stage")?;
    let strategy = match obj.get("parallel_strategy") {
        None => Vec::new(),
        Some(Value::Array(inputs)) => inputs
            .iter()
            .map(|dims| as_int_list::<u32>(dims, "parallel_strategy"))
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(Error::Strategy(
                "\"parallel_strategy\" is not a list of lists".into(),
            ))
        }
    };
    Ok(StrategyItem {
        node_name: name.to_string(),
        stage,
        strategy,
    })
}

fn parse_layout_item(name: &str, v: &Value) -> Result<LayoutItem> {
    let Value::Object(obj) = v else {
        return Err(Error::Strategy("the layout item is not an object".into()));
    };
    let optional_list = |key: &str| -> Result<Vec<i64>> {
        match obj.get(key) {
            None => Ok(Vec::new()),
            Some(v) => as_int_list::<i64>(v, key),
        }
    };
    let dev_matrix = as_int_list::<u32>(required(obj, "dev_matrix")?, "dev_matrix")?;
    let tensor_map = required(obj, "tensor_map")?;
    if let Value::Array(a) = tensor_map {
        if a.iter().any(Value::is_array) {
            return Err(Error::Strategy(
                "\"tensor_map\" is a nested list; the JSON variant only holds flat tensor maps \
                 (MindSpore cannot read this either)"
                    .into(),
            ));
        }
    }
    Ok(LayoutItem {
        param_name: name.to_string(),
        dev_matrix: vec![dev_matrix],
        tensor_map: vec![as_int_list::<i32>(tensor_map, "tensor_map")?],
        param_split_shape: vec![optional_list("param_split_shape")?],
        indices_offset: vec![optional_list("indices_offset")?],
        field: as_int::<i32>(required(obj, "field")?, "field")?,
        opt_weight_shard_step: as_int::<i32>(
            required(obj, "opt_weight_shard_step")?,
            "opt_weight_shard_step",
        )?,
        opt_weight_shard_size: as_int::<i32>(
            required(obj, "opt_weight_shard_size")?,
            "opt_weight_shard_size",
        )?,
        tensor_shape: match obj.get("tensor_shape") {
            None => None,
            Some(v) => Some(as_int_list::<i64>(v, "tensor_shape")?),
        },
    })
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| Error::Strategy(format!("the layout has no {key:?}")))
}

fn as_int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value, key: &str) -> Result<T> {
    let bad = || {
        Error::Strategy(format!(
            "{key:?} is {v}, not an integer of type {}",
            std::any::type_name::<T>()
        ))
    };
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                T::try_from(i).map_err(|_| bad())
            } else if let Some(u) = n.as_u64() {
                T::try_from(u).map_err(|_| bad())
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

fn as_int_list<T: TryFrom<i64> + TryFrom<u64>>(v: &Value, key: &str) -> Result<Vec<T>> {
    let bad = |what: &dyn std::fmt::Display| {
        Error::Strategy(format!(
            "{key:?} must be a list of integers of type {}, but {what}",
            std::any::type_name::<T>()
        ))
    };
    match v {
        Value::Array(items) => items
            .iter()
            .map(|x| as_int::<T>(x, key).map_err(|_| bad(&format_args!("it holds {x}"))))
            .collect(),
        _ => Err(bad(&format_args!("it is {v}"))),
    }
}

/// Serialises the JSON variant, keys in the order of spec 2.3.
pub(super) fn serialize(s: &Strategy) -> Result<Vec<u8>> {
    let mut strategies = Map::new();
    for item in &s.strategy_items {
        strategies.insert(
            item.node_name.clone(),
            serde_json::json!({"stage": item.stage, "parallel_strategy": item.strategy}),
        );
    }
    let mut layouts = Map::new();
    for item in &s.layout_items {
        let layout = layout_json(item).map_err(|e| e.in_tensor(&item.param_name))?;
        layouts.insert(item.param_name.clone(), layout);
    }
    let mut root = Map::new();
    root.insert("current_stage".into(), s.current_stage.into());
    root.insert("parallel_strategy_item".into(), Value::Object(strategies));
    root.insert("parallel_layout_item".into(), Value::Object(layouts));
    let mut bytes = serde_json::to_vec_pretty(&Value::Object(root))
        .map_err(|e| Error::Strategy(format!("cannot serialise JSON: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn layout_json(item: &LayoutItem) -> Result<Value> {
    let [dev_matrix] = item.dev_matrix.as_slice() else {
        return Err(Error::Strategy(format!(
            "the layout has {} dev_matrix records; the JSON variant holds exactly one",
            item.dev_matrix.len()
        )));
    };
    let [tensor_map] = item.tensor_map.as_slice() else {
        return Err(Error::Strategy(format!(
            "the layout has {} tensor_map records (a nested tensor map); the JSON variant holds \
             only a flat one",
            item.tensor_map.len()
        )));
    };
    let mut obj = Map::new();
    obj.insert("dev_matrix".into(), serde_json::json!(dev_matrix));
    obj.insert("tensor_map".into(), serde_json::json!(tensor_map));
    if let Some(shape) = &item.tensor_shape {
        obj.insert("tensor_shape".into(), serde_json::json!(shape));
    }
    obj.insert("field".into(), item.field.into());
    obj.insert(
        "opt_weight_shard_step".into(),
        item.opt_weight_shard_step.into(),
    );
    obj.insert(
        "opt_weight_shard_size".into(),
        item.opt_weight_shard_size.into(),
    );
    let split = item.param_split_shape.first().cloned().unwrap_or_default();
    let offset = item.indices_offset.first().cloned().unwrap_or_default();
    if !split.is_empty() || !offset.is_empty() {
        obj.insert("param_split_shape".into(), serde_json::json!(split));
        obj.insert("indices_offset".into(), serde_json::json!(offset));
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "current_stage": 3,
      "parallel_strategy_item": {
        "MatMul-op0": {"stage": 1, "parallel_strategy": [[2, 1], [1, 2]]}
      },
      "parallel_layout_item": {
        "w": {"dev_matrix": [2, 2], "tensor_map": [1, -1], "tensor_shape": [8, 4],
              "field": 0, "opt_weight_shard_step": 2, "opt_weight_shard_size": -1},
        "emb": {"dev_matrix": [4], "tensor_map": [0, -1], "tensor_shape": [16, 4],
                "field": 2, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0,
                "param_split_shape": [4, 12], "indices_offset": [0, 4]}
      }
    }"#;

    #[test]
    fn parse_sample() {
        let s = parse(SAMPLE.as_bytes()).unwrap();
        s.validate().unwrap();
        assert_eq!(s.current_stage, 3);
        assert_eq!(s.stage(), Some(1));
        assert_eq!(s.strategy_items[0].strategy, vec![vec![2, 1], vec![1, 2]]);
        let w = &s.layout_items[0];
        assert_eq!(w.param_name, "w");
        assert_eq!(w.dev_matrix, vec![vec![2, 2]]);
        assert_eq!(w.tensor_map, vec![vec![1, -1]]);
        assert_eq!(w.param_split_shape, vec![Vec::<i64>::new()]);
        assert_eq!(w.indices_offset, vec![Vec::<i64>::new()]);
        assert_eq!((w.opt_weight_shard_step, w.opt_weight_shard_size), (2, -1));
        assert_eq!(w.tensor_shape, Some(vec![8, 4]));
        let emb = &s.layout_items[1];
        assert_eq!(emb.param_split_shape, vec![vec![4, 12]]);
        assert_eq!(emb.indices_offset, vec![vec![0, 4]]);
        assert_eq!(emb.field, 2);
    }

    #[test]
    fn json_round_trip() {
        let s = parse(SAMPLE.as_bytes()).unwrap();
        let again = parse(&serialize(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn duplicate_keys_keep_first_position_last_value() {
        let text = r#"{"parallel_layout_item": {
            "a": {"dev_matrix": [2], "tensor_map": [0], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
            "b": {"dev_matrix": [2], "tensor_map": [0], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0},
            "a": {"dev_matrix": [4], "tensor_map": [0], "field": 0,
                  "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}}}"#;
        let s = parse(text.as_bytes()).unwrap();
        let names: Vec<_> = s.layout_items.iter().map(|l| &l.param_name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.layout_items[0].dev_matrix, vec![vec![4]]);
        assert_eq!(s.current_stage, 0);
    }

    fn parse_err(text: &str) -> String {
        let err = parse(text.as_bytes()).unwrap_err();
        assert!(matches!(err.root(), Error::Strategy(_)), "{err}");
        err.to_string()
    }

    #[test]
    fn bad_inputs() {
        assert!(parse_err("").contains("not a strategy file"));
        assert!(parse_err("{").contains("not valid JSON"));
        assert!(parse_err("[1]").contains("not an object"));
        assert!(parse_err(r#"{"a": 1}"#).contains("parallel_layout_item"));
        assert!(parse_err(r#"{"parallel_layout_item": []}"#).contains("not an object"));
        let layout = |body: &str| format!(r#"{{"parallel_layout_item": {{"w": {{{body}}}}}}}"#);
        let full =
            r#""dev_matrix": [2], "tensor_map": [0], "field": 0, "opt_weight_shard_step": 0"#;
        let e = parse_err(&layout(full));
        assert!(
            e.contains("opt_weight_shard_size") && e.contains("\"w\""),
            "{e}"
        );
        let e = parse_err(&layout(
            r#""dev_matrix": [-2], "tensor_map": [0], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0"#,
        ));
        assert!(e.contains("dev_matrix"), "{e}");
        let e = parse_err(&layout(
            r#""dev_matrix": [2], "tensor_map": [[0, 1]], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0"#,
        ));
        assert!(e.contains("nested"), "{e}");
        let e = parse_err(&layout(
            r#""dev_matrix": [2], "tensor_map": [0], "field": 1.5, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0"#,
        ));
        assert!(e.contains("field"), "{e}");
        let e = parse_err(
            r#"{"parallel_strategy_item": {"op": {"parallel_strategy": []}}, "parallel_layout_item": {}}"#,
        );
        assert!(e.contains("stage"), "{e}");
        let e = parse_err(r#"{"current_stage": "x", "parallel_layout_item": {}}"#);
        assert!(e.contains("current_stage"), "{e}");
    }

    #[test]
    fn serialize_refuses_what_json_cannot_hold() {
        let mut s = parse(SAMPLE.as_bytes()).unwrap();
        s.layout_items[0].tensor_map = vec![vec![1, 0], vec![]];
        let e = serialize(&s).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Strategy, "{e}");
        assert_eq!(e.tensor(), Some("w"), "{e}");
        assert!(e.to_string().contains("nested"), "{e}");
        s.layout_items[0].tensor_map = vec![vec![1]];
        s.layout_items[0].dev_matrix = vec![];
        assert!(serialize(&s).is_err());
    }
}
