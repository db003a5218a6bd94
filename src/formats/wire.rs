//! Protobuf wire primitives over a borrowed buffer, with offsets kept for
//! error messages: the one varint/length reader that the `.ckpt` index and
//! the strategy-file checks share.

use crate::error::{Error, Result};

/// Protobuf wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const I64: u8 = 1;
pub(crate) const LEN: u8 = 2;
pub(crate) const I32: u8 = 5;

/// A cursor over `buf[pos..end]`; `base` is added to positions in errors so
/// they are file offsets.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], start: usize, end: usize) -> Self {
        Reader {
            buf,
            pos: start,
            end,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    /// Reads a base-128 varint (at most 10 bytes).
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf[..self.end].get(self.pos) else {
                return Err(Error::Truncated {
                    what,
                    offset: start as u64,
                    needed: (i + 1) as u64,
                    available: (self.end - start) as u64,
                });
            };
            self.pos += 1;
            if i == 9 && byte > 1 {
                return Err(malformed(
                    start,
                    format!("{what}: varint longer than 64 bits"),
                ));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(
            start,
            format!("{what}: varint longer than 10 bytes"),
        ))
    }

    /// Reads a field key, returning (field number, wire type).
    pub(crate) fn key(&mut self) -> Result<(u64, u8)> {
        let at = self.pos;
        let key = self.varint("field key")?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if field == 0 {
            return Err(malformed(at, "field number 0".to_string()));
        }
        Ok((field, wire))
    }

    /// Reads a length prefix and returns the byte range it covers.
    pub(crate) fn len_delimited(&mut self, what: &'static str) -> Result<std::ops::Range<usize>> {
        let at = self.pos;
        let len = self.varint(what)?;
        let start = self.pos;
        let available = (self.end - start) as u64;
        if len > available {
            return Err(Error::Truncated {
                what,
                offset: at as u64,
                needed: len,
                available,
            });
        }
        self.pos = start + len as usize;
        Ok(start..self.pos)
    }

    /// Skips a field of an unknown number.
    pub(crate) fn skip(&mut self, wire: u8) -> Result<()> {
        let at = self.pos;
        let n = match wire {
            VARINT => {
                self.varint("unknown field")?;
                return Ok(());
            }
            LEN => {
                self.len_delimited("unknown field")?;
                return Ok(());
            }
            I64 => 8,
            I32 => 4,
            other => return Err(malformed(at, format!("unsupported wire type {other}"))),
        };
        if self.end - self.pos < n {
            return Err(Error::Truncated {
                what: "fixed-width field",
                offset: at as u64,
                needed: n as u64,
                available: (self.end - self.pos) as u64,
            });
        }
        self.pos += n;
        Ok(())
    }
}

pub(crate) fn malformed(offset: usize, reason: String) -> Error {
    Error::Malformed {
        offset: offset as u64,
        reason,
    }
}

/// Appends `v` as a varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes `v` takes as a varint.
pub(crate) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_length() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX,
            (-1i64) as u64,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut r = Reader::new(&out, 0, out.len());
            assert_eq!(r.varint("v").unwrap(), v);
            assert!(r.at_end());
        }
    }

    #[test]
    fn truncated_varint_is_an_error() {
        let buf = [0x80u8, 0x80];
        let err = Reader::new(&buf, 0, 2).varint("dims").unwrap_err();
        assert!(
            matches!(err, Error::Truncated { what: "dims", .. }),
            "{err}"
        );
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let buf = [0xffu8; 11];
        let err = Reader::new(&buf, 0, 11).varint("dims").unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
    }

    #[test]
    fn length_past_end_is_truncated() {
        let buf = [0x05u8, 1, 2];
        let err = Reader::new(&buf, 0, 3)
            .len_delimited("content")
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    needed: 5,
                    available: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}
