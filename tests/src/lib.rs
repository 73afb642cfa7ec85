//! End-to-end tests of mgd3 live in `tests/`; this crate's library holds the cluster simulator
//! ([`sim`], run by the `simulate` binary and its smoke test).

pub mod sim;
