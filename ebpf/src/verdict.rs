//! Workload lookup, policy evaluation, per-socket state and reporting, shared by every hook.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::bpf_sk_storage_get,
    },
    maps::lpm_trie::Key,
};
use egressd_common::{
    Addr,
    event::{
        COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_EVENTS, COUNTER_RING_DROPS, COUNTER_WOULD_DENY,
        EVENT_DENIED, EVENT_NEW_DESTINATION, EVENT_WOULD_DENY, Event, REASON_ALLOW_RULE,
        REASON_DENY_LIST, REASON_FQDN, REASON_LEARNING, REASON_NO_RULE, REASON_RESOLVER,
        RING_BUFFER_BYTES, VERDICT_ALLOW, VERDICT_DENY, VERDICT_WOULD_DENY, decision_counter_index,
    },
    policy::{
        ALLOW_FLAG_DYNAMIC, ALLOW_KEY_WORKLOAD_BITS, AllowKey, AllowValue, DenyKey,
        MAX_CGROUP_DEPTH, MAX_PORT_RULES, MODE_AUDIT, MODE_LEARNING, NO_WORKLOAD, PROTOCOL_ANY,
        PROTOCOL_ICMP_ANY, Settings, WORKLOAD_FLAG_ACTIVE, WorkloadConfig,
    },
    socket::{SOCKET_FLAG_CACHED, SOCKET_FLAG_FQDN_ALLOWED, SOCKET_FLAG_RESOLVED, SocketState},
};

use crate::maps::{
    ALLOW, COUNTERS, DECISION_COUNTERS, DENY, EVENTS, SETTINGS, SOCKET_STATE, WORKLOAD_CGROUPS,
    WORKLOADS,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// One destination as a hook sees it.
#[derive(Clone, Copy)]
pub struct Flow {
    pub dst: Addr,
    pub src: Addr,
    pub dst_port: u16,
    pub src_port: u16,
    pub protocol: u8,
    /// False for ICMP, non-first fragments and protocols without ports.
    pub has_port: bool,
    pub family: u8,
    pub socket_type: u8,
}

impl Flow {
    pub const fn empty() -> Self {
        Flow {
            dst: [0; 16],
            src: [0; 16],
            dst_port: 0,
            src_port: 0,
            protocol: 0,
            has_port: false,
            family: 0,
            socket_type: 0,
        }
    }
}

/// Who caused a flow: the current task in process context, the socket's creator in softirq.
#[derive(Clone, Copy)]
pub struct Task {
    pub tgid: u32,
    pub tid: u32,
    /// Meaningful when `comm_known`; otherwise [`Task::comm`] asks the kernel, since most
    /// decisions (a known destination, the same writer as before) never need the name.
    comm: [u8; 16],
    comm_known: bool,
    pub cgroup_id: u64,
}

impl Task {
    /// The task running the program (process context).
    #[inline(always)]
    pub fn current(cgroup_id: u64) -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        Task {
            tgid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            comm: [0; 16],
            comm_known: false,
            cgroup_id,
        }
    }

    /// A task known by what was recorded of it (softirq context: the socket's creator).
    #[inline(always)]
    pub fn recorded(tgid: u32, tid: u32, comm: [u8; 16], cgroup_id: u64) -> Self {
        Task {
            tgid,
            tid,
            comm,
            comm_known: true,
            cgroup_id,
        }
    }

    #[inline(always)]
    pub fn comm(&self) -> [u8; 16] {
        if self.comm_known {
            self.comm
        } else {
            bpf_get_current_comm().unwrap_or([0; 16])
        }
    }
}

