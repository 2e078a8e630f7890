use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use super::*;
use crate::model::{FlowKey, Process, SampleVerdict};

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn sample(workload: &str, address: &str, port: Option<u16>, secs: u64) -> FlowSample {
    let protocol = if port.is_some() { 6 } else { 1 };
    let mut sample = FlowSample::new(
        FlowKey::new(workload, ip(address), port, protocol),
        at(secs),
    );
    sample.connections = 1;
    sample
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("observed.db")).expect("open");
    (dir, store)
}

fn all(store: &Store) -> Vec<Observation> {
    store
        .observations(&Filter::default())
        .expect("observations")
}

#[test]
fn open_creates_a_private_wal_file_at_the_current_schema() {
    let (dir, store) = temp_store();
    let path = dir.path().join("observed.db");
    assert_eq!(store.path(), path);
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let synchronous: i64 = store
        .conn
        .query_row("PRAGMA synchronous", [], |row| row.get(0))
        .expect("synchronous");
    assert_eq!(synchronous, 1, "NORMAL");
    assert_eq!(
        schema_version(&store.conn, &path).expect("version"),
        SCHEMA_VERSION
    );
    let permissions = std::fs::metadata(&path).expect("metadata").permissions();
    assert_eq!(permissions.mode() & 0o777, 0o640);
    assert_eq!(store.integrity_check().expect("check"), ["ok"]);
    drop(store);
    // Reopening an up-to-date file changes nothing.
    let store = Store::open(&path).expect("reopen");
    assert_eq!(
        schema_version(&store.conn, &path).expect("version"),
        SCHEMA_VERSION
    );
}

