//! Element conversions and strided copies on host bytes: the "device math"
//! of the emulator. Float conversions round once, to nearest, ties to even,
//! converting each pair directly (never through a narrower type), which is
//! the documented behaviour of aclnnCast / aclnnInplaceCopy on A2 as far as
//! the public docs say (⚠ unverified on hardware).

use ascendcl_sys::sys::*;
use half::{bf16, f16};

/// A decoded element.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val {
    F16(f16),
    BF16(bf16),
    F32(f32),
    F64(f64),
    Int(i128),
}

pub(crate) fn size(dt: aclDataType) -> Option<usize> {
    dt.size()
}

pub(crate) fn is_float(dt: aclDataType) -> bool {
    matches!(dt, ACL_FLOAT16 | ACL_BF16 | ACL_FLOAT | ACL_DOUBLE)
}

pub(crate) fn is_int(dt: aclDataType) -> bool {
    matches!(
        dt,
        ACL_INT8
            | ACL_UINT8
            | ACL_INT16
            | ACL_UINT16
            | ACL_INT32
            | ACL_UINT32
            | ACL_INT64
            | ACL_UINT64
            | ACL_BOOL
    )
}

pub(crate) fn decode(dt: aclDataType, b: &[u8]) -> Val {
    match dt {
        ACL_FLOAT16 => Val::F16(f16::from_le_bytes([b[0], b[1]])),
        ACL_BF16 => Val::BF16(bf16::from_le_bytes([b[0], b[1]])),
        ACL_FLOAT => Val::F32(f32::from_le_bytes(b[..4].try_into().unwrap())),
        ACL_DOUBLE => Val::F64(f64::from_le_bytes(b[..8].try_into().unwrap())),
        ACL_INT8 => Val::Int(b[0] as i8 as i128),
        ACL_UINT8 => Val::Int(b[0] as i128),
        ACL_BOOL => Val::Int((b[0] != 0) as i128),
        ACL_INT16 => Val::Int(i16::from_le_bytes([b[0], b[1]]) as i128),
        ACL_UINT16 => Val::Int(u16::from_le_bytes([b[0], b[1]]) as i128),
        ACL_INT32 => Val::Int(i32::from_le_bytes(b[..4].try_into().unwrap()) as i128),
        ACL_UINT32 => Val::Int(u32::from_le_bytes(b[..4].try_into().unwrap()) as i128),
        ACL_INT64 => Val::Int(i64::from_le_bytes(b[..8].try_into().unwrap()) as i128),
        ACL_UINT64 => Val::Int(u64::from_le_bytes(b[..8].try_into().unwrap()) as i128),
        _ => Val::Int(0),
    }
}

fn as_f32(v: Val) -> f32 {
    match v {
        Val::F16(x) => x.to_f32(),
        Val::BF16(x) => x.to_f32(),
        Val::F32(x) => x,
        Val::F64(x) => x as f32,
        Val::Int(i) => i as f32,
    }
}

fn as_f64(v: Val) -> f64 {
    match v {
        Val::F16(x) => x.to_f64(),
        Val::BF16(x) => x.to_f64(),
        Val::F32(x) => x as f64,
        Val::F64(x) => x,
        Val::Int(i) => i as f64,
    }
}

/// Encodes `v` as `dt`, one rounding.
pub(crate) fn encode(dt: aclDataType, v: Val, out: &mut [u8]) {
    match dt {
        ACL_FLOAT16 => {
            let x = match v {
                Val::F64(x) => f16::from_f64(x),
                Val::F16(x) => x,
                other => f16::from_f32(as_f32(other)),
            };
            out[..2].copy_from_slice(&x.to_le_bytes())
        }
        ACL_BF16 => {
            let x = match v {
                Val::F64(x) => bf16::from_f64(x),
                Val::BF16(x) => x,
                other => bf16::from_f32(as_f32(other)),
            };
            out[..2].copy_from_slice(&x.to_le_bytes())
        }
        ACL_FLOAT => out[..4].copy_from_slice(&as_f32(v).to_le_bytes()),
        ACL_DOUBLE => out[..8].copy_from_slice(&as_f64(v).to_le_bytes()),
        _ => {
            let i: i128 = match v {
                Val::Int(i) => i,
                other => as_f64(other) as i128,
            };
            match dt {
                ACL_BOOL => out[0] = (i != 0) as u8,
                ACL_INT8 | ACL_UINT8 => out[0] = i as u8,
                ACL_INT16 | ACL_UINT16 => out[..2].copy_from_slice(&(i as u16).to_le_bytes()),
                ACL_INT32 | ACL_UINT32 => out[..4].copy_from_slice(&(i as u32).to_le_bytes()),
                _ => out[..8].copy_from_slice(&(i as u64).to_le_bytes()),
            }
        }
    }
}

/// The element as f32 (for the matmul family).
pub(crate) fn to_f32(dt: aclDataType, b: &[u8]) -> f32 {
    as_f32(decode(dt, b))
}

/// A strided view over a byte buffer (offsets in elements, relative to the
/// buffer start).
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub dtype: aclDataType,
    pub dims: Vec<i64>,
    pub strides: Vec<i64>,
    pub offset: i64,
}

impl View {
    pub fn numel(&self) -> i64 {
        self.dims.iter().product()
    }

    /// Element offsets of every index, in row-major index order.
    pub fn offsets(&self) -> Vec<i64> {
        let n = self.numel().max(0) as usize;
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let rank = self.dims.len();
        let mut idx = vec![0i64; rank];
        let mut off = self.offset;
        loop {
            out.push(off);
            let mut d = rank;
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                off += self.strides[d];
                if idx[d] < self.dims[d] {
                    break;
                }
                off -= self.strides[d] * self.dims[d];
                idx[d] = 0;
            }
        }
    }
}

/// `dst[view] = convert(src[view])`, element by element (shapes equal).
pub(crate) fn copy_view(src: &[u8], sv: &View, dst: &mut [u8], dv: &View) {
    let (ss, ds) = (size(sv.dtype).unwrap(), size(dv.dtype).unwrap());
    let so = sv.offsets();
    let dofs = dv.offsets();
    let same = sv.dtype == dv.dtype;
    for (s, d) in so.iter().zip(&dofs) {
        let (s, d) = (*s as usize * ss, *d as usize * ds);
        if same {
            dst[d..d + ds].copy_from_slice(&src[s..s + ss]);
        } else {
            let v = decode(sv.dtype, &src[s..s + ss]);
            encode(dv.dtype, v, &mut dst[d..d + ds]);
        }
    }
}
