//! Per-socket state kept in socket-local storage.

use crate::Addr;

/// The socket was created while egressd ran, so `workload`, `creator_*` are from creation.
pub const SOCKET_FLAG_CREATED: u32 = 1;
/// The socket is the accepted side of an inbound TCP connection: its packets are replies.
pub const SOCKET_FLAG_INBOUND: u32 = 1 << 1;
/// `cached_*` holds a verdict.
pub const SOCKET_FLAG_CACHED: u32 = 1 << 2;
/// The workload field was resolved (at generation `workload_generation`).
pub const SOCKET_FLAG_RESOLVED: u32 = 1 << 3;
/// The cached allow came from an address learned from DNS: the connection stays up when the
/// address expires or the policy changes.
pub const SOCKET_FLAG_FQDN_ALLOWED: u32 = 1 << 4;

/// `SOCKET_STATE` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// Cgroup the socket was created in (or first seen in).
    pub cgroup_id: u64,
    pub flags: u32,
    pub workload: u32,
    /// Settings generation at which `workload` was resolved.
    pub workload_generation: u32,
    /// Task that created (or first connected) the socket: egress runs in softirq, where the
    /// current task means nothing.
    pub creator_tgid: u32,
    pub creator_tid: u32,
    /// Settings generation of the cached verdict.
    pub cached_generation: u32,
    pub creator_comm: [u8; 16],
    pub cached_addr: Addr,
    pub cached_port: u16,
    pub cached_protocol: u8,
    /// A `crate::event::VERDICT_*` code.
    pub cached_verdict: u8,
    /// Thread that last sent data on the socket (0: none seen), so that the flow summary is
    /// told only when the writer changes.
    pub sender_tid: u32,
}
const _: () = assert!(core::mem::size_of::<SocketState>() == 72);

/// Key of the flow summaries (`FLOWS`): one entry per workload, protocol, port and address, so
/// "new destination" events are sent once per destination, not once per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationKey {
    pub workload: u32,
    pub port: u16,
    pub protocol: u8,
    pub reserved: u8,
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<DestinationKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::DestinationKey {}
}
