//! The FQDN table: per workload, the live (name → addresses) bindings learned from the DNS
//! answers its sockets received, and the dynamic allow entries they add up to.
//!
//! The kernel inserts the addresses of answers for allowed names itself, at once; this table
//! is the authority that says which of those entries must exist, with which ports, and when
//! they go away. Time is passed in, so everything here is deterministic.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressd_policy::{DnsSettings, FqdnPattern, PortRange, Protocol, canonical_ip};
use lru::LruCache;

use crate::message::{DnsResponse, chain_addresses, normalize};

/// Longest TTL honoured, in seconds (a week, as resolvers' default max-cache-ttl): a longer
/// one is cut to this.
pub const MAX_TTL: u32 = 7 * 24 * 3600;

/// Names remembered per address for [`FqdnTable::names_for`].
pub const RECENT_NAMES_PER_ADDRESS: usize = 8;

/// The port rules of one or more allow rules: `(ports, protocol)`, empty ports = every port.
pub type PortRules = Vec<(Vec<PortRange>, Protocol)>;

/// An `fqdn` allow rule of a workload, as the table matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnRule {
    /// The workload's id, as the datapath numbers it.
    pub workload: u32,
    pub pattern: FqdnPattern,
    /// Empty = every port.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
}

/// Limits and timings of the table. `From<&DnsSettings>` takes the policy's `[dns]` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSettings {
    /// Shortest time an address stays allowed, whatever its TTL. Default 60 s.
    pub min_ttl: Duration,
    /// Added to every lifetime, so connections opened just before the TTL runs out still
    /// pass. Default 10 s.
    pub grace: Duration,
    /// Addresses one name holds at most; beyond it the ones expiring soonest are dropped.
    /// Default 512.
    pub max_ips_per_name: u32,
    /// Capacity of the LRU over (workload, allowed name) bindings, and of the recent-names
    /// index over addresses. Default 65536; 0 counts as 1.
    pub max_names: usize,
}

impl TableSettings {
    pub const DEFAULT_MAX_NAMES: usize = 65536;
}

impl Default for TableSettings {
    fn default() -> Self {
        TableSettings::from(&DnsSettings::default())
    }
}

impl From<&DnsSettings> for TableSettings {
    fn from(dns: &DnsSettings) -> Self {
        TableSettings {
            min_ttl: dns.min_ttl,
            grace: dns.grace,
            max_ips_per_name: dns.max_ips_per_name,
            max_names: TableSettings::DEFAULT_MAX_NAMES,
        }
    }
}

/// What one answer did to the table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// The text of the rule pattern that allowed the question name (an exact pattern before
    /// a wildcard, then the longest wildcard), `None` if no rule of the workload matches.
    pub allowed_name: Option<String>,
    /// (workload, address) pairs whose allow entry must be recomputed with
    /// [`FqdnTable::allowed_for`]: every address of an allowed answer (the kernel may have
    /// written it already), addresses dropped over `max_ips_per_name`, and the addresses of
    /// bindings the LRU evicted (possibly of other workloads). Sorted, no duplicates.
    pub changed: Vec<(u32, IpAddr)>,
    /// The addresses the answer resolves the question name to, allowed or not, in answer
    /// order (IPv4-mapped IPv6 as IPv4). Empty when rcode != 0.
    pub addresses: Vec<IpAddr>,
}

/// One allowed name of a workload, for `egressctl dns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub workload: u32,
    /// The name the workload asked for.
    pub name: String,
    /// The rule pattern that allows it.
    pub pattern: String,
    pub ports: PortRules,
    /// Answers seen for this name since the binding was created.
    pub hits: u64,
    /// Its addresses with the time each stays allowed, sorted by address.
    pub addresses: Vec<(IpAddr, Duration)>,
}

/// Counters and sizes of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableStats {
    /// Live (workload, allowed name) bindings.
    pub names: usize,
    /// Dynamic allow entries: distinct (workload, address) pairs.
    pub addresses: usize,
    /// Bindings the LRU evicted, since the table was created.
    pub evicted_names: u64,
    /// Addresses dropped because a name would have held more than `max_ips_per_name`.
    pub dropped_addresses: u64,
    /// Answers passed to [`FqdnTable::observe`].
    pub answers_seen: u64,
    /// Of those, answers whose question name a rule of the workload allows.
    pub answers_allowed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    workload: u32,
    name: Arc<str>,
}

