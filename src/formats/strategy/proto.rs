//! `node_strategy.proto` (proto2, package `mindspore.straspb`) as hand-written
//! prost messages, plus a wire-level pre-check that locates bad bytes.
//!
//! The schema is the descriptor shipped in MindSpore 2.10's
//! `train/node_strategy_pb2.py` (spec 2.1). Every repeated scalar is
//! unpacked, as in the `.proto`, so encoding a decoded MindSpore file gives
//! back the same bytes: fields are written in tag order, required fields are
//! always written (even when zero), and `int32` -1 is a 10-byte varint, just
//! as the C++ and Python protobuf runtimes write them.
//!
//! prost decodes a missing `required` field as its default value without
//! complaint. MindSpore's Python runtime does the same (it does not check
//! required fields on parse), so the semantic checks live in the caller
//! ([`super::Strategy::validate`]), not here.

use prost::Message;

use crate::error::{Error, Result};
use crate::formats::wire::{Reader, I32 as FIXED32, I64 as FIXED64, LEN, VARINT};

/// One strategy of one operator input (`dim` per tensor dimension).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelStrategy {
    /// Split count per tensor dimension.
    #[prost(uint32, repeated, packed = "false", tag = "1")]
    pub dim: Vec<u32>,
}

/// The strategies of an operator's inputs and the stage it runs in.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelStrategys {
    /// Pipeline stage of the operator.
    #[prost(uint32, required, tag = "1")]
    pub stage: u32,
    /// One strategy per operator input.
    #[prost(message, repeated, tag = "2")]
    pub parallel_strategy: Vec<ParallelStrategy>,
}

/// An operator (`node_name`) and its strategies.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelStrategyItem {
    /// Operator name, e.g. `MatMul_model.layers.0.attention.wo.weight`.
    #[prost(string, required, tag = "1")]
    pub node_name: String,
    /// Its stage and input strategies.
    #[prost(message, required, tag = "2")]
    pub parallel_strategys: ParallelStrategys,
}

/// Device matrix of a layout.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DevMatrix {
    /// Device-axis sizes, leftmost outermost.
    #[prost(uint32, repeated, packed = "false", tag = "1")]
    pub dim: Vec<u32>,
}

/// Tensor map of a layout (or one tensor dimension of a nested map).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorMap {
    /// Device axes counted from the right; -1 means not split.
    #[prost(int32, repeated, packed = "false", tag = "1")]
    pub dim: Vec<i32>,
}

/// Manual (uneven) split sizes, usually empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParamSplitShape {
    /// Split sizes.
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dim: Vec<i64>,
}

/// Manual split offsets, usually empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IndicesOffset {
    /// Offsets.
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dim: Vec<i64>,
}

/// The layout of one parameter.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelLayouts {
    /// Always exactly one in MindSpore-written files.
    #[prost(message, repeated, tag = "1")]
    pub dev_matrix: Vec<DevMatrix>,
    /// One (plain) or one per tensor dimension (nested, "Layout" API).
    #[prost(message, repeated, tag = "2")]
    pub tensor_map: Vec<TensorMap>,
    /// Always exactly one in MindSpore-written files.
    #[prost(message, repeated, tag = "3")]
    pub param_split_shape: Vec<ParamSplitShape>,
    /// Always exactly one in MindSpore-written files.
    #[prost(message, repeated, tag = "4")]
    pub indices_offset: Vec<IndicesOffset>,
    /// Embedding field size, normally 0.
    #[prost(int32, required, tag = "5")]
    pub field: i32,
    /// Rank stride inside an optimizer-shard group.
    #[prost(int32, required, tag = "6")]
    pub opt_weight_shard_step: i32,
    /// Optimizer-shard group size; -1 means all repeated devices.
    #[prost(int32, required, tag = "7")]
    pub opt_weight_shard_size: i32,
}

/// A parameter and its layout.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelLayoutItem {
    /// Parameter name; `"<stage>-<name>"` in merged files.
    #[prost(string, required, tag = "1")]
    pub param_name: String,
    /// Its layout.
    #[prost(message, required, tag = "2")]
    pub parallel_layouts: ParallelLayouts,
}

