//! Reloading the policy (SIGHUP, `egressctl reload`): a good file takes
//! effect, a broken one is refused and the old policy stays in force.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`).

use std::time::Duration;

use egressd_tests::{
    Daemon, TcpTarget, TestCgroup, WorkloadSpec, allow, line_of, policy_toml, run_probe_in,
};
use serde_json::Value;

const PROBE: &str = "probe";
/// How long a SIGHUP reload may take to show in `status`.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Strict, with `allowed` as the only rule.
fn policy_allowing(cgroup: &TestCgroup, allowed: &TcpTarget) -> String {
    policy_toml(
        "strict",
        &[],
        &[
            WorkloadSpec::new(PROBE, cgroup).allow(allow(
                &allowed.ip_str(),
                &[allowed.port],
                "tcp",
            )),
        ],
    )
}

fn connect(cgroup: &TestCgroup, target: &TcpTarget) -> egressd_tests::ProbeResult {
    run_probe_in(
        cgroup,
        &["tcp-connect", &target.ip_str(), &target.port_str()],
    )
}

/// Asserts that `last_error` names the policy file and `line`.
#[track_caller]
fn assert_names_file_and_line(daemon: &Daemon, message: &str, line: usize) {
    let expected = format!("{}:{line}:", daemon.policy_path().display());
    assert!(
        message.contains(&expected),
        "the error should name {expected}COLUMN: {message:?}"
    );
}

fn last_error(status: &Value) -> Option<String> {
    status["policy"]["last_error"]["message"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn privileged_broken_policy_on_sighup_keeps_the_old_policy() {
    let cgroup = TestCgroup::new();
    let first = TcpTarget::bind("127.0.0.2");
    let second = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_allowing(&cgroup, &first));
    let before = daemon.status();
    assert!(last_error(&before).is_none(), "{before}");
    connect(&cgroup, &first).assert_ok("allowed by the first policy");
    connect(&cgroup, &second).assert_eperm("refused by the first policy");

    // A TOML syntax error: an unterminated string.
    let mut broken = policy_allowing(&cgroup, &second);
    broken = broken.replace(&format!("name = {PROBE:?}"), "name = \"probe");
    let line = line_of(&broken, "name = \"probe");
    daemon.rewrite_policy(&broken);
    daemon.sighup();
    let status = daemon.wait_for_status("policy.last_error after SIGHUP", RELOAD_TIMEOUT, |s| {
        last_error(s).is_some()
    });
    let message = last_error(&status).unwrap_or_default();
    assert_names_file_and_line(&daemon, &message, line);
    assert_eq!(
        status["policy"]["sha256"], before["policy"]["sha256"],
        "the old policy is still the one in force"
    );
    connect(&cgroup, &first).assert_ok("the old policy still allows");
    connect(&cgroup, &second).assert_eperm("the old policy still refuses");

    // A good file takes effect and clears the error.
    daemon.rewrite_policy(&policy_allowing(&cgroup, &second));
    daemon.sighup();
    let status = daemon.wait_for_status("a successful reload after SIGHUP", RELOAD_TIMEOUT, |s| {
        last_error(s).is_none() && s["policy"]["sha256"] != before["policy"]["sha256"]
    });
    assert!(last_error(&status).is_none(), "{status}");
    connect(&cgroup, &second).assert_ok("allowed by the new policy");
    connect(&cgroup, &first).assert_eperm("refused by the new policy");
}

#[test]
fn privileged_broken_policy_on_egressctl_reload_fails_and_keeps_the_old_policy() {
    let cgroup = TestCgroup::new();
    let first = TcpTarget::bind("127.0.0.2");
    let second = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_allowing(&cgroup, &first));
    let before = daemon.status();
    connect(&cgroup, &first).assert_ok("allowed by the first policy");
    connect(&cgroup, &second).assert_eperm("refused by the first policy");

    // A semantic error: an address that is no address, on its own line.
    let broken = policy_allowing(&cgroup, &second).replace("\"127.0.0.4\"", "\"127.0.0.400\"");
    let line = line_of(&broken, "127.0.0.400");
    daemon.rewrite_policy(&broken);
    let output = daemon.reload();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "`egressctl reload` of a broken file must exit 1; stderr: {stderr}"
    );
    assert_names_file_and_line(&daemon, &stderr, line);

    let status = daemon.status();
    let message = last_error(&status).unwrap_or_else(|| panic!("no last_error: {status}"));
    assert_names_file_and_line(&daemon, &message, line);
    assert_eq!(status["policy"]["sha256"], before["policy"]["sha256"]);
    connect(&cgroup, &first).assert_ok("the old policy still allows");
    connect(&cgroup, &second).assert_eperm("the old policy still refuses");

    daemon.rewrite_policy(&policy_allowing(&cgroup, &second));
    let output = daemon.reload();
    assert!(
        output.status.success(),
        "reload of a good file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = daemon.status();
    assert!(last_error(&status).is_none(), "{status}");
    connect(&cgroup, &second).assert_ok("allowed by the new policy");
    connect(&cgroup, &first).assert_eperm("refused by the new policy");
}
