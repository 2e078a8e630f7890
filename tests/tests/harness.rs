//! The harness itself, without a daemon: the probe does what it says in a
//! plain test cgroup, and the guards clean up.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use egressd_tests::{
    TcpTarget, TestCgroup, UdpTarget, allow_ping_sockets, cgroup2_root, probe_bin, require_root,
    run_probe, run_probe_in, spawn_probe_in,
};

#[test]
fn probe_binary_is_the_one_cargo_built() {
    assert_eq!(
        probe_bin(),
        Path::new(env!("CARGO_BIN_EXE_egressd-probe")),
        "the harness must run the probe cargo built for these tests"
    );
}

#[test]
fn privileged_probe_runs_inside_its_cgroup() {
    let cgroup = TestCgroup::new();
    let probe = spawn_probe_in(&cgroup, &["sleep", "30"]);
    let pid = i32::try_from(probe.pid()).expect("pid");
    assert_eq!(
        cgroup.pids(),
        vec![pid],
        "the probe is in {}",
        cgroup.path().display()
    );
    let own =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    assert!(
        own.lines()
            .any(|line| line == format!("0::/{}", cgroup.relative_path())),
        "{own}"
    );
}

#[test]
fn privileged_probe_succeeds_without_a_daemon() {
    let cgroup = TestCgroup::new();
    let tcp4 = TcpTarget::bind("127.0.0.2");
    let tcp6 = TcpTarget::bind("::1");
    let udp4 = UdpTarget::bind("127.0.0.2");
    let udp6 = UdpTarget::bind("::1");
    let _ping = allow_ping_sockets();

    let runs = [
        vec!["tcp-connect".to_owned(), tcp4.ip_str(), tcp4.port_str()],
        vec!["tcp-connect".to_owned(), tcp6.ip_str(), tcp6.port_str()],
        vec![
            "tcp-connect".to_owned(),
            "::ffff:127.0.0.2".to_owned(),
            tcp4.port_str(),
        ],
        vec![
            "udp-connect-send".to_owned(),
            udp4.ip_str(),
            udp4.port_str(),
        ],
        vec![
            "udp-connect-send".to_owned(),
            udp6.ip_str(),
            udp6.port_str(),
        ],
        vec!["udp-sendto".to_owned(), udp4.ip_str(), udp4.port_str()],
        vec!["udp-sendto".to_owned(), udp6.ip_str(), udp6.port_str()],
        vec!["icmp-raw".to_owned(), "127.0.0.3".to_owned()],
        vec!["icmp-raw".to_owned(), "::1".to_owned()],
        vec!["icmp-ping".to_owned(), "127.0.0.3".to_owned()],
        vec!["icmp-ping".to_owned(), "::1".to_owned()],
        vec!["raw-create".to_owned()],
    ];
    for args in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = run_probe_in(&cgroup, &args);
        result.assert_ok("no daemon runs");
        if args[0] == "icmp-ping" {
            assert_eq!(result.report["reply"], true, "an echo reply: {result}");
        }
    }
}

#[test]
fn privileged_probe_reports_errors_with_errno() {
    let cgroup = TestCgroup::new();
    // A port nobody listens on: the kernel refuses with ECONNREFUSED, not EPERM.
    let port = {
        let target = TcpTarget::bind("127.0.0.2");
        target.port_str()
    };
    let result = run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &port]);
    assert!(!result.ok, "{result}");
    assert_eq!(result.errno, Some(libc::ECONNREFUSED), "{result}");
}

#[test]
fn privileged_fork_connect_moves_the_child_out() {
    let workload = TestCgroup::new();
    let outside = TestCgroup::new();
    let target = TcpTarget::bind("127.0.0.2");
    let procs = outside.procs_file();
    let result = run_probe_in(
        &workload,
        &[
            "fork-connect",
            &target.ip_str(),
            &target.port_str(),
            procs.to_str().expect("utf-8 path"),
        ],
    );
    result.assert_ok("no daemon runs");
    assert_eq!(
        result.report["child_cgroup"],
        format!("/{}", outside.relative_path()),
        "{result}"
    );
}

#[test]
fn privileged_pass_socket_hands_over_a_tcp_socket() {
    let cgroup = TestCgroup::new();
    let target = TcpTarget::bind("127.0.0.2");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pass.sock");
    let listener = UnixListener::bind(&path).expect("bind unix socket");
    let probe = spawn_probe_in(&cgroup, &["pass-socket", path.to_str().expect("utf-8")]);
    let fd = egressd_tests::receive_fd(&listener);
    let result = egressd_tests::connect_fd(&fd, target.ip, target.port);
    assert!(result.is_ok(), "connect on the received socket: {result:?}");
    drop(listener);
    probe.wait(Duration::from_secs(20)).assert_ok("pass-socket");
}

#[test]
fn privileged_cgroup_guard_kills_and_removes() {
    let parent = TestCgroup::new();
    let child = parent.child("inner");
    let path = parent.path().to_path_buf();
    let child_path = child.path().to_path_buf();
    let sleeper = spawn_probe_in(&child, &["sleep", "300"]);
    let pid = sleeper.pid();
    // The guard, not the probe handle, must clean up.
    std::mem::forget(sleeper);
    drop(parent);
    assert!(!path.exists(), "{} still exists", path.display());
    assert!(
        !child_path.exists(),
        "{} still exists",
        child_path.display()
    );
    // Reap the killed probe (it is our child) and check it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gone = !Path::new(&format!("/proc/{pid}")).exists()
            || nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            )
            .is_ok_and(|status| status != nix::sys::wait::WaitStatus::StillAlive);
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the probe {pid} survived the guard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child);
}

#[test]
fn privileged_cgroup_root_is_cgroup2() {
    require_root();
    let root = cgroup2_root();
    assert!(
        root.join("cgroup.controllers").exists(),
        "{}",
        root.display()
    );
    let own = run_probe(&["raw-create"]);
    own.assert_ok("root may create raw sockets without a daemon");
}
