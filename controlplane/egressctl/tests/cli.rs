//! Runs the built `egressctl` against a scripted fake daemon on a Unix socket
//! in a temporary directory, and `check` against temporary policy files.

use std::io::BufReader;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use egressd_proto::{
    DatapathStatus, EventKind, EventRecord, Mode, ModeSetting, ModeSource, ModeStatus,
    PolicyStatus, ReloadFailure, Request, Response, StatusReport, WorkloadStatus, read_frame,
    write_frame,
};
use tempfile::TempDir;

/// How long the fake daemon waits for the CLI to connect.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(20);

/// What the fake daemon does with one connection.
enum Script {
    /// Reads one request, writes these frames, closes.
    Answer(Vec<Response>),
    /// Reads one request, writes these raw bytes, closes.
    Raw(&'static [u8]),
}

/// A fake egressd serving one scripted connection after another. Dropping it
/// removes the socket directory; `requests` joins the server thread.
struct FakeDaemon {
    dir: TempDir,
    thread: Option<JoinHandle<Vec<Request>>>,
}

impl FakeDaemon {
    fn start(scripts: Vec<Script>) -> FakeDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(dir.path().join("egressd.sock")).expect("bind");
        // Non-blocking accept with a deadline, so a CLI that never connects
        // fails the test instead of hanging it.
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = thread::spawn(move || {
            let mut requests = Vec::new();
            for script in scripts {
                let deadline = Instant::now() + ACCEPT_DEADLINE;
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(_) if Instant::now() < deadline => {
                            thread::sleep(Duration::from_millis(10))
                        }
                        Err(err) => panic!("egressctl never connected: {err}"),
                    }
                };
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(ACCEPT_DEADLINE))
                    .expect("timeout");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let request: Request = read_frame(&mut reader).expect("read").expect("a request");
                requests.push(request);
                let mut writer = stream;
                match script {
                    Script::Answer(responses) => {
                        for response in &responses {
                            write_frame(&mut writer, response).expect("write");
                        }
                    }
                    Script::Raw(bytes) => {
                        std::io::Write::write_all(&mut writer, bytes).expect("write")
                    }
                }
            }
            requests
        });
        FakeDaemon {
            dir,
            thread: Some(thread),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("egressd.sock")
    }

    /// Runs egressctl with `--socket` pointing here.
    fn run(&self, args: &[&str]) -> Output {
        let socket = self.socket();
        let mut full = vec!["--socket", socket.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        egressctl(&full)
    }

    /// The requests received, once every scripted connection was served.
    fn requests(mut self) -> Vec<Request> {
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("fake daemon panicked")
    }
}

fn egressctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egressctl"))
        .args(args)
        .env_remove("EGRESSD_SOCKET")
        .output()
        .expect("run egressctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8 stderr")
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

fn status_report() -> StatusReport {
    StatusReport {
        version: "0.1.0".into(),
        pid: 4321,
        started_at: "2026-11-23T09:00:00Z".into(),
        policy: PolicyStatus {
            path: "/etc/egressd/policy.toml".into(),
            sha256: "feedfacecafe".repeat(5) + "beef",
            loaded_at: "2026-11-23T09:00:01Z".into(),
            last_error: Some(ReloadFailure {
                at: "2026-11-23T09:30:00Z".into(),
                message: "/etc/egressd/policy.toml:12:3: unknown field `alow`".into(),
            }),
        },
        default_mode: ModeStatus {
            mode: Mode::Learning,
            source: ModeSource::Default,
        },
        unmatched: "apply".into(),
        workloads: vec![WorkloadStatus {
            name: "vendor-agent".into(),
            id: 1,
            mode: Mode::Strict,
            mode_source: ModeSource::Command,
            cgroup: Some("system.slice/vendor-agent.service".into()),
            cgroups: vec![
                "/sys/fs/cgroup/system.slice/vendor-agent.service".into(),
                "/sys/fs/cgroup/system.slice/vendor-agent.service/worker".into(),
            ],
            cidr_rules: 3,
            fqdn_rules: 2,
            raw_sockets: false,
            kernel_mode: None,
        }],
        datapath: DatapathStatus {
            cgroup_root: "/sys/fs/cgroup".into(),
            programs: vec!["connect4".into(), "sendmsg4".into()],
            events: 17,
            ring_buffer_drops: 0,
            allowed: 9,
            denied: 5,
            would_deny: 3,
            dns_answers: 0,
            dns_answer_drops: 0,
            dns_resolvers: Vec::new(),
            dns_search_domains: Vec::new(),
            dns_queries_refused: 0,
            pin_dir: None,
            adopted: false,
            maps: Vec::new(),
            fqdn_insert_failures: 0,
        },
        observe: None,
        limits: None,
        events: None,
    }
}

