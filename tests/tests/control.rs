//! The control socket: who may use it and for what (root and `--socket-group`: everything;
//! `[control] read_group`: status, events, dns; anyone else: nothing), and what garbage gets
//! back.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output};
use std::time::Duration;

use egressd_tests::{
    Daemon, Identity, NOBODY, TestCgroup, TestGroup, WorkloadSpec, ctl_as, egressctl_bin, line_of,
    open_to_everyone, policy_toml, run_bounded,
};
use serde_json::Value;

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

/// A strict policy for the `probe` workload, with `[control] read_group = READ_GROUP` (a TOML
/// value as written) when given.
fn policy_with_read_group(cgroup: &TestCgroup, read_group: Option<&str>) -> String {
    let mut policy = policy_toml("strict", &[], &[WorkloadSpec::new("probe", cgroup)]);
    if let Some(group) = read_group {
        policy.push_str(&format!("\n[control]\nread_group = {group}\n"));
    }
    policy
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `egressctl ARGS` as `who` must succeed; returns its stdout.
#[track_caller]
fn ctl_ok_as(daemon: &Daemon, who: &Identity, args: &[&str]) -> String {
    let output = ctl_as(daemon, who, args);
    assert!(
        output.status.success(),
        "`egressctl {}` as {who:?} should succeed: {}",
        args.join(" "),
        stderr(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `egressctl ARGS` as `who` must fail (exit 1) with `expected` in its message.
#[track_caller]
fn ctl_refused_as(daemon: &Daemon, who: &Identity, args: &[&str], expected: &str) {
    let output = ctl_as(daemon, who, args);
    let message = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "`egressctl {}` as {who:?} should be refused: {message}",
        args.join(" ")
    );
    assert!(
        message.contains(expected),
        "`egressctl {}` as {who:?}: {message:?} should say {expected:?}",
        args.join(" ")
    );
}

/// The read-only requests a reader may send, each answered.
#[track_caller]
fn assert_may_read(daemon: &Daemon, reader: &Identity) {
    let status: Value = serde_json::from_str(&ctl_ok_as(daemon, reader, &["status", "--json"]))
        .expect("status --json is JSON");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(daemon.pid())));
    ctl_ok_as(daemon, reader, &["events", "--limit", "5"]);
    ctl_ok_as(daemon, reader, &["dns", "--json"]);
}

const EACCES_AT_CONNECT: &str = "Permission denied";

#[test]
fn privileged_read_group_may_read_and_change_nothing_and_others_are_refused() {
    let cgroup = TestCgroup::new();
    let readers = TestGroup::new();
    let policy = policy_with_read_group(&cgroup, Some(&format!("{:?}", readers.name())));
    let daemon = Daemon::start(&policy);
    open_to_everyone(daemon.dir());
    let meta = std::fs::metadata(daemon.socket()).expect("socket exists");
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, 0, 0),
        "root's socket with the ACL mask rw for the read group's entry"
    );
    let reader = Identity::nobody_in(&[readers.gid()]);
    let outsider = Identity::nobody_in(&[]);

    assert_may_read(&daemon, &reader);
    ctl_refused_as(
        &daemon,
        &reader,
        &["mode", "audit", "--workload", "probe"],
        "permission denied: set_mode changes egressd's state",
    );
    ctl_refused_as(&daemon, &reader, &["mode", "learning"], "permission denied");
    ctl_refused_as(
        &daemon,
        &reader,
        &["reload"],
        "permission denied: reload changes egressd's state",
    );
    let status = daemon.status();
    assert_eq!(daemon.workload("probe")["mode"], "strict", "{status}");
    assert_eq!(status["default_mode"]["mode"], "strict", "{status}");

    // Outside the group, the socket's permissions refuse the connect itself.
    ctl_refused_as(&daemon, &outsider, &["status"], EACCES_AT_CONNECT);
    // Behind that gate, the daemon's own: with the file opened to everyone by mistake, an
    // outsider is still refused, by its credentials.
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod 666 the socket");
    ctl_refused_as(
        &daemon,
        &outsider,
        &["status"],
        &format!("permission denied: uid {NOBODY} may not use egressd's control socket"),
    );
    ctl_refused_as(
        &daemon,
        &outsider,
        &["mode", "learning"],
        "may not use egressd's control socket",
    );
    assert_eq!(daemon.workload("probe")["mode"], "strict");
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o660))
        .expect("chmod 660 the socket");
}

