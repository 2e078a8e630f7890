//! `egressctl diff`: what was observed that a policy does not allow.

use egressd_policy::{Destination, Policy};

use crate::model::Observation;

/// The observations (allowed, denied or would-deny alike) that `policy` does not allow,
/// in their input order: a pipeline fails an upgrade on a non-empty result.
///
/// An observation is allowed when its workload exists in the policy, its address is
/// not on the deny list, and either a CIDR rule covers its address, protocol and port
/// ([`egressd_policy::Workload::allows`]) or one of its DNS names matches an `fqdn`
/// rule ([`egressd_policy::FqdnPattern::matches`]) that covers its protocol and port.
pub fn diff(policy: &Policy, observations: &[Observation]) -> Vec<Observation> {
    observations
        .iter()
        .filter(|observation| !allowed(policy, observation))
        .cloned()
        .collect()
}

/// Whether `policy` allows what `observation` saw.
pub(crate) fn allowed(policy: &Policy, observation: &Observation) -> bool {
    let key = &observation.key;
    let Some(workload) = policy.workload(&key.workload) else {
        return false;
    };
    let address = egressd_policy::canonical_ip(key.address);
    if policy
        .defaults
        .deny
        .iter()
        .any(|net| net.contains(&address))
    {
        return false;
    }
    policy.allows(workload, address, key.protocol, key.port)
        || workload.allow.iter().any(|rule| match &rule.destination {
            Destination::Fqdn(pattern) => {
                rule.matches_traffic(key.protocol, key.port)
                    && observation
                        .dns_names
                        .iter()
                        .any(|name| pattern.matches(name))
            }
            Destination::Cidr(_) => false,
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;
    use crate::model::{FlowKey, FlowSample};

    fn observation(
        workload: &str,
        address: &str,
        port: Option<u16>,
        protocol: u8,
        name: Option<&str>,
    ) -> Observation {
        let key = FlowKey::new(workload, address.parse().expect("ip"), port, protocol);
        let mut sample = FlowSample::new(key, SystemTime::UNIX_EPOCH);
        sample.dns_name = name.map(str::to_owned);
        Observation::from_sample(&sample)
    }

    const POLICY: &str = r#"
[defaults]
deny = ["169.254.169.254/32", "203.0.113.66"]

[[workload]]
name = "agent"
cgroup = "system.slice/agent.service"
allow = [
  { cidr = "10.0.0.0/8", reason = "cluster" },
  { cidr = "203.0.113.0/24", ports = [443], protocol = "tcp", reason = "vendor range" },
  { fqdn = "api.vendor.com", ports = [443], protocol = "tcp", reason = "api" },
  { fqdn = "*.cdn.vendor.com", reason = "downloads" },
]
"#;

    fn policy() -> Policy {
        egressd_policy::parse(POLICY, Path::new("policy.toml")).expect("policy")
    }

    #[test]
    fn allowed_observations_are_not_reported() {
        let observations = [
            observation("agent", "10.1.2.3", Some(5432), 6, None),
            observation("agent", "10.1.2.3", None, 1, None),
            observation("agent", "203.0.113.7", Some(443), 6, None),
            observation("agent", "::ffff:203.0.113.7", Some(443), 6, None),
            observation(
                "agent",
                "198.51.100.1",
                Some(443),
                6,
                Some("API.vendor.com."),
            ),
            observation(
                "agent",
                "198.51.100.2",
                Some(8080),
                17,
                Some("eu.cdn.vendor.com"),
            ),
        ];
        assert_eq!(diff(&policy(), &observations), Vec::<Observation>::new());
    }

    #[test]
    fn what_the_policy_does_not_allow_is_reported_in_order() {
        let observations = [
            // Wrong port, wrong protocol for the CIDR rule.
            observation("agent", "203.0.113.7", Some(80), 6, None),
            observation("agent", "203.0.113.7", Some(443), 17, None),
            // Names: no name, another name, the wildcard's apex, wrong port.
            observation("agent", "198.51.100.1", Some(443), 6, None),
            observation("agent", "198.51.100.1", Some(443), 6, Some("evil.example")),
            observation(
                "agent",
                "198.51.100.2",
                Some(443),
                6,
                Some("cdn.vendor.com"),
            ),
            observation(
                "agent",
                "198.51.100.1",
                Some(8443),
                6,
                Some("api.vendor.com"),
            ),
            // The deny list wins over CIDR and name rules.
            observation(
                "agent",
                "203.0.113.66",
                Some(443),
                6,
                Some("api.vendor.com"),
            ),
            observation("agent", "169.254.169.254", Some(80), 6, None),
            // Unknown workload.
            observation("other", "10.1.2.3", Some(443), 6, None),
        ];
        let reported = diff(&policy(), &observations);
        assert_eq!(reported, observations.to_vec());
    }

    #[test]
    fn portless_observations_need_rules_without_ports() {
        let icmp = observation("agent", "203.0.113.7", None, 1, None);
        assert_eq!(diff(&policy(), std::slice::from_ref(&icmp)), [icmp]);
        let icmp_by_name = observation("agent", "198.51.100.9", None, 1, Some("x.cdn.vendor.com"));
        assert!(diff(&policy(), &[icmp_by_name]).is_empty());
    }
}
