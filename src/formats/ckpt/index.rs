//! `&[u8]` → index of a MindSpore `.ckpt` record stream. No tensor byte is
//! copied: every entry points at byte ranges of the caller's buffer.

use std::collections::HashMap;
use std::ops::Range;

use crate::dtype::{element_count, DType};
use crate::error::{Error, Result};
use crate::formats::wire::{malformed, Reader, LEN, VARINT};

/// The 17-byte CRC trailer: `b"crc_num"` then a 10-byte big-endian CRC32.
pub const CRC_MAGIC: &[u8; 7] = b"crc_num";
/// Length of the CRC trailer.
pub const CRC_TRAILER_LEN: usize = 17;

/// What a checkpoint entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A dense tensor of this dtype.
    Tensor(DType),
    /// A string saved through `append_dict` (UTF-32LE content).
    Str,
    /// A `MapParameter` (keys, values, status).
    MapTensor(Vec<MapPart>),
}

/// One of the three arrays of a map-tensor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPart {
    /// numpy dtype name as written (`int32`, `float32`, …).
    pub type_name: String,
    /// Shape, with `dims[0]` summed over the slices.
    pub dims: Vec<i64>,
    /// Content byte ranges, one per slice.
    pub chunks: Vec<Range<usize>>,
}

/// One named entry: all consecutive records with the same tag, joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CkptEntry {
    /// Parameter name (the record tag).
    pub name: String,
    /// Tensor, string or map tensor.
    pub kind: EntryKind,
    /// `dims` of the last record, as written.
    pub dims: Vec<i64>,
    /// `tensor_type` of the last record, as written.
    pub type_name: String,
    /// Byte ranges of the content, in order; one per record.
    pub chunks: Vec<Range<usize>>,
    /// Index of the entry's first record in the file.
    pub first_record: usize,
    /// Number of records joined into this entry.
    pub records: usize,
}

impl CkptEntry {
    /// Total content bytes.
    pub fn nbytes(&self) -> u64 {
        self.chunks.iter().map(|c| (c.end - c.start) as u64).sum()
    }

    /// The tensor dtype, if this is a dense tensor.
    pub fn dtype(&self) -> Option<DType> {
        match self.kind {
            EntryKind::Tensor(d) => Some(d),
            _ => None,
        }
    }
}

/// Index of a plaintext record stream.
#[derive(Debug, Clone, Default)]
pub struct CkptIndex {
    /// Entries in file order.
    pub entries: Vec<CkptEntry>,
    /// Number of protobuf records.
    pub records: usize,
    /// The CRC trailer, when the stream ends with one: (stored CRC, length of
    /// the record stream it covers).
    pub crc_trailer: Option<(u64, usize)>,
}

impl CkptIndex {
    /// Splits off a CRC trailer, if present, and indexes the records.
    pub fn parse(buf: &[u8]) -> Result<CkptIndex> {
        let (end, crc_trailer) = match split_crc_trailer(buf) {
            Some(stored) => {
                let end = buf.len() - CRC_TRAILER_LEN;
                (end, Some((stored, end)))
            }
            None => (buf.len(), None),
        };
        let mut index = index_records(buf, end)?;
        index.crc_trailer = crc_trailer;
        Ok(index)
    }

    /// Checks the stored CRC against the records (`crc_check=True`).
    pub fn verify_crc(&self, buf: &[u8]) -> Result<()> {
        if let Some((stored, end)) = self.crc_trailer {
            let computed = crc32fast::hash(&buf[..end]);
            if stored != u64::from(computed) {
                return Err(Error::CrcMismatch { stored, computed });
            }
        }
        Ok(())
    }

    /// Position of the entry named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }
}

/// The stored CRC if `buf` ends with a `crc_num` trailer. Like MindSpore, a
/// trailer is recognised by the magic at `[-17..-10]`.
pub fn split_crc_trailer(buf: &[u8]) -> Option<u64> {
    let n = buf.len();
    if n < CRC_TRAILER_LEN || &buf[n - 17..n - 10] != CRC_MAGIC {
        return None;
    }
    Some(
        buf[n - 10..]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    )
}

