//! Strict mode against the real kernel: what the allowlist lets through and
//! what fails with EPERM, per protocol and hook, and sockets that leave the
//! workload's cgroup.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`). Each
//! test starts its own egressd; [`Daemon::start`] runs them one at a time.

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use egressd_tests::{
    Daemon, EPERM, EVENT_TIMEOUT, ProbeResult, TcpTarget, TestCgroup, UdpTarget, WorkloadSpec,
    allow, allow_ping_sockets, connect_fd, metrics::free_port, policy_toml, receive_fd, run_probe,
    run_probe_in, send_fd, spawn_probe_in,
};
use serde_json::Value;

/// The name every single-workload test gives its workload.
const PROBE: &str = "probe";

fn strict(workloads: &[WorkloadSpec]) -> String {
    policy_toml("strict", &[], workloads)
}

/// A strict workload in `cgroup` whose one rule allows TCP to a listener on 127.0.0.2, and a
/// listener on 127.0.0.4 that no rule allows; the daemon runs until it is dropped.
fn one_allowed_port(cgroup: &TestCgroup) -> (TcpTarget, TcpTarget, Daemon) {
    let allowed = TcpTarget::bind("127.0.0.2");
    let refused = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, cgroup).allow(allow(
        "127.0.0.2",
        &[allowed.port],
        "tcp",
    ))]));
    (allowed, refused, daemon)
}

/// Hands `socket` (SCM_RIGHTS over a Unix socket at `path`) to a probe started in `cgroup`,
/// which uses it with `verb` (`receive-connect` or `receive-sendto`) towards `ip`:`port`.
fn hand_to_probe(
    path: &std::path::Path,
    socket: &std::os::fd::OwnedFd,
    cgroup: &TestCgroup,
    verb: &str,
    ip: &str,
    port: &str,
) -> ProbeResult {
    let listener = UnixListener::bind(path).expect("bind the unix socket");
    let receiver = spawn_probe_in(cgroup, &[verb, path.to_str().expect("utf-8"), ip, port]);
    send_fd(&listener, socket);
    receiver.wait(Duration::from_secs(20))
}

/// An IPv4 socket made by the test process, in no workload, while egressd runs.
fn socket_of_no_workload(kind: nix::sys::socket::SockType) -> std::os::fd::OwnedFd {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        kind,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a socket")
}

fn is_event(event: &Value, kind: &str, destination: &str) -> bool {
    event["kind"] == kind && event["workload"] == PROBE && event["destination"] == destination
}

#[test]
fn privileged_strict_tcp_v4_allows_the_rule_and_refuses_the_rest() {
    let cgroup = TestCgroup::new();
    let allowed = TcpTarget::bind("127.0.0.2");
    let other_port = TcpTarget::bind("127.0.0.2");
    let other_ip = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup).allow(allow(
        "127.0.0.2",
        &[allowed.port],
        "tcp",
    ))]));

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &allowed.port_str()])
        .assert_ok("the allowed address and port");
    run_probe_in(
        &cgroup,
        &["tcp-connect", "127.0.0.2", &other_port.port_str()],
    )
    .assert_eperm("the allowed address on another port");
    let refused = run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &other_ip.port_str()]);
    refused.assert_eperm("an address without a rule");

    let event = daemon.wait_for_event("denied tcp to 127.0.0.4", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", &other_ip.destination())
    });
    assert_eq!(event["protocol"], "tcp", "{event}");
    assert_eq!(event["verdict"], "deny", "{event}");
    assert_eq!(event["hook"], "connect4", "{event}");
    assert_eq!(event["mode"], "strict", "{event}");
    assert_eq!(
        event["pid"], refused.pid,
        "the event names the probe: {event}"
    );
    assert_eq!(event["comm"], "egressd-probe", "{event}");
    assert_eq!(event["cgroup_id"], cgroup.id(), "{event}");
}

#[test]
fn privileged_strict_tcp_v6() {
    let cgroup = TestCgroup::new();
    let allowed = TcpTarget::bind("::1");
    let other = TcpTarget::bind("::1");
    let daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup).allow(allow(
        "::1",
        &[allowed.port],
        "tcp",
    ))]));

    run_probe_in(&cgroup, &["tcp-connect", "::1", &allowed.port_str()])
        .assert_ok("the allowed v6 address and port");
    run_probe_in(&cgroup, &["tcp-connect", "::1", &other.port_str()])
        .assert_eperm("::1 on a port without a rule");

    let event = daemon.wait_for_event("denied tcp to [::1]", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", &other.destination())
    });
    assert_eq!(event["hook"], "connect6", "{event}");
    assert_eq!(event["protocol"], "tcp", "{event}");
}

