//! One module per user operation. Each takes an options struct, does the
//! work through the library, and returns a report value; none prints.
//! Every operation that writes checkpoints plans its job as one
//! [`crate::plan::Plan`] and writes it through [`write`] (destination
//! checks, backend, executor, manifests, verification).

pub mod auto;
pub mod bench;
pub mod by_rank;
pub(crate) mod checkpoint2;
pub(crate) mod checkpoint2_common;
pub(crate) mod checkpoint2_write;
pub mod convert;
pub mod demo;
pub mod inspect;
pub mod merge_lora;
pub mod rewrite;
pub mod strategy_gen;
pub mod transform;
pub mod unify;
pub mod verify;
pub(crate) mod write;

/// A boolean as mindformers' `str2bool` reads a command-line value (plus
/// 1/0 and yes/no); `None`: neither. The CLI's boolean flags and the extra
/// `--key value` pairs of convert share it.
pub fn str2bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "t" | "y" => Some(true),
        "false" | "0" | "no" | "f" | "n" => Some(false),
        _ => None,
    }
}
