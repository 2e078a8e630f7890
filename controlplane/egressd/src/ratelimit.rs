//! The rate limit on refusal events (`denied`, `would_deny`): a workload refused in a tight
//! loop must not flood the log, `egressctl events` followers or the observation store.
//!
//! Each workload and destination (kind, protocol, address and port, reason) may report
//! [`PER_DESTINATION_BURST`] events at once, then one per [`PER_DESTINATION_INTERVAL`]; each
//! workload [`PER_WORKLOAD_BURST`] at once, then [`PER_WORKLOAD_PER_SEC`] a second, whatever
//! the destinations. Nothing is hidden: an event held back is counted in the `suppressed`
//! field of the next event reported for the same destination (so a record stands for
//! `1 + suppressed` events), and when no further event comes, the last one held back is
//! reported on its own with the count of the others once its destination may report
//! again. Only the counts of destinations forgotten to bound memory
//! ([`MAX_DESTINATIONS`]) are carried by no event: they are `unreported` in the status and
//! the metrics.
//!
//! The kernel's per-destination summaries (`egressctl observed`) and counters
//! (`egressctl status`, metrics) count every refusal regardless.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use egressd_proto::{EventKind, EventRecord, EventsStatus, WorkloadEvents};

pub const PER_DESTINATION_BURST: f64 = 5.0;
pub const PER_DESTINATION_INTERVAL: Duration = Duration::from_secs(1);
pub const PER_WORKLOAD_BURST: f64 = 100.0;
pub const PER_WORKLOAD_PER_SEC: f64 = 20.0;
/// Destinations remembered at once (least recently refused forgotten beyond).
pub const MAX_DESTINATIONS: usize = 16_384;
/// A destination with nothing held back is forgotten after this long without refusals.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The limit, in words, for `egressctl status`.
pub fn describe() -> String {
    format!(
        "per workload and destination {PER_DESTINATION_BURST} at once, then 1 every {}s; per \
         workload {PER_WORKLOAD_BURST} at once, then {PER_WORKLOAD_PER_SEC}/s",
        PER_DESTINATION_INTERVAL.as_secs()
    )
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(burst: f64, per_sec: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = now;
    }

    fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }
}

/// What identifies "the same" refusal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    workload: Option<String>,
    kind: EventKind,
    protocol: String,
    destination: String,
    reason: String,
    /// For refused DNS questions, the name: every name asked through one resolver would
    /// otherwise share its bucket, and the names are what a security team reads them for.
    question: Option<String>,
}

impl Key {
    fn of(record: &EventRecord) -> Key {
        Key {
            workload: record.workload.clone(),
            kind: record.kind,
            protocol: record.protocol.clone(),
            destination: record.destination.clone(),
            reason: record.reason.clone(),
            question: (record.reason == "dns_query")
                .then(|| record.dns_name.clone())
                .flatten(),
        }
    }
}

#[derive(Debug)]
struct Destination {
    bucket: Bucket,
    /// Events held back since the last one reported.
    held: u64,
    /// The newest of them, reported on its own if nothing follows.
    last_held: Option<EventRecord>,
    /// Position in the recency order.
    touched: u64,
    last_seen: Instant,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    published: u64,
    suppressed: u64,
}

#[derive(Debug, Default)]
pub struct RefusalLimiter {
    destinations: HashMap<Key, Destination>,
    /// `touched` → key, oldest first.
    recency: BTreeMap<u64, Key>,
    next_touch: u64,
    /// Destinations holding events back.
    holding: HashSet<Key>,
    workloads: HashMap<Option<String>, Bucket>,
    counts: HashMap<Option<String>, Counts>,
    unreported: u64,
}

fn is_refusal(kind: EventKind) -> bool {
    matches!(kind, EventKind::Denied | EventKind::WouldDeny)
}