#[test]
fn privileged_strict_v4_mapped_v6_is_judged_as_the_ipv4_address() {
    let cgroup = TestCgroup::new();
    let allowed = TcpTarget::bind("127.0.0.2");
    let other_port = TcpTarget::bind("127.0.0.2");
    let other_ip = TcpTarget::bind("127.0.0.4");
    let _daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup).allow(allow(
        "127.0.0.2",
        &[allowed.port],
        "tcp",
    ))]));

    run_probe_in(
        &cgroup,
        &["tcp-connect", "::ffff:127.0.0.2", &allowed.port_str()],
    )
    .assert_ok("the allowed IPv4 address, v4-mapped on an AF_INET6 socket");
    run_probe_in(
        &cgroup,
        &["tcp-connect", "::ffff:127.0.0.2", &other_port.port_str()],
    )
    .assert_eperm("the mapped allowed address on another port");
    run_probe_in(
        &cgroup,
        &["tcp-connect", "::ffff:127.0.0.4", &other_ip.port_str()],
    )
    .assert_eperm("a mapped address without a rule");
}

#[test]
fn privileged_strict_connected_udp() {
    let cgroup = TestCgroup::new();
    let allowed4 = UdpTarget::bind("127.0.0.2");
    let other4 = UdpTarget::bind("127.0.0.4");
    let allowed6 = UdpTarget::bind("::1");
    let other6 = UdpTarget::bind("::1");
    let _daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup)
        .allow(allow("127.0.0.2", &[allowed4.port], "udp"))
        .allow(allow("::1", &[allowed6.port], "udp"))]));

    for (target, expect_ok) in [
        (&allowed4, true),
        (&other4, false),
        (&allowed6, true),
        (&other6, false),
    ] {
        let result = run_probe_in(
            &cgroup,
            &["udp-connect-send", &target.ip_str(), &target.port_str()],
        );
        if expect_ok {
            result.assert_ok("connected udp to the allowed destination");
        } else {
            result.assert_eperm("connected udp to a destination without a rule");
        }
    }
    // Mapped destinations on an AF_INET6 UDP socket go through connect6.
    run_probe_in(
        &cgroup,
        &["udp-connect-send", "::ffff:127.0.0.2", &allowed4.port_str()],
    )
    .assert_ok("connected udp to the mapped allowed address");
    run_probe_in(
        &cgroup,
        &["udp-connect-send", "::ffff:127.0.0.4", &other4.port_str()],
    )
    .assert_eperm("connected udp to a mapped address without a rule");
}

#[test]
fn privileged_strict_unconnected_udp_sendto() {
    let cgroup = TestCgroup::new();
    let allowed4 = UdpTarget::bind("127.0.0.2");
    let other4 = UdpTarget::bind("127.0.0.4");
    let allowed6 = UdpTarget::bind("::1");
    let other6 = UdpTarget::bind("::1");
    let daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup)
        .allow(allow("127.0.0.2", &[allowed4.port], "udp"))
        .allow(allow("::1", &[allowed6.port], "udp"))]));

    run_probe_in(&cgroup, &["udp-sendto", "127.0.0.2", &allowed4.port_str()])
        .assert_ok("sendto the allowed v4 destination");
    run_probe_in(&cgroup, &["udp-sendto", "127.0.0.4", &other4.port_str()])
        .assert_eperm("sendto a v4 destination without a rule");
    run_probe_in(&cgroup, &["udp-sendto", "::1", &allowed6.port_str()])
        .assert_ok("sendto the allowed v6 destination");
    run_probe_in(&cgroup, &["udp-sendto", "::1", &other6.port_str()])
        .assert_eperm("sendto a v6 destination without a rule");
    // Mapped destinations on an AF_INET6 UDP socket go through sendmsg4.
    run_probe_in(
        &cgroup,
        &["udp-sendto", "::ffff:127.0.0.2", &allowed4.port_str()],
    )
    .assert_ok("sendto the mapped allowed address");
    run_probe_in(
        &cgroup,
        &["udp-sendto", "::ffff:127.0.0.4", &other4.port_str()],
    )
    .assert_eperm("sendto a mapped address without a rule");

    let event = daemon.wait_for_event("denied udp to 127.0.0.4", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", &other4.destination())
    });
    assert_eq!(event["protocol"], "udp", "{event}");
    assert_eq!(event["hook"], "sendmsg4", "{event}");
}

