//! Writing test policies (TOML) without repeating the boilerplate.

use std::fmt::Write as _;

use crate::cgroup::TestCgroup;

/// One `[[workload]]` of a test policy.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub name: String,
    /// Relative to the cgroup v2 mount.
    pub cgroup: String,
    /// `None`: the workload follows the top-level mode.
    pub mode: Option<String>,
    pub raw_sockets: bool,
    /// `dns_queries` (`None`: left out, egressd's default "any").
    pub dns_queries: Option<String>,
    /// Inline tables from [`allow`].
    pub allow: Vec<String>,
}

impl WorkloadSpec {
    /// A workload named `name` on `cgroup` with no mode of its own, no raw
    /// sockets and no allow rules.
    pub fn new(name: &str, cgroup: &TestCgroup) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_owned(),
            cgroup: cgroup.relative_path().to_owned(),
            mode: None,
            raw_sockets: false,
            dns_queries: None,
            allow: Vec::new(),
        }
    }

    /// `dns_queries = "any"` or `"allowlisted"`.
    pub fn dns_queries(mut self, value: &str) -> WorkloadSpec {
        self.dns_queries = Some(value.to_owned());
        self
    }

    pub fn mode(mut self, mode: &str) -> WorkloadSpec {
        self.mode = Some(mode.to_owned());
        self
    }

    pub fn raw_sockets(mut self, raw_sockets: bool) -> WorkloadSpec {
        self.raw_sockets = raw_sockets;
        self
    }

    pub fn allow(mut self, rule: String) -> WorkloadSpec {
        self.allow.push(rule);
        self
    }
}

/// An allow rule as an inline table; `ports` empty means every port.
pub fn allow(cidr: &str, ports: &[u16], protocol: &str) -> String {
    let mut rule = format!("{{ cidr = {cidr:?}");
    if !ports.is_empty() {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let _ = write!(rule, ", ports = [{}]", ports.join(", "));
    }
    let _ = write!(rule, ", protocol = {protocol:?}, reason = \"e2e test\" }}");
    rule
}

/// An FQDN allow rule as an inline table (`api.example.test` or `*.cdn.test`); `ports`
/// empty means every port.
pub fn allow_fqdn(pattern: &str, ports: &[u16], protocol: &str) -> String {
    let mut rule = format!("{{ fqdn = {pattern:?}");
    if !ports.is_empty() {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let _ = write!(rule, ", ports = [{}]", ports.join(", "));
    }
    let _ = write!(rule, ", protocol = {protocol:?}, reason = \"e2e test\" }}");
    rule
}

/// The `[dns]` section of a test policy; append [`DnsSettings::toml`] to
/// [`policy_toml`]'s text.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    pub resolvers: Vec<String>,
    /// TOML values as written (`1`, `"60s"`); `None` leaves egressd's default.
    pub min_ttl: Option<String>,
    pub grace: Option<String>,
    pub max_ips_per_name: Option<u32>,
    /// `search_domains` (`None`: left out, the host's resolv.conf search list).
    pub search_domains: Option<Vec<String>>,
}

impl DnsSettings {
    pub fn resolvers(resolvers: &[&str]) -> DnsSettings {
        DnsSettings {
            resolvers: resolvers.iter().map(|r| (*r).to_owned()).collect(),
            ..DnsSettings::default()
        }
    }

    /// `min_ttl = SECS`, `grace = SECS` (plain integers: seconds).
    pub fn expiry(mut self, min_ttl_secs: u64, grace_secs: u64) -> DnsSettings {
        self.min_ttl = Some(min_ttl_secs.to_string());
        self.grace = Some(grace_secs.to_string());
        self
    }

    pub fn search_domains(mut self, domains: &[&str]) -> DnsSettings {
        self.search_domains = Some(domains.iter().map(|d| (*d).to_owned()).collect());
        self
    }

    pub fn toml(&self) -> String {
        let resolvers: Vec<String> = self.resolvers.iter().map(|r| format!("{r:?}")).collect();
        let mut text = format!("\n[dns]\nresolvers = [{}]\n", resolvers.join(", "));
        if let Some(min_ttl) = &self.min_ttl {
            let _ = writeln!(text, "min_ttl = {min_ttl}");
        }
        if let Some(grace) = &self.grace {
            let _ = writeln!(text, "grace = {grace}");
        }
        if let Some(max) = self.max_ips_per_name {
            let _ = writeln!(text, "max_ips_per_name = {max}");
        }
        if let Some(domains) = &self.search_domains {
            let domains: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
            let _ = writeln!(text, "search_domains = [{}]", domains.join(", "));
        }
        text
    }
}

/// A whole policy: top-level `mode`, `defaults.deny`, the workloads (one rule
/// per line, so error lines are easy to predict).
pub fn policy_toml(mode: &str, deny: &[&str], workloads: &[WorkloadSpec]) -> String {
    let mut text = format!("mode = {mode:?}\n\n[defaults]\nunmatched = \"allow\"\n");
    let deny: Vec<String> = deny.iter().map(|net| format!("{net:?}")).collect();
    let _ = writeln!(text, "deny = [{}]", deny.join(", "));
    for workload in workloads {
        let _ = write!(
            text,
            "\n[[workload]]\nname = {:?}\ncgroup = {:?}\n",
            workload.name, workload.cgroup
        );
        if let Some(mode) = &workload.mode {
            let _ = writeln!(text, "mode = {mode:?}");
        }
        let _ = writeln!(text, "raw_sockets = {}", workload.raw_sockets);
        if let Some(dns_queries) = &workload.dns_queries {
            let _ = writeln!(text, "dns_queries = {dns_queries:?}");
        }
        text.push_str("allow = [\n");
        for rule in &workload.allow {
            let _ = writeln!(text, "  {rule},");
        }
        text.push_str("]\n");
    }
    text
}

/// The 1-based number of the first line of `text` containing `needle`.
#[track_caller]
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|index| index + 1)
        .unwrap_or_else(|| panic!("{needle:?} is not in:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_render_as_inline_tables() {
        assert_eq!(
            allow("127.0.0.2", &[8443, 9000], "tcp"),
            r#"{ cidr = "127.0.0.2", ports = [8443, 9000], protocol = "tcp", reason = "e2e test" }"#
        );
        assert_eq!(
            allow("::1", &[], "icmp"),
            r#"{ cidr = "::1", protocol = "icmp", reason = "e2e test" }"#
        );
    }

    #[test]
    fn fqdn_rules_and_the_dns_section_render() {
        assert_eq!(
            allow_fqdn("*.cdn.test", &[443], "tcp"),
            r#"{ fqdn = "*.cdn.test", ports = [443], protocol = "tcp", reason = "e2e test" }"#
        );
        assert_eq!(
            DnsSettings::resolvers(&["127.0.53.1"]).expiry(1, 0).toml(),
            "\n[dns]\nresolvers = [\"127.0.53.1\"]\nmin_ttl = 1\ngrace = 0\n"
        );
    }

    #[test]
    fn line_numbers_are_one_based() {
        assert_eq!(line_of("a\nb\nc", "b"), 2);
    }
}
