//! `reshard auto` (auto conversion in a job) — being written (issue 7).