/// Writes the current task's name straight into `dst` (a map value): no stack copy.
#[inline(always)]
pub fn write_current_comm(dst: &mut [u8; 16]) {
    // SAFETY: dst is 16 writable bytes; the helper NUL-pads what it does not fill.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(dst.as_mut_ptr().cast(), 16);
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_decision(workload: u32, protocol: u8, verdict: u8) {
    let index = decision_counter_index(workload, protocol, verdict);
    if let Some(counter) = DECISION_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn settings() -> Settings {
    match SETTINGS.get(0) {
        Some(settings) => *settings,
        None => Settings::default(),
    }
}

/// The workload of the deepest cgroup on the path that is some workload's own cgroup:
/// descendants created after egressd started are governed from their first packet.
#[inline(always)]
pub fn workload_of(ancestor_id: impl Fn(i32) -> u64, settings: &Settings) -> u32 {
    let mut found = NO_WORKLOAD;
    let mut level: u32 = 1;
    while level <= MAX_CGROUP_DEPTH {
        let id = ancestor_id(level as i32);
        if id == 0 {
            break;
        }
        // SAFETY: the value is a plain u32 copied out at once.
        if let Some(workload) = unsafe { WORKLOAD_CGROUPS.get(id) } {
            found = *workload;
        }
        level += 1;
    }
    if found == NO_WORKLOAD {
        settings.unmatched_workload
    } else {
        found
    }
}

#[inline(always)]
pub fn workload_config(workload: u32) -> Option<WorkloadConfig> {
    if workload == NO_WORKLOAD {
        return None;
    }
    let config = *WORKLOADS.get(workload)?;
    if config.flags & WORKLOAD_FLAG_ACTIVE == 0 {
        return None;
    }
    Some(config)
}

/// The socket's storage, created on first use. None only if the kernel cannot allocate it.
///
/// # Safety
/// `sk` must be a pointer the calling program type may pass to `bpf_sk_storage_get`.
#[inline(always)]
pub unsafe fn socket_state(sk: *mut c_void) -> Option<&'static mut SocketState> {
    let map = (&raw const SOCKET_STATE).cast_mut().cast::<c_void>();
    // SAFETY: map is our SK_STORAGE map; the caller vouches for sk.
    let state = unsafe {
        bpf_sk_storage_get(
            map,
            sk,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SocketState>();
    // SAFETY: the kernel returns either NULL or a valid, zero-initialised value.
    unsafe { state.as_mut() }
}

/// The socket's storage if it has any (never creates it: for packets of sockets that are
/// not necessarily governed).
///
/// # Safety
/// As for [`socket_state`].
#[inline(always)]
pub unsafe fn existing_socket_state(sk: *mut c_void) -> Option<&'static mut SocketState> {
    let map = (&raw const SOCKET_STATE).cast_mut().cast::<c_void>();
    // SAFETY: map is our SK_STORAGE map; the caller vouches for sk.
    let state =
        unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), 0) }.cast::<SocketState>();
    // SAFETY: the kernel returns either NULL or a valid value.
    unsafe { state.as_mut() }
}

#[inline(always)]
pub fn cached_verdict(state: &SocketState, flow: &Flow, generation: u32) -> Option<u8> {
    let same_flow = state.flags & SOCKET_FLAG_CACHED != 0
        && state.cached_port == flow.dst_port
        && state.cached_protocol == flow.protocol
        && state.cached_addr == flow.dst;
    if !same_flow {
        None
    } else if state.cached_generation == generation {
        Some(state.cached_verdict)
    } else if state.cached_verdict == VERDICT_ALLOW && state.flags & SOCKET_FLAG_FQDN_ALLOWED != 0 {
        // Allowed through a name: the connection stays up when the address expires or the
        // policy changes; only new connections are judged again.
        Some(VERDICT_ALLOW)
    } else {
        None
    }
}

#[inline(always)]
pub fn cache_verdict(
    state: &mut SocketState,
    flow: &Flow,
    generation: u32,
    verdict: u8,
    reason: u32,
) {
    state.cached_generation = generation;
    state.cached_addr = flow.dst;
    state.cached_port = flow.dst_port;
    state.cached_protocol = flow.protocol;
    state.cached_verdict = verdict;
    state.flags |= SOCKET_FLAG_CACHED;
    if verdict == VERDICT_ALLOW && reason == REASON_FQDN {
        state.flags |= SOCKET_FLAG_FQDN_ALLOWED;
    } else {
        state.flags &= !SOCKET_FLAG_FQDN_ALLOWED;
    }
}

/// The socket's workload, resolved once per settings generation.
#[inline(always)]
pub fn socket_workload(
    state: &mut SocketState,
    settings: &Settings,
    ancestor_id: impl Fn(i32) -> u64,
) -> u32 {
    if state.flags & SOCKET_FLAG_RESOLVED != 0 && state.workload_generation == settings.generation {
        return state.workload;
    }
    let workload = workload_of(ancestor_id, settings);
    state.workload = workload;
    state.workload_generation = settings.generation;
    state.flags |= SOCKET_FLAG_RESOLVED;
    workload
}

/// Some(flags of the matching entry) when a rule allows the flow.
#[inline(always)]
fn allow_rule_matches(workload: u32, flow: &Flow) -> Option<u32> {
    let key = Key::new(
        ALLOW_KEY_WORKLOAD_BITS + 128,
        AllowKey {
            workload_be: workload.to_be_bytes(),
            addr: flow.dst,
        },
    );
    let value = match ALLOW.get(&key) {
        Some(value) if rules_match(value, flow) => return Some(value.flags),
        _ => crate::dns::FQDN_ADDRESSES.get_ptr(key.data)?,
    };
    // SAFETY: map value pointer, read at once.
    let value = unsafe { &*value };
    rules_match(value, flow).then_some(value.flags)
}

// Rule indexes are bounded for the verifier with a mask.
const _: () = assert!(MAX_PORT_RULES.is_power_of_two());

/// What [`rules_match`] looks for and what it found: the context bpf_loop hands to each step.
#[repr(C)]
struct RuleSearch {
    value: *const AllowValue,
    dst_port: u16,
    protocol: u8,
    has_port: bool,
    matched: bool,
}

/// Whether one of `value`'s port rules admits the flow. A bpf_loop walk (see `loops`): as an
/// open loop, the 16 rules were two thirds of egress's verification.
#[inline(always)]
fn rules_match(value: &AllowValue, flow: &Flow) -> bool {
    let mut search = RuleSearch {
        value,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        has_port: flow.has_port,
        matched: false,
    };
    crate::loops::walk(MAX_PORT_RULES as u32, rule_search_step, &mut search);
    search.matched
}