/// Workload `PROBE` may ping 127.0.0.3 only; workload `ping6` may ping ::1.
fn icmp_policy(probe: &TestCgroup, ping6: &TestCgroup, raw_sockets: bool) -> String {
    strict(&[
        WorkloadSpec::new(PROBE, probe)
            .raw_sockets(raw_sockets)
            .allow(allow("127.0.0.3", &[], "icmp")),
        WorkloadSpec::new("ping6", ping6)
            .raw_sockets(raw_sockets)
            .allow(allow("::1", &[], "icmp")),
    ])
}

#[test]
fn privileged_strict_icmp_on_raw_sockets() {
    let cgroup = TestCgroup::new();
    let ping6 = TestCgroup::new();
    let daemon = Daemon::start(&icmp_policy(&cgroup, &ping6, true));

    run_probe_in(&cgroup, &["icmp-raw", "127.0.0.3"]).assert_ok("raw echo to the allowed address");
    run_probe_in(&cgroup, &["icmp-raw", "127.0.0.4"])
        .assert_eperm("raw echo to an address without a rule");
    run_probe_in(&cgroup, &["icmp-raw", "::1"]).assert_eperm("raw ICMPv6 echo without a rule");
    run_probe_in(&ping6, &["icmp-raw", "::1"]).assert_ok("raw ICMPv6 echo to the allowed ::1");

    let event = daemon.wait_for_event("denied icmp to 127.0.0.4", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", "127.0.0.4")
    });
    assert_eq!(event["protocol"], "icmp", "{event}");
    assert_eq!(event["hook"], "egress", "{event}");
}

#[test]
fn privileged_strict_icmp_on_ping_sockets() {
    let cgroup = TestCgroup::new();
    let ping6 = TestCgroup::new();
    let _ping = allow_ping_sockets();
    let daemon = Daemon::start(&icmp_policy(&cgroup, &ping6, false));

    let allowed = run_probe_in(&cgroup, &["icmp-ping", "127.0.0.3"]);
    allowed.assert_ok("ping socket echo to the allowed address");
    assert_eq!(allowed.report["reply"], true, "the echo left: {allowed}");
    run_probe_in(&cgroup, &["icmp-ping", "127.0.0.4"])
        .assert_eperm("ping socket echo to an address without a rule");
    let allowed6 = run_probe_in(&ping6, &["icmp-ping", "::1"]);
    allowed6.assert_ok("ICMPv6 ping socket echo to the allowed ::1");
    assert_eq!(allowed6.report["reply"], true, "the echo left: {allowed6}");

    // The kernel cannot report this one: ping_v6_sendmsg ->
    // icmpv6_push_pending_frames drops the error of ip6_push_pending_frames,
    // so sendto() succeeds although cgroup_skb/egress dropped the packet. No
    // echo reply and a `denied` event show the drop.
    let refused6 = run_probe_in(&cgroup, &["icmp-ping", "::1"]);
    assert!(
        refused6.is_eperm() || (refused6.ok && refused6.report["reply"] == false),
        "ICMPv6 ping socket echo without a rule must be refused or dropped: {refused6}"
    );
    let event = daemon.wait_for_event("denied icmpv6 to ::1", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", "::1")
    });
    assert_eq!(event["protocol"], "icmpv6", "{event}");
    assert_eq!(event["pid"], refused6.pid, "{event}");
}

#[test]
fn privileged_raw_socket_creation_follows_raw_sockets() {
    let without = TestCgroup::new();
    let with = TestCgroup::new();
    let daemon = Daemon::start(&strict(&[
        WorkloadSpec::new(PROBE, &without).raw_sockets(false),
        WorkloadSpec::new("raw", &with).raw_sockets(true),
    ]));

    run_probe_in(&without, &["raw-create"]).assert_eperm("SOCK_RAW with raw_sockets = false");
    run_probe_in(&with, &["raw-create"]).assert_ok("SOCK_RAW with raw_sockets = true");

    let event = daemon.wait_for_event("denied raw socket", EVENT_TIMEOUT, |event| {
        event["kind"] == "denied" && event["workload"] == PROBE && event["hook"] == "sock_create"
    });
    assert_eq!(event["comm"], "egressd-probe", "{event}");
}

