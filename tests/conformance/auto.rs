//! Conformance tests — being written.
