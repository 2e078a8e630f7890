//! What a run measured: one series per scenario and allowlist size, one value per
//! configuration and round; summaries (median, min, max), ratios to the same round's
//! no-firewall value, the targets, and the JSON and Markdown written from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::firewall::Config;

/// One measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: usize,
    pub config: Config,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Stable key: scenario, then `@entries` or `@rate`.
    pub id: String,
    pub title: String,
    pub unit: &'static str,
    /// Entries of the measured workload's allowlist (`None`: not about allowlists).
    pub entries: Option<usize>,
    pub higher_is_better: bool,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            count: sorted.len(),
        })
    }
}

impl Series {
    pub fn values(&self, config: Config) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.config == config)
            .map(|s| s.value)
            .collect()
    }

    pub fn summary(&self, config: Config) -> Option<Summary> {
        Summary::of(&self.values(config))
    }

    /// `config`'s value divided by `base`'s, round by round (rounds where both ran).
    pub fn ratios(&self, config: Config, base: Config) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.config == config)
            .filter_map(|s| {
                let b = self
                    .samples
                    .iter()
                    .find(|o| o.config == base && o.round == s.round)?;
                (b.value != 0.0).then(|| s.value / b.value)
            })
            .collect()
    }

    pub fn configs(&self) -> Vec<Config> {
        let mut configs: Vec<Config> = self.samples.iter().map(|s| s.config).collect();
        configs.sort();
        configs.dedup();
        configs
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SeriesOut {
    #[serde(flatten)]
    pub series: Series,
    pub summary: BTreeMap<Config, Summary>,
    /// Per-round ratio to "none", summarized.
    pub ratio_to_none: BTreeMap<Config, Summary>,
}

/// One target of the issue, with what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run (quick mode, or a size left out).
    pub pass: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub machine: String,
    pub build: &'static str,
    pub quick: bool,
    pub rounds: usize,
    pub seconds_per_measurement: f64,
    pub entries: Vec<usize>,
    pub workloads: usize,
    pub tools: Vec<String>,
    pub loadavg_start: f64,
    pub loadavg_end: f64,
    pub loadavg_max: f64,
    /// Rounds that began while someone else's egressd ran or programs were attached at the
    /// cgroup root, once the run had waited for them as long as it would (they slow every
    /// configuration).
    pub disturbed_rounds: Vec<String>,
    /// Measurements repeated because the sink's accept queue overflowed.
    pub repeated_for_syn_drops: usize,
    pub duration_seconds: f64,
    pub conditions: String,
}

#[derive(Debug, Default)]
pub struct Results {
    pub meta: Meta,
    pub series: Vec<Series>,
    pub notes: Vec<String>,
}

/// What to record a value under.
pub struct Key<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub unit: &'static str,
    pub entries: Option<usize>,
    pub higher_is_better: bool,
}

impl<'a> Key<'a> {
    pub fn new(
        id: &'a str,
        title: &'a str,
        unit: &'static str,
        entries: Option<usize>,
        higher_is_better: bool,
    ) -> Key<'a> {
        Key {
            id,
            title,
            unit,
            entries,
            higher_is_better,
        }
    }
}

impl Results {
    pub fn record(&mut self, key: &Key<'_>, round: usize, config: Config, value: f64) {
        let id = match key.entries {
            Some(entries) => format!("{}@{entries}", key.id),
            None => key.id.to_owned(),
        };
        let sample = Sample {
            round,
            config,
            value,
        };
        if let Some(series) = self.series.iter_mut().find(|s| s.id == id) {
            series.samples.push(sample);
        } else {
            self.series.push(Series {
                id,
                title: key.title.to_owned(),
                unit: key.unit,
                entries: key.entries,
                higher_is_better: key.higher_is_better,
                samples: vec![sample],
            });
        }
    }

