//! Per-destination flow summaries, aggregated in the kernel so that a workload opening
//! connections as fast as it can costs userspace one map walk per flush, not one event per
//! connection. Keyed by [`crate::socket::DestinationKey`] (workload, protocol, port, address).

/// `FLOWS` value: running totals since the entry was created. Userspace flushes differences.
///
/// Counters are only ever added to (atomically), so a reader sees each one monotonic for as
/// long as the entry lives; `first_seen_ns` tells a recreated entry (after LRU eviction) from
/// the old one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// `bpf_ktime_get_ns` at creation, and at the last decision or packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Connection attempts (connect, first datagram of a socket to the destination, raw
    /// socket first packet) by verdict.
    pub allowed: u64,
    pub denied: u64,
    pub would_deny: u64,
    /// Packets that left (egress) and arrived (ingress) on allowed flows, with IP headers.
    pub bytes_sent: u64,
    pub packets_sent: u64,
    pub bytes_received: u64,
    pub packets_received: u64,
    /// The task that made the last decision here: the caller of connect()/sendto(), or the
    /// socket's creator for packets judged in softirq.
    pub connect_tgid: u32,
    pub connect_tid: u32,
    /// The last task seen writing data (sendto, or a data packet sent in process context);
    /// zero when none was seen. With connection pools it differs from the connecting one.
    pub send_tgid: u32,
    pub send_tid: u32,
    pub connect_comm: [u8; 16],
    /// Empty when only the tid is known (data packets): userspace reads the thread's name.
    pub send_comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FlowStats>() == 120);

/// Destinations summarised at once, per host. Least recently used entries are evicted when
/// full; their first sight was already reported as an event, so no destination is lost.
pub const MAX_FLOWS: u32 = 65536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::FlowStats {}
}
