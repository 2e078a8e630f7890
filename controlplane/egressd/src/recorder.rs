//! The observation recorder: every flush interval it reads the kernel's per-destination flow
//! summaries, turns the growth since the last read into samples (with the DNS name and the
//! processes involved) and writes them to the SQLite store that `egressctl observed`,
//! `suggest` and `diff` read. It runs on its own thread: SQLite and /proc are blocking.
//!
//! What a crash loses: samples not yet flushed (at most one interval). What an overflowing
//! kernel table loses: nothing distinct, because every first sight is also an event, and an
//! event whose summary was evicted before a flush is recorded from the event itself.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use egressd_datapath::{FlowSummary, TaskRef};
use egressd_observe::{
    FlowKey, FlowSample, Process, QuerySample, QueryTallies, Retention, SampleVerdict, Store,
};
use egressd_policy::ObserveSettings;
use egressd_proto::{FlushReport, ObserveStatus};

use crate::control::Shared;

/// The store's file in the state directory.
pub const STORE_FILE: &str = "observations.db";
/// How often old rows are pruned (retention settings).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Executable paths are cached per process for this long (pids are reused).
const PROCESS_CACHE_TTL: Duration = Duration::from_secs(30);
const PROCESS_CACHE_ENTRIES: usize = 4096;
/// Distinct DNS questions (workload, name, type) counted between two flushes: bounded memory
/// under a flood of answers for ever new names.
const MAX_PENDING_QUESTIONS: usize = 200_000;
/// Messages taken from the queue before one flush.
const MAX_DRAINED: usize = 100_000;
/// Pending first-sight events kept while waiting for their summary (bounded memory).
const MAX_PENDING_SIGHTINGS: usize = 100_000;
/// Sightings sent to the recorder thread and not yet taken: beyond this (the thread is stuck
/// in a long flush while a workload is refused thousands of times a second) they are
/// dropped, so the queue's memory stays bounded. A dropped sighting only matters when its
/// destination's kernel summary is also evicted before the next flush.
const MAX_QUEUED_SIGHTINGS: usize = 65_536;

/// A first sight (or refusal) the event stream reported.
#[derive(Debug, Clone)]
pub struct Sighting {
    pub key: FlowKey,
    pub at: SystemTime,
    pub verdict: SampleVerdict,
    pub dns_name: Option<String>,
    pub process: Option<Process>,
}

pub enum Message {
    Sighting(Box<Sighting>),
    /// The questions answered in one batch the daemon read from the kernel: one message
    /// (and at most one wake-up of the recorder thread) per batch, not per answer.
    Questions(Vec<QuerySample>),
    Flush(tokio::sync::oneshot::Sender<Result<FlushReport, String>>),
    Stop,
}

/// What the rest of the daemon holds: a way to send to the recorder thread, and its status.
#[derive(Clone)]
pub struct Handle {
    sender: Sender<Message>,
    status: Arc<Mutex<ObserveStatus>>,
    queue: Arc<SightingQueue>,
}

/// How many sightings wait in the channel, and how many were dropped because too many did.
#[derive(Default)]
struct SightingQueue {
    queued: AtomicUsize,
    dropped: AtomicU64,
}

