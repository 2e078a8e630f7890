//! DNS in the kernel: remembering the queries workloads send to resolvers, and turning the
//! answers to them into allowed addresses before the answer reaches the socket, so the first
//! connect after a lookup never races the daemon.
//!
//! Only answers from a resolver of `dns.resolvers` that match a query the same socket sent
//! (transaction id, question name, resolver) count. The daemon parses every such answer fully
//! and owns expiry; the kernel only ever adds.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_ktime_get_ns, bpf_sk_storage_get, bpf_skb_cgroup_id},
    macros::{btf_map, map},
    maps::{HashMap, PerCpuArray, ProgramArray},
    programs::SkBuffContext,
};
use egressd_common::{
    Addr,
    dns::{
        FQDN_EXACT, FQDN_SEARCH_EXACT, FQDN_SEARCH_WILDCARD, FQDN_WILDCARD, FqdnKey, FqdnValue,
        MAX_ANSWER_RECORDS, MAX_FQDN_ADDRESSES, MAX_FQDN_ENTRIES, MAX_RESOLVERS, NAME_HASH_START,
        PENDING_QUERY_SLOTS, PendingQueries, PendingQuery, name_hash_step,
    },
    event::{
        COUNTER_DNS_ANSWERS, COUNTER_DNS_DROPS, COUNTER_DNS_QUERIES_REFUSED, COUNTER_DNS_REJECTED,
        COUNTER_FQDN_INSERT_FAILURES, COUNTER_FQDN_INSERTS, DNS_ANSWER_ENTRIES_UNCHANGED,
        DNS_ANSWER_HEADER_LEN, DNS_ANSWER_NAME_ALLOWED, DNS_ANSWER_TCP, DNS_PAYLOAD_MAX,
        DNS_QUERY_REFUSED, DNS_QUERY_WOULD_REFUSE, DnsAnswer,
    },
    policy::{
        ALLOW_FLAG_DYNAMIC, AllowKey, AllowValue, MAX_PORT_RULES, MODE_AUDIT, MODE_STRICT,
        WORKLOAD_FLAG_DNS_ALLOWLISTED, WorkloadConfig,
    },
    v4_mapped,
};

use crate::maps::DNS_ANSWERS;
use crate::packet::Parsed;
use crate::verdict::{IPPROTO_TCP, IPPROTO_UDP, count};

pub const DNS_PORT: u16 = 53;
const DNS_HEADER_LEN: usize = 12;
const NAME_BUFFER: usize = 256;
const MAX_LABELS: u32 = 128;
/// Waiting answer bytes that wake the daemon: about a hundred answers. The daemon parses a
/// batch in one go, on a CPU the workloads' lookups then wait for, so batches stay small: at
/// 20,000 answers/s on two cores the lookups' p99 was 1.7-1.8 ms with 32 KiB and 2.7 ms with
/// 128 KiB (an eighth of the ring, about 500 answers).
const DNS_WAKE_AT: u32 = 32 * 1024;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// Names (or wildcard suffixes) each workload may resolve, by hash.
#[map]
pub static FQDN: HashMap<FqdnKey, FqdnValue> = HashMap::with_max_entries(MAX_FQDN_ENTRIES, 0);

/// Addresses learned from answers for allowed names: `{workload, address}` → port rules.
/// Kept apart from the CIDR trie so that learning never rewrites an operator's rules.
#[map]
pub static FQDN_ADDRESSES: HashMap<AllowKey, AllowValue> =
    HashMap::with_max_entries(MAX_FQDN_ADDRESSES, 0);

/// The resolvers whose answers count (`dns.resolvers`).
#[map]
pub static RESOLVERS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_RESOLVERS, 0);

/// Per-socket queries awaiting their answer.
#[btf_map]
pub static DNS_QUERIES: SkStorage<PendingQueries> = SkStorage::new();

