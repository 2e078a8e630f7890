//! The allowlists every configuration enforces, written as an egressd policy, an nftables
//! ruleset and iptables-restore input.
//!
//! The measured workload allows `n` entries plus the loopback target; each of the other
//! [`OTHER_WORKLOADS`] workloads allows [`OTHER_ENTRIES`]. Entries never overlap (nftables
//! interval sets refuse overlaps) and are only ever rule entries: no traffic goes to them.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use egressd_tests::{DnsSettings, WorkloadSpec, allow, allow_fqdn, policy_toml};

/// Workloads besides the measured one, so that 1,000 are present.
pub const OTHER_WORKLOADS: usize = 999;
/// Entries of each other workload.
pub const OTHER_ENTRIES: usize = 10;
/// The nftables table the benchmark owns (in its private network namespace).
pub const NFT_TABLE: &str = "egressd_bench";
/// The FQDN rule of the DNS scenario: every name the benchmark's resolver answers.
pub const DNS_PATTERN: &str = "*.bench.test";

/// Odd multipliers scatter consecutive indexes over a power-of-two range without collisions
/// (an odd number is invertible modulo 2^k), so entries are not one dense block.
const HOST_SCATTER: u64 = 2_654_435_761;
const NET_SCATTER: u64 = 40_503;
/// Hosts (/32) live in 10.0.0.0/9, nets (/24) in 10.128.0.0/9: the two never overlap.
const HOST_BITS: u32 = 23;
const NET_BITS: u32 = 15;

/// One IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn scatter(index: u64, multiplier: u64, bits: u32) -> u32 {
    let value = index.wrapping_mul(multiplier) & ((1u64 << bits) - 1);
    // The mask keeps at most 23 bits.
    u32::try_from(value).unwrap_or(0)
}

/// The measured workload's `n` entries: nine in ten are hosts, one in ten a /24 (real
/// allowlists mix both, which makes nftables use an interval set). `generation` 0 and 1 give
/// two disjoint lists of the same shape, for reloads that replace every entry.
pub fn measured(n: usize, generation: u64) -> Vec<Entry> {
    let nets = n / 10;
    let hosts = n - nets;
    let base = 10u32 << 24;
    let host_entries = (0..hosts as u64).map(|i| Entry {
        addr: Ipv4Addr::from(
            base | scatter(i + generation * hosts as u64, HOST_SCATTER, HOST_BITS),
        ),
        len: 32,
    });
    let net_entries = (0..nets as u64).map(|i| Entry {
        addr: Ipv4Addr::from(
            base | 1 << 23 | scatter(i + generation * nets as u64, NET_SCATTER, NET_BITS) << 8,
        ),
        len: 24,
    });
    host_entries.chain(net_entries).collect()
}

/// The entries of other workload `k` (1-based): hosts in 172.16.0.0/12.
pub fn other(k: usize) -> Vec<Entry> {
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    (0..OTHER_ENTRIES)
        .map(|j| Entry {
            addr: Ipv4Addr::from(base + u32::try_from(k * 16 + j).unwrap_or(0)),
            len: 32,
        })
        .collect()
}

/// What the measured workload allows in one configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Cgroups relative to the cgroup v2 mount: index 0 is the measured workload.
    pub cgroups: Vec<String>,
    /// The measured workload's entries (without `target`).
    pub entries: Vec<Entry>,
    /// The loopback destination the client may reach (a /32).
    pub target: Ipv4Addr,
}