impl Handle {
    pub fn sighting(&self, sighting: Sighting) {
        if self.queue.queued.load(Ordering::Relaxed) >= MAX_QUEUED_SIGHTINGS {
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queue.queued.fetch_add(1, Ordering::Relaxed);
        // The recorder outlives every sender but at shutdown; nothing to do then.
        if self
            .sender
            .send(Message::Sighting(Box::new(sighting)))
            .is_err()
        {
            self.queue.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn questions(&self, questions: Vec<QuerySample>) {
        if !questions.is_empty() {
            let _ = self.sender.send(Message::Questions(questions));
        }
    }

    /// Asks for a flush and waits for its outcome.
    pub async fn flush(&self) -> Result<FlushReport, String> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.sender
            .send(Message::Flush(reply))
            .map_err(|_| "the observation recorder has stopped".to_owned())?;
        outcome
            .await
            .map_err(|_| "the observation recorder has stopped".to_owned())?
    }

    pub fn status(&self) -> Option<ObserveStatus> {
        self.status.lock().ok().map(|status| status.clone())
    }
}

/// A recorder that is ready to run once the daemon's shared state (which holds its
/// [`Handle`]) exists.
pub struct Unstarted {
    recorder: Recorder,
    receiver: Receiver<Message>,
}

/// Creates the recorder and opens its store (a store that cannot be opened is reported and
/// retried at each flush; enforcement does not depend on it).
pub fn create(state_dir: &Path, settings: ObserveSettings) -> (Handle, Unstarted) {
    let path = state_dir.join(STORE_FILE);
    let status = Arc::new(Mutex::new(ObserveStatus {
        enabled: settings.enabled,
        store: path.display().to_string(),
        flush_interval_ms: settings.flush_interval.as_millis() as u64,
        last_flush: None,
        flush_failures: 0,
        last_error: None,
        samples_written: 0,
        kernel_flows: 0,
        kernel_flow_capacity: 0,
        kernel_flow_insert_failures: 0,
        recovered_from_events: 0,
    }));
    let (sender, receiver) = std::sync::mpsc::channel();
    let queue = Arc::new(SightingQueue::default());
    let mut recorder = Recorder {
        queue: queue.clone(),
        path,
        store: None,
        settings,
        previous: HashMap::new(),
        walk: 0,
        pending: HashMap::new(),
        workload_names: WorkloadNames::default(),
        processes: ProcessCache::new(),
        status: status.clone(),
        last_prune: None,
        questions: QueryTallies::new(),
        questions_dropped: 0,
        flow_table_full: false,
    };
    recorder.open_store();
    (
        Handle {
            sender,
            status,
            queue,
        },
        Unstarted { recorder, receiver },
    )
}

impl Unstarted {
    /// Runs the recorder on its own thread until [`stop`].
    pub fn start(self, shared: Arc<Shared>) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let Unstarted {
            mut recorder,
            receiver,
        } = self;
        let thread = std::thread::Builder::new()
            .name("egressd-recorder".to_owned())
            .spawn(move || recorder.run(&shared, receiver))?;
        Ok(thread)
    }
}

/// Flushes one last time and ends the recorder thread.
pub fn stop(handle: &Handle, thread: std::thread::JoinHandle<()>) {
    if handle.sender.send(Message::Stop).is_ok() && thread.join().is_err() {
        tracing::error!("the observation recorder panicked");
    }
}

/// Identity of one kernel summary: it restarts from zero when `first_seen` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SummaryId {
    workload: u32,
    address: IpAddr,
    port: Option<u16>,
    protocol: u8,
}

impl SummaryId {
    fn of(summary: &FlowSummary) -> Self {
        SummaryId {
            workload: summary.workload,
            address: summary.address,
            port: summary.port,
            protocol: summary.protocol,
        }
    }
}

/// A summary's counters at the last flush, and the walk of the kernel's table that last saw
/// it (summaries the latest walk did not see are gone from the kernel and forgotten).
#[derive(Debug, Clone, Copy)]
struct Seen {
    totals: Totals,
    walk: u32,
}

/// The destination of a pending first sight. Workloads are named by their number in
/// [`WorkloadNames`], so a burst of 100,000 new destinations costs no string per sighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PendingKey {
    workload: u32,
    address: IpAddr,
    port: Option<u16>,
    protocol: u8,
}

/// What a pending first sight keeps until the kernel's summary accounts for it: 80 bytes
/// with its key, as a burst may leave 100,000 of them waiting for the next flush.
#[derive(Debug)]
struct PendingSighting {
    /// Nanoseconds since the Unix epoch (half a `SystemTime`).
    at_ns: u64,
    verdict: SampleVerdict,
    dns_name: Option<Box<str>>,
    comm: ShortName,
}