/// Per-CPU room for a name and the entry being built (the BPF stack is 512 bytes).
///
/// Results found inside loops are written here rather than kept in registers: the verifier
/// then sees one state per iteration instead of one per combination of outcomes.
#[repr(C)]
pub struct Scratch {
    name: [u8; NAME_BUFFER],
    /// Bit i set: byte i of `name` is a label length.
    label_starts: [u64; 4],
    /// The entry being written: the matched name's rules.
    value: AllowValue,
    exact_hash: u64,
    wildcard_hash: u64,
    found_exact: u32,
    found_wildcard: u32,
    /// The name may be asked about: a rule's name or a search-list expansion of one.
    question_allowed: u32,
    /// The FQDN key being looked up by a walk step: the steps run on a frame of their own,
    /// and egress has no stack left for one.
    lookup: FqdnKey,
    /// The answer record being read: its compressed owner name (2 bytes), then type, class,
    /// TTL and data length. Here rather than on the stack, for the same reason.
    record: [u8; 12],
    /// The answered address being allowed, as its `FQDN_ADDRESSES` key.
    answer_key: AllowKey,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room to build the DNS answer record sent to userspace.
#[map]
static ANSWER_SCRATCH: PerCpuArray<DnsAnswer> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the `dns_query` program, set by userspace after loading it.
#[map]
pub static DNS_QUERY_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Who created a socket: named in the event of a refused query (zero for answers).
#[derive(Clone, Copy)]
pub struct Creator {
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
}

impl Creator {
    pub const NONE: Creator = Creator {
        tgid: 0,
        tid: 0,
        comm: [0; 16],
    };
}

/// What egress does with a DNS query of a workload.
pub enum QueryCheck {
    /// `dns_queries = "any"`, or learning mode: remember it for its answer.
    None,
    /// Strict with `dns_queries = "allowlisted"`: its name decides (dns_query program).
    Names,
    /// Audit with it: the name is checked and reported; the query goes out in any case.
    Report,
}

#[inline(always)]
pub fn query_check(config: Option<WorkloadConfig>) -> QueryCheck {
    match config {
        Some(config) if config.flags & WORKLOAD_FLAG_DNS_ALLOWLISTED != 0 => match config.mode {
            MODE_STRICT => QueryCheck::Names,
            MODE_AUDIT => QueryCheck::Report,
            _ => QueryCheck::None,
        },
        _ => QueryCheck::None,
    }
}

#[inline(always)]
pub fn is_resolver(addr: &Addr) -> bool {
    RESOLVERS.get_ptr(addr).is_some()
}

/// Where the DNS message starts in a packet to or from port 53, if it carries one.
#[inline(always)]
fn message_offset(parsed: &Parsed) -> Option<usize> {
    if parsed.payload_offset == 0 {
        return None;
    }
    match parsed.flow.protocol {
        IPPROTO_UDP => Some(parsed.payload_offset),
        // DNS over TCP: a two-byte length, then the message (single-segment messages only).
        IPPROTO_TCP => Some(parsed.payload_offset + 2),
        _ => None,
    }
}

/// The name hash; whether the workload's FQDN entries match it is left in the scratch area.
///
/// A plain struct rather than an `Option`: LLVM may keep the undefined payload of a `None` in
/// a register and spill it, and the verifier refuses to read an unwritten register.
#[derive(Clone, Copy)]
struct NameMatch {
    /// Hash of the whole name.
    hash: u64,
    /// Bytes the name takes in wire form (including the final zero); 0: no name was read.
    wire_len: usize,
}

impl NameMatch {
    const NONE: NameMatch = NameMatch {
        hash: 0,
        wire_len: 0,
    };