/// A list of ranks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelGroupRanks {
    /// Ranks.
    #[prost(uint32, repeated, packed = "false", tag = "1")]
    pub dim: Vec<u32>,
}

/// A communication group and its ranks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelGroupItem {
    /// Group name.
    #[prost(string, required, tag = "1")]
    pub group_name: String,
    /// Member ranks.
    #[prost(message, required, tag = "2")]
    pub parallel_group_ranks: ParallelGroupRanks,
}

/// Root of a group-info file (`GROUP_INFO_FILE`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelGroupMap {
    /// Groups.
    #[prost(message, repeated, tag = "1")]
    pub parallel_group_item: Vec<ParallelGroupItem>,
    /// Ranks whose checkpoints are needed to restore this rank.
    #[prost(message, required, tag = "2")]
    pub ckpt_restore_rank_list: ParallelGroupRanks,
}

/// Root of a strategy file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ParallelStrategyMap {
    /// A C++ counter without meaning; 1 in merged files.
    #[prost(uint32, required, tag = "1")]
    pub current_stage: u32,
    /// Operator strategies; their `stage` is the file's pipeline stage.
    #[prost(message, repeated, tag = "2")]
    pub parallel_strategy_item: Vec<ParallelStrategyItem>,
    /// Parameter layouts.
    #[prost(message, repeated, tag = "3")]
    pub parallel_layout_item: Vec<ParallelLayoutItem>,
}

/// What a known field of a message must look like on the wire.
pub(crate) struct FieldSpec {
    /// Field number.
    pub number: u32,
    /// Field name, for messages.
    pub name: &'static str,
    /// Expected wire type.
    pub wire_type: u8,
}

/// The fields of [`ParallelStrategyMap`].
pub(crate) const STRATEGY_MAP_FIELDS: &[FieldSpec] = &[
    FieldSpec {
        number: 1,
        name: "current_stage",
        wire_type: VARINT,
    },
    FieldSpec {
        number: 2,
        name: "parallel_strategy_item",
        wire_type: LEN,
    },
    FieldSpec {
        number: 3,
        name: "parallel_layout_item",
        wire_type: LEN,
    },
];

/// The fields of [`ParallelGroupMap`].
pub(crate) const GROUP_MAP_FIELDS: &[FieldSpec] = &[
    FieldSpec {
        number: 1,
        name: "parallel_group_item",
        wire_type: LEN,
    },
    FieldSpec {
        number: 2,
        name: "ckpt_restore_rank_list",
        wire_type: LEN,
    },
];

/// A top-level field found by [`scan_fields`].
#[derive(Debug)]
pub(crate) struct RawField {
    /// Field number.
    pub number: u32,
    /// Byte offset of the field's key.
    pub offset: usize,
    /// Payload byte range (length-delimited fields only; empty otherwise).
    pub payload: std::ops::Range<usize>,
}

fn wire_type_name(wire_type: u8) -> &'static str {
    match wire_type {
        VARINT => "varint",
        FIXED64 => "fixed64",
        LEN => "length-delimited",
        3 => "start-group",
        4 => "end-group",
        FIXED32 => "fixed32",
        _ => "invalid",
    }
}

/// Prefixes the reason of a wire-level error, so the user learns that the
/// file is not a strategy rather than only that a varint is bad.
fn not_a_strategy(e: Error) -> Error {
    match e {
        Error::Malformed { offset, reason } => Error::Malformed {
            offset,
            reason: format!("not a strategy file: {reason}"),
        },
        other => other,
    }
}

