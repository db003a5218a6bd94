//! The dtype cast matrix, in one place. Float conversions round to nearest,
//! ties to even (`half`'s conversions and Rust's `as f32` both do), which is
//! what MindSpore/numpy produce for the same casts.

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};

fn read_f64(dtype: DType, b: &[u8]) -> f64 {
    match dtype {
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()),
        _ => unreachable!("checked by supported()"),
    }
}

/// Whether `from → to` is a cast this backend performs.
pub fn supported(from: DType, to: DType) -> bool {
    let float = |d| matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64);
    from == to || (float(from) && float(to))
}

/// Converts `src` (elements of `from`) into `dst` (elements of `to`).
pub fn cast_slice(from: DType, src: &[u8], to: DType, dst: &mut [u8]) -> Result<()> {
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    if !supported(from, to) {
        return Err(Error::UnsupportedDtype {
            dtype: format!("{from} → {to}"),
            op: "cast",
        });
    }
    let (fs, ts) = (from.size(), to.size());
    // f32 → f16/bf16 directly: going through f64 could double-round.
    for (s, d) in src.chunks_exact(fs).zip(dst.chunks_exact_mut(ts)) {
        match (from, to) {
            (DType::F32, DType::F16) => d.copy_from_slice(
                &f16::from_f32(f32::from_le_bytes(s.try_into().unwrap())).to_le_bytes(),
            ),
            (DType::F32, DType::BF16) => d.copy_from_slice(
                &bf16::from_f32(f32::from_le_bytes(s.try_into().unwrap())).to_le_bytes(),
            ),
            (_, DType::F16) => d.copy_from_slice(&f16::from_f64(read_f64(from, s)).to_le_bytes()),
            (_, DType::BF16) => d.copy_from_slice(&bf16::from_f64(read_f64(from, s)).to_le_bytes()),
            (_, DType::F32) => d.copy_from_slice(&(read_f64(from, s) as f32).to_le_bytes()),
            (_, DType::F64) => d.copy_from_slice(&read_f64(from, s).to_le_bytes()),
            _ => unreachable!("checked by supported()"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
        let x = 1.0f32 + f32::powi(2.0, -8);
        let mut out = [0u8; 2];
        cast_slice(DType::F32, &x.to_le_bytes(), DType::BF16, &mut out).unwrap();
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.0);
        let y = 1.0f32 + 3.0 * f32::powi(2.0, -8);
        cast_slice(DType::F32, &y.to_le_bytes(), DType::BF16, &mut out).unwrap();
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.0 + f32::powi(2.0, -6));
    }

    #[test]
    fn widening_is_exact_and_ints_are_refused() {
        let v = bf16::from_f32(-3.5);
        let mut out = [0u8; 8];
        cast_slice(DType::BF16, &v.to_le_bytes(), DType::F64, &mut out).unwrap();
        assert_eq!(f64::from_le_bytes(out), -3.5);
        let err = cast_slice(DType::I32, &[0; 4], DType::F32, &mut [0; 4]).unwrap_err();
        assert!(err.to_string().contains("Int32 → Float32"), "{err}");
    }
}
