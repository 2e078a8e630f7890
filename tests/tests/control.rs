//! The control socket: who may use it, and what garbage gets back.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::Duration;

use egressd_tests::{Daemon, TestCgroup, WorkloadSpec, egressctl_bin, policy_toml, run_bounded};

/// nobody / nogroup on Debian.
const NOBODY: u32 = 65534;

fn request(daemon: &Daemon, line: &[u8]) -> serde_json::Value {
    let mut stream = UnixStream::connect(daemon.socket()).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream.write_all(line).expect("send");
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .expect("read the answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?} is not JSON: {e}"))
}

#[test]
fn privileged_malformed_requests_get_errors_and_the_daemon_keeps_serving() {
    let cgroup = TestCgroup::new();
    let daemon = Daemon::start(&policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new("probe", &cgroup)],
    ));
    for garbage in [
        &b"this is not json\n"[..],
        b"{\"request\":\"explode\"}\n",
        b"{\"request\":\"set_mode\",\"mode\":\"chaos\"}\n",
        b"\xff\xfe\n",
        b"[]\n",
    ] {
        let answer = request(&daemon, garbage);
        assert_eq!(answer["response"], "error", "{answer}");
        let message = answer["message"].as_str().expect("an error message");
        assert!(message.contains("bad request"), "{message}");
    }
    let answer = request(
        &daemon,
        b"{\"request\":\"set_mode\",\"mode\":\"audit\",\"workload\":\"nope\"}\n",
    );
    assert_eq!(answer["response"], "error", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{answer}"
    );
    assert_eq!(
        daemon.workload("probe")["mode"],
        "strict",
        "nothing changed"
    );
}

#[test]
fn privileged_socket_is_root_only_unless_a_group_is_configured() {
    let cgroup = TestCgroup::new();
    let policy = policy_toml("learning", &[], &[WorkloadSpec::new("probe", &cgroup)]);
    let daemon = Daemon::start(&policy);
    let meta = std::fs::metadata(daemon.socket()).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    drop(daemon);

    let daemon = Daemon::start_with_args(&policy, &["--socket-group", &NOBODY.to_string()]);
    let meta = std::fs::metadata(daemon.socket()).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), NOBODY);
    // Let the unprivileged client reach the socket inside the daemon's private temp dir.
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755))
        .expect("open the temp dir");
    let as_member = run_bounded(
        Command::new(egressctl_bin())
            .arg("--socket")
            .arg(daemon.socket())
            .arg("status")
            .uid(NOBODY)
            .gid(NOBODY),
        Duration::from_secs(10),
    );
    assert!(
        as_member.status.success(),
        "a member of the socket group may use it: {}",
        String::from_utf8_lossy(&as_member.stderr)
    );
    let outsider = run_bounded(
        Command::new(egressctl_bin())
            .arg("--socket")
            .arg(daemon.socket())
            .arg("status")
            .uid(NOBODY)
            .gid(1),
        Duration::from_secs(10),
    );
    assert!(
        !outsider.status.success(),
        "a user outside the group is refused"
    );
}
