//! What does not fit in the kernel's maps, and what `[limits] on_full` makes of it.
//!
//! Two maps fill at run time rather than from the policy file:
//!
//! - `fqdn_addresses`, the addresses learned from DNS answers. One that cannot be stored is
//!   not allowed by the kernel: under `on_full = "deny"` a strict workload's connection to it
//!   is refused (fail closed); under `"allow"` the workload runs as audit until every such
//!   address is stored or has expired (fail open for that workload alone, reported).
//! - `workload_cgroups`, the cgroups workloads' patterns match. One that is left out cannot
//!   be told apart from any cgroup in no workload, so its processes are treated as such
//!   (`defaults.unmatched`); `on_full` cannot change that, and it is reported.
//!
//! Every transition is logged once (not once per address), and the current state is in
//! `egressctl status` and the metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

use egressd_policy::{Mode, OnFull, Unmatched};
use egressd_proto::{LimitsStatus, MapOverflow};

/// Examples listed per overflow in `egressctl status`.
const EXAMPLES: usize = 5;
/// Learned addresses retried per check while some are not stored.
pub const RETRIES_PER_CHECK: usize = 256;

#[derive(Debug, Default)]
pub struct Limits {
    /// Learned addresses the DNS table allows that the kernel had no room for, with the time
    /// of the first failure.
    unstored: BTreeMap<(u32, IpAddr), SystemTime>,
    /// Since when each workload has had unstored addresses.
    unstored_since: BTreeMap<u32, SystemTime>,
    /// Cgroups left out of the cgroup table at the last update, per workload: since when,
    /// and their paths.
    cgroups_left_out: BTreeMap<u32, (SystemTime, BTreeSet<String>)>,
    /// Workloads the kernel runs as audit because of `on_full = "allow"`.
    passed: BTreeSet<u32>,
    fqdn_store_failures: u64,
    cgroup_store_failures: u64,
}

/// Counters for the metrics.
#[derive(Debug, Default, Clone)]
pub struct LimitsSnapshot {
    pub fqdn_store_failures: u64,
    pub cgroup_store_failures: u64,
    /// `(map, workload id, entries not stored)`.
    pub overflows: Vec<(&'static str, u32, u64)>,
    /// Workloads let through as audit by `on_full = "allow"`.
    pub passed: Vec<u32>,
}

impl Limits {
    /// The kernel had no room for `addr` of `workload`. Returns true for the first failure
    /// of this address (counted; retries are not).
    pub fn address_not_stored(&mut self, workload: u32, addr: IpAddr) -> bool {
        let now = SystemTime::now();
        if self.unstored.contains_key(&(workload, addr)) {
            return false;
        }
        self.unstored.insert((workload, addr), now);
        self.unstored_since.entry(workload).or_insert(now);
        self.fqdn_store_failures += 1;
        true
    }

    /// `addr` of `workload` is stored, or no longer allowed: nothing is missing for it.
    pub fn address_settled(&mut self, workload: u32, addr: IpAddr) {
        if self.unstored.remove(&(workload, addr)).is_some()
            && !self.unstored.keys().any(|&(w, _)| w == workload)
        {
            self.unstored_since.remove(&workload);
        }
    }

    /// Learned addresses to try storing again, oldest failure first, at most `limit`.
    pub fn unstored_addresses(&self, limit: usize) -> Vec<(u32, IpAddr)> {
        let mut keys: Vec<(SystemTime, (u32, IpAddr))> = self
            .unstored
            .iter()
            .map(|(&key, &since)| (since, key))
            .collect();
        keys.sort_unstable();
        keys.into_iter().take(limit).map(|(_, key)| key).collect()
    }

    pub fn has_unstored(&self, workload: u32) -> bool {
        self.unstored_since.contains_key(&workload)
    }

    fn unstored_of(&self, workload: u32) -> impl Iterator<Item = IpAddr> + '_ {
        self.unstored
            .keys()
            .filter(move |&&(w, _)| w == workload)
            .map(|&(_, addr)| addr)
    }

    /// Forgets workloads that no longer exist (a reload removed them).
    pub fn retain_workloads(&mut self, ids: &BTreeSet<u32>) {
        self.unstored.retain(|(w, _), _| ids.contains(w));
        self.unstored_since.retain(|w, _| ids.contains(w));
        self.cgroups_left_out.retain(|w, _| ids.contains(w));
        self.passed.retain(|w| ids.contains(w));
    }

