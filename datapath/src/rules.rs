//! Turning CIDR allow rules into allow-trie entries. Pure, so it is unit-tested without a kernel.
//!
//! The trie returns only the longest matching prefix, so each entry carries the union of its
//! own port rules and those of every shorter prefix of the same workload that covers it.

use std::collections::{BTreeMap, BTreeSet};

use egressd_common::policy::{
    ALLOW_KEY_WORKLOAD_BITS, AllowKey, AllowValue, DenyKey, MAX_PORT_RULES, PROTOCOL_ANY,
    PROTOCOL_ICMP_ANY, PortRule,
};
use egressd_policy::{IPPROTO_TCP, IPPROTO_UDP, PortRange, Protocol};
use ipnet::IpNet;

use crate::DatapathError;

/// A CIDR allow rule as the datapath enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRule {
    pub net: IpNet,
    /// Empty means every port (and port-less protocols such as ICMP).
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
}

/// A prefix in the 128-bit IPv4-mapped address space: `(address, prefix length)`.
pub(crate) type Prefix = ([u8; 16], u8);

pub(crate) fn to_prefix(net: &IpNet) -> Prefix {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => (v4.addr().to_ipv6_mapped().octets(), 96 + v4.prefix_len()),
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => (v4.to_ipv6_mapped().octets(), v6.prefix_len()),
            _ => (v6.addr().octets(), v6.prefix_len()),
        },
    }
}

/// `prefix` shortened to its first `len` bits (the covering prefix of that length).
fn truncate(prefix: &Prefix, len: u8) -> Prefix {
    let bits = u32::from(len.min(128));
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    ((u128::from_be_bytes(prefix.0) & mask).to_be_bytes(), len)
}

fn port_rules(rule: &CidrRule) -> Vec<PortRule> {
    port_rules_of(&rule.ports, rule.protocol)
}

pub(crate) fn port_rules_of(ports: &[PortRange], protocol: Protocol) -> Vec<PortRule> {
    let protocol = match protocol {
        Protocol::Any => PROTOCOL_ANY,
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Icmp => PROTOCOL_ICMP_ANY,
    };
    let ranges = if ports.is_empty() {
        vec![PortRange::ALL]
    } else {
        ports.to_vec()
    };
    ranges
        .into_iter()
        .map(|range| PortRule {
            port_first: range.first,
            port_last: range.last,
            protocol,
            reserved: 0,
        })
        .collect()
}

/// Sorts, drops rules another rule already covers and joins touching ranges.
pub(crate) fn merge(mut rules: Vec<PortRule>) -> Vec<PortRule> {
    let everything = rules
        .iter()
        .any(|r| r.protocol == PROTOCOL_ANY && r.port_first == 0 && r.port_last == u16::MAX);
    if everything {
        return vec![PortRule {
            port_first: 0,
            port_last: u16::MAX,
            protocol: PROTOCOL_ANY,
            reserved: 0,
        }];
    }
    rules.sort_by_key(|r| (r.protocol, r.port_first, r.port_last));
    let mut merged: Vec<PortRule> = Vec::with_capacity(rules.len());
    for rule in rules {
        match merged.last_mut() {
            Some(last)
                if last.protocol == rule.protocol
                    && u32::from(rule.port_first) <= u32::from(last.port_last) + 1 =>
            {
                last.port_last = last.port_last.max(rule.port_last);
            }
            _ => merged.push(rule),
        }
    }
    // A rule for any protocol covers a same-range rule for one protocol.
    let any: Vec<PortRule> = merged
        .iter()
        .filter(|r| r.protocol == PROTOCOL_ANY)
        .copied()
        .collect();
    merged.retain(|r| {
        r.protocol == PROTOCOL_ANY
            || !any
                .iter()
                .any(|a| a.port_first <= r.port_first && r.port_last <= a.port_last)
    });
    merged
}

pub(crate) fn allow_key(workload: u32, prefix: &Prefix) -> aya::maps::lpm_trie::Key<AllowKey> {
    aya::maps::lpm_trie::Key::new(
        ALLOW_KEY_WORKLOAD_BITS + u32::from(prefix.1),
        AllowKey {
            workload_be: workload.to_be_bytes(),
            addr: prefix.0,
        },
    )
}

