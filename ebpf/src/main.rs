//! egressd's kernel side. Each entry point is a thin wrapper that turns the hook's context
//! into a `Flow`, asks `verdict` for a decision and maps it to the hook's return code.
// Built for the host only so `cargo clippy --workspace` can check it; the real build targets
// bpfel-unknown-none through datapath/build.rs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values (see flows.rs); the eBPF build runs with RUSTC_BOOTSTRAP.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod dns;
mod flows;
mod loops;
mod maps;
mod packet;
mod verdict;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use egressd_common::{
    event::{
        COUNTER_CACHE_HITS, COUNTER_STORAGE_FAILURES, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_EGRESS,
        HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SOCK_CREATE, REASON_RAW_SOCKET, VERDICT_ALLOW,
        VERDICT_DENY, VERDICT_WOULD_DENY,
    },
    policy::{MODE_AUDIT, MODE_STRICT, NO_WORKLOAD, WORKLOAD_FLAG_RAW_SOCKETS},
    socket::{SOCKET_FLAG_CACHED, SOCKET_FLAG_CREATED, SOCKET_FLAG_INBOUND, SocketState},
    v4_mapped,
};

use crate::verdict::{
    Decision, Flow, Task, cache_verdict, cached_verdict, count, evaluate, existing_socket_state,
    report, send_event, settings, socket_state, socket_workload, workload_config,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_RAW: u32 = 3;
const TCP_LISTEN: u32 = 10;

#[inline(always)]
fn current_ancestor(level: i32) -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_cgroup_id() }
}