    fn is_some(&self) -> bool {
        self.wire_len != 0
    }
}

/// Reads the uncompressed name at `offset` and hashes it (backward, see `egressd_common::dns`).
#[inline(always)]
fn read_name(ctx: &SkBuffContext, offset: usize, workload: u32) -> NameMatch {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return NameMatch::NONE;
    };
    // SAFETY: per-CPU scratch, this program is its only user on this CPU.
    let scratch = unsafe { &mut *scratch };
    let available = (ctx.len() as usize).saturating_sub(offset);
    let wanted = if available > NAME_BUFFER {
        NAME_BUFFER
    } else {
        available
    };
    if wanted == 0 {
        return NameMatch::NONE;
    }
    // A bound the verifier tracks: 1..=256.
    let wanted = wanted as u32;
    // SAFETY: reads a local.
    let wanted = unsafe { core::ptr::read_volatile(&wanted) };
    let wanted = (wanted.wrapping_sub(1) & (NAME_BUFFER as u32 - 1)) + 1;
    // SAFETY: the helper writes at most `wanted` <= 256 bytes into the scratch name buffer.
    let loaded = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_load_bytes(
            ctx.skb.skb.cast::<c_void>(),
            offset as u32,
            scratch.name.as_mut_ptr().cast::<c_void>(),
            wanted,
        )
    };
    if loaded != 0 {
        return NameMatch::NONE;
    }
    let available = wanted as usize;

    // Forward: find the label boundaries and the end. Volatile stores keep the clearing from
    // becoming a memset call.
    for word in 0..4 {
        // SAFETY: writes within the per-CPU scratch area.
        unsafe { core::ptr::write_volatile(&mut scratch.label_starts[word], 0) };
    }
    let mut walk = NameWalk {
        scratch,
        limit: available as u64,
        cursor: 0,
        found: 0,
        workload,
    };
    crate::loops::walk(MAX_LABELS, label_step, &mut walk);
    let end = walk.found;
    if end == 0 {
        return NameMatch::NONE;
    }

    // Backward: the hash of each suffix is ready at the label length before it.
    // SAFETY: per-CPU scratch, this program is its only user on this CPU.
    let scratch = unsafe { &mut *walk.scratch };
    scratch.found_exact = 0;
    scratch.found_wildcard = 0;
    scratch.question_allowed = 0;
    walk.limit = end;
    walk.cursor = NAME_HASH_START;
    walk.found = 0;
    crate::loops::walk(NAME_BUFFER as u32, suffix_step, &mut walk);
    if walk.found == 0 {
        return NameMatch::NONE;
    }
    NameMatch {
        hash: walk.cursor,
        wire_len: end as usize + 1,
    }
}

/// The context of [`read_name`]'s two walks: one struct for both, as egress has little stack
/// to spare. Plain integers, no Option: LLVM may carry an Option's undefined payload in a
/// register, which the verifier refuses to read ("!read_ok").
#[repr(C)]
struct NameWalk {
    scratch: *mut Scratch,
    /// Forward: how many bytes of the name buffer hold packet data. Backward: the index of
    /// the name's final zero byte (step k hashes byte `limit - 1 - k`).
    limit: u64,
    /// Forward: where the next label length is. Backward: the hash so far.
    cursor: u64,
    /// Forward: the index of the final zero byte; 0 while not found (or for the root name,
    /// which no question we accept asks for). Backward: 1 once the whole name is hashed.
    found: u64,
    /// 0: hash only, look nothing up.
    workload: u32,
}

/// One label of the forward walk: marks where it starts; stops at the final zero byte.
extern "C" fn label_step(_index: u32, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the NameWalk read_name gave it.
    let walk = unsafe { &mut *context.cast::<NameWalk>() };
    // SAFETY: the per-CPU scratch area, valid for the program's run.
    let scratch = unsafe { &mut *walk.scratch };
    let pos = walk.cursor as usize;
    if pos >= walk.limit as usize {
        return 1;
    }
    let len = scratch.name[pos & (NAME_BUFFER - 1)];
    if len == 0 {
        walk.found = pos as u64;
        return 1;
    }
    if len > 63 {
        // A compression pointer or a reserved label type: not in a question we accept.
        return 1;
    }
    scratch.label_starts[(pos >> 6) & 3] |= 1u64 << (pos & 63);
    walk.cursor = (pos + usize::from(len) + 1) as u64;
    0
}

