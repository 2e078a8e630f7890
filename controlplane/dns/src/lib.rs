//! egressd's DNS logic, without kernel access so it can be unit-tested and fuzzed.
//!
//! The kernel hands the daemon the payload of every DNS answer a workload's socket
//! received from a configured resolver. [`parse_response`] decodes it (hickory-proto),
//! [`chain_addresses`] follows its CNAME chain, and [`FqdnTable`] keeps per workload the live
//! name → address bindings of allowed names and the dynamic allow entries they add up to.
#![forbid(unsafe_code)]

mod error;
mod fast_path;
mod hash;
mod message;
mod table;

pub use error::DnsError;
pub use fast_path::fast_path_addresses;
pub use hash::name_suffix_hashes;
pub use message::{
    AnswerRecord, ChainAddress, DnsResponse, MAX_CHAIN_LEN, MAX_MESSAGE_LEN, RecordData,
    RecordKind, chain_addresses, parse_response, question_of_query,
};
pub use table::{
    FqdnRule, FqdnTable, MAX_TTL, NameEntry, Observation, PortRules, RECENT_NAMES_PER_ADDRESS,
    TableSettings, TableStats,
};

#[cfg(test)]
mod tests;
