//! Every map the programs use. Userspace (`egressd-datapath`) takes each by its name.

use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use egressd_common::{
    event::{
        COUNTERS_LEN, DECISION_COUNTERS_PER_WORKLOAD, DNS_RING_BUFFER_BYTES, RING_BUFFER_BYTES,
    },
    policy::{
        AllowKey, AllowValue, DenyKey, MAX_ALLOW_ENTRIES, MAX_DENY_ENTRIES, MAX_WORKLOAD_CGROUPS,
        MAX_WORKLOADS, Settings, WorkloadConfig,
    },
    socket::SocketState,
};

/// Cgroup id (kernfs inode) of a workload's own cgroup → workload id.
#[map]
pub static WORKLOAD_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WORKLOAD_CGROUPS, 0);

/// Workload id → mode and flags: switching a mode is one write here.
#[map]
pub static WORKLOADS: Array<WorkloadConfig> = Array::with_max_entries(MAX_WORKLOADS, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// `{workload, address}` prefixes → port rules, for all workloads in one trie.
#[map]
pub static ALLOW: LpmTrie<AllowKey, AllowValue> = LpmTrie::with_max_entries(MAX_ALLOW_ENTRIES, 0);

/// Prefixes denied for every workload (`defaults.deny`).
#[map]
pub static DENY: LpmTrie<DenyKey, u32> = LpmTrie::with_max_entries(MAX_DENY_ENTRIES, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// DNS answers for the control plane's FQDN rules.
#[map]
pub static DNS_ANSWERS: RingBuf = RingBuf::with_byte_size(DNS_RING_BUFFER_BYTES, 0);

/// Decisions per workload, protocol and verdict (see `decision_counter_index`).
#[map]
pub static DECISION_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_WORKLOADS * DECISION_COUNTERS_PER_WORKLOAD, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Per-socket workload, creator and cached verdict. Cloned into the sockets a listener
/// accepts, so that a listener marked inbound (on its first SYN) hands the mark to every
/// connection it accepts without another program running per connection.
#[btf_map]
pub static SOCKET_STATE: ClonedSkStorage<SocketState> = ClonedSkStorage::new();

/// A BTF map definition of socket-local storage with `BPF_F_CLONE` (aya-ebpf's `SkStorage`
/// fixes its flags to `BPF_F_NO_PREALLOC`). Only the loader reads the fields: each is a
/// pointer type whose array length or pointee encodes the map's type, key, value, size and
/// flags in BTF.
#[repr(C)]
pub struct ClonedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize | BPF_F_CLONE as usize],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced from Rust.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    pub const fn new() -> Self {
        ClonedSkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}