// ---- connect4/6, sendmsg4/6: early EPERM for TCP, connected and unconnected UDP, ping ----

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    check_sock_addr(&ctx, false, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    check_sock_addr(&ctx, true, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    check_sock_addr(&ctx, false, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    check_sock_addr(&ctx, true, HOOK_SENDMSG6)
}

#[inline(always)]
fn sock_addr_flow(ctx: &SockAddrContext, ipv6: bool) -> Flow {
    // SAFETY: the context pointer is valid for the program's run.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let mut flow = Flow::empty();
    if ipv6 {
        let (dst, family) = packet::ipv6_from_words(sock_addr.user_ip6);
        flow.family = family;
        flow.dst = dst;
    } else {
        flow.family = 4;
        flow.dst = v4_mapped(sock_addr.user_ip4.to_ne_bytes());
    }
    flow.dst_port = u16::from_be(sock_addr.user_port as u16);
    flow.protocol = sock_addr.protocol as u8;
    flow.socket_type = sock_addr.type_ as u8;
    flow.has_port = flow.protocol == verdict::IPPROTO_TCP || flow.protocol == verdict::IPPROTO_UDP;
    flow
}

#[inline(always)]
fn check_sock_addr(ctx: &SockAddrContext, ipv6: bool, hook: u32) -> i32 {
    let flow = sock_addr_flow(ctx, ipv6);
    let is_sendmsg = hook == HOOK_SENDMSG4 || hook == HOOK_SENDMSG6;
    if is_sendmsg && flow.dst == [0; 16] {
        // A connected socket sending with ancillary data: the peer is the connected one, which
        // the egress backstop checks. Not an "allowed" verdict.
        return ALLOW;
    }
    let settings = settings();
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: sock_addr programs may pass ctx->sk to bpf_sk_storage_get.
    let mut state = unsafe { existing_socket_state(sk.cast::<c_void>()) };
    let mut task = Task::current(0);
    let workload = match state.as_mut() {
        Some(state) if state.flags & SOCKET_FLAG_CREATED != 0 => {
            // Created under egressd: the creator's cgroup, not the caller's, decides (a socket
            // handed to another process keeps its creator's policy).
            task.cgroup_id = state.cgroup_id;
            if state.workload_generation != settings.generation
                && state.cgroup_id == current_cgroup()
            {
                // The workload table changed since creation and the caller shares the
                // creator's cgroup, so the caller's ancestors are the socket's.
                state.workload = verdict::workload_of(current_ancestor, &settings);
                state.workload_generation = settings.generation;
            }
            state.workload
        }
        _ => {
            // Not created under egressd: whoever uses the socket decides, so its workload is
            // the caller's, walked again only when the caller's cgroup changes.
            let cgroup_id = current_cgroup();
            task.cgroup_id = cgroup_id;
            let workload = match state.as_ref() {
                Some(state)
                    if state.flags & egressd_common::socket::SOCKET_FLAG_RESOLVED != 0
                        && state.cgroup_id == cgroup_id
                        && state.workload_generation == settings.generation =>
                {
                    state.workload
                }
                _ => verdict::workload_of(current_ancestor, &settings),
            };
            if state.is_none() && workload_config(workload).is_some() {
                // No storage: the socket was made outside every workload (sock_create keeps
                // none for those) or before egressd started, and a workload's process uses
                // it now. Its policy decides, cached in storage from here on.
                // SAFETY: as above.
                state = unsafe { socket_state(sk.cast::<c_void>()) };
            }
            if let Some(state) = state.as_mut() {
                if state.workload != workload {
                    // Handed on to another workload: the verdict cached for the previous
                    // one is not this one's.
                    state.flags &= !SOCKET_FLAG_CACHED;
                }
                state.cgroup_id = cgroup_id;
                state.workload = workload;
                state.flags |= egressd_common::socket::SOCKET_FLAG_RESOLVED;
                state.workload_generation = settings.generation;
            }
            workload
        }
    };
    if !is_sendmsg && let Some(state) = state.as_mut() {
        // An accepted socket that connects anew (after AF_UNSPEC) no longer carries replies.
        state.flags &= !SOCKET_FLAG_INBOUND;
    }
    if is_sendmsg
        && let Some(state) = state.as_mut()
        && let Some(verdict) = cached_verdict(state, &flow, settings.generation)
    {
        // More datagrams of a socket to the destination it last sent to: one attempt was
        // counted already; only the writer may be new. A verdict cached in this generation
        // was made with this workload's configuration, so that is not looked up again.
        if verdict == VERDICT_DENY {
            return REFUSE;
        }
        let key = flows::destination_key(workload, &flow);
        flows::note_sender(state, &key, task.tgid, task.tid, || task.comm());
        return ALLOW;
    }
    let Some(config) = workload_config(workload) else {
        return ALLOW;
    };
    let key = flows::destination_key(workload, &flow);
    let (verdict, reason) = evaluate(workload, &config, &flow);
    let decision = Decision {
        workload,
        mode: config.mode,
        verdict,
        reason,
        hook,
    };
    report(&decision, &flow, &task);
    if let Some(state) = state {
        cache_verdict(state, &flow, settings.generation, verdict, reason);
        if is_sendmsg && verdict != VERDICT_DENY {
            flows::note_sender(state, &key, task.tgid, task.tid, || task.comm());
        }
    }
    if verdict == VERDICT_DENY {
        REFUSE
    } else {
        ALLOW
    }
}

// ---- sock_create: workload and creator of every new inet socket; raw sockets in strict ----

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let settings = settings();
    let cgroup_id = current_cgroup();
    let workload = verdict::workload_of(current_ancestor, &settings);
    let Some(config) = workload_config(workload) else {
        // A socket of no workload gets no storage: nothing is enforced or recorded for it,
        // and its storage (allocated here, cloned into every connection a listener accepts,
        // freed at close) was most of what egressd cost the processes it does not govern.
        // The other hooks find no storage and look its cgroup up, as for sockets older than
        // egressd.
        return ALLOW;
    };
    let task = Task::current(cgroup_id);
    // SAFETY: cgroup/sock programs pass their context (the new socket) to bpf_sk_storage_get.
    match unsafe { socket_state(ctx.sock.cast::<c_void>()) } {
        Some(state) => {
            state.cgroup_id = cgroup_id;
            state.workload = workload;
            state.workload_generation = settings.generation;
            state.creator_tgid = task.tgid;
            state.creator_tid = task.tid;
            verdict::write_current_comm(&mut state.creator_comm);
            state.flags |= SOCKET_FLAG_CREATED | egressd_common::socket::SOCKET_FLAG_RESOLVED;
        }
        None => count(COUNTER_STORAGE_FAILURES),
    }
    // SAFETY: the context pointer is valid for the program's run.
    let (socket_type, protocol, family) =
        unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol, (*ctx.sock).family) };
    if socket_type != SOCK_RAW {
        return ALLOW;
    }
    if config.flags & WORKLOAD_FLAG_RAW_SOCKETS != 0
        || (config.mode != MODE_STRICT && config.mode != MODE_AUDIT)
    {
        return ALLOW;
    }
    let verdict = if config.mode == MODE_STRICT {
        VERDICT_DENY
    } else {
        VERDICT_WOULD_DENY
    };
    let mut flow = Flow::empty();
    flow.protocol = protocol as u8;
    flow.socket_type = SOCK_RAW as u8;
    flow.family = if family == 10 { 6 } else { 4 };
    let decision = Decision {
        workload,
        mode: config.mode,
        verdict,
        reason: REASON_RAW_SOCKET,
        hook: HOOK_SOCK_CREATE,
    };
    verdict::count_decision(workload, flow.protocol, verdict);
    verdict::count(if verdict == VERDICT_DENY {
        egressd_common::event::COUNTER_DENIED
    } else {
        egressd_common::event::COUNTER_WOULD_DENY
    });
    let kind = if verdict == VERDICT_DENY {
        egressd_common::event::EVENT_DENIED
    } else {
        egressd_common::event::EVENT_WOULD_DENY
    };
    send_event(kind, &decision, &flow, &task);
    if verdict == VERDICT_DENY {
        REFUSE
    } else {
        ALLOW
    }
}