impl Plan {
    fn workloads(&self, mode: &str, entries: &[Entry], fqdn: bool) -> Vec<WorkloadSpec> {
        let mut measured = WorkloadSpec {
            name: "measured".to_owned(),
            cgroup: self.cgroups[0].clone(),
            mode: Some(mode.to_owned()),
            raw_sockets: false,
            dns_queries: None,
            allow: Vec::with_capacity(entries.len() + 2),
        };
        measured
            .allow
            .push(allow(&format!("{}/32", self.target), &[], "any"));
        if fqdn {
            measured.allow.push(allow_fqdn(DNS_PATTERN, &[], "any"));
        }
        measured
            .allow
            .extend(entries.iter().map(|e| allow(&e.to_string(), &[], "any")));
        let others = self
            .cgroups
            .iter()
            .enumerate()
            .skip(1)
            .map(|(k, cgroup)| WorkloadSpec {
                name: format!("other-{k:04}"),
                cgroup: cgroup.clone(),
                mode: Some("strict".to_owned()),
                raw_sockets: false,
                dns_queries: None,
                allow: other(k)
                    .iter()
                    .map(|e| allow(&e.to_string(), &[], "any"))
                    .collect(),
            });
        std::iter::once(measured).chain(others).collect()
    }

    /// The egressd policy: the measured workload in `mode` ("strict", "learning"), the others
    /// strict; metrics off (their port is the tests' to use). `entries` replaces the plan's
    /// (a reload); `dns` adds the FQDN rule and the resolver.
    pub fn egressd_policy(
        &self,
        mode: &str,
        entries: Option<&[Entry]>,
        dns: Option<&str>,
    ) -> String {
        let entries = entries.unwrap_or(&self.entries);
        let mut text = policy_toml("strict", &[], &self.workloads(mode, entries, dns.is_some()));
        text.push_str("\n[metrics]\nenabled = false\n");
        if let Some(resolver) = dns {
            text.push_str(&DnsSettings::resolvers(&[resolver]).toml());
        }
        text
    }

    /// The nftables ruleset: one interval set per workload, a verdict map from the socket's
    /// cgroup (`socket cgroupv2 level L`) to the workload's chain, which accepts the set and
    /// rejects the rest (TCP with a reset, so refused connects return at once as they do
    /// with egressd; others with ICMP administratively prohibited). `cgroup_prefix` is where
    /// the cgroup v2 mount sits below /sys/fs/cgroup ("unified/" on hybrid hosts): nft
    /// resolves the paths there.
    pub fn nftables(&self, cgroup_prefix: &str) -> String {
        let level = self.cgroups[0].split('/').count();
        let mut text = format!("table inet {NFT_TABLE} {{\n");
        for (k, _) in self.cgroups.iter().enumerate() {
            let entries: Vec<String> = if k == 0 {
                std::iter::once(format!("{}/32", self.target))
                    .chain(self.entries.iter().map(Entry::to_string))
                    .collect()
            } else {
                other(k).iter().map(Entry::to_string).collect()
            };
            let _ = write!(
                text,
                "  set w{k:04} {{\n    type ipv4_addr\n    flags interval\n    elements = {{\n      {}\n    }}\n  }}\n",
                entries.join(",\n      ")
            );
        }
        let map: Vec<String> = self
            .cgroups
            .iter()
            .enumerate()
            .map(|(k, cgroup)| format!("\"{cgroup_prefix}{cgroup}\" : jump w{k:04}"))
            .collect();
        let _ = write!(
            text,
            "  map workloads {{\n    type cgroupsv2 : verdict\n    elements = {{\n      {}\n    }}\n  }}\n",
            map.join(",\n      ")
        );
        let _ = write!(
            text,
            "  chain output {{\n    type filter hook output priority filter; policy accept;\n    socket cgroupv2 level {level} vmap @workloads\n  }}\n"
        );
        for (k, _) in self.cgroups.iter().enumerate() {
            let _ = write!(
                text,
                "  chain w{k:04} {{\n    ip daddr @w{k:04} accept\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }}\n"
            );
        }
        text.push_str("}\n");
        text
    }