impl RefusalLimiter {
    /// The record to report for this event (with the count of those held back before it),
    /// or None when the limit holds it back. Events other than refusals always pass.
    pub fn admit(&mut self, mut record: EventRecord, now: Instant) -> Option<EventRecord> {
        if !is_refusal(record.kind) {
            return Some(record);
        }
        let key = Key::of(&record);
        if !self.destinations.contains_key(&key) {
            while self.destinations.len() >= MAX_DESTINATIONS {
                if !self.forget_oldest() {
                    break;
                }
            }
            self.destinations.insert(
                key.clone(),
                Destination {
                    bucket: Bucket::new(
                        PER_DESTINATION_BURST,
                        1.0 / PER_DESTINATION_INTERVAL.as_secs_f64(),
                        now,
                    ),
                    held: 0,
                    last_held: None,
                    touched: 0,
                    last_seen: now,
                },
            );
        }
        self.touch(&key, now);
        let workload_ready = self
            .workloads
            .entry(key.workload.clone())
            .or_insert_with(|| Bucket::new(PER_WORKLOAD_BURST, PER_WORKLOAD_PER_SEC, now))
            .ready(now);
        let Some(destination) = self.destinations.get_mut(&key) else {
            return Some(record);
        };
        let counts = self.counts.entry(key.workload.clone()).or_default();
        if workload_ready && destination.bucket.ready(now) {
            destination.bucket.tokens -= 1.0;
            if let Some(bucket) = self.workloads.get_mut(&key.workload) {
                bucket.tokens -= 1.0;
            }
            record.suppressed = destination.held;
            destination.held = 0;
            destination.last_held = None;
            self.holding.remove(&key);
            counts.published += 1;
            Some(record)
        } else {
            destination.held += 1;
            destination.last_held = Some(record);
            self.holding.insert(key);
            counts.suppressed += 1;
            None
        }
    }

