//! Feature `cann` with headers found: the installed toolkit's headers run
//! through the generator of the committed bindings (`regen/src/gen.rs`),
//! with the same checks as [`super::bindings`]: the file's `pin_table!`
//! pins every table function's type at compile time, and the tests compare
//! enum members and status codes.
#![allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    missing_docs,
    clippy::all
)]

include!(concat!(env!("OUT_DIR"), "/cann_installed.rs"));

#[cfg(test)]
mod tests {
    #[test]
    fn the_installed_headers_agree_with_the_hand_written_layer() {
        let mut bad = super::super::bindings::enums_agree(super::ENUM_VALUES);
        bad.extend(super::super::bindings::consts_agree(super::CONSTS));
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}