    /// The mode the kernel should enforce for a workload whose mode is `mode`.
    pub fn kernel_mode(&self, on_full: OnFull, mode: Mode, workload: u32) -> Mode {
        if on_full == OnFull::Allow && mode == Mode::Strict && self.has_unstored(workload) {
            Mode::Audit
        } else {
            mode
        }
    }

    /// Records which workloads the kernel now runs as audit because of `on_full`, and
    /// returns those that changed: `(workload, now passed)`.
    pub fn set_passed(&mut self, passed: BTreeSet<u32>) -> Vec<(u32, bool)> {
        let mut changed: Vec<(u32, bool)> = passed
            .difference(&self.passed)
            .map(|&w| (w, true))
            .collect();
        changed.extend(self.passed.difference(&passed).map(|&w| (w, false)));
        self.passed = passed;
        changed
    }

    /// Nothing is missing and no workload is let through: `on_full` has nothing to do.
    pub fn is_quiet(&self) -> bool {
        self.unstored.is_empty() && self.passed.is_empty()
    }

    pub fn is_passed(&self, workload: u32) -> bool {
        self.passed.contains(&workload)
    }

    pub fn unstored_count(&self, workload: u32) -> usize {
        self.unstored_of(workload).count()
    }

    /// The cgroups the last update of the cgroup table left out (`(workload, path)`).
    /// Returns, per workload whose state changed, how many are left out now (0: all fit
    /// again).
    pub fn set_cgroups_left_out(&mut self, left_out: &[(u32, String)]) -> Vec<(u32, usize)> {
        let mut now: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for (workload, path) in left_out {
            now.entry(*workload).or_default().insert(path.clone());
        }
        let mut changed = Vec::new();
        for (workload, (_, paths)) in &self.cgroups_left_out {
            if !now.contains_key(workload) {
                changed.push((*workload, 0));
            } else if now.get(workload) != Some(paths) {
                changed.push((*workload, now.get(workload).map_or(0, BTreeSet::len)));
            }
        }
        let stamp = SystemTime::now();
        let mut next = BTreeMap::new();
        for (workload, paths) in now {
            let (since, old) = self
                .cgroups_left_out
                .remove(&workload)
                .unwrap_or((stamp, BTreeSet::new()));
            let new = paths.difference(&old).count();
            self.cgroup_store_failures += new as u64;
            if old.is_empty() {
                changed.push((workload, paths.len()));
            }
            next.insert(workload, (since, paths));
        }
        self.cgroups_left_out = next;
        changed
    }