    /// Reports, for each destination that holds events back and may report again, the
    /// newest of them with the count of the others; forgets idle destinations.
    pub fn flush(&mut self, now: Instant) -> Vec<EventRecord> {
        let mut out = Vec::new();
        let holding: Vec<Key> = self.holding.iter().cloned().collect();
        for key in holding {
            if let Some(record) = self.summary(&key, now) {
                out.push(record);
            }
        }
        let idle: Vec<Key> = self
            .destinations
            .iter()
            .filter(|(_, d)| {
                d.held == 0 && now.saturating_duration_since(d.last_seen) > FORGET_AFTER
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            if let Some(destination) = self.destinations.remove(&key) {
                self.recency.remove(&destination.touched);
            }
        }
        out.sort_by(|a, b| a.time.cmp(&b.time));
        out
    }

    /// The summary record of a destination holding events back, if the limits let it out
    /// now.
    fn summary(&mut self, key: &Key, now: Instant) -> Option<EventRecord> {
        let workload_ready = self
            .workloads
            .get_mut(&key.workload)
            .is_none_or(|bucket| bucket.ready(now));
        let destination = self.destinations.get_mut(key)?;
        if destination.held == 0 {
            self.holding.remove(key);
            return None;
        }
        if !(workload_ready && destination.bucket.ready(now)) {
            return None;
        }
        let mut record = destination.last_held.take()?;
        destination.bucket.tokens -= 1.0;
        if let Some(bucket) = self.workloads.get_mut(&key.workload) {
            bucket.tokens -= 1.0;
        }
        // The held record itself is now reported: it stands for itself and the others.
        record.suppressed = destination.held - 1;
        destination.held = 0;
        self.holding.remove(key);
        let counts = self.counts.entry(key.workload.clone()).or_default();
        counts.suppressed = counts.suppressed.saturating_sub(1);
        counts.published += 1;
        Some(record)
    }

    /// Forgets the least recently refused destination to make room; the count of what it
    /// held back becomes unreported. False when there was nothing to forget.
    fn forget_oldest(&mut self) -> bool {
        let Some((&touched, key)) = self.recency.iter().next() else {
            return false;
        };
        let key = key.clone();
        self.recency.remove(&touched);
        if let Some(destination) = self.destinations.remove(&key) {
            self.holding.remove(&key);
            if destination.held > 0 {
                self.unreported += destination.held;
            }
        }
        true
    }

    fn touch(&mut self, key: &Key, now: Instant) {
        let Some(destination) = self.destinations.get_mut(key) else {
            return;
        };
        self.recency.remove(&destination.touched);
        self.next_touch += 1;
        destination.touched = self.next_touch;
        destination.last_seen = now;
        self.recency.insert(self.next_touch, key.clone());
    }

    /// The counts for `egressctl status`.
    pub fn status(&self) -> EventsStatus {
        let mut by_workload: Vec<WorkloadEvents> = self
            .counts
            .iter()
            .map(|(workload, counts)| WorkloadEvents {
                workload: workload.clone().unwrap_or_else(|| "-".to_owned()),
                published: counts.published,
                suppressed: counts.suppressed,
            })
            .collect();
        by_workload.sort_by(|a, b| {
            b.suppressed
                .cmp(&a.suppressed)
                .then_with(|| a.workload.cmp(&b.workload))
        });
        EventsStatus {
            limit: describe(),
            published: by_workload.iter().map(|w| w.published).sum(),
            suppressed: by_workload.iter().map(|w| w.suppressed).sum(),
            unreported: self.unreported,
            by_workload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(destination: &str) -> EventRecord {
        EventRecord {
            time: "2026-11-23T10:00:00.000Z".into(),
            kind: EventKind::Denied,
            workload: Some("agent".into()),
            cgroup_id: 1,
            pid: 2,
            tid: 2,
            comm: "curl".into(),
            protocol: "tcp".into(),
            source: None,
            destination: destination.into(),
            verdict: "deny".into(),
            reason: "no_rule".into(),
            hook: "connect4".into(),
            mode: egressd_policy::Mode::Strict,
            dns_name: None,
            suppressed: 0,
        }
    }

    /// Every event is accounted for: records plus their `suppressed` counts.
    fn represented(records: &[EventRecord]) -> u64 {
        records.iter().map(|r| 1 + r.suppressed).sum()
    }

    #[test]
    fn a_flood_to_one_destination_is_folded_and_fully_counted() {
        let mut limiter = RefusalLimiter::default();
        let start = Instant::now();
        let mut records = Vec::new();
        // 10,000 refusals over 2 seconds.
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 200);
            records.extend(limiter.admit(denied("127.0.0.9:80"), now));
        }
        assert!(
            records.len() <= 5 + 3,
            "burst, then one a second: {}",
            records.len()
        );
        assert!(records.iter().skip(5).all(|r| r.suppressed > 0));
        // Nothing more comes: the last held-back event is reported once it may be.
        assert!(limiter.flush(start + Duration::from_secs(2)).len() <= 1);
        records.extend(limiter.flush(start + Duration::from_secs(4)));
        assert_eq!(represented(&records), 10_000);
        let status = limiter.status();
        assert_eq!(status.published, records.len() as u64);
        assert_eq!(status.published + status.suppressed, 10_000);
        assert_eq!(status.unreported, 0);
        assert!(limiter.flush(start + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn other_events_pass_and_destinations_are_limited_apart() {
        let mut limiter = RefusalLimiter::default();
        let now = Instant::now();
        let mut new = denied("127.0.0.9:80");
        new.kind = EventKind::NewDestination;
        for _ in 0..100 {
            assert!(limiter.admit(new.clone(), now).is_some());
        }
        for destination in ["127.0.0.1:1", "127.0.0.1:2"] {
            let passed = (0..20)
                .filter(|_| limiter.admit(denied(destination), now).is_some())
                .count();
            assert_eq!(passed, 5, "{destination}");
        }
    }

    #[test]
    fn refused_dns_questions_are_limited_per_name() {
        let mut limiter = RefusalLimiter::default();
        let now = Instant::now();
        let question = |name: &str| {
            let mut record = denied("127.0.0.53:53");
            record.reason = "dns_query".to_owned();
            record.dns_name = Some(name.to_owned());
            record
        };
        // Ten names through one resolver: each is its own destination for the limit.
        let passed = (0..10)
            .filter(|i| {
                limiter
                    .admit(question(&format!("n{i}.exfil.test")), now)
                    .is_some()
            })
            .count();
        assert_eq!(passed, 10);
        let repeated = (0..20)
            .filter(|_| limiter.admit(question("n0.exfil.test"), now).is_some())
            .count();
        assert_eq!(
            repeated, 4,
            "the same name is limited like a destination (burst 5)"
        );
    }

    #[test]
    fn a_scan_is_held_by_the_workload_limit_and_memory_stays_bounded() {
        let mut limiter = RefusalLimiter::default();
        let now = Instant::now();
        let mut records = Vec::new();
        let total = MAX_DESTINATIONS as u64 + 1000;
        for port in 0..total {
            records.extend(limiter.admit(denied(&format!("127.0.0.1:{port}")), now));
        }
        assert_eq!(records.len(), PER_WORKLOAD_BURST as usize);
        assert!(limiter.destinations.len() <= MAX_DESTINATIONS);
        let status = limiter.status();
        assert_eq!(status.published + status.suppressed, total);
        // The 1,000 oldest destinations were forgotten: the first 100 had reported their
        // event, the other 900 held theirs back.
        assert_eq!(status.unreported, 900, "the forgotten destinations' counts");
    }
}