impl PendingSighting {
    fn at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.at_ns)
    }
}

fn nanos_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// A process name kept inline: the kernel's are at most 15 bytes. A longer one (only a name
/// whose invalid UTF-8 was replaced gets there) is cut at a character boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ShortName([u8; 16]);

impl ShortName {
    fn new(name: &str) -> ShortName {
        let mut end = name.len().min(16);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 16];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        ShortName(bytes)
    }

    /// None for the empty name.
    fn get(&self) -> Option<&str> {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        // Cut at a character boundary when made, so always valid.
        std::str::from_utf8(&self.0[..len])
            .ok()
            .filter(|name| !name.is_empty())
    }
}

/// The names of the workloads pending sightings belong to, numbered.
#[derive(Debug, Default)]
struct WorkloadNames {
    numbers: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl WorkloadNames {
    fn number(&mut self, name: &str) -> u32 {
        if let Some(&number) = self.numbers.get(name) {
            return number;
        }
        let number = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(name);
        self.names.push(Arc::clone(&name));
        self.numbers.insert(name, number);
        number
    }

    fn existing(&self, name: &str) -> Option<u32> {
        self.numbers.get(name).copied()
    }

    fn name(&self, number: u32) -> &str {
        self.names.get(number as usize).map_or("", |name| name)
    }

    fn clear(&mut self) {
        self.numbers.clear();
        self.names.clear();
    }
}

/// The counters of a summary at the last flush.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    first_seen: Option<SystemTime>,
    allowed: u64,
    denied: u64,
    would_deny: u64,
    bytes_sent: u64,
    packets_sent: u64,
    bytes_received: u64,
    packets_received: u64,
}

impl Totals {
    fn of(summary: &FlowSummary) -> Self {
        Totals {
            first_seen: Some(summary.first_seen),
            allowed: summary.allowed,
            denied: summary.denied,
            would_deny: summary.would_deny,
            bytes_sent: summary.bytes_sent,
            packets_sent: summary.packets_sent,
            bytes_received: summary.bytes_received,
            packets_received: summary.packets_received,
        }
    }

    /// Growth from `earlier` (zero totals when the summary is new or was recreated).
    fn since(&self, earlier: &Totals) -> Totals {
        let earlier = if earlier.first_seen == self.first_seen {
            *earlier
        } else {
            Totals::default()
        };
        Totals {
            first_seen: self.first_seen,
            allowed: self.allowed.saturating_sub(earlier.allowed),
            denied: self.denied.saturating_sub(earlier.denied),
            would_deny: self.would_deny.saturating_sub(earlier.would_deny),
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            packets_sent: self.packets_sent.saturating_sub(earlier.packets_sent),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
            packets_received: self
                .packets_received
                .saturating_sub(earlier.packets_received),
        }
    }

    fn is_zero(&self) -> bool {
        self.allowed == 0
            && self.denied == 0
            && self.would_deny == 0
            && self.packets_sent == 0
            && self.packets_received == 0
    }
}

/// One kernel summary with the names the daemon knows for it, and what the walk's caller
/// kept with it.
pub struct NamedFlow<T> {
    pub summary: FlowSummary,
    pub workload: String,
    pub dns_name: Option<String>,
    pub selected: T,
}

/// What the engine hands the recorder at each flush: the summaries the recorder picked
/// during the walk (those that grew), not the whole table.
pub struct FlowSnapshot<T> {
    pub flows: Vec<NamedFlow<T>>,
    /// Summaries in the kernel's table during the walk.
    pub walked: usize,
    /// Absolute cgroup directories per workload name (a sending task must be in one).
    pub workload_cgroups: BTreeMap<String, Vec<PathBuf>>,
    pub settings: ObserveSettings,
    pub capacity: u32,
    pub insert_failures: u64,
}

/// Flows turned into samples and written per step of a flush.
const SAMPLE_BATCH: usize = 4096;

/// How long a flush waits for the ring reader before it reads the flows anyway.
const RING_READ_LIMIT: Duration = Duration::from_millis(200);