#[test]
fn privileged_socket_inherited_by_fork_stays_under_the_policy() {
    let cgroup = TestCgroup::new();
    let outside = TestCgroup::new();
    let (allowed, refused, _daemon) = one_allowed_port(&cgroup);
    let procs = outside.procs_file();
    let procs = procs.to_str().expect("utf-8 cgroup path");

    let result = run_probe_in(
        &cgroup,
        &["fork-connect", "127.0.0.4", &refused.port_str(), procs],
    );
    result.assert_eperm("a socket made in the workload, connected from outside after fork");
    assert_eq!(
        result.report["child_cgroup"],
        format!("/{}", outside.relative_path()),
        "the child left the workload: {result}"
    );
    run_probe_in(
        &cgroup,
        &["fork-connect", "127.0.0.2", &allowed.port_str(), procs],
    )
    .assert_ok("the inherited socket keeps its allow rules too");
    // Control: a socket the outside cgroup makes itself is not governed.
    run_probe_in(&outside, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_ok("a fresh socket outside the workload");
}

#[test]
fn privileged_socket_passed_with_scm_rights_stays_under_the_policy() {
    let cgroup = TestCgroup::new();
    let (allowed, refused, _daemon) = one_allowed_port(&cgroup);
    let dir = tempfile::tempdir().expect("tempdir");

    for (target, expect_ok) in [(&refused, false), (&allowed, true)] {
        let path = dir.path().join(format!("pass-{}.sock", target.port));
        let listener = UnixListener::bind(&path).expect("bind the unix socket");
        let sender = spawn_probe_in(&cgroup, &["pass-socket", path.to_str().expect("utf-8")]);
        let fd = receive_fd(&listener);
        // The test process is in no workload; the socket was made in one.
        let result = connect_fd(&fd, target.ip, target.port);
        if expect_ok {
            assert_eq!(result, Ok(()), "connect to the allowed destination");
        } else {
            assert_eq!(
                result.map_err(|errno| errno as i32),
                Err(EPERM),
                "a workload's socket connected by the test process (outside any workload)"
            );
        }
        drop(fd);
        sender.wait(Duration::from_secs(20)).assert_ok("the sender");
    }
    // Control: the test process's own socket is not governed.
    TcpStream::connect((refused.ip, refused.port))
        .expect("the test process's own socket to the refused destination");
}

#[test]
fn privileged_socket_of_no_workload_passed_into_a_workload_takes_the_receivers_policy() {
    let cgroup = TestCgroup::new();
    let (allowed, refused, _daemon) = one_allowed_port(&cgroup);
    let dir = tempfile::tempdir().expect("tempdir");

    for (target, expect_ok) in [(&refused, false), (&allowed, true)] {
        // Made by the test process, in no workload, while egressd runs: no record of its
        // creator is kept, so it cannot carry "no policy" into the workload.
        let socket = socket_of_no_workload(nix::sys::socket::SockType::Stream);
        let result = hand_to_probe(
            &dir.path().join(format!("take-{}.sock", target.port)),
            &socket,
            &cgroup,
            "receive-connect",
            &target.ip.to_string(),
            &target.port_str(),
        );
        if expect_ok {
            result.assert_ok("the workload connects a passed socket to its allowed destination");
        } else {
            result.assert_eperm("the workload connects a passed socket of no workload");
        }
    }
}

#[test]
fn privileged_socket_of_no_workload_handed_on_takes_each_receivers_policy() {
    let sender = TestCgroup::new();
    let other = TestCgroup::new();
    let target = UdpTarget::bind("127.0.0.2");
    let _daemon = Daemon::start(&strict(&[
        WorkloadSpec::new("sender", &sender).allow(allow("127.0.0.2", &[target.port], "udp")),
        // Allowed somewhere else only: the target is not this workload's.
        WorkloadSpec::new("other", &other).allow(allow("127.0.0.9", &[target.port], "udp")),
    ]));
    let dir = tempfile::tempdir().expect("tempdir");
    // Made by the test process, in no workload: each process it is handed to decides.
    let socket = socket_of_no_workload(nix::sys::socket::SockType::Datagram);

    for (turn, (cgroup, expect_ok)) in [(&sender, true), (&other, false)].into_iter().enumerate() {
        let result = hand_to_probe(
            &dir.path().join(format!("handed-{turn}.sock")),
            &socket,
            cgroup,
            "receive-sendto",
            "127.0.0.2",
            &target.port_str(),
        );
        if expect_ok {
            result.assert_ok("the workload whose rule allows the target sends on the socket");
        } else {
            // The verdict the first workload's datagram left with the socket is not this
            // workload's.
            result.assert_eperm("another workload sends on the socket it was handed next");
        }
    }
}

#[test]
fn privileged_child_cgroup_created_after_start_is_governed() {
    let cgroup = TestCgroup::new();
    let (allowed, refused, _daemon) = one_allowed_port(&cgroup);

    let late = cgroup.child("late");
    let deeper = late.child("deeper");
    for child in [&late, &deeper] {
        run_probe_in(child, &["tcp-connect", "127.0.0.4", &refused.port_str()]).assert_eperm(
            &format!(
                "a process in {} (created after the daemon)",
                child.relative_path()
            ),
        );
        run_probe_in(child, &["tcp-connect", "127.0.0.2", &allowed.port_str()])
            .assert_ok("the allowed destination from the child cgroup");
    }
}

#[test]
fn privileged_defaults_deny_wins_over_allow_rules() {
    let cgroup = TestCgroup::new();
    let listed = TcpTarget::bind("127.0.0.66");
    let allowed = TcpTarget::bind("127.0.0.2");
    let daemon = Daemon::start(&policy_toml(
        "strict",
        &["127.0.0.66/32"],
        &[WorkloadSpec::new(PROBE, &cgroup)
            .allow(allow("127.0.0.66", &[listed.port], "tcp"))
            .allow(allow("127.0.0.2", &[allowed.port], "tcp"))],
    ));

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.66", &listed.port_str()])
        .assert_eperm("an allowed destination on the defaults.deny list");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &allowed.port_str()])
        .assert_ok("an allowed destination not on the deny list");
    let event = daemon.wait_for_event("denied by the deny list", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", &listed.destination())
    });
    assert_eq!(event["reason"], "deny_list", "{event}");
}

