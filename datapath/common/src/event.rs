//! Events sent to userspace through the ring buffer, verdict and reason codes, counters.

use crate::Addr;

pub const EVENT_NEW_DESTINATION: u32 = 1;
pub const EVENT_DENIED: u32 = 2;
pub const EVENT_WOULD_DENY: u32 = 3;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// Allowed because the workload is in audit mode; strict would deny.
pub const VERDICT_WOULD_DENY: u8 = 3;

pub const REASON_ALLOW_RULE: u32 = 1;
pub const REASON_NO_RULE: u32 = 2;
pub const REASON_DENY_LIST: u32 = 3;
pub const REASON_RAW_SOCKET: u32 = 4;
/// Kernel-generated control traffic (TCP RST, ICMP errors, neighbour discovery).
pub const REASON_CONTROL: u32 = 5;
/// Reply on an accepted (inbound) connection.
pub const REASON_INBOUND: u32 = 6;
pub const REASON_LEARNING: u32 = 7;
/// DNS to a resolver of `dns.resolvers`.
pub const REASON_RESOLVER: u32 = 8;
/// An address learned from a DNS answer for an allowed name.
pub const REASON_FQDN: u32 = 9;

pub const HOOK_CONNECT4: u32 = 1;
pub const HOOK_CONNECT6: u32 = 2;
pub const HOOK_SENDMSG4: u32 = 3;
pub const HOOK_SENDMSG6: u32 = 4;
pub const HOOK_EGRESS: u32 = 5;
pub const HOOK_SOCK_CREATE: u32 = 6;

/// A record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub workload: u32,
    pub kind: u32,
    pub reason: u32,
    pub hook: u32,
    pub mode: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub comm: [u8; 16],
    /// IP protocol number (for `HOOK_SOCK_CREATE`: the socket's protocol).
    pub protocol: u8,
    pub verdict: u8,
    /// 4 or 6: the family of the packet or sockaddr (an IPv4-mapped destination is 4).
    pub family: u8,
    /// Socket type (SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_RAW 3) where known, else 0.
    pub socket_type: u8,
    pub reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 104);

/// 2 MiB: about 18,700 events, 0.4 s of a workload opening 48,000 connections a second to new
/// destinations while the daemon is held up (it reads every 20 ms). The daemon maps a ring
/// twice, so each MiB here is two of its resident memory.
pub const RING_BUFFER_BYTES: u32 = 1 << 21;

// Indexes of the per-CPU `COUNTERS` array.
pub const COUNTER_EVENTS: u32 = 0;
pub const COUNTER_RING_DROPS: u32 = 1;
pub const COUNTER_ALLOWED: u32 = 2;
pub const COUNTER_DENIED: u32 = 3;
pub const COUNTER_WOULD_DENY: u32 = 4;
pub const COUNTER_CACHE_HITS: u32 = 5;
pub const COUNTER_STORAGE_FAILURES: u32 = 6;
pub const COUNTER_DNS_ANSWERS: u32 = 7;
pub const COUNTER_DNS_DROPS: u32 = 8;
/// Answers ignored: not from a resolver, or matching no query the socket sent.
pub const COUNTER_DNS_REJECTED: u32 = 9;
/// Addresses the kernel allowed straight from an answer.
pub const COUNTER_FQDN_INSERTS: u32 = 10;
pub const COUNTER_FQDN_INSERT_FAILURES: u32 = 11;
/// Flow summaries that could not be created (the first sight is still reported as an event).
pub const COUNTER_FLOW_INSERT_FAILURES: u32 = 12;
/// DNS queries refused because their name matches no FQDN rule (`dns_queries`).
pub const COUNTER_DNS_QUERIES_REFUSED: u32 = 13;
pub const COUNTERS_LEN: u32 = 16;

/// DNS payload bytes copied per answer: above the 1232-byte EDNS size resolvers use over UDP.
/// A larger (TCP) answer arrives cut short; the daemon then cannot adopt what the kernel
/// allowed from it, and its clean-up of unadopted learned addresses removes them.
/// A power of two: the kernel bounds the copy length with a mask.
pub const DNS_PAYLOAD_MAX: usize = 2048;
/// Records are [`DnsAnswer`]s cut after their payload (most answers are a few hundred bytes),
/// so 1 MiB holds thousands; the daemon maps a ring twice, so each MiB here is two resident.
pub const DNS_RING_BUFFER_BYTES: u32 = 1 << 20;