/// Walks the top-level fields of a message, checking that every known field
/// has its schema's wire type and that every length fits in `bytes`. Unknown
/// fields are skipped, as protobuf runtimes do. Returns the fields found.
pub(crate) fn scan_fields(bytes: &[u8], known: &[FieldSpec]) -> Result<Vec<RawField>> {
    let mut fields = Vec::new();
    let mut reader = Reader::new(bytes, 0, bytes.len());
    while !reader.at_end() {
        let offset = reader.pos();
        let (number, wire_type) = reader.key().map_err(not_a_strategy)?;
        let number = match u32::try_from(number) {
            Ok(n) if n <= u32::MAX >> 3 => n,
            _ => {
                return Err(Error::Malformed {
                    offset: offset as u64,
                    reason: format!("not a strategy file: invalid field number {number}"),
                })
            }
        };
        if let Some(spec) = known.iter().find(|s| s.number == number) {
            if spec.wire_type != wire_type {
                return Err(Error::Malformed {
                    offset: offset as u64,
                    reason: format!(
                        "not a strategy file: field {number} ({}) is {} but the schema says {}",
                        spec.name,
                        wire_type_name(wire_type),
                        wire_type_name(spec.wire_type)
                    ),
                });
            }
        }
        let payload = match wire_type {
            LEN => reader
                .len_delimited("length-delimited field")
                .map_err(not_a_strategy)?,
            VARINT | FIXED64 | FIXED32 => {
                reader.skip(wire_type).map_err(not_a_strategy)?;
                reader.pos()..reader.pos()
            }
            _ => {
                // Groups are long deprecated and never appear in strategy files.
                return Err(Error::Malformed {
                    offset: offset as u64,
                    reason: format!(
                        "not a strategy file: field {number} has wire type {} ({})",
                        wire_type,
                        wire_type_name(wire_type)
                    ),
                });
            }
        };
        fields.push(RawField {
            number,
            offset,
            payload,
        });
    }
    Ok(fields)
}

/// Decodes a message with prost after [`scan_fields`]. When prost fails,
/// `locate` decodes the payload of one top-level field on its own (returning
/// its error, if any), so that the failure is reported at that field's offset.
fn decode_checked<M: prost::Message + Default>(
    bytes: &[u8],
    known: &[FieldSpec],
    locate: impl Fn(u32, &[u8]) -> Option<prost::DecodeError>,
) -> Result<M> {
    let fields = scan_fields(bytes, known)?;
    match M::decode(bytes) {
        Ok(message) => Ok(message),
        Err(whole) => {
            for (index, field) in fields.iter().enumerate() {
                if let Some(e) = locate(field.number, &bytes[field.payload.clone()]) {
                    let name = known
                        .iter()
                        .find(|s| s.number == field.number)
                        .map_or("field", |s| s.name);
                    return Err(Error::Malformed {
                        offset: field.offset as u64,
                        reason: format!(
                            "not a strategy file: {name} (top-level field {index}): {e}"
                        ),
                    });
                }
            }
            Err(Error::Malformed {
                offset: 0,
                reason: format!("not a strategy file: {whole}"),
            })
        }
    }
}

/// Decodes a strategy file's bytes, reporting bad bytes with their offset.
pub(crate) fn decode_strategy_map(bytes: &[u8]) -> Result<ParallelStrategyMap> {
    decode_checked(bytes, STRATEGY_MAP_FIELDS, |number, payload| match number {
        2 => ParallelStrategyItem::decode(payload).err(),
        3 => ParallelLayoutItem::decode(payload).err(),
        _ => None,
    })
}

