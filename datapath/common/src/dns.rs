//! DNS name matching shared by the kernel (which sees answers) and userspace (which installs
//! the names workloads may resolve).
//!
//! Names are matched by hash. The hash runs over the name's text (lowercase ASCII, labels
//! joined by '.') from its LAST byte to its first, so that one backward pass over a name
//! yields the hash of every suffix at each label boundary: `*.example.com` is looked up as
//! the suffix hash of "example.com".

use crate::Addr;
use crate::policy::{MAX_PORT_RULES, PortRule};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub const NAME_HASH_START: u64 = FNV_OFFSET;

/// One step of the backward hash: `byte` is the next byte towards the name's start.
#[inline(always)]
pub const fn name_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte.to_ascii_lowercase() as u64).wrapping_mul(FNV_PRIME)
}

/// Hash of a name in text form ("api.example.com", no trailing dot).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut hash = NAME_HASH_START;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = name_hash_step(hash, name[i]);
    }
    hash
}

/// `FqdnValue::flags`: the name itself is allowed (`exact` rules apply).
pub const FQDN_EXACT: u32 = 1;
/// `FqdnValue::flags`: names below it are allowed (`wildcard` rules apply).
pub const FQDN_WILDCARD: u32 = 1 << 1;
/// `FqdnValue::flags`: the name may be asked about, though no rule allows its addresses: an
/// allowed name with a search domain appended (`dns.search_domains`), which stub resolvers
/// try before the bare name. Lets `dns_queries = "allowlisted"` keep search lists working.
pub const FQDN_SEARCH_EXACT: u32 = 1 << 2;
/// `FqdnValue::flags`: names below it may be asked about (a wildcard rule's suffix with a
/// search domain appended); their answers grant nothing.
pub const FQDN_SEARCH_WILDCARD: u32 = 1 << 3;

/// Key of the FQDN map: a workload and the hash of a name (or wildcard suffix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnKey {
    pub workload: u32,
    pub reserved: u32,
    pub hash: u64,
}
const _: () = assert!(core::mem::size_of::<FqdnKey>() == 16);

/// Port rules for addresses of the name (`exact`) and of names below it (`wildcard`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnValue {
    pub flags: u32,
    pub exact_count: u32,
    pub wildcard_count: u32,
    pub reserved: u32,
    pub exact: [PortRule; MAX_PORT_RULES],
    pub wildcard: [PortRule; MAX_PORT_RULES],
}
const _: () = assert!(core::mem::size_of::<FqdnValue>() == 208);

pub const MAX_FQDN_ENTRIES: u32 = 65536;
/// Addresses learned from DNS answers, over all workloads.
pub const MAX_FQDN_ADDRESSES: u32 = 131_072;
pub const MAX_RESOLVERS: u32 = 64;
/// Queries remembered per socket until their answer (glibc sends A and AAAA at once).
pub const PENDING_QUERY_SLOTS: usize = 8;
/// Longest name in wire form.
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Answer records the kernel walks per answer.
pub const MAX_ANSWER_RECORDS: u32 = 32;

/// A query a socket sent to a resolver, awaiting its answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingQuery {
    pub name_hash: u64,
    pub resolver: Addr,
    pub id: u16,
    pub in_use: u8,
    pub reserved: u8,
    pub reserved2: u32,
}
const _: () = assert!(core::mem::size_of::<PendingQuery>() == 32);

/// Per-socket pending queries (socket-local storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingQueries {
    pub next: u32,
    pub reserved: u32,
    pub slots: [PendingQuery; PENDING_QUERY_SLOTS],
}
const _: () = assert!(core::mem::size_of::<PendingQueries>() == 8 + 32 * PENDING_QUERY_SLOTS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::FqdnKey {}
    unsafe impl aya::Pod for super::FqdnValue {}
    unsafe impl aya::Pod for super::PendingQueries {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_hashes_are_prefixes_of_the_backward_pass() {
        let full = b"api.Example.com";
        let mut hash = NAME_HASH_START;
        let mut seen_suffix = None;
        for i in (0..full.len()).rev() {
            if full[i] == b'.' && seen_suffix.is_none() && i == 3 {
                seen_suffix = Some(hash);
            }
            hash = name_hash_step(hash, full[i]);
        }
        assert_eq!(seen_suffix, Some(name_hash(b"example.com")));
        assert_eq!(hash, name_hash(b"api.example.com"));
    }
}
