//! `reshard merge-lora` — being written (issue 5).