// ---- egress: the per-packet backstop (raw and ping sockets, passed sockets, anything else) ----

/// Where the current task is available (kernels from 6.10 allow `bpf_get_current_pid_tgid`
/// in every program type): data packets sent in process context name their writer.
#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    egress_packet::<true>(&ctx)
}

/// The same without the sending task, for kernels that refuse the helper here; userspace
/// loads it when `egress` is rejected.
#[cgroup_skb(egress)]
pub fn egress_compat(ctx: SkBuffContext) -> i32 {
    egress_packet::<false>(&ctx)
}

#[inline(always)]
fn egress_packet<const WITH_TASK: bool>(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: sk comes from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // Request and time-wait sockets only send handshake replies, ACKs and resets.
        return ALLOW;
    }
    // SAFETY: full is a valid full socket.
    let (socket_type, protocol, dst_port) = unsafe {
        (
            (*full).type_,
            (*full).protocol,
            u16::from_be((*full).dst_port),
        )
    };
    // Connected TCP: the socket names the peer, so no packet loads on the per-packet path
    // (except DNS over TCP, whose queries are read from the payload).
    let tcp_fast_path = socket_type == SOCK_STREAM
        && protocol == u32::from(verdict::IPPROTO_TCP)
        && dst_port != dns::DNS_PORT;
    // SAFETY: full is a full socket, which cgroup_skb may pass to bpf_sk_storage_get.
    let existing = unsafe { existing_socket_state(full.cast::<c_void>()) };
    // A socket without storage: its cgroup says whether it is governed at all.
    let walked = match existing {
        Some(_) => None,
        None => match governing_workload(ctx) {
            Some(workload) => Some(workload),
            None => return ALLOW,
        },
    };
    let parsed = if tcp_fast_path {
        // SAFETY: full is a valid full socket.
        unsafe { packet::from_tcp_socket(full) }
    } else {
        packet::parse(ctx)
    };
    let Some(state) = (match existing {
        Some(state) => Some(state),
        // SAFETY: full is a valid full socket from the context.
        None if tcp_fast_path && unsafe { accepted_before_storage(ctx, full) } => {
            // SAFETY: as above.
            if let Some(state) = unsafe { socket_state(full.cast::<c_void>()) } {
                state.flags |= SOCKET_FLAG_INBOUND;
            }
            return ALLOW;
        }
        None => {
            // SAFETY: as above.
            let mut fresh = unsafe { socket_state(full.cast::<c_void>()) };
            if let Some(state) = fresh.as_deref_mut()
                && let Some(workload) = walked
            {
                seed_workload(state, workload);
            }
            fresh
        }
    }) else {
        count(COUNTER_STORAGE_FAILURES);
        return egress_without_state(ctx, &parsed.flow);
    };
    // Kernel control traffic (resets, ICMP errors and echo replies, neighbour discovery) comes
    // from the kernel's own sockets, which never pass through sock_create. A raw socket a
    // user created could forge the same packets, so it gets no such pass.
    // SAFETY: full is a valid full socket.
    let user_raw = socket_type == SOCK_RAW && state.flags & SOCKET_FLAG_CREATED != 0;
    if parsed.control && !user_raw {
        return ALLOW;
    }
    // DNS questions: remembered for their answers, or, for a workload whose questions must
    // name what its FQDN rules allow, left to the dns_query program once the destination
    // itself is allowed (below).
    let query_check = if parsed.flow.has_port && parsed.flow.dst_port == dns::DNS_PORT {
        let settings = settings();
        let workload = socket_workload(state, &settings, |level| {
            // SAFETY: skb is the context.
            unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
        });
        let check = dns::query_check(workload_config(workload));
        if let dns::QueryCheck::None = check {
            dns::record_query(ctx, &parsed, full.cast::<c_void>());
        }
        check
    } else {
        dns::QueryCheck::None
    };
    // SAFETY: full is a valid full socket.
    let sk_state = unsafe { (*full).state };
    if state.flags & SOCKET_FLAG_INBOUND != 0 || sk_state == TCP_LISTEN {
        return ALLOW;
    }
    let settings = settings();
    if let Some(verdict) = cached_verdict(state, &parsed.flow, settings.generation) {
        count(COUNTER_CACHE_HITS);
        if verdict == VERDICT_DENY {
            return REFUSE;
        }
        if state.workload != NO_WORKLOAD {
            account_sent::<WITH_TASK>(ctx, state, &parsed, tcp_fast_path);
        }
        return allowed(ctx, query_check);
    }
    // The packet's cgroup is the socket's: authoritative even for passed sockets.
    let workload = socket_workload(state, &settings, |level| {
        // SAFETY: skb is the context.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    });
    let Some(config) = workload_config(workload) else {
        cache_verdict(state, &parsed.flow, settings.generation, VERDICT_ALLOW, 0);
        return ALLOW;
    };
    let (verdict, reason) = if parsed.valid {
        evaluate(workload, &config, &parsed.flow)
    } else if config.mode == MODE_STRICT {
        (VERDICT_DENY, egressd_common::event::REASON_NO_RULE)
    } else {
        (VERDICT_ALLOW, egressd_common::event::REASON_LEARNING)
    };
    let mut flow = parsed.flow;
    flow.socket_type = socket_type as u8;
    let task = Task::recorded(
        state.creator_tgid,
        state.creator_tid,
        state.creator_comm,
        // SAFETY: skb is the context.
        unsafe { bpf_skb_cgroup_id(skb) },
    );
    report(
        &Decision {
            workload,
            mode: config.mode,
            verdict,
            reason,
            hook: HOOK_EGRESS,
        },
        &flow,
        &task,
    );
    cache_verdict(state, &parsed.flow, settings.generation, verdict, reason);
    if verdict == VERDICT_DENY {
        return REFUSE;
    }
    account_sent::<WITH_TASK>(ctx, state, &parsed, tcp_fast_path);
    allowed(ctx, query_check)
}

/// The verdict of a packet the allowlist allows: its own, unless it is a DNS question whose
/// name must match the workload's FQDN rules. That check runs in the dns_query program (too
/// much for this one's verifier budget), whose verdict then becomes the packet's.
#[inline(always)]
fn allowed(ctx: &SkBuffContext, query_check: dns::QueryCheck) -> i32 {
    match query_check {
        dns::QueryCheck::None => ALLOW,
        dns::QueryCheck::Names => {
            // SAFETY: the program array holds cgroup_skb programs only.
            unsafe { dns::DNS_QUERY_PROGRAM.tail_call(ctx, 0) };
            // Reached only if the tail call failed: fail closed.
            count(egressd_common::event::COUNTER_DNS_QUERIES_REFUSED);
            REFUSE
        }
        dns::QueryCheck::Report => {
            // SAFETY: as above.
            unsafe { dns::DNS_QUERY_PROGRAM.tail_call(ctx, 0) };
            ALLOW
        }
    }
}

/// Adds an allowed packet to its flow summary and, where the current task is known and the
/// packet carries data, notes a new writer. Softirq transmissions (ACKs, retransmits) run
/// under whatever task was interrupted: bare ACKs are skipped here, and userspace keeps a
/// writer only if it belongs to the flow's workload.
#[inline(always)]
fn account_sent<const WITH_TASK: bool>(
    ctx: &SkBuffContext,
    state: &mut SocketState,
    parsed: &packet::Parsed,
    tcp_fast_path: bool,
) {
    let key = flows::cached_key(state);
    flows::account_sent(&key, ctx.len());
    if !WITH_TASK {
        return;
    }
    // SAFETY: helper without preconditions (allowed in cgroup_skb from 6.10).
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tid = pid_tgid as u32;
    if tid == 0 || tid == state.sender_tid {
        return;
    }
    let carries_data = if tcp_fast_path {
        packet::tcp_carries_data(ctx)
    } else {
        packet::carries_payload(ctx, parsed)
    };
    if carries_data {
        flows::note_sender(state, &key, (pid_tgid >> 32) as u32, tid, || [0; 16]);
    }
}

/// Egress when socket storage cannot be had (memory pressure): decide without caching.
#[inline(always)]
fn egress_without_state(ctx: &SkBuffContext, flow: &Flow) -> i32 {
    let settings = settings();
    let skb = ctx.skb.skb;
    let workload = verdict::workload_of(
        |level| {
            // SAFETY: skb is the context.
            unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
        },
        &settings,
    );
    let Some(config) = workload_config(workload) else {
        return ALLOW;
    };
    let (verdict, _) = evaluate(workload, &config, flow);
    if verdict == VERDICT_DENY {
        REFUSE
    } else {
        ALLOW
    }
}

/// The workload governing the packet's socket by its cgroup, None when none does. Asked only
/// for sockets without storage, which sock_create keeps from sockets of no workload: nothing
/// is enforced or recorded for those, and no storage is made for them here either.
#[inline(always)]
fn governing_workload(ctx: &SkBuffContext) -> Option<u32> {
    let skb = ctx.skb.skb;
    let workload = verdict::workload_of(
        |level| {
            // SAFETY: skb is the context.
            unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
        },
        &settings(),
    );
    workload_config(workload).map(|_| workload)
}

/// Fresh storage of a socket whose workload was just looked up by its cgroup: resolved, so
/// the same packet does not walk the cgroup's ancestors again.
#[inline(always)]
fn seed_workload(state: &mut SocketState, workload: u32) {
    state.workload = workload;
    state.workload_generation = settings().generation;
    state.flags |= egressd_common::socket::SOCKET_FLAG_RESOLVED;
}

// ---- dns_query: questions of `dns_queries = "allowlisted"` workloads (tail call from egress) ----

/// Reached only by tail call from `egress`, for a packet to port 53 that the allowlist allows,
/// of a workload whose DNS questions must name something its FQDN rules allow (strict or
/// audit). Its verdict is the packet's: a refused question never leaves the host; an allowed
/// one is remembered for the answer's validation. Not attached itself.
#[cgroup_skb(egress)]
pub fn dns_query(ctx: SkBuffContext) -> i32 {
    let parsed = packet::parse(&ctx);
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return REFUSE;
    }
    // SAFETY: sk comes from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return REFUSE;
    }
    let settings = settings();
    let ancestor = |level| {
        // SAFETY: skb is the context.
        unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
    };
    // SAFETY: full is a full socket, which cgroup_skb may pass to bpf_sk_storage_get.
    let (workload, creator) = match unsafe { socket_state(full.cast::<c_void>()) } {
        Some(state) => {
            let creator = dns::Creator {
                tgid: state.creator_tgid,
                tid: state.creator_tid,
                comm: state.creator_comm,
            };
            (socket_workload(state, &settings, ancestor), creator)
        }
        None => (
            verdict::workload_of(ancestor, &settings),
            dns::Creator::NONE,
        ),
    };
    let Some(config) = workload_config(workload) else {
        dns::record_query(&ctx, &parsed, full.cast::<c_void>());
        return ALLOW;
    };
    let strict = config.mode == MODE_STRICT;
    let sk = full.cast::<c_void>();
    if dns::check_query(&ctx, &parsed, sk, workload, strict, &creator) {
        REFUSE
    } else {
        ALLOW
    }
}

