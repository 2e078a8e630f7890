//! Prometheus metrics on a loopback address (`[metrics] listen`), rendered from a snapshot of
//! the kernel's counters on every scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use egressd_datapath::{Counters, DecisionCount, Verdict};
use egressd_policy::Mode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::control::Shared;

/// Everything one scrape reports, copied out under the engine lock.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub counters: Counters,
    pub workloads: Vec<WorkloadSnapshot>,
    /// `(map, entries, capacity)`.
    pub map_fill: Vec<(&'static str, usize, u32)>,
    pub policy_sha256: String,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub dns: egressd_dns::TableStats,
    pub dns_parse_failures: u64,
    /// What does not fit in the kernel's maps.
    pub limits: crate::limits::LimitsSnapshot,
    /// Workload names by id, for `limits`.
    pub workload_names: std::collections::BTreeMap<u32, String>,
    /// The refusal events the rate limit held back.
    pub events: egressd_proto::EventsStatus,
}

#[derive(Debug)]
pub struct WorkloadSnapshot {
    pub name: String,
    pub mode: Mode,
    pub decisions: Vec<DecisionCount>,
}

fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::WouldDeny => "would_deny",
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    if let [(labels, value)] = series
        && labels.is_empty()
    {
        return ConstCounter::new(*value).encode(metric);
    }
    for (labels, value) in series {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    if let [(labels, value)] = series
        && labels.is_empty()
    {
        return ConstGauge::new(*value).encode(metric);
    }
    for (labels, value) in series {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let decisions: Vec<(Labels, u64)> = self
            .workloads
            .iter()
            .flat_map(|w| {
                w.decisions.iter().map(move |d| {
                    (
                        vec![
                            ("workload", w.name.clone()),
                            ("protocol", d.protocol.to_owned()),
                            ("verdict", verdict_label(d.verdict).to_owned()),
                        ],
                        d.count,
                    )
                })
            })
            .collect();
        counter(
            &mut encoder,
            "egressd_decisions",
            "Connection and packet decisions (cached per-socket verdicts are not recounted)",
            &decisions,
        )?;
        let modes: Vec<(Labels, i64)> = self
            .workloads
            .iter()
            .flat_map(|w| {
                Mode::ALL.into_iter().map(move |mode| {
                    (
                        vec![
                            ("workload", w.name.clone()),
                            ("mode", mode.as_str().to_owned()),
                        ],
                        i64::from(w.mode == mode),
                    )
                })
            })
            .collect();
        gauge(
            &mut encoder,
            "egressd_workload_mode",
            "1 for the mode each workload is in",
            &modes,
        )?;
        let plain = |value: u64| vec![(Labels::new(), value)];
        let c = &self.counters;
        counter(
            &mut encoder,
            "egressd_events",
            "Events sent by the kernel",
            &plain(c.events),
        )?;
        counter(
            &mut encoder,
            "egressd_ring_buffer_drops",
            "Events lost because the ring buffer was full",
            &plain(c.ring_buffer_drops),
        )?;
        counter(
            &mut encoder,
            "egressd_dns_answers",
            "DNS answers handed to the daemon",
            &plain(c.dns_answers),
        )?;
        counter(
            &mut encoder,
            "egressd_dns_answer_drops",
            "DNS answers lost because the daemon fell behind",
            &plain(c.dns_answer_drops),
        )?;
        counter(
            &mut encoder,
            "egressd_dns_answers_rejected",
            "DNS answers the kernel ignored: not from a resolver, or matching no query the socket sent",
            &plain(c.dns_answers_rejected),
        )?;
        counter(
            &mut encoder,
            "egressd_dns_answers_unparsed",
            "DNS answers the daemon could not parse",
            &plain(self.dns_parse_failures),
        )?;
        counter(
            &mut encoder,
            "egressd_fqdn_addresses_inserted",
            "Addresses the kernel allowed straight from DNS answers",
            &plain(c.fqdn_inserts),
        )?;
        counter(
            &mut encoder,
            "egressd_fqdn_address_insert_failures",
            "Addresses from DNS answers the kernel could not store (map full)",
            &plain(c.fqdn_insert_failures),
        )?;
        counter(
            &mut encoder,
            "egressd_fqdn_names_evicted",
            "Allowed names dropped by the LRU bound",
            &plain(self.dns.evicted_names),
        )?;
        counter(
            &mut encoder,
            "egressd_fqdn_addresses_dropped",
            "Addresses dropped because a name held more than dns.max_ips_per_name",
            &plain(self.dns.dropped_addresses),
        )?;
        gauge(
            &mut encoder,
            "egressd_fqdn_names",
            "Allowed names with live addresses",
            &[(
                Labels::new(),
                i64::try_from(self.dns.names).unwrap_or(i64::MAX),
            )],
        )?;
        gauge(
            &mut encoder,
            "egressd_fqdn_addresses",
            "Addresses allowed through names",
            &[(
                Labels::new(),
                i64::try_from(self.dns.addresses).unwrap_or(i64::MAX),
            )],
        )?;
        counter(
            &mut encoder,
            "egressd_verdict_cache_hits",
            "Packets decided by a socket's cached verdict",
            &plain(c.cache_hits),
        )?;
        counter(
            &mut encoder,
            "egressd_socket_storage_failures",
            "Sockets the kernel could not give per-socket state (decided without caching)",
            &plain(c.storage_failures),
        )?;
        counter(
            &mut encoder,
            "egressd_policy_reloads",
            "Policy reloads by result",
            &[
                (
                    vec![("result", "success".to_owned())],
                    self.reloads_succeeded,
                ),
                (vec![("result", "failure".to_owned())], self.reloads_failed),
            ],
        )?;
        gauge(
            &mut encoder,
            "egressd_policy_info",
            "The policy in force (sha256 of the file)",
            &[(vec![("sha256", self.policy_sha256.clone())], 1)],
        )?;
        let entries: Vec<(Labels, i64)> = self
            .map_fill
            .iter()
            .map(|&(map, n, _)| {
                (
                    vec![("map", map.to_owned())],
                    i64::try_from(n).unwrap_or(i64::MAX),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "egressd_map_entries",
            "Entries in each policy map",
            &entries,
        )?;
        let capacity: Vec<(Labels, i64)> = self
            .map_fill
            .iter()
            .map(|&(map, _, limit)| (vec![("map", map.to_owned())], i64::from(limit)))
            .collect();
        gauge(
            &mut encoder,
            "egressd_map_capacity",
            "Capacity of each policy map",
            &capacity,
        )?;
        let name = |id: u32| {
            self.workload_names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| id.to_string())
        };
        let overflow: Vec<(Labels, i64)> = self
            .limits
            .overflows
            .iter()
            .map(|&(map, workload, entries)| {
                (
                    vec![("map", map.to_owned()), ("workload", name(workload))],
                    i64::try_from(entries).unwrap_or(i64::MAX),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "egressd_map_overflow",
            "Entries a workload needs that a full kernel map has no room for now (learned \
             addresses, cgroups)",
            &overflow,
        )?;
        counter(
            &mut encoder,
            "egressd_map_store_failures",
            "Entries the daemon could not store because the map was full, counted once each",
            &[
                (
                    vec![("map", "fqdn_addresses".to_owned())],
                    self.limits.fqdn_store_failures,
                ),
                (
                    vec![("map", "workload_cgroups".to_owned())],
                    self.limits.cgroup_store_failures,
                ),
            ],
        )?;
        let passed: Vec<(Labels, i64)> = self
            .limits
            .passed
            .iter()
            .map(|&workload| (vec![("workload", name(workload))], 1))
            .collect();
        gauge(
            &mut encoder,
            "egressd_limits_audit",
            "1 for each strict workload the kernel runs as audit because its learned addresses \
             do not fit and [limits] on_full = \"allow\"",
            &passed,
        )?;
        let held: Vec<(Labels, u64)> = self
            .events
            .by_workload
            .iter()
            .map(|w| (vec![("workload", w.workload.clone())], w.suppressed))
            .collect();
        counter(
            &mut encoder,
            "egressd_events_suppressed",
            "Refusal events held back by the rate limit (each counted in a later event's \
             suppressed field, or unreported)",
            &held,
        )?;
        counter(
            &mut encoder,
            "egressd_events_unreported",
            "Held-back refusal events whose count no event carries (their destination was \
             forgotten to bound memory)",
            &plain(self.events.unreported),
        )?;
        Ok(())
    }
}

pub fn render(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Serves `/metrics` until the runtime stops. A bind failure is logged, never fatal:
/// enforcement does not depend on metrics.
pub async fn serve(listen: SocketAddr, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("metrics: cannot listen on {listen}: {e}; metrics are off");
            return;
        }
    };
    tracing::info!("metrics on http://{listen}/metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let shared = shared.clone();
            async move {
                let mut snapshot = match shared.engine.lock() {
                    Ok(engine) => engine.metrics_snapshot(),
                    Err(_) => Snapshot::default(),
                };
                snapshot.events = shared.events.limit_status();
                match render(snapshot) {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(_) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; charset=utf-8",
                        )],
                        "metrics encoding failed\n".to_owned(),
                    ),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_prometheus_names() {
        let snapshot = Snapshot {
            counters: Counters {
                denied: 3,
                ring_buffer_drops: 1,
                ..Default::default()
            },
            workloads: vec![WorkloadSnapshot {
                name: "agent".into(),
                mode: Mode::Strict,
                decisions: vec![DecisionCount {
                    protocol: "tcp",
                    verdict: Verdict::Deny,
                    count: 3,
                }],
            }],
            map_fill: vec![("allow", 2, 100)],
            policy_sha256: "abc".into(),
            reloads_succeeded: 1,
            reloads_failed: 0,
            limits: crate::limits::LimitsSnapshot {
                fqdn_store_failures: 3,
                cgroup_store_failures: 0,
                overflows: vec![("fqdn_addresses", 1, 3)],
                passed: vec![1],
            },
            workload_names: [(1, "agent".to_owned())].into(),
            events: egressd_proto::EventsStatus {
                by_workload: vec![egressd_proto::WorkloadEvents {
                    workload: "agent".into(),
                    published: 5,
                    suppressed: 99,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let text = render(snapshot).expect("renders");
        for expected in [
            r#"egressd_decisions_total{workload="agent",protocol="tcp",verdict="deny"} 3"#,
            r#"egressd_workload_mode{workload="agent",mode="strict"} 1"#,
            r#"egressd_workload_mode{workload="agent",mode="audit"} 0"#,
            "egressd_ring_buffer_drops_total 1",
            r#"egressd_policy_reloads_total{result="success"} 1"#,
            r#"egressd_map_entries{map="allow"} 2"#,
            r#"egressd_map_capacity{map="allow"} 100"#,
            r#"egressd_map_overflow{map="fqdn_addresses",workload="agent"} 3"#,
            r#"egressd_map_store_failures_total{map="fqdn_addresses"} 3"#,
            r#"egressd_limits_audit{workload="agent"} 1"#,
            r#"egressd_events_suppressed_total{workload="agent"} 99"#,
            "egressd_events_unreported_total 0",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