#[test]
fn an_empty_existing_file_is_migrated_from_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("observed.db");
    std::fs::write(&path, b"").expect("empty file");
    let mut store = Store::open(&path).expect("open");
    store
        .record(&[sample("w", "1.1.1.1", Some(443), 0)])
        .expect("record");
    assert_eq!(all(&store).len(), 1);
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let (dir, store) = temp_store();
    let path = dir.path().join("observed.db");
    store
        .conn
        .execute("UPDATE schema_version SET version = 7 WHERE id = 1", [])
        .expect("bump version");
    drop(store);
    let error = Store::open(&path).expect_err("newer schema");
    assert!(
        matches!(
            error,
            ObserveError::SchemaTooNew {
                found: 7,
                supported: SCHEMA_VERSION,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("version 7") && message.contains("upgrade egressd"),
        "{message}"
    );
    let error = Store::open_read_only(&path).expect_err("newer schema");
    assert!(
        matches!(error, ObserveError::SchemaTooNew { .. }),
        "{error:?}"
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_reported_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("observed.db");
    std::fs::write(&path, vec![b'x'; 4096]).expect("garbage");
    let error = Store::open(&path).expect_err("garbage");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
    let missing = dir.path().join("missing/observed.db");
    let error = Store::open(&missing).expect_err("missing directory");
    assert!(matches!(error, ObserveError::Create { .. }), "{error:?}");
    assert!(error.to_string().contains("missing/observed.db"), "{error}");
}

#[test]
fn read_only_opens_need_an_existing_current_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("observed.db");
    assert!(matches!(
        Store::open_read_only(&path).expect_err("missing"),
        ObserveError::Open { .. }
    ));
    assert!(!path.exists(), "a read-only open creates nothing");
    std::fs::write(&path, b"").expect("empty file");
    assert!(matches!(
        Store::open_read_only(&path).expect_err("old"),
        ObserveError::SchemaTooOld { found: 0, .. }
    ));
    std::fs::remove_file(&path).expect("remove");
    let mut writer = Store::open(&path).expect("open");
    writer
        .record(&[sample("w", "1.1.1.1", Some(443), 0)])
        .expect("record");
    let reader = Store::open_read_only(&path).expect("read-only");
    assert_eq!(all(&reader).len(), 1);
    // The reader sees the writer's later commits.
    writer
        .record(&[sample("w", "8.8.8.8", Some(53), 1)])
        .expect("record");
    assert_eq!(all(&reader).len(), 2);
}

#[test]
fn record_aggregates_counters_times_names_and_processes() {
    let (_dir, mut store) = temp_store();
    let mut first = sample("agent", "203.0.113.7", Some(443), 100);
    first.last_seen = at(110);
    first.connections = 2;
    first.bytes_sent = 1000;
    first.packets_sent = 10;
    first.bytes_received = 5000;
    first.packets_received = 8;
    first.dns_name = Some("API.Vendor.com.".into());
    first.connect_process = Some(Process::new("agent", Some("/opt/vendor/agent")));
    let mut second = sample("agent", "::ffff:203.0.113.7", Some(443), 50);
    second.last_seen = at(300);
    second.connections = 3;
    second.bytes_sent = 1;
    second.dns_name = Some("cdn.vendor.com".into());
    second.connect_process = Some(Process::new("agent", Some("/opt/vendor/agent")));
    second.send_process = Some(Process::new("curl", None));
    second.verdict = SampleVerdict::WouldDeny;
    store.record(&[first]).expect("first batch");
    store
        .record(&[second.clone(), second])
        .expect("second batch");
    let observations = all(&store);
    assert_eq!(observations.len(), 1, "{observations:?}");
    let o = &observations[0];
    assert_eq!(
        o.key,
        FlowKey::new("agent", ip("203.0.113.7"), Some(443), 6)
    );
    assert_eq!((o.first_seen, o.last_seen), (at(50), at(300)));
    assert_eq!(o.connections, 8);
    assert_eq!((o.bytes_sent, o.packets_sent), (1002, 10));
    assert_eq!((o.bytes_received, o.packets_received), (5000, 8));
    assert_eq!((o.denied, o.would_deny), (0, 6));
    assert_eq!(o.dns_names, ["api.vendor.com", "cdn.vendor.com"]);
    assert_eq!(
        o.processes,
        [
            Process::new("agent", Some("/opt/vendor/agent")),
            Process::new("curl", None)
        ]
    );
    assert!(!o.plaintext);
}

#[test]
fn keys_differ_by_port_protocol_and_workload_and_portless_flows_round_trip() {
    let (_dir, mut store) = temp_store();
    let mut udp = sample("a", "1.1.1.1", Some(53), 0);
    udp.key.protocol = 17;
    store
        .record(&[
            sample("a", "1.1.1.1", Some(53), 0),
            udp,
            sample("b", "1.1.1.1", Some(53), 0),
            sample("a", "1.1.1.1", None, 0),
            sample("a", "2001:db8::1", Some(443), 0),
        ])
        .expect("record");
    let mut keys: Vec<FlowKey> = all(&store).into_iter().map(|o| o.key).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            FlowKey::new("a", ip("1.1.1.1"), None, 1),
            FlowKey::new("a", ip("1.1.1.1"), Some(53), 6),
            FlowKey::new("a", ip("1.1.1.1"), Some(53), 17),
            FlowKey::new("a", ip("2001:db8::1"), Some(443), 6),
            FlowKey::new("b", ip("1.1.1.1"), Some(53), 6),
        ]
    );
}

#[test]
fn names_processes_and_counters_are_bounded() {
    let (_dir, mut store) = temp_store();
    let batch: Vec<FlowSample> = (0..50)
        .map(|i| {
            let mut s = sample("w", "1.1.1.1", Some(443), i);
            s.dns_name = Some(format!("n{i:02}.example.com"));
            s.connect_process = Some(Process::new(format!("p{i:02}"), None));
            s.bytes_sent = u64::MAX;
            s
        })
        .collect();
    store.record(&batch).expect("record");
    store.record(&batch[..1]).expect("record again");
    let o = &all(&store)[0];
    assert_eq!(o.dns_names.len(), MAX_NAMES);
    assert_eq!(o.dns_names[0], "n00.example.com");
    assert_eq!(o.processes.len(), MAX_PROCESSES);
    assert_eq!(
        o.bytes_sent,
        i64::MAX as u64,
        "saturates instead of wrapping"
    );
    assert_eq!(o.connections, 51);
}