#[derive(Debug)]
struct Binding {
    pattern: String,
    ports: PortRules,
    hits: u64,
    /// Address → the instant it stops being allowed.
    addresses: HashMap<IpAddr, Instant>,
}

/// The indexes kept in step with every binding's addresses.
#[derive(Debug, Default)]
struct Index {
    /// (workload, address) → the allowed names that hold it.
    holders: BTreeMap<(u32, IpAddr), BTreeSet<Arc<str>>>,
    /// Expiry order of every (binding, address).
    queue: BTreeSet<(Instant, Key, IpAddr)>,
}

impl Index {
    /// Makes `binding` hold `addr` until at least `expiry`.
    fn hold(&mut self, key: &Key, binding: &mut Binding, addr: IpAddr, expiry: Instant) {
        match binding.addresses.entry(addr) {
            Entry::Occupied(mut held) => {
                if *held.get() >= expiry {
                    return;
                }
                self.queue.remove(&(*held.get(), key.clone(), addr));
                held.insert(expiry);
            }
            Entry::Vacant(slot) => {
                slot.insert(expiry);
                self.holders
                    .entry((key.workload, addr))
                    .or_default()
                    .insert(key.name.clone());
            }
        }
        self.queue.insert((expiry, key.clone(), addr));
    }

    /// Takes `addr` away from `binding`.
    fn drop_address(&mut self, key: &Key, binding: &mut Binding, addr: IpAddr) {
        if let Some(expiry) = binding.addresses.remove(&addr) {
            self.queue.remove(&(expiry, key.clone(), addr));
            self.unhold(key, addr);
        }
    }

    fn unhold(&mut self, key: &Key, addr: IpAddr) {
        if let Some(names) = self.holders.get_mut(&(key.workload, addr)) {
            names.remove(&key.name);
            if names.is_empty() {
                self.holders.remove(&(key.workload, addr));
            }
        }
    }

    /// Forgets a binding that left the LRU; returns its (workload, address) pairs.
    fn release(&mut self, key: &Key, binding: &Binding) -> Vec<(u32, IpAddr)> {
        binding
            .addresses
            .iter()
            .map(|(&addr, &expiry)| {
                self.queue.remove(&(expiry, key.clone(), addr));
                self.unhold(key, addr);
                (key.workload, addr)
            })
            .collect()
    }

    /// Drops the addresses expiring soonest until `binding` holds at most `max`.
    fn enforce_cap(&mut self, key: &Key, binding: &mut Binding, max: u32) -> Vec<IpAddr> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let excess = binding.addresses.len().saturating_sub(max);
        if excess == 0 {
            return Vec::new();
        }
        let mut by_expiry: Vec<(Instant, IpAddr)> = binding
            .addresses
            .iter()
            .map(|(&addr, &expiry)| (expiry, addr))
            .collect();
        by_expiry.sort_unstable();
        let dropped: Vec<IpAddr> = by_expiry
            .into_iter()
            .take(excess)
            .map(|(_, addr)| addr)
            .collect();
        for &addr in &dropped {
            self.drop_address(key, binding, addr);
        }
        dropped
    }
}

/// What a rule set says about one name.
struct RuleMatch {
    pattern: String,
    ports: PortRules,
}

/// The userspace authority over dynamic (FQDN) allow entries. See the module docs.
#[derive(Debug)]
pub struct FqdnTable {
    settings: TableSettings,
    rules: HashMap<u32, Vec<FqdnRule>>,
    bindings: LruCache<Key, Binding>,
    index: Index,
    /// Address → the names whose recent answers held it, newest first, any workload.
    recent: LruCache<IpAddr, VecDeque<(u32, Arc<str>)>>,
    stats: TableStats,
}

impl FqdnTable {
    pub fn new(settings: TableSettings) -> Self {
        let capacity = capacity(settings.max_names);
        FqdnTable {
            settings,
            rules: HashMap::new(),
            bindings: lru_growing(capacity),
            index: Index::default(),
            recent: lru_growing(capacity),
            stats: TableStats::default(),
        }
    }

    pub fn settings(&self) -> TableSettings {
        self.settings
    }

