//! Raw file -> validated [`Policy`], collecting every semantic error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::cgroup::CgroupPattern;
use crate::cidr::parse_cidr;
use crate::error::{Diagnostic, Location, PolicyError, SourceMap};
use crate::fqdn::FqdnPattern;
use crate::model::{
    AllowRule, ControlSettings, DaemonSettings, Defaults, Destination, DnsQueries, DnsSettings,
    GroupRef, GroupSetting, HOST_WORKLOAD, LimitsSettings, MAX_WORKLOADS, MetricsSettings,
    ObserveSettings, OnFull, OnStop, Policy, PolicySource, Workload,
};
use crate::raw::{
    RawAllow, RawControl, RawDns, RawDuration, RawGroup, RawMetrics, RawObserve, RawPolicy,
    RawPort, RawWorkload,
};
use crate::types::{Mode, PortRange, Protocol, Unmatched};

const MAX_NAME_LEN: usize = 64;

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates policy text; `path` is only used in messages and [`PolicySource`].
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let map = SourceMap::new(text);
    let invalid = |diagnostics| PolicyError::Invalid {
        path: path.to_path_buf(),
        diagnostics,
    };
    let raw: RawPolicy = toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        invalid(vec![Diagnostic::new(
            map.location(offset),
            error.message().trim_end(),
        )])
    })?;
    let source = PolicySource {
        path: path.to_path_buf(),
        sha256: Sha256::digest(text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
    };
    let mut compiler = Compiler {
        map,
        diagnostics: Vec::new(),
    };
    let policy = compiler.policy(raw, source);
    if compiler.diagnostics.is_empty() {
        Ok(policy)
    } else {
        let mut diagnostics = compiler.diagnostics;
        // Sections are checked in a fixed order; report in file order.
        diagnostics.sort_by_key(Diagnostic::location);
        Err(invalid(diagnostics))
    }
}

/// Allow rules without a reason, or with a blank one (`egressctl check --require-reasons`).
pub fn missing_reasons(policy: &Policy) -> Vec<Diagnostic> {
    policy
        .workloads
        .iter()
        .flat_map(|workload| {
            workload
                .allow
                .iter()
                .filter(|rule| rule.reason.as_deref().is_none_or(|r| r.trim().is_empty()))
                .map(|rule| {
                    Diagnostic::new(
                        rule.location,
                        format!(
                            "allow rule for {} in workload {:?} has no reason",
                            rule.destination, workload.name
                        ),
                    )
                })
        })
        .collect()
}

struct Compiler<'a> {
    map: SourceMap<'a>,
    diagnostics: Vec<Diagnostic>,
}

