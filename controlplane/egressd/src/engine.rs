//! The daemon's state: the policy in force, workload ids, modes, and the datapath it drives.
//! Every change goes through here: compile first, then apply, and keep the last good state
//! when anything fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Instant, SystemTime};

use egressd_datapath::{
    CidrRule, Datapath, DatapathError, DatapathPolicy, DnsAnswer, FlowSummary, FqdnSpec,
    MAX_WORKLOAD_ID, WorkloadSpec,
};
use egressd_policy::{Destination, HOST_WORKLOAD, Mode, Policy, Unmatched, Workload};
use egressd_proto::{
    DatapathStatus, DnsAddress, DnsName, DnsReport, DnsStats, ModeSetting, ModeStatus,
    PolicyStatus, ReloadFailure, StatusReport, WorkloadStatus,
};

use crate::adoption::AdoptionCheck;
use crate::cgroups;
use crate::modes::ModeOverrides;

pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The implicit `host` workload used when `unmatched = "apply"` and the file defines none.
static IMPLICIT_HOST: LazyLock<Workload> = LazyLock::new(|| Workload {
    name: HOST_WORKLOAD.to_owned(),
    cgroup: None,
    mode: None,
    raw_sockets: false,
    dns_queries: egressd_policy::DnsQueries::Any,
    allow: Vec::new(),
    location: egressd_policy::Location { line: 0, column: 0 },
});

pub struct Engine {
    datapath: Datapath,
    /// Shared, so that installing it (and putting it back after a failed reload) needs no
    /// copy of every rule.
    policy: Arc<Policy>,
    policy_loaded_at: SystemTime,
    last_error: Option<ReloadFailure>,
    modes: ModeOverrides,
    /// Stable ids by workload name for the daemon's lifetime.
    ids: BTreeMap<String, u32>,
    /// Matched cgroup paths per workload id, from the last scan.
    cgroup_paths: BTreeMap<u32, Vec<String>>,
    config_path: PathBuf,
    started_at: SystemTime,
    reloads_succeeded: u64,
    reloads_failed: u64,
    /// Names → addresses learned from DNS answers (FQDN rules).
    dns: egressd_dns::FqdnTable,
    resolvers: Vec<IpAddr>,
    search_domains: Vec<String>,
    dns_parse_failures: u64,
    /// Learned addresses in the kernel the daemon did not adopt, at the last check.
    unadopted: BTreeSet<(u32, IpAddr)>,
    /// When to look for them again.
    adoption: AdoptionCheck,
    /// Workloads whose learned addresses are written again at the next expiry tick: an answer
    /// the daemon could not read whole may have added ports to them.
    rewrite_learned: BTreeSet<u32>,
    /// Learned addresses found in adopted (pinned) maps, whose answers this daemon never saw:
    /// kept until min_ttl + grace after the start, unless an answer renews them.
    inherited_addresses: BTreeMap<(u32, IpAddr), Instant>,
    /// `<state dir>/workload-ids.json`.
    ids_path: PathBuf,
    /// What does not fit in the kernel's maps, and what `[limits] on_full` made of it.
    limits: crate::limits::Limits,
}

impl Engine {
    pub fn new(
        datapath: Datapath,
        policy: Policy,
        modes: ModeOverrides,
        config_path: PathBuf,
        state_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let ids_path = crate::ids::path(state_dir);
        let mut engine = Engine {
            datapath,
            policy: Arc::new(policy),
            policy_loaded_at: SystemTime::now(),
            last_error: None,
            modes,
            ids: crate::ids::load(&ids_path),
            cgroup_paths: BTreeMap::new(),
            config_path,
            started_at: SystemTime::now(),
            reloads_succeeded: 0,
            reloads_failed: 0,
            dns: egressd_dns::FqdnTable::new(egressd_dns::TableSettings::default()),
            resolvers: Vec::new(),
            search_domains: Vec::new(),
            dns_parse_failures: 0,
            unadopted: BTreeSet::new(),
            adoption: AdoptionCheck::new(),
            rewrite_learned: BTreeSet::new(),
            inherited_addresses: BTreeMap::new(),
            ids_path,
            limits: crate::limits::Limits::default(),
        };
        let policy = Arc::clone(&engine.policy);
        engine.install(&policy)?;
        engine.sync_limit_modes();
        // Addresses learned by the previous daemon (same layout: adopted maps; another
        // layout: carried over) are held like answers just seen, until answers renew them.
        if engine.datapath.adopted() || engine.datapath.migrated_fqdn_addresses() > 0 {
            let hold = policy.dns.min_ttl + policy.dns.grace;
            let until = Instant::now() + hold;
            engine.inherited_addresses = engine
                .datapath
                .fqdn_addresses()
                .into_iter()
                .map(|key| (key, until))
                .collect();
            tracing::info!(
                learned_addresses = engine.inherited_addresses.len(),
                hold_secs = hold.as_secs(),
                "holding the addresses the previous egressd learned until answers renew them"
            );
        }
        Ok(engine)
    }

    /// Attaches the datapath's programs once they are loaded (the policy is in the maps by
    /// then: see `Datapath::begin_load`).
    pub fn attach(&mut self) -> anyhow::Result<()> {
        Ok(self.datapath.attach()?)
    }