/// One parsed `TensorProto`.
struct TensorRec {
    dims: Vec<i64>,
    type_name: String,
    content: Range<usize>,
}

/// One parsed `Checkpoint.Value`.
enum ValueRec {
    Tensor(TensorRec),
    Map(Vec<TensorRec>),
}

fn index_records(buf: &[u8], end: usize) -> Result<CkptIndex> {
    let mut entries: Vec<CkptEntry> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut reader = Reader::new(buf, 0, end);
    let mut record = 0usize;
    while !reader.at_end() {
        let at = reader.pos();
        let parsed = (|| -> Result<(String, ValueRec)> {
            let (field, wire) = reader.key()?;
            if field != 1 || wire != LEN {
                return Err(malformed(
                    at,
                    format!("expected a Checkpoint.value record (field 1), found field {field} wire type {wire}; not a MindSpore checkpoint"),
                ));
            }
            let range = reader.len_delimited("record")?;
            parse_value(buf, range)
        })();
        let (name, value) = parsed.map_err(|e| {
            let name = peek_tag(buf, at, end);
            e.in_record(record, name)
        })?;
        add_record(&mut entries, &mut seen, name, value, record)
            .map_err(|(e, name)| e.in_record(record, Some(name)))?;
        record += 1;
        crate::formats::check_entry_count(record)?;
    }
    for entry in &mut entries {
        finish_entry(entry)
            .map_err(|e| e.in_record(entry.first_record, Some(entry.name.clone())))?;
    }
    Ok(CkptIndex {
        entries,
        records: record,
        crc_trailer: None,
    })
}

/// Best-effort tag of a record that failed to parse, for the error message.
fn peek_tag(buf: &[u8], at: usize, end: usize) -> Option<String> {
    let mut r = Reader::new(buf, at, end);
    r.key().ok()?;
    let _len = r.varint("record").ok()?;
    let (field, wire) = r.key().ok()?;
    if field != 1 || wire != LEN {
        return None;
    }
    let range = r.len_delimited("tag").ok()?;
    if range.len() > crate::formats::MAX_NAME_BYTES {
        return None;
    }
    std::str::from_utf8(&buf[range]).ok().map(str::to_owned)
}

fn parse_value(buf: &[u8], range: Range<usize>) -> Result<(String, ValueRec)> {
    let mut r = Reader::new(buf, range.start, range.end);
    let mut tag = None;
    let mut value = None;
    while !r.at_end() {
        let at = r.pos();
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, LEN) => {
                let t = r.len_delimited("tag")?;
                crate::formats::check_name_len(t.len())?;
                let s = std::str::from_utf8(&buf[t])
                    .map_err(|_| malformed(at, "tag is not UTF-8".into()))?;
                tag = Some(s.to_owned());
            }
            (2, LEN) => {
                let t = r.len_delimited("tensor")?;
                value = Some(ValueRec::Tensor(parse_tensor(buf, t)?));
            }
            (3, LEN) => {
                let t = r.len_delimited("maptensor")?;
                value = Some(ValueRec::Map(parse_map(buf, t)?));
            }
            (1..=3, _) => {
                return Err(malformed(at, format!("field {field} has wire type {wire}")));
            }
            _ => r.skip(wire)?,
        }
    }
    let tag = tag.ok_or_else(|| malformed(range.start, "record has no tag (required)".into()))?;
    let value = value.ok_or_else(|| {
        malformed(
            range.start,
            format!("record {tag:?} has neither tensor nor maptensor"),
        )
    })?;
    Ok((tag, value))
}

/// Refuses more dimensions than [`crate::formats::MAX_DIMS`] (a
/// 100,000-dimension tensor made `verify` run for minutes).
fn check_ndim(n: usize) -> Result<()> {
    if n > crate::formats::MAX_DIMS {
        return Err(Error::LimitExceeded {
            what: "tensor dimensions",
            limit: crate::formats::MAX_DIMS as u64,
            got: n as u64,
        });
    }
    Ok(())
}

