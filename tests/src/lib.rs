//! End-to-end tests of mgd3 live in `tests/`; this crate has no library code of its own.
