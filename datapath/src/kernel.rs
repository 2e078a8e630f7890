//! What egressd needs from the running kernel, checked before anything is loaded, and the
//! kernel's refusal of a program turned into a message an operator can act on.
//!
//! Every requirement is probed (a tiny map or program the kernel accepts or refuses), not
//! inferred from the version number: distribution kernels backport features. The versions
//! below only say where mainline Linux got each feature, for the message.

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported};
use aya::util::KernelVersion;

/// The oldest kernel egressd is known to run on (README: Kernel requirements). Older kernels
/// may offer every feature below and still refuse the programs: their verifiers give up on
/// programs that newer ones accept (scripts/kernel-matrix.sh shows it for 5.10 and 6.1).
pub const TESTED_MINIMUM: &str = "6.12";

/// A kernel feature egressd cannot do without.
struct Requirement {
    feature: &'static str,
    /// The mainline release that added it, when it is one release.
    since: Option<&'static str>,
    probe: Probe,
}

enum Probe {
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// aya attaches cgroup programs as bpf_links only from this version (and through the
    /// legacy attach before, which egressd cannot own or pin): decided by version, as aya does.
    KernelAtLeast(u8, u8),
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        feature: "BPF ring buffers (events and DNS answers)",
        since: Some("5.8"),
        probe: Probe::Map(MapType::RingBuf),
    },
    Requirement {
        feature: "cgroup bpf_link attachments",
        since: Some("5.7"),
        probe: Probe::KernelAtLeast(5, 7),
    },
    Requirement {
        feature: "socket-local storage maps",
        since: Some("5.2"),
        probe: Probe::Map(MapType::SkStorage),
    },
    Requirement {
        feature: "socket-local storage in cgroup_skb programs",
        since: Some("5.2"),
        probe: Probe::Helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Requirement {
        feature: "socket-local storage in connect/sendmsg programs",
        since: None,
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_sk_storage_get,
        ),
    },
    Requirement {
        feature: "socket-local storage in sock_create programs",
        since: None,
        probe: Probe::Helper(ProgramType::CgroupSock, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Requirement {
        feature: "bpf_sk_lookup_tcp in cgroup_skb programs",
        since: None,
        probe: Probe::Helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_lookup_tcp),
    },
    Requirement {
        feature: "bpf_get_current_ancestor_cgroup_id in connect/sendmsg programs",
        since: Some("5.7"),
        probe: Probe::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        ),
    },
    Requirement {
        feature: "bpf_sk_fullsock in cgroup_skb programs",
        since: Some("5.1"),
        probe: Probe::Helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_fullsock),
    },
    Requirement {
        feature: "ring buffer output from cgroup_skb programs",
        since: Some("5.8"),
        probe: Probe::Helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_ringbuf_reserve),
    },
];

/// The running kernel's release (`uname -r`), or "unknown".
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The requirements this kernel does not meet, described for a message (`feature (Linux X)`).
/// A probe that cannot decide (an unexpected error) counts as met: loading the programs then
/// decides, with the verifier's reason.
pub fn missing_features() -> Vec<String> {
    REQUIREMENTS
        .iter()
        .filter(|requirement| !supported(&requirement.probe))
        .map(|requirement| match requirement.since {
            Some(since) => format!("{} (Linux {since})", requirement.feature),
            None => requirement.feature.to_owned(),
        })
        .collect()
}

fn supported(probe: &Probe) -> bool {
    match probe {
        Probe::Map(map_type) => is_map_supported(*map_type).unwrap_or(true),
        Probe::Helper(program_type, helper) => {
            is_helper_supported(*program_type, *helper).unwrap_or(true)
        }
        // Unknown version: aya would take the legacy attach, which egressd cannot own.
        Probe::KernelAtLeast(major, minor) => KernelVersion::current()
            .is_ok_and(|current| current >= KernelVersion::new(*major, *minor, 0)),
    }
}

/// Whether cgroup_skb programs may call `bpf_get_current_pid_tgid` (Linux 6.10): the egress
/// program that names sending tasks needs it. Probed, so the choice costs no verifier run of
/// the whole program.
pub fn cgroup_skb_knows_current_task() -> bool {
    is_helper_supported(
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
    )
    .unwrap_or(false)
}