pub(crate) fn deny_key(prefix: &Prefix) -> aya::maps::lpm_trie::Key<DenyKey> {
    aya::maps::lpm_trie::Key::new(u32::from(prefix.1), DenyKey { addr: prefix.0 })
}

/// The allow-trie entries of one workload, keyed by prefix.
pub(crate) fn compile_workload(
    workload_name: &str,
    rules: &[CidrRule],
) -> Result<BTreeMap<Prefix, AllowValue>, DatapathError> {
    let mut own: BTreeMap<Prefix, Vec<PortRule>> = BTreeMap::new();
    for rule in rules {
        own.entry(to_prefix(&rule.net))
            .or_default()
            .extend(port_rules(rule));
    }
    // The prefixes covering one are found by looking it up truncated to each prefix length
    // the workload uses (a handful), not by comparing it with every other prefix: a workload
    // with 100,000 rules compiles in a fraction of a second instead of 10^10 comparisons.
    let lengths: BTreeSet<u8> = own.keys().map(|prefix| prefix.1).collect();
    let mut entries = BTreeMap::new();
    for prefix in own.keys() {
        let inherited: Vec<PortRule> = lengths
            .range(..=prefix.1)
            .filter_map(|&len| own.get(&truncate(prefix, len)))
            .flat_map(|rules| rules.iter().copied())
            .collect();
        let merged = merge(inherited);
        if merged.len() > MAX_PORT_RULES {
            return Err(DatapathError::TooManyPortRules {
                workload: workload_name.to_owned(),
                prefix: describe_prefix(prefix),
                count: merged.len(),
                limit: MAX_PORT_RULES,
            });
        }
        let mut value = AllowValue {
            count: merged.len() as u32,
            ..Default::default()
        };
        value.rules[..merged.len()].copy_from_slice(&merged);
        entries.insert(*prefix, value);
    }
    Ok(entries)
}

/// An allow-trie value as the daemon's mirror of the map keeps it. Nearly every entry holds
/// one port rule: stored inline that is 16 bytes instead of the kernel value's 104, which for
/// a 100,000-rule policy is the difference between about 7 and 26 MiB of mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompactAllow {
    /// `count` 1, every other slot of `rules` empty.
    One { flags: u32, rule: PortRule },
    /// Anything else, exactly as the kernel holds it.
    Full(Box<AllowValue>),
}

impl CompactAllow {
    pub(crate) fn new(value: &AllowValue) -> Self {
        let unused_empty = value.rules[1..].iter().all(|r| *r == PortRule::default());
        if value.count == 1 && unused_empty {
            CompactAllow::One {
                flags: value.flags,
                rule: value.rules[0],
            }
        } else {
            CompactAllow::Full(Box::new(*value))
        }
    }

    /// The kernel value, as it was before compaction.
    pub(crate) fn value(&self) -> AllowValue {
        match self {
            CompactAllow::One { flags, rule } => {
                let mut value = AllowValue {
                    count: 1,
                    flags: *flags,
                    ..Default::default()
                };
                value.rules[0] = *rule;
                value
            }
            CompactAllow::Full(value) => **value,
        }
    }
}

pub(crate) fn describe_prefix(prefix: &Prefix) -> String {
    let addr = std::net::Ipv6Addr::from(prefix.0);
    match addr.to_ipv4_mapped() {
        Some(v4) if prefix.1 >= 96 => format!("{v4}/{}", prefix.1 - 96),
        _ => format!("{addr}/{}", prefix.1),
    }
}

/// Port rules as a fixed-size kernel array, merged; the merged count when they do not fit.
pub(crate) fn rule_array(rules: Vec<PortRule>) -> Result<(u32, [PortRule; MAX_PORT_RULES]), usize> {
    let merged = merge(rules);
    if merged.len() > MAX_PORT_RULES {
        return Err(merged.len());
    }
    let mut array = [PortRule::default(); MAX_PORT_RULES];
    array[..merged.len()].copy_from_slice(&merged);
    Ok((merged.len() as u32, array))
}

