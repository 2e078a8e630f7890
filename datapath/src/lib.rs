//! egressd's datapath: loads the eBPF programs, attaches them at the cgroup v2 root and owns
//! every map. Callers speak in domain terms (workloads, CIDR rules, modes); map layouts stay
//! here and in `egressd-common`.

mod capacity;
mod events;
mod flows;
mod kernel;
mod pins;
mod programs;
mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use egressd_common::dns::{
    FQDN_EXACT, FQDN_SEARCH_EXACT, FQDN_SEARCH_WILDCARD, FQDN_WILDCARD, FqdnKey, FqdnValue,
    name_hash,
};
use egressd_common::policy as policy_limits;
use egressd_common::policy::{ALLOW_FLAG_DYNAMIC, MAX_PORT_RULES, PortRule};
use egressd_common::{
    LAYOUT_VERSION, event as counters,
    policy::{
        AllowKey, AllowValue, DenyKey, MAX_WORKLOADS, MODE_AUDIT, MODE_LEARNING, MODE_STRICT,
        NO_WORKLOAD, Settings, WORKLOAD_FLAG_ACTIVE, WORKLOAD_FLAG_DNS_ALLOWLISTED,
        WORKLOAD_FLAG_RAW_SOCKETS, WorkloadConfig,
    },
};
use egressd_policy::{Mode, PortRange, Protocol};
use ipnet::IpNet;

pub use capacity::MapCapacities;
pub use events::{
    DnsAnswer, DnsAnswerStream, Event, EventKind, EventStream, Hook, Reason, Verdict,
};
pub use flows::{FlowSummary, TaskRef};
pub use kernel::release as kernel_release;
pub use pins::{PinError, uninstall};
pub use rules::CidrRule;
use rules::Prefix;

/// The compiled eBPF object.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egressd-ebpf"));

/// Flow summaries the kernel holds at once (least recently used evicted beyond).
pub const MAX_FLOWS: u32 = egressd_common::flow::MAX_FLOWS;

/// Largest workload id the datapath accepts.
pub const MAX_WORKLOAD_ID: u32 = MAX_WORKLOADS - 1;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("the thread loading the eBPF programs panicked; nothing was attached")]
    LoaderPanicked,
    #[error("loading the eBPF programs failed earlier; nothing was attached")]
    LoadFailed,
    #[error("eBPF program {name}: {action} failed: {source}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "this kernel (Linux {kernel}) lacks what egressd needs: {}; egressd needs Linux {} or \
         later (README: Kernel requirements). Nothing was loaded or attached",
        missing.join("; "),
        kernel::TESTED_MINIMUM
    )]
    KernelLacks {
        kernel: String,
        /// Each missing feature, with the mainline release that added it when known.
        missing: Vec<String>,
    },
    #[error(
        "the kernel (Linux {kernel}) refused eBPF program {name}: {reason}. egressd runs on \
         Linux {} and later, whose verifiers accept its programs (README: Kernel requirements); \
         nothing was attached. EGRESSD_LOG=debug logs the verifier's full output",
        kernel::TESTED_MINIMUM
    )]
    ProgramRefused {
        name: &'static str,
        kernel: String,
        /// The verifier's own words for the rule the program broke, or the error it returned.
        reason: String,
    },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF map {name}: {action} failed: {source}")]
    Map {
        name: &'static str,
        action: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("opening the cgroup v2 root {path}: {source}")]
    CgroupRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "workload {workload}: prefix {prefix} needs {count} port rules (with the rules of the \
         prefixes that cover it); the datapath holds at most {limit} per prefix: merge port ranges \
         or split the prefix"
    )]
    TooManyPortRules {
        workload: String,
        prefix: String,
        count: usize,
        limit: usize,
    },
    #[error("workload id {id} is outside 1..={MAX_WORKLOAD_ID}")]
    WorkloadIdOutOfRange { id: u32 },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event record of {len} bytes is too short")]
    ShortEvent { len: usize },
    #[error("event record has unknown kind {kind}")]
    UnknownEventKind { kind: u32 },
    #[error(
        "no cgroup v2 file system is mounted (none in /proc/self/mounts); egressd needs cgroup v2"
    )]
    NoCgroup2,
    #[error("the event or DNS answer stream was already taken")]
    EventsTaken,
    #[error("eBPF program {name}: its link cannot be owned: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("pinned eBPF state: {0}")]
    Pins(#[source] Box<PinError>),
    #[error(
        "eBPF map {name} is neither pinned nor declared scratch space: add it to PINNED_MAPS or \
         UNPINNED_MAPS in datapath/src/pins.rs"
    )]
    UnclassifiedMap { name: String },
    #[error("the pinned maps record layout version {found}, this egressd uses {expected}")]
    PinnedLayout { found: u32, expected: u32 },
    #[error(
        "switching to the new policy needs {needed} entries in the kernel's {map} map at once \
         (the old and the new policy's, both in force while it switches), and it holds \
         {capacity}: reload in two steps, removing rules first"
    )]
    SwitchTooLarge {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    /// The policy alone does not fit: nothing was written.
    #[error(
        "the policy needs {needed} entries in the kernel's {map} map, which holds {capacity}{detail}"
    )]
    PolicyTooLarge {
        map: &'static str,
        needed: usize,
        capacity: u32,
        /// Who needs the most, when it is one workload's doing (`; most of them ...`).
        detail: String,
    },
    /// A map that fills at run time (learned addresses, cgroups) has no room for an entry.
    #[error("the kernel's {map} map is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    #[error("map capacity for {map}: {problem}")]
    Capacity { map: String, problem: String },
}

impl DatapathError {
    /// Whether `apply` failed before writing anything (the policy did not fit or did not
    /// compile), so that the maps still hold the policy in force.
    pub fn wrote_nothing(&self) -> bool {
        matches!(
            self,
            DatapathError::PolicyTooLarge { .. }
                | DatapathError::SwitchTooLarge { .. }
                | DatapathError::TooManyPortRules { .. }
                | DatapathError::WorkloadIdOutOfRange { .. }
        )
    }
}

pub(crate) fn map_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        action,
        source: Box::new(source),
    }
}

pub(crate) fn program_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        action,
        source: Box::new(source),
    }
}

pub(crate) fn mode_to_raw(mode: Mode) -> u32 {
    match mode {
        Mode::Learning => MODE_LEARNING,
        Mode::Audit => MODE_AUDIT,
        Mode::Strict => MODE_STRICT,
    }
}

pub(crate) fn mode_from_raw(mode: u32) -> Mode {
    match mode {
        MODE_AUDIT => Mode::Audit,
        MODE_STRICT => Mode::Strict,
        _ => Mode::Learning,
    }
}

/// One workload as the datapath enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Stable id, 1..=MAX_WORKLOAD_ID, chosen by the caller.
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub raw_sockets: bool,
    /// `dns_queries = "allowlisted"`.
    pub dns_allowlisted: bool,
    /// The workload's own cgroups (descendants are found by the kernel).
    pub cgroup_ids: Vec<u64>,
    pub rules: Vec<CidrRule>,
}

/// An FQDN rule: the kernel allows the addresses of validated answers for the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnSpec {
    pub workload: u32,
    /// Lowercase, no trailing dot; for a wildcard (`*.example.com`) the suffix (`example.com`).
    pub name: String,
    /// Names below `name` match, not `name` itself.
    pub wildcard: bool,
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
}

/// Everything the datapath enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathPolicy {
    pub workloads: Vec<WorkloadSpec>,
    pub fqdn: Vec<FqdnSpec>,
    /// Resolvers whose answers count; DNS to them on port 53 is allowed.
    pub resolvers: Vec<std::net::IpAddr>,
    /// Search domains (lowercase, no trailing dot): a workload with `dns_allowlisted` may ask
    /// about each of its FQDN rules' names with one of these appended.
    pub dns_search_domains: Vec<String>,
    /// Denied for every workload.
    pub deny: Vec<IpNet>,
    /// Workload for processes in no workload, or None to leave them alone.
    pub unmatched: Option<u32>,
}