fn parse_tensor(buf: &[u8], range: Range<usize>) -> Result<TensorRec> {
    let mut r = Reader::new(buf, range.start, range.end);
    let mut dims = Vec::new();
    let mut type_name = None;
    let mut content = None;
    while !r.at_end() {
        let at = r.pos();
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, VARINT) => {
                dims.push(r.varint("dims")? as i64);
                check_ndim(dims.len())?;
            }
            (1, LEN) => {
                // Packed encoding: parsers must accept it even though
                // MindSpore writes unpacked dims.
                let p = r.len_delimited("packed dims")?;
                let mut pr = Reader::new(buf, p.start, p.end);
                while !pr.at_end() {
                    dims.push(pr.varint("dims")? as i64);
                    check_ndim(dims.len())?;
                }
            }
            (2, LEN) => {
                let t = r.len_delimited("tensor_type")?;
                let s = std::str::from_utf8(&buf[t])
                    .map_err(|_| malformed(at, "tensor_type is not UTF-8".into()))?;
                type_name = Some(s.to_owned());
            }
            (3, LEN) => content = Some(r.len_delimited("tensor_content")?),
            (1..=3, _) => {
                return Err(malformed(
                    at,
                    format!("TensorProto field {field} has wire type {wire}"),
                ));
            }
            _ => r.skip(wire)?,
        }
    }
    let type_name = type_name.ok_or_else(|| {
        malformed(
            range.start,
            "TensorProto has no tensor_type (required)".into(),
        )
    })?;
    let content = content.ok_or_else(|| {
        malformed(
            range.start,
            "TensorProto has no tensor_content (required)".into(),
        )
    })?;
    Ok(TensorRec {
        dims,
        type_name,
        content,
    })
}