#[test]
fn privileged_read_group_follows_reloads() {
    let cgroup = TestCgroup::new();
    let readers = TestGroup::new();
    let daemon = Daemon::start(&policy_with_read_group(&cgroup, None));
    open_to_everyone(daemon.dir());
    let reader = Identity::nobody_in(&[readers.gid()]);
    ctl_refused_as(&daemon, &reader, &["status"], EACCES_AT_CONNECT);

    // Granted by a reload, by GID.
    daemon.rewrite_policy(&policy_with_read_group(
        &cgroup,
        Some(&readers.gid().to_string()),
    ));
    daemon.ctl_ok(&["reload"]);
    assert_may_read(&daemon, &reader);
    ctl_refused_as(&daemon, &reader, &["reload"], "permission denied: reload");

    // An unknown group name is refused like any mistake in the file, at its line and
    // column; the group in force stays.
    let unknown = policy_with_read_group(&cgroup, Some("\"no-such-group-egressd\""));
    let line = line_of(&unknown, "no-such-group-egressd");
    daemon.rewrite_policy(&unknown);
    let output = daemon.reload();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    let expected = format!(
        "{}:{line}:14: read_group \"no-such-group-egressd\": no such group",
        daemon.policy_path().display()
    );
    assert!(
        message.contains(&expected),
        "{message:?} should say {expected:?}"
    );
    let status = daemon.status();
    assert!(
        status["policy"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&expected)),
        "{status}"
    );
    assert_may_read(&daemon, &reader);

    // Withdrawn by a reload: the socket is root's alone again.
    daemon.rewrite_policy(&policy_with_read_group(&cgroup, None));
    daemon.ctl_ok(&["reload"]);
    let meta = std::fs::metadata(daemon.socket()).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    ctl_refused_as(&daemon, &reader, &["status"], EACCES_AT_CONNECT);

    // And by SIGHUP, by name.
    daemon.rewrite_policy(&policy_with_read_group(
        &cgroup,
        Some(&format!("{:?}", readers.name())),
    ));
    let before = daemon.status()["policy"]["sha256"].clone();
    daemon.sighup();
    daemon.wait_for_status(
        "the policy with a read group",
        Duration::from_secs(10),
        |s| s["policy"]["sha256"] != before,
    );
    assert_may_read(&daemon, &reader);
}

#[test]
fn privileged_socket_group_controls_and_read_group_reads_side_by_side() {
    let cgroup = TestCgroup::new();
    let operators = TestGroup::new();
    let readers = TestGroup::new();
    let daemon = Daemon::start_with_args(
        &policy_with_read_group(&cgroup, Some(&format!("{:?}", readers.name()))),
        &["--socket-group", operators.name()],
    );
    open_to_everyone(daemon.dir());
    let meta = std::fs::metadata(daemon.socket()).expect("socket exists");
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, operators.gid()),
        "the socket group owns the socket"
    );
    let operator = Identity::nobody_in(&[operators.gid()]);
    let reader = Identity::nobody_in(&[readers.gid()]);
    let outsider = Identity::nobody_in(&[]);

    assert_may_read(&daemon, &operator);
    ctl_ok_as(
        &daemon,
        &operator,
        &["mode", "audit", "--workload", "probe"],
    );
    assert_eq!(daemon.workload("probe")["mode"], "audit");
    ctl_ok_as(&daemon, &operator, &["reload"]);

    assert_may_read(&daemon, &reader);
    ctl_refused_as(
        &daemon,
        &reader,
        &["mode", "strict", "--workload", "probe"],
        "permission denied: set_mode",
    );
    assert_eq!(daemon.workload("probe")["mode"], "audit");

    ctl_refused_as(&daemon, &outsider, &["status"], EACCES_AT_CONNECT);
}