/// Like `rule_array`, keeping the first rules that fit.
pub(crate) fn rule_array_truncated(rules: Vec<PortRule>) -> (u32, [PortRule; MAX_PORT_RULES]) {
    let mut merged = merge(rules);
    merged.truncate(MAX_PORT_RULES);
    let mut array = [PortRule::default(); MAX_PORT_RULES];
    array[..merged.len()].copy_from_slice(&merged);
    (merged.len() as u32, array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_allow_values_round_trip() {
        let one = compile_workload("w", &[rule("10.0.0.1/32", &[(443, 443)], Protocol::Tcp)])
            .expect("compiles");
        let many = compile_workload(
            "w",
            &[rule("10.0.0.2/32", &[(80, 80), (443, 443)], Protocol::Tcp)],
        )
        .expect("compiles");
        for value in one.values().chain(many.values()) {
            assert_eq!(CompactAllow::new(value).value(), *value);
        }
        let one = one.values().next().expect("one entry");
        assert!(matches!(CompactAllow::new(one), CompactAllow::One { .. }));
        let mut flagged = *one;
        flagged.flags = 1;
        assert_ne!(CompactAllow::new(&flagged), CompactAllow::new(one));
        let mut stray = *one;
        stray.rules[3].port_first = 7;
        assert!(matches!(CompactAllow::new(&stray), CompactAllow::Full(_)));
        assert_eq!(CompactAllow::new(&stray).value(), stray);
    }

    fn rule(net: &str, ports: &[(u16, u16)], protocol: Protocol) -> CidrRule {
        CidrRule {
            net: net.parse().expect("test net"),
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocol,
        }
    }

    fn rules_of(value: &AllowValue) -> Vec<(u8, u16, u16)> {
        value.rules[..value.count as usize]
            .iter()
            .map(|r| (r.protocol, r.port_first, r.port_last))
            .collect()
    }

    #[test]
    fn ipv4_and_mapped_prefixes_are_one_space() {
        assert_eq!(
            to_prefix(&"10.0.0.0/8".parse().expect("net")),
            to_prefix(&"::ffff:10.0.0.0/104".parse().expect("net"))
        );
        let (addr, len) = to_prefix(&"127.0.0.2/32".parse().expect("net"));
        assert_eq!(len, 128);
        assert_eq!(&addr[10..], &[0xff, 0xff, 127, 0, 0, 2]);
    }

    #[test]
    fn longer_prefix_inherits_covering_rules() {
        let entries = compile_workload(
            "w",
            &[
                rule("10.0.0.0/8", &[], Protocol::Tcp),
                rule("10.1.2.3/32", &[(443, 443)], Protocol::Udp),
            ],
        )
        .expect("compiles");
        let host = entries
            .get(&to_prefix(&"10.1.2.3/32".parse().expect("net")))
            .expect("host entry");
        assert_eq!(
            rules_of(host),
            vec![(IPPROTO_TCP, 0, 65535), (IPPROTO_UDP, 443, 443)]
        );
        let wide = entries
            .get(&to_prefix(&"10.0.0.0/8".parse().expect("net")))
            .expect("wide entry");
        assert_eq!(rules_of(wide), vec![(IPPROTO_TCP, 0, 65535)]);
    }

    #[test]
    fn every_covering_prefix_is_inherited_and_no_other() {
        // Nested, sibling and cross-family prefixes, each with its own port (spaced, so
        // merging never joins two): the ports of an entry name the rules that reached it.
        let nets = [
            "::/0",
            "::ffff:0:0/96",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.1.3.0/24",
            "11.0.0.0/8",
            "2001:db8::/32",
            "2001:db8::1/128",
        ];
        let port = |index: usize| 10 * (u16::try_from(index).expect("few rules") + 1);
        let rules: Vec<CidrRule> = nets
            .iter()
            .enumerate()
            .map(|(i, net)| rule(net, &[(port(i), port(i))], Protocol::Tcp))
            .collect();
        let entries = compile_workload("w", &rules).expect("compiles");
        for net in nets {
            let inner = to_prefix(&net.parse().expect("net"));
            // The reference: every rule whose prefix is no longer and agrees on its bits.
            let mut expected: Vec<(u8, u16, u16)> = nets
                .iter()
                .enumerate()
                .filter(|(_, outer)| {
                    let outer = to_prefix(&outer.parse().expect("net"));
                    outer.1 <= inner.1 && truncate(&inner, outer.1) == outer
                })
                .map(|(i, _)| (IPPROTO_TCP, port(i), port(i)))
                .collect();
            expected.sort_unstable();
            assert_eq!(rules_of(&entries[&inner]), expected, "{net}");
        }
    }

    #[test]
    fn overlapping_ranges_merge_and_any_wins() {
        let entries = compile_workload(
            "w",
            &[
                rule("::1/128", &[(80, 90), (85, 100), (101, 101)], Protocol::Tcp),
                rule("::1/128", &[(80, 80)], Protocol::Any),
            ],
        )
        .expect("compiles");
        let value = entries.values().next().expect("entry");
        assert_eq!(
            rules_of(value),
            vec![(PROTOCOL_ANY, 80, 80), (IPPROTO_TCP, 80, 101)]
        );
        let all = compile_workload("w", &[rule("::1/128", &[], Protocol::Any)]).expect("ok");
        assert_eq!(
            rules_of(all.values().next().expect("entry")),
            vec![(PROTOCOL_ANY, 0, 65535)]
        );
    }

    /// The definition: an entry holds the rules of every prefix that covers it.
    fn covers(outer: &Prefix, inner: &Prefix) -> bool {
        outer.1 <= inner.1 && truncate(inner, outer.1) == *outer
    }

    #[test]
    fn inherited_rules_match_the_definition() {
        let nets = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.1.3.0/24",
            "10.2.0.0/15",
            "192.168.0.0/16",
            "::/0",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "2001:db8:1::1/128",
            "::ffff:10.1.0.0/112",
        ];
        let rules: Vec<CidrRule> = nets
            .iter()
            .enumerate()
            .map(|(i, net)| {
                let port = 1000 + u16::try_from(i).expect("few rules") * 10;
                rule(net, &[(port, port)], Protocol::Tcp)
            })
            .collect();
        let entries = compile_workload("w", &rules).expect("compiles");
        let own: Vec<(Prefix, Vec<PortRule>)> = rules
            .iter()
            .map(|r| (to_prefix(&r.net), port_rules(r)))
            .collect();
        for (prefix, value) in &entries {
            let expected = merge(
                own.iter()
                    .filter(|(outer, _)| covers(outer, prefix))
                    .flat_map(|(_, rules)| rules.iter().copied())
                    .collect(),
            );
            assert_eq!(
                value.rules[..value.count as usize],
                expected[..],
                "{prefix:?}"
            );
        }
        // 10.1.2.3/32 inherits from /32, /24, /16 (twice: ::ffff:10.1.0.0/112 is the same
        // prefix), /8, 0.0.0.0/0 and ::/0.
        let host = entries
            .get(&to_prefix(&"10.1.2.3/32".parse().expect("net")))
            .expect("host entry");
        assert_eq!(rules_of(host).len(), 7, "{:?}", rules_of(host));
    }

    #[test]
    fn a_hundred_thousand_host_rules_compile() {
        let rules: Vec<CidrRule> = (0..100_000u32)
            .map(|i| {
                let addr = std::net::Ipv4Addr::from(0xc612_0000 + i);
                rule(&format!("{addr}/32"), &[(443, 443)], Protocol::Tcp)
            })
            .chain([rule("198.18.0.0/15", &[(80, 80)], Protocol::Tcp)])
            .collect();
        let entries = compile_workload("w", &rules).expect("compiles");
        assert_eq!(entries.len(), 100_001);
        let host = entries
            .get(&to_prefix(&"198.18.1.1/32".parse().expect("net")))
            .expect("host entry");
        assert_eq!(
            rules_of(host),
            vec![(IPPROTO_TCP, 80, 80), (IPPROTO_TCP, 443, 443)]
        );
    }

    #[test]
    fn too_many_port_rules_names_the_prefix() {
        let ports: Vec<(u16, u16)> = (0..20).map(|i| (1000 + i * 2, 1000 + i * 2)).collect();
        let err = compile_workload("agent", &[rule("10.0.0.1/32", &ports, Protocol::Tcp)])
            .expect_err("over the limit");
        let text = err.to_string();
        assert!(
            text.contains("agent") && text.contains("10.0.0.1/32"),
            "{text}"
        );
    }
}