// ---- ingress: bytes received by governed flows; DNS answers become allowed addresses ----

#[cgroup_skb(ingress)]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    // Ingress never drops: it only observes.
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: sk comes from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return ALLOW;
    }
    // SAFETY: full is a valid full socket.
    let (socket_type, protocol, dst_port) = unsafe {
        (
            (*full).type_,
            (*full).protocol,
            u16::from_be((*full).dst_port),
        )
    };
    // SAFETY: full is a full socket, which cgroup_skb may pass to bpf_sk_storage_get.
    let mut state = unsafe { existing_socket_state(full.cast::<c_void>()) };
    let tcp_not_dns = socket_type == SOCK_STREAM
        && protocol == u32::from(verdict::IPPROTO_TCP)
        && dst_port != dns::DNS_PORT;
    // SAFETY: full is a valid full socket.
    let listening = tcp_not_dns && unsafe { (*full).state } == TCP_LISTEN;
    if tcp_not_dns && !listening {
        // Connected TCP: everything arriving is from the peer the verdict was cached for.
        // Without storage there is nothing to account it to, whatever the workload.
        if let Some(state) = state
            && receiving_flow(state)
        {
            flows::account_received(&flows::cached_key(state), ctx.len());
        }
        return ALLOW;
    }
    // Listeners and DNS answers of a socket without storage matter only in a workload.
    let walked = match state {
        Some(_) => None,
        None => match governing_workload(&ctx) {
            Some(workload) => Some(workload),
            None => return ALLOW,
        },
    };
    if listening {
        mark_listener(state, full);
        return ALLOW;
    }
    let parsed = packet::parse(&ctx);
    if !parsed.valid {
        return ALLOW;
    }
    if let Some(state) = state.as_mut()
        && receiving_flow(state)
        && parsed.flow.src == state.cached_addr
        && (!parsed.flow.has_port || parsed.flow.src_port == state.cached_port)
    {
        flows::account_received(&flows::cached_key(state), ctx.len());
    }
    if parsed.flow.has_port && parsed.flow.src_port == dns::DNS_PORT {
        let workload = match (state, walked) {
            (Some(state), _) => socket_workload(state, &settings(), |level| {
                // SAFETY: skb is the context.
                unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }
            }),
            (None, Some(workload)) => workload,
            (None, None) => return ALLOW,
        };
        if workload_config(workload).is_some() {
            dns::handle_answer(&ctx, &parsed, full.cast::<c_void>(), workload);
        }
    }
    ALLOW
}