/// A raw client of the control socket, its reads bounded.
fn raw_client(daemon: &Daemon) -> UnixStream {
    let stream = UnixStream::connect(daemon.socket()).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    stream
}

/// The next frame the daemon sent on `stream`, if one comes within its read timeout.
fn answer_within(stream: &UnixStream) -> Option<Value> {
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("answer {line:?} is not JSON: {e}")),
        ),
        _ => None,
    }
}

/// Whether the daemon closed `stream` (EOF or reset) within `timeout`, reading and dropping
/// whatever it still sends.
fn closed_within(stream: &UnixStream, timeout: Duration) -> bool {
    use std::io::Read as _;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    let mut stream = stream;
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// `egressctl status` must answer; returns how long it took.
#[track_caller]
fn timed_status(daemon: &Daemon, context: &str) -> Duration {
    let started = std::time::Instant::now();
    let output = daemon.ctl(&["status", "--json"]);
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "{context}: `egressctl status` failed after {took:?}: {}\n{}",
        stderr(&output),
        daemon.logs()
    );
    took
}

/// What must not change when clients misbehave.
fn state_of(status: &Value) -> Value {
    serde_json::json!({
        "pid": status["pid"],
        "policy": status["policy"],
        "default_mode": status["default_mode"],
        "workloads": status["workloads"],
    })
}

