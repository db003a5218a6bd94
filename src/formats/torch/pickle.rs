//! A pickle reader that runs no code: it understands the opcodes
//! `torch.save` emits for a state dict (protocols 2 to 5) and builds plain
//! values. A global is resolved only from a fixed list — the tensor
//! rebuilders, the storage types, `OrderedDict` — and anything else (a
//! function such as `os.system` or `builtins.eval`, a class to instantiate)
//! is refused by name before anything is built. There is no `find_class`, no
//! import, no call: "calling" an allowed global builds the value it stands for.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Globals a PyTorch state dict may name.
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` (and `_with_state`).
    RebuildParameter,
    /// A typed storage class (`torch.FloatStorage`, …) with its dtype.
    Storage(DType),
    /// `torch.float32`-style dtype objects and `torch.device` are not
    /// needed; `_codecs.encode` appears when protocol 2 pickles `bytes`.
    CodecsEncode,
}

/// What a state dict's pickle can hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An int (state dicts hold small ones: versions, offsets).
    Int(i64),
    /// An int wider than 64 bits, little-endian two's complement (the
    /// legacy format's magic number).
    WideInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// A bytes object.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An allowed global, not yet applied.
    Global(Global),
    /// A storage reference (`BINPERSID` of `('storage', type, key, location, numel)`).
    Storage {
        /// Element type.
        dtype: DType,
        /// Member name under `data/`.
        key: String,
        /// Elements.
        numel: u64,
    },
    /// A tensor: a view into a storage.
    Tensor(TensorRef),
}

/// A tensor as the pickle describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Element type (the storage's).
    pub dtype: DType,
    /// Storage key.
    pub key: String,
    /// Elements in the storage.
    pub storage_numel: u64,
    /// Offset into the storage, in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
}

fn refused(what: String) -> Error {
    Error::PickleRefused { what }
}

fn malformed(offset: usize, reason: impl Into<String>) -> Error {
    Error::Malformed {
        offset: offset as u64,
        reason: reason.into(),
    }
}

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// The allowed globals; anything else is refused, naming it.
fn resolve(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch", s) if storage_dtype(s).is_some() => {
            Global::Storage(storage_dtype(s).expect("checked"))
        }
        _ => return Err(refused(format!("global {module}.{name}"))),
    })
}

/// Limits that keep a hostile pickle from exhausting memory.
const MAX_ITEMS: usize = 1 << 24;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|e| self.b.get(self.pos..e))
            .ok_or(Error::Truncated {
                what: "pickle opcode argument",
                offset: self.pos as u64,
                needed: n as u64,
                available: self.b.len().saturating_sub(self.pos) as u64,
            })?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| malformed(self.pos, "a GLOBAL line has no end"))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| malformed(self.pos, "a GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| malformed(at, "a pickled str is not UTF-8"))
    }
}

/// Unpickles `bytes` into a [`Value`], refusing every global outside the
/// state-dict list and every opcode that would build an arbitrary object.
pub fn load(bytes: &[u8]) -> Result<Value> {
    load_prefix(bytes).map(|(v, _)| v)
}

/// [`load`] of the pickle at the start of `bytes`: its value and how many
/// bytes it took (up to and including STOP).
pub fn load_prefix(bytes: &[u8]) -> Result<(Value, usize)> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Value> = std::collections::HashMap::new();
    let underflow = |at: usize| malformed(at, "the pickle stack is empty where a value is needed");
    loop {
        let at = r.pos;
        let op = r.u8()?;
        macro_rules! pop {
            () => {
                stack.pop().ok_or_else(|| underflow(at))?
            };
        }
        macro_rules! pop_mark {
            () => {{
                let m = marks
                    .pop()
                    .ok_or_else(|| malformed(at, "no MARK before this opcode"))?;
                if m > stack.len() {
                    return Err(malformed(at, "MARK above the stack"));
                }
                stack.split_off(m)
            }};
        }
        match op {
            0x80 => {
                // PROTO
                let v = r.u8()?;
                if v > 5 {
                    return Err(malformed(at, format!("pickle protocol {v} is not known")));
                }
            }
            0x95 => {
                // FRAME: a length prefix only.
                r.u64()?;
            }
            b'.' => {
                // STOP
                return stack.pop().map(|v| (v, r.pos)).ok_or_else(|| underflow(at));
            }
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a => {
                // LONG1
                let n = r.u8()? as usize;
                let s = r.take(n)?;
                if n > 8 {
                    stack.push(Value::WideInt(s.to_vec()));
                    continue;
                }
                let mut buf = if s.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xFF; 8]
                } else {
                    [0; 8]
                };
                buf[..n].copy_from_slice(s);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(
                r.take(8)?.try_into().expect("8"),
            ))),
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = usize::try_from(r.u64()?).map_err(|_| malformed(at, "str too long"))?;
                stack.push(Value::Str(r.string(n)?));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            // Python 2 str (BINSTRING, SHORT_BINSTRING): torch.load decodes
            // them as UTF-8.
            b'T' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8e => {
                let n = usize::try_from(r.u64()?).map_err(|_| malformed(at, "bytes too long"))?;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(k, stack.last().ok_or_else(|| underflow(at))?.clone());
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(k, stack.last().ok_or_else(|| underflow(at))?.clone());
            }
            0x94 => {
                // MEMOIZE
                let k = memo.len() as u32;
                memo.insert(k, stack.last().ok_or_else(|| underflow(at))?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| malformed(at, format!("memo {k} was never stored")))?;
                stack.push(v.clone());
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(Value::Global(resolve(&module, &name)?));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop!();
                let module = pop!();
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(resolve(&m, &n)?)),
                    _ => return Err(malformed(at, "STACK_GLOBAL of non-strings")),
                }
            }
            b't' => {
                let items = pop_mark!();
                stack.push(Value::Tuple(items));
            }
            0x85 => {
                let a = pop!();
                stack.push(Value::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop!();
                let a = pop!();
                stack.push(Value::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop!();
                let b = pop!();
                let a = pop!();
                stack.push(Value::Tuple(vec![a, b, c]));
            }
            b'l' => {
                let items = pop_mark!();
                stack.push(Value::List(items));
            }
            b'a' => {
                let v = pop!();
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err(malformed(at, "APPEND to a non-list")),
                }
            }
            b'e' => {
                let items = pop_mark!();
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err(malformed(at, "APPENDS to a non-list")),
                }
            }
            b'd' => {
                let items = pop_mark!();
                stack.push(Value::Dict(pairs(items, at)?));
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err(malformed(at, "SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark!();
                let new = pairs(items, at)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => {
                        if d.len() + new.len() > MAX_ITEMS {
                            return Err(malformed(at, "too many dict items"));
                        }
                        d.extend(new)
                    }
                    _ => return Err(malformed(at, "SETITEMS on a non-dict")),
                }
            }
            b'Q' => {
                // BINPERSID
                let pid = pop!();
                stack.push(storage(pid, at)?);
            }
            b'R' => {
                // REDUCE: only an allowed global's meaning, never a call.
                let args = pop!();
                let f = pop!();
                stack.push(apply(f, args, at)?);
            }
            b'b' => {
                // BUILD: the state of an OrderedDict (its `_metadata`) or of
                // a parameter; neither changes a tensor's bytes.
                let _state = pop!();
                match stack.last() {
                    Some(Value::Dict(_) | Value::Tensor(_)) => {}
                    _ => return Err(refused("BUILD (setting an object's state)".into())),
                }
            }
            b'0' => {
                pop!();
            }
            b'2' => {
                let v = stack.last().ok_or_else(|| underflow(at))?.clone();
                stack.push(v);
            }
            b'1' => {
                let _ = pop_mark!();
            }
            b'i' => return Err(refused("the INST opcode (instantiating a class)".into())),
            b'o' => return Err(refused("the OBJ opcode (instantiating a class)".into())),
            0x81 | 0x92 => return Err(refused("NEWOBJ (instantiating a class)".into())),
            b'P' => return Err(refused("a text persistent id".into())),
            0x82..=0x84 => return Err(refused("an extension-registry global (EXT)".into())),
            other => {
                return Err(malformed(
                    at,
                    format!("pickle opcode {other:#04x} is not one torch.save writes"),
                ))
            }
        }
        if stack.len() > MAX_ITEMS || memo.len() > MAX_ITEMS {
            return Err(malformed(at, "too many pickle values"));
        }
    }
}

fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return Err(malformed(at, "an odd number of dict items"));
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn storage(pid: Value, at: usize) -> Result<Value> {
    let Value::Tuple(t) = pid else {
        return Err(malformed(at, "a persistent id that is not a tuple"));
    };
    // torch.save's ('storage', type, key, location, numel); the legacy
    // format adds view_metadata, None unless the storage is a view.
    let (head, view) = match t.len() {
        6 => (&t[..5], &t[5]),
        _ => (&t[..], &Value::None),
    };
    if *view != Value::None {
        return Err(malformed(
            at,
            "a storage view (legacy view_metadata) is not read",
        ));
    }
    match head {
        [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, Value::Int(numel)]
            if kind == "storage" && *numel >= 0 =>
        {
            if key.is_empty() || key.contains('/') || key.contains("..") {
                return Err(malformed(
                    at,
                    format!("storage key {key:?} is not a member name"),
                ));
            }
            Ok(Value::Storage {
                dtype: *dtype,
                key: key.clone(),
                numel: *numel as u64,
            })
        }
        _ => Err(malformed(
            at,
            "a persistent id that is not ('storage', <torch storage type>, key, location, numel)",
        )),
    }
}

fn ints(v: &Value, at: usize, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Tuple(t) | Value::List(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => Err(malformed(
                    at,
                    format!("{what} holds a value that is not a size"),
                )),
            })
            .collect(),
        _ => Err(malformed(at, format!("{what} is not a tuple"))),
    }
}

fn apply(f: Value, args: Value, at: usize) -> Result<Value> {
    let Value::Global(g) = f else {
        return Err(refused(
            "a call of a value that is not an allowed global".into(),
        ));
    };
    let Value::Tuple(args) = args else {
        return Err(malformed(at, "REDUCE arguments are not a tuple"));
    };
    match g {
        Global::OrderedDict => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            // OrderedDict([[k, v], …]), as Python 2 pickles it.
            [Value::List(items) | Value::Tuple(items)] => items
                .iter()
                .map(|kv| match kv {
                    Value::List(p) | Value::Tuple(p) if p.len() == 2 => {
                        Ok((p[0].clone(), p[1].clone()))
                    }
                    _ => Err(malformed(at, "OrderedDict items that are not pairs")),
                })
                .collect::<Result<Vec<_>>>()
                .map(Value::Dict),
            _ => Err(malformed(
                at,
                "OrderedDict called with arguments other than its items",
            )),
        },
        Global::RebuildTensor => match args.as_slice() {
            [Value::Storage { dtype, key, numel }, Value::Int(offset), size, stride, ..]
                if *offset >= 0 =>
            {
                let shape = ints(size, at, "a tensor's size")?;
                let stride = ints(stride, at, "a tensor's stride")?;
                if shape.len() != stride.len() {
                    return Err(malformed(at, "a tensor's size and stride differ in length"));
                }
                Ok(Value::Tensor(TensorRef {
                    dtype: *dtype,
                    key: key.clone(),
                    storage_numel: *numel,
                    offset: *offset as u64,
                    shape,
                    stride,
                }))
            }
            _ => Err(malformed(
                at,
                "_rebuild_tensor_v2 without (storage, offset, size, stride, …)",
            )),
        },
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(malformed(
                at,
                "_rebuild_parameter of something not a tensor",
            )),
        },
        Global::CodecsEncode => match args.as_slice() {
            [Value::Str(s), Value::Str(enc)] if enc == "latin1" => {
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    out.push(u8::try_from(c as u32).map_err(|_| {
                        malformed(at, "a latin1 bytes literal with a character above 255")
                    })?);
                }
                Ok(Value::Bytes(out))
            }
            _ => Err(refused(
                "_codecs.encode other than a latin1 bytes literal".into(),
            )),
        },
        Global::Storage(_) => Err(refused("a call of a storage type".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malicious_pickles_are_refused_by_name() {
        // pickle.dumps of an object whose __reduce__ returns (os.system, ("echo hi",)), protocol 2.
        let os_system =
            b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let e = load(os_system).unwrap_err();
        assert!(
            matches!(&e, Error::PickleRefused { what } if what == "global posix.system"),
            "{e}"
        );
        let eval = b"\x80\x04\x95\x1b\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R.";
        let e = load(eval).unwrap_err();
        assert!(e.to_string().contains("global builtins.eval"), "{e}");
        // An arbitrary class instantiated through NEWOBJ.
        let newobj = b"\x80\x02ccollections\nOrderedDict\n)\x81.";
        assert!(matches!(
            load(newobj).unwrap_err(),
            Error::PickleRefused { .. }
        ));
        // INST runs a constructor named inline.
        let inst = b"(ios\nsystem\nS'x'\n.";
        assert!(matches!(
            load(inst).unwrap_err(),
            Error::PickleRefused { .. }
        ));
        // A call of an allowed but non-callable value.
        let call = b"\x80\x02ctorch\nFloatStorage\n)R.";
        assert!(matches!(
            load(call).unwrap_err(),
            Error::PickleRefused { .. }
        ));
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        assert!(matches!(
            load(b"\x80\x02X\xff\x00\x00\x00ab").unwrap_err(),
            Error::Truncated { .. }
        ));
        assert!(load(b"").is_err());
        assert!(load(b"\x80\x02s.").is_err());
        assert!(load(b"\x80\x02h\x05.").is_err());
        assert!(load(b"\x80\x02\xff").is_err());
    }

    #[test]
    fn plain_values_and_ordered_dicts() {
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aK\x07X\x01\x00\x00\x00bJ\xff\xff\xff\xffu}b.";
        assert_eq!(
            load(p).unwrap(),
            Value::Dict(vec![
                (Value::Str("a".into()), Value::Int(7)),
                (Value::Str("b".into()), Value::Int(-1)),
            ])
        );
    }
}
