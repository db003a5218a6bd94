//! `common.json` of a Checkpoint 2.0 iteration directory written by
//! `transform --output-format checkpoint2`: mindformers 2.1.0's
//! `CommonInfo.save_common` (`json.dumps(self.__dict__, ensure_ascii=False,
//! indent=4)`, keys `epoch_num, step_num, global_step, loss_scale,
//! global_batch_size, consumed_samples, ckpt_status`).
//!
//! A Checkpoint 2.0 source's own `common.json` is copied byte for byte (the
//! same training state, re-laid out). Otherwise the counters come from the
//! source's scalar entries of those names (what mindformers' legacy
//! `CheckpointMonitor` appends to every checkpoint), `null` where absent,
//! except `global_step`, 0 when absent (the value mindformers' loader uses
//! without a `common.json`; a `null` there would fail its
//! `Tensor([global_step])`). `consumed_samples` is unknown to a weight
//! conversion (`null`); `ckpt_status` is 0 (`CkptHealthStatus.NORMAL`):
//! mindformers' "latest healthy checkpoint" search skips an iteration
//! without it.

use std::path::Path;

use crate::error::{Error, Result, ResultExt};
use crate::formats::checkpoint2;
use crate::formats::Source;
use crate::plan::{Content, Plan};
use crate::DType;

/// The file name.
pub(crate) const COMMON: &str = "common.json";

/// A counter's value as Python's `json.dumps` writes it.
enum Num {
    Int(i64),
    Float(f64),
}

/// Python's `repr` of a float (shortest round trip; exponent form below
/// 1e-4 and from 1e16, with a signed two-digit exponent).
fn py_float(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{v:e}");
        let (m, e) = s.split_once('e').expect("exponent form");
        let (sign, digits) = match e.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', e),
        };
        return format!("{m}e{sign}{digits:0>2}");
    }
    let s = format!("{v}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The first element of a scalar entry's bytes.
fn decode(dtype: DType, b: &[u8]) -> Option<Num> {
    let n = |k: usize| b.get(..k);
    Some(match dtype {
        DType::Bool | DType::U8 => Num::Int(*b.first()? as i64),
        DType::I8 => Num::Int(*b.first()? as i8 as i64),
        DType::I16 => Num::Int(i16::from_le_bytes(n(2)?.try_into().ok()?) as i64),
        DType::U16 => Num::Int(u16::from_le_bytes(n(2)?.try_into().ok()?) as i64),
        DType::I32 => Num::Int(i32::from_le_bytes(n(4)?.try_into().ok()?) as i64),
        DType::U32 => Num::Int(u32::from_le_bytes(n(4)?.try_into().ok()?) as i64),
        DType::I64 => Num::Int(i64::from_le_bytes(n(8)?.try_into().ok()?)),
        DType::U64 => Num::Int(u64::from_le_bytes(n(8)?.try_into().ok()?) as i64),
        DType::F16 => Num::Float(half::f16::from_le_bytes(n(2)?.try_into().ok()?).to_f64()),
        DType::BF16 => Num::Float(half::bf16::from_le_bytes(n(2)?.try_into().ok()?).to_f64()),
        DType::F32 => Num::Float(f32::from_le_bytes(n(4)?.try_into().ok()?) as f64),
        DType::F64 => Num::Float(f64::from_le_bytes(n(8)?.try_into().ok()?)),
        _ => return None,
    })
}

/// The value of scalar entry `name` in the plan's first destination file.
fn counter(per_rank: &Plan, name: &str) -> Result<Option<Num>> {
    let Some(t) = per_rank
        .files
        .iter()
        .min_by_key(|f| f.rank)
        .and_then(|f| f.tensors.iter().find(|t| t.name == name))
    else {
        return Ok(None);
    };
    let Content::Tensor { dtype, steps, .. } = &t.content else {
        return Ok(None);
    };
    let Some(step) = steps.first() else {
        return Ok(None);
    };
    let path = &per_rank.sources[step.source].path;
    let source = Source::open(path, &Default::default())?;
    let bytes: Vec<u8> = source
        .chunks(&step.tensor)
        .map_err(|e| e.in_tensor(name))?
        .concat();
    decode(*dtype, &bytes).map(Some).ok_or_else(|| {
        Error::unsupported(format!(
            "{dtype} cannot be a training counter in common.json"
        ))
        .in_tensor(name)
        .in_file(path)
    })
}

/// The bytes of `common.json` for a save from `src` planned as `per_rank`.
pub(crate) fn common_json(src: &Path, per_rank: &Plan) -> Result<Vec<u8>> {
    if checkpoint2::is_checkpoint2(src) {
        let own = checkpoint2::iteration_dir(src)?.join(COMMON);
        if own.is_file() {
            return std::fs::read(&own).in_file(&own);
        }
    }
    let int = |v: Option<Num>| match v {
        None => "null".to_string(),
        Some(Num::Int(i)) => i.to_string(),
        Some(Num::Float(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => (f as i64).to_string(),
        Some(Num::Float(f)) => py_float(f),
    };
    let float = |v: Option<Num>| match v {
        None => "null".to_string(),
        Some(Num::Int(i)) => py_float(i as f64),
        Some(Num::Float(f)) => py_float(f),
    };
    let global_step = counter(per_rank, "global_step")?.or(Some(Num::Int(0)));
    let fields = [
        ("epoch_num", int(counter(per_rank, "epoch_num")?)),
        ("step_num", int(counter(per_rank, "step_num")?)),
        ("global_step", int(global_step)),
        ("loss_scale", float(counter(per_rank, "loss_scale")?)),
        (
            "global_batch_size",
            int(counter(per_rank, "global_batch_size")?),
        ),
        ("consumed_samples", "null".to_string()),
        ("ckpt_status", "0".to_string()),
    ];
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("    \"{k}\": {v}"))
        .collect();
    Ok(format!("{{\n{}\n}}", body.join(",\n")).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::py_float;

    #[test]
    fn floats_print_as_python_repr() {
        for (v, want) in [
            (1.0, "1.0"),
            (65536.0, "65536.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (-2.5, "-2.5"),
        ] {
            assert_eq!(py_float(v), want);
        }
    }
}