/// Marks a listening socket inbound when a connection request reaches it. Socket storage is
/// cloned into each socket the listener accepts (`SOCKET_STATE` has `BPF_F_CLONE`), so every
/// accepted connection is inbound from its first packet, and no program runs per connection
/// for it.
#[inline(always)]
fn mark_listener(state: Option<&mut SocketState>, listener: *mut bpf_sock) {
    if let Some(state) = state
        && state.flags & SOCKET_FLAG_INBOUND != 0
    {
        return;
    }
    // SAFETY: a full socket, which cgroup_skb may pass to bpf_sk_storage_get.
    match unsafe { socket_state(listener.cast::<c_void>()) } {
        Some(state) => state.flags |= SOCKET_FLAG_INBOUND,
        None => count(COUNTER_STORAGE_FAILURES),
    }
}

/// Whether a TCP socket without storage is the accepted side of a connection: a listener
/// owns its local address and port. Such sockets were accepted before this storage map
/// existed (before egressd started, or before an upgrade to a new map layout), so no
/// listener mark reached them; their packets are replies. Sockets created while egressd
/// runs always have storage, so this guess is never made for them.
///
/// # Safety
/// `sk` must be a full socket from the program's context.
#[inline(always)]
unsafe fn accepted_before_storage(ctx: &SkBuffContext, sk: *mut bpf_sock) -> bool {
    // SAFETY: the caller vouches for sk; each read is one whole field of the context.
    let (family, state, src_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).state),
            core::ptr::read_volatile(&raw const (*sk).src_port),
        )
    };
    if state == TCP_LISTEN {
        return false;
    }
    // Peer port 0 matches no established socket, so only a listener can be found.
    let local_port = (src_port as u16).to_be();
    let mut tuple = core::mem::MaybeUninit::<bpf_sock_tuple>::uninit();
    let tuple_ptr = tuple.as_mut_ptr();
    let size = if family == packet::AF_INET {
        // SAFETY: as above; the v4 half of the tuple is written whole.
        unsafe {
            let v4 = &raw mut (*tuple_ptr).__bindgen_anon_1.ipv4;
            (*v4).saddr = core::ptr::read_volatile(&raw const (*sk).dst_ip4);
            (*v4).daddr = core::ptr::read_volatile(&raw const (*sk).src_ip4);
            (*v4).sport = 0;
            (*v4).dport = local_port;
            core::mem::size_of_val(&*v4)
        }
    } else {
        // SAFETY: as above; the v6 half of the tuple is written whole.
        unsafe {
            let v6 = &raw mut (*tuple_ptr).__bindgen_anon_1.ipv6;
            // Constant indices: the verifier forbids arithmetic on socket pointers.
            (*v6).saddr = [
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ];
            (*v6).daddr = [
                core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
            ];
            (*v6).sport = 0;
            (*v6).dport = local_port;
            core::mem::size_of_val(&*v6)
        }
    };
    // SAFETY: the tuple's first `size` bytes are initialised; the returned socket is
    // released before returning.
    unsafe {
        let listener = bpf_sk_lookup_tcp(
            ctx.skb.skb.cast::<c_void>(),
            tuple_ptr,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if listener.is_null() {
            return false;
        }
        bpf_sk_release(listener.cast::<c_void>());
    }
    true
}

/// Whether the socket's cached verdict is an allowed outbound flow of a workload.
#[inline(always)]
fn receiving_flow(state: &SocketState) -> bool {
    state.flags & SOCKET_FLAG_CACHED != 0
        && state.flags & SOCKET_FLAG_INBOUND == 0
        && state.workload != NO_WORKLOAD
        && state.cached_verdict != VERDICT_DENY
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
