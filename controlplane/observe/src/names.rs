//! DNS questions as destinations: every name a workload asked for, whether or not a
//! connection followed, and the shapes that suggest data leaving through DNS (tunnelling).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A label this long or longer is unusual in real names (63 is the maximum).
pub const LONG_LABEL: usize = 40;
/// A label of at least this many characters whose characters are this random (Shannon
/// bits per character) looks like encoded data rather than a word.
pub const RANDOM_LABEL_MIN_LEN: usize = 16;
pub const RANDOM_LABEL_BITS: f64 = 3.5;
/// This many distinct names directly below one parent in the reported window look like a
/// channel, not a service.
pub const MANY_SUBDOMAINS: usize = 50;

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryOutcome {
    /// NOERROR with at least one address.
    Answered,
    /// NXDOMAIN.
    NxDomain,
    /// Anything else (NOERROR without addresses, SERVFAIL, REFUSED, ...).
    Other,
}

/// One answered question, as the daemon reads it from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySample {
    pub workload: String,
    /// The question name (normalized when stored: lowercase, no trailing dot).
    pub name: String,
    /// `A`, `AAAA`, `TXT`, ...
    pub qtype: String,
    pub at: SystemTime,
    pub outcome: QueryOutcome,
}

/// The answers to one (workload, name, type) since the last write, counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTally {
    pub count: u64,
    pub nxdomain: u64,
    pub answered: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

/// Answered questions counted per (workload, normalized name, type) between two writes: an
/// application asks for the same few names again and again, so the store writes one row per
/// name instead of one per answer, and the memory held does not grow with the answer rate.
#[derive(Debug, Default)]
pub struct QueryTallies {
    by_question: HashMap<(String, String, String), QueryTally>,
}

impl QueryTallies {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `sample`. False, and nothing counted, when it is a question not counted yet
    /// and `max_questions` distinct ones are held already. Empty names are skipped.
    /// Takes the sample whole: its strings become the key, with no copy (the daemon counts
    /// every DNS answer of every workload here).
    pub fn add(&mut self, sample: QuerySample, max_questions: usize) -> bool {
        let QuerySample {
            workload,
            name,
            qtype,
            at,
            outcome,
        } = sample;
        let name = crate::model::normalized_name(name);
        if name.is_empty() {
            return true;
        }
        let full = self.by_question.len() >= max_questions;
        let tally = match self.by_question.entry((workload, name, qtype)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(entry) => entry.insert(QueryTally {
                count: 0,
                nxdomain: 0,
                answered: 0,
                first_seen: at,
                last_seen: at,
            }),
        };
        tally.count = tally.count.saturating_add(1);
        match outcome {
            QueryOutcome::NxDomain => tally.nxdomain = tally.nxdomain.saturating_add(1),
            QueryOutcome::Answered => tally.answered = tally.answered.saturating_add(1),
            QueryOutcome::Other => {}
        }
        tally.first_seen = tally.first_seen.min(at);
        tally.last_seen = tally.last_seen.max(at);
        true
    }

    /// Distinct questions held.
    pub fn len(&self) -> usize {
        self.by_question.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_question.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_question.clear();
    }

    /// `((workload, name, type), tally)` of every question held.
    pub fn iter(&self) -> impl Iterator<Item = (&(String, String, String), &QueryTally)> {
        self.by_question.iter()
    }
}

/// Everything known about one (workload, name, type) over the store's retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameObservation {
    pub workload: String,
    pub name: String,
    pub qtype: String,
    /// Answers seen, and how many of them were NXDOMAIN or carried addresses.
    pub count: u64,
    pub nxdomain: u64,
    pub answered: u64,
    #[serde(with = "crate::time::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "crate::time::rfc3339")]
    pub last_seen: SystemTime,
    /// Whether the workload connected to an address this name resolved to.
    pub connected: bool,
    /// Why the name looks like DNS tunnelling, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnelling: Option<String>,
}

/// `a.b.example.com` → `b.example.com`: the name one label up (None for a single label).
fn parent(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, parent)| parent)
}

/// Shannon entropy of a label's characters, in bits per character.
pub fn label_entropy(label: &str) -> f64 {
    let mut counts: BTreeMap<char, usize> = BTreeMap::new();
    for c in label.chars() {
        *counts.entry(c.to_ascii_lowercase()).or_default() += 1;
    }
    let total = label.chars().count() as f64;
    if total == 0.0 {
        return 0.0;
    }
    counts
        .values()
        .map(|&n| {
            let p = n as f64 / total;
            -p * p.log2()
        })
        .sum()
}

/// Why one name alone looks like tunnelling, if it does.
fn suspicious_label(name: &str) -> Option<String> {
    for label in name.split('.') {
        let length = label.chars().count();
        if length >= LONG_LABEL {
            return Some(format!("label of {length} characters"));
        }
        if length >= RANDOM_LABEL_MIN_LEN {
            let bits = label_entropy(label);
            if bits >= RANDOM_LABEL_BITS {
                return Some(format!(
                    "random-looking label ({length} characters, {bits:.1} bits each)"
                ));
            }
        }
    }
    None
}