/// One byte of the backward walk, from the last: the hash of each suffix is complete at the
/// label length before it, where the workload's FQDN entries are looked up.
extern "C" fn suffix_step(step: u32, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the NameWalk read_name gave it.
    let walk = unsafe { &mut *context.cast::<NameWalk>() };
    // SAFETY: the per-CPU scratch area, valid for the program's run.
    let scratch = unsafe { &mut *walk.scratch };
    let step = step as usize;
    let end = walk.limit as usize;
    if step >= end {
        return 1;
    }
    // Derived from the step's index, which the verifier does not track, so the step converges.
    let index = (end - 1 - step) & (NAME_BUFFER - 1);
    let is_length = scratch.label_starts[(index >> 6) & 3] & (1u64 << (index & 63)) != 0;
    if !is_length {
        walk.cursor = name_hash_step(walk.cursor, scratch.name[index]);
        return 0;
    }
    // The hash now covers the suffix that starts after this length byte.
    let hash = walk.cursor;
    if walk.workload != 0 {
        scratch.lookup = FqdnKey {
            workload: walk.workload,
            reserved: 0,
            hash,
        };
        // A reference, not a copy: the copy would be on this step's stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let value = FQDN.get_ptr(&scratch.lookup);
        if let Some(value) = value {
            // SAFETY: map value pointer, read once.
            let flags = unsafe { (*value).flags };
            if index == 0 && flags & FQDN_EXACT != 0 {
                scratch.found_exact = 1;
                scratch.exact_hash = hash;
            }
            if index != 0 && flags & FQDN_WILDCARD != 0 {
                scratch.found_wildcard = 1;
                scratch.wildcard_hash = hash;
            }
            let asks = if index == 0 {
                FQDN_EXACT | FQDN_SEARCH_EXACT
            } else {
                FQDN_WILDCARD | FQDN_SEARCH_WILDCARD
            };
            if flags & asks != 0 {
                scratch.question_allowed = 1;
            }
        }
    }
    if index == 0 {
        walk.found = 1;
        return 1;
    }
    walk.cursor = name_hash_step(hash, b'.');
    0
}

/// Header fields we need: id, whether it is a response, question and answer counts.
#[inline(always)]
fn header(ctx: &SkBuffContext, offset: usize) -> Option<(u16, bool, u16, u16)> {
    let header = ctx.load::<[u8; DNS_HEADER_LEN]>(offset).ok()?;
    let id = u16::from_be_bytes([header[0], header[1]]);
    let is_response = header[2] & 0x80 != 0;
    let questions = u16::from_be_bytes([header[4], header[5]]);
    let answers = u16::from_be_bytes([header[6], header[7]]);
    Some((id, is_response, questions, answers))
}

/// Egress: remembers a query a socket sends to a resolver.
#[inline(always)]
pub fn record_query(ctx: &SkBuffContext, parsed: &Parsed, sk: *mut c_void) {
    if parsed.flow.dst_port != DNS_PORT || !is_resolver(&parsed.flow.dst) {
        return;
    }
    let Some(offset) = message_offset(parsed) else {
        return;
    };
    let Some((id, is_response, questions, _)) = header(ctx, offset) else {
        return;
    };
    if is_response || questions != 1 {
        return;
    }
    let name = read_name(ctx, offset + DNS_HEADER_LEN, 0);
    if !name.is_some() {
        return;
    }
    remember_query(sk, name.hash, &parsed.flow.dst, id);
}

