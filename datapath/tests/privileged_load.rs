//! Privileged: loads and attaches the real programs at the cgroup v2 root and installs a policy.
//! Needs root and cgroup v2; fails (never skips) without them.

use egressd_datapath::{CidrRule, Datapath, DatapathPolicy, WorkloadSpec, cgroup2_mount};
use egressd_policy::{Mode, PortRange, Protocol};

#[tokio::test]
async fn privileged_programs_load_attach_and_accept_a_policy() {
    assert!(
        nix_is_root(),
        "this test needs root (it loads eBPF programs); run it as root"
    );
    let root = cgroup2_mount().expect("cgroup v2 must be mounted");
    let mut datapath = Datapath::load(&root).expect("programs load and attach");
    assert_eq!(datapath.programs().len(), 8, "{:?}", datapath.programs());
    let policy = DatapathPolicy {
        workloads: vec![WorkloadSpec {
            id: 1,
            name: "test".into(),
            mode: Mode::Strict,
            raw_sockets: false,
            cgroup_ids: vec![u64::MAX - 1],
            rules: vec![CidrRule {
                net: "127.0.0.2/32".parse().expect("net"),
                ports: vec![PortRange::single(8443)],
                protocol: Protocol::Tcp,
            }],
        }],
        fqdn: vec![egressd_datapath::FqdnSpec {
            workload: 1,
            name: "vendor-cdn.test".into(),
            wildcard: true,
            ports: vec![PortRange::single(443)],
            protocol: Protocol::Tcp,
        }],
        resolvers: vec!["127.0.0.53".parse().expect("ip")],
        deny: vec!["169.254.169.254/32".parse().expect("net")],
        unmatched: None,
    };
    let stats = datapath.apply(&policy).expect("policy applies");
    assert_eq!(stats.allow_entries, 1);
    let again = datapath.apply(&policy).expect("re-apply");
    assert_eq!(again.allow_written, 0, "unchanged policy writes nothing");
    datapath
        .set_mode(1, Mode::Audit, false)
        .expect("mode switch");
    let counters = datapath.counters().expect("counters");
    assert_eq!(counters.ring_buffer_drops, 0);
}

fn nix_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