struct Recorder {
    path: PathBuf,
    store: Option<Store>,
    settings: ObserveSettings,
    previous: HashMap<SummaryId, Seen>,
    /// Counts the walks of the kernel's table (marks what each walk saw in `previous`).
    walk: u32,
    pending: HashMap<PendingKey, PendingSighting>,
    /// The workloads of pending sightings.
    workload_names: WorkloadNames,
    processes: ProcessCache,
    status: Arc<Mutex<ObserveStatus>>,
    last_prune: Option<Instant>,
    /// DNS questions answered since the last flush, counted per question.
    questions: QueryTallies,
    questions_dropped: u64,
    queue: Arc<SightingQueue>,
    /// Whether the kernel's flow table was full at the last flush: logged when it fills
    /// and when it has room again, not at every flush.
    flow_table_full: bool,
}

impl Recorder {
    fn run(&mut self, shared: &Shared, receiver: Receiver<Message>) {
        let mut next_flush = Instant::now() + self.settings.flush_interval;
        loop {
            let wait = next_flush.saturating_duration_since(Instant::now());
            let first = match receiver.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Message::Stop),
            };
            match first {
                Some(Message::Sighting(sighting)) => {
                    self.take(*sighting);
                    continue;
                }
                Some(Message::Questions(questions)) => {
                    self.questions(questions);
                    continue;
                }
                _ => {}
            }
            // A flush is due (timer, request or stop): take everything queued first, so
            // the flush knows every sighting and answers every request made before it.
            let mut requests = Vec::new();
            let mut stop = false;
            // Bounded, so a flood of sightings cannot hold the flush back.
            let queued = std::iter::from_fn(|| receiver.try_recv().ok()).take(MAX_DRAINED);
            for message in first.into_iter().chain(queued) {
                match message {
                    Message::Sighting(sighting) => self.take(*sighting),
                    Message::Questions(questions) => self.questions(questions),
                    Message::Flush(reply) => requests.push(reply),
                    Message::Stop => stop = true,
                }
            }
            let outcome = self.flush(shared);
            if let Err(e) = &outcome {
                tracing::warn!("flushing observations: {e}");
            }
            for reply in requests {
                let _ = reply.send(outcome.clone());
            }
            if stop {
                return;
            }
            next_flush = Instant::now() + self.settings.flush_interval;
        }
    }

    fn questions(&mut self, questions: Vec<QuerySample>) {
        for question in questions {
            if !self.questions.add(question, MAX_PENDING_QUESTIONS) {
                self.questions_dropped += 1;
            }
        }
    }

    /// A sighting out of the channel.
    fn take(&mut self, sighting: Sighting) {
        self.queue.queued.fetch_sub(1, Ordering::Relaxed);
        self.pend(sighting);
    }

    fn pend(&mut self, sighting: Sighting) {
        let workload = self.workload_names.number(&sighting.key.workload);
        let key = PendingKey {
            workload,
            address: sighting.key.address,
            port: sighting.key.port,
            protocol: sighting.key.protocol,
        };
        if self.pending.len() >= MAX_PENDING_SIGHTINGS && !self.pending.contains_key(&key) {
            return;
        }
        self.pending.entry(key).or_insert_with(|| PendingSighting {
            at_ns: nanos_since_epoch(sighting.at),
            verdict: sighting.verdict,
            dns_name: sighting.dns_name.map(String::into_boxed_str),
            comm: sighting
                .process
                .map_or_else(ShortName::default, |process| ShortName::new(&process.comm)),
        });
    }

    fn open_store(&mut self) {
        if self.store.is_some() || !self.settings.enabled {
            return;
        }
        match Store::open(&self.path) {
            Ok(store) => self.store = Some(store),
            Err(e) => {
                // Enforcement goes on without the store; status shows why.
                tracing::error!("observation store unavailable: {e}");
                self.set_error(e.to_string());
            }
        }
    }

    fn set_error(&self, message: String) {
        if let Ok(mut status) = self.status.lock() {
            status.flush_failures += 1;
            status.last_error = Some(message);
        }
    }

    fn flush(&mut self, shared: &Shared) -> Result<FlushReport, String> {
        let dropped = self.queue.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the observation recorder fell behind the event stream: {dropped} first \
                 sightings dropped (their destinations are still recorded from the kernel's \
                 summaries unless those were evicted)"
            );
        }
        let result = self.try_flush(shared);
        if let Err(message) = &result {
            self.set_error(message.clone());
        }
        result
    }

    fn try_flush(&mut self, shared: &Shared) -> Result<FlushReport, String> {
        // DNS answers already in the kernel's ring are learned first, so that the flows
        // they led to are named.
        shared.rings.wait_until_read(RING_READ_LIMIT);
        let walk_started = SystemTime::now();
        self.walk = self.walk.wrapping_add(1);
        let walk = self.walk;
        let (previous, pending, workload_names) =
            (&mut self.previous, &mut self.pending, &self.workload_names);
        // Only summaries that grew are copied out of the walk: with 100,000 flows in the
        // kernel and little traffic, a flush holds a handful, not the table.
        let snapshot = shared
            .engine
            .lock()
            .map_err(|_| "daemon state is poisoned".to_owned())?
            .flow_snapshot(|summary, workload| {
                // The summary accounts for the first sight: its event adds nothing.
                if !pending.is_empty()
                    && let Some(workload) = workload_names.existing(workload)
                {
                    pending.remove(&PendingKey {
                        workload,
                        address: summary.address,
                        port: summary.port,
                        protocol: summary.protocol,
                    });
                }
                let totals = Totals::of(summary);
                let earlier = match previous.get_mut(&SummaryId::of(summary)) {
                    Some(seen) => {
                        seen.walk = walk;
                        seen.totals
                    }
                    None => Totals::default(),
                };
                let growth = totals.since(&earlier);
                // New totals are kept once the walk has succeeded (a failed walk loses no
                // growth); unchanged summaries are only marked as seen.
                (!growth.is_zero() || earlier.first_seen != totals.first_seen)
                    .then_some((totals, growth))
            })
            .map_err(|e| format!("reading the kernel's flow summaries: {e:#}"))?;
        for flow in &snapshot.flows {
            let (totals, _) = flow.selected;
            previous.insert(SummaryId::of(&flow.summary), Seen { totals, walk });
        }
        previous.retain(|_, seen| seen.walk == walk);
        shrink_when_sparse(previous);
        self.settings = snapshot.settings.clone();
        if let Ok(mut status) = self.status.lock() {
            status.enabled = self.settings.enabled;
            status.flush_interval_ms = self.settings.flush_interval.as_millis() as u64;
            status.kernel_flows = snapshot.walked as u64;
            status.kernel_flow_capacity = u64::from(snapshot.capacity);
            status.kernel_flow_insert_failures = snapshot.insert_failures;
        }
        let full = snapshot.capacity > 0 && snapshot.walked as u64 >= u64::from(snapshot.capacity);
        if full != self.flow_table_full {
            if full {
                tracing::warn!(
                    capacity = snapshot.capacity,
                    "the kernel's flow table is full ({} summaries): the least recently used \
                     are evicted between flushes, losing what they counted since the last \
                     flush; their destinations are still recorded from first-sight events. A \
                     shorter [observe] flush_interval loses less",
                    snapshot.capacity
                );
            } else {
                tracing::info!("the kernel's flow table has room again");
            }
            self.flow_table_full = full;
        }
        let mut recovered_samples = Vec::new();
        let recovered = self.recover_sightings(walk_started, &mut recovered_samples);
        if !self.settings.enabled {
            self.questions.clear();
            return Ok(FlushReport {
                store: self.path.display().to_string(),
                samples: 0,
            });
        }
        self.open_store();
        let unavailable = format!("observation store {} is unavailable", self.path.display());
        if self.store.is_none() {
            return Err(unavailable);
        }
        let mut written = 0;
        // A slice at a time: after a burst of new destinations a flush holds the samples of
        // one slice, not of every new flow at once.
        for flows in snapshot.flows.chunks(SAMPLE_BATCH) {
            let samples = self.samples(flows, &snapshot.workload_cgroups, walk_started);
            let store = self.store.as_mut().ok_or_else(|| unavailable.clone())?;
            store.record(&samples).map_err(|e| e.to_string())?;
            written += samples.len();
        }
        let store = self.store.as_mut().ok_or_else(|| unavailable.clone())?;
        store
            .record(&recovered_samples)
            .map_err(|e| e.to_string())?;
        written += recovered_samples.len();
        store
            .record_query_tallies(&self.questions)
            .map_err(|e| e.to_string())?;
        self.questions.clear();
        if self.questions_dropped > 0 {
            tracing::warn!(
                dropped = self.questions_dropped,
                limit = MAX_PENDING_QUESTIONS,
                "more distinct DNS questions between two flushes than the recorder counts: \
                 answers to the others were not recorded; a shorter [observe] flush_interval \
                 loses fewer"
            );
            self.questions_dropped = 0;
        }
        if self.last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            let retention = Retention {
                days: self.settings.retention_days,
                max_rows: self.settings.max_rows,
            };
            match store.prune(retention) {
                Ok(stats) if stats.expired + stats.evicted > 0 => tracing::info!(
                    expired = stats.expired,
                    evicted = stats.evicted,
                    remaining = stats.remaining,
                    "observations pruned"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("pruning observations: {e}"),
            }
            self.last_prune = Some(Instant::now());
        }
        if let Ok(mut status) = self.status.lock() {
            status.last_flush = Some(crate::engine::rfc3339(SystemTime::now()));
            status.last_error = None;
            status.samples_written += written as u64;
            status.recovered_from_events += recovered;
        }
        Ok(FlushReport {
            store: self.path.display().to_string(),
            samples: written as u64,
        })
    }

    /// Samples of the growth of the summaries that grew since the last flush.
    fn samples(
        &mut self,
        flows: &[NamedFlow<(Totals, Totals)>],
        workload_cgroups: &BTreeMap<String, Vec<PathBuf>>,
        now: SystemTime,
    ) -> Vec<FlowSample> {
        let mut samples = Vec::new();
        for flow in flows {
            let summary = &flow.summary;
            let (_, growth) = flow.selected;
            if growth.is_zero() {
                continue;
            }
            let key = FlowKey::new(
                flow.workload.clone(),
                summary.address,
                summary.port,
                summary.protocol,
            );
            let mut base = FlowSample::new(key, summary.first_seen);
            base.dns_name = flow.dns_name.clone();
            // Counters move without a new decision (long-lived connections): seen until now.
            base.last_seen = if growth.packets_sent + growth.packets_received > 0 {
                now.max(summary.last_seen)
            } else {
                summary.last_seen
            };
            base.connect_process = summary
                .connect_task
                .as_ref()
                .map(|task| self.processes.process(task));
            base.send_process = summary.send_task.as_ref().and_then(|task| {
                self.sender(
                    task,
                    summary.connect_task.as_ref(),
                    workload_cgroups.get(&flow.workload),
                )
            });
            let mut allowed = base.clone();
            allowed.connections = growth.allowed;
            allowed.bytes_sent = growth.bytes_sent;
            allowed.packets_sent = growth.packets_sent;
            allowed.bytes_received = growth.bytes_received;
            allowed.packets_received = growth.packets_received;
            if allowed.connections + allowed.packets_sent + allowed.packets_received > 0 {
                samples.push(allowed);
            }
            for (count, verdict) in [
                (growth.denied, SampleVerdict::Denied),
                (growth.would_deny, SampleVerdict::WouldDeny),
            ] {
                if count > 0 {
                    let mut sample = base.clone();
                    sample.connections = count;
                    sample.verdict = verdict;
                    samples.push(sample);
                }
            }
        }
        samples
    }

    /// The writer of a flow, if it is trustworthy: the connecting process itself, or a task
    /// inside the flow's workload (softirq transmissions run under unrelated tasks).
    fn sender(
        &mut self,
        task: &TaskRef,
        connect_task: Option<&TaskRef>,
        cgroups: Option<&Vec<PathBuf>>,
    ) -> Option<Process> {
        if connect_task.is_some_and(|connect| connect.tid == task.tid) {
            return None;
        }
        let same_process = connect_task.is_some_and(|connect| connect.tgid == task.tgid);
        if !same_process {
            let cgroup = task_cgroup(task)?;
            let inside = cgroups.is_none_or(|dirs| dirs.iter().any(|dir| cgroup.starts_with(dir)));
            if !inside {
                return None;
            }
        }
        Some(self.processes.process(task))
    }

    /// Sightings whose summary was not in the kernel when it was read, although it must
    /// have been created before: evicted or never stored. They are recorded from the event.
    fn recover_sightings(
        &mut self,
        walk_started: SystemTime,
        samples: &mut Vec<FlowSample>,
    ) -> u64 {
        let settle = self.settings.flush_interval * 2;
        let cutoff = walk_started.checked_sub(settle).unwrap_or(walk_started);
        let overdue: Vec<PendingKey> = self
            .pending
            .iter()
            .filter(|(_, sighting)| sighting.at() < cutoff)
            .map(|(key, _)| *key)
            .collect();
        let mut recovered = 0;
        for key in overdue {
            let Some(sighting) = self.pending.remove(&key) else {
                continue;
            };
            let workload = self.workload_names.name(key.workload);
            let flow = FlowKey::new(workload, key.address, key.port, key.protocol);
            let mut sample = FlowSample::new(flow, sighting.at());
            sample.dns_name = sighting.dns_name.map(String::from);
            sample.connections = 1;
            sample.verdict = sighting.verdict;
            sample.connect_process = sighting.comm.get().map(|comm| Process::new(comm, None));
            samples.push(sample);
            recovered += 1;
        }
        if self.pending.is_empty() {
            // Names of workloads a reload removed go with their last sightings.
            self.workload_names.clear();
        }
        // A burst of new destinations leaves a large, mostly empty table behind; its memory
        // goes back once the burst is accounted for.
        shrink_when_sparse(&mut self.pending);
        recovered
    }
}