/// What an `apply` changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub allow_entries: usize,
    pub allow_written: usize,
    pub allow_removed: usize,
    pub cgroups: usize,
    pub generation: u32,
}

/// Totals over all CPUs of the kernel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub events: u64,
    pub ring_buffer_drops: u64,
    pub allowed: u64,
    pub denied: u64,
    pub would_deny: u64,
    pub cache_hits: u64,
    pub storage_failures: u64,
    pub dns_answers: u64,
    pub dns_answer_drops: u64,
    /// Answers ignored: not from a resolver, or matching no query the socket sent.
    pub dns_answers_rejected: u64,
    /// Addresses the kernel allowed straight from answers, and those it could not store.
    pub fqdn_inserts: u64,
    pub fqdn_insert_failures: u64,
    /// Flow summaries the kernel could not create (their first sight was still an event).
    pub flow_insert_failures: u64,
    /// DNS queries refused for naming nothing the workload's FQDN rules allow.
    pub dns_queries_refused: u64,
}

/// Protocol names of the decision counters, with a protocol number that falls in each slot.
const DECISION_PROTOCOLS: [(&str, u8); 4] = [("tcp", 6), ("udp", 17), ("icmp", 1), ("other", 0)];

/// Decisions of one workload for one protocol and verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionCount {
    /// tcp, udp, icmp (ICMP and ICMPv6) or other.
    pub protocol: &'static str,
    pub verdict: Verdict,
    pub count: u64,
}

/// A link this daemon attached: pinned (outlives the process) or not (detached on drop).
/// Only ever dropped, never read.
#[allow(dead_code)]
enum OwnedLink {
    Pinned(PinnedLink),
    Fd(FdLink),
}

pub struct Datapath {
    /// The object once its programs are loaded; until then the [`programs::Verification`]
    /// loading them holds it.
    ebpf: Option<Ebpf>,
    verification: Option<programs::Verification>,
    /// The cgroup root, opened at load and held until the programs are attached to it.
    cgroup: Option<File>,
    cgroup_root: PathBuf,
    /// The attached programs, as `name (attach point)`; empty until `attach`.
    programs: Vec<String>,
    pins: Option<pins::PinDir>,
    adopted: bool,
    /// What to attach, once the programs are loaded.
    plan: programs::AttachPlan,
    /// Held for their lifetime: dropping an unpinned link detaches its program.
    _links: Vec<OwnedLink>,
    /// Links of earlier daemons, attached until `retire_previous`.
    previous_links: Vec<PinnedLink>,
    workload_cgroups: HashMap<MapData, u64, u32>,
    workloads: Array<MapData, WorkloadConfig>,
    settings_map: Array<MapData, Settings>,
    allow: LpmTrie<MapData, AllowKey, AllowValue>,
    deny: LpmTrie<MapData, DenyKey, u32>,
    counters: PerCpuArray<MapData, u64>,
    fqdn: HashMap<MapData, FqdnKey, FqdnValue>,
    fqdn_addresses: HashMap<MapData, AllowKey, AllowValue>,
    resolvers: HashMap<MapData, [u8; 16], u32>,
    decision_counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    dns_answers: Option<RingBuf<MapData>>,
    flows: flows::FlowTable,
    /// Entries of the flow table at the last read.
    flow_entries: usize,
    /// Whether the egress program names the tasks that send data (kernels from 6.10); known
    /// once the programs are loaded.
    sender_tasks: bool,
    clock: events::Clock,
    // Mirrors of what the maps hold, so `apply` writes only differences.
    installed_allow: BTreeMap<(u32, Prefix), rules::CompactAllow>,
    installed_deny: BTreeSet<Prefix>,
    installed_cgroups: BTreeMap<u64, u32>,
    installed_workloads: BTreeMap<u32, WorkloadConfig>,
    installed_fqdn: BTreeMap<(u32, u64), FqdnValue>,
    installed_resolvers: BTreeSet<[u8; 16]>,
    /// Learned addresses the daemon wrote (the kernel may hold more, briefly, from answers the
    /// daemon has not read yet), each with the fingerprint of the value it wrote last, `None`
    /// when unknown (found in the map).
    installed_fqdn_addresses: BTreeMap<(u32, [u8; 16]), Option<NonZeroU64>>,
    /// Mixed into those fingerprints; changed to forget them all at once
    /// (`forget_fqdn_values`).
    fqdn_value_salt: u64,
    /// Learned addresses carried over from another layout's pins at load.
    migrated_fqdn_addresses: usize,
    settings: Settings,
    /// What each map that can fill holds at most, as the kernel says.
    capacity: capacity::Capacities,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("cgroup_root", &self.cgroup_root)
            .field("programs", &self.programs)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the programs and attaches every one of them at `cgroup_root` (a cgroup v2 mount).
    ///
    /// Without `pin_dir`, every map starts empty (nothing is enforced until `apply`) and the
    /// programs detach when the `Datapath` is dropped. With it, maps and links are pinned
    /// there: they outlive the process, and a later `load` with the same folder adopts the
    /// maps (and the policy in them) and attaches its programs beside the previous ones,
    /// which [`Datapath::retire_previous`] detaches once the new policy is applied.
    pub fn load(cgroup_root: &Path, pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        Self::load_with(cgroup_root, pin_dir, &MapCapacities::default())
    }

    /// [`Datapath::load`] with some maps created smaller than the eBPF object declares (for
    /// tests that fill them). Maps adopted from pins keep the size they were created with;
    /// every check and report uses the size the kernel gives.
    pub fn load_with(
        cgroup_root: &Path,
        pin_dir: Option<&Path>,
        capacities: &MapCapacities,
    ) -> Result<Self, DatapathError> {
        let mut datapath = Self::begin_load(cgroup_root, pin_dir, capacities)?;
        datapath.attach()?;
        Ok(datapath)
    }