#[test]
fn privileged_control_socket_survives_abusive_clients() {
    use std::net::Shutdown;

    let cgroup = TestCgroup::new();
    let daemon = Daemon::start(&policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new("probe", &cgroup)],
    ));
    let before = daemon.status();
    let rss_before = egressd_tests::rss_kib(daemon.pid()).expect("the daemon's RSS");
    let mut figures = Vec::new();

    // 1. More clients than slots connect at once and send nothing: 64 are served, the others
    //    get a clear refusal (none is idle long enough yet to make room).
    let crowd: Vec<UnixStream> = (0..80).map(|_| raw_client(&daemon)).collect();
    // Refusals are written at accept; the others get nothing.
    thread_sleep(Duration::from_millis(300));
    for stream in &crowd {
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
    }
    let answers: Vec<Option<Value>> = crowd.iter().map(answer_within).collect();
    let refused: Vec<&Value> = answers.iter().flatten().collect();
    assert_eq!(
        refused.len(),
        80 - 64,
        "64 clients are served at once, the others refused: {refused:?}"
    );
    for answer in &refused {
        assert_eq!(answer["response"], "error", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("64 control clients, the most it takes at once")
                || message.contains("disconnected: egressd needed this client's slot"),
            "a refusal says why: {message}"
        );
    }

    // 2. Once they have been idle for a second, an operator's status makes room.
    thread_sleep(Duration::from_millis(1200));
    let mut latencies = Vec::new();
    for _ in 0..5 {
        latencies.push(timed_status(&daemon, "64 idle clients connected"));
    }
    let evicted = crowd
        .iter()
        .filter_map(answer_within)
        .filter(|answer| {
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("this one was idle"))
        })
        .count();
    assert_eq!(
        evicted, 1,
        "the first status took the slot of the longest idle client, which was told why; the \
         others took the slot it left"
    );
    figures.push(format!(
        "status with 64 idle clients: {}",
        egressd_tests::latency_summary(&latencies)
    ));
    drop(crowd);

    // 3. Misbehaving clients, all at once.
    // a. Asks for thousands of answers and never reads them.
    let mut never_reads = raw_client(&daemon);
    never_reads
        .write_all(&b"{\"request\":\"status\"}\n".repeat(5000))
        .expect("queue requests");
    // b. Sends a huge frame: 1 MiB without a newline.
    let huge = raw_client(&daemon);
    let huge_writer = {
        let mut huge = huge.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = huge.write_all(&vec![b' '; 1 << 20]);
        })
    };
    // c. Sends half a request and stops; d. sends half a request and closes its side.
    let mut stalls = raw_client(&daemon);
    stalls.write_all(b"{\"request\":\"sta").expect("send");
    let mut truncated = raw_client(&daemon);
    truncated.write_all(b"{\"request\":\"sta").expect("send");
    truncated.shutdown(Shutdown::Write).expect("half-close");
    // e. Sends garbage, then a good request on the same connection.
    let mut garbage = raw_client(&daemon);
    garbage
        .write_all(b"\x00\xff\xfe garbage {{{\n")
        .expect("send");
    // f. Follows events and never reads.
    let mut follower = raw_client(&daemon);
    follower
        .write_all(b"{\"request\":\"events\",\"follow\":true}\n")
        .expect("send");

    let mut during = Vec::new();
    for _ in 0..5 {
        during.push(timed_status(&daemon, "misbehaving clients connected"));
    }
    figures.push(format!(
        "status among misbehaving clients: {}",
        egressd_tests::latency_summary(&during)
    ));

    let answer = answer_within(&huge).expect("an answer to the huge frame");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("frame longer than 65536 bytes")),
        "{answer}"
    );
    assert!(
        closed_within(&huge, Duration::from_secs(5)),
        "the stream is out of step after an oversized frame: closed"
    );
    let _ = huge_writer.join();
    let answer = answer_within(&truncated).expect("an answer to the truncated frame");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("malformed frame")),
        "{answer}"
    );
    assert!(closed_within(&truncated, Duration::from_secs(5)));
    let answer = answer_within(&garbage).expect("an answer to garbage");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("bad request")),
        "{answer}"
    );
    garbage
        .write_all(b"{\"request\":\"status\"}\n")
        .expect("send");
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let answer = answer_within(&garbage).expect("garbage does not end the connection");
    assert_eq!(answer["response"], "status");

    // The half request is given up after 10 s, the client that never reads after its
    // answers stayed unread for 10 s.
    stalls
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    let answer = answer_within(&stalls).expect("an answer to the stalled request");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("incomplete after 10s")),
        "{answer}"
    );
    assert!(closed_within(&stalls, Duration::from_secs(5)));
    thread_sleep(Duration::from_secs(2));
    assert!(
        closed_within(&never_reads, Duration::from_secs(15)),
        "a client that never reads is disconnected"
    );
    let _ = never_reads.shutdown(Shutdown::Both);
    figures.push(format!(
        "status after the misbehaving clients: {:?}",
        timed_status(&daemon, "after")
    ));
    drop(follower);

    // 4. Every slot held by clients that are active (each sends a byte of its request
    //    every 200 ms): a newcomer is refused, with the reason.
    let busy: Vec<UnixStream> = (0..64).map(|_| raw_client(&daemon)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let mut writers: Vec<UnixStream> = busy
            .iter()
            .map(|stream| stream.try_clone().expect("clone"))
            .collect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            for writer in &mut writers {
                let _ = writer.write_all(b"{\"request\":");
            }
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for writer in &mut writers {
                    let _ = writer.write_all(b" ");
                }
                thread_sleep(Duration::from_millis(200));
            }
        })
    };
    thread_sleep(Duration::from_millis(1500));
    let refused = daemon.ctl(&["status"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = trickle.join();
    assert!(
        !refused.status.success() && stderr(&refused).contains("the most it takes at once"),
        "a newcomer finds every slot busy and is told so: {}",
        stderr(&refused)
    );
    // They stop; a second later they count as idle and make room again.
    thread_sleep(Duration::from_millis(1200));
    timed_status(&daemon, "after the busy clients stopped");
    drop(busy);

    // 5. Nothing changed: same daemon, same policy, same modes, bounded memory, and the
    //    socket still serves every request.
    let after = daemon.status();
    assert_eq!(state_of(&after), state_of(&before));
    assert!(after["policy"]["last_error"].is_null(), "{after}");
    let rss_after = egressd_tests::rss_kib(daemon.pid()).expect("the daemon's RSS");
    figures.push(format!(
        "RSS {rss_before} KiB before, {rss_after} KiB after"
    ));
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory stays bounded: {rss_before} KiB -> {rss_after} KiB"
    );
    daemon.ctl_ok(&["events", "--limit", "5"]);
    daemon.ctl_ok(&["dns"]);
    eprintln!("control socket under abuse: {}", figures.join("; "));
}

fn thread_sleep(duration: Duration) {
    std::thread::sleep(duration);
}
