//! DNS questions as destinations: every name a workload asked for, whether or not a
//! connection followed, and the shapes that suggest data leaving through DNS (tunnelling).

use std::collections::{BTreeMap, BTreeSet};
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