    pub fn get(&self, id: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.id == id)
    }

    pub fn targets(&self) -> Vec<Target> {
        let quick = self.meta.quick;
        let mut targets = Vec::new();
        let mut push = |target: String, measured: Option<(String, bool)>| {
            targets.push(match measured {
                Some((measured, pass)) => Target {
                    target,
                    measured,
                    pass: (!quick).then_some(pass),
                },
                None => Target {
                    target,
                    measured: "not measured in this run".to_owned(),
                    pass: None,
                },
            });
        };
        let ratio = |id: &str, config: Config, base: Config| {
            self.get(id)
                .and_then(|s| Summary::of(&s.ratios(config, base)))
        };
        for (id, what) in [
            (
                "connect_1@100000",
                "TCP connect rate, 1 thread, 100,000 entries",
            ),
            (
                "connect_2@100000",
                "TCP connect rate, 2 threads, 100,000 entries",
            ),
            ("udp@100000", "UDP sendto rate, 100,000 entries"),
        ] {
            push(
                format!("{what}: egressd ≥ 0.95 × no firewall"),
                ratio(id, Config::Egressd, Config::None).map(|r| {
                    (
                        format!("×{:.3} ({:.3}–{:.3})", r.median, r.min, r.max),
                        r.median >= 0.95,
                    )
                }),
            );
            push(
                format!("{what}: egressd ahead of nftables"),
                ratio(id, Config::Egressd, Config::Nftables).map(|r| {
                    (
                        format!("×{:.3} of nftables ({:.3}–{:.3})", r.median, r.min, r.max),
                        r.median > 1.0,
                    )
                }),
            );
        }
        push(
            "TCP stream, 100,000 entries: egressd ≥ 0.98 × no firewall".to_owned(),
            ratio("stream@100000", Config::Egressd, Config::None).map(|r| {
                (
                    format!("×{:.3} ({:.3}–{:.3})", r.median, r.min, r.max),
                    r.median >= 0.98,
                )
            }),
        );
        for rate in [1000, 20000] {
            push(
                format!(
                    "DNS answer to address usable (until the connect that passes starts), \
                     p99 < 50 µs, at {rate} answers/s"
                ),
                self.get(&format!("dns_lag_p99@{rate}/s"))
                    .and_then(|s| s.summary(Config::Egressd))
                    .map(|s| {
                        (
                            format!("{:.1} µs (rounds {:.1}–{:.1})", s.median, s.min, s.max),
                            s.median < 50.0,
                        )
                    }),
            );
        }
        for (id, what) in [
            (
                "egressd_ready@100000",
                "100,000-rule policy: start to enforcing < 1 s",
            ),
            (
                "egressd_reload@100000",
                "100,000-rule policy: reload (every rule replaced) < 1 s",
            ),
        ] {
            push(
                what.to_owned(),
                self.get(id)
                    .and_then(|s| s.summary(Config::Egressd))
                    .map(|s| {
                        (
                            format!("{:.2} s ({:.2}–{:.2})", s.median, s.min, s.max),
                            s.median < 1.0,
                        )
                    }),
            );
        }
        push(
            "egressd RSS < 64 MiB with 100,000 rules and 100,000 observed flows".to_owned(),
            self.get("learning_rss@100000")
                .and_then(|s| s.summary(Config::Egressd))
                .map(|s| {
                    (
                        format!("{:.0} MiB ({:.0}–{:.0})", s.median, s.min, s.max),
                        s.median < 64.0,
                    )
                }),
        );
        targets
    }

    pub fn series_out(&self) -> Vec<SeriesOut> {
        self.series
            .iter()
            .map(|series| SeriesOut {
                summary: series
                    .configs()
                    .into_iter()
                    .filter_map(|c| Some((c, series.summary(c)?)))
                    .collect(),
                ratio_to_none: series
                    .configs()
                    .into_iter()
                    .filter(|&c| c != Config::None)
                    .filter_map(|c| Some((c, Summary::of(&series.ratios(c, Config::None))?)))
                    .collect(),
                series: series.clone(),
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "meta": self.meta,
            "targets": self.targets(),
            "series": self.series_out(),
            "notes": self.notes,
        })
    }

    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut out = String::new();
        let _ = writeln!(out, "## Run\n");
        let _ = writeln!(
            out,
            "{} · commit `{}` · kernel {} · {} · {} build{}  ",
            m.date,
            m.commit,
            m.kernel,
            m.machine,
            m.build,
            if m.quick {
                " · **quick mode: one short round, nothing evaluated**"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "{} rounds, {:.1} s per measurement, configurations alternated (rotated) every round; \
             1,000 workloads (the measured one plus {} with 10 entries each); run took {:.0} s.  ",
            m.rounds,
            m.seconds_per_measurement,
            m.workloads.saturating_sub(1),
            m.duration_seconds
        );
        let _ = writeln!(
            out,
            "Conditions: {} Load average {:.2} at the start, {:.2} at the end, {:.2} at most; \
             {} round(s) began while someone else's egressd or cgroup programs were attached \
             (after the run had waited for them as long as it would); {} measurement(s) were repeated \
             because the receiving end's accept queue overflowed.  ",
            m.conditions,
            m.loadavg_start,
            m.loadavg_end,
            m.loadavg_max,
            m.disturbed_rounds.len(),
            m.repeated_for_syn_drops
        );
        let _ = writeln!(out, "Tools: {}\n", m.tools.join("; "));

        let _ = writeln!(out, "## Targets\n");
        let _ = writeln!(
            out,
            "| target | measured (median, range over rounds) | result |"
        );
        let _ = writeln!(out, "|---|---|---|");
        for t in self.targets() {
            let verdict = match t.pass {
                Some(true) => "**pass**",
                Some(false) => "**FAIL**",
                None => "—",
            };
            let _ = writeln!(out, "| {} | {} | {verdict} |", t.target, t.measured);
        }

        let _ = writeln!(
            out,
            "\n## Data path\n\nMedian over rounds (min–max); `×r` is the configuration's value divided by \
             the no-firewall value of the same round, median (min–max) over rounds.\n"
        );
        self.table(&mut out, |s| {
            s.entries.is_some()
                && !s.id.starts_with("egressd_")
                && !s.id.starts_with("learning_")
                && !s.id.starts_with("nft_")
                && !s.id.starts_with("ipt_")
        });
        let _ = writeln!(
            out,
            "\n## DNS (egressd with an FQDN rule; nftables and iptables have no equivalent)\n"
        );
        self.table(&mut out, |s| s.id.starts_with("dns_"));
        let _ = writeln!(out, "\n## Control plane and resources\n");
        self.table(&mut out, |s| {
            s.id.starts_with("egressd_")
                || s.id.starts_with("learning_")
                || s.id.starts_with("nft_")
                || s.id.starts_with("ipt_")
        });
        if !self.notes.is_empty() || !m.disturbed_rounds.is_empty() {
            let _ = writeln!(out, "\n## Notes from the run\n");
            for round in &m.disturbed_rounds {
                let _ = writeln!(out, "- Disturbed: {round}");
            }
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    fn table(&self, out: &mut String, filter: impl Fn(&Series) -> bool) {
        let rows: Vec<&Series> = self.series.iter().filter(|s| filter(s)).collect();
        let configs: Vec<Config> = Config::COLUMNS
            .into_iter()
            .filter(|c| rows.iter().any(|s| s.configs().contains(c)))
            .collect();
        if rows.is_empty() {
            let _ = writeln!(out, "(nothing measured)");
            return;
        }
        let _ = write!(out, "| measurement | entries |");
        for c in &configs {
            let _ = write!(out, " {c} |");
        }
        let _ = write!(out, "\n|---|---:|");
        for _ in &configs {
            let _ = write!(out, "---|");
        }
        let _ = writeln!(out);
        for s in rows {
            let better = if s.higher_is_better { "↑" } else { "↓" };
            let entries = s.entries.map_or_else(|| "—".to_owned(), group_thousands);
            let _ = write!(out, "| {} ({} {better}) | {entries} |", s.title, s.unit);
            for &c in &configs {
                let cell = match s.summary(c) {
                    None => "—".to_owned(),
                    Some(sum) => {
                        let mut cell =
                            format!("{} ({}–{})", num(sum.median), num(sum.min), num(sum.max));
                        if c != Config::None
                            && let Some(r) = Summary::of(&s.ratios(c, Config::None))
                        {
                            let _ =
                                write!(cell, "<br>×{:.2} ({:.2}–{:.2})", r.median, r.min, r.max);
                        }
                        cell
                    }
                };
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
    }
}

/// Three significant digits, with k and M for large values.
pub fn num(value: f64) -> String {
    let abs = value.abs();
    let (scaled, suffix) = if abs >= 1e6 {
        (value / 1e6, "M")
    } else if abs >= 1e4 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let digits = if scaled.abs() >= 100.0 {
        0
    } else if scaled.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{scaled:.digits$}{suffix}")
}

fn group_thousands(value: usize) -> String {
    let text = value.to_string();
    let mut out = String::new();
    for (i, ch) in text.chars().enumerate() {
        if i > 0 && (text.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_ranges_and_same_round_ratios() {
        let mut results = Results::default();
        let key = Key {
            id: "connect_1",
            title: "TCP connect",
            unit: "connects/s",
            entries: Some(100_000),
            higher_is_better: true,
        };
        for (round, none, egressd) in [(0, 100.0, 95.0), (1, 200.0, 190.0), (2, 150.0, 150.0)] {
            results.record(&key, round, Config::None, none);
            results.record(&key, round, Config::Egressd, egressd);
        }
        let series = results.get("connect_1@100000").expect("recorded");
        let summary = series.summary(Config::None).expect("none");
        assert_eq!(
            (summary.median, summary.min, summary.max),
            (150.0, 100.0, 200.0)
        );
        let ratios = Summary::of(&series.ratios(Config::Egressd, Config::None)).expect("ratios");
        assert_eq!((ratios.median, ratios.min, ratios.max), (0.95, 0.95, 1.0));
        let target = &results.targets()[0];
        assert_eq!(target.pass, Some(true), "{target:?}");
        assert!(results.markdown().contains("×0.95 (0.95–1.00)"));
    }

    #[test]
    fn even_counts_average_the_middle_and_numbers_are_short() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert_eq!(num(21_345.0), "21.3k");
        assert_eq!(num(1_234_567.0), "1.23M");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(group_thousands(100_000), "100,000");
    }

    #[test]
    fn quick_runs_evaluate_no_target() {
        let mut results = Results::default();
        results.meta.quick = true;
        let key = Key {
            id: "udp",
            title: "UDP",
            unit: "packets/s",
            entries: Some(100_000),
            higher_is_better: true,
        };
        results.record(&key, 0, Config::None, 1.0);
        results.record(&key, 0, Config::Egressd, 1.0);
        assert!(results.targets().iter().all(|t| t.pass.is_none()));
    }
}