    /// The first half of [`Datapath::load_with`]: creates (or adopts) the maps and starts
    /// loading the programs on threads of their own, which takes the verifier most of a
    /// second; nothing is attached until [`Datapath::attach`].
    ///
    /// Meanwhile `apply` can fill the maps. New maps are read by no program yet, so they are
    /// written at once; adopted ones are read by the previous daemon's programs, so `apply`
    /// first waits for every program to load: a program the verifier refuses still leaves
    /// the previous daemon enforcing its own policy, untouched.
    pub fn begin_load(
        cgroup_root: &Path,
        pin_dir: Option<&Path>,
        capacities: &MapCapacities,
    ) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        // Before any pin or map exists: an unsuitable kernel changes nothing on the host.
        let missing = kernel::missing_features();
        if !missing.is_empty() {
            return Err(DatapathError::KernelLacks {
                kernel: kernel::release(),
                missing,
            });
        }
        let pins = pin_dir
            .map(|dir| pins::PinDir::prepare(dir, LAYOUT_VERSION))
            .transpose()?;
        let adopted = pins.as_ref().is_some_and(pins::PinDir::has_maps);
        // Held (attached) until retire_previous; opened before ours exist.
        let previous_links = match &pins {
            Some(pins) => pins.previous_links()?,
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> = pins
            .iter()
            .flat_map(|pins| pins::PINNED_MAPS.map(|name| (name, pins.map(name))))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        capacities.apply(&mut loader);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for (name, _) in ebpf.maps() {
            if !pins::PINNED_MAPS.contains(&name) && !pins::UNPINNED_MAPS.contains(&name) {
                return Err(DatapathError::UnclassifiedMap {
                    name: name.to_owned(),
                });
            }
        }

        let mut maps = MapSet { ebpf: &mut ebpf };
        let declared = capacity::Capacities::default();
        let mut capacity = declared;
        let map = maps.take("WORKLOAD_CGROUPS")?;
        capacity.workload_cgroups = capacity::of(&map, declared.workload_cgroups);
        let workload_cgroups =
            HashMap::try_from(map).map_err(map_err("WORKLOAD_CGROUPS", "opening"))?;
        let workloads =
            Array::try_from(maps.take("WORKLOADS")?).map_err(map_err("WORKLOADS", "opening"))?;
        let mut settings_map =
            Array::try_from(maps.take("SETTINGS")?).map_err(map_err("SETTINGS", "opening"))?;
        let map = maps.take("ALLOW")?;
        capacity.allow = capacity::of(&map, declared.allow);
        let allow = LpmTrie::try_from(map).map_err(map_err("ALLOW", "opening"))?;
        let map = maps.take("DENY")?;
        capacity.deny = capacity::of(&map, declared.deny);
        let deny = LpmTrie::try_from(map).map_err(map_err("DENY", "opening"))?;
        let counters = PerCpuArray::try_from(maps.take("COUNTERS")?)
            .map_err(map_err("COUNTERS", "opening"))?;
        let map = maps.take("FQDN")?;
        capacity.fqdn = capacity::of(&map, declared.fqdn);
        let fqdn = HashMap::try_from(map).map_err(map_err("FQDN", "opening"))?;
        let map = maps.take("FQDN_ADDRESSES")?;
        capacity.fqdn_addresses = capacity::of(&map, declared.fqdn_addresses);
        let mut fqdn_addresses =
            HashMap::try_from(map).map_err(map_err("FQDN_ADDRESSES", "opening"))?;
        // Before our programs attach: they must not refuse what the old ones allow.
        let migrated_fqdn_addresses = match (&pins, adopted) {
            (Some(pins), false) => migrate_fqdn_addresses(pins, &mut fqdn_addresses),
            _ => BTreeSet::new(),
        };
        let map = maps.take("RESOLVERS")?;
        capacity.resolvers = capacity::of(&map, declared.resolvers);
        let resolvers = HashMap::try_from(map).map_err(map_err("RESOLVERS", "opening"))?;
        let decision_counters = PerCpuArray::try_from(maps.take("DECISION_COUNTERS")?)
            .map_err(map_err("DECISION_COUNTERS", "opening"))?;
        let events =
            RingBuf::try_from(maps.take("EVENTS")?).map_err(map_err("EVENTS", "opening"))?;
        let dns_answers = RingBuf::try_from(maps.take("DNS_ANSWERS")?)
            .map_err(map_err("DNS_ANSWERS", "opening"))?;
        let map = maps.take("FLOWS")?;
        capacity.flows = capacity::of(&map, declared.flows);
        let flow_map = HashMap::try_from(map).map_err(map_err("FLOWS", "opening"))?;

        let settings = if adopted {
            let pinned: Settings = settings_map
                .get(&0, 0)
                .map_err(map_err("SETTINGS", "reading"))?;
            if pinned.layout_version != LAYOUT_VERSION {
                return Err(DatapathError::PinnedLayout {
                    found: pinned.layout_version,
                    expected: LAYOUT_VERSION,
                });
            }
            pinned
        } else {
            let settings = Settings {
                generation: 1,
                unmatched_workload: NO_WORKLOAD,
                layout_version: LAYOUT_VERSION,
                reserved: 0,
            };
            settings_map
                .set(0, settings, 0)
                .map_err(map_err("SETTINGS", "writing"))?;
            settings
        };

        let cgroup = File::open(cgroup_root).map_err(|source| DatapathError::CgroupRoot {
            path: cgroup_root.to_owned(),
            source,
        })?;
        let verification = programs::Verification::start(ebpf)?;

        let mut datapath = Datapath {
            ebpf: None,
            verification: Some(verification),
            cgroup: Some(cgroup),
            cgroup_root: cgroup_root.to_owned(),
            programs: Vec::new(),
            pins,
            adopted,
            plan: Vec::new(),
            _links: Vec::new(),
            previous_links,
            workload_cgroups,
            workloads,
            settings_map,
            allow,
            deny,
            counters,
            fqdn,
            fqdn_addresses,
            resolvers,
            decision_counters,
            events: Some(events),
            dns_answers: Some(dns_answers),
            flows: flows::FlowTable::new(flow_map),
            flow_entries: 0,
            sender_tasks: false,
            clock: events::Clock::new(),
            installed_allow: BTreeMap::new(),
            installed_deny: BTreeSet::new(),
            installed_cgroups: BTreeMap::new(),
            installed_workloads: BTreeMap::new(),
            installed_fqdn: BTreeMap::new(),
            installed_resolvers: BTreeSet::new(),
            migrated_fqdn_addresses: migrated_fqdn_addresses.len(),
            installed_fqdn_addresses: migrated_fqdn_addresses
                .into_iter()
                .map(|key| (key, None))
                .collect(),
            fqdn_value_salt: 0,
            settings,
            capacity,
        };
        if adopted {
            datapath.read_back_maps()?;
        }
        Ok(datapath)
    }

    /// Waits until every program is loaded (see [`Datapath::begin_load`]); a refusal by the
    /// verifier comes out here, with nothing attached.
    fn wait_loaded(&mut self) -> Result<&mut Ebpf, DatapathError> {
        if let Some(verification) = self.verification.take() {
            let verified = verification.wait()?;
            self.sender_tasks = verified.sender_tasks;
            self.plan = verified.plan;
            self.ebpf = Some(verified.ebpf);
        }
        // Only a failed load leaves neither.
        self.ebpf.as_mut().ok_or(DatapathError::LoadFailed)
    }

    /// Attaches every program at the cgroup root, once all of them are loaded; the second
    /// half of [`Datapath::load_with`]. Does nothing when they are attached already.
    pub fn attach(&mut self) -> Result<(), DatapathError> {
        if self.cgroup.is_none() {
            return Ok(());
        }
        self.wait_loaded()?;
        let (Some(ebpf), Some(cgroup)) = (self.ebpf.as_mut(), self.cgroup.as_ref()) else {
            return Err(DatapathError::LoadFailed);
        };
        let attached = programs::attach_all(ebpf, cgroup, &self.plan)?;
        let mut programs = Vec::with_capacity(attached.len());
        let mut links = Vec::with_capacity(attached.len());
        for (name, description, link) in attached {
            programs.push(description);
            links.push(match &self.pins {
                Some(pins) => OwnedLink::Pinned(pins.pin_link(name, link)?),
                None => OwnedLink::Fd(link),
            });
        }
        self.programs = programs;
        self._links = links;
        // Attached: the root is no longer needed, and a later call has nothing to do.
        self.cgroup = None;
        Ok(())
    }

    /// Before a write to maps that the previous daemon's programs read: see
    /// [`Datapath::begin_load`].
    fn before_write(&mut self) -> Result<(), DatapathError> {
        if self.adopted {
            self.wait_loaded()?;
        }
        Ok(())
    }

