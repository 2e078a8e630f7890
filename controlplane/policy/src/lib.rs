//! egressd's policy file (`/etc/egressd/policy.toml`): parsing, validation and the
//! reference semantics of matching. No kernel access, so the CLI can use it too.
#![forbid(unsafe_code)]

mod cgroup;
mod cidr;
mod compile;
mod error;
mod fqdn;
mod model;
mod raw;
mod types;

pub use cgroup::CgroupPattern;
pub use cidr::{canonical_ip, canonical_net, parse_cidr};
pub use compile::{load, missing_reasons, parse};
pub use error::{Diagnostic, Location, PolicyError};
pub use fqdn::FqdnPattern;
pub use model::*;
pub use types::*;

#[cfg(test)]
mod tests;