/// One step of [`rules_match`]: 1 (stop) after the last rule or at the first that matches.
extern "C" fn rule_search_step(index: u32, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the RuleSearch that rules_match gave it.
    let search = unsafe { &mut *context.cast::<RuleSearch>() };
    // SAFETY: a map value, valid for the program's run.
    let value = unsafe { &*search.value };
    if index >= value.count {
        return 1;
    }
    let rule = &value.rules[index as usize & (MAX_PORT_RULES - 1)];
    let flow_protocol = search.protocol;
    let protocol_ok = rule.protocol == PROTOCOL_ANY
        || rule.protocol == flow_protocol
        || (rule.protocol == PROTOCOL_ICMP_ANY
            && (flow_protocol == IPPROTO_ICMP || flow_protocol == IPPROTO_ICMPV6));
    let port_ok = if search.has_port {
        rule.port_first <= search.dst_port && search.dst_port <= rule.port_last
    } else {
        rule.port_first == 0 && rule.port_last == u16::MAX
    };
    if protocol_ok && port_ok {
        search.matched = true;
        return 1;
    }
    0
}

#[inline(always)]
fn denied_for_all(flow: &Flow) -> bool {
    DENY.get(Key::new(128, DenyKey { addr: flow.dst }))
        .is_some()
}

/// Verdict and reason for `flow` in a workload with `config`.
#[inline(always)]
pub fn evaluate(workload: u32, config: &WorkloadConfig, flow: &Flow) -> (u8, u32) {
    if config.mode == MODE_LEARNING {
        return (VERDICT_ALLOW, REASON_LEARNING);
    }
    if flow.has_port
        && flow.dst_port == crate::dns::DNS_PORT
        && (flow.protocol == IPPROTO_UDP || flow.protocol == IPPROTO_TCP)
        && crate::dns::is_resolver(&flow.dst)
    {
        return (VERDICT_ALLOW, REASON_RESOLVER);
    }
    let reason = if denied_for_all(flow) {
        REASON_DENY_LIST
    } else if let Some(flags) = allow_rule_matches(workload, flow) {
        let reason = if flags & ALLOW_FLAG_DYNAMIC != 0 {
            REASON_FQDN
        } else {
            REASON_ALLOW_RULE
        };
        return (VERDICT_ALLOW, reason);
    } else {
        REASON_NO_RULE
    };
    if config.mode == MODE_AUDIT {
        (VERDICT_WOULD_DENY, reason)
    } else {
        (VERDICT_DENY, reason)
    }
}

pub struct Decision {
    pub workload: u32,
    pub mode: u32,
    pub verdict: u8,
    pub reason: u32,
    pub hook: u32,
}

/// Counts the decision (per workload, and in the destination's flow summary) and sends the
/// events it calls for: every refusal, and the first sight of an allowed destination.
#[inline(always)]
pub fn report(decision: &Decision, flow: &Flow, task: &Task) {
    count_decision(decision.workload, flow.protocol, decision.verdict);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = crate::flows::destination_key(decision.workload, flow);
    let new_destination = crate::flows::record_decision(&key, decision.verdict, task, now);
    let kind = match decision.verdict {
        VERDICT_DENY => {
            count(COUNTER_DENIED);
            EVENT_DENIED
        }
        VERDICT_WOULD_DENY => {
            count(COUNTER_WOULD_DENY);
            EVENT_WOULD_DENY
        }
        _ => {
            count(COUNTER_ALLOWED);
            if !new_destination {
                return;
            }
            EVENT_NEW_DESTINATION
        }
    };
    send_event(kind, decision, flow, task);
}

/// Submit flags that wake the reader only once `wake_at` bytes are waiting: a wakeup per
/// record costs the daemon a context switch per event or DNS answer (and the sender the IPI),
/// which at tens of thousands a second competes with the workloads for the CPUs. The daemon
/// also reads on a short timer, so a lone record waits at most that long.
#[inline(always)]
pub fn ring_wakeup(ring: &aya_ebpf::maps::RingBuf, wake_at: u32) -> u64 {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    if ring.query(u64::from(BPF_RB_AVAIL_DATA)) >= u64::from(wake_at) {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
pub fn send_event(kind: u32, decision: &Decision, flow: &Flow, task: &Task) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(COUNTER_RING_DROPS);
        return;
    };
    entry.write(Event {
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: task.cgroup_id,
        tgid: task.tgid,
        tid: task.tid,
        workload: decision.workload,
        kind,
        reason: decision.reason,
        hook: decision.hook,
        mode: decision.mode,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        src_addr: flow.src,
        dst_addr: flow.dst,
        comm: task.comm(),
        protocol: flow.protocol,
        verdict: decision.verdict,
        family: flow.family,
        socket_type: flow.socket_type,
        reserved: 0,
    });
    // An eighth of the ring: events are cheap to take in, in batches of a couple of thousand.
    entry.submit(ring_wakeup(&EVENTS, RING_BUFFER_BYTES / 8));
    count(COUNTER_EVENTS);
}
