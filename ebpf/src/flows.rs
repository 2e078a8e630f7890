//! Per-destination flow summaries (`FLOWS`): decisions, bytes and packets both ways, and the
//! tasks involved, added up in the kernel. Userspace walks the map every flush interval.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use egressd_common::{
    event::{COUNTER_FLOW_INSERT_FAILURES, VERDICT_DENY, VERDICT_WOULD_DENY},
    flow::{FlowStats, MAX_FLOWS},
    socket::{DestinationKey, SocketState},
};

use crate::verdict::{Flow, Task, count};

#[map]
pub static FLOWS: LruHashMap<DestinationKey, FlowStats> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Room to build a new entry in: `FlowStats` is too large for the egress program's stack.
#[map]
static FLOW_SCRATCH: PerCpuArray<FlowStats> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn destination_key(workload: u32, flow: &Flow) -> DestinationKey {
    DestinationKey {
        workload,
        port: if flow.has_port { flow.dst_port } else { 0 },
        protocol: flow.protocol,
        reserved: 0,
        addr: flow.dst,
    }
}

/// The key of the flow a socket's cached verdict is for.
#[inline(always)]
pub fn cached_key(state: &SocketState) -> DestinationKey {
    DestinationKey {
        workload: state.workload,
        port: state.cached_port,
        protocol: state.cached_protocol,
        reserved: 0,
        addr: state.cached_addr,
    }
}

/// Adds to a counter other CPUs add to concurrently. The result is unused, so this is the
/// plain BPF atomic add every kernel supports (no BPF_FETCH). core's atomic types offer no
/// read-modify-write on the BPF target, hence the intrinsic.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: the pointer is a map value field, valid and 8-byte aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

/// Host build (clippy only): the same through core's atomics.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    // SAFETY: the pointer is valid and 8-byte aligned.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(counter) }
        .fetch_add(value, core::sync::atomic::Ordering::Relaxed);
}

/// An aligned 32-bit store is whole on every architecture: a racing writer wins or loses.
#[inline(always)]
fn store(field: &mut u32, value: u32) {
    // SAFETY: a valid, aligned map value field.
    unsafe { core::ptr::write_volatile(field, value) };
}

/// Counts one decision for the destination. True when the destination is new (the entry was
/// created here), which is when a "new destination" event is due.
#[inline(always)]
pub fn record_decision(key: &DestinationKey, verdict: u8, task: &Task, now: u64) -> bool {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value, valid for the program's run.
        let stats = unsafe { &mut *stats };
        add(verdict_counter(stats, verdict), 1);
        stats.last_seen_ns = now;
        if stats.connect_tid != task.tid {
            store(&mut stats.connect_tgid, task.tgid);
            store(&mut stats.connect_tid, task.tid);
            stats.connect_comm = task.comm();
        }
        return false;
    }
    let Some(fresh) = FLOW_SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it during the program.
    let fresh = unsafe { &mut *fresh };
    *fresh = FlowStats {
        first_seen_ns: now,
        last_seen_ns: now,
        connect_tgid: task.tgid,
        connect_tid: task.tid,
        connect_comm: task.comm(),
        ..FlowStats::default()
    };
    *verdict_counter(fresh, verdict) = 1;
    if FLOWS.insert(key, fresh, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created it first (then both report it, which is harmless), or the map
        // could not take it: the event still carries the destination.
        count(COUNTER_FLOW_INSERT_FAILURES);
    }
    true
}

#[inline(always)]
fn verdict_counter(stats: &mut FlowStats, verdict: u8) -> &mut u64 {
    match verdict {
        VERDICT_DENY => &mut stats.denied,
        VERDICT_WOULD_DENY => &mut stats.would_deny,
        _ => &mut stats.allowed,
    }
}

/// Adds a packet that left on the flow.
#[inline(always)]
pub fn account_sent(key: &DestinationKey, bytes: u32) {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value, valid for the program's run.
        let stats = unsafe { &mut *stats };
        add(&mut stats.bytes_sent, u64::from(bytes));
        add(&mut stats.packets_sent, 1);
    }
}

/// Adds a packet that arrived on the flow.
#[inline(always)]
pub fn account_received(key: &DestinationKey, bytes: u32) {
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value, valid for the program's run.
        let stats = unsafe { &mut *stats };
        add(&mut stats.bytes_received, u64::from(bytes));
        add(&mut stats.packets_received, 1);
    }
}

/// Records the task writing on a socket, when it is not the one recorded last.
#[inline(always)]
pub fn note_sender(
    state: &mut SocketState,
    key: &DestinationKey,
    tgid: u32,
    tid: u32,
    comm: impl FnOnce() -> [u8; 16],
) {
    if tid == 0 || state.sender_tid == tid {
        return;
    }
    state.sender_tid = tid;
    if let Some(stats) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value, valid for the program's run.
        let stats = unsafe { &mut *stats };
        store(&mut stats.send_tgid, tgid);
        store(&mut stats.send_tid, tid);
        stats.send_comm = comm();
    }
}