/// Puts a query in the socket's pending slots, for its answer to be matched against.
#[inline(always)]
fn remember_query(sk: *mut c_void, name_hash: u64, resolver: &Addr, id: u16) {
    let map = (&raw const DNS_QUERIES).cast_mut().cast::<c_void>();
    // SAFETY: our SK_STORAGE map and a full socket from the context.
    let pending = unsafe {
        bpf_sk_storage_get(
            map,
            sk,
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<PendingQueries>();
    // SAFETY: NULL or a valid value owned by the socket.
    let Some(pending) = (unsafe { pending.as_mut() }) else {
        return;
    };
    let slot = (pending.next as usize) % PENDING_QUERY_SLOTS;
    pending.slots[slot] = PendingQuery {
        name_hash,
        resolver: *resolver,
        id,
        in_use: 1,
        reserved: 0,
        reserved2: 0,
    };
    pending.next = pending.next.wrapping_add(1);
}

/// The `dns_query` program's check. With `dns_queries = "allowlisted"` (strict or audit) a
/// question's name must match one of the workload's FQDN rules: otherwise it is reported to
/// userspace and, in strict mode, refused (returns true: drop the packet), so the
/// application's resolver fails at once instead of leaking the name. An allowed query is
/// remembered so that its answer can be validated.
#[inline(always)]
pub fn check_query(
    ctx: &SkBuffContext,
    parsed: &Parsed,
    sk: *mut c_void,
    workload: u32,
    strict: bool,
    creator: &Creator,
) -> bool {
    // Every destination on port 53, not only the resolvers: a name server the allowlist lets
    // the workload reach directly is as good a channel as a resolver.
    if parsed.flow.dst_port != DNS_PORT {
        return false;
    }
    let Some(offset) = message_offset(parsed) else {
        return false;
    };
    let Some((id, is_response, questions, _)) = header(ctx, offset) else {
        // Not even a DNS header: nothing to name, nothing a resolver could use.
        return strict;
    };
    if is_response {
        return false;
    }
    // Several questions, or one that cannot be read, cannot be matched: refused too.
    let name = if questions == 1 {
        read_name(ctx, offset + DNS_HEADER_LEN, workload)
    } else {
        NameMatch::NONE
    };
    let matched = match SCRATCH.get_ptr(0) {
        // SAFETY: per-CPU scratch written by read_name just now.
        Some(scratch) if name.is_some() => unsafe { (*scratch).question_allowed != 0 },
        _ => false,
    };
    if !matched {
        let flags = if strict {
            DNS_QUERY_REFUSED
        } else {
            DNS_QUERY_WOULD_REFUSE
        };
        forward(ctx, parsed, offset, workload, flags, 0, creator);
        if strict {
            count(COUNTER_DNS_QUERIES_REFUSED);
            return true;
        }
    }
    if name.is_some() && is_resolver(&parsed.flow.dst) {
        remember_query(sk, name.hash, &parsed.flow.dst, id);
    }
    false
}

/// Consumes the pending query this answer answers; false when there is none.
#[inline(always)]
fn take_pending(sk: *mut c_void, id: u16, name_hash: u64, resolver: &Addr) -> bool {
    let map = (&raw const DNS_QUERIES).cast_mut().cast::<c_void>();
    // SAFETY: our SK_STORAGE map and a full socket from the context.
    let pending =
        unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), 0) }.cast::<PendingQueries>();
    // SAFETY: NULL or a valid value owned by the socket.
    let Some(pending) = (unsafe { pending.as_mut() }) else {
        return false;
    };
    let mut i = 0;
    while i < PENDING_QUERY_SLOTS {
        let slot = &mut pending.slots[i];
        if slot.in_use != 0
            && slot.id == id
            && slot.name_hash == name_hash
            && slot.resolver == *resolver
        {
            slot.in_use = 0;
            return true;
        }
        i += 1;
    }
    false
}