    /// Replaces every rule (a policy reload). Bindings of names no rule allows any more
    /// disappear; the others take the ports of their new rules. Returns the (workload,
    /// address) pairs whose allow entry must be recomputed. Answers seen before are not
    /// replayed: a name that becomes allowed gets addresses from its next answer.
    pub fn set_rules(&mut self, rules: Vec<FqdnRule>) -> Vec<(u32, IpAddr)> {
        let mut grouped: HashMap<u32, Vec<FqdnRule>> = HashMap::new();
        for rule in rules {
            grouped.entry(rule.workload).or_default().push(rule);
        }
        self.rules = grouped;
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        for (key, binding) in self.bindings.iter_mut() {
            match self
                .rules
                .get(&key.workload)
                .and_then(|rules| match_rules(rules, &key.name))
            {
                None => gone.push(key.clone()),
                Some(found) => {
                    if found.ports != binding.ports {
                        changed.extend(binding.addresses.keys().map(|&a| (key.workload, a)));
                    }
                    binding.pattern = found.pattern;
                    binding.ports = found.ports;
                }
            }
        }
        for key in gone {
            if let Some(binding) = self.bindings.pop(&key) {
                changed.extend(self.index.release(&key, &binding));
            }
        }
        sorted(changed)
    }

    /// Replaces the settings. A smaller `max_names` evicts the least recently used bindings
    /// (counted), a smaller `max_ips_per_name` drops addresses (counted); `min_ttl` and
    /// `grace` apply from the next answer on. Returns the (workload, address) pairs whose
    /// allow entry must be recomputed.
    pub fn set_settings(&mut self, settings: TableSettings) -> Vec<(u32, IpAddr)> {
        self.settings = settings;
        let capacity = capacity(settings.max_names);
        let mut changed = Vec::new();
        while self.bindings.len() > capacity.get() {
            let Some((key, binding)) = self.bindings.pop_lru() else {
                break;
            };
            self.stats.evicted_names += 1;
            changed.extend(self.index.release(&key, &binding));
        }
        self.bindings.resize(capacity);
        self.recent.resize(capacity);
        let mut emptied = Vec::new();
        for (key, binding) in self.bindings.iter_mut() {
            let dropped = self
                .index
                .enforce_cap(key, binding, settings.max_ips_per_name);
            self.stats.dropped_addresses += dropped.len() as u64;
            changed.extend(dropped.into_iter().map(|a| (key.workload, a)));
            if binding.addresses.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.bindings.pop(&key);
        }
        sorted(changed)
    }

    /// An answer a workload's socket received (already validated by the kernel). Records
    /// the name → address bindings of every name (allowed or not: the recent-names index
    /// labels denials), and for names the workload's rules allow makes the addresses allowed
    /// until now + max(ttl, min_ttl) + grace (a later expiry already held is kept). Answers
    /// with rcode != 0 or without addresses change nothing but are counted.
    pub fn observe(&mut self, workload: u32, response: &DnsResponse, now: Instant) -> Observation {
        self.stats.answers_seen += 1;
        let name: Arc<str> = Arc::from(normalize(&response.question));
        let found = self
            .rules
            .get(&workload)
            .and_then(|rules| match_rules(rules, &name));
        if found.is_some() {
            self.stats.answers_allowed += 1;
        }
        let resolved = if response.rcode == 0 {
            resolved_addresses(response)
        } else {
            Vec::new()
        };
        let addresses: Vec<IpAddr> = resolved.iter().map(|&(addr, _)| addr).collect();
        self.remember(workload, &name, &addresses);
        let mut observation = Observation {
            allowed_name: found.as_ref().map(|found| found.pattern.clone()),
            changed: Vec::new(),
            addresses,
        };
        let Some(found) = found else {
            return observation;
        };
        let key = Key { workload, name };
        if resolved.is_empty() {
            if let Some(binding) = self.bindings.peek_mut(&key) {
                binding.hits += 1;
            }
            return observation;
        }

        let mut changed = Vec::new();
        if !self.bindings.contains(&key) {
            let binding = Binding {
                pattern: String::new(),
                ports: Vec::new(),
                hits: 0,
                addresses: HashMap::new(),
            };
            if let Some((evicted_key, evicted)) = self.bindings.push(key.clone(), binding) {
                self.stats.evicted_names += 1;
                changed.extend(self.index.release(&evicted_key, &evicted));
            }
        }
        let settings = self.settings;
        let Some(binding) = self.bindings.get_mut(&key) else {
            // Just inserted; nothing to do if it is somehow not there.
            return observation;
        };
        binding.hits += 1;
        binding.pattern = found.pattern;
        binding.ports = found.ports;
        for &(addr, ttl) in &resolved {
            let expiry = expiry_of(&settings, now, ttl);
            self.index.hold(&key, binding, addr, expiry);
            changed.push((workload, addr));
        }
        let dropped = self
            .index
            .enforce_cap(&key, binding, settings.max_ips_per_name);
        self.stats.dropped_addresses += dropped.len() as u64;
        changed.extend(dropped.into_iter().map(|addr| (workload, addr)));
        if binding.addresses.is_empty() {
            self.bindings.pop(&key);
        }
        observation.changed = sorted(changed);
        observation
    }