/// `DnsAnswer::flags`: the question name matches an FQDN rule of the workload.
pub const DNS_ANSWER_NAME_ALLOWED: u16 = 1;
/// `DnsAnswer::flags`: the answer came over TCP (payload starts after the length prefix).
pub const DNS_ANSWER_TCP: u16 = 1 << 1;
/// `DnsAnswer::flags`: not an answer but a query the kernel refused (strict mode,
/// `dns_queries = "allowlisted"`, a name no FQDN rule matches): the payload is the query.
pub const DNS_QUERY_REFUSED: u16 = 1 << 2;
/// `DnsAnswer::flags`: such a query in audit mode: sent, but strict mode would refuse it.
pub const DNS_QUERY_WOULD_REFUSE: u16 = 1 << 3;
/// `DnsAnswer::flags`: the kernel created or changed no allow entry for this answer (every
/// address it allowed was held with these rules already). It says "unchanged", not
/// "changed", so that programs of a build without it never let the daemon skip a rewrite.
pub const DNS_ANSWER_ENTRIES_UNCHANGED: u16 = 1 << 4;

/// A DNS answer (UDP from port 53) received by a socket of a workload, for userspace to parse.
/// In the ring buffer it ends after `payload_len` bytes of `payload` (see
/// [`DNS_ANSWER_HEADER_LEN`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsAnswer {
    pub timestamp_ns: u64,
    pub cgroup_id: u64,
    pub workload: u32,
    /// Bytes of `payload` that are valid.
    pub payload_len: u32,
    /// Length of the whole DNS message on the wire.
    pub message_len: u32,
    pub server_port: u16,
    pub client_port: u16,
    pub server_addr: Addr,
    pub client_addr: Addr,
    pub family: u8,
    pub protocol: u8,
    /// `DNS_ANSWER_*`.
    pub flags: u16,
    /// Addresses the kernel inserted from this answer.
    pub inserted: u32,
    /// For a refused query: the process (and thread) that created the socket, and its name.
    /// Zero for answers.
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub payload: [u8; DNS_PAYLOAD_MAX],
}
const _: () = assert!(core::mem::size_of::<DnsAnswer>() == 96 + DNS_PAYLOAD_MAX);
/// Bytes of a [`DnsAnswer`] record before its payload.
pub const DNS_ANSWER_HEADER_LEN: usize = core::mem::offset_of!(DnsAnswer, payload);
const _: () = assert!(DNS_ANSWER_HEADER_LEN == 96);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::DnsAnswer {}
}

/// Per-workload decision counters: one per-CPU slot for every (workload, protocol, verdict).
/// Protocol slots: 0 TCP, 1 UDP, 2 ICMP/ICMPv6, 3 anything else.
/// Verdict slots: 0 allow, 1 deny, 2 would-deny.
pub const DECISION_PROTOCOL_SLOTS: u32 = 4;
pub const DECISION_VERDICT_SLOTS: u32 = 3;
pub const DECISION_COUNTERS_PER_WORKLOAD: u32 = DECISION_PROTOCOL_SLOTS * DECISION_VERDICT_SLOTS;

#[inline(always)]
pub const fn decision_protocol_slot(protocol: u8) -> u32 {
    match protocol {
        6 => 0,
        17 => 1,
        1 | 58 => 2,
        _ => 3,
    }
}

#[inline(always)]
pub const fn decision_verdict_slot(verdict: u8) -> u32 {
    match verdict {
        VERDICT_DENY => 1,
        VERDICT_WOULD_DENY => 2,
        _ => 0,
    }
}

/// Index into `DECISION_COUNTERS` for a decision.
#[inline(always)]
pub const fn decision_counter_index(workload: u32, protocol: u8, verdict: u8) -> u32 {
    workload * DECISION_COUNTERS_PER_WORKLOAD
        + decision_protocol_slot(protocol) * DECISION_VERDICT_SLOTS
        + decision_verdict_slot(verdict)
}