    /// The kernel log of the programs, once they are loaded.
    pub fn take_kernel_log(&mut self) -> Option<egressd_datapath::KernelLog> {
        self.datapath.take_kernel_log()
    }

    /// Detaches the programs of the previous daemon, now that this one's policy is applied.
    pub fn retire_previous(&mut self) -> anyhow::Result<usize> {
        Ok(self.datapath.retire_previous()?)
    }

    /// What stopping the daemon does to enforcement (`[daemon] on_stop`).
    pub fn on_stop(&self) -> egressd_policy::OnStop {
        self.policy.daemon.on_stop
    }

    /// The workloads the datapath enforces, `host` included when it applies. Borrowed: this
    /// runs at every cgroup rescan and status request, and a copy of a 100,000-rule policy
    /// each time churned the heap.
    fn effective_workloads(policy: &Policy) -> Vec<&Workload> {
        let mut workloads: Vec<&Workload> = policy.workloads.iter().collect();
        if policy.defaults.unmatched == Unmatched::Apply && policy.workload(HOST_WORKLOAD).is_none()
        {
            workloads.push(&IMPLICIT_HOST);
        }
        workloads
    }

    /// Ids for `names`, keeping the ids of names seen before.
    fn assign_ids(&self, names: &[&str]) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut ids: BTreeMap<String, u32> = names
            .iter()
            .filter_map(|name| self.ids.get(*name).map(|&id| ((*name).to_owned(), id)))
            .collect();
        let mut used: std::collections::BTreeSet<u32> = ids.values().copied().collect();
        let mut next = 1;
        for name in names {
            if ids.contains_key(*name) {
                continue;
            }
            while used.contains(&next) || self.ids.values().any(|&id| id == next) {
                next += 1;
            }
            if next > MAX_WORKLOAD_ID {
                // The ids of the policy in force stay taken until the new one is installed.
                let new = names.iter().filter(|n| !self.ids.contains_key(**n)).count();
                anyhow::bail!(
                    "switching to the new policy needs {} workload ids at once ({} of the \
                     policy in force and {new} new ones), and the kernel's workloads map \
                     holds {MAX_WORKLOAD_ID}: reload in two steps, removing workloads first",
                    self.ids.len() + new,
                    self.ids.len()
                );
            }
            ids.insert((*name).to_owned(), next);
            used.insert(next);
        }
        Ok(ids)
    }

    /// The cgroups that the workloads' patterns match now.
    fn cgroup_table(&self, workloads: &[&Workload], ids: &BTreeMap<String, u32>) -> cgroups::Table {
        let patterns: Vec<(u32, &egressd_policy::CgroupPattern)> = workloads
            .iter()
            .filter_map(|w| Some((*ids.get(&w.name)?, w.cgroup.as_ref()?)))
            .collect();
        cgroups::table(self.datapath.cgroup_root(), &patterns)
    }

    /// The mode the kernel enforces for `workload` (id `id`) under `policy`: its mode, unless
    /// `[limits] on_full = "allow"` lets it through while its learned addresses do not fit.
    fn kernel_mode(&self, policy: &Policy, workload: &Workload, id: u32) -> Mode {
        let (mode, _) = self.modes.resolve(policy, workload);
        self.limits.kernel_mode(policy.limits.on_full, mode, id)
    }

    fn compile(
        &self,
        policy: &Policy,
        ids: &BTreeMap<String, u32>,
    ) -> (DatapathPolicy, BTreeMap<u32, Vec<String>>) {
        let workloads = Self::effective_workloads(policy);
        let (resolvers, dns_search_domains) = effective_dns(policy);
        let table = self.cgroup_table(&workloads, ids);
        let mut by_workload: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (&cgroup, &workload) in &table.kernel {
            by_workload.entry(workload).or_default().push(cgroup);
        }
        let specs = workloads
            .iter()
            .filter_map(|workload| {
                let id = *ids.get(&workload.name)?;
                Some(WorkloadSpec {
                    id,
                    name: workload.name.clone(),
                    mode: self.kernel_mode(policy, workload, id),
                    raw_sockets: workload.raw_sockets,
                    dns_allowlisted: workload.dns_queries
                        == egressd_policy::DnsQueries::Allowlisted,
                    cgroup_ids: by_workload.remove(&id).unwrap_or_default(),
                    rules: cidr_rules(workload),
                })
            })
            .collect();
        let unmatched = (policy.defaults.unmatched == Unmatched::Apply)
            .then(|| ids.get(HOST_WORKLOAD).copied())
            .flatten();
        (
            DatapathPolicy {
                workloads: specs,
                fqdn: fqdn_rules(&workloads, ids)
                    .into_iter()
                    .map(|rule| FqdnSpec {
                        workload: rule.workload,
                        name: if rule.pattern.is_wildcard() {
                            rule.pattern.suffix().to_owned()
                        } else {
                            rule.pattern.name().to_owned()
                        },
                        wildcard: rule.pattern.is_wildcard(),
                        ports: rule.ports,
                        protocol: rule.protocol,
                    })
                    .collect(),
                resolvers,
                dns_search_domains,
                deny: policy.defaults.deny.clone(),
                unmatched,
            },
            table.paths,
        )
    }

    fn install(&mut self, policy: &Policy) -> anyhow::Result<()> {
        let workloads = Self::effective_workloads(policy);
        let names: Vec<&str> = workloads.iter().map(|w| w.name.as_str()).collect();
        let ids = self.assign_ids(&names)?;
        let (compiled, cgroup_paths) = self.compile(policy, &ids);
        let stats = self.datapath.apply(&compiled)?;
        let workloads_with_ids = Self::effective_workloads(policy);
        let mut changed = self
            .dns
            .set_settings(egressd_dns::TableSettings::from(&policy.dns));
        changed.extend(self.dns.set_rules(fqdn_rules(&workloads_with_ids, &ids)));
        self.resolvers = compiled.resolvers.clone();
        self.search_domains = compiled.dns_search_domains.clone();
        self.store_addresses(&changed, false);
        tracing::info!(
            policy = %policy.source.path.display(),
            sha256 = %policy.source.sha256,
            workloads = compiled.workloads.len(),
            allow_entries = stats.allow_entries,
            written = stats.allow_written,
            removed = stats.allow_removed,
            cgroups = stats.cgroups,
            "policy applied"
        );
        if ids != self.ids
            && let Err(e) = crate::ids::save(&self.ids_path, &ids)
        {
            // Only a later adoption of the pinned maps needs them; that rewrites the policy.
            tracing::warn!(path = %self.ids_path.display(), "saving workload ids: {e}");
        }
        self.ids = ids;
        self.cgroup_paths = cgroup_paths;
        // Every cgroup of the policy found room (apply refuses a policy otherwise).
        self.note_cgroups_left_out(&[]);
        let live: BTreeSet<u32> = self.ids.values().copied().collect();
        self.limits.retain_workloads(&live);
        Ok(())
    }

    /// Logs what changed in the cgroups left out of the kernel's table.
    fn note_cgroups_left_out(&mut self, left_out: &[(u32, String)]) {
        let capacity = self.datapath.workload_cgroup_capacity();
        for (workload, count) in self.limits.set_cgroups_left_out(left_out) {
            let name = self
                .workload_name(workload)
                .unwrap_or_else(|| workload.to_string());
            if count == 0 {
                tracing::info!(
                    map = "workload_cgroups",
                    workload = %name,
                    "every cgroup of workload {name} is in the kernel's cgroup table again"
                );
            } else {
                tracing::error!(
                    map = "workload_cgroups",
                    capacity,
                    workload = %name,
                    cgroups = count,
                    unmatched = self.policy.defaults.unmatched.as_str(),
                    "the kernel's workload_cgroups map is full ({capacity} entries): {count} \
                     cgroups of workload {name} are left out and their processes count as in no \
                     workload (defaults.unmatched = \"{}\"); narrow the workloads' cgroup \
                     patterns",
                    self.policy.defaults.unmatched.as_str()
                );
            }
        }
    }

    /// Rewrites the kernel's entry of each learned address from the table (or removes it).
    /// An address the kernel has no room for is remembered, retried as the map frees up, and
    /// handled as `[limits] on_full` says. Returns whether the map was full.
    fn refresh_addresses(&mut self, keys: &[(u32, IpAddr)]) -> bool {
        self.refresh_addresses_after(keys, false)
    }

    /// [`Engine::refresh_addresses`] after an answer: `kernel_unchanged` as
    /// `Datapath::set_fqdn_address` takes it.
    fn refresh_addresses_after(&mut self, keys: &[(u32, IpAddr)], kernel_unchanged: bool) -> bool {
        let full = self.store_addresses(keys, kernel_unchanged);
        self.sync_limit_modes();
        full
    }

    /// [`Engine::refresh_addresses`] without updating the modes that `[limits] on_full`
    /// sets: for `install`, whose caller does that once the new policy is in force.
    fn store_addresses(&mut self, keys: &[(u32, IpAddr)], kernel_unchanged: bool) -> bool {
        let mut full = false;
        for &(workload, addr) in keys {
            let rules = self.dns.allowed_for(workload, addr);
            match self
                .datapath
                .set_fqdn_address(workload, addr, rules.as_deref(), kernel_unchanged)
            {
                Ok(()) => self.address_settled(workload, addr),
                Err(DatapathError::MapFull { capacity, .. }) => {
                    full = true;
                    self.address_not_stored(workload, addr, capacity);
                }
                Err(e) => {
                    tracing::error!(workload, address = %addr, "updating a learned address: {e}");
                }
            }
        }
        full
    }

    fn address_not_stored(&mut self, workload: u32, addr: IpAddr, capacity: u32) {
        let first_of_workload = !self.limits.has_unstored(workload);
        if !self.limits.address_not_stored(workload, addr) || !first_of_workload {
            return;
        }
        let name = self
            .workload_name(workload)
            .unwrap_or_else(|| workload.to_string());
        let on_full = self.policy.limits.on_full;
        tracing::error!(
            map = "fqdn_addresses",
            capacity,
            workload = %name,
            address = %addr,
            on_full = on_full.as_str(),
            "the kernel's fqdn_addresses map is full ({capacity} entries): learned addresses of \
             workload {name} cannot be stored ({addr} first); {}",
            match on_full {
                egressd_policy::OnFull::Deny =>
                    "connections to them are refused until they fit ([limits] on_full = \"deny\")",
                egressd_policy::OnFull::Allow =>
                    "a strict workload runs as audit until they fit ([limits] on_full = \"allow\")",
            }
        );
    }

    fn address_settled(&mut self, workload: u32, addr: IpAddr) {
        let had = self.limits.has_unstored(workload);
        self.limits.address_settled(workload, addr);
        if had && !self.limits.has_unstored(workload) {
            let name = self
                .workload_name(workload)
                .unwrap_or_else(|| workload.to_string());
            tracing::info!(
                map = "fqdn_addresses",
                workload = %name,
                "every learned address of workload {name} is stored again (or has expired)"
            );
        }
    }

    /// Writes the mode of every workload whose kernel mode `[limits] on_full` changed.
    /// Called after every DNS answer: returns at once while nothing is missing.
    fn sync_limit_modes(&mut self) {
        if self.limits.is_quiet() {
            return;
        }
        let workloads = Self::effective_workloads(&self.policy);
        let mut passed = BTreeSet::new();
        let mut modes = BTreeMap::new();
        for workload in &workloads {
            let Some(&id) = self.ids.get(&workload.name) else {
                continue;
            };
            let kernel = self.kernel_mode(&self.policy, workload, id);
            if kernel != self.modes.resolve(&self.policy, workload).0 {
                passed.insert(id);
            }
            modes.insert(id, (workload.name.clone(), kernel, workload.raw_sockets));
        }
        for (id, now_passed) in self.limits.set_passed(passed) {
            let Some((name, mode, raw_sockets)) = modes.get(&id) else {
                continue;
            };
            if let Err(e) = self.datapath.set_mode(id, *mode, *raw_sockets) {
                tracing::error!(workload = %name, "switching to {mode}: {e}");
                continue;
            }
            if now_passed {
                tracing::warn!(
                    workload = %name,
                    kernel_mode = mode.as_str(),
                    "workload {name} runs as audit: some of its learned addresses do not fit in \
                     the kernel's fqdn_addresses map, and [limits] on_full = \"allow\" (what \
                     strict mode would refuse is reported as would_deny)"
                );
            } else {
                tracing::info!(
                    workload = %name,
                    kernel_mode = mode.as_str(),
                    "workload {name} is enforced as {mode} again"
                );
            }
        }
    }

    /// The event for a query the kernel refused (or would refuse) for naming nothing the
    /// workload's FQDN rules allow; None for answers.
    pub fn refused_query_event(&self, query: &DnsAnswer) -> Option<egressd_proto::EventRecord> {
        let verdict = query.refused_query?;
        let name = match egressd_dns::question_of_query(&query.payload) {
            Ok((_, name, _)) => Some(name),
            Err(e) => {
                tracing::debug!(workload = query.workload, "refused query not parsed: {e}");
                None
            }
        };
        let workload = self.workload_name(query.workload);
        let mode = self
            .policy
            .workload(workload.as_deref().unwrap_or_default())
            .map(|w| self.modes.resolve(&self.policy, w).0)
            .unwrap_or(self.policy.mode);
        Some(crate::events::refused_query(
            query, verdict, workload, name, mode,
        ))
    }

    /// A validated DNS answer a workload received, and its parse (done by the caller,
    /// outside the daemon's lock): learn from it, and make the kernel's entries for its
    /// addresses match what the table allows. Returns the question it answered, for the
    /// observation store (None when the answer could not be parsed or its workload has no
    /// name).
    pub fn observe_answer(
        &mut self,
        answer: &DnsAnswer,
        parsed: Result<egressd_dns::DnsResponse, egressd_dns::DnsError>,
    ) -> Option<egressd_observe::QuerySample> {
        if answer.refused_query.is_some() {
            return None;
        }
        if answer.message_len > answer.payload.len() || parsed.is_err() {
            self.answer_unread(answer);
        }
        let response = match parsed {
            Ok(response) => response,
            Err(e) => {
                self.dns_parse_failures += 1;
                // The kernel may have allowed addresses from it already: withdraw any the
                // table does not hold for other answers.
                if answer.name_allowed {
                    let keys: Vec<(u32, IpAddr)> =
                        egressd_dns::fast_path_addresses(&answer.payload)
                            .into_iter()
                            .map(|addr| (answer.workload, addr))
                            .collect();
                    self.refresh_addresses(&keys);
                }
                tracing::debug!(
                    workload = answer.workload,
                    server = %answer.server,
                    bytes = answer.message_len,
                    "DNS answer not parsed: {e}"
                );
                return None;
            }
        };
        let observation = self.dns.observe(answer.workload, &response, Instant::now());
        let mut keys = observation.changed;
        if answer.name_allowed {
            // The kernel allowed every A/AAAA record of the answer section; the table keeps
            // only those its CNAME chain reaches.
            for record in &response.answers {
                let addr = match record.data {
                    egressd_dns::RecordData::A(v4) => IpAddr::V4(v4),
                    egressd_dns::RecordData::Aaaa(v6) => {
                        egressd_policy::canonical_ip(IpAddr::V6(v6))
                    }
                    _ => continue,
                };
                keys.push((answer.workload, addr));
            }
            keys.sort_unstable();
            keys.dedup();
        }
        self.refresh_addresses_after(&keys, answer.entries_unchanged);
        if let Some(name) = &observation.allowed_name {
            tracing::debug!(
                workload = answer.workload,
                question = %response.question,
                rule = %name,
                addresses = ?observation.addresses,
                "DNS answer for an allowed name"
            );
        }
        let outcome = match response.rcode {
            3 => egressd_observe::QueryOutcome::NxDomain,
            0 if !observation.addresses.is_empty() => egressd_observe::QueryOutcome::Answered,
            _ => egressd_observe::QueryOutcome::Other,
        };
        Some(egressd_observe::QuerySample {
            workload: self.workload_name(answer.workload)?,
            name: response.question,
            qtype: match response.qtype {
                egressd_dns::RecordKind::A => "A".to_owned(),
                egressd_dns::RecordKind::Aaaa => "AAAA".to_owned(),
                egressd_dns::RecordKind::Other(number) => format!("TYPE{number}"),
            },
            at: answer.time,
            outcome,
        })
    }

    /// If the kernel lost answers since the last check, the entries they changed are unknown:
    /// every learned address is written again at its next update. Checked with the expiry
    /// tick, not before each batch of answers: a system call per batch cost more than the
    /// writes it saves, and until the next answer that names an address the entry stays as
    /// the lost answer left it either way.
    fn note_answer_drops(&mut self) {
        let drops = match self.datapath.dns_answer_drops() {
            Ok(drops) => Some(drops),
            Err(e) => {
                tracing::debug!("reading the count of lost DNS answers: {e}");
                None
            }
        };
        if self.adoption.note_answer_drops(drops) {
            self.datapath.forget_fqdn_values();
        }
    }

    /// An answer arrived cut or did not parse: the kernel may have allowed addresses from it
    /// that the daemon cannot see (the next check of unadopted addresses takes them back),
    /// or added its rules to entries of addresses the daemon holds for other names: those of
    /// its workload are written again at the next tick (once per tick however many such
    /// answers come: a workload can make its resolver send them).
    fn answer_unread(&mut self, answer: &DnsAnswer) {
        self.adoption.answer_unread();
        self.datapath.forget_fqdn_values();
        if answer.inserted > 0 {
            self.rewrite_learned.insert(answer.workload);
        }
    }

    /// Ends the addresses whose time is up, and removes learned addresses the kernel holds
    /// but the daemon never adopted (their answer was lost) once they have been seen twice.
    pub fn expire_addresses(&mut self) {
        let now = Instant::now();
        let expired = self.dns.expire(now);
        self.refresh_addresses(&expired);
        let inherited_expired: Vec<(u32, IpAddr)> = self
            .inherited_addresses
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| *key)
            .collect();
        for key in &inherited_expired {
            self.inherited_addresses.remove(key);
        }
        // Those the table holds now (renewed by an answer) stay, with the table's rules.
        self.refresh_addresses(&inherited_expired);
        for workload in std::mem::take(&mut self.rewrite_learned) {
            let held: Vec<(u32, IpAddr)> = self
                .dns
                .addresses_of(workload)
                .into_iter()
                .map(|addr| (workload, addr))
                .collect();
            self.refresh_addresses(&held);
        }
        self.remove_unadopted(now);
        // Learned addresses that found no room: try again as the map frees up, a bounded
        // number per check, stopping at the first that still finds none.
        for key in self
            .limits
            .unstored_addresses(crate::limits::RETRIES_PER_CHECK)
        {
            if self.refresh_addresses(&[key]) {
                break;
            }
        }
    }

    /// Removes the learned addresses in the kernel that the daemon did not adopt, once two
    /// walks in a row found them (the first may see an answer still on its way), when
    /// [`AdoptionCheck`] says they may be there.
    fn remove_unadopted(&mut self, now: Instant) {
        self.note_answer_drops();
        if !self.adoption.due(now, !self.unadopted.is_empty()) {
            return;
        }
        let unadopted: BTreeSet<(u32, IpAddr)> = self
            .datapath
            .unadopted_fqdn_addresses()
            .into_iter()
            .collect();
        let stale: Vec<(u32, IpAddr)> = unadopted.intersection(&self.unadopted).copied().collect();
        self.refresh_addresses(&stale);
        self.unadopted = unadopted
            .difference(&stale.iter().copied().collect())
            .copied()
            .collect();
    }

    /// Walks the kernel's flow summaries and names for the recorder the ones `select` picks
    /// (it sees each summary with its workload's name and returns what it keeps with it),
    /// with what the recorder needs to judge them.
    /// Summaries of workloads a reload removed have no name any more and are skipped.
    pub fn flow_snapshot<T>(
        &mut self,
        mut select: impl FnMut(&FlowSummary, &str) -> Option<T>,
    ) -> anyhow::Result<crate::recorder::FlowSnapshot<T>> {
        let names: BTreeMap<u32, &String> = self.ids.iter().map(|(name, &id)| (id, name)).collect();
        let mut picked = Vec::new();
        let walked = self.datapath.visit_flow_summaries(|summary| {
            if let Some(workload) = names.get(&summary.workload)
                && let Some(selected) = select(&summary, workload)
            {
                picked.push((summary, (*workload).clone(), selected));
            }
        })?;
        let flows = picked
            .into_iter()
            .map(|(summary, workload, selected)| crate::recorder::NamedFlow {
                dns_name: self.dns_name_for(summary.workload, summary.address),
                summary,
                workload,
                selected,
            })
            .collect();
        // Paths as /proc/PID/cgroup writes them: from the cgroup v2 mount, with a leading /.
        let workload_cgroups = self
            .cgroup_paths
            .iter()
            .filter_map(|(id, paths)| {
                let name = (*names.get(id)?).clone();
                let dirs = paths
                    .iter()
                    .map(|path| PathBuf::from("/").join(path.trim_start_matches('/')))
                    .collect();
                Some((name, dirs))
            })
            .collect();
        let insert_failures = self
            .datapath
            .counters()
            .map(|counters| counters.flow_insert_failures + counters.ring_buffer_drops)
            .unwrap_or_default();
        Ok(crate::recorder::FlowSnapshot {
            flows,
            walked,
            workload_cgroups,
            settings: self.policy.observe.clone(),
            capacity: self.datapath.flow_capacity(),
            insert_failures,
        })
    }

    /// Names recent answers gave for `addr`, newest first (labels events).
    pub fn dns_name_for(&self, workload: u32, addr: IpAddr) -> Option<String> {
        self.dns.names_for(workload, addr).into_iter().next()
    }

    pub fn dns_report(&self, workload: Option<&str>) -> Result<DnsReport, String> {
        let id = match workload {
            Some(name) => Some(
                *self
                    .ids
                    .get(name)
                    .ok_or_else(|| format!("no workload named {name:?}"))?,
            ),
            None => None,
        };
        let names = self
            .dns
            .entries(id, Instant::now())
            .into_iter()
            .map(|entry| DnsName {
                workload: self.workload_name(entry.workload).unwrap_or_default(),
                name: entry.name,
                pattern: entry.pattern,
                hits: entry.hits,
                addresses: entry
                    .addresses
                    .into_iter()
                    .map(|(addr, left)| DnsAddress {
                        address: addr.to_string(),
                        expires_in_secs: left.as_secs(),
                    })
                    .collect(),
            })
            .collect();
        let stats = self.dns.stats();
        let counters = self.datapath.counters().unwrap_or_default();
        Ok(DnsReport {
            names,
            stats: DnsStats {
                names: stats.names,
                addresses: stats.addresses,
                answers_seen: stats.answers_seen,
                answers_allowed: stats.answers_allowed,
                answers_rejected: counters.dns_answers_rejected,
                kernel_inserts: counters.fqdn_inserts,
                evicted_names: stats.evicted_names,
                dropped_addresses: stats.dropped_addresses,
            },
        })
    }

    /// The policy file, read again by the caller (outside the daemon's lock, see
    /// `control::reload`), put in force; on any error the running policy stays in force.
    pub fn reload(
        &mut self,
        loaded: Result<Policy, egressd_policy::PolicyError>,
    ) -> Result<String, String> {
        let result = loaded.map_err(|e| error_chain(&e)).and_then(|policy| {
            if let Err(e) = self.install(&policy) {
                // A map write that failed half way left some of the new policy's entries
                // in: put the one in force back. (Refusals before any write need nothing.)
                let wrote = e
                    .downcast_ref::<DatapathError>()
                    .is_some_and(|e| !e.wrote_nothing());
                if wrote {
                    let previous = Arc::clone(&self.policy);
                    match self.install(&previous) {
                        Ok(()) => tracing::warn!(
                            "the reload failed while writing the maps; the policy in force is \
                             restored"
                        ),
                        Err(restore) => tracing::error!(
                            "restoring the policy in force after a failed reload: {restore:#}"
                        ),
                    }
                }
                return Err(format!("{e:#}"));
            }
            Ok(policy)
        });
        match result {
            Ok(policy) => {
                let message = format!(
                    "policy {} reloaded ({} workloads, sha256 {})",
                    policy.source.path.display(),
                    policy.workloads.len(),
                    short_hash(&policy.source.sha256)
                );
                self.policy = Arc::new(policy);
                // compile() already wrote the kernel modes; this records them.
                self.sync_limit_modes();
                self.policy_loaded_at = SystemTime::now();
                self.last_error = None;
                self.reloads_succeeded += 1;
                tracing::info!("{message}");
                Ok(message)
            }
            Err(message) => {
                let message =
                    format!("reload rejected, the previous policy stays in force: {message}");
                tracing::error!("{message}");
                self.reloads_failed += 1;
                self.last_error = Some(ReloadFailure {
                    at: rfc3339(SystemTime::now()),
                    message: message.clone(),
                });
                Err(message)
            }
        }
    }

    /// Picks up cgroups created or removed since the last scan (new services matching a glob).
    pub fn rescan_cgroups(&mut self) -> anyhow::Result<()> {
        let workloads = Self::effective_workloads(&self.policy);
        let table = self.cgroup_table(&workloads, &self.ids);
        let left_out = self.datapath.set_workload_cgroups(&table.kernel)?;
        let left_out: Vec<(u32, String)> = left_out
            .into_iter()
            .map(|(cgroup, workload)| {
                let path = table
                    .path_of
                    .get(&cgroup)
                    .cloned()
                    .unwrap_or_else(|| format!("cgroup id {cgroup}"));
                (workload, path)
            })
            .collect();
        self.note_cgroups_left_out(&left_out);
        if table.paths != self.cgroup_paths {
            tracing::info!(cgroups = table.kernel.len(), "workload cgroups changed");
            self.cgroup_paths = table.paths;
        }
        Ok(())
    }

    pub fn set_mode(
        &mut self,
        setting: ModeSetting,
        workload: Option<&str>,
    ) -> Result<String, String> {
        let workloads = Self::effective_workloads(&self.policy);
        if let Some(name) = workload
            && !workloads.iter().any(|w| w.name == name)
        {
            let known: Vec<&str> = workloads.iter().map(|w| w.name.as_str()).collect();
            return Err(format!(
                "no workload named {name:?} in {}; known: {}",
                self.config_path.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        self.modes
            .set(workload, setting.mode())
            .map_err(|e| format!("{e}"))?;
        // Write every workload whose effective mode changed: one map write each.
        for w in &workloads {
            let Some(&id) = self.ids.get(&w.name) else {
                continue;
            };
            let mode = self.kernel_mode(&self.policy, w, id);
            if let Err(e) = self.datapath.set_mode(id, mode, w.raw_sockets) {
                return Err(format!("switching {} to {mode}: {e}", w.name));
            }
        }
        self.sync_limit_modes();
        let target =
            workload.map_or_else(|| "default mode".to_owned(), |w| format!("workload {w}"));
        let message = match setting.mode() {
            Some(mode) => format!("{target} set to {mode}"),
            None => format!("{target} follows {} again", self.config_path.display()),
        };
        tracing::info!("{message}");
        Ok(message)
    }

    /// The policy file that reloads read.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn workload_name(&self, id: u32) -> Option<String> {
        self.ids
            .iter()
            .find_map(|(name, &wid)| (wid == id).then(|| name.clone()))
    }

    pub fn metrics_settings(&self) -> &egressd_policy::MetricsSettings {
        &self.policy.metrics
    }

    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let workloads = Self::effective_workloads(&self.policy)
            .iter()
            .filter_map(|w| {
                let id = *self.ids.get(&w.name)?;
                Some(crate::metrics::WorkloadSnapshot {
                    name: w.name.clone(),
                    mode: self.modes.resolve(&self.policy, w).0,
                    decisions: self.datapath.decision_counters(id).unwrap_or_default(),
                })
            })
            .collect();
        crate::metrics::Snapshot {
            counters: self.datapath.counters().unwrap_or_default(),
            workloads,
            map_fill: self.datapath.map_fill(),
            policy_sha256: self.policy.source.sha256.clone(),
            reloads_succeeded: self.reloads_succeeded,
            reloads_failed: self.reloads_failed,
            dns: self.dns.stats(),
            dns_parse_failures: self.dns_parse_failures,
            limits: self.limits.snapshot(),
            workload_names: self
                .ids
                .iter()
                .map(|(name, &id)| (id, name.clone()))
                .collect(),
            // Filled in by the metrics server from the event hub.
            events: egressd_proto::EventsStatus::default(),
        }
    }

    pub fn status(&self) -> StatusReport {
        let counters = self.datapath.counters().unwrap_or_default();
        let (default_mode, default_source) = self.modes.resolve_default(&self.policy);
        let workloads = Self::effective_workloads(&self.policy)
            .iter()
            .map(|w| {
                let id = self.ids.get(&w.name).copied().unwrap_or(0);
                let (mode, mode_source) = self.modes.resolve(&self.policy, w);
                let fqdn_rules = w
                    .allow
                    .iter()
                    .filter(|r| matches!(r.destination, Destination::Fqdn(_)))
                    .count();
                WorkloadStatus {
                    name: w.name.clone(),
                    id,
                    mode,
                    mode_source,
                    cgroup: w.cgroup.as_ref().map(|c| c.as_str().to_owned()),
                    cgroups: self.cgroup_paths.get(&id).cloned().unwrap_or_default(),
                    cidr_rules: w.allow.len() - fqdn_rules,
                    fqdn_rules,
                    raw_sockets: w.raw_sockets,
                    kernel_mode: self
                        .limits
                        .is_passed(id)
                        .then(|| self.kernel_mode(&self.policy, w, id))
                        .filter(|kernel| *kernel != mode),
                }
            })
            .collect();
        let modes: BTreeMap<u32, Mode> = Self::effective_workloads(&self.policy)
            .iter()
            .filter_map(|w| {
                Some((
                    *self.ids.get(&w.name)?,
                    self.modes.resolve(&self.policy, w).0,
                ))
            })
            .collect();
        let limits = self.limits.status(
            self.policy.limits.on_full,
            &crate::limits::Capacities {
                fqdn_addresses: self.datapath.fqdn_address_capacity(),
                workload_cgroups: self.datapath.workload_cgroup_capacity(),
            },
            |id| modes.get(&id).copied(),
            |id| self.workload_name(id),
            self.policy.defaults.unmatched,
        );
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: rfc3339(self.started_at),
            policy: PolicyStatus {
                path: self.policy.source.path.display().to_string(),
                sha256: self.policy.source.sha256.clone(),
                loaded_at: rfc3339(self.policy_loaded_at),
                last_error: self.last_error.clone(),
            },
            default_mode: ModeStatus {
                mode: default_mode,
                source: default_source,
            },
            unmatched: self.policy.defaults.unmatched.as_str().to_owned(),
            workloads,
            datapath: DatapathStatus {
                cgroup_root: self.datapath.cgroup_root().display().to_string(),
                programs: self.datapath.programs().to_vec(),
                events: counters.events,
                ring_buffer_drops: counters.ring_buffer_drops,
                allowed: counters.allowed,
                denied: counters.denied,
                would_deny: counters.would_deny,
                dns_answers: counters.dns_answers,
                dns_answer_drops: counters.dns_answer_drops,
                dns_resolvers: self.resolvers.iter().map(IpAddr::to_string).collect(),
                dns_search_domains: self.search_domains.clone(),
                dns_queries_refused: counters.dns_queries_refused,
                pin_dir: self.datapath.pin_dir().map(|dir| dir.display().to_string()),
                adopted: self.datapath.adopted(),
                maps: self
                    .datapath
                    .map_fill()
                    .into_iter()
                    .map(|(map, entries, capacity)| egressd_proto::MapFill {
                        map: map.to_owned(),
                        entries: entries as u64,
                        capacity: u64::from(capacity),
                    })
                    .collect(),
                fqdn_insert_failures: counters.fqdn_insert_failures,
            },
            // Filled in by the control socket from the recorder and the event hub.
            observe: None,
            limits: Some(limits),
            events: None,
        }
    }
}

