//! Reading the kernel's per-destination flow summaries (`FLOWS`).

use std::net::IpAddr;
use std::time::SystemTime;

use aya::maps::{HashMap, MapData};
use egressd_common::flow::FlowStats;
use egressd_common::socket::DestinationKey;

use crate::events::Clock;
use crate::{DatapathError, canonical_addr, map_err};

/// A task as the kernel saw it: ids, and the name it had (empty when the kernel could not
/// read it, as for data packets: read `/proc/<tgid>/task/<tid>/comm` then).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskRef {
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
}

/// Running totals of one workload's traffic to one destination, since the kernel created the
/// entry (`first_seen`); a later summary of the same destination with a different
/// `first_seen` is a new entry (the old one was evicted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSummary {
    pub workload: u32,
    /// IPv4-mapped addresses come back as IPv4.
    pub address: IpAddr,
    /// `None` for protocols without ports.
    pub port: Option<u16>,
    pub protocol: u8,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub allowed: u64,
    pub denied: u64,
    pub would_deny: u64,
    pub bytes_sent: u64,
    pub packets_sent: u64,
    pub bytes_received: u64,
    pub packets_received: u64,
    pub connect_task: Option<TaskRef>,
    pub send_task: Option<TaskRef>,
}

pub(crate) struct FlowTable {
    map: HashMap<MapData, DestinationKey, FlowStats>,
}

impl FlowTable {
    pub(crate) fn new(map: HashMap<MapData, DestinationKey, FlowStats>) -> Self {
        FlowTable { map }
    }

    /// Hands every summary the kernel holds now to `visit` and returns how many there were.
    /// Entries evicted or created during the walk may be missed or seen once; the next walk
    /// catches up. One summary at a time: a walk of a full table holds no copy of it.
    pub(crate) fn visit(
        &self,
        clock: &Clock,
        mut visit: impl FnMut(FlowSummary),
    ) -> Result<usize, DatapathError> {
        let mut walked = 0;
        for entry in self.map.iter() {
            let (key, stats) = match entry {
                Ok(entry) => entry,
                // Evicted between the key walk and the lookup.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err("FLOWS", "reading")(e)),
            };
            visit(summary(&key, &stats, clock));
            walked += 1;
        }
        Ok(walked)
    }
}

fn summary(key: &DestinationKey, stats: &FlowStats, clock: &Clock) -> FlowSummary {
    let has_ports = matches!(key.protocol, 6 | 17);
    FlowSummary {
        workload: key.workload,
        address: canonical_addr(key.addr),
        port: has_ports.then_some(key.port),
        protocol: key.protocol,
        first_seen: clock.wall(stats.first_seen_ns),
        last_seen: clock.wall(stats.last_seen_ns.max(stats.first_seen_ns)),
        allowed: stats.allowed,
        denied: stats.denied,
        would_deny: stats.would_deny,
        bytes_sent: stats.bytes_sent,
        packets_sent: stats.packets_sent,
        bytes_received: stats.bytes_received,
        packets_received: stats.packets_received,
        connect_task: task(stats.connect_tgid, stats.connect_tid, &stats.connect_comm),
        send_task: task(stats.send_tgid, stats.send_tid, &stats.send_comm),
    }
}

fn task(tgid: u32, tid: u32, comm: &[u8; 16]) -> Option<TaskRef> {
    (tid != 0).then(|| TaskRef {
        tgid,
        tid,
        comm: crate::events::comm_string(comm),
    })
}