impl Compiler<'_> {
    fn location(&self, span: &Range<usize>) -> Location {
        self.map.location(span.start)
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let location = self.location(&span);
        self.diagnostics.push(Diagnostic::new(location, message));
    }

    /// Runs `parse` on a spanned string, turning its error into a diagnostic.
    fn value<T>(
        &mut self,
        value: &Spanned<String>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        parse(value.get_ref())
            .map_err(|message| self.error(value.span(), message))
            .ok()
    }

    fn policy(&mut self, raw: RawPolicy, source: PolicySource) -> Policy {
        let mode = raw
            .mode
            .as_ref()
            .and_then(|mode| self.mode(mode))
            .unwrap_or(Mode::Learning);
        let unmatched = raw
            .defaults
            .unmatched
            .as_ref()
            .and_then(|value| {
                self.value(value, |s| s.parse::<Unmatched>().map_err(|e| e.to_string()))
            })
            .unwrap_or_default();
        let deny = raw
            .defaults
            .deny
            .iter()
            .filter_map(|cidr| self.cidr(cidr, "deny"))
            .collect();
        let dns = self.dns(raw.dns);
        let metrics = self.metrics(raw.metrics);
        let observe = self.observe(raw.observe);
        let on_stop = raw
            .daemon
            .on_stop
            .as_ref()
            .and_then(|value| self.value(value, |s| s.parse::<OnStop>()))
            .unwrap_or_default();
        let control = self.control(raw.control);
        let on_full = raw
            .limits
            .on_full
            .as_ref()
            .and_then(|value| self.value(value, |s| s.parse::<OnFull>()))
            .unwrap_or_default();
        let workloads = self.workloads(raw.workloads);
        Policy {
            mode,
            defaults: Defaults { unmatched, deny },
            dns,
            metrics,
            observe,
            daemon: DaemonSettings { on_stop },
            control,
            limits: LimitsSettings { on_full },
            workloads,
            source,
        }
    }

    fn control(&mut self, raw: RawControl) -> ControlSettings {
        let read_group = raw.read_group.and_then(|value| {
            let span = value.span();
            let location = self.location(&span);
            match parse_group(value.into_inner()) {
                Ok(group) => Some(GroupSetting { group, location }),
                Err(message) => {
                    self.error(span, format!("read_group: {message}"));
                    None
                }
            }
        });
        ControlSettings { read_group }
    }

    fn mode(&mut self, value: &Spanned<String>) -> Option<Mode> {
        self.value(value, |s| s.parse::<Mode>().map_err(|e| e.to_string()))
    }

    fn cidr(&mut self, value: &Spanned<String>, what: &str) -> Option<IpNet> {
        self.value(value, |s| {
            parse_cidr(s).map_err(|e| format!("invalid {what} cidr {s:?}: {e}"))
        })
    }

    fn metrics(&mut self, raw: RawMetrics) -> MetricsSettings {
        let defaults = MetricsSettings::default();
        let listen = raw
            .listen
            .as_ref()
            .and_then(|value| {
                self.value(value, |s| {
                    s.parse::<std::net::SocketAddr>().map_err(|_| {
                        format!("invalid metrics listen address {s:?}: expected IP:PORT, e.g. \"127.0.0.1:9469\"")
                    })
                })
            })
            .unwrap_or(defaults.listen);
        MetricsSettings {
            enabled: raw.enabled.unwrap_or(defaults.enabled),
            listen,
        }
    }

    fn observe(&mut self, raw: RawObserve) -> ObserveSettings {
        let defaults = ObserveSettings::default();
        let flush_interval = raw
            .flush_interval
            .and_then(|value| {
                let span = value.span();
                let interval = self.duration(value, "flush_interval")?;
                let (min, max) = (
                    ObserveSettings::MIN_FLUSH_INTERVAL,
                    ObserveSettings::MAX_FLUSH_INTERVAL,
                );
                if (min..=max).contains(&interval) {
                    Some(interval)
                } else {
                    self.error(
                        span,
                        format!("flush_interval = {interval:?} is out of range: expected {min:?} to {max:?}"),
                    );
                    None
                }
            })
            .unwrap_or(defaults.flush_interval);
        let retention_days = raw
            .retention_days
            .and_then(|value| self.non_negative(&value, "retention_days"))
            .map_or(defaults.retention_days, |days| {
                u32::try_from(days).unwrap_or(u32::MAX)
            });
        let max_rows = raw
            .max_rows
            .and_then(|value| self.non_negative(&value, "max_rows"))
            .unwrap_or(defaults.max_rows);
        ObserveSettings {
            enabled: raw.enabled.unwrap_or(defaults.enabled),
            flush_interval,
            retention_days,
            max_rows,
        }
    }

    /// A count that must be zero or more.
    fn non_negative(&mut self, value: &Spanned<i64>, what: &str) -> Option<u64> {
        match u64::try_from(*value.get_ref()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(
                    value.span(),
                    format!("{what} = {} must not be negative", value.get_ref()),
                );
                None
            }
        }
    }

    fn dns(&mut self, raw: RawDns) -> DnsSettings {
        let defaults = DnsSettings::default();
        let resolvers = raw
            .resolvers
            .iter()
            .filter_map(|resolver| {
                self.value(resolver, |s| {
                    s.parse::<IpAddr>()
                        .map_err(|_| format!("invalid resolver {s:?}: expected an IP address"))
                })
            })
            .collect();
        let search_domains = raw.search_domains.map(|domains| {
            domains
                .iter()
                .filter_map(|domain| {
                    self.value(domain, |s| match FqdnPattern::parse(s) {
                        Ok(pattern) if !pattern.is_wildcard() => Ok(pattern.name().to_owned()),
                        Ok(_) => Err(format!(
                            "invalid search domain {s:?}: a domain, without a wildcard"
                        )),
                        Err(e) => Err(format!("invalid search domain {s:?}: {e}")),
                    })
                })
                .collect()
        });
        let min_ttl = raw
            .min_ttl
            .and_then(|value| self.duration(value, "min_ttl"))
            .unwrap_or(defaults.min_ttl);
        let grace = raw
            .grace
            .and_then(|value| self.duration(value, "grace"))
            .unwrap_or(defaults.grace);
        let max_ips_per_name = match raw.max_ips_per_name {
            None => defaults.max_ips_per_name,
            Some(value) => {
                let limit = DnsSettings::MAX_IPS_PER_NAME_LIMIT;
                match u32::try_from(*value.get_ref()) {
                    Ok(n) if (1..=limit).contains(&n) => n,
                    _ => {
                        self.error(
                            value.span(),
                            format!(
                                "max_ips_per_name = {} is out of range: expected 1 to {limit}",
                                value.get_ref()
                            ),
                        );
                        defaults.max_ips_per_name
                    }
                }
            }
        };
        DnsSettings {
            resolvers,
            search_domains,
            min_ttl,
            max_ips_per_name,
            grace,
        }
    }

    fn duration(&mut self, value: Spanned<RawDuration>, what: &str) -> Option<Duration> {
        let span = value.span();
        let result = match value.into_inner() {
            RawDuration::Seconds(seconds) => u64::try_from(seconds)
                .map(Duration::from_secs)
                .map_err(|_| format!("{what} must not be negative")),
            RawDuration::FractionalSeconds(seconds) => Err(format!(
                "{what} = {seconds}: use whole seconds or a string like \"1500ms\""
            )),
            RawDuration::Text(text) => humantime::parse_duration(&text)
                .map_err(|e| format!("invalid {what} {text:?}: {e} (examples: \"60s\", \"5m\")")),
        };
        result.map_err(|message| self.error(span, message)).ok()
    }

    fn workloads(&mut self, raw: Vec<Spanned<RawWorkload>>) -> Vec<Workload> {
        let mut seen: HashMap<String, Location> = HashMap::new();
        let mut workloads = Vec::with_capacity(raw.len());
        for (index, raw) in raw.into_iter().enumerate() {
            let span = raw.span();
            if index == MAX_WORKLOADS {
                self.error(
                    span.clone(),
                    format!("too many workloads: at most {MAX_WORKLOADS} are supported"),
                );
            }
            if let Some(workload) = self.workload(span, raw.into_inner(), &mut seen) {
                workloads.push(workload);
            }
        }
        workloads
    }

    fn workload(
        &mut self,
        span: Range<usize>,
        raw: RawWorkload,
        seen: &mut HashMap<String, Location>,
    ) -> Option<Workload> {
        let location = self.location(&span);
        let before = self.diagnostics.len();
        let name = match &raw.name {
            None => {
                self.error(span.clone(), "workload has no name");
                None
            }
            Some(name) => self.workload_name(name, seen),
        };
        let label = raw.name.as_ref().map_or("", |name| name.get_ref().as_str());
        let cgroup = match &raw.cgroup {
            Some(cgroup) => self.value(cgroup, |s| {
                CgroupPattern::parse(s).map_err(|e| format!("invalid cgroup {s:?}: {e}"))
            }),
            None if label == HOST_WORKLOAD => None,
            None => {
                let label = if label.is_empty() {
                    String::new()
                } else {
                    format!(" {label:?}")
                };
                self.error(
                    span.clone(),
                    format!(
                        "workload{label} has no cgroup (only the reserved {HOST_WORKLOAD:?} \
                         workload may omit it)"
                    ),
                );
                None
            }
        };
        let mode = raw.mode.as_ref().and_then(|mode| self.mode(mode));
        let dns_queries = raw
            .dns_queries
            .as_ref()
            .and_then(|value| self.value(value, |s| s.parse::<DnsQueries>()))
            .unwrap_or_default();
        // A new vector rather than `into_iter().filter_map().collect()`: that collects in
        // place, and the validated rules would keep the raw rules' allocation (twice their
        // size, plus the growth slack of the parse) for as long as the policy is in force.
        let mut allow: Vec<AllowRule> = Vec::with_capacity(raw.allow.len());
        for rule in raw.allow {
            let span = rule.span();
            allow.extend(self.allow_rule(span, rule.into_inner()));
        }
        allow.shrink_to_fit();
        // Only a fully valid workload is returned; the diagnostics say what is wrong.
        if self.diagnostics.len() != before {
            return None;
        }
        Some(Workload {
            name: name?,
            cgroup,
            mode,
            raw_sockets: raw.raw_sockets,
            dns_queries,
            allow,
            location,
        })
    }

    fn workload_name(
        &mut self,
        name: &Spanned<String>,
        seen: &mut HashMap<String, Location>,
    ) -> Option<String> {
        let text = name.get_ref();
        let valid = (1..=MAX_NAME_LEN).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            self.error(
                name.span(),
                format!(
                    "invalid workload name {text:?}: use 1 to {MAX_NAME_LEN} letters, digits, \
                     '.', '_' or '-'"
                ),
            );
            return None;
        }
        let location = self.location(&name.span());
        if let Some(first) = seen.get(text) {
            self.error(
                name.span(),
                format!(
                    "duplicate workload name {text:?} (first defined at line {})",
                    first.line
                ),
            );
            return None;
        }
        seen.insert(text.clone(), location);
        Some(text.clone())
    }

    fn allow_rule(&mut self, span: Range<usize>, raw: RawAllow) -> Option<AllowRule> {
        let location = self.location(&span);
        let before = self.diagnostics.len();
        let destination = match (&raw.cidr, &raw.fqdn) {
            (Some(cidr), None) => self.cidr(cidr, "allow").map(Destination::Cidr),
            (None, Some(fqdn)) => self
                .value(fqdn, |s| {
                    FqdnPattern::parse(s).map_err(|e| format!("invalid fqdn {s:?}: {e}"))
                })
                .map(Destination::Fqdn),
            (Some(_), Some(fqdn)) => {
                self.error(
                    fqdn.span(),
                    "allow rule has both cidr and fqdn: split it into two rules",
                );
                None
            }
            (None, None) => {
                self.error(span, "allow rule needs exactly one of cidr or fqdn");
                None
            }
        };
        let protocol = raw
            .protocol
            .as_ref()
            .and_then(|value| {
                self.value(value, |s| s.parse::<Protocol>().map_err(|e| e.to_string()))
            })
            .unwrap_or_default();
        let ports = match &raw.ports {
            None => Vec::new(),
            Some(ports) if ports.get_ref().is_empty() => {
                self.error(
                    ports.span(),
                    "empty ports list: omit ports to allow all ports",
                );
                Vec::new()
            }
            Some(ports) => {
                if protocol == Protocol::Icmp {
                    self.error(
                        ports.span(),
                        "ICMP has no ports: remove ports, or use protocol tcp or udp",
                    );
                }
                ports
                    .get_ref()
                    .iter()
                    .filter_map(|port| {
                        parse_port(port.get_ref())
                            .map_err(|message| self.error(port.span(), message))
                            .ok()
                    })
                    .collect()
            }
        };
        let reason = raw.reason.map(Spanned::into_inner);
        if self.diagnostics.len() != before {
            return None;
        }
        Some(AllowRule {
            destination: destination?,
            ports,
            protocol,
            reason,
            location,
        })
    }
}

