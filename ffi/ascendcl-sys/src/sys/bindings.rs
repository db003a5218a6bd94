//! The hand-written layer checked against bindings generated from real CANN
//! headers, one committed file per supported version (`bindings/`, made by
//! `regen/regen.sh` with bindgen; no CANN and no libclang needed here):
//!
//! * **signatures** — each file ends in `pin_table!`, which compiles only if
//!   every table function the headers declare has exactly our type
//!   ([`super::table::sig`]): parameter and return types, constness;
//! * **enum values and names** — [`enums_agree`]: a member we define must
//!   have the headers' value, and a value we name must carry the headers'
//!   name (so a renumbered or renamed member fails);
//! * **constants** — status codes and `HCCL_ROOT_INFO_BYTES`;
//! * **layouts** — size and alignment of the types we define.
//!
//! Versions: `cann_8_1` (acl + hccl of CANN 8.1.RC1 as shipped in torch_npu
//! 7.0.0's `third_party/`; Huawei published no aclnn headers of 8.1),
//! `cann_8_5` and `cann_9_0` (all of acl, aclnn, hccl from Huawei's
//! open-source v8.5.0 / v9.0.0 tags). Each file's first lines name the
//! exact commits.
#![allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    missing_docs,
    clippy::all
)]

#[rustfmt::skip]
#[path = "../../bindings/cann_8_1.rs"]
mod cann_8_1;
#[rustfmt::skip]
#[path = "../../bindings/cann_8_5.rs"]
mod cann_8_5;
#[rustfmt::skip]
#[path = "../../bindings/cann_9_0.rs"]
mod cann_9_0;

use super::types as ours;

/// Every supported version's data: name, enum members, constants.
type Version = (
    &'static str,
    &'static [(&'static str, &'static str, i64)],
    &'static [(&'static str, i64)],
);

const VERSIONS: &[Version] = &[
    ("8.1", cann_8_1::ENUM_VALUES, cann_8_1::CONSTS),
    ("8.5", cann_8_5::ENUM_VALUES, cann_8_5::CONSTS),
    ("9.0", cann_9_0::ENUM_VALUES, cann_9_0::CONSTS),
];

/// Our members of each compared enum.
fn our_enums() -> Vec<(&'static str, Vec<(&'static str, i64)>)> {
    fn members<T: Copy + Into<i64>>(all: &'static [(&'static str, T)]) -> Vec<(&'static str, i64)> {
        all.iter().map(|(n, v)| (*n, (*v).into())).collect()
    }
    vec![
        ("aclDataType", members(ours::aclDataType::ALL)),
        ("aclFormat", members(ours::aclFormat::ALL)),
        ("aclrtMemcpyKind", members(ours::aclrtMemcpyKind::ALL)),
        (
            "aclrtMemMallocPolicy",
            members(ours::aclrtMemMallocPolicy::ALL),
        ),
        ("aclrtMemAttr", members(ours::aclrtMemAttr::ALL)),
        ("HcclResult", members(ours::HcclResult::ALL)),
        ("HcclDataType", members(ours::HcclDataType::ALL)),
    ]
}

