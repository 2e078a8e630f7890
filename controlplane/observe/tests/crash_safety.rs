//! The store survives SIGKILL at any moment: the test re-executes its own binary as a
//! writer (the `crash_child` test with `EGRESSD_OBSERVE_CRASH_CHILD` set), kills it
//! at random moments several times, and then checks that the file is sound and holds
//! only whole batches, including every batch the child said it had committed.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use egressd_observe::{Filter, FlowKey, FlowSample, Process, Store};

const CHILD_ENV: &str = "EGRESSD_OBSERVE_CRASH_CHILD";
const SEED_ENV: &str = "EGRESSD_OBSERVE_CRASH_SEED";
/// Flows per batch: every batch adds one connection to each.
const FLOWS: u8 = 20;
const KILLS: usize = 6;
/// A child stops by itself after this long or this many batches.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);
const CHILD_MAX_BATCHES: u64 = 1_000_000;

fn batch(number: u64) -> Vec<FlowSample> {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + number);
    (0..FLOWS)
        .map(|i| {
            let key = FlowKey::new(
                "crash",
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)),
                Some(443),
                6,
            );
            let mut sample = FlowSample::new(key, at);
            sample.connections = 1;
            sample.bytes_sent = 100;
            sample.dns_name = Some(format!("n{}.example.com", number % 40));
            sample.connect_process = Some(Process::new(format!("p{}", number % 20), None));
            sample
        })
        .collect()
}

/// The writer. Only does something when re-executed by `sigkill_never_leaves_half_a_batch`.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = Store::open(Path::new(&path)).expect("child opens the store");
    let start = Instant::now();
    let stdout = std::io::stdout();
    for number in 0..CHILD_MAX_BATCHES {
        if start.elapsed() > CHILD_DEADLINE {
            break;
        }
        store.record(&batch(number)).expect("child records a batch");
        let mut out = stdout.lock();
        writeln!(out, "committed {number}").expect("child reports");
        out.flush().expect("child flushes");
    }
}

/// xorshift64*: enough randomness for kill delays without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn sigkill_never_leaves_half_a_batch() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| u64::from(d.subsec_nanos()));
            nanos ^ u64::from(std::process::id()) | 1
        });
    eprintln!("crash test seed {seed} (rerun with {SEED_ENV}={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("observed.db");
    let exe = std::env::current_exe().expect("test binary");
    // Batches the children reported as committed, over all runs.
    let mut acknowledged = 0u64;
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().expect("child stdout");
        // Drain stdout on a thread so the child never blocks on a full pipe.
        let (lines, reports) = mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test crash_child ... " in front of the first report.
                if let Some((_, number)) = line.split_once("committed ")
                    && lines.send(number.trim().parse().unwrap_or(0)).is_err()
                {
                    break;
                }
            }
        });
        // The first run is killed at any moment, even while it creates the schema;
        // later ones once they are writing.
        if kill > 0 {
            reports
                .recv_timeout(Duration::from_secs(20))
                .expect("the writer commits a first batch");
        }
        std::thread::sleep(Duration::from_millis(rng.next() % 300));
        // Child::kill sends SIGKILL on Unix: no destructor, no flush, no rollback.
        child.kill().expect("SIGKILL the writer");
        let status = child.wait().expect("reap the writer");
        reader.join().expect("reader thread");
        let in_run = reports.try_iter().count() as u64 + u64::from(kill > 0);
        acknowledged += in_run;
        eprintln!("run {kill}: killed after {in_run} acknowledged batches ({status})");

        let store = Store::open(&path).expect("the store opens after SIGKILL");
        assert_eq!(store.integrity_check().expect("integrity_check"), ["ok"]);
        let observations = store
            .observations(&Filter::default())
            .expect("observations");
        if observations.is_empty() {
            assert_eq!(acknowledged, 0, "acknowledged batches were lost");
            continue;
        }
        assert_eq!(
            observations.len(),
            usize::from(FLOWS),
            "a batch touches every flow"
        );
        let committed = observations[0].connections;
        for observation in &observations {
            assert_eq!(
                observation.connections, committed,
                "half a batch in the store: {observations:#?}"
            );
            assert_eq!(observation.bytes_sent, committed * 100);
        }
        // A run may have committed one batch it did not get to report.
        assert!(
            (acknowledged..=acknowledged + 1).contains(&committed),
            "{committed} batches in the store, {acknowledged} acknowledged"
        );
        acknowledged = committed;
    }
    assert!(
        acknowledged > 0,
        "the writers committed nothing in {KILLS} runs"
    );
}