/// A group name, or a GID as a number or a string of digits. Names are checked for shape
/// only: whether the group exists is the daemon's business (the file may be checked on
/// another machine).
fn parse_group(raw: RawGroup) -> Result<GroupRef, String> {
    let gid = |n: i64| {
        // (gid_t)-1 means "no change" to the kernel: never a group.
        u32::try_from(n)
            .ok()
            .filter(|gid| *gid != u32::MAX)
            .map(GroupRef::Id)
            .ok_or_else(|| format!("GID {n} is out of range: expected 0 to {}", u32::MAX - 1))
    };
    match raw {
        RawGroup::Number(n) => gid(n),
        RawGroup::Text(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            gid(text.parse::<i64>().unwrap_or(i64::MAX))
        }
        RawGroup::Text(text) => {
            let max = GroupRef::MAX_NAME_LEN;
            let body = text.strip_suffix('$').unwrap_or(&text);
            let valid = (1..=max).contains(&text.len())
                && !body.is_empty()
                && !body.starts_with('-')
                && body
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if valid {
                Ok(GroupRef::Name(text))
            } else {
                Err(format!(
                    "invalid group name {text:?}: use 1 to {max} letters, digits, '.', '_' or \
                     '-' (not first), or a numeric GID"
                ))
            }
        }
    }
}

fn parse_port(raw: &RawPort) -> Result<PortRange, String> {
    match raw {
        RawPort::Number(n) => port_number(*n).map(PortRange::single),
        RawPort::Text(text) => {
            let number = |s: &str| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| {
                        format!(
                            "invalid port {text:?}: expected a number or a range like \"8000-8100\""
                        )
                    })
                    .and_then(port_number)
            };
            match text.split_once('-') {
                None => number(text).map(PortRange::single),
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(format!(
                            "port range {text:?} is reversed: write \"{last}-{first}\""
                        ));
                    }
                    Ok(PortRange { first, last })
                }
            }
        }
    }
}

fn port_number(n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("port {n} is out of range: expected 1 to 65535"))
}
