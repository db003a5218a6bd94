//! reshard: convert, reshard and merge MindSpore / mindformers checkpoints,
//! byte-compatible with MindSpore 2.10, in bounded memory.
//!
//! Every operation is the same four steps — **read** the sources' indexes,
//! **plan** which bytes go where, **execute** the plan, **write** the
//! outputs — and each concern lives in exactly one place. Modules depend
//! only on modules above them in this list.
//!
//! # Reading: [`formats`]
//!
//! Bytes ↔ index, nothing else: the only place that parses or writes file
//! bytes. Each format turns a file into entries (name, dtype, shape, byte
//! range) over a memory map — [`formats::ckpt`] (MindSpore protobuf, CRC,
//! encryption), [`formats::safetensors`], [`formats::torch`],
//! [`formats::checkpoint2`] — behind one [`formats::Source`]. Strategy
//! files (protobuf or JSON, pipeline stages merged) become layout records
//! in [`formats::strategy`]; mindformers YAML files (a job's run YAML,
//! a model YAML) are read within limits by `formats::yaml`.
//! [`formats::tree`] knows the `rank_x/`
//! directory conventions and indexes a source tree: which file each rank
//! reads, how many ranks there are, whether the set was saved without
//! redundancy. What writing needs at the byte level is here too: file
//! layouts known before any tensor is filled ([`formats::placed`]),
//! temporaries renamed into place ([`formats::atomic`]), the destination
//! lock ([`formats::destination`]) and manifests ([`formats::manifest`]).
//! Nothing in `formats` knows about layouts, plans or backends.
//!
//! # Planning: [`layout`] and [`plan`]
//!
//! [`layout`] is pure algebra, no I/O: MindSpore's device matrix and tensor
//! map → which box of the global tensor each rank holds (optimizer shards
//! and pipeline stages included), which source ranks a destination rank
//! needs, redundancy owners, and the two movements every plan reduces to,
//! in [`layout::boxes`]: an N-d box copy with a fused cast
//! ([`layout::boxes::BoxCopy`]) and a LoRA GEMM-add block on a fixed global
//! tile grid ([`layout::boxes::LoraAdd`]).
//!
//! [`plan`] holds THE plan — [`plan::Plan`] → [`plan::FilePlan`] →
//! [`plan::TensorPlan`] → copy steps and LoRA terms — and the one planner
//! entry, [`plan::transform::plan`], which reproduces
//! `mindspore.transform_checkpoints` (load order, stage cuts, needed
//! ranks) from indexes and strategies only: no tensor byte is read while
//! planning. Every operation produces a `Plan`, from in-memory inputs
//! (`auto` plans in memory too, never through the file system). A source
//! that exists only as a plan — a conversion, a Checkpoint 2.0 directory's
//! shards assembled — is planned over as one complete checkpoint and
//! composed into a plan that reads the real files ([`plan::compose`]).
//!
//! # Executing: [`backend`], [`comm`] and [`exec`]
//!
//! [`backend`] is the narrow [`backend::Backend`] trait — alloc, upload,
//! download, box copy with cast, LoRA GEMM-add, synchronize — with the CPU
//! implementation and the Ascend one (feature `ascend`, over
//! `ascendcl-sys`; a stub saying how to get it otherwise), chosen at run
//! time by [`backend::BackendChoice`]. [`comm`] moves bytes between the
//! ranks of a distributed job (in-process, or HCCL on NPUs).
//!
//! [`exec`] is the one executor and the only caller of a backend:
//! [`exec::execute`] runs a plan — sources opened once, tensors filled in
//! parallel (straight from the map when a tensor is a plain copy), written
//! at precomputed offsets, hashed in file order — and
//! [`exec::execute_on`] runs one rank's share of a distributed plan. A
//! failure anywhere, a worker's panic included ([`ErrorKind::Internal`]),
//! removes every temporary and every output of the run.
//!
//! # Writing and operations: [`ops`]
//!
//! One module per user operation, each an options struct → `Plan` → `exec`
//! → a report value (nothing prints): `transform`, `convert` (a name map
//! per model family), `merge_lora`, `rewrite`, `unify`, `auto` (the
//! whole mindformers job, from its YAML), `verify`, `inspect`, `bench`.
//! `ops::write` is the one way a planned job is written — destination
//! checks, backend choice, execution, manifests, `--verify` — shared by
//! every operation that writes checkpoints.
//!
//! # Front ends
//!
//! The `reshard` binary (`src/bin/reshard`) is a thin shell: flags →
//! options → `ops` → rendering; it is the only place that knows command-line
//! flags or reads the process's arguments (it declares its command line for
//! manifests with [`exec::record_command_line`]). [`capi`] is the C ABI
//! (`libreshard.so`), and the Python package calls the same library.
//!
//! # Errors
//!
//! One [`Error`] type for the whole library; [`Error::kind`] gives an
//! [`ErrorKind`] to branch on (usage, bad input, strategy, missing,
//! mismatch, unsupported, I/O, …), looking through the file, record and
//! tensor context ([`Error::file`], [`Error::tensor`]). A usage error names
//! the setting by its options-struct field ([`Error::option`]); front ends
//! spell it as their flags, the library never does.
#![deny(missing_docs)]

pub mod backend;
pub mod capi;
pub mod comm;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod formats;
pub mod layout;
pub mod ops;
pub mod plan;

pub use dtype::DType;
pub use error::{Error, ErrorKind, Result};
