//! Arbitrary bytes as a policy file: parsing and validation must never panic, a rejected
//! file must be reported as `fuzz.toml:LINE:COL: message` lines, and an accepted one must
//! be usable: reasons, reference matching of CIDR rules, cgroup and FQDN patterns.
#![no_main]

use std::net::IpAddr;
use std::path::Path;

use egressd_policy::{
    CgroupPattern, Destination, FqdnPattern, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, Policy, PolicyError, canonical_ip, missing_reasons, parse,
};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "fuzz.toml";

/// Destinations checked against every workload, with their IPv4-mapped twins.
const ADDRESSES: [&str; 10] = [
    "10.1.2.3",
    "127.0.0.2",
    "127.0.0.53",
    "169.254.169.254",
    "0.0.0.0",
    "255.255.255.255",
    "::1",
    "2001:db8::1",
    "::ffff:10.1.2.3",
    "fe80::1",
];
const PROTOCOLS: [u8; 6] = [
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    0,
    255,
];
const PORTS: [Option<u16>; 6] = [None, Some(0), Some(53), Some(443), Some(8050), Some(65535)];

const CGROUPS: [&str; 10] = [
    "system.slice/vendor-agent.service",
    "/system.slice/vendor-agent.service/",
    "a/b",
    "a/x/y/b",
    "kubepods/burstable/pod1/ctr",
    "",
    "/",
    "a//b",
    "é/ü/ñ",
    "**",
];
const NAMES: [&str; 9] = [
    "api.example.com",
    "API.Example.COM.",
    "a.vendor-cdn.com",
    "vendor-cdn.com",
    "é.example.com",
    "",
    ".",
    "*.example.com",
    "x.é",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text, Path::new(PATH)) {
        Ok(policy) => accepted(&policy),
        Err(error) => rejected(&error),
    }
});

fn rejected(error: &PolicyError) {
    let PolicyError::Invalid { diagnostics, .. } = error else {
        panic!("parse cannot fail with I/O: {error:?}");
    };
    assert!(!diagnostics.is_empty(), "rejected without a diagnostic");
    for diagnostic in diagnostics {
        assert!(
            diagnostic.line >= 1 && diagnostic.column >= 1,
            "positions are 1-based: {diagnostic:?}"
        );
    }
    let rendered = error.to_string();
    for line in rendered.lines() {
        assert!(
            line.starts_with("fuzz.toml:"),
            "diagnostic line without the path: {line:?}\nwhole message: {rendered:?}"
        );
    }
}

fn accepted(policy: &Policy) {
    let rules: usize = policy.workloads.iter().map(|w| w.allow.len()).sum();
    let missing = missing_reasons(policy);
    assert!(missing.len() <= rules);
    for diagnostic in &missing {
        let _ = diagnostic.to_string();
    }

    let addresses: Vec<IpAddr> = ADDRESSES
        .iter()
        .map(|a| a.parse().expect("fixed address"))
        .collect();
    for workload in &policy.workloads {
        let _ = policy.effective_file_mode(workload);
        for &address in &addresses {
            // The deny list sees the destination as the datapath does: mapped as IPv4.
            let canonical = canonical_ip(address);
            let denied = policy
                .defaults
                .deny
                .iter()
                .any(|net| net.contains(&canonical));
            let mapped = match address {
                IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
                IpAddr::V6(_) => None,
            };
            for protocol in PROTOCOLS {
                for port in PORTS {
                    let allowed = policy.allows(workload, address, protocol, port);
                    assert!(!(denied && allowed), "deny list lost to an allow rule");
                    // Without the deny list, an allow follows from one matching rule.
                    let open = workload.allows(&[], address, protocol, port);
                    assert_eq!(
                        open,
                        workload
                            .allow
                            .iter()
                            .any(|rule| rule.matches_cidr(address, protocol, port))
                    );
                    assert!(open || !allowed);
                    if let Some(mapped) = mapped {
                        // IPv4-mapped IPv6 destinations are judged as IPv4.
                        assert_eq!(
                            policy.allows(workload, mapped, protocol, port),
                            allowed,
                            "{address} and {mapped} judged differently"
                        );
                    }
                }
            }
        }
        if let Some(cgroup) = &workload.cgroup {
            cgroup_pattern(cgroup);
        }
        for rule in &workload.allow {
            if let Destination::Fqdn(pattern) = &rule.destination {
                fqdn_pattern(pattern);
            }
        }
    }
}

fn cgroup_pattern(pattern: &CgroupPattern) {
    for path in CGROUPS {
        let _ = pattern.matches(path);
    }
    let text = pattern.as_str();
    assert!(text.starts_with(pattern.literal_prefix()));
    // A pattern selects the path spelled like it, and the same path with every glob
    // filled in: '*' by a few characters, '**' by two segments.
    assert!(pattern.matches(text), "{text:?} does not match itself");
    let filled: Vec<String> = text
        .split('/')
        .map(|segment| match segment {
            "**" => "x/y".to_owned(),
            _ => segment.replace('*', "xyz"),
        })
        .collect();
    let filled = filled.join("/");
    assert!(
        pattern.matches(&filled),
        "{text:?} does not match {filled:?}"
    );
    if pattern.is_literal() {
        assert_eq!(pattern.literal_prefix(), text);
        assert!(!pattern.matches(&format!("{text}/child")));
    }
    // Parsing the normalized text again gives the same pattern.
    let again = CgroupPattern::parse(text).expect("a valid pattern parses again");
    assert_eq!(&again, pattern);
}

fn fqdn_pattern(pattern: &FqdnPattern) {
    for name in NAMES {
        let _ = pattern.matches(name);
    }
    let suffix = pattern.suffix();
    if pattern.is_wildcard() {
        assert!(!pattern.matches(suffix));
        assert!(pattern.matches(&format!("a.{suffix}")));
        assert!(pattern.matches(&format!("A.B.{}.", suffix.to_ascii_uppercase())));
        assert!(!pattern.matches(&format!(".{suffix}")));
        assert!(!pattern.matches(&format!("é{suffix}")));
    } else {
        assert_eq!(suffix, pattern.as_str());
        assert!(pattern.matches(suffix));
        assert!(pattern.matches(&format!("{}.", suffix.to_ascii_uppercase())));
        assert!(!pattern.matches(&format!("a.{suffix}")));
    }
    let again = FqdnPattern::parse(pattern.as_str()).expect("a valid pattern parses again");
    assert_eq!(&again, pattern);
}
