//! Every map the programs use. Userspace (`egressd-datapath`) takes each by its name.

use aya_ebpf::{
    btf_maps::SkStorage,
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

/// Per-socket workload, creator and cached verdict.
#[btf_map]
pub static SOCKET_STATE: SkStorage<SocketState> = SkStorage::new();