/// Copies the matched name's rules (exact before wildcard) into the scratch area; false when
/// the name matches no rule of the workload.
#[inline(always)]
fn load_matched_rules(workload: u32) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch, this program is its only user on this CPU.
    let scratch = unsafe { &mut *scratch };
    let (hash, exact) = if scratch.found_exact != 0 {
        (scratch.exact_hash, true)
    } else if scratch.found_wildcard != 0 {
        (scratch.wildcard_hash, false)
    } else {
        return false;
    };
    let key = FqdnKey {
        workload,
        reserved: 0,
        hash,
    };
    let Some(entry) = FQDN.get_ptr(key) else {
        return false;
    };
    // SAFETY: map value pointer, copied at once.
    let entry = unsafe { &*entry };
    let value = &mut scratch.value;
    value.flags = ALLOW_FLAG_DYNAMIC;
    if exact {
        value.count = entry.exact_count;
        value.rules = entry.exact;
    } else {
        value.count = entry.wildcard_count;
        value.rules = entry.wildcard;
    }
    true
}

/// What [`allow_address`] did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Allowed {
    /// No room in the map.
    Failed,
    /// The entry held these rules already.
    Held,
    /// The entry was created or rules were added to it.
    Written,
}

/// Allows the address of `scratch.answer_key` with the rules `load_matched_rules` left in
/// `scratch.value`. Another name may already hold the address: its rules stay and these are
/// added (the daemon rewrites the entry with the exact union right after it parses the answer).
#[inline(always)]
fn allow_address(scratch: &mut Scratch) -> Allowed {
    let value = &scratch.value;
    let key = &scratch.answer_key;
    let Some(existing) = FQDN_ADDRESSES.get_ptr_mut(key) else {
        return match FQDN_ADDRESSES.insert(key, value, u64::from(BPF_NOEXIST)) {
            Ok(()) => Allowed::Written,
            Err(_) => Allowed::Failed,
        };
    };
    // SAFETY: map value pointer; a racing writer at worst loses an append, which the daemon's
    // rewrite restores.
    let existing = unsafe { &mut *existing };
    if existing.count > 0 && value.count > 0 && existing.rules[0] == value.rules[0] {
        return Allowed::Held;
    }
    let mut i = 0;
    while i < MAX_PORT_RULES {
        if i as u32 >= value.count || existing.count as usize >= MAX_PORT_RULES {
            break;
        }
        // SAFETY: reads a field we own; volatile + mask give the verifier a bound.
        let at =
            unsafe { core::ptr::read_volatile(&existing.count) } as usize & (MAX_PORT_RULES - 1);
        existing.rules[at] = value.rules[i];
        existing.count += 1;
        i += 1;
    }
    if i > 0 {
        Allowed::Written
    } else {
        Allowed::Held
    }
}

/// What [`allow_answers`] did: addresses allowed, and of those, entries created or changed.
struct AnswerAllowed {
    inserted: u32,
    written: u32,
}

/// Walks the answer records after the question and allows every A/AAAA address. Owner names
/// must be compressed (as resolvers send them); anything else stops the walk and is left to
/// the daemon, which parses the whole answer. A bpf_loop walk (see `loops`).
#[inline(always)]
fn allow_answers(ctx: &SkBuffContext, offset: usize, answers: u16, workload: u32) -> AnswerAllowed {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return AnswerAllowed {
            inserted: 0,
            written: 0,
        };
    };
    let mut walk = AnswerWalk {
        skb: ctx.skb.skb,
        scratch,
        offset: offset as u64,
        answers: u32::from(answers),
        workload,
        inserted: 0,
        written: 0,
    };
    crate::loops::walk(MAX_ANSWER_RECORDS, answer_step, &mut walk);
    AnswerAllowed {
        inserted: walk.inserted,
        written: walk.written,
    }
}

/// The context of [`allow_answers`]' walk.
#[repr(C)]
struct AnswerWalk {
    skb: *mut __sk_buff,
    scratch: *mut Scratch,
    /// Where the next record starts.
    offset: u64,
    answers: u32,
    workload: u32,
    inserted: u32,
    written: u32,
}

