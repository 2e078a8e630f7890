//! The file as written: serde structs with spans, validated by `compile`.
//!
//! Values whose checks are semantic (modes, CIDRs, ports, ...) are kept as strings or
//! loose numbers here so that every such mistake becomes a diagnostic instead of
//! stopping deserialization at the first one.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub mode: Option<Spanned<String>>,
    pub defaults: RawDefaults,
    pub dns: RawDns,
    pub metrics: RawMetrics,
    pub observe: RawObserve,
    pub daemon: RawDaemon,
    pub control: RawControl,
    pub limits: RawLimits,
    #[serde(rename = "workload")]
    pub workloads: Vec<Spanned<RawWorkload>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub unmatched: Option<Spanned<String>>,
    pub deny: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub enabled: Option<bool>,
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub on_stop: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub on_full: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawObserve {
    pub enabled: Option<bool>,
    pub flush_interval: Option<Spanned<RawDuration>>,
    pub retention_days: Option<Spanned<i64>>,
    pub max_rows: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawControl {
    pub read_group: Option<Spanned<RawGroup>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawDns {
    pub resolvers: Vec<Spanned<String>>,
    pub search_domains: Option<Vec<Spanned<String>>>,
    pub min_ttl: Option<Spanned<RawDuration>>,
    pub max_ips_per_name: Option<Spanned<i64>>,
    pub grace: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawWorkload {
    pub name: Option<Spanned<String>>,
    pub cgroup: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub raw_sockets: bool,
    pub dns_queries: Option<Spanned<String>>,
    pub allow: Vec<Spanned<RawAllow>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawAllow {
    pub cidr: Option<Spanned<String>>,
    pub fqdn: Option<Spanned<String>>,
    pub ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    pub protocol: Option<Spanned<String>>,
    pub reason: Option<Spanned<String>>,
}

/// `443` or `"443"` or `"8000-8100"`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawPort {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a port number or a range string like "8000-8100""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

/// `"egressd-readers"`, `"1042"` or `1042`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawGroup {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawGroup {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GroupVisitor;
        impl Visitor<'_> for GroupVisitor {
            type Value = RawGroup;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a group name or a numeric GID")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawGroup, E> {
                Ok(RawGroup::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawGroup, E> {
                Ok(RawGroup::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawGroup, E> {
                Ok(RawGroup::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(GroupVisitor)
    }
}

/// `60` (seconds) or a humantime string like `"5m"`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawDuration {
    Seconds(i64),
    FractionalSeconds(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a number of seconds or a duration string like "60s""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::FractionalSeconds(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}