/// Decodes a group-info file's bytes, reporting bad bytes with their offset.
pub(crate) fn decode_group_map(bytes: &[u8]) -> Result<ParallelGroupMap> {
    decode_checked(bytes, GROUP_MAP_FIELDS, |number, payload| match number {
        1 => ParallelGroupItem::decode(payload).err(),
        2 => ParallelGroupRanks::decode(payload).err(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding verified against MindSpore in spec 2.1.
    #[test]
    fn layouts_encode_like_mindspore() {
        let layouts = ParallelLayouts {
            dev_matrix: vec![DevMatrix { dim: vec![2, 4] }],
            tensor_map: vec![TensorMap { dim: vec![-1, 0] }],
            param_split_shape: vec![ParamSplitShape::default()],
            indices_offset: vec![IndicesOffset::default()],
            field: 0,
            opt_weight_shard_step: 4,
            opt_weight_shard_size: -1,
        };
        let mut expected = vec![0x0a, 0x04, 0x08, 0x02, 0x08, 0x04, 0x12, 0x0d, 0x08];
        expected.extend([0xff; 9]);
        expected.extend([
            0x01, 0x08, 0x00, 0x1a, 0x00, 0x22, 0x00, 0x28, 0x00, 0x30, 0x04, 0x38,
        ]);
        expected.extend([0xff; 9]);
        expected.push(0x01);
        assert_eq!(layouts.encode_to_vec(), expected);
        assert_eq!(ParallelLayouts::decode(&expected[..]).unwrap(), layouts);
    }

    #[test]
    fn required_zero_fields_are_written() {
        let map = ParallelStrategyMap::default();
        assert_eq!(map.encode_to_vec(), vec![0x08, 0x00]);
        let item = ParallelLayoutItem::default();
        assert_eq!(
            item.encode_to_vec(),
            b"\x0a\x00\x12\x06\x28\x00\x30\x00\x38\x00"
        );
    }

    #[test]
    fn packed_input_is_accepted() {
        // dim [2, 4] packed: key 0x0a, length 2.
        let packed = [0x0a, 0x02, 0x02, 0x04];
        assert_eq!(DevMatrix::decode(&packed[..]).unwrap().dim, vec![2, 4]);
    }

    #[test]
    fn scan_rejects_wrong_wire_type() {
        // A checkpoint starts with field 1 length-delimited.
        let bytes = [0x0a, 0x01, 0x00];
        let err = scan_fields(&bytes, STRATEGY_MAP_FIELDS).unwrap_err();
        assert!(matches!(err, Error::Malformed { offset: 0, .. }), "{err}");
        assert!(err.to_string().contains("current_stage"), "{err}");
    }

    #[test]
    fn scan_reports_truncation() {
        let bytes = [0x08, 0x01, 0x1a, 0x05, 0x00];
        let err = scan_fields(&bytes, STRATEGY_MAP_FIELDS).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated {
                    offset: 3,
                    needed: 5,
                    available: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = scan_fields(&[0x08, 0x80], STRATEGY_MAP_FIELDS).unwrap_err();
        assert!(matches!(err, Error::Truncated { offset: 1, .. }), "{err}");
    }

    #[test]
    fn scan_rejects_overlong_varint_and_groups() {
        let mut bytes = vec![0x08];
        bytes.extend([0xff; 10]);
        bytes.push(0x01);
        assert!(matches!(
            scan_fields(&bytes, STRATEGY_MAP_FIELDS).unwrap_err(),
            Error::Malformed { offset: 1, .. }
        ));
        // field 4, start group
        assert!(matches!(
            scan_fields(&[0x23, 0x24], STRATEGY_MAP_FIELDS).unwrap_err(),
            Error::Malformed { offset: 0, .. }
        ));
        // field number 0
        assert!(matches!(
            scan_fields(&[0x00, 0x00], STRATEGY_MAP_FIELDS).unwrap_err(),
            Error::Malformed { offset: 0, .. }
        ));
    }

    #[test]
    fn scan_skips_unknown_fields() {
        // current_stage 1, field 9 fixed32, field 10 fixed64, field 11 varint, field 12 bytes
        let mut bytes = vec![0x08, 0x01, 0x4d, 1, 2, 3, 4, 0x51];
        bytes.extend([0; 8]);
        bytes.extend([0x58, 0x05, 0x62, 0x01, 0x00]);
        let fields = scan_fields(&bytes, STRATEGY_MAP_FIELDS).unwrap();
        assert_eq!(fields.len(), 5);
        let map = decode_strategy_map(&bytes).unwrap();
        assert_eq!(map.current_stage, 1);
    }

    #[test]
    fn decode_locates_bad_item() {
        // current_stage 0, then a layout item whose param_name is not UTF-8.
        let bytes = [0x08, 0x00, 0x1a, 0x03, 0x0a, 0x01, 0xff];
        let err = decode_strategy_map(&bytes).unwrap_err();
        assert!(matches!(err, Error::Malformed { offset: 2, .. }), "{err}");
        assert!(err.to_string().contains("parallel_layout_item"), "{err}");
    }
}