fn parse_map(buf: &[u8], range: Range<usize>) -> Result<Vec<TensorRec>> {
    let mut r = Reader::new(buf, range.start, range.end);
    let mut parts = Vec::new();
    while !r.at_end() {
        let at = r.pos();
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, LEN) => {
                let t = r.len_delimited("maptensor.tensor")?;
                parts.push(parse_tensor(buf, t)?);
            }
            (1, _) => {
                return Err(malformed(
                    at,
                    format!("MapTensorProto field 1 has wire type {wire}"),
                ))
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(parts)
}

fn add_record(
    entries: &mut Vec<CkptEntry>,
    seen: &mut HashMap<String, usize>,
    name: String,
    value: ValueRec,
    record: usize,
) -> std::result::Result<(), (Error, String)> {
    // Consecutive records with the same tag are chunks of one tensor.
    if let Some(last) = entries.last_mut() {
        if last.name == name {
            match (&mut last.kind, value) {
                (EntryKind::MapTensor(parts), ValueRec::Map(recs)) => {
                    if parts.len() != recs.len() {
                        return Err((
                            Error::bad_input(format!(
                                "map-tensor slice has {} arrays, earlier slices have {}",
                                recs.len(),
                                parts.len()
                            )),
                            name,
                        ));
                    }
                    for (part, rec) in parts.iter_mut().zip(recs) {
                        if let (Some(d0), Some(r0)) = (part.dims.first_mut(), rec.dims.first()) {
                            *d0 += *r0;
                        }
                        part.chunks.push(rec.content);
                    }
                }
                (EntryKind::MapTensor(_), ValueRec::Tensor(_)) | (_, ValueRec::Map(_)) => {
                    return Err((
                        Error::bad_input(
                            "tensor and map-tensor records share one name".to_string(),
                        ),
                        name,
                    ));
                }
                (_, ValueRec::Tensor(t)) => {
                    // dims and tensor_type come from the last record, as in MindSpore.
                    last.dims = t.dims;
                    last.type_name = t.type_name;
                    last.chunks.push(t.content);
                }
            }
            last.records += 1;
            return Ok(());
        }
    }
    if let Some(&first) = seen.get(&name) {
        let first_record = entries[first].first_record;
        return Err((Error::DuplicateName { first_record }, name));
    }
    seen.insert(name.clone(), entries.len());
    let entry = match value {
        ValueRec::Tensor(t) => CkptEntry {
            name,
            kind: EntryKind::Str, // resolved in finish_entry
            dims: t.dims,
            type_name: t.type_name,
            chunks: vec![t.content],
            first_record: record,
            records: 1,
        },
        ValueRec::Map(recs) => CkptEntry {
            name,
            kind: EntryKind::MapTensor(
                recs.into_iter()
                    .map(|r| MapPart {
                        type_name: r.type_name,
                        dims: r.dims,
                        chunks: vec![r.content],
                    })
                    .collect(),
            ),
            dims: Vec::new(),
            type_name: "MapTensor".to_string(),
            chunks: Vec::new(),
            first_record: record,
            records: 1,
        },
    };
    entries.push(entry);
    Ok(())
}

/// Resolves the dtype and checks the content length against the shape.
fn finish_entry(entry: &mut CkptEntry) -> Result<()> {
    if matches!(entry.kind, EntryKind::MapTensor(_)) {
        return Ok(());
    }
    if entry.type_name == "str" {
        entry.kind = EntryKind::Str;
        let n = entry.nbytes();
        if n % 4 != 0 {
            return Err(Error::bad_input(format!(
                "string content is {n} bytes, not a whole number of UTF-32 code units"
            )));
        }
        return Ok(());
    }
    let dtype = DType::from_mindspore_name(&entry.type_name).ok_or_else(|| {
        if entry.type_name == "Int4" {
            Error::UnsupportedDtype {
                dtype: "Int4 (qint4x2)".into(),
                op: "reading",
            }
        } else {
            Error::UnknownDtype(entry.type_name.clone())
        }
    })?;
    entry.kind = EntryKind::Tensor(dtype);
    let count = element_count(&entry.dims).ok_or_else(|| Error::InvalidShape {
        shape: entry.dims.clone(),
        reason: "negative dimension or element count overflow",
    })?;
    let expected = count
        .checked_mul(dtype.size() as u64)
        .ok_or(Error::InvalidShape {
            shape: entry.dims.clone(),
            reason: "byte size overflows",
        })?;
    let got = entry.nbytes();
    if expected != got {
        return Err(Error::ContentLength {
            dtype: dtype.to_string(),
            shape: entry.dims.clone(),
            expected,
            got,
        });
    }
    Ok(())
}

/// Decodes a `str` entry: UTF-32LE code units, trailing NULs stripped (numpy).
pub fn decode_string(bytes: &[u8]) -> Result<String> {
    let mut s = String::with_capacity(bytes.len() / 4);
    for (i, unit) in bytes.chunks_exact(4).enumerate() {
        let cp = u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]]);
        let c = char::from_u32(cp).ok_or_else(|| {
            Error::bad_input(format!(
                "string code unit {i} is not a Unicode scalar value ({cp:#x})"
            ))
        })?;
        s.push(c);
    }
    while s.ends_with('\0') {
        s.pop();
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ckpt::{Checkpoint, CkptWriter, WriteOptions};
    use proptest::prelude::*;

    fn arb_entry() -> impl Strategy<Value = (String, DType, Vec<i64>)> {
        (
            "[a-z][a-z0-9_.]{0,12}",
            proptest::sample::select(DType::ALL.to_vec()),
            proptest::collection::vec(0i64..5, 0..4),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the writer writes, the index reads back exactly.
        #[test]
        fn writer_then_index_round_trips(
            entries in proptest::collection::vec(arb_entry(), 0..8),
            crc in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.ckpt");
            let mut w = CkptWriter::create(&path, WriteOptions { crc, ..Default::default() }).unwrap();
            let mut written = Vec::new();
            for (i, (name, dtype, dims)) in entries.iter().enumerate() {
                let name = format!("{name}{i}");
                let n = element_count(dims).unwrap() as usize * dtype.size();
                let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
                w.write_tensor(&name, *dtype, dims, &data).unwrap();
                // Empty tensors produce no record, as in MindSpore.
                if n > 0 {
                    written.push((name, *dtype, dims.clone(), data));
                }
            }
            w.finish().unwrap();
            let ck = Checkpoint::open(&path, &Default::default()).unwrap();
            prop_assert_eq!(ck.has_crc(), crc);
            prop_assert_eq!(ck.entries().len(), written.len());
            for (e, (name, dtype, dims, data)) in ck.entries().iter().zip(&written) {
                prop_assert_eq!(&e.name, name);
                prop_assert_eq!(e.dtype(), Some(*dtype));
                prop_assert_eq!(&e.dims, dims);
                let got = ck.tensor_bytes(e);
                prop_assert_eq!(got.as_ref(), data.as_slice());
            }
        }

        /// Arbitrary bytes give an index or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = CkptIndex::parse(&bytes);
        }

        /// Mutating one byte of a valid file never panics either.
        #[test]
        fn mutated_file_never_panics(pos in 0usize..200, value in any::<u8>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.ckpt");
            let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
            w.write_tensor("layer.weight", DType::F16, &[3, 4], &[7u8; 24]).unwrap();
            w.write_string("note", "hi").unwrap();
            w.write_tensor("step", DType::I64, &[], &[1u8; 8]).unwrap();
            w.finish().unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            let at = pos % bytes.len();
            bytes[at] = value;
            let _ = Checkpoint::from_bytes(bytes, true);
        }
    }

    #[test]
    fn entry_count_and_name_length_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.ckpt");
        let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
        w.write_tensor("t", DType::U8, &[1], &[0]).unwrap();
        w.finish().unwrap();
        let record = std::fs::read(&path).unwrap();
        let mut many = Vec::with_capacity(record.len() * (crate::formats::MAX_ENTRIES + 1));
        for _ in 0..=crate::formats::MAX_ENTRIES {
            many.extend_from_slice(&record);
        }
        let err = CkptIndex::parse(&many).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Limit, "{err}");
        drop(many);

        let long = "n".repeat(crate::formats::MAX_NAME_BYTES + 1);
        let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
        w.write_tensor(&long, DType::U8, &[1], &[0]).unwrap();
        w.finish().unwrap();
        let Err(err) = Checkpoint::open(&path, &Default::default()) else {
            panic!("a 64 KiB name was read")
        };
        assert_eq!(err.kind(), crate::error::ErrorKind::Limit, "{err}");
        assert_eq!(err.file(), Some(path.as_path()));
        // The message does not carry the 64 KiB name.
        assert!(err.to_string().len() < 1024, "{}", err.to_string().len());
    }

    #[test]
    fn split_records_join_and_take_last_dims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.ckpt");
        let mut w = CkptWriter::create(&path, WriteOptions::default()).unwrap();
        w.write_tensor("t", DType::U8, &[4], &[1, 2, 3, 4]).unwrap();
        w.finish().unwrap();
        let one = std::fs::read(&path).unwrap();
        // Hand-build the same tensor as two records of two bytes each.
        let rec = |content: &[u8]| {
            let mut tp = vec![0x08, 4, 0x12, 5];
            tp.extend_from_slice(b"UInt8");
            tp.push(0x1a);
            tp.push(content.len() as u8);
            tp.extend_from_slice(content);
            let mut v = vec![0x0a, 1, b't', 0x12, tp.len() as u8];
            v.extend(tp);
            let mut r = vec![0x0a, v.len() as u8];
            r.extend(v);
            r
        };
        let two = [rec(&[1, 2]), rec(&[3, 4])].concat();
        let ck = Checkpoint::from_bytes(two, true).unwrap();
        let e = &ck.entries()[0];
        assert_eq!(
            (e.records, ck.tensor_bytes(e).as_ref()),
            (2, &[1u8, 2, 3, 4][..])
        );
        assert_eq!(
            Checkpoint::from_bytes(one, true).unwrap().entries()[0].records,
            1
        );
    }

    #[test]
    fn crc_trailer_is_detected() {
        let mut buf = vec![];
        buf.extend_from_slice(b"crc_num");
        buf.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(split_crc_trailer(&buf), Some(0x1234_5678));
        assert_eq!(split_crc_trailer(&buf[1..]), None);
        let index = CkptIndex::parse(&buf).unwrap();
        assert!(index.entries.is_empty());
        assert!(matches!(
            index.verify_crc(&buf),
            Err(Error::CrcMismatch {
                stored: 0x1234_5678,
                computed: 0
            })
        ));
    }

    #[test]
    fn strings_decode_utf32_and_strip_nuls() {
        let bytes: Vec<u8> = "héllo\0\0"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert_eq!(decode_string(&bytes).unwrap(), "héllo");
        assert!(decode_string(&[0, 0xd8, 0, 0]).is_err());
    }
}