fn event(kind: EventKind, destination: &str) -> EventRecord {
    EventRecord {
        time: "2026-11-23T10:00:00.123Z".into(),
        kind,
        workload: Some("vendor-agent".into()),
        cgroup_id: 99,
        pid: 123,
        tid: 124,
        comm: "curl".into(),
        protocol: "tcp".into(),
        source: Some("10.0.0.1:5555".into()),
        destination: destination.into(),
        verdict: "deny".into(),
        reason: "no_rule".into(),
        hook: "connect4".into(),
        mode: Mode::Strict,
        dns_name: None,
        suppressed: 0,
    }
}

#[test]
fn status_human() {
    let daemon = FakeDaemon::start(vec![Script::Answer(vec![Response::Status(Box::new(
        status_report(),
    ))])]);
    let output = daemon.run(&["status"]);
    assert_exit(&output, 0);
    let text = stdout(&output);
    for expected in [
        "egressd 0.1.0 (pid 4321)",
        "/etc/egressd/policy.toml (sha256 feedfacecafe, loaded 2026-11-23T09:00:01Z)",
        "LAST RELOAD FAILED at 2026-11-23T09:30:00Z",
        "/etc/egressd/policy.toml:12:3: unknown field `alow`",
        "default mode: learning (built-in default)",
        "WORKLOAD      MODE    SOURCE   CGROUPS  RULES(cidr/fqdn)  RAW\n",
        "vendor-agent  strict  command  2        3/2               no\n",
        "events 17, ring buffer drops 0, allowed 9, denied 5, would-deny 3",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(daemon.requests(), vec![Request::Status]);
}

#[test]
fn status_json_is_the_report() {
    let daemon = FakeDaemon::start(vec![Script::Answer(vec![Response::Status(Box::new(
        status_report(),
    ))])]);
    let output = daemon.run(&["status", "--json"]);
    assert_exit(&output, 0);
    let report: StatusReport = serde_json::from_str(&stdout(&output)).expect("status JSON");
    assert_eq!(report, status_report());
}

#[test]
fn socket_from_the_environment() {
    let daemon = FakeDaemon::start(vec![Script::Answer(vec![Response::Done {
        message: "policy reloaded (sha256 0123456789ab)".into(),
    }])]);
    let output = Command::new(env!("CARGO_BIN_EXE_egressctl"))
        .arg("reload")
        .env("EGRESSD_SOCKET", daemon.socket())
        .output()
        .expect("run egressctl");
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "policy reloaded (sha256 0123456789ab)\n");
    assert_eq!(daemon.requests(), vec![Request::Reload]);
}