/// Copies `N` bytes of the packet at `offset` into `dst`; false if the packet is shorter.
#[inline(always)]
fn load_into<const N: usize>(skb: *mut __sk_buff, offset: usize, dst: &mut [u8; N]) -> bool {
    // SAFETY: the helper writes exactly N bytes into dst.
    unsafe {
        aya_ebpf::helpers::generated::bpf_skb_load_bytes(
            skb.cast::<c_void>(),
            offset as u32,
            dst.as_mut_ptr().cast::<c_void>(),
            N as u32,
        ) == 0
    }
}

/// One answer record: allows its address if it is an A or AAAA record; stops after the last
/// record or at one it cannot read.
extern "C" fn answer_step(record: u32, context: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the AnswerWalk allow_answers gave it.
    let walk = unsafe { &mut *context.cast::<AnswerWalk>() };
    if record >= walk.answers {
        return 1;
    }
    // SAFETY: the per-CPU scratch area, valid for the program's run.
    let scratch = unsafe { &mut *walk.scratch };
    let offset = walk.offset as usize;
    if !load_into(walk.skb, offset, &mut scratch.record) || scratch.record[0] & 0xc0 != 0xc0 {
        return 1;
    }
    let fixed = &scratch.record;
    let kind = u16::from_be_bytes([fixed[2], fixed[3]]);
    let length = usize::from(u16::from_be_bytes([fixed[10], fixed[11]]));
    let data = offset + 12;
    scratch.answer_key.workload_be = walk.workload.to_be_bytes();
    let addr = &mut scratch.answer_key.addr;
    let loaded = if kind == TYPE_A && length == 4 {
        // Straight into the mapped form's last four bytes, no copy on the stack: ingress's
        // frame leaves this step 48 of the 512 bytes its calls may use together.
        *addr = v4_mapped([0; 4]);
        addr.last_chunk_mut::<4>()
            .is_some_and(|octets| load_into(walk.skb, data, octets))
    } else if kind == TYPE_AAAA && length == 16 {
        load_into(walk.skb, data, addr)
    } else {
        false
    };
    if loaded {
        match allow_address(scratch) {
            Allowed::Failed => count(COUNTER_FQDN_INSERT_FAILURES),
            allowed => {
                count(COUNTER_FQDN_INSERTS);
                walk.inserted += 1;
                if allowed == Allowed::Written {
                    walk.written += 1;
                }
            }
        }
    }
    walk.offset = (data + length) as u64;
    0
}

/// Ingress: an answer from a resolver to a workload's socket.
#[inline(always)]
pub fn handle_answer(ctx: &SkBuffContext, parsed: &Parsed, sk: *mut c_void, workload: u32) {
    if parsed.flow.src_port != DNS_PORT || !is_resolver(&parsed.flow.src) {
        return;
    }
    let Some(offset) = message_offset(parsed) else {
        return;
    };
    let Some((id, is_response, questions, answers)) = header(ctx, offset) else {
        return;
    };
    if !is_response || questions != 1 {
        count(COUNTER_DNS_REJECTED);
        return;
    }
    let name = read_name(ctx, offset + DNS_HEADER_LEN, workload);
    if !name.is_some() {
        count(COUNTER_DNS_REJECTED);
        return;
    }
    if !take_pending(sk, id, name.hash, &parsed.flow.src) {
        // Unsolicited or spoofed: it grants nothing and is not passed on.
        count(COUNTER_DNS_REJECTED);
        return;
    }
    let allowed = load_matched_rules(workload);
    let done = if allowed {
        // Question: name, type, class.
        allow_answers(
            ctx,
            offset + DNS_HEADER_LEN + name.wire_len + 4,
            answers,
            workload,
        )
    } else {
        AnswerAllowed {
            inserted: 0,
            written: 0,
        }
    };
    let mut flags = if allowed { DNS_ANSWER_NAME_ALLOWED } else { 0 };
    if parsed.flow.protocol == IPPROTO_TCP {
        flags |= DNS_ANSWER_TCP;
    }
    if done.written == 0 {
        flags |= DNS_ANSWER_ENTRIES_UNCHANGED;
    }
    forward(
        ctx,
        parsed,
        offset,
        workload,
        flags,
        done.inserted,
        &Creator::NONE,
    );
}