/// The verifier's reason for refusing a program: the last lines of its log before the
/// statistics it appends ("processed N insns", "verification time"), which state the rule the
/// program broke (at most two lines, joined with "; "). None when the log ends in a trace.
pub fn verifier_reason(log: &str) -> Option<String> {
    const MAX_REASON_LINES: usize = 2;
    let mut reason = Vec::new();
    for line in log
        .lines()
        .rev()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        if reason.is_empty() && is_statistics(line) {
            continue;
        }
        if is_trace(line) || is_statistics(line) || reason.len() == MAX_REASON_LINES {
            break;
        }
        reason.push(line);
    }
    reason.reverse();
    (!reason.is_empty()).then(|| reason.join("; "))
}

fn is_statistics(line: &str) -> bool {
    ["processed ", "verification time", "stack depth"]
        .iter()
        .any(|prefix| line.starts_with(prefix))
}

/// Lines that show the path the verifier walked, not the rule: instructions (`12: (85) call`),
/// register and stack dumps (`R0_w=...`, `regs=4 stack=0`), source lines (`; let x = ...`) and
/// its bookkeeping (`last_idx`, `parent already had`, `from 3 to 5:`).
fn is_trace(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or_default();
    first.contains('=')
        || line.starts_with(';')
        || first
            .strip_suffix(':')
            .is_some_and(|index| !index.is_empty() && index.chars().all(|c| c.is_ascii_digit()))
        || ["last_idx", "parent", "from"].contains(&first)
}

#[cfg(test)]
mod tests {
    use super::verifier_reason;

    /// The end of the log Debian's Linux 5.10 prints when it refuses the egress program
    /// (scripts/kernel-matrix.sh).
    const REFUSED_ON_5_10: &str = "\
3469: (0f) r3 += r6
last_idx 3469 first_idx 3471
regs=40 stack=0 before 3468: (bf) r3 = r9
 R0_w=map_value(id=0,off=256,ks=4,vs=416,umax_value=48) R3_w=map_value(id=0,off=0)
parent already had regs=48 stack=800000 marks
3470: (71) r3 = *(u8 *)(r3 +0)
 R0_w=map_value(id=0,off=256,ks=4,vs=416,umax_value=48,var_off=(0x0; 0x38))
invalid access to map value, value_size=416 off=448 size=1
R3 max value is outside of the allowed memory range
verification time 71808830 usec
stack depth 456+0
processed 393014 insns (limit 1000000) max_states_per_insn 36 total_states 19030
";

    #[test]
    fn the_reason_is_the_rule_the_program_broke() {
        assert_eq!(
            verifier_reason(REFUSED_ON_5_10).as_deref(),
            Some(
                "invalid access to map value, value_size=416 off=448 size=1; \
                 R3 max value is outside of the allowed memory range"
            )
        );
    }

    #[test]
    fn an_unknown_helper_is_named() {
        let log = "0: R1=ctx(off=0,imm=0) R10=fp0\n; #[cgroup_skb(egress)]\n\
                   0: (85) call bpf_get_current_pid_tgid#14\n\
                   unknown func bpf_get_current_pid_tgid#14\n\
                   processed 1 insns (limit 1000000) max_states_per_insn 0\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some("unknown func bpf_get_current_pid_tgid#14")
        );
    }

    #[test]
    fn a_refusal_names_the_kernel_the_program_and_the_rule() {
        let message = crate::DatapathError::ProgramRefused {
            name: "egress_compat",
            kernel: "5.10.0-46-amd64".to_owned(),
            reason: verifier_reason(REFUSED_ON_5_10).unwrap_or_default(),
        }
        .to_string();
        for part in [
            "Linux 5.10.0-46-amd64",
            "egress_compat",
            "invalid access to map value",
            "Linux 6.12 and later",
            "nothing was attached",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn every_missing_feature_is_named_at_once() {
        let message = crate::DatapathError::KernelLacks {
            kernel: "5.4.0-150-generic".to_owned(),
            missing: vec![
                "BPF ring buffers (events and DNS answers) (Linux 5.8)".to_owned(),
                "cgroup bpf_link attachments (Linux 5.7)".to_owned(),
            ],
        }
        .to_string();
        assert!(
            message.contains(
                "Linux 5.4.0-150-generic) lacks what egressd needs: BPF ring buffers (events and \
                 DNS answers) (Linux 5.8); cgroup bpf_link attachments (Linux 5.7)"
            ),
            "{message}"
        );
    }

    #[test]
    fn an_empty_log_has_no_reason() {
        assert_eq!(verifier_reason(""), None);
        assert_eq!(
            verifier_reason("processed 10 insns (limit 1000000)\n"),
            None
        );
    }
}