#[test]
fn a_failing_batch_leaves_nothing_behind_and_names_the_step() {
    let (dir, mut store) = temp_store();
    store
        .conn
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON flows WHEN NEW.address = '6.6.6.6'
             BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
        )
        .expect("trigger");
    let error = store
        .record(&[
            sample("w", "1.1.1.1", Some(443), 0),
            sample("w", "6.6.6.6", Some(443), 0),
        ])
        .expect_err("second sample fails");
    let message = error.to_string();
    assert!(message.contains("upserting a flow"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(all(&store).is_empty(), "no half batch");
    store
        .record(&[sample("w", "1.1.1.1", Some(443), 0)])
        .expect("later batch");
    assert_eq!(all(&store).len(), 1);
}

#[test]
fn filters_select_workload_recency_and_internet_destinations() {
    let (_dir, mut store) = temp_store();
    store
        .record(&[
            sample("a", "1.1.1.1", Some(443), 10),
            sample("a", "10.0.0.1", Some(443), 1000),
            sample("a", "::ffff:192.168.1.1", Some(443), 1000),
            sample("b", "8.8.8.8", Some(53), 1000),
            sample("b", "fd00::1", Some(53), 5),
        ])
        .expect("record");
    let addresses = |filter: Filter| -> Vec<String> {
        let mut v: Vec<String> = store
            .observations(&filter)
            .expect("observations")
            .into_iter()
            .map(|o| format!("{} {}", o.key.workload, o.key.address))
            .collect();
        v.sort();
        v
    };
    assert_eq!(addresses(Filter::default()).len(), 5);
    assert_eq!(
        addresses(Filter {
            workload: Some("b".into()),
            ..Filter::default()
        }),
        ["b 8.8.8.8", "b fd00::1"]
    );
    assert_eq!(
        addresses(Filter {
            since: Some(at(500)),
            ..Filter::default()
        }),
        ["a 10.0.0.1", "a 192.168.1.1", "b 8.8.8.8"]
    );
    assert_eq!(
        addresses(Filter {
            internet_only: true,
            ..Filter::default()
        }),
        ["a 1.1.1.1", "b 8.8.8.8"]
    );
    assert_eq!(
        addresses(Filter {
            workload: Some("a".into()),
            since: Some(at(500)),
            internet_only: true
        }),
        Vec::<String>::new()
    );
    assert!(
        addresses(Filter {
            workload: Some("nobody".into()),
            ..Filter::default()
        })
        .is_empty()
    );
}

#[test]
fn observations_come_most_important_first() {
    let (_dir, mut store) = temp_store();
    let mut busy = sample("w", "1.1.1.1", Some(443), 0);
    busy.connections = 1000;
    let mut quiet = sample("w", "1.0.0.1", Some(443), 0);
    quiet.connections = 2;
    let plaintext = sample("w", "9.9.9.9", Some(80), 0);
    let mut denied = sample("w", "6.6.6.6", Some(443), 0);
    denied.verdict = SampleVerdict::Denied;
    let mut would_deny = sample("w", "7.7.7.7", Some(443), 0);
    would_deny.verdict = SampleVerdict::WouldDeny;
    would_deny.connections = 5;
    store
        .record(&[quiet, plaintext, busy, denied, would_deny])
        .expect("record");
    let order: Vec<String> = all(&store)
        .iter()
        .map(|o| o.key.address.to_string())
        .collect();
    assert_eq!(
        order,
        ["7.7.7.7", "6.6.6.6", "9.9.9.9", "1.1.1.1", "1.0.0.1"]
    );
}

#[test]
fn prune_drops_expired_then_least_recent_rows_with_their_names() {
    let (_dir, mut store) = temp_store();
    let day = 86_400;
    let batch: Vec<FlowSample> = (0..10)
        .map(|i| {
            let mut s = sample("w", &format!("1.1.1.{i}"), Some(443), i * day);
            s.dns_name = Some(format!("n{i}.example.com"));
            s.connect_process = Some(Process::new("p", None));
            s
        })
        .collect();
    store.record(&batch).expect("record");
    let now = at(10 * day);
    // Days 0, 1 and 2 are older than 7 days; then the 4 least recent of 7 go.
    let stats = store
        .prune_at(
            Retention {
                days: 7,
                max_rows: 3,
            },
            now,
        )
        .expect("prune");
    assert_eq!(
        stats,
        PruneStats {
            expired: 3,
            evicted: 4,
            remaining: 3
        }
    );
    let mut left: Vec<String> = all(&store)
        .iter()
        .map(|o| o.key.address.to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["1.1.1.7", "1.1.1.8", "1.1.1.9"]);
    let orphans: i64 = store
        .conn
        .query_row(
            "SELECT (SELECT count(*) FROM flow_names) + (SELECT count(*) FROM flow_processes)",
            [],
            |row| row.get(0),
        )
        .expect("count");
    assert_eq!(orphans, 6, "names and processes of pruned flows are gone");
    // Zero disables a limit.
    let stats = store
        .prune_at(
            Retention {
                days: 0,
                max_rows: 0,
            },
            at(1000 * day),
        )
        .expect("prune");
    assert_eq!(
        stats,
        PruneStats {
            expired: 0,
            evicted: 0,
            remaining: 3
        }
    );
    let stats = store.prune(Retention::default()).expect("prune now");
    assert_eq!(stats.remaining + stats.expired, 3);
    assert_eq!(store.integrity_check().expect("check"), ["ok"]);
}

#[test]
fn times_before_the_epoch_are_clamped() {
    let (_dir, mut store) = temp_store();
    let mut s = sample("w", "1.1.1.1", Some(443), 0);
    s.first_seen = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
    store.record(&[s]).expect("record");
    assert_eq!(all(&store)[0].first_seen, SystemTime::UNIX_EPOCH);
}

#[test]
fn observations_survive_a_json_round_trip() {
    let (_dir, mut store) = temp_store();
    let mut s = sample("w", "2001:db8::1", Some(443), 0);
    s.last_seen = at(0) + Duration::from_millis(1234);
    s.dns_name = Some("a.example.com".into());
    s.connect_process = Some(Process::new("curl", Some("/usr/bin/curl")));
    store
        .record(&[s, sample("w", "1.1.1.1", None, 3)])
        .expect("record");
    let observations = all(&store);
    let json = serde_json::to_string_pretty(&observations).expect("json");
    assert!(
        json.contains("\"last_seen\": \"2023-11-14T22:13:21.234Z\""),
        "{json}"
    );
    let back: Vec<Observation> = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, observations);
}