    /// Drops every address whose time is up (expiry <= now), and bindings left empty.
    /// Returns the (workload, address) pairs whose allow entry must be recomputed: removed
    /// if no other name holds the address, else possibly with fewer ports.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, IpAddr)> {
        let mut changed = Vec::new();
        while self
            .index
            .queue
            .first()
            .is_some_and(|(expiry, _, _)| *expiry <= now)
        {
            let Some((_, key, addr)) = self.index.queue.pop_first() else {
                break;
            };
            self.index.unhold(&key, addr);
            changed.push((key.workload, addr));
            let emptied = match self.bindings.peek_mut(&key) {
                Some(binding) => {
                    binding.addresses.remove(&addr);
                    binding.addresses.is_empty()
                }
                None => false,
            };
            if emptied {
                self.bindings.pop(&key);
            }
        }
        sorted(changed)
    }

    /// The allow entries the kernel must hold for dynamic addresses: for each (workload,
    /// address) the union of the port rules of every allowed name that currently holds it.
    pub fn allowed(&self) -> BTreeMap<(u32, IpAddr), PortRules> {
        self.index
            .holders
            .keys()
            .filter_map(|&(workload, addr)| {
                self.allowed_for(workload, addr)
                    .map(|rules| ((workload, addr), rules))
            })
            .collect()
    }

    /// The addresses allowed names hold for `workload`.
    pub fn addresses_of(&self, workload: u32) -> Vec<IpAddr> {
        let first = (workload, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let last = (workload, IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)));
        self.index
            .holders
            .range(first..=last)
            .map(|(&(_, addr), _)| addr)
            .collect()
    }

    /// The allow entry of one (workload, address), `None` if no allowed name holds it.
    pub fn allowed_for(&self, workload: u32, addr: IpAddr) -> Option<PortRules> {
        let addr = canonical_ip(addr);
        let names = self.index.holders.get(&(workload, addr))?;
        let mut rules: PortRules = names
            .iter()
            .filter_map(|name| {
                self.bindings.peek(&Key {
                    workload,
                    name: name.clone(),
                })
            })
            .flat_map(|binding| binding.ports.iter().cloned())
            .collect();
        rules.sort();
        rules.dedup();
        (!rules.is_empty()).then_some(rules)
    }

    /// Names whose recent answers (allowed or not) held `addr`: the workload's own first,
    /// then other workloads', newest first within each, then allowed names still holding
    /// it that fell out of the recent index. Labels events ("refused: telemetry.vendor.com").
    pub fn names_for(&self, workload: u32, addr: IpAddr) -> Vec<String> {
        let addr = canonical_ip(addr);
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            if !names.iter().any(|known| known == name) {
                names.push(name.to_owned());
            }
        };
        if let Some(recent) = self.recent.peek(&addr) {
            for own in [true, false] {
                for (_, name) in recent.iter().filter(|(w, _)| (*w == workload) == own) {
                    add(name);
                }
            }
        }
        if let Some(holders) = self.index.holders.get(&(workload, addr)) {
            for name in holders {
                add(name);
            }
        }
        names
    }

    /// Per workload (all if `None`) and allowed name: its addresses with their remaining
    /// time, and its hit count. Sorted by workload, then name.
    pub fn entries(&self, workload: Option<u32>, now: Instant) -> Vec<NameEntry> {
        let mut entries: Vec<NameEntry> = self
            .bindings
            .iter()
            .filter(|(key, _)| workload.is_none_or(|w| w == key.workload))
            .map(|(key, binding)| {
                let mut addresses: Vec<(IpAddr, Duration)> = binding
                    .addresses
                    .iter()
                    .map(|(&addr, &expiry)| (addr, expiry.saturating_duration_since(now)))
                    .collect();
                addresses.sort();
                NameEntry {
                    workload: key.workload,
                    name: key.name.to_string(),
                    pattern: binding.pattern.clone(),
                    ports: binding.ports.clone(),
                    hits: binding.hits,
                    addresses,
                }
            })
            .collect();
        entries.sort_by(|a, b| (a.workload, &a.name).cmp(&(b.workload, &b.name)));
        entries
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            names: self.bindings.len(),
            addresses: self.index.holders.len(),
            ..self.stats
        }
    }

    /// Puts `name` at the front of the recent names of each address.
    fn remember(&mut self, workload: u32, name: &Arc<str>, addresses: &[IpAddr]) {
        for &addr in addresses {
            let recent = self.recent.get_or_insert_mut(addr, VecDeque::new);
            recent.retain(|(w, known)| !(*w == workload && known == name));
            recent.push_front((workload, name.clone()));
            recent.truncate(RECENT_NAMES_PER_ADDRESS);
        }
    }
}