    /// iptables-restore input (`-n`): a chain per workload with one rule per entry, entered
    /// from OUTPUT by `-m cgroup --path`. The measured workload comes last, and so does its
    /// target in its chain: a chain is walked in order, and this is the case that shows it.
    pub fn iptables(&self) -> String {
        let mut text = String::from("*filter\n");
        for (k, _) in self.cgroups.iter().enumerate() {
            let _ = writeln!(text, ":EGB-W{k:04} - [0:0]");
        }
        for (k, cgroup) in self
            .cgroups
            .iter()
            .enumerate()
            .skip(1)
            .chain(self.cgroups.iter().enumerate().take(1))
        {
            let _ = writeln!(text, "-A OUTPUT -m cgroup --path {cgroup} -j EGB-W{k:04}");
        }
        for (k, _) in self.cgroups.iter().enumerate() {
            let entries: Vec<Entry> = if k == 0 {
                let mut list = self.entries.clone();
                list.push(Entry {
                    addr: self.target,
                    len: 32,
                });
                list
            } else {
                other(k)
            };
            for entry in entries {
                let _ = writeln!(text, "-A EGB-W{k:04} -d {entry} -j ACCEPT");
            }
            let _ = writeln!(
                text,
                "-A EGB-W{k:04} -p tcp -j REJECT --reject-with tcp-reset"
            );
            let _ = writeln!(
                text,
                "-A EGB-W{k:04} -j REJECT --reject-with icmp-admin-prohibited"
            );
        }
        text.push_str("COMMIT\n");
        text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn entries_are_distinct_disjoint_and_the_generations_differ() {
        let first = measured(100_000, 0);
        let second = measured(100_000, 1);
        assert_eq!(first.len(), 100_000);
        let all: BTreeSet<Entry> = first.iter().chain(&second).copied().collect();
        assert_eq!(
            all.len(),
            200_000,
            "no entry repeats within or across generations"
        );
        for entry in &all {
            let octets = entry.addr.octets();
            assert_eq!(octets[0], 10);
            // A /24 sits in the upper half of 10/8 with a zero host byte; hosts in the lower.
            match entry.len {
                24 => assert!(octets[1] >= 128 && octets[3] == 0, "{entry}"),
                32 => assert!(octets[1] < 128, "{entry}"),
                _ => panic!("unexpected prefix {entry}"),
            }
        }
    }

    #[test]
    fn other_workloads_do_not_share_entries() {
        let all: BTreeSet<Entry> = (1..=OTHER_WORKLOADS).flat_map(other).collect();
        assert_eq!(all.len(), OTHER_WORKLOADS * OTHER_ENTRIES);
    }

    fn plan() -> Plan {
        Plan {
            cgroups: vec!["bench/w0000".to_owned(), "bench/w0001".to_owned()],
            entries: measured(10, 0),
            target: Ipv4Addr::LOCALHOST,
        }
    }

    #[test]
    fn the_rulesets_name_every_workload_and_the_target() {
        let plan = plan();
        let nft = plan.nftables("unified/");
        assert!(
            nft.contains("socket cgroupv2 level 2 vmap @workloads"),
            "{nft}"
        );
        assert!(
            nft.contains("\"unified/bench/w0001\" : jump w0001"),
            "{nft}"
        );
        assert!(nft.contains("127.0.0.1/32"), "{nft}");
        let ipt = plan.iptables();
        let dispatch: Vec<&str> = ipt.lines().filter(|l| l.starts_with("-A OUTPUT")).collect();
        assert_eq!(
            dispatch,
            vec![
                "-A OUTPUT -m cgroup --path bench/w0001 -j EGB-W0001",
                "-A OUTPUT -m cgroup --path bench/w0000 -j EGB-W0000",
            ]
        );
        assert!(
            ipt.contains("-A EGB-W0000 -d 127.0.0.1/32 -j ACCEPT"),
            "{ipt}"
        );
        let policy = plan.egressd_policy("strict", None, Some("127.0.53.1"));
        assert!(
            policy.contains("127.0.0.1/32") && policy.contains(DNS_PATTERN),
            "{policy}"
        );
        assert!(policy.contains("enabled = false"), "{policy}");
    }
}