#[test]
fn mode_sends_set_mode_and_prints_the_message() {
    let daemon = FakeDaemon::start(vec![
        Script::Answer(vec![Response::Done {
            message: "vendor-agent: strict (was learning)".into(),
        }]),
        Script::Answer(vec![Response::Done {
            message: "default mode: back to the policy file (audit)".into(),
        }]),
    ]);
    let output = daemon.run(&["mode", "strict", "--workload", "vendor-agent"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "vendor-agent: strict (was learning)\n");
    let output = daemon.run(&["mode", "file"]);
    assert_exit(&output, 0);
    assert_eq!(
        stdout(&output),
        "default mode: back to the policy file (audit)\n"
    );
    assert_eq!(
        daemon.requests(),
        vec![
            Request::SetMode {
                mode: ModeSetting::Strict,
                workload: Some("vendor-agent".into())
            },
            Request::SetMode {
                mode: ModeSetting::File,
                workload: None
            },
        ]
    );
}

#[test]
fn daemon_errors_go_to_stderr_with_exit_1() {
    let daemon = FakeDaemon::start(vec![
        Script::Answer(vec![Response::Error {
            message: "policy.toml:3:1: unknown field `alow`; keeping the running policy".into(),
        }]),
        Script::Answer(vec![Response::Error {
            message: "no workload named \"nope\"".into(),
        }]),
    ]);
    let output = daemon.run(&["reload"]);
    assert_exit(&output, 1);
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output)
            .contains("policy.toml:3:1: unknown field `alow`; keeping the running policy"),
        "{}",
        stderr(&output)
    );
    let output = daemon.run(&["mode", "audit", "--workload", "nope"]);
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("no workload named \"nope\""),
        "{}",
        stderr(&output)
    );
    assert_eq!(daemon.requests().len(), 2);
}

#[test]
fn events_until_end_of_events() {
    let daemon = FakeDaemon::start(vec![
        Script::Answer(vec![
            Response::Event(event(EventKind::Denied, "127.0.0.9:80")),
            Response::Event(event(EventKind::WouldDeny, "127.0.0.10:443")),
            Response::EndOfEvents,
        ]),
        Script::Answer(vec![
            Response::Event(event(EventKind::NewDestination, "127.0.0.9:80")),
            Response::EndOfEvents,
        ]),
    ]);
    let output = daemon.run(&["events", "--limit", "2"]);
    assert_exit(&output, 0);
    assert_eq!(
        stdout(&output),
        "2026-11-23T10:00:00.123Z DENIED vendor-agent tcp 10.0.0.1:5555 -> 127.0.0.9:80 \
         pid=123 comm=curl (no_rule, connect4)\n\
         2026-11-23T10:00:00.123Z WOULD_DENY vendor-agent tcp 10.0.0.1:5555 -> 127.0.0.10:443 \
         pid=123 comm=curl (no_rule, connect4)\n"
    );

    let output = daemon.run(&["events", "--json"]);
    assert_exit(&output, 0);
    let lines: Vec<EventRecord> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("event JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![event(EventKind::NewDestination, "127.0.0.9:80")]
    );

    assert_eq!(
        daemon.requests(),
        vec![
            Request::Events {
                follow: false,
                limit: Some(2)
            },
            Request::Events {
                follow: false,
                limit: None
            },
        ]
    );
}

#[test]
fn events_follow_ends_when_the_daemon_closes() {
    let daemon = FakeDaemon::start(vec![Script::Answer(vec![Response::Event(event(
        EventKind::Denied,
        "127.0.0.9:80",
    ))])]);
    let output = daemon.run(&["events", "--follow", "--limit", "5"]);
    assert_exit(&output, 0);
    assert_eq!(stdout(&output).lines().count(), 1, "{}", stdout(&output));
    assert!(
        stderr(&output).contains("closed the connection"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        daemon.requests(),
        vec![Request::Events {
            follow: true,
            limit: Some(5)
        }]
    );
}

#[test]
fn events_cut_short_is_a_failure() {
    let daemon = FakeDaemon::start(vec![Script::Answer(vec![Response::Event(event(
        EventKind::Denied,
        "127.0.0.9:80",
    ))])]);
    let output = daemon.run(&["events"]);
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("before the end of the events"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn protocol_trouble_is_a_failure_not_a_panic() {
    let daemon = FakeDaemon::start(vec![
        Script::Raw(b"{\"response\":\"teleport\"}\n"),
        Script::Raw(b""),
        Script::Answer(vec![Response::EndOfEvents]),
    ]);
    let output = daemon.run(&["status"]);
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("unknown variant `teleport`"),
        "{}",
        stderr(&output)
    );
    let output = daemon.run(&["reload"]);
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("closed the connection without answering"),
        "{}",
        stderr(&output)
    );
    let output = daemon.run(&["status"]);
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("unexpected answer"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    assert_eq!(daemon.requests().len(), 3);
}

#[test]
fn no_daemon_names_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("egressd.sock");
    let output = egressctl(&["--socket", socket.to_str().expect("utf-8"), "status"]);
    assert_exit(&output, 1);
    assert_eq!(
        stderr(&output),
        format!(
            "egressctl: cannot connect to {}: No such file or directory (is egressd running?)\n",
            socket.display()
        )
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["mode", "loud"][..],
        &["frobnicate"],
        &["events", "--limit", "-3"],
        &[],
    ] {
        let output = egressctl(args);
        assert_exit(&output, 2);
    }
    let output = egressctl(&["--help"]);
    assert_exit(&output, 0);
    for verb in ["mode", "status", "reload", "check", "events"] {
        assert!(stdout(&output).contains(verb), "{verb} missing from --help");
    }
}

fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write policy");
    path
}

