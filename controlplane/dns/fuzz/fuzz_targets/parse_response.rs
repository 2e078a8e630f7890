//! Arbitrary bytes as the payload of an answer a workload received: parsing, chain
//! following and the FQDN table must never panic, and the table must stay consistent.
#![no_main]

use std::time::{Duration, Instant};

use egressd_dns::{
    FqdnRule, FqdnTable, TableSettings, chain_addresses, parse_response, question_of_query,
};
use egressd_policy::{FqdnPattern, PortRange, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = question_of_query(data);
    let Ok(response) = parse_response(data) else {
        return;
    };
    let chain = chain_addresses(&response);
    for (_, _, names) in &chain {
        assert!(!names.is_empty() && names.len() <= egressd_dns::MAX_CHAIN_LEN + 1);
    }

    // Small limits so LRU evictions and per-name caps happen.
    let mut table = FqdnTable::new(TableSettings {
        min_ttl: Duration::from_secs(5),
        grace: Duration::from_secs(1),
        max_ips_per_name: 3,
        max_names: 2,
    });
    // Rules that the question matches when it is a valid name: exactly, and below its parent.
    let mut rules = Vec::new();
    if let Ok(pattern) = FqdnPattern::parse(&response.question) {
        rules.push(FqdnRule {
            workload: 1,
            pattern,
            ports: vec![PortRange::single(443)],
            protocol: Protocol::Tcp,
        });
    }
    if let Some((_, parent)) = response.question.split_once('.')
        && let Ok(pattern) = FqdnPattern::parse(&format!("*.{parent}"))
    {
        for workload in [1, 2] {
            rules.push(FqdnRule {
                workload,
                pattern: pattern.clone(),
                ports: Vec::new(),
                protocol: Protocol::Any,
            });
        }
    }
    table.set_rules(rules);

    let start = Instant::now();
    for (step, workload) in [1u32, 2, 3, 1].into_iter().enumerate() {
        let now = start + Duration::from_secs(step as u64 * 2);
        let seen = table.observe(workload, &response, now);
        for &(w, addr) in &seen.changed {
            let _ = table.allowed_for(w, addr);
        }
        for addr in &seen.addresses {
            let _ = table.names_for(workload, *addr);
        }
        check(&table);
    }
    let _ = table.entries(None, start);
    let _ = table.expire(start + Duration::from_secs(7));
    check(&table);
    table.set_settings(TableSettings {
        max_ips_per_name: 1,
        max_names: 1,
        ..table.settings()
    });
    check(&table);
    table.set_rules(Vec::new());
    check(&table);
    assert!(table.allowed().is_empty());
    let _ = table.expire(start + Duration::from_secs(u64::from(u32::MAX)));
    assert_eq!(table.stats().names, 0);
});

/// The allow entries and the counters agree.
fn check(table: &FqdnTable) {
    let allowed = table.allowed();
    let stats = table.stats();
    assert_eq!(allowed.len(), stats.addresses);
    assert!(stats.names <= 2);
    for ((workload, addr), rules) in &allowed {
        assert!(!rules.is_empty());
        assert_eq!(table.allowed_for(*workload, *addr).as_ref(), Some(rules));
    }
    let held: usize = table
        .entries(None, Instant::now())
        .iter()
        .map(|entry| {
            assert!(entry.addresses.len() <= 3);
            entry.addresses.len()
        })
        .sum();
    assert!(held >= allowed.len());
}
