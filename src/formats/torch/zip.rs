//! The subset of ZIP that PyTorch's `torch.save` writes (its
//! `PyTorchFileWriter`, on miniz): every member stored uncompressed, ZIP64
//! records when the archive is large. Only the central directory is trusted
//! for names and sizes; each member's local header gives where its bytes
//! start. Nothing is decompressed: a member is a range of the mapped file.

use std::ops::Range;

use crate::error::{Error, Result};

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name as stored (`archive/data/0`).
    pub name: String,
    /// Its bytes in the file.
    pub range: Range<usize>,
}

fn truncated(what: &'static str, offset: usize, needed: usize, len: usize) -> Error {
    Error::Truncated {
        what,
        offset: offset as u64,
        needed: needed as u64,
        available: len.saturating_sub(offset) as u64,
    }
}

fn malformed(offset: usize, reason: impl Into<String>) -> Error {
    Error::Malformed {
        offset: offset as u64,
        reason: reason.into(),
    }
}

fn slice<'a>(b: &'a [u8], at: usize, n: usize, what: &'static str) -> Result<&'a [u8]> {
    at.checked_add(n)
        .and_then(|end| b.get(at..end))
        .ok_or_else(|| truncated(what, at, n, b.len()))
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16> {
    let s = slice(b, at, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<u32> {
    let s = slice(b, at, 4, what)?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize, what: &'static str) -> Result<u64> {
    let s = slice(b, at, 8, what)?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn usize_of(v: u64, at: usize, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| malformed(at, format!("{what} {v} does not fit in memory")))
}

const EOCD: u32 = 0x0605_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const EOCD64: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// Whether `bytes` start like a ZIP archive.
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// The members of the archive, in central-directory order.
pub fn members(b: &[u8]) -> Result<Vec<Member>> {
    // The end-of-central-directory record: 22 bytes plus a comment of at
    // most 64 KiB, searched backwards.
    let min = b.len().saturating_sub(22 + 0xFFFF);
    let eocd = (min..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| b.len() >= 22 && u32_at(b, i, "zip end record").ok() == Some(EOCD))
        .ok_or_else(|| {
            truncated(
                "zip end-of-central-directory record (the archive is cut short)",
                b.len(),
                22,
                b.len(),
            )
        })?;
    let mut count = u16_at(b, eocd + 10, "zip end record")? as u64;
    let mut dir_size = u32_at(b, eocd + 12, "zip end record")? as u64;
    let mut dir_offset = u32_at(b, eocd + 16, "zip end record")? as u64;
    if count == 0xFFFF || dir_size == 0xFFFF_FFFF || dir_offset == 0xFFFF_FFFF {
        let loc = eocd
            .checked_sub(20)
            .ok_or_else(|| malformed(eocd, "ZIP64 sizes without a ZIP64 locator"))?;
        if u32_at(b, loc, "zip64 locator")? != EOCD64_LOCATOR {
            return Err(malformed(loc, "ZIP64 sizes without a ZIP64 locator"));
        }
        let at = usize_of(
            u64_at(b, loc + 8, "zip64 locator")?,
            loc,
            "ZIP64 record offset",
        )?;
        if u32_at(b, at, "zip64 end record")? != EOCD64 {
            return Err(malformed(at, "not a ZIP64 end-of-central-directory record"));
        }
        count = u64_at(b, at + 32, "zip64 end record")?;
        dir_size = u64_at(b, at + 40, "zip64 end record")?;
        dir_offset = u64_at(b, at + 48, "zip64 end record")?;
    }
    let mut at = usize_of(dir_offset, eocd, "central directory offset")?;
    let end = at
        .checked_add(usize_of(dir_size, eocd, "central directory size")?)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| truncated("zip central directory", at, dir_size as usize, b.len()))?;
    // Each central entry is at least 46 bytes: bounds the count before any allocation.
    if count > (end - at) as u64 / 46 + 1 {
        return Err(malformed(
            eocd,
            format!("{count} members cannot fit in {dir_size} bytes"),
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if u32_at(b, at, "zip central directory entry")? != CENTRAL {
            return Err(malformed(at, "not a zip central directory entry"));
        }
        let flags = u16_at(b, at + 8, "zip central directory entry")?;
        let method = u16_at(b, at + 10, "zip central directory entry")?;
        let mut csize = u32_at(b, at + 20, "zip central directory entry")? as u64;
        let mut usize_ = u32_at(b, at + 24, "zip central directory entry")? as u64;
        let name_len = u16_at(b, at + 28, "zip central directory entry")? as usize;
        let extra_len = u16_at(b, at + 30, "zip central directory entry")? as usize;
        let comment_len = u16_at(b, at + 32, "zip central directory entry")? as usize;
        let mut local = u32_at(b, at + 42, "zip central directory entry")? as u64;
        let name_bytes = slice(b, at + 46, name_len, "zip member name")?;
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| malformed(at + 46, "a member name is not UTF-8"))?;
        // ZIP64 extra field: the 0xFFFFFFFF fields, in order.
        let extra = slice(b, at + 46 + name_len, extra_len, "zip extra field")?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = u16::from_le_bytes([extra[e], extra[e + 1]]);
            let len = u16::from_le_bytes([extra[e + 2], extra[e + 3]]) as usize;
            let body = slice(extra, e + 4, len, "zip extra field")?;
            if id == 1 {
                let mut k = 0;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xFFFF_FFFF {
                        *field = u64_at(body, k, "zip64 extra field")?;
                        k += 8;
                    }
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(malformed(
                at,
                format!("member {name:?} is compressed (method {method}); torch.save stores members uncompressed"),
            ));
        }
        if flags & 1 != 0 {
            return Err(malformed(at, format!("member {name:?} is encrypted")));
        }
        if csize != usize_ {
            return Err(malformed(
                at,
                format!("member {name:?} is stored but its sizes differ ({csize} vs {usize_})"),
            ));
        }
        let lh = usize_of(local, at, "local header offset")?;
        if u32_at(b, lh, "zip local header")? != LOCAL {
            return Err(malformed(
                lh,
                format!("member {name:?}: no local header there"),
            ));
        }
        let lname = u16_at(b, lh + 26, "zip local header")? as usize;
        let lextra = u16_at(b, lh + 28, "zip local header")? as usize;
        let start = lh + 30 + lname + lextra;
        let len = usize_of(csize, at, "member size")?;
        slice(b, start, len, "zip member data (the archive is cut short)")?;
        out.push(Member {
            name,
            range: start..start + len,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}
