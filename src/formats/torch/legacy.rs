//! The legacy `torch.save` format (torch < 1.6, or
//! `_use_new_zipfile_serialization=False`): five pickles back to back — the
//! magic number, the protocol version (1001), the system info, the object,
//! the sorted list of storage keys — then each storage in that order as a
//! little-endian i64 element count followed by its bytes.

use std::collections::HashMap;
use std::ops::Range;

use super::pickle::{self, Value};
use super::TorchEntry;
use crate::error::{Error, Result};

/// 0x1950a86a20f9469cfc6c, little-endian, as `LONG1` stores it.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn malformed(offset: usize, reason: impl Into<String>) -> Error {
    Error::Malformed {
        offset: offset as u64,
        reason: reason.into(),
    }
}

/// The tensors of a legacy file.
pub fn index(bytes: &[u8]) -> Result<Vec<TorchEntry>> {
    let mut pos = 0;
    let next = |pos: &mut usize| -> Result<Value> {
        let (v, n) = pickle::load_prefix(&bytes[*pos..]).map_err(|e| match e {
            Error::Truncated {
                what,
                offset,
                needed,
                available,
            } => Error::Truncated {
                what,
                offset: offset + *pos as u64,
                needed,
                available,
            },
            other => other,
        })?;
        *pos += n;
        Ok(v)
    };
    if next(&mut pos)? != Value::WideInt(MAGIC.to_vec()) {
        return Err(malformed(
            0,
            "a pickle that is not torch.save's (no magic number)",
        ));
    }
    let at = pos;
    if next(&mut pos)? != Value::Int(1001) {
        return Err(malformed(
            at,
            "an unknown legacy torch.save protocol version",
        ));
    }
    let at = pos;
    let Value::Dict(info) = next(&mut pos)? else {
        return Err(malformed(at, "no system info dict"));
    };
    let little = info
        .iter()
        .find(|(k, _)| *k == Value::Str("little_endian".into()))
        .map(|(_, v)| v.clone());
    if little != Some(Value::Bool(true)) {
        return Err(malformed(at, "only little-endian files are read"));
    }
    let object = next(&mut pos)?;
    let at = pos;
    let Value::List(keys) = next(&mut pos)? else {
        return Err(malformed(at, "no storage key list"));
    };
    // Element sizes by key, from the tensors that view them.
    let mut elem: HashMap<String, usize> = HashMap::new();
    collect_storages(&object, &mut elem);
    let mut storages: Vec<(String, Range<usize>)> = Vec::with_capacity(keys.len());
    for k in keys {
        let Value::Str(key) = k else {
            return Err(malformed(pos, "a storage key that is not a str"));
        };
        let size = *elem.get(&key).ok_or_else(|| {
            malformed(
                pos,
                format!("storage {key:?} is listed but no tensor uses it"),
            )
        })?;
        let head = bytes.get(pos..pos + 8).ok_or(Error::Truncated {
            what: "legacy storage size",
            offset: pos as u64,
            needed: 8,
            available: bytes.len().saturating_sub(pos) as u64,
        })?;
        let numel = u64::from_le_bytes(head.try_into().expect("8"));
        let start = pos + 8;
        let len = numel
            .checked_mul(size as u64)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| start.checked_add(l).is_some_and(|e| e <= bytes.len()))
            .ok_or(Error::Truncated {
                what: "legacy storage data (the file is cut short)",
                offset: start as u64,
                needed: numel.saturating_mul(size as u64),
                available: bytes.len().saturating_sub(start) as u64,
            })?;
        storages.push((key, start..start + len));
        pos = start + len;
    }
    super::entries(object, &storages)
}

fn collect_storages(v: &Value, out: &mut HashMap<String, usize>) {
    match v {
        Value::Tensor(t) => {
            out.insert(t.key.clone(), t.dtype.size());
        }
        Value::Dict(items) => {
            for (_, v) in items {
                collect_storages(v, out);
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for v in items {
                collect_storages(v, out);
            }
        }
        _ => {}
    }
}