/// Gives a map's memory back when it holds less than a quarter of what it has room for.
fn shrink_when_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// The cgroup v2 directory of a task, from /proc (relative to the mount, as /proc says).
fn task_cgroup(task: &TaskRef) -> Option<PathBuf> {
    let text =
        std::fs::read_to_string(format!("/proc/{}/task/{}/cgroup", task.tgid, task.tid)).ok()?;
    let relative = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    Some(PathBuf::from(relative))
}

/// comm and executable of tasks, cached briefly per process.
struct ProcessCache {
    executables: lru::LruCache<u32, (Instant, Option<String>)>,
}

impl ProcessCache {
    fn new() -> Self {
        ProcessCache {
            executables: lru::LruCache::new(
                NonZeroUsize::new(PROCESS_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
            ),
        }
    }

    fn process(&mut self, task: &TaskRef) -> Process {
        let comm = if task.comm.is_empty() {
            read_trimmed(&format!("/proc/{}/task/{}/comm", task.tgid, task.tid))
                .or_else(|| read_trimmed(&format!("/proc/{}/comm", task.tgid)))
                .unwrap_or_else(|| format!("pid {}", task.tgid))
        } else {
            task.comm.clone()
        };
        let exe = self.executable(task.tgid);
        Process::new(comm, exe.as_deref())
    }

    fn executable(&mut self, tgid: u32) -> Option<String> {
        if let Some((at, exe)) = self.executables.get(&tgid)
            && at.elapsed() < PROCESS_CACHE_TTL
        {
            return exe.clone();
        }
        let exe = std::fs::read_link(format!("/proc/{tgid}/exe"))
            .ok()
            .map(|path| path.display().to_string());
        self.executables.put(tgid, (Instant::now(), exe.clone()));
        exe
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(first: u64, allowed: u64, bytes: u64) -> Totals {
        Totals {
            first_seen: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(first)),
            allowed,
            bytes_sent: bytes,
            packets_sent: bytes / 100,
            ..Totals::default()
        }
    }

    #[test]
    fn growth_is_the_difference_for_the_same_summary() {
        let growth = totals(1, 10, 1000).since(&totals(1, 4, 400));
        assert_eq!((growth.allowed, growth.bytes_sent), (6, 600));
        assert!(totals(1, 4, 400).since(&totals(1, 4, 400)).is_zero());
    }

    #[test]
    fn a_recreated_summary_counts_from_zero() {
        let growth = totals(2, 3, 300).since(&totals(1, 10, 1000));
        assert_eq!((growth.allowed, growth.bytes_sent), (3, 300));
        let growth = totals(1, 3, 300).since(&Totals::default());
        assert_eq!(growth.allowed, 3);
    }

    #[test]
    fn tables_give_memory_back_after_a_burst() {
        let mut table: HashMap<u32, u64> = (0..100_000).map(|i| (i, u64::from(i))).collect();
        let burst = table.capacity();
        table.retain(|key, _| *key < 10);
        shrink_when_sparse(&mut table);
        assert!(table.capacity() < burst / 100, "{}", table.capacity());
        assert_eq!(table.len(), 10);
        // A table in steady use keeps its room.
        let mut busy: HashMap<u32, u64> = (0..10_000).map(|i| (i, 0)).collect();
        let room = busy.capacity();
        shrink_when_sparse(&mut busy);
        assert_eq!(busy.capacity(), room);
    }

    #[test]
    fn pending_sightings_stay_small() {
        // 100,000 of them may wait for a flush: 8 MB, plus the table's spare room.
        assert!(size_of::<(PendingKey, PendingSighting)>() <= 80);
    }

    #[test]
    fn sighting_times_and_names_survive_their_compact_form() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let sighting = PendingSighting {
            at_ns: nanos_since_epoch(at),
            verdict: SampleVerdict::Allowed,
            dns_name: None,
            comm: ShortName::new("curl"),
        };
        assert_eq!(sighting.at(), at);
        assert_eq!(sighting.comm.get(), Some("curl"));
        assert_eq!(ShortName::default().get(), None);
        assert_eq!(
            ShortName::new("0123456789abcdef").get(),
            Some("0123456789abcdef")
        );
        // Past 16 bytes, cut where a character ends (the replacement character is 3 bytes).
        let replaced = "abcdefghijklmn\u{fffd}";
        assert_eq!(ShortName::new(replaced).get(), Some("abcdefghijklmn"));
    }

    #[test]
    fn workload_numbers_name_their_workloads() {
        let mut names = WorkloadNames::default();
        let a = names.number("agent");
        let b = names.number("runner");
        assert_eq!(names.number("agent"), a);
        assert_ne!(a, b);
        assert_eq!((names.name(a), names.name(b)), ("agent", "runner"));
        assert_eq!(names.existing("runner"), Some(b));
        assert_eq!(names.existing("other"), None);
        names.clear();
        assert_eq!(names.existing("agent"), None);
    }

    #[test]
    fn processes_fall_back_to_proc_for_their_name() {
        let mut cache = ProcessCache::new();
        let me = std::process::id();
        let process = cache.process(&TaskRef {
            tgid: me,
            tid: me,
            comm: String::new(),
        });
        assert!(!process.comm.is_empty());
        assert!(process.exe.is_some(), "{process:?}");
        let gone = cache.process(&TaskRef {
            tgid: u32::MAX,
            tid: u32::MAX,
            comm: "agent".into(),
        });
        assert_eq!((gone.comm.as_str(), gone.exe), ("agent", None));
    }
}