    pub fn snapshot(&self) -> LimitsSnapshot {
        let mut overflows: Vec<(&'static str, u32, u64)> = self
            .unstored_since
            .keys()
            .map(|&w| ("fqdn_addresses", w, self.unstored_count(w) as u64))
            .collect();
        overflows.extend(
            self.cgroups_left_out
                .iter()
                .map(|(&w, (_, paths))| ("workload_cgroups", w, paths.len() as u64)),
        );
        LimitsSnapshot {
            fqdn_store_failures: self.fqdn_store_failures,
            cgroup_store_failures: self.cgroup_store_failures,
            overflows,
            passed: self.passed.iter().copied().collect(),
        }
    }

    /// The status report's view. `name` names workload ids; `unmatched` and `host` say what
    /// happens to processes of left-out cgroups.
    pub fn status(
        &self,
        on_full: OnFull,
        capacities: &Capacities,
        mode_of: impl Fn(u32) -> Option<Mode>,
        name: impl Fn(u32) -> Option<String>,
        unmatched: Unmatched,
    ) -> LimitsStatus {
        let mut overflows = Vec::new();
        for (&workload, &since) in &self.unstored_since {
            let mode = mode_of(workload);
            let effect = match (on_full, mode) {
                (_, Some(Mode::Learning)) => "nothing is refused (learning mode)".to_owned(),
                (OnFull::Allow, Some(Mode::Strict)) if self.passed.contains(&workload) => {
                    "the workload runs as audit until they are stored or expire: what strict \
                     mode would refuse passes and is reported as would_deny \
                     ([limits] on_full = \"allow\")"
                        .to_owned()
                }
                (_, Some(Mode::Audit)) => {
                    "connections to them are reported as would_deny (audit mode)".to_owned()
                }
                _ => "connections to them are refused until they are stored (they are retried \
                      as the map frees up) ([limits] on_full = \"deny\")"
                    .to_owned(),
            };
            let mut examples: Vec<String> =
                self.unstored_of(workload).map(|a| a.to_string()).collect();
            examples.truncate(EXAMPLES);
            overflows.push(MapOverflow {
                map: "fqdn_addresses".to_owned(),
                capacity: u64::from(capacities.fqdn_addresses),
                workload: name(workload).unwrap_or_else(|| workload.to_string()),
                entries: self.unstored_count(workload) as u64,
                since: crate::engine::rfc3339(since),
                effect,
                examples,
            });
        }
        for (&workload, (since, paths)) in &self.cgroups_left_out {
            let effect = match unmatched {
                Unmatched::Apply => format!(
                    "their processes are governed as the workload \"{}\" \
                     (defaults.unmatched = \"apply\"), not as this one",
                    egressd_policy::HOST_WORKLOAD
                ),
                Unmatched::Allow => "their processes are NOT governed: they count as in no \
                                     workload (defaults.unmatched = \"allow\"); on_full cannot \
                                     change that"
                    .to_owned(),
            };
            overflows.push(MapOverflow {
                map: "workload_cgroups".to_owned(),
                capacity: u64::from(capacities.workload_cgroups),
                workload: name(workload).unwrap_or_else(|| workload.to_string()),
                entries: paths.len() as u64,
                since: crate::engine::rfc3339(*since),
                effect,
                examples: paths.iter().take(EXAMPLES).cloned().collect(),
            });
        }
        LimitsStatus {
            on_full: on_full.as_str().to_owned(),
            overflows,
            fqdn_store_failures: self.fqdn_store_failures,
            cgroup_store_failures: self.cgroup_store_failures,
        }
    }
}

/// Capacities of the maps that fill at run time.
#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    pub fqdn_addresses: u32,
    pub workload_cgroups: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn unstored_addresses_are_counted_once_and_settle() {
        let mut limits = Limits::default();
        assert!(limits.address_not_stored(1, addr(1)));
        assert!(!limits.address_not_stored(1, addr(1)), "a retry");
        assert!(limits.address_not_stored(1, addr(2)));
        assert!(limits.has_unstored(1));
        assert!(!limits.has_unstored(2));
        assert_eq!(limits.unstored_addresses(10).len(), 2);
        assert_eq!(limits.unstored_addresses(1).len(), 1);
        limits.address_settled(1, addr(1));
        assert!(limits.has_unstored(1));
        limits.address_settled(1, addr(2));
        assert!(!limits.has_unstored(1));
        assert_eq!(limits.snapshot().fqdn_store_failures, 2);
        assert!(limits.snapshot().overflows.is_empty());
    }

    #[test]
    fn on_full_allow_lets_a_strict_workload_through_only_while_it_misses_addresses() {
        let mut limits = Limits::default();
        assert_eq!(
            limits.kernel_mode(OnFull::Allow, Mode::Strict, 1),
            Mode::Strict
        );
        limits.address_not_stored(1, addr(1));
        assert_eq!(
            limits.kernel_mode(OnFull::Allow, Mode::Strict, 1),
            Mode::Audit
        );
        assert_eq!(
            limits.kernel_mode(OnFull::Deny, Mode::Strict, 1),
            Mode::Strict
        );
        assert_eq!(
            limits.kernel_mode(OnFull::Allow, Mode::Learning, 1),
            Mode::Learning
        );
        assert_eq!(
            limits.kernel_mode(OnFull::Allow, Mode::Strict, 2),
            Mode::Strict,
            "other workloads are not affected"
        );
        assert_eq!(limits.set_passed([1].into()), vec![(1, true)]);
        assert_eq!(limits.set_passed([1].into()), vec![]);
        assert_eq!(limits.set_passed(BTreeSet::new()), vec![(1, false)]);
    }

    #[test]
    fn left_out_cgroups_report_changes_and_count_new_ones() {
        let mut limits = Limits::default();
        let changed = limits.set_cgroups_left_out(&[(1, "a".into()), (1, "b".into())]);
        assert_eq!(changed, vec![(1, 2)]);
        assert_eq!(
            limits.set_cgroups_left_out(&[(1, "a".into()), (1, "b".into())]),
            vec![]
        );
        assert_eq!(
            limits.set_cgroups_left_out(&[(1, "b".into())]),
            vec![(1, 1)]
        );
        assert_eq!(limits.set_cgroups_left_out(&[]), vec![(1, 0)]);
        assert_eq!(limits.snapshot().cgroup_store_failures, 2);
        let status = limits.status(
            OnFull::Deny,
            &Capacities {
                fqdn_addresses: 4,
                workload_cgroups: 2,
            },
            |_| Some(Mode::Strict),
            |_| Some("w".into()),
            Unmatched::Allow,
        );
        assert!(status.overflows.is_empty());
        assert_eq!(status.on_full, "deny");
    }
}