#[test]
fn privileged_processes_outside_workloads_are_left_alone() {
    let cgroup = TestCgroup::new();
    let unlisted = TestCgroup::new();
    let tcp = TcpTarget::bind("127.0.0.4");
    let udp = UdpTarget::bind("127.0.0.4");
    // A strict workload with no rules at all.
    let _daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup)]));

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &tcp.port_str()])
        .assert_eperm("control: the workload itself is refused");
    TcpStream::connect((tcp.ip, tcp.port)).expect("the test process's own connect");
    for args in [
        vec!["tcp-connect", "127.0.0.4", &tcp.port_str()],
        vec!["udp-sendto", "127.0.0.4", &udp.port_str()],
        vec!["udp-connect-send", "127.0.0.4", &udp.port_str()],
        vec!["icmp-raw", "127.0.0.4"],
        vec!["raw-create"],
    ] {
        run_probe_in(&unlisted, &args).assert_ok("a cgroup in no workload");
        run_probe(&args).assert_ok("the test's own cgroup");
    }
}

#[test]
fn privileged_stopping_the_daemon_keeps_enforcing_until_uninstall() {
    let cgroup = TestCgroup::new();
    let refused = TcpTarget::bind("127.0.0.4");
    let mut daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup)]));
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("while the daemon runs");

    let (status, killed) = daemon.stop().expect("the daemon was running");
    assert!(!killed, "egressd ignored SIGTERM\n{}", daemon.logs());
    assert!(
        status.success(),
        "egressd exited with {status} on SIGTERM\n{}",
        daemon.logs()
    );
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("the pinned programs go on enforcing after the daemon stopped");
    assert!(daemon.pin_dir().exists());

    daemon.uninstall();
    assert!(!daemon.pin_dir().exists(), "--uninstall removes the pins");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_ok("after --uninstall nothing is enforced");
}

