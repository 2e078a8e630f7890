//! The harness itself, without a daemon: the probe does what it says in a
//! plain test cgroup, and the guards clean up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use egressd_tests::{
    AnswerRecord, DNS_PORT, Dnsmasq, FakeResolver, TcpServer, TcpTarget, TestCgroup, UdpTarget,
    allow_ping_sockets, answer_addresses, answer_bytes, cgroup2_root, probe_bin, require_root,
    run_probe, run_probe_in, spawn_probe_in, tcp_exchange, udp_exchange,
};
use hickory_proto::rr::RecordType;

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

/// dnsmasq answers what the test chose (A, AAAA, CNAME, TTL, over UDP and TCP), the fake
/// resolver sees the probe's query, and the probe's DNS actions work: all without a daemon.
#[test]
fn privileged_dns_helpers_work_without_a_daemon() {
    require_root();
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let server6 = TcpServer::bind("::1");
    let dnsmasq = Dnsmasq::builder("127.0.53.2")
        .host("api.example.test", "127.0.60.1")
        .host("target.test", "127.0.60.2")
        .cname("alias.test", "target.test")
        .host_record("v6.test", "::1")
        .hosts((0..100u32).map(|i| (format!("r{i}.race.test"), race_address(i))))
        .local_ttl(7)
        .start();
    let resolver = SocketAddr::new(IpAddr::V4(dnsmasq.addr()), DNS_PORT);

    let answer = udp_exchange(
        resolver,
        "api.example.test",
        RecordType::A,
        Duration::from_secs(2),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", dnsmasq.logs()));
    assert_eq!(
        answer_addresses(&answer),
        vec!["127.0.60.1".parse::<IpAddr>().expect("ip")]
    );
    assert_eq!(
        answer.answers[0].ttl, 7,
        "--local-ttl sets the TTL: {answer:?}"
    );
    let alias = tcp_exchange(resolver, "alias.test", RecordType::A)
        .unwrap_or_else(|err| panic!("{err}\n{}", dnsmasq.logs()));
    assert_eq!(alias.answers.len(), 2, "CNAME then A: {alias:?}");
    assert_eq!(
        answer_addresses(&alias),
        vec!["127.0.60.2".parse::<IpAddr>().expect("ip")]
    );

    let port = server.port_str();
    let resolver_ip = dnsmasq.addr_str();
    for args in [
        vec!["resolve-connect", &resolver_ip, "api.example.test", &port],
        vec!["resolve-connect", &resolver_ip, "alias.test", &port],
        vec![
            "resolve-connect",
            &resolver_ip,
            "api.example.test",
            &port,
            "tcp-dns",
        ],
    ] {
        let result = run_probe_in(&cgroup, &args);
        result.assert_ok("resolve and connect without a daemon");
    }
    let v6 = run_probe_in(
        &cgroup,
        &[
            "resolve-connect",
            &resolver_ip,
            "v6.test",
            &server6.port_str(),
            "aaaa",
        ],
    );
    v6.assert_ok("AAAA ::1 without a daemon");
    assert_eq!(v6.report["addresses"], serde_json::json!(["::1"]), "{v6}");

    let race = run_probe_in(&cgroup, &["race", &resolver_ip, "100", &port, "60"]);
    race.assert_ok("a race of 100 lookups without a daemon");
    assert_eq!(race.report["connected"], 100, "{race}");

    // The fake resolver sees the query and its answer reaches the probe.
    let fake = FakeResolver::bind("127.0.53.3");
    let probe = spawn_probe_in(&cgroup, &["dns-query", "127.0.53.3", "x.test", "2000"]);
    let query = fake.recv_query(Duration::from_secs(5));
    assert_eq!(query.name, "x.test");
    fake.send(
        &answer_bytes(
            query.id,
            "x.test",
            RecordType::A,
            &[AnswerRecord::address("x.test", 5, "127.0.60.9")],
        ),
        query.from,
    );
    let result = probe.wait(Duration::from_secs(10));
    assert_eq!(result.report["id"], query.id, "{result}");
    assert_eq!(result.report["local_port"], query.from.port(), "{result}");
    assert_eq!(
        result.report["received"][0]["addresses"],
        serde_json::json!(["127.0.60.9"]),
        "{result}"
    );
}

/// `r<i>.race.test` → `127.10.<i/256>.<i%256>`.
fn race_address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 10, (i / 256) as u8, (i % 256) as u8))
}
