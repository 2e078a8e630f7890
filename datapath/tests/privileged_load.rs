//! Privileged: loads and attaches the real programs at the cgroup v2 root and installs a policy.
//! Needs root and cgroup v2; fails (never skips) without them.

use egressd_datapath::{CidrRule, Datapath, DatapathPolicy, WorkloadSpec, cgroup2_mount};
use egressd_policy::{Mode, PortRange, Protocol};

/// connect4/6, sendmsg4/6, sock_create, egress, ingress.
const ATTACHED_PROGRAMS: usize = 7;

#[tokio::test]
async fn privileged_programs_load_attach_and_accept_a_policy() {
    assert!(
        nix_is_root(),
        "this test needs root (it loads eBPF programs); run it as root"
    );
    let root = cgroup2_mount().expect("cgroup v2 must be mounted");
    let mut datapath = Datapath::load(&root, None).expect("programs load and attach");
    assert_eq!(
        datapath.programs().len(),
        ATTACHED_PROGRAMS,
        "{:?}",
        datapath.programs()
    );
    let policy = sample_policy();
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

/// A bpffs folder of this test's own, removed when dropped (programs then detach).
struct PinFolder(std::path::PathBuf);

impl Drop for PinFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn privileged_pinned_maps_are_adopted_with_their_policy() {
    assert!(
        nix_is_root(),
        "this test needs root (it loads eBPF programs)"
    );
    let root = cgroup2_mount().expect("cgroup v2 must be mounted");
    let pins = PinFolder(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/egressd-datapath-test-{}",
        std::process::id()
    )));
    let policy = sample_policy();
    let mut first = Datapath::load(&root, Some(&pins.0)).expect("load with pins");
    assert!(!first.adopted());
    first.apply(&policy).expect("policy applies");
    let generation = first.apply(&policy).expect("re-apply").generation;
    drop(first);

    let mut second = Datapath::load(&root, Some(&pins.0)).expect("load again");
    assert!(second.adopted(), "the pinned maps are adopted");
    let stats = second.apply(&policy).expect("the same policy");
    assert_eq!(
        (stats.allow_written, stats.allow_removed),
        (0, 0),
        "the adopted maps already hold the policy"
    );
    assert!(stats.generation > generation, "generations continue");
    assert_eq!(
        second.retire_previous().expect("retire"),
        ATTACHED_PROGRAMS,
        "the first daemon's links"
    );
    let emptier = DatapathPolicy {
        workloads: Vec::new(),
        fqdn: Vec::new(),
        resolvers: Vec::new(),
        dns_search_domains: Vec::new(),
        deny: Vec::new(),
        unmatched: None,
    };
    let stats = second.apply(&emptier).expect("an empty policy");
    assert_eq!(
        stats.allow_removed, 1,
        "adopted entries are known, so they are removed"
    );
}

fn sample_policy() -> DatapathPolicy {
    DatapathPolicy {
        workloads: vec![WorkloadSpec {
            id: 1,
            name: "test".into(),
            mode: Mode::Strict,
            raw_sockets: false,
            dns_allowlisted: false,
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
        dns_search_domains: vec!["corp.test".into()],
        deny: vec!["169.254.169.254/32".parse().expect("net")],
        unmatched: None,
    }
}

fn nix_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