    /// Where maps and links are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(pins::PinDir::root)
    }

    /// Whether the maps (and the policy in them) were adopted from pins of an earlier daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Learned addresses carried over from the pins of another layout version (see
    /// [`migrate_fqdn_addresses`]); 0 when the maps were adopted or new.
    pub fn migrated_fqdn_addresses(&self) -> usize {
        self.migrated_fqdn_addresses
    }

    /// Detaches the programs of earlier daemons found at `load`; call once this daemon's
    /// policy is in the maps. Returns how many links were retired.
    pub fn retire_previous(&mut self) -> Result<usize, DatapathError> {
        let previous = std::mem::take(&mut self.previous_links);
        match &self.pins {
            Some(pins) => Ok(pins.retire(previous)?),
            None => Ok(0),
        }
    }

    /// Fills the mirrors from adopted maps, so that `apply` writes only what differs.
    fn read_back_maps(&mut self) -> Result<(), DatapathError> {
        for entry in self.allow.iter() {
            let (key, value) = entry.map_err(map_err("ALLOW", "reading"))?;
            let data = key.data();
            let prefix_len = key
                .prefix_len()
                .saturating_sub(policy_limits::ALLOW_KEY_WORKLOAD_BITS);
            self.installed_allow.insert(
                (
                    u32::from_be_bytes(data.workload_be),
                    (data.addr, u8::try_from(prefix_len).unwrap_or(128)),
                ),
                rules::CompactAllow::new(&value),
            );
        }
        for entry in self.deny.iter() {
            let (key, _) = entry.map_err(map_err("DENY", "reading"))?;
            self.installed_deny.insert((
                key.data().addr,
                u8::try_from(key.prefix_len()).unwrap_or(128),
            ));
        }
        for entry in self.workload_cgroups.iter() {
            let (cgroup, workload) = entry.map_err(map_err("WORKLOAD_CGROUPS", "reading"))?;
            self.installed_cgroups.insert(cgroup, workload);
        }
        for id in 1..=MAX_WORKLOAD_ID {
            let config = self
                .workloads
                .get(&id, 0)
                .map_err(map_err("WORKLOADS", "reading"))?;
            if config.flags & WORKLOAD_FLAG_ACTIVE != 0 {
                self.installed_workloads.insert(id, config);
            }
        }
        for entry in self.fqdn.iter() {
            let (key, value) = entry.map_err(map_err("FQDN", "reading"))?;
            self.installed_fqdn.insert((key.workload, key.hash), value);
        }
        for entry in self.resolvers.keys() {
            let addr = entry.map_err(map_err("RESOLVERS", "reading"))?;
            self.installed_resolvers.insert(addr);
        }
        for entry in self.fqdn_addresses.keys() {
            let key = entry.map_err(map_err("FQDN_ADDRESSES", "reading"))?;
            self.installed_fqdn_addresses
                .insert((u32::from_be_bytes(key.workload_be), key.addr), None);
        }
        Ok(())
    }

    /// Learned addresses the kernel holds, with the workload they are allowed for.
    pub fn fqdn_addresses(&self) -> Vec<(u32, std::net::IpAddr)> {
        self.installed_fqdn_addresses
            .keys()
            .map(|&(workload, addr)| (workload, canonical_addr(addr)))
            .collect()
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The attached programs, as `name (attach point)`.
    pub fn programs(&self) -> &[String] {
        &self.programs
    }

    /// The kernel log of the programs (aya-log), to be forwarded to the `log` facade; waits
    /// for the programs to load.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        aya_log::EbpfLogger::init(self.wait_loaded().ok()?)
            .ok()
            // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns it.
            .and_then(|logger| {
                unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        logger,
                        tokio::io::Interest::READABLE,
                    )
                }
                .ok()
            })
            .map(|logger| KernelLog { logger })
    }

    /// Whether flow summaries name the tasks that write data on connected sockets (the
    /// kernel lets cgroup_skb programs see the current task from 6.10 on).
    pub fn sender_tasks(&self) -> bool {
        self.sender_tasks
    }

    /// Hands every per-destination flow summary the kernel holds now (running totals) to
    /// `visit`, one at a time, and returns how many there were.
    pub fn visit_flow_summaries(
        &mut self,
        visit: impl FnMut(FlowSummary),
    ) -> Result<usize, DatapathError> {
        let walked = self.flows.visit(&self.clock, visit)?;
        self.flow_entries = walked;
        Ok(walked)
    }

    /// The event stream; can be taken once.
    pub fn take_events(&mut self) -> Result<EventStream, DatapathError> {
        let ring = self.events.take().ok_or(DatapathError::EventsTaken)?;
        EventStream::new(ring, self.clock)
    }

    /// The DNS answers workloads receive; can be taken once.
    pub fn take_dns_answers(&mut self) -> Result<DnsAnswerStream, DatapathError> {
        let ring = self.dns_answers.take().ok_or(DatapathError::EventsTaken)?;
        DnsAnswerStream::new(ring, self.clock)
    }

    /// Makes the maps hold exactly `policy`, writing only what differs from what they hold.
    ///
    /// The kernel keeps deciding while the maps change, one entry at a time, so the order
    /// makes every decision one that the old or the new policy would make: whatever both
    /// allow stays allowed and whatever both refuse stays refused throughout.
    ///
    /// 1. Workloads that refuse nothing new (learning or audit, raw sockets allowed, or no
    ///    change of strictness) take their new mode and flags; new workloads are set up
    ///    (no cgroup maps to them yet).
    /// 2. New deny entries, then new and changed allow, FQDN and resolver entries: the
    ///    allow trie holds both policies' entries, each lookup's longest match being the old
    ///    or the new policy's, and the deny list both policies' (so a wider new allow entry
    ///    never shows before the deny entry that carves a hole in it).
    /// 3. The cgroup table, then removals of allow, deny, FQDN and resolver entries.
    /// 4. Workloads that now refuse more (to strict, raw sockets withdrawn) take their new
    ///    mode only now, when every entry of the new policy is in place; then removed
    ///    workloads are cleared.
    /// 5. The generation bump that makes sockets re-check their cached verdicts.
    ///
    /// Both policies' entries must fit in the maps at once; when they do not, nothing is
    /// written and the error says so. What stays outside this guarantee: a cgroup that moves
    /// to another workload in the same reload switches when the cgroup table is written,
    /// between the other steps.
    pub fn apply(&mut self, policy: &DatapathPolicy) -> Result<ApplyStats, DatapathError> {
        // Compile everything before touching a map, so an error changes nothing.
        let mut desired_allow: BTreeMap<(u32, Prefix), rules::CompactAllow> = BTreeMap::new();
        let mut desired_workloads: BTreeMap<u32, WorkloadConfig> = BTreeMap::new();
        let mut desired_cgroups: BTreeMap<u64, u32> = BTreeMap::new();
        for workload in &policy.workloads {
            if workload.id == NO_WORKLOAD || workload.id > MAX_WORKLOAD_ID {
                return Err(DatapathError::WorkloadIdOutOfRange { id: workload.id });
            }
            for (prefix, value) in rules::compile_workload(&workload.name, &workload.rules)? {
                desired_allow.insert((workload.id, prefix), rules::CompactAllow::new(&value));
            }
            desired_workloads.insert(
                workload.id,
                workload_config(
                    workload.mode,
                    workload.raw_sockets,
                    workload.dns_allowlisted,
                ),
            );
            for &cgroup_id in &workload.cgroup_ids {
                desired_cgroups.insert(cgroup_id, workload.id);
            }
        }
        if let Some(id) = policy.unmatched
            && !desired_workloads.contains_key(&id)
        {
            return Err(DatapathError::WorkloadIdOutOfRange { id });
        }
        let desired_deny: BTreeSet<Prefix> = policy.deny.iter().map(rules::to_prefix).collect();
        let desired_fqdn =
            compile_fqdn(&policy.fqdn, &policy.workloads, &policy.dns_search_domains)?;
        let desired_resolvers: BTreeSet<[u8; 16]> = policy
            .resolvers
            .iter()
            .map(|ip| rules::to_prefix(&IpNet::from(*ip)).0)
            .collect();

        self.check_fits(
            policy,
            &desired_allow,
            &desired_deny,
            &desired_fqdn,
            &desired_cgroups,
            &desired_resolvers,
        )?;

        self.before_write()?;
        let mut stats = ApplyStats {
            allow_entries: desired_allow.len(),
            cgroups: desired_cgroups.len(),
            ..Default::default()
        };

        let (tightened, loosened): (Vec<_>, Vec<_>) = desired_workloads
            .iter()
            .filter(|(id, config)| self.installed_workloads.get(id) != Some(config))
            .map(|(&id, &config)| (id, config))
            .partition(|(id, config)| {
                self.installed_workloads
                    .get(id)
                    .is_some_and(|old| refuses_more(old, config))
            });
        for (id, config) in loosened {
            self.write_workload(id, config)?;
        }
        for prefix in &desired_deny {
            if !self.installed_deny.contains(prefix) {
                self.deny
                    .insert(&rules::deny_key(prefix), 1, 0)
                    .map_err(map_err("DENY", "inserting"))?;
                self.installed_deny.insert(*prefix);
            }
        }
        for (key, value) in &desired_allow {
            if self.installed_allow.get(key) != Some(value) {
                self.allow
                    .insert(&rules::allow_key(key.0, &key.1), value.value(), 0)
                    .map_err(map_err("ALLOW", "inserting"))?;
                self.installed_allow.insert(*key, value.clone());
                stats.allow_written += 1;
            }
        }
        for (&(workload, hash), value) in &desired_fqdn {
            if self.installed_fqdn.get(&(workload, hash)) != Some(value) {
                self.fqdn
                    .insert(fqdn_key(workload, hash), value, 0)
                    .map_err(map_err("FQDN", "inserting"))?;
                self.installed_fqdn.insert((workload, hash), *value);
            }
        }
        for addr in &desired_resolvers {
            if !self.installed_resolvers.contains(addr) {
                self.resolvers
                    .insert(addr, 1, 0)
                    .map_err(map_err("RESOLVERS", "inserting"))?;
                self.installed_resolvers.insert(*addr);
            }
        }
        // check_fits made sure every desired cgroup has room once the stale ones are gone.
        if !self.sync_cgroup_map(&desired_cgroups)?.is_empty() {
            return Err(DatapathError::MapFull {
                map: "workload_cgroups",
                capacity: self.capacity.workload_cgroups,
            });
        }

        let stale_allow: Vec<(u32, Prefix)> = self
            .installed_allow
            .keys()
            .filter(|key| !desired_allow.contains_key(key))
            .copied()
            .collect();
        for key in stale_allow {
            remove_ignoring_absent(self.allow.remove(&rules::allow_key(key.0, &key.1)))
                .map_err(map_err("ALLOW", "removing"))?;
            self.installed_allow.remove(&key);
            stats.allow_removed += 1;
        }
        let stale_deny: Vec<Prefix> = self
            .installed_deny
            .difference(&desired_deny)
            .copied()
            .collect();
        for prefix in stale_deny {
            remove_ignoring_absent(self.deny.remove(&rules::deny_key(&prefix)))
                .map_err(map_err("DENY", "removing"))?;
            self.installed_deny.remove(&prefix);
        }
        let stale_fqdn: Vec<(u32, u64)> = self
            .installed_fqdn
            .keys()
            .filter(|key| !desired_fqdn.contains_key(key))
            .copied()
            .collect();
        for (workload, hash) in stale_fqdn {
            remove_ignoring_absent(self.fqdn.remove(&fqdn_key(workload, hash)))
                .map_err(map_err("FQDN", "removing"))?;
            self.installed_fqdn.remove(&(workload, hash));
        }
        let stale_resolvers: Vec<[u8; 16]> = self
            .installed_resolvers
            .difference(&desired_resolvers)
            .copied()
            .collect();
        for addr in stale_resolvers {
            remove_ignoring_absent(self.resolvers.remove(&addr))
                .map_err(map_err("RESOLVERS", "removing"))?;
            self.installed_resolvers.remove(&addr);
        }
        for (id, config) in tightened {
            self.write_workload(id, config)?;
        }
        let stale_workloads: Vec<u32> = self
            .installed_workloads
            .keys()
            .filter(|id| !desired_workloads.contains_key(id))
            .copied()
            .collect();
        for id in stale_workloads {
            self.workloads
                .set(id, WorkloadConfig::default(), 0)
                .map_err(map_err("WORKLOADS", "clearing"))?;
            self.installed_workloads.remove(&id);
        }

        self.settings.unmatched_workload = policy.unmatched.unwrap_or(NO_WORKLOAD);
        self.bump_generation()?;
        stats.generation = self.settings.generation;
        Ok(stats)
    }

    /// Refuses, before anything is written, a policy that does not fit in the maps: alone
    /// ([`DatapathError::PolicyTooLarge`]), or next to the policy in force while it switches
    /// ([`DatapathError::SwitchTooLarge`]). The cgroup table needs no room for both: cgroups
    /// that no workload matches any more leave it before new ones come in.
    fn check_fits(
        &self,
        policy: &DatapathPolicy,
        allow: &BTreeMap<(u32, Prefix), rules::CompactAllow>,
        deny: &BTreeSet<Prefix>,
        fqdn: &BTreeMap<(u32, u64), FqdnValue>,
        cgroups: &BTreeMap<u64, u32>,
        resolvers: &BTreeSet<[u8; 16]>,
    ) -> Result<(), DatapathError> {
        let name_of = |id: u32| {
            policy
                .workloads
                .iter()
                .find(|w| w.id == id)
                .map_or_else(|| id.to_string(), |w| w.name.clone())
        };
        // The workload that needs the most entries of a map, for the message.
        let largest = |ids: &mut dyn Iterator<Item = u32>, what: &str| {
            let mut per_workload: BTreeMap<u32, usize> = BTreeMap::new();
            for id in ids {
                *per_workload.entry(id).or_default() += 1;
            }
            per_workload
                .into_iter()
                .max_by_key(|&(_, count)| count)
                .map(|(id, count)| format!("; workload {:?} {what} {count} of them", name_of(id)))
                .unwrap_or_default()
        };
        let capacity = self.capacity;
        let too_large = |map: &'static str, needed: usize, capacity: u32, detail: String| {
            DatapathError::PolicyTooLarge {
                map,
                needed,
                capacity,
                detail,
            }
        };
        if allow.len() > capacity.allow as usize {
            let detail = largest(&mut allow.keys().map(|key| key.0), "needs");
            return Err(too_large("allow", allow.len(), capacity.allow, detail));
        }
        if deny.len() > capacity.deny as usize {
            let detail = " (one per prefix of defaults.deny)".to_owned();
            return Err(too_large("deny", deny.len(), capacity.deny, detail));
        }
        if fqdn.len() > capacity.fqdn as usize {
            let detail = largest(&mut fqdn.keys().map(|key| key.0), "needs");
            return Err(too_large("fqdn", fqdn.len(), capacity.fqdn, detail));
        }
        if cgroups.len() > capacity.workload_cgroups as usize {
            let detail = largest(&mut cgroups.values().copied(), "matches");
            return Err(too_large(
                "workload_cgroups",
                cgroups.len(),
                capacity.workload_cgroups,
                format!(" (one per cgroup a workload's pattern matches){detail}"),
            ));
        }
        if resolvers.len() > capacity.resolvers as usize {
            let detail = " (one per resolver of dns.resolvers)".to_owned();
            return Err(too_large(
                "resolvers",
                resolvers.len(),
                capacity.resolvers,
                detail,
            ));
        }
        // While switching, the maps hold the entries of both policies.
        let union_sizes = [
            (
                "allow",
                union_len(&self.installed_allow, allow),
                capacity.allow,
            ),
            (
                "deny",
                self.installed_deny.union(deny).count(),
                capacity.deny,
            ),
            ("fqdn", union_len(&self.installed_fqdn, fqdn), capacity.fqdn),
            (
                "resolvers",
                self.installed_resolvers.union(resolvers).count(),
                capacity.resolvers,
            ),
        ];
        for (map, needed, capacity) in union_sizes {
            if needed > capacity as usize {
                return Err(DatapathError::SwitchTooLarge {
                    map,
                    needed,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// Replaces the cgroup → workload table alone (new cgroups that match a workload's glob).
    ///
    /// Cgroups that no longer match leave first; then new ones are added, lowest id (oldest
    /// cgroup) first, as long as the map has room. Returns those that did not fit, as
    /// `(cgroup id, workload)`: the kernel cannot tell that their processes belong to a
    /// workload, so they are treated as in none (`defaults.unmatched`). A later call adds
    /// them once there is room.
    pub fn set_workload_cgroups(
        &mut self,
        cgroups: &BTreeMap<u64, u32>,
    ) -> Result<Vec<(u64, u32)>, DatapathError> {
        if *cgroups == self.installed_cgroups {
            return Ok(Vec::new());
        }
        self.before_write()?;
        let before = self.installed_cgroups.clone();
        let left_out = self.sync_cgroup_map(cgroups)?;
        if self.installed_cgroups != before {
            self.bump_generation()?;
        }
        Ok(left_out)
    }

    /// Switches one workload's mode: one map write.
    pub fn set_mode(
        &mut self,
        id: u32,
        mode: Mode,
        raw_sockets: bool,
    ) -> Result<(), DatapathError> {
        if id == NO_WORKLOAD || id > MAX_WORKLOAD_ID {
            return Err(DatapathError::WorkloadIdOutOfRange { id });
        }
        // The DNS setting is the policy's, unchanged by a mode switch.
        let dns_allowlisted = self
            .installed_workloads
            .get(&id)
            .is_some_and(|config| config.flags & WORKLOAD_FLAG_DNS_ALLOWLISTED != 0);
        let config = workload_config(mode, raw_sockets, dns_allowlisted);
        self.before_write()?;
        self.workloads
            .set(id, config, 0)
            .map_err(map_err("WORKLOADS", "writing"))?;
        self.installed_workloads.insert(id, config);
        self.bump_generation()
    }

    /// One of the kernel's counters, summed over the CPUs.
    fn counter_total(&self, index: u32) -> Result<u64, DatapathError> {
        let values = self
            .counters
            .get(&index, 0)
            .map_err(map_err("COUNTERS", "reading"))?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// DNS answers the kernel could not hand to the daemon (ring full): one read, for checks
    /// too frequent to read every counter.
    pub fn dns_answer_drops(&self) -> Result<u64, DatapathError> {
        self.counter_total(counters::COUNTER_DNS_DROPS)
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let total = |index: u32| self.counter_total(index);
        Ok(Counters {
            events: total(counters::COUNTER_EVENTS)?,
            ring_buffer_drops: total(counters::COUNTER_RING_DROPS)?,
            allowed: total(counters::COUNTER_ALLOWED)?,
            denied: total(counters::COUNTER_DENIED)?,
            would_deny: total(counters::COUNTER_WOULD_DENY)?,
            cache_hits: total(counters::COUNTER_CACHE_HITS)?,
            storage_failures: total(counters::COUNTER_STORAGE_FAILURES)?,
            dns_answers: total(counters::COUNTER_DNS_ANSWERS)?,
            dns_answer_drops: total(counters::COUNTER_DNS_DROPS)?,
            dns_answers_rejected: total(counters::COUNTER_DNS_REJECTED)?,
            fqdn_inserts: total(counters::COUNTER_FQDN_INSERTS)?,
            fqdn_insert_failures: total(counters::COUNTER_FQDN_INSERT_FAILURES)?,
            flow_insert_failures: total(counters::COUNTER_FLOW_INSERT_FAILURES)?,
            dns_queries_refused: total(counters::COUNTER_DNS_QUERIES_REFUSED)?,
        })
    }

    /// Sets (Some) or removes (None) the port rules of an address learned from DNS answers.
    /// More distinct rules than an entry holds keep the first that fit.
    ///
    /// `kernel_unchanged`: the caller knows the kernel changed no entry that the daemon has
    /// not rewritten since (it reads every answer the kernel allowed addresses from, in order,
    /// and this one changed none: `DnsAnswer::entries_unchanged`; a lost or unreadable answer
    /// must be followed by [`Datapath::forget_fqdn_values`]). Then an entry already written
    /// with these rules is left as it is, without a system call: most answers renew addresses
    /// the daemon wrote moments ago.
    pub fn set_fqdn_address(
        &mut self,
        workload: u32,
        addr: std::net::IpAddr,
        rules: Option<&[(Vec<PortRange>, Protocol)]>,
        kernel_unchanged: bool,
    ) -> Result<(), DatapathError> {
        let bytes = rules::to_prefix(&IpNet::from(addr)).0;
        let key = AllowKey {
            workload_be: workload.to_be_bytes(),
            addr: bytes,
        };
        match rules {
            Some(rules) => {
                let port_rules: Vec<PortRule> = rules
                    .iter()
                    .flat_map(|(ports, protocol)| rules::port_rules_of(ports, *protocol))
                    .collect();
                let (count, array) = rules::rule_array_truncated(port_rules);
                let value = AllowValue {
                    count,
                    flags: ALLOW_FLAG_DYNAMIC,
                    rules: array,
                };
                let fingerprint = fingerprint(&value, self.fqdn_value_salt);
                if kernel_unchanged
                    && self.installed_fqdn_addresses.get(&(workload, bytes))
                        == Some(&Some(fingerprint))
                {
                    return Ok(());
                }
                self.before_write()?;
                self.fqdn_addresses.insert(key, value, 0).map_err(|error| {
                    if capacity::is_full(&error) {
                        DatapathError::MapFull {
                            map: "fqdn_addresses",
                            capacity: self.capacity.fqdn_addresses,
                        }
                    } else {
                        map_err("FQDN_ADDRESSES", "inserting")(error)
                    }
                })?;
                self.installed_fqdn_addresses
                    .insert((workload, bytes), Some(fingerprint));
            }
            None => {
                self.before_write()?;
                remove_ignoring_absent(self.fqdn_addresses.remove(&key))
                    .map_err(map_err("FQDN_ADDRESSES", "removing"))?;
                self.installed_fqdn_addresses.remove(&(workload, bytes));
            }
        }
        Ok(())
    }

    /// Forgets which values the daemon wrote to learned addresses, so that each is written
    /// again at its next update: for when the kernel may have changed entries through an
    /// answer the daemon never read whole. Constant time: a workload can send such answers
    /// as often as it likes.
    pub fn forget_fqdn_values(&mut self) {
        self.fqdn_value_salt = self.fqdn_value_salt.wrapping_add(1);
    }

    /// Learned addresses in the kernel that the daemon never adopted (their answer was lost
    /// or could not be parsed): `(workload, address)`.
    pub fn unadopted_fqdn_addresses(&self) -> Vec<(u32, std::net::IpAddr)> {
        self.fqdn_addresses
            .keys()
            .filter_map(Result::ok)
            .filter_map(|key| {
                let workload = u32::from_be_bytes(key.workload_be);
                (!self
                    .installed_fqdn_addresses
                    .contains_key(&(workload, key.addr)))
                .then(|| (workload, canonical_addr(key.addr)))
            })
            .collect()
    }

    /// Decisions of one workload so far, by protocol and verdict.
    pub fn decision_counters(&self, workload: u32) -> Result<Vec<DecisionCount>, DatapathError> {
        let mut counts = Vec::new();
        for (protocol, sample) in DECISION_PROTOCOLS {
            for (verdict, verdict_code) in [
                (Verdict::Allow, counters::VERDICT_ALLOW),
                (Verdict::Deny, counters::VERDICT_DENY),
                (Verdict::WouldDeny, counters::VERDICT_WOULD_DENY),
            ] {
                let index = counters::decision_counter_index(workload, sample, verdict_code);
                let values = self
                    .decision_counters
                    .get(&index, 0)
                    .map_err(map_err("DECISION_COUNTERS", "reading"))?;
                counts.push(DecisionCount {
                    protocol,
                    verdict,
                    count: values.iter().copied().fold(0u64, u64::wrapping_add),
                });
            }
        }
        Ok(counts)
    }

    /// Fill levels of the maps with fixed capacity: `(map, entries, capacity)`.
    pub fn map_fill(&self) -> Vec<(&'static str, usize, u32)> {
        let capacity = self.capacity;
        vec![
            ("allow", self.installed_allow.len(), capacity.allow),
            ("deny", self.installed_deny.len(), capacity.deny),
            (
                "workload_cgroups",
                self.installed_cgroups.len(),
                capacity.workload_cgroups,
            ),
            ("workloads", self.installed_workloads.len(), MAX_WORKLOAD_ID),
            ("fqdn", self.installed_fqdn.len(), capacity.fqdn),
            (
                "fqdn_addresses",
                self.installed_fqdn_addresses.len(),
                capacity.fqdn_addresses,
            ),
            (
                "resolvers",
                self.installed_resolvers.len(),
                capacity.resolvers,
            ),
            ("flows", self.flow_entries, capacity.flows),
        ]
    }

    /// How many flow summaries the kernel holds at most.
    pub fn flow_capacity(&self) -> u32 {
        self.capacity.flows
    }

    /// How many learned addresses the kernel holds at most (over all workloads).
    pub fn fqdn_address_capacity(&self) -> u32 {
        self.capacity.fqdn_addresses
    }

    /// How many cgroups the kernel can map to workloads.
    pub fn workload_cgroup_capacity(&self) -> u32 {
        self.capacity.workload_cgroups
    }

    /// Makes the cgroup table hold `desired`, as far as it fits: stale entries go first, then
    /// changed and new ones are written. Returns the new entries that found no room.
    fn sync_cgroup_map(
        &mut self,
        desired: &BTreeMap<u64, u32>,
    ) -> Result<Vec<(u64, u32)>, DatapathError> {
        let stale: Vec<u64> = self
            .installed_cgroups
            .keys()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        for cgroup_id in stale {
            remove_ignoring_absent(self.workload_cgroups.remove(&cgroup_id))
                .map_err(map_err("WORKLOAD_CGROUPS", "removing"))?;
            self.installed_cgroups.remove(&cgroup_id);
        }
        let capacity = self.capacity.workload_cgroups as usize;
        let mut left_out = Vec::new();
        for (&cgroup_id, &workload) in desired {
            let present = self.installed_cgroups.contains_key(&cgroup_id);
            if present && self.installed_cgroups.get(&cgroup_id) == Some(&workload) {
                continue;
            }
            // A changed entry is rewritten in place; a new one needs room.
            if !present && self.installed_cgroups.len() >= capacity {
                left_out.push((cgroup_id, workload));
                continue;
            }
            match self.workload_cgroups.insert(cgroup_id, workload, 0) {
                Ok(()) => {
                    self.installed_cgroups.insert(cgroup_id, workload);
                }
                Err(error) if capacity::is_full(&error) => left_out.push((cgroup_id, workload)),
                Err(error) => return Err(map_err("WORKLOAD_CGROUPS", "inserting")(error)),
            }
        }
        Ok(left_out)
    }

    fn write_workload(&mut self, id: u32, config: WorkloadConfig) -> Result<(), DatapathError> {
        self.workloads
            .set(id, config, 0)
            .map_err(map_err("WORKLOADS", "writing"))?;
        self.installed_workloads.insert(id, config);
        Ok(())
    }

    fn bump_generation(&mut self) -> Result<(), DatapathError> {
        let mut next = self.settings;
        // Generation 0 is what a never-checked socket holds; skip it on wrap-around.
        next.generation = next.generation.wrapping_add(1).max(1);
        self.settings_map
            .set(0, next, 0)
            .map_err(map_err("SETTINGS", "writing"))?;
        self.settings = next;
        Ok(())
    }
}

/// A 16-byte map address as an `IpAddr` (IPv4-mapped as IPv4).
pub(crate) fn canonical_addr(addr: [u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => std::net::IpAddr::V4(v4),
        None => std::net::IpAddr::V6(v6),
    }
}

fn fqdn_key(workload: u32, hash: u64) -> FqdnKey {
    FqdnKey {
        workload,
        reserved: 0,
        hash,
    }
}

/// FQDN map entries: per workload and name hash, the port rules of exact and wildcard names.
fn compile_fqdn(
    specs: &[FqdnSpec],
    workloads: &[WorkloadSpec],
    search_domains: &[String],
) -> Result<BTreeMap<(u32, u64), FqdnValue>, DatapathError> {
    /// Per (workload, name hash): exact rules, wildcard rules, and a name for messages.
    type Rules<'a> = BTreeMap<(u32, u64), (Vec<PortRule>, Vec<PortRule>, &'a str)>;
    let mut rules: Rules = BTreeMap::new();
    for spec in specs {
        let hash = name_hash(spec.name.as_bytes());
        let entry = rules
            .entry((spec.workload, hash))
            .or_insert_with(|| (Vec::new(), Vec::new(), spec.name.as_str()));
        let port_rules = rules::port_rules_of(&spec.ports, spec.protocol);
        if spec.wildcard {
            entry.1.extend(port_rules);
        } else {
            entry.0.extend(port_rules);
        }
    }
    let mut compiled = BTreeMap::new();
    for ((workload, hash), (exact, wildcard, name)) in rules {
        let too_many = |count: usize| DatapathError::TooManyPortRules {
            workload: workloads
                .iter()
                .find(|w| w.id == workload)
                .map_or_else(|| workload.to_string(), |w| w.name.clone()),
            prefix: name.to_owned(),
            count,
            limit: MAX_PORT_RULES,
        };
        let mut value = FqdnValue::default();
        if !exact.is_empty() {
            let (count, array) = rules::rule_array(exact).map_err(too_many)?;
            value.flags |= FQDN_EXACT;
            value.exact_count = count;
            value.exact = array;
        }
        if !wildcard.is_empty() {
            let (count, array) = rules::rule_array(wildcard).map_err(too_many)?;
            value.flags |= FQDN_WILDCARD;
            value.wildcard_count = count;
            value.wildcard = array;
        }
        compiled.insert((workload, hash), value);
    }
    // Search-list expansions of the names of workloads whose questions are checked: askable,
    // granting nothing. An entry that is also a rule keeps its rules.
    let checked: BTreeSet<u32> = workloads
        .iter()
        .filter(|w| w.dns_allowlisted)
        .map(|w| w.id)
        .collect();
    for spec in specs.iter().filter(|spec| checked.contains(&spec.workload)) {
        for domain in search_domains {
            let expanded = format!("{}.{domain}", spec.name);
            if expanded.len() > MAX_NAME_TEXT_LEN {
                // No resolver sends a name this long; nothing to allow.
                continue;
            }
            let value = compiled
                .entry((spec.workload, name_hash(expanded.as_bytes())))
                .or_insert_with(FqdnValue::default);
            value.flags |= if spec.wildcard {
                FQDN_SEARCH_WILDCARD
            } else {
                FQDN_SEARCH_EXACT
            };
        }
    }
    Ok(compiled)
}

/// Longest name in text form (RFC 1035: 255 bytes in wire form).
const MAX_NAME_TEXT_LEN: usize = 253;

fn workload_config(mode: Mode, raw_sockets: bool, dns_allowlisted: bool) -> WorkloadConfig {
    let mut flags = WORKLOAD_FLAG_ACTIVE;
    if raw_sockets {
        flags |= WORKLOAD_FLAG_RAW_SOCKETS;
    }
    if dns_allowlisted {
        flags |= WORKLOAD_FLAG_DNS_ALLOWLISTED;
    }
    WorkloadConfig {
        mode: mode_to_raw(mode),
        flags,
    }
}

/// Whether a workload switching from `old` to `new` refuses something it allowed: it becomes
/// strict, or stays strict and loses raw sockets or starts checking its DNS questions.
/// (Learning and audit refuse nothing.)
fn refuses_more(old: &WorkloadConfig, new: &WorkloadConfig) -> bool {
    let strict = |config: &WorkloadConfig| config.mode == MODE_STRICT;
    let raw = |config: &WorkloadConfig| config.flags & WORKLOAD_FLAG_RAW_SOCKETS != 0;
    let checks_questions =
        |config: &WorkloadConfig| config.flags & WORKLOAD_FLAG_DNS_ALLOWLISTED != 0;
    strict(new)
        && (!strict(old)
            || (raw(old) && !raw(new))
            || (!checks_questions(old) && checks_questions(new)))
}

/// Entries in `installed` and `desired` together.
fn union_len<K: Ord, V>(installed: &BTreeMap<K, V>, desired: &BTreeMap<K, V>) -> usize {
    installed.len()
        + desired
            .keys()
            .filter(|key| !installed.contains_key(key))
            .count()
}

/// A fingerprint of an allow entry's value, to tell whether writing it would change the
/// entry (never 0, so that `Option<NonZeroU64>` takes no more room than a `u64`). `salt`
/// makes every earlier fingerprint a stranger when it changes.
fn fingerprint(value: &AllowValue, salt: u64) -> NonZeroU64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut hasher);
    value.count.hash(&mut hasher);
    value.flags.hash(&mut hasher);
    for rule in &value.rules {
        (
            rule.port_first,
            rule.port_last,
            rule.protocol,
            rule.reserved,
        )
            .hash(&mut hasher);
    }
    NonZeroU64::new(hasher.finish()).unwrap_or(NonZeroU64::MIN)
}

fn remove_ignoring_absent(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

struct MapSet<'a> {
    ebpf: &'a mut Ebpf,
}

impl MapSet<'_> {
    fn take(&mut self, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
        self.ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap { name })
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
/// Copies the addresses learned from DNS answers out of the pins of another layout version
/// into this daemon's new map, before its programs attach. Everything else of another
/// layout is rebuilt from the policy, but these came from answers the new daemon never saw:
/// without them, a connection to an address a workload resolved before the upgrade would be
/// refused until it resolves again. Only a pin whose map type and key and value sizes match
/// this layout's is read (aya checks them when the map is opened); any other is left alone,
/// never misread. Returns the `{workload, address}` pairs copied.
fn migrate_fqdn_addresses(
    pins: &pins::PinDir,
    target: &mut HashMap<MapData, AllowKey, AllowValue>,
) -> BTreeSet<(u32, [u8; 16])> {
    let mut migrated = BTreeSet::new();
    for path in pins.other_layout_maps("FQDN_ADDRESSES") {
        let old = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .and_then(HashMap::<MapData, AllowKey, AllowValue>::try_from);
        let old = match old {
            Ok(old) => old,
            Err(e) => {
                log::info!(
                    "learned addresses in {} are not carried over (their layout differs: {e}); \
                     they are learned again from the next answers",
                    path.display()
                );
                continue;
            }
        };
        for entry in old.iter() {
            let Ok((key, value)) = entry else {
                continue;
            };
            match target.insert(key, value, 0) {
                Ok(()) => {
                    migrated.insert((u32::from_be_bytes(key.workload_be), key.addr));
                }
                Err(e) => {
                    log::warn!(
                        "carrying over a learned address from {}: {e}",
                        path.display()
                    );
                    break;
                }
            }
        }
        log::info!(
            "carried over {} learned addresses from {}",
            migrated.len(),
            path.display()
        );
    }
    migrated
}

fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we own. Failure only matters on old kernels, where
    // loading then fails with a clear EPERM.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Log records from the eBPF programs, forwarded to the `log` facade.
pub struct KernelLog {
    logger: tokio::io::unix::AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl KernelLog {
    /// Forwards records until the runtime shuts down.
    pub async fn run(mut self) {
        loop {
            let Ok(mut guard) = self.logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}

/// The cgroup v2 mount point, read from /proc/self/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| DatapathError::Io {
            what: "reading /proc/self/mounts",
            source,
        })?;
    cgroup2_mount_in(&mounts).ok_or(DatapathError::NoCgroup2)
}

fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces and other characters as octal.
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

#[cfg(test)]
mod mount_tests {
    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid =
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            super::cgroup2_mount_in(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            super::cgroup2_mount_in(unified),
            Some("/sys/fs/cgroup".into())
        );
        assert_eq!(super::cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }
}

#[cfg(test)]
mod switch_order_tests {
    use super::*;

    #[test]
    fn only_becoming_strict_or_losing_raw_sockets_refuses_more() {
        let config = |mode, raw| workload_config(mode, raw, false);
        let cases = [
            (Mode::Learning, false, Mode::Strict, false, true),
            (Mode::Audit, true, Mode::Strict, true, true),
            (Mode::Strict, true, Mode::Strict, false, true),
            (Mode::Strict, false, Mode::Strict, true, false),
            (Mode::Strict, false, Mode::Audit, false, false),
            (Mode::Learning, false, Mode::Audit, false, false),
            (Mode::Audit, true, Mode::Learning, false, false),
        ];
        for (old_mode, old_raw, new_mode, new_raw, expected) in cases {
            assert_eq!(
                refuses_more(&config(old_mode, old_raw), &config(new_mode, new_raw)),
                expected,
                "{old_mode} (raw {old_raw}) -> {new_mode} (raw {new_raw})"
            );
        }
    }

    #[test]
    fn checking_dns_questions_in_strict_mode_refuses_more() {
        let strict = workload_config(Mode::Strict, false, false);
        let strict_checked = workload_config(Mode::Strict, false, true);
        let audit_checked = workload_config(Mode::Audit, false, true);
        assert!(refuses_more(&strict, &strict_checked));
        assert!(!refuses_more(&strict_checked, &strict));
        assert!(!refuses_more(&strict, &audit_checked));
    }

    #[test]
    fn search_domains_make_allowed_names_askable_and_grant_nothing() {
        let workload = |id, dns_allowlisted| WorkloadSpec {
            id,
            name: format!("w{id}"),
            mode: Mode::Strict,
            raw_sockets: false,
            dns_allowlisted,
            cgroup_ids: Vec::new(),
            rules: Vec::new(),
        };
        let spec = |workload, name: &str, wildcard| FqdnSpec {
            workload,
            name: name.into(),
            wildcard,
            ports: vec![PortRange::single(443)],
            protocol: Protocol::Tcp,
        };
        let workloads = [workload(1, true), workload(2, false)];
        let specs = [
            spec(1, "api.vendor.test", false),
            spec(1, "cdn.test", true),
            // Also a rule of its own: keeps its rules and gains the flag.
            spec(1, "api.vendor.test.corp.test", false),
            spec(2, "api.vendor.test", false),
        ];
        let domains = ["corp.test".to_owned(), "svc.local".to_owned()];
        let compiled = compile_fqdn(&specs, &workloads, &domains).expect("compiles");
        let entry = |workload, name: &str| compiled.get(&(workload, name_hash(name.as_bytes())));

        let expanded = entry(1, "api.vendor.test.svc.local").expect("expanded name");
        assert_eq!(expanded.flags, FQDN_SEARCH_EXACT);
        assert_eq!((expanded.exact_count, expanded.wildcard_count), (0, 0));
        let suffix = entry(1, "cdn.test.corp.test").expect("expanded wildcard suffix");
        assert_eq!(suffix.flags, FQDN_SEARCH_WILDCARD);
        let both = entry(1, "api.vendor.test.corp.test").expect("rule and expansion");
        assert_eq!(both.flags, FQDN_EXACT | FQDN_SEARCH_EXACT);
        assert_eq!(both.exact_count, 1);
        assert!(
            entry(2, "api.vendor.test.corp.test").is_none(),
            "a workload whose questions are free needs no expansions"
        );
        // 3 rules of workload 1, 2 of their expansions new per domain but one shared; 1 of 2.
        assert_eq!(compiled.len(), 3 + 5 + 1);
    }

    #[test]
    fn union_counts_shared_keys_once() {
        let installed: BTreeMap<u32, ()> = [(1, ()), (2, ())].into();
        let desired: BTreeMap<u32, ()> = [(2, ()), (3, ()), (4, ())].into();
        assert_eq!(union_len(&installed, &desired), 4);
    }
}
