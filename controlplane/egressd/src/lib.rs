//! egressd's command-line definition, shared by the daemon binary and packaging (man pages).
#![forbid(unsafe_code)]

pub mod cli;