/// The FQDN rules of `workloads`, numbered by `ids`.
fn fqdn_rules(workloads: &[&Workload], ids: &BTreeMap<String, u32>) -> Vec<egressd_dns::FqdnRule> {
    workloads
        .iter()
        .filter_map(|w| Some((*ids.get(&w.name)?, w)))
        .flat_map(|(id, w)| {
            w.allow
                .iter()
                .filter_map(move |rule| match &rule.destination {
                    Destination::Fqdn(pattern) => Some(egressd_dns::FqdnRule {
                        workload: id,
                        pattern: pattern.clone(),
                        ports: rule.ports.clone(),
                        protocol: rule.protocol,
                    }),
                    Destination::Cidr(_) => None,
                })
        })
        .collect()
}

/// `dns.resolvers` and `dns.search_domains`, each from the host's /etc/resolv.conf when the
/// policy leaves it to it (the file is read once, and only then).
fn effective_dns(policy: &Policy) -> (Vec<IpAddr>, Vec<String>) {
    let needs_host = policy.dns.resolvers.is_empty() || policy.dns.search_domains.is_none();
    let host = needs_host.then(host_resolv_conf).flatten();
    let resolvers = if policy.dns.resolvers.is_empty() {
        host.as_ref()
            .map(|config| config.nameservers.iter().map(IpAddr::from).collect())
            .unwrap_or_default()
    } else {
        policy.dns.resolvers.clone()
    };
    let search_domains = match &policy.dns.search_domains {
        Some(domains) => domains.clone(),
        None => host
            .as_ref()
            .map(|config| {
                config
                    .get_last_search_or_domain()
                    .filter_map(|domain| {
                        let pattern = egressd_policy::FqdnPattern::parse(domain).ok()?;
                        (!pattern.is_wildcard()).then(|| pattern.name().to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    (resolvers, search_domains)
}

/// The host's /etc/resolv.conf, or None (with a warning) when it cannot be read.
fn host_resolv_conf() -> Option<resolv_conf::Config> {
    let consequence = "no resolvers for fqdn rules and no search domains for dns_queries \
                       unless the policy names them";
    match std::fs::read("/etc/resolv.conf") {
        Ok(bytes) => match resolv_conf::Config::parse(&bytes) {
            Ok(config) => Some(config),
            Err(e) => {
                tracing::warn!("/etc/resolv.conf: {e}; {consequence}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("reading /etc/resolv.conf: {e}; {consequence}");
            None
        }
    }
}

fn cidr_rules(workload: &Workload) -> Vec<CidrRule> {
    workload
        .allow
        .iter()
        .filter_map(|rule| match &rule.destination {
            Destination::Cidr(net) => Some(CidrRule {
                net: *net,
                ports: rule.ports.clone(),
                protocol: rule.protocol,
            }),
            // Enforced from DNS answers by the FQDN feature; stored and reported now.
            Destination::Fqdn(_) => None,
        })
        .collect()
}

fn short_hash(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// An error with its causes, one per `: `.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