#[test]
fn privileged_on_stop_detach_ends_enforcement_with_the_daemon() {
    let cgroup = TestCgroup::new();
    let refused = TcpTarget::bind("127.0.0.4");
    let mut policy = strict(&[WorkloadSpec::new(PROBE, &cgroup)]);
    policy.push_str("\n[daemon]\non_stop = \"detach\"\n");
    let mut daemon = Daemon::start(&policy);
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("while the daemon runs");
    let (status, _) = daemon.stop().expect("the daemon was running");
    assert!(status.success(), "{status}\n{}", daemon.logs());
    assert!(
        !daemon.pin_dir().exists(),
        "on_stop = detach removes the pins"
    );
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_ok("on_stop = detach: nothing is enforced once egressd stopped");
}

/// What a server in a strict workload sends back needs no rule: its replies go to whoever
/// connected. Holds for a connection accepted before egressd started (no mark can have
/// reached it; its listener identifies it) and for one accepted since (the listener's mark is
/// cloned into it). An outbound connection the workload opened before egressd started, to a
/// destination without a rule, is cut all the same.
#[test]
fn privileged_strict_answers_inbound_connections_accepted_before_and_after_start() {
    const BYTES: usize = 262_144;
    let cgroup = TestCgroup::new();
    let scratch = tempfile::tempdir().expect("a scratch folder");
    let go = scratch.path().join("go");
    let outbound = TcpListener::bind("127.0.0.4:0").expect("listen on 127.0.0.4");
    let outbound_port = outbound.local_addr().expect("local address").port();
    let port = free_port();
    let server = spawn_probe_in(
        &cgroup,
        &[
            "tcp-serve",
            "127.0.0.2",
            &port.to_string(),
            &BYTES.to_string(),
            &go.display().to_string(),
            "127.0.0.4",
            &outbound_port.to_string(),
        ],
    );
    let mut before = connect_bounded(("127.0.0.2", port));
    outbound
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let mut outbound_stream = accept_bounded(&outbound);

    // Nothing the test's client or the outbound listener use is allowed.
    let daemon = Daemon::start(&strict(&[WorkloadSpec::new(PROBE, &cgroup).allow(allow(
        "127.0.0.9",
        &[9],
        "tcp",
    ))]));
    std::fs::write(&go, b"").expect("write the go file");

    assert_eq!(
        read_to_end_bounded(&mut before),
        BYTES,
        "the connection accepted before egressd started gets the whole reply"
    );
    let mut after = connect_bounded(("127.0.0.2", port));
    assert_eq!(
        read_to_end_bounded(&mut after),
        BYTES,
        "a connection accepted under egressd gets the whole reply"
    );
    server.wait(Duration::from_secs(20)).assert_ok("tcp-serve");

    outbound_stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match outbound_stream.read(&mut buf) {
        Ok(n) => assert_eq!(
            n, 0,
            "the workload's own connection from before egressd started carries nothing"
        ),
        Err(err) => assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "reading the outbound connection: {err}"
        ),
    }
    let destination = format!("127.0.0.4:{outbound_port}");
    let event = daemon.wait_for_event("the outbound write refused", EVENT_TIMEOUT, |event| {
        is_event(event, "denied", &destination)
    });
    assert_eq!(event["hook"], "egress", "{event}");
    let replies_refused: Vec<Value> = daemon
        .events(1000)
        .into_iter()
        .filter(|event| {
            event["verdict"] == "deny"
                && event["destination"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("127.0.0.1:"))
        })
        .collect();
    assert!(
        replies_refused.is_empty(),
        "replies refused: {replies_refused:?}"
    );
}

/// Connects within 10 s (the server may still be starting), with a 10 s read timeout.
fn connect_bounded(addr: (&str, u16)) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("read timeout");
                return stream;
            }
            Err(err) if Instant::now() > deadline => panic!("connect to {addr:?}: {err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn accept_bounded(listener: &TcpListener) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return stream;
            }
            Err(err)
                if err.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Bytes read until the peer closes; stops at the stream's read timeout.
fn read_to_end_bounded(stream: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    // Bounded: each read returns data, EOF or times out (10 s); 1 << 20 reads at most.
    for _ in 0..(1 << 20) {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(err) => panic!("reading after {total} bytes: {err}"),
        }
    }
    total
}
