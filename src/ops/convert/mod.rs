//! `reshard convert` (HuggingFace ⇄ MindSpore) — being written (issue 4).