/// Hands the answer to the daemon, which parses it fully and owns expiry.
#[inline(always)]
fn forward(
    ctx: &SkBuffContext,
    parsed: &Parsed,
    offset: usize,
    workload: u32,
    flags: u16,
    inserted: u32,
    creator: &Creator,
) {
    let message_len = (ctx.len() as usize).saturating_sub(offset);
    let copy_len = if message_len > DNS_PAYLOAD_MAX {
        DNS_PAYLOAD_MAX
    } else {
        message_len
    };
    if copy_len == 0 {
        return;
    }
    // A bound the verifier tracks: 1..=DNS_PAYLOAD_MAX (the volatile read keeps LLVM from
    // folding it).
    let copy_len = copy_len as u32;
    // SAFETY: reads a local.
    let copy_len = unsafe { core::ptr::read_volatile(&copy_len) };
    let copy_len = (copy_len.wrapping_sub(1) & (DNS_PAYLOAD_MAX as u32 - 1)) + 1;
    // Built in per-CPU scratch and copied out cut after the payload: a reservation has a
    // fixed size, which would be the whole 2 KiB payload for every answer.
    let Some(answer) = ANSWER_SCRATCH.get_ptr_mut(0) else {
        count(COUNTER_DNS_DROPS);
        return;
    };
    let skb = ctx.skb.skb;
    // SAFETY: answer is per-CPU scratch of a whole DnsAnswer; the helper writes at most
    // copy_len <= DNS_PAYLOAD_MAX bytes into its payload.
    let loaded = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_load_bytes(
            skb.cast::<c_void>(),
            offset as u32,
            (*answer).payload.as_mut_ptr().cast::<c_void>(),
            copy_len,
        )
    };
    if loaded != 0 {
        count(COUNTER_DNS_DROPS);
        return;
    }
    // SAFETY: plain writes into the per-CPU scratch answer.
    unsafe {
        (*answer).timestamp_ns = bpf_ktime_get_ns();
        (*answer).cgroup_id = bpf_skb_cgroup_id(skb);
        (*answer).workload = workload;
        (*answer).payload_len = copy_len;
        (*answer).message_len = message_len as u32;
        // Answers come from the server; refused queries go to it.
        let outbound = flags & (DNS_QUERY_REFUSED | DNS_QUERY_WOULD_REFUSE) != 0;
        let (server, client) = if outbound {
            (&parsed.flow.dst, &parsed.flow.src)
        } else {
            (&parsed.flow.src, &parsed.flow.dst)
        };
        let (server_port, client_port) = if outbound {
            (parsed.flow.dst_port, parsed.flow.src_port)
        } else {
            (parsed.flow.src_port, parsed.flow.dst_port)
        };
        (*answer).server_port = server_port;
        (*answer).client_port = client_port;
        (*answer).server_addr = *server;
        (*answer).client_addr = *client;
        (*answer).family = parsed.flow.family;
        (*answer).protocol = parsed.flow.protocol;
        (*answer).flags = flags;
        (*answer).inserted = inserted;
        (*answer).tgid = creator.tgid;
        (*answer).tid = creator.tid;
        (*answer).comm = creator.comm;
    }
    // SAFETY: the scratch answer is DNS_ANSWER_HEADER_LEN + DNS_PAYLOAD_MAX bytes and
    // copy_len <= DNS_PAYLOAD_MAX.
    let record = unsafe {
        core::slice::from_raw_parts(
            answer.cast::<u8>(),
            DNS_ANSWER_HEADER_LEN + copy_len as usize,
        )
    };
    let wakeup = crate::verdict::ring_wakeup(&DNS_ANSWERS, DNS_WAKE_AT);
    if DNS_ANSWERS.output::<[u8]>(record, wakeup).is_ok() {
        count(COUNTER_DNS_ANSWERS);
    } else {
        count(COUNTER_DNS_DROPS);
    }
}