const GOOD_POLICY: &str = r#"
mode = "audit"

[[workload]]
name = "vendor-agent"
cgroup = "system.slice/vendor-agent.service"
allow = [
  { cidr = "10.0.0.0/8", reason = "cluster-internal" },
  { fqdn = "api.vendor.com", ports = [443], protocol = "tcp", reason = "heartbeat" },
]

[[workload]]
name = "backup"
cgroup = "system.slice/backup.service"
mode = "strict"
allow = [
  { cidr = "192.0.2.10", ports = [22], protocol = "tcp", reason = "backup host" },
]
"#;

#[test]
fn check_accepts_a_good_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_policy(dir.path(), "policy.toml", GOOD_POLICY);
    let path = path.to_str().expect("utf-8");
    for args in [&["check", path][..], &["check", "--require-reasons", path]] {
        let output = egressctl(args);
        assert_exit(&output, 0);
        assert_eq!(
            stdout(&output),
            format!("{path}: ok (2 workloads, 3 allow rules)\n")
        );
    }
}

#[test]
fn check_reports_every_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_policy(
        dir.path(),
        "bad.toml",
        "mode = \"loud\"\n\n[[workload]]\nname = \"a\"\ncgroup = \"a.slice\"\nallow = [{ cidr = \"10.0.0.0/33\" }]\n",
    );
    let output = egressctl(&["check", path.to_str().expect("utf-8")]);
    assert_exit(&output, 1);
    assert_eq!(stdout(&output), "");
    let text = stderr(&output);
    let prefix = format!("{}:", path.display());
    assert!(text.lines().count() >= 2, "both errors reported:\n{text}");
    for line in text.lines() {
        assert!(line.starts_with(&prefix), "{line:?} lacks FILE:LINE:COL");
        let rest = &line[prefix.len()..];
        let mut parts = rest.splitn(3, ':');
        let line_no = parts.next().unwrap_or_default();
        let column = parts.next().unwrap_or_default();
        assert!(
            line_no.parse::<usize>().is_ok() && column.parse::<usize>().is_ok(),
            "{line:?}"
        );
    }
    assert!(
        text.contains(&format!("{}:1:", path.display())),
        "mode error on line 1:\n{text}"
    );
    assert!(
        text.contains(&format!("{}:6:", path.display())),
        "CIDR error on line 6:\n{text}"
    );
}

#[test]
fn check_require_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_policy(
        dir.path(),
        "policy.toml",
        "[[workload]]\nname = \"a\"\ncgroup = \"a.slice\"\nallow = [\n  { cidr = \"10.0.0.0/8\" },\n  { cidr = \"10.1.0.0/16\", reason = \"ok\" },\n]\n",
    );
    let path = path.to_str().expect("utf-8");
    let output = egressctl(&["check", path]);
    assert_exit(&output, 0);
    assert_eq!(
        stdout(&output),
        format!("{path}: ok (1 workload, 2 allow rules)\n")
    );

    let output = egressctl(&["check", path, "--require-reasons"]);
    assert_exit(&output, 1);
    let text = stderr(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with(&format!("{path}:5:")), "{text}");
}

#[test]
fn check_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml");
    let output = egressctl(&["check", path.to_str().expect("utf-8")]);
    assert_exit(&output, 1);
    let text = stderr(&output);
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
}