#[test]
fn dns_questions_aggregate_and_say_whether_a_connection_followed() {
    use crate::{QueryOutcome, QuerySample};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(&dir.path().join("o.db")).expect("open");
    let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let query = |name: &str, secs, outcome| QuerySample {
        workload: "agent".into(),
        name: name.into(),
        qtype: "A".into(),
        at: at(secs),
        outcome,
    };
    store
        .record_queries(&[
            query("API.vendor.example.", 100, QueryOutcome::Answered),
            query("api.vendor.example", 200, QueryOutcome::Answered),
            query("failover.vendor.example", 150, QueryOutcome::Answered),
            query("gone.vendor.example", 160, QueryOutcome::NxDomain),
        ])
        .expect("record");
    let mut sample = FlowSample::new(
        FlowKey::new("agent", [203, 0, 113, 7].into(), Some(443), 6),
        at(201),
    );
    sample.dns_name = Some("api.vendor.example".into());
    sample.connections = 1;
    store.record(&[sample]).expect("record a flow");

    // A later flush adds to the rows (counts summed, the window widened).
    store
        .record_queries(&[query("api.vendor.example", 90, QueryOutcome::NxDomain)])
        .expect("record again");

    let names = store.names(&Filter::default()).expect("names");
    let by_name: std::collections::BTreeMap<&str, &crate::NameObservation> =
        names.iter().map(|n| (n.name.as_str(), n)).collect();
    let api = by_name["api.vendor.example"];
    assert_eq!(
        (api.count, api.answered, api.nxdomain, api.connected),
        (3, 2, 1, true)
    );
    assert_eq!((api.first_seen, api.last_seen), (at(90), at(200)));
    assert!(!by_name["failover.vendor.example"].connected);
    assert_eq!(by_name["gone.vendor.example"].nxdomain, 1);
    assert_eq!(names[0].name, "api.vendor.example", "most asked first");

    let since = Filter {
        since: Some(at(155)),
        ..Filter::default()
    };
    assert_eq!(store.names(&since).expect("names").len(), 2);
    let stats = store
        .prune_at(
            Retention {
                days: 1,
                max_rows: 0,
            },
            at(3 * 86_400),
        )
        .expect("prune");
    assert_eq!(stats.remaining, 0);
    assert!(store.names(&Filter::default()).expect("names").is_empty());
}