/// Disagreements between our enum members and one version's headers.
/// Members the headers do not have at all (added in a later CANN) are not
/// disagreements; a header's `*_RESERVED` end marker is not a name.
pub(super) fn enums_agree(header: &[(&str, &str, i64)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (e, members) in our_enums() {
        let theirs: Vec<(&str, i64)> = header
            .iter()
            .filter(|(he, _, _)| *he == e)
            .map(|(_, n, v)| (*n, *v))
            .collect();
        if theirs.is_empty() {
            continue;
        }
        for (name, value) in members {
            if let Some((_, hv)) = theirs.iter().find(|(hn, _)| *hn == name) {
                if *hv != value {
                    bad.push(format!("{e}::{name} is {value} here, {hv} in the headers"));
                }
            } else if let Some((hn, _)) = theirs
                .iter()
                .find(|(hn, hv)| *hv == value && !hn.ends_with("RESERVED"))
            {
                bad.push(format!(
                    "{e} value {value} is {name} here, {hn} in the headers"
                ));
            }
        }
    }
    bad
}

/// Disagreements between our status codes / sizes and the headers'.
pub(super) fn consts_agree(header: &[(&str, i64)]) -> Vec<String> {
    let mut ours: Vec<(&str, i64)> = ours::ACL_CODES
        .iter()
        .map(|(n, v)| (*n, *v as i64))
        .collect();
    ours.push(("HCCL_ROOT_INFO_BYTES", ours::HCCL_ROOT_INFO_BYTES as i64));
    let mut bad = Vec::new();
    for (name, value) in ours {
        if let Some((_, hv)) = header.iter().find(|(hn, _)| *hn == name) {
            if *hv != value {
                bad.push(format!("{name} is {value} here, {hv} in the headers"));
            }
        }
    }
    bad
}

macro_rules! same_layout {
    ($v:ident: $($ours:ty => $theirs:ident),* $(,)?) => {$(
        const _: () = assert!(std::mem::size_of::<$ours>() == std::mem::size_of::<$v::raw::$theirs>());
        const _: () = assert!(std::mem::align_of::<$ours>() == std::mem::align_of::<$v::raw::$theirs>());
    )*};
}

same_layout! { cann_8_1:
    ours::aclDataType => aclDataType,
    ours::aclFormat => aclFormat,
    ours::aclrtMemcpyKind => aclrtMemcpyKind,
    ours::aclrtMemMallocPolicy => aclrtMemMallocPolicy,
    ours::aclrtMemAttr => aclrtMemAttr,
    ours::HcclResult => HcclResult,
    ours::HcclDataType => HcclDataType,
    ours::HcclRootInfo => HcclRootInfo,
}
same_layout! { cann_9_0:
    ours::aclDataType => aclDataType,
    ours::aclFormat => aclFormat,
    ours::aclrtMemcpyKind => aclrtMemcpyKind,
    ours::aclrtMemMallocPolicy => aclrtMemMallocPolicy,
    ours::aclrtMemAttr => aclrtMemAttr,
    ours::HcclResult => HcclResult,
    ours::HcclDataType => HcclDataType,
    ours::HcclRootInfo => HcclRootInfo,
}
same_layout! { cann_8_5:
    ours::aclDataType => aclDataType,
    ours::aclFormat => aclFormat,
    ours::aclrtMemcpyKind => aclrtMemcpyKind,
    ours::aclrtMemMallocPolicy => aclrtMemMallocPolicy,
    ours::aclrtMemAttr => aclrtMemAttr,
    ours::HcclResult => HcclResult,
    ours::HcclDataType => HcclDataType,
    ours::HcclRootInfo => HcclRootInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_members_have_the_headers_values_and_names_in_every_version() {
        let mut bad = Vec::new();
        for (v, enums, _) in VERSIONS {
            assert!(
                !enums.is_empty(),
                "CANN {v}: no enum members in the committed bindings"
            );
            bad.extend(
                enums_agree(enums)
                    .into_iter()
                    .map(|b| format!("CANN {v}: {b}")),
            );
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn status_codes_and_sizes_match_every_version() {
        let mut bad = Vec::new();
        for (v, _, consts) in VERSIONS {
            assert!(
                consts.iter().any(|(n, _)| *n == "ACL_ERROR_INVALID_PARAM"),
                "CANN {v}: no ACL_ERROR_* constants in the committed bindings"
            );
            bad.extend(
                consts_agree(consts)
                    .into_iter()
                    .map(|b| format!("CANN {v}: {b}")),
            );
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn the_checks_catch_a_renamed_or_renumbered_member() {
        // HcclResult 23 named differently, and ACL_FLOAT16 renumbered.
        let header = [
            ("HcclResult", "HCCL_E_SOMETHING_ELSE", 23),
            ("aclDataType", "ACL_FLOAT16", 2),
        ];
        let bad = enums_agree(&header);
        assert!(
            bad.iter().any(|b| b.contains("HCCL_E_OPRETRY_FAIL")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|b| b.contains("ACL_FLOAT16 is 1 here, 2")),
            "{bad:?}"
        );
        let bad = consts_agree(&[("ACL_ERROR_INVALID_PARAM", 1)]);
        assert_eq!(bad.len(), 1, "{bad:?}");
    }

    #[test]
    fn the_8_5_headers_declare_every_table_function() {
        // 8.5 is the complete set (acl, aclnn, hccl); a table function
        // missing there is a misspelt name or a wrong header list.
        let text = include_str!("../../bindings/cann_8_5.rs");
        for f in crate::sys::table::REQUIRED
            .iter()
            .chain(crate::sys::table::OPTIONAL)
        {
            assert!(
                text.contains(&format!("pub {f}: unsafe extern \"C\" fn")),
                "{f} is not declared by the CANN 8.5 headers"
            );
        }
    }
}
