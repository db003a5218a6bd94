//! The one element type enum. Format spellings (MindSpore's `Float32`,
//! safetensors' `F32`) are conversions at each format's edge.

use std::fmt;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte 0/1.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (upper half of an f32).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 double precision.
    F64,
    /// Complex of two f32 (MindSpore writes it; its loader cannot read it).
    C64,
    /// Complex of two f64 (MindSpore writes it; its loader cannot read it).
    C128,
    /// 8-bit float E4M3FN.
    F8E4M3,
    /// 8-bit float E5M2.
    F8E5M2,
    /// Huawei HiFloat8.
    HiF8,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 18] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::C64,
        DType::C128,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::HiF8,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::F8E4M3 | DType::F8E5M2 | DType::HiF8 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 | DType::C64 => 8,
            DType::C128 => 16,
        }
    }

    /// MindSpore's `str(dtype)`, the `tensor_type` of a `.ckpt` record.
    pub fn mindspore_name(self) -> &'static str {
        match self {
            DType::Bool => "Bool",
            DType::U8 => "UInt8",
            DType::I8 => "Int8",
            DType::U16 => "UInt16",
            DType::I16 => "Int16",
            DType::U32 => "UInt32",
            DType::I32 => "Int32",
            DType::U64 => "UInt64",
            DType::I64 => "Int64",
            DType::F16 => "Float16",
            DType::BF16 => "BFloat16",
            DType::F32 => "Float32",
            DType::F64 => "Float64",
            DType::C64 => "Complex64",
            DType::C128 => "Complex128",
            DType::F8E4M3 => "Float8E4M3FN",
            DType::F8E5M2 => "Float8E5M2",
            DType::HiF8 => "HiFloat8",
        }
    }

    /// Parses MindSpore's `tensor_type` string.
    pub fn from_mindspore_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.mindspore_name() == name)
    }

    /// Whether MindSpore 2.10's `load_checkpoint` can read this dtype.
    pub fn mindspore_loadable(self) -> bool {
        !matches!(
            self,
            DType::C64 | DType::C128 | DType::F8E4M3 | DType::F8E5M2 | DType::HiF8
        )
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
                | DType::F8E4M3
                | DType::F8E5M2
                | DType::HiF8
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mindspore_name())
    }
}

/// Number of elements of `shape`, or `None` on overflow or a negative dim.
pub fn element_count(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| {
        u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.mindspore_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mindspore_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_mindspore_name(d.mindspore_name()), Some(d));
        }
        assert_eq!(DType::from_mindspore_name("float32"), None);
        assert_eq!(DType::from_mindspore_name("Int4"), None);
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
