//! Integration tests — being written.
