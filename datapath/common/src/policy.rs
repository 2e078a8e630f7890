//! Policy maps: workload table, allow and deny tries, settings.

use crate::Addr;

pub const MODE_LEARNING: u32 = 0;
pub const MODE_AUDIT: u32 = 1;
pub const MODE_STRICT: u32 = 2;

/// Workload id 0 means "in no workload".
pub const NO_WORKLOAD: u32 = 0;
/// Size of the workload table (ids are 1..MAX_WORKLOADS).
pub const MAX_WORKLOADS: u32 = 4096;
/// Cgroup ids that may map to a workload (a workload's own cgroups; descendants are found by
/// walking ancestors in the kernel).
pub const MAX_WORKLOAD_CGROUPS: u32 = 65536;
/// How many cgroup levels below the root the kernel walks to find a workload.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Allow-trie capacity (prefixes over all workloads).
pub const MAX_ALLOW_ENTRIES: u32 = 262_144;
pub const MAX_DENY_ENTRIES: u32 = 4096;
/// Port rules one prefix can carry (after merging the rules of every covering prefix).
pub const MAX_PORT_RULES: usize = 16;

/// `WorkloadConfig::flags`: the workload may open SOCK_RAW inet sockets in strict mode.
pub const WORKLOAD_FLAG_RAW_SOCKETS: u32 = 1;
/// `WorkloadConfig::flags`: slot is in use.
pub const WORKLOAD_FLAG_ACTIVE: u32 = 1 << 1;
/// `WorkloadConfig::flags`: DNS questions must match one of the workload's FQDN rules
/// (refused in strict mode, reported in audit mode).
pub const WORKLOAD_FLAG_DNS_ALLOWLISTED: u32 = 1 << 2;

/// Value of `WORKLOADS[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub mode: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<WorkloadConfig>() == 8);

/// Global settings, the single entry of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bumped by userspace after every policy or mode change; per-socket cached verdicts from
    /// an older generation are re-evaluated.
    pub generation: u32,
    /// Workload for processes in no workload (`unmatched = "apply"`), or NO_WORKLOAD.
    pub unmatched_workload: u32,
    pub layout_version: u32,
    pub reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Data part of the allow-trie key (the trie key is `{prefix_len, AllowKey}`).
/// Every entry's prefix covers the whole workload id, so entries never leak across workloads:
/// prefix_len = 32 + 96 + n for an IPv4 /n, 32 + n for an IPv6 /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    /// Big-endian so that the trie's bit order walks the id first.
    pub workload_be: [u8; 4],
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<AllowKey>() == 20);

/// Bits of an `AllowKey` before the address.
pub const ALLOW_KEY_WORKLOAD_BITS: u32 = 32;

/// `PortRule::protocol` value that matches every IP protocol.
pub const PROTOCOL_ANY: u8 = 0;
/// `PortRule::protocol` value for "ICMP or ICMPv6, whichever the address family uses".
pub const PROTOCOL_ICMP_ANY: u8 = 255;

/// One protocol + port range. A packet without ports (ICMP, other protocols) matches only a
/// rule whose range is the full 0..=65535.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub port_first: u16,
    pub port_last: u16,
    pub protocol: u8,
    pub reserved: u8,
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 6);

/// Value of an allow-trie entry: the union of the port rules of this prefix and of every
/// shorter prefix of the same workload that covers it (so the longest match alone decides).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    pub count: u32,
    /// `ALLOW_FLAG_*`.
    pub flags: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}
const _: () = assert!(core::mem::size_of::<AllowValue>() == 104);

/// The entry holds addresses learned from DNS answers (FQDN rules): connections it allowed
/// stay up after the address expires.
pub const ALLOW_FLAG_DYNAMIC: u32 = 1;

/// Data part of the deny-trie key: prefix_len = 96 + n for IPv4 /n, n for IPv6 /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyKey {
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<DenyKey>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::WorkloadConfig {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::AllowKey {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::AllowValue {}
    unsafe impl aya::Pod for super::DenyKey {}
}
