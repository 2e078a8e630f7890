//! egressd's policy file (`/etc/egressd/policy.toml`): parsing, validation and the
//! reference semantics of matching. No kernel access, so the CLI can use it too.
#![forbid(unsafe_code)]

mod types;

pub use types::*;
