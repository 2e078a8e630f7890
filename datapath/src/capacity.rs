//! How many entries each kernel map with a fixed capacity holds: read from the kernel after
//! loading (a pinned map keeps the size it was created with), and lowered at load for tests
//! that fill a map with a handful of entries instead of a quarter of a million.

use std::collections::BTreeMap;

use aya::maps::Map;
use egressd_common::dns::{MAX_FQDN_ADDRESSES, MAX_FQDN_ENTRIES, MAX_RESOLVERS};
use egressd_common::flow::MAX_FLOWS;
use egressd_common::policy::{MAX_ALLOW_ENTRIES, MAX_DENY_ENTRIES, MAX_WORKLOAD_CGROUPS};

use crate::DatapathError;

/// A map whose capacity can be lowered: the name `egressctl status` and the metrics use,
/// the map's name in the eBPF object, and the capacity the object declares.
struct Resizable {
    name: &'static str,
    kernel_name: &'static str,
    declared: u32,
}

const RESIZABLE: [Resizable; 6] = [
    Resizable {
        name: "allow",
        kernel_name: "ALLOW",
        declared: MAX_ALLOW_ENTRIES,
    },
    Resizable {
        name: "deny",
        kernel_name: "DENY",
        declared: MAX_DENY_ENTRIES,
    },
    Resizable {
        name: "workload_cgroups",
        kernel_name: "WORKLOAD_CGROUPS",
        declared: MAX_WORKLOAD_CGROUPS,
    },
    Resizable {
        name: "fqdn",
        kernel_name: "FQDN",
        declared: MAX_FQDN_ENTRIES,
    },
    Resizable {
        name: "fqdn_addresses",
        kernel_name: "FQDN_ADDRESSES",
        declared: MAX_FQDN_ADDRESSES,
    },
    Resizable {
        name: "flows",
        kernel_name: "FLOWS",
        declared: MAX_FLOWS,
    },
];

/// Smaller capacities for some maps, applied when the maps are created (a pinned map that
/// is adopted keeps its size). For tests: a full map is then a few entries away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapCapacities {
    /// Kernel map name → capacity.
    lowered: BTreeMap<&'static str, u32>,
}

impl MapCapacities {
    /// Lowers the capacity of `map` (a name as `egressctl status` shows it: allow, deny,
    /// workload_cgroups, fqdn, fqdn_addresses, flows) to `entries`, at least 1 and at most
    /// what the eBPF object declares.
    pub fn lower(&mut self, map: &str, entries: u32) -> Result<(), DatapathError> {
        let Some(resizable) = RESIZABLE.iter().find(|r| r.name == map) else {
            return Err(DatapathError::Capacity {
                map: map.to_owned(),
                problem: format!(
                    "no such map; these can be lowered: {}",
                    RESIZABLE.map(|r| r.name).join(", ")
                ),
            });
        };
        if entries == 0 || entries > resizable.declared {
            return Err(DatapathError::Capacity {
                map: map.to_owned(),
                problem: format!("{entries} is outside 1..={}", resizable.declared),
            });
        }
        self.lowered.insert(resizable.kernel_name, entries);
        Ok(())
    }

    /// `MAP=ENTRIES`, as `egressd --test-map-capacity` takes it.
    pub fn lower_from_spec(&mut self, spec: &str) -> Result<(), DatapathError> {
        let invalid = || DatapathError::Capacity {
            map: spec.to_owned(),
            problem: "expected MAP=ENTRIES, e.g. fqdn_addresses=16".to_owned(),
        };
        let (map, entries) = spec.split_once('=').ok_or_else(invalid)?;
        let entries = entries.trim().parse::<u32>().map_err(|_| invalid())?;
        self.lower(map.trim(), entries)
    }

    pub fn is_empty(&self) -> bool {
        self.lowered.is_empty()
    }

    pub(crate) fn apply(&self, loader: &mut aya::EbpfLoader<'_>) {
        for (&kernel_name, &entries) in &self.lowered {
            loader.map_max_entries(kernel_name, entries);
        }
    }
}

/// The capacity of each map that can fill, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacities {
    pub allow: u32,
    pub deny: u32,
    pub workload_cgroups: u32,
    pub fqdn: u32,
    pub fqdn_addresses: u32,
    pub resolvers: u32,
    pub flows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            allow: MAX_ALLOW_ENTRIES,
            deny: MAX_DENY_ENTRIES,
            workload_cgroups: MAX_WORKLOAD_CGROUPS,
            fqdn: MAX_FQDN_ENTRIES,
            fqdn_addresses: MAX_FQDN_ADDRESSES,
            resolvers: MAX_RESOLVERS,
            flows: MAX_FLOWS,
        }
    }
}

/// `max_entries` of a hash or LPM map as the kernel holds it; `declared` when the kernel
/// cannot say (it always can for maps it created).
pub(crate) fn of(map: &Map, declared: u32) -> u32 {
    let data = match map {
        Map::HashMap(data) | Map::LpmTrie(data) | Map::LruHashMap(data) => data,
        _ => return declared,
    };
    data.info()
        .map(|info| info.max_entries())
        .unwrap_or(declared)
}

/// Whether a failed map update means the map is full: hash maps say E2BIG, LPM tries
/// ENOSPC.
pub(crate) fn is_full(error: &aya::maps::MapError) -> bool {
    matches!(
        error,
        aya::maps::MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_maps_can_be_lowered_and_only_within_their_size() {
        let mut capacities = MapCapacities::default();
        capacities.lower("fqdn_addresses", 16).expect("lowered");
        capacities
            .lower_from_spec("allow=32")
            .expect("lowered from a spec");
        assert_eq!(capacities.lowered.get("FQDN_ADDRESSES"), Some(&16));
        assert_eq!(capacities.lowered.get("ALLOW"), Some(&32));
        let error = capacities.lower("workloads", 3).expect_err("an array");
        assert!(
            error.to_string().contains("these can be lowered"),
            "{error}"
        );
        let error = capacities.lower("deny", 0).expect_err("zero");
        assert!(error.to_string().contains("outside 1..=4096"), "{error}");
        let error = capacities
            .lower("deny", MAX_DENY_ENTRIES + 1)
            .expect_err("larger");
        assert!(error.to_string().contains("outside"), "{error}");
        let error = capacities.lower_from_spec("allow").expect_err("no =");
        assert!(error.to_string().contains("MAP=ENTRIES"), "{error}");
    }
}