/// Sets `tunnelling` on names with long or random-looking labels, and on every name below
/// a parent that has [`MANY_SUBDOMAINS`] or more distinct names in `names` (per workload).
pub fn flag_tunnelling(names: &mut [NameObservation]) {
    let mut children: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for observation in names.iter() {
        if let Some(parent) = parent(&observation.name)
            && parent.contains('.')
        {
            children
                .entry((observation.workload.as_str(), parent))
                .or_default()
                .insert(observation.name.as_str());
        }
    }
    let busy: BTreeMap<(String, String), usize> = children
        .into_iter()
        .filter(|(_, names)| names.len() >= MANY_SUBDOMAINS)
        .map(|((workload, parent), names)| ((workload.to_owned(), parent.to_owned()), names.len()))
        .collect();
    for observation in names.iter_mut() {
        let crowded = parent(&observation.name).and_then(|parent| {
            busy.get(&(observation.workload.clone(), parent.to_owned()))
                .map(|count| format!("{count} distinct names below {parent}"))
        });
        observation.tunnelling = suspicious_label(&observation.name).or(crowded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_each_question_once_per_name_and_respect_their_bound() {
        let at = |secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let sample = |workload: &str, name: &str, secs, outcome| QuerySample {
            workload: workload.into(),
            name: name.into(),
            qtype: "A".into(),
            at: at(secs),
            outcome,
        };
        let mut tallies = QueryTallies::new();
        assert!(tallies.add(
            sample("agent", "API.vendor.example.", 20, QueryOutcome::Answered),
            2
        ));
        assert!(tallies.add(
            sample("agent", "api.vendor.example", 10, QueryOutcome::NxDomain),
            2
        ));
        assert!(tallies.add(
            sample("agent", "api.vendor.example", 30, QueryOutcome::Other),
            2
        ));
        assert!(tallies.add(
            sample("other", "api.vendor.example", 5, QueryOutcome::Answered),
            2
        ));
        assert!(
            tallies.add(sample("agent", " . ", 5, QueryOutcome::Answered), 2),
            "empty: skipped"
        );
        // Full: a new question is refused, a known one still counted.
        assert!(!tallies.add(
            sample("agent", "new.example", 40, QueryOutcome::Answered),
            2
        ));
        assert!(tallies.add(
            sample("other", "api.vendor.example", 50, QueryOutcome::Answered),
            2
        ));
        assert_eq!(tallies.len(), 2);
        let by_workload: BTreeMap<&str, &QueryTally> = tallies
            .iter()
            .map(|((workload, name, qtype), tally)| {
                assert_eq!((name.as_str(), qtype.as_str()), ("api.vendor.example", "A"));
                (workload.as_str(), tally)
            })
            .collect();
        assert_eq!(
            by_workload["agent"],
            &QueryTally {
                count: 3,
                nxdomain: 1,
                answered: 1,
                first_seen: at(10),
                last_seen: at(30),
            }
        );
        assert_eq!(
            (by_workload["other"].count, by_workload["other"].answered),
            (2, 2)
        );
        tallies.clear();
        assert!(tallies.is_empty());
    }

    fn observation(workload: &str, name: &str) -> NameObservation {
        NameObservation {
            workload: workload.into(),
            name: name.into(),
            qtype: "A".into(),
            count: 1,
            nxdomain: 0,
            answered: 1,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            connected: false,
            tunnelling: None,
        }
    }

    #[test]
    fn ordinary_names_are_not_flagged() {
        let mut names: Vec<NameObservation> = [
            "api.vendor.example",
            "telemetry-eu-west-1.vendor.example",
            "www.googleapis.com",
            "d1a2b3c4.cloudfront.net",
            "ocsp.digicert.com",
        ]
        .iter()
        .map(|name| observation("agent", name))
        .collect();
        flag_tunnelling(&mut names);
        assert!(names.iter().all(|n| n.tunnelling.is_none()), "{names:#?}");
    }

    #[test]
    fn long_random_and_crowded_names_are_flagged() {
        let mut names = vec![
            observation("agent", &format!("{}.exfil.example", "a".repeat(45))),
            observation("agent", "mzxw6ytboi4dqnjrgq3tmnzy.exfil.example"),
        ];
        for i in 0..MANY_SUBDOMAINS {
            names.push(observation("agent", &format!("c{i}.beacon.example")));
        }
        // The same parent in another workload is counted separately.
        names.push(observation("other", "c1.beacon.example"));
        flag_tunnelling(&mut names);
        assert!(
            names[0]
                .tunnelling
                .as_deref()
                .is_some_and(|why| why.contains("45 characters"))
        );
        assert!(
            names[1]
                .tunnelling
                .as_deref()
                .is_some_and(|why| why.contains("random"))
        );
        assert!(
            names[2]
                .tunnelling
                .as_deref()
                .is_some_and(|why| why.contains("50 distinct names below beacon.example"))
        );
        assert_eq!(names.last().and_then(|n| n.tunnelling.clone()), None);
    }

    #[test]
    fn entropy_of_simple_labels() {
        assert_eq!(label_entropy("aaaa"), 0.0);
        assert!((label_entropy("abcd") - 2.0).abs() < 1e-9);
        assert_eq!(label_entropy(""), 0.0);
    }
}