/// The rules of one workload that allow `name`: the pattern to report (an exact pattern,
/// else the longest wildcard) and the union of their port rules.
fn match_rules(rules: &[FqdnRule], name: &str) -> Option<RuleMatch> {
    let matching: Vec<&FqdnRule> = rules
        .iter()
        .filter(|rule| rule.pattern.matches(name))
        .collect();
    let best = matching
        .iter()
        .max_by_key(|rule| (!rule.pattern.is_wildcard(), rule.pattern.as_str().len()))?;
    let mut ports: PortRules = matching
        .iter()
        .map(|rule| (rule.ports.clone(), rule.protocol))
        .collect();
    ports.sort();
    ports.dedup();
    Some(RuleMatch {
        pattern: best.pattern.as_str().to_owned(),
        ports,
    })
}

/// The answer's addresses for its question (IPv4-mapped IPv6 as IPv4), once each with the
/// larger TTL, in answer order.
fn resolved_addresses(response: &DnsResponse) -> Vec<(IpAddr, u32)> {
    let mut out: Vec<(IpAddr, u32)> = Vec::new();
    let mut position: HashMap<IpAddr, usize> = HashMap::new();
    for (addr, ttl, _) in chain_addresses(response) {
        let addr = canonical_ip(addr);
        match position.entry(addr) {
            Entry::Occupied(seen) => {
                if let Some(entry) = out.get_mut(*seen.get()) {
                    entry.1 = entry.1.max(ttl);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(out.len());
                out.push((addr, ttl));
            }
        }
    }
    out
}

/// When an address learned now with `ttl` stops being allowed. TTLs with the top bit set
/// count as 0 (RFC 2181 section 8); TTLs above [`MAX_TTL`] are cut to it.
fn expiry_of(settings: &TableSettings, now: Instant, ttl: u32) -> Instant {
    let ttl = if ttl > i32::MAX as u32 {
        0
    } else {
        ttl.min(MAX_TTL)
    };
    let lifetime = Duration::from_secs(u64::from(ttl))
        .max(settings.min_ttl)
        .saturating_add(settings.grace);
    now.checked_add(lifetime)
        .or_else(|| now.checked_add(Duration::from_secs(u64::from(MAX_TTL))))
        .unwrap_or(now)
}

/// An LRU cache bounded by `capacity` whose table grows with its entries: `LruCache::new`
/// allocates room for `capacity` entries up front (2.2 MB for each of the table's two caches
/// at the default 65,536 names, even for a policy without FQDN rules).
fn lru_growing<K: std::hash::Hash + Eq, V>(capacity: NonZeroUsize) -> LruCache<K, V> {
    let mut cache = LruCache::unbounded();
    cache.resize(capacity);
    cache
}

fn capacity(max_names: usize) -> NonZeroUsize {
    NonZeroUsize::new(max_names).unwrap_or(NonZeroUsize::MIN)
}

fn sorted(mut pairs: Vec<(u32, IpAddr)>) -> Vec<(u32, IpAddr)> {
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}
