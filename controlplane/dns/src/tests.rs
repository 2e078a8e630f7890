use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use egressd_policy::{FqdnPattern, PortRange, Protocol};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::*;

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("valid name")
}

fn a_record(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(addr))))
}

fn aaaa_record(owner: &str, ttl: u32, addr: Ipv6Addr) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(addr)))
}

fn cname_record(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn message(id: u16, question: &str, qtype: RecordType, answers: Vec<Record>) -> Message {
    let mut message = Message::response(id, OpCode::Query);
    message.add_query(Query::query(name(question), qtype));
    message.add_answers(answers);
    message
}

fn wire(message: &Message) -> Vec<u8> {
    message.to_vec().expect("encodable message")
}

fn parse(message: &Message) -> DnsResponse {
    parse_response(&wire(message)).expect("valid response")
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A DNS header: id 0x1234, the given flags, one question, `answers` answers.
fn header(flags: u16, questions: u16, answers: u16) -> Vec<u8> {
    let mut bytes = vec![0x12, 0x34];
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&questions.to_be_bytes());
    bytes.extend_from_slice(&answers.to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    bytes
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

#[test]
fn parses_an_a_answer() {
    let response = parse(&message(
        7,
        "API.Vendor.com.",
        RecordType::A,
        vec![a_record("api.vendor.com.", 300, [192, 0, 2, 1])],
    ));
    assert_eq!(response.id, 7);
    assert_eq!(response.question, "api.vendor.com");
    assert_eq!(response.qtype, RecordKind::A);
    assert_eq!(response.rcode, 0);
    assert!(!response.truncated);
    assert_eq!(
        response.answers,
        vec![AnswerRecord {
            owner: "api.vendor.com".to_owned(),
            ttl: 300,
            data: RecordData::A(Ipv4Addr::new(192, 0, 2, 1)),
        }]
    );
    assert_eq!(
        chain_addresses(&response),
        vec![(v4(192, 0, 2, 1), 300, vec!["api.vendor.com".to_owned()])]
    );
}

#[test]
fn parses_an_aaaa_answer() {
    let addr: Ipv6Addr = "2001:db8::1".parse().expect("v6");
    let response = parse(&message(
        1,
        "v6.vendor.com.",
        RecordType::AAAA,
        vec![aaaa_record("v6.vendor.com.", 60, addr)],
    ));
    assert_eq!(response.qtype, RecordKind::Aaaa);
    assert_eq!(response.answers[0].data, RecordData::Aaaa(addr));
    assert_eq!(
        chain_addresses(&response),
        vec![(IpAddr::V6(addr), 60, vec!["v6.vendor.com".to_owned()])]
    );
}

#[test]
fn follows_a_cname_chain_of_three_with_the_smallest_ttl() {
    let response = parse(&message(
        2,
        "www.vendor.com.",
        RecordType::A,
        vec![
            cname_record("www.vendor.com.", 3600, "edge.vendor.net."),
            cname_record("edge.vendor.net.", 120, "pop.cdn.example."),
            cname_record("pop.cdn.example.", 900, "node7.cdn.example."),
            a_record("node7.cdn.example.", 300, [198, 51, 100, 7]),
            a_record("node7.cdn.example.", 30, [198, 51, 100, 8]),
        ],
    ));
    assert_eq!(
        response.answers[0].data,
        RecordData::Cname("edge.vendor.net".to_owned())
    );
    let chain: Vec<String> = [
        "www.vendor.com",
        "edge.vendor.net",
        "pop.cdn.example",
        "node7.cdn.example",
    ]
    .map(str::to_owned)
    .to_vec();
    assert_eq!(
        chain_addresses(&response),
        vec![
            (v4(198, 51, 100, 7), 120, chain.clone()),
            (v4(198, 51, 100, 8), 30, chain),
        ]
    );
}

#[test]
fn a_cname_loop_ends_the_chain() {
    let response = parse(&message(
        3,
        "a.loop.example.",
        RecordType::A,
        vec![
            cname_record("a.loop.example.", 60, "b.loop.example."),
            a_record("b.loop.example.", 60, [203, 0, 113, 2]),
            cname_record("b.loop.example.", 60, "a.loop.example."),
        ],
    ));
    let found = chain_addresses(&response);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, v4(203, 0, 113, 2));

    // A self-loop without addresses yields nothing.
    let response = parse(&message(
        3,
        "self.example.",
        RecordType::A,
        vec![cname_record("self.example.", 60, "self.example.")],
    ));
    assert!(chain_addresses(&response).is_empty());
}

#[test]
fn chains_longer_than_the_limit_are_cut() {
    let mut records = Vec::new();
    for i in 0..20 {
        records.push(cname_record(
            &format!("n{i}.example."),
            60,
            &format!("n{}.example.", i + 1),
        ));
        records.push(a_record(
            &format!("n{}.example.", i + 1),
            60,
            [10, 0, 0, i + 1],
        ));
    }
    let response = parse(&message(4, "n0.example.", RecordType::A, records));
    let found = chain_addresses(&response);
    // n1 ..= n16 are reached through 1..=16 CNAME records.
    assert_eq!(found.len(), MAX_CHAIN_LEN);
    assert_eq!(found.last().map(|f| f.0), Some(v4(10, 0, 0, 16)));
    assert_eq!(found.last().map(|f| f.2.len()), Some(MAX_CHAIN_LEN + 1));
}

#[test]
fn records_of_unrelated_owners_are_ignored() {
    let response = parse(&message(
        5,
        "api.vendor.com.",
        RecordType::A,
        vec![
            a_record("evil.example.", 60, [6, 6, 6, 6]),
            cname_record("other.vendor.com.", 60, "api.vendor.com."),
            a_record("api.vendor.com.", 60, [192, 0, 2, 10]),
            Record::from_rdata(
                name("api.vendor.com."),
                60,
                RData::TXT(TXT::new(vec!["v=1".to_owned()])),
            ),
        ],
    ));
    assert_eq!(response.answers.len(), 4);
    assert_eq!(
        response.answers[3].data,
        RecordData::Other(u16::from(RecordType::TXT))
    );
    let found: Vec<IpAddr> = chain_addresses(&response)
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(found, vec![v4(192, 0, 2, 10)]);
}

#[test]
fn nxdomain_and_truncation_are_reported() {
    let mut nx = message(6, "nope.vendor.com.", RecordType::A, Vec::new());
    nx.metadata.response_code = ResponseCode::NXDomain;
    let response = parse(&nx);
    assert_eq!(response.rcode, 3);
    assert!(response.answers.is_empty());

    let mut tc = message(
        6,
        "big.vendor.com.",
        RecordType::A,
        vec![a_record("big.vendor.com.", 60, [192, 0, 2, 99])],
    );
    tc.metadata.truncation = true;
    let response = parse(&tc);
    assert!(response.truncated);
    assert_eq!(chain_addresses(&response).len(), 1);
}

#[test]
fn compressed_names_are_decoded() {
    let built = wire(&message(
        8,
        "api.vendor.com.",
        RecordType::A,
        vec![
            a_record("api.vendor.com.", 60, [192, 0, 2, 1]),
            a_record("api.vendor.com.", 60, [192, 0, 2, 2]),
        ],
    ));
    // hickory compresses the repeated owner names into pointers to the question.
    assert!(built.windows(2).any(|w| w == [0xc0, 0x0c]), "{built:02x?}");
    let response = parse_response(&built).expect("valid");
    assert!(response.answers.iter().all(|r| r.owner == "api.vendor.com"));

    // Hand-made: the answer's owner points at the question, its CNAME target at a suffix.
    let mut bytes = header(0x8180, 1, 2);
    bytes.extend_from_slice(b"\x03www\x06vendor\x03com\x00"); // offset 12
    bytes.extend_from_slice(&[0, 1, 0, 1]);
    // www.vendor.com CNAME cdn.<pointer to vendor.com at offset 16>
    bytes.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6]);
    bytes.extend_from_slice(b"\x03cdn\xc0\x10");
    // cdn.vendor.com A 192.0.2.77: owner points at the CNAME target (offset 44).
    bytes.extend_from_slice(&[0xc0, 44, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 77]);
    let response = parse_response(&bytes).expect("hand-made response");
    assert_eq!(
        response.answers[0].data,
        RecordData::Cname("cdn.vendor.com".to_owned())
    );
    assert_eq!(response.answers[1].owner, "cdn.vendor.com");
    assert_eq!(
        chain_addresses(&response),
        vec![(
            v4(192, 0, 2, 77),
            30,
            vec!["www.vendor.com".to_owned(), "cdn.vendor.com".to_owned()]
        )]
    );
}

#[test]
fn garbage_and_empty_payloads_are_malformed() {
    for payload in [
        &[][..],
        &[0xff][..],
        &[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03][..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let error = parse_response(payload).expect_err("garbage");
        assert!(
            matches!(error, DnsError::Malformed { .. }),
            "{payload:?}: {error}"
        );
        assert!(error.to_string().starts_with("malformed DNS message: "));
    }
}

#[test]
fn every_truncated_buffer_is_rejected() {
    let full = wire(&message(
        9,
        "www.vendor.com.",
        RecordType::A,
        vec![
            cname_record("www.vendor.com.", 60, "edge.vendor.net."),
            a_record("edge.vendor.net.", 60, [192, 0, 2, 3]),
        ],
    ));
    assert!(parse_response(&full).is_ok());
    for len in 0..full.len() {
        let error = parse_response(&full[..len]).expect_err("cut short");
        assert!(
            matches!(error, DnsError::Malformed { .. }),
            "{len}: {error}"
        );
    }
}

#[test]
fn compression_pointer_loops_are_rejected() {
    // The question name is a pointer to itself.
    let mut bytes = header(0x8180, 1, 0);
    bytes.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert!(matches!(
        parse_response(&bytes),
        Err(DnsError::Malformed { .. })
    ));
    // Two pointers to each other.
    let mut bytes = header(0x8180, 1, 0);
    bytes.extend_from_slice(&[0xc0, 0x0e, 0xc0, 0x0c, 0, 1, 0, 1]);
    assert!(matches!(
        parse_response(&bytes),
        Err(DnsError::Malformed { .. })
    ));
    // A label, then a pointer back to the start of the name.
    let mut bytes = header(0x8180, 1, 0);
    bytes.extend_from_slice(&[1, b'a', 0xc0, 0x0c, 0, 1, 0, 1]);
    assert!(matches!(
        parse_response(&bytes),
        Err(DnsError::Malformed { .. })
    ));
}

#[test]
fn queries_questions_and_sizes_are_checked() {
    let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(name("Api.Vendor.COM."), RecordType::AAAA));
    let bytes = wire(&query);
    assert_eq!(
        parse_response(&bytes),
        Err(DnsError::NotAResponse { id: 0x4242 })
    );
    assert_eq!(
        question_of_query(&bytes),
        Ok((0x4242, "api.vendor.com".to_owned(), RecordKind::Aaaa))
    );
    let response = wire(&message(3, "x.example.", RecordType::MX, Vec::new()));
    assert_eq!(
        question_of_query(&response),
        Err(DnsError::NotAQuery { id: 3 })
    );
    assert_eq!(
        parse_response(&response).map(|r| r.qtype),
        Ok(RecordKind::Other(15))
    );

    let none = wire(&Message::response(1, OpCode::Query));
    assert_eq!(
        parse_response(&none),
        Err(DnsError::QuestionCount { count: 0 })
    );
    let mut two = message(1, "a.example.", RecordType::A, Vec::new());
    two.add_query(Query::query(name("b.example."), RecordType::A));
    let error = parse_response(&wire(&two)).expect_err("two questions");
    assert_eq!(error, DnsError::QuestionCount { count: 2 });
    assert_eq!(
        error.to_string(),
        "DNS message has 2 questions, expected exactly 1"
    );

    let huge = vec![0u8; MAX_MESSAGE_LEN + 1];
    assert_eq!(
        parse_response(&huge),
        Err(DnsError::TooLarge { len: 65536 })
    );
}

#[test]
fn records_of_other_classes_carry_no_data() {
    let mut record = a_record("api.vendor.com.", 60, [192, 0, 2, 1]);
    record.dns_class = hickory_proto::rr::DNSClass::CH;
    let response = parse(&message(1, "api.vendor.com.", RecordType::A, vec![record]));
    assert_eq!(response.answers[0].data, RecordData::Other(1));
    assert!(chain_addresses(&response).is_empty());
}

// ---------------------------------------------------------------------------------------
// Name hashes
// ---------------------------------------------------------------------------------------

#[test]
fn suffix_hashes_are_the_kernel_hashes_of_each_suffix() {
    let hashes = name_suffix_hashes("API.Example.com.");
    let suffixes: Vec<&str> = hashes.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(suffixes, ["api.example.com", "example.com", "com"]);
    for (suffix, hash) in &hashes {
        assert_eq!(*hash, egressd_common::dns::name_hash(suffix.as_bytes()));
    }
    assert_ne!(hashes[0].1, hashes[1].1);
    assert!(name_suffix_hashes("").is_empty());
    assert!(name_suffix_hashes(".").is_empty());
}

// ---------------------------------------------------------------------------------------
// The FQDN table
// ---------------------------------------------------------------------------------------

const W: u32 = 1;
const OTHER: u32 = 2;

fn settings() -> TableSettings {
    TableSettings {
        min_ttl: Duration::from_secs(60),
        grace: Duration::from_secs(10),
        max_ips_per_name: 512,
        max_names: 1024,
    }
}

fn rule(workload: u32, pattern: &str, ports: &[u16], protocol: Protocol) -> FqdnRule {
    FqdnRule {
        workload,
        pattern: FqdnPattern::parse(pattern).expect("valid pattern"),
        ports: ports.iter().map(|&p| PortRange::single(p)).collect(),
        protocol,
    }
}

fn table(rules: Vec<FqdnRule>) -> FqdnTable {
    let mut table = FqdnTable::new(settings());
    table.set_rules(rules);
    table
}

/// A NOERROR answer for `question` with A records `(ttl, addr)`.
fn answer(question: &str, records: &[(u32, IpAddr)]) -> DnsResponse {
    DnsResponse {
        id: 1,
        question: question.to_owned(),
        qtype: RecordKind::A,
        rcode: 0,
        truncated: false,
        answers: records
            .iter()
            .map(|&(ttl, addr)| AnswerRecord {
                owner: question
                    .to_ascii_lowercase()
                    .trim_end_matches('.')
                    .to_owned(),
                ttl,
                data: match addr {
                    IpAddr::V4(v4) => RecordData::A(v4),
                    IpAddr::V6(v6) => RecordData::Aaaa(v6),
                },
            })
            .collect(),
    }
}

fn https() -> Vec<(Vec<PortRange>, Protocol)> {
    vec![(vec![PortRange::single(443)], Protocol::Tcp)]
}

#[test]
fn exact_rules_allow_the_answer_addresses_with_their_ports() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let addr = v4(192, 0, 2, 1);
    let seen = t.observe(W, &answer("api.vendor.com", &[(300, addr)]), now);
    assert_eq!(seen.allowed_name.as_deref(), Some("api.vendor.com"));
    assert_eq!(seen.changed, vec![(W, addr)]);
    assert_eq!(seen.addresses, vec![addr]);
    assert_eq!(t.allowed_for(W, addr), Some(https()));
    assert_eq!(t.allowed_for(OTHER, addr), None);
    assert_eq!(
        t.allowed().into_iter().collect::<Vec<_>>(),
        vec![((W, addr), https())]
    );

    // Another workload resolving the same name is not allowed anything.
    let seen = t.observe(OTHER, &answer("api.vendor.com", &[(300, addr)]), now);
    assert_eq!(seen.allowed_name, None);
    assert!(seen.changed.is_empty());
    assert_eq!(t.allowed_for(OTHER, addr), None);

    // Neither is a name below an exact one.
    let seen = t.observe(
        W,
        &answer("x.api.vendor.com", &[(300, v4(192, 0, 2, 2))]),
        now,
    );
    assert_eq!(seen.allowed_name, None);
    assert_eq!(t.allowed().len(), 1);
    let stats = t.stats();
    assert_eq!((stats.answers_seen, stats.answers_allowed), (3, 1));
    assert_eq!((stats.names, stats.addresses), (1, 1));
}

#[test]
fn wildcards_match_below_the_suffix_but_not_the_apex() {
    let mut t = table(vec![rule(W, "*.vendor-cdn.com", &[], Protocol::Any)]);
    let now = Instant::now();
    let deep = t.observe(
        W,
        &answer("a.b.vendor-cdn.com", &[(60, v4(198, 51, 100, 1))]),
        now,
    );
    assert_eq!(deep.allowed_name.as_deref(), Some("*.vendor-cdn.com"));
    let apex = t.observe(
        W,
        &answer("vendor-cdn.com", &[(60, v4(198, 51, 100, 2))]),
        now,
    );
    assert_eq!(apex.allowed_name, None);
    assert!(apex.changed.is_empty());
    let lookalike = t.observe(
        W,
        &answer("evilvendor-cdn.com", &[(60, v4(198, 51, 100, 3))]),
        now,
    );
    assert_eq!(lookalike.allowed_name, None);
    assert_eq!(
        t.allowed_for(W, v4(198, 51, 100, 1)),
        Some(vec![(Vec::new(), Protocol::Any)])
    );
    assert_eq!(t.allowed_for(W, v4(198, 51, 100, 2)), None);
    assert_eq!(t.allowed_for(W, v4(198, 51, 100, 3)), None);
}

#[test]
fn names_match_case_insensitively_and_without_the_trailing_dot() {
    let mut t = table(vec![rule(W, "API.Vendor.com.", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let seen = t.observe(
        W,
        &answer("api.VENDOR.com.", &[(60, v4(192, 0, 2, 1))]),
        now,
    );
    assert_eq!(seen.allowed_name.as_deref(), Some("api.vendor.com"));
    let entries = t.entries(Some(W), now);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "api.vendor.com");

    // Through the wire too: the parser lowercases.
    let wire_answer = parse(&message(
        1,
        "Api.Vendor.Com.",
        RecordType::A,
        vec![a_record("API.VENDOR.COM.", 60, [192, 0, 2, 2])],
    ));
    let seen = t.observe(W, &wire_answer, now);
    assert_eq!(seen.changed, vec![(W, v4(192, 0, 2, 2))]);
}

#[test]
fn addresses_expire_after_max_ttl_min_ttl_plus_grace() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let start = Instant::now();
    let short = v4(192, 0, 2, 1); // ttl 5 s: held for min_ttl 60 s + grace 10 s
    let long = v4(192, 0, 2, 2); // ttl 300 s: held for 300 s + 10 s
    t.observe(
        W,
        &answer("api.vendor.com", &[(5, short), (300, long)]),
        start,
    );
    let at = |secs: u64| start + Duration::from_secs(secs);

    let entry = &t.entries(None, at(20))[0];
    assert_eq!(
        entry.addresses,
        vec![
            (short, Duration::from_secs(50)),
            (long, Duration::from_secs(290))
        ]
    );
    assert_eq!(entry.hits, 1);

    assert!(t.expire(at(69)).is_empty());
    assert_eq!(t.expire(at(70)), vec![(W, short)]);
    assert_eq!(t.allowed_for(W, short), None);
    assert_eq!(t.allowed_for(W, long), Some(https()));
    assert!(t.expire(at(309)).is_empty());
    assert_eq!(t.expire(at(310)), vec![(W, long)]);
    assert!(t.allowed().is_empty());
    assert_eq!(t.stats().names, 0);
    assert!(t.entries(None, at(310)).is_empty());
}

#[test]
fn a_new_answer_extends_but_never_shortens_an_address() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let start = Instant::now();
    let addr = v4(192, 0, 2, 1);
    t.observe(W, &answer("api.vendor.com", &[(300, addr)]), start);
    // A later, shorter answer does not cut the first one's lifetime (310 s).
    t.observe(
        W,
        &answer("api.vendor.com", &[(5, addr)]),
        start + Duration::from_secs(100),
    );
    assert!(t.expire(start + Duration::from_secs(309)).is_empty());
    assert_eq!(t.expire(start + Duration::from_secs(310)), vec![(W, addr)]);
    // A later, longer answer extends it.
    t.observe(
        W,
        &answer("api.vendor.com", &[(60, addr)]),
        start + Duration::from_secs(400),
    );
    t.observe(
        W,
        &answer("api.vendor.com", &[(600, addr)]),
        start + Duration::from_secs(401),
    );
    assert!(t.expire(start + Duration::from_secs(1000)).is_empty());
    assert_eq!(t.expire(start + Duration::from_secs(1011)), vec![(W, addr)]);
}

#[test]
fn a_shared_address_stays_until_both_names_expire() {
    let mut t = table(vec![
        rule(W, "api.vendor.com", &[443], Protocol::Tcp),
        rule(W, "*.vendor-cdn.com", &[8000], Protocol::Udp),
    ]);
    let start = Instant::now();
    let shared = v4(203, 0, 113, 9);
    t.observe(W, &answer("api.vendor.com", &[(100, shared)]), start);
    t.observe(W, &answer("dl.vendor-cdn.com", &[(500, shared)]), start);
    assert_eq!(t.stats().addresses, 1);
    assert_eq!(t.stats().names, 2);

    // api.vendor.com's binding ends at 110 s: the entry is recomputed and keeps the CDN's ports.
    assert_eq!(
        t.expire(start + Duration::from_secs(110)),
        vec![(W, shared)]
    );
    assert_eq!(
        t.allowed_for(W, shared),
        Some(vec![(vec![PortRange::single(8000)], Protocol::Udp)])
    );
    assert_eq!(
        t.expire(start + Duration::from_secs(510)),
        vec![(W, shared)]
    );
    assert_eq!(t.allowed_for(W, shared), None);
}

#[test]
fn ports_of_two_names_on_one_address_are_united() {
    let mut t = table(vec![
        rule(W, "api.vendor.com", &[443], Protocol::Tcp),
        rule(W, "*.vendor-cdn.com", &[8000], Protocol::Udp),
        // Two rules matching one name unite too.
        rule(W, "dl.vendor-cdn.com", &[443], Protocol::Tcp),
    ]);
    let now = Instant::now();
    let shared = v4(203, 0, 113, 9);
    let seen = t.observe(W, &answer("dl.vendor-cdn.com", &[(60, shared)]), now);
    assert_eq!(seen.allowed_name.as_deref(), Some("dl.vendor-cdn.com"));
    t.observe(W, &answer("api.vendor.com", &[(60, shared)]), now);
    assert_eq!(
        t.allowed_for(W, shared),
        Some(vec![
            (vec![PortRange::single(443)], Protocol::Tcp),
            (vec![PortRange::single(8000)], Protocol::Udp),
        ])
    );
    assert_eq!(
        t.allowed().get(&(W, shared)),
        t.allowed_for(W, shared).as_ref()
    );
}

#[test]
fn names_over_max_ips_drop_the_addresses_expiring_soonest() {
    let mut t = FqdnTable::new(TableSettings {
        max_ips_per_name: 2,
        ..settings()
    });
    t.set_rules(vec![rule(W, "*.vendor-cdn.com", &[], Protocol::Any)]);
    let now = Instant::now();
    let (a, b, c) = (v4(10, 0, 0, 1), v4(10, 0, 0, 2), v4(10, 0, 0, 3));
    t.observe(W, &answer("x.vendor-cdn.com", &[(100, a), (300, b)]), now);
    let seen = t.observe(W, &answer("x.vendor-cdn.com", &[(200, c)]), now);
    // `a` expires soonest and goes.
    assert_eq!(seen.changed, vec![(W, a), (W, c)]);
    assert_eq!(t.allowed_for(W, a), None);
    assert!(t.allowed_for(W, b).is_some());
    assert!(t.allowed_for(W, c).is_some());
    assert_eq!(t.stats().dropped_addresses, 1);

    // Lowering the cap through the settings drops more.
    let changed = t.set_settings(TableSettings {
        max_ips_per_name: 1,
        ..settings()
    });
    assert_eq!(changed, vec![(W, c)]);
    assert_eq!(t.stats().dropped_addresses, 2);
    assert_eq!(t.allowed().len(), 1);
}

#[test]
fn lru_evictions_are_counted_and_leave_allowed() {
    let mut t = FqdnTable::new(TableSettings {
        max_names: 2,
        ..settings()
    });
    t.set_rules(vec![
        rule(W, "*.vendor-cdn.com", &[], Protocol::Any),
        rule(OTHER, "*.vendor-cdn.com", &[], Protocol::Any),
    ]);
    let now = Instant::now();
    t.observe(
        W,
        &answer("a.vendor-cdn.com", &[(60, v4(10, 0, 0, 1))]),
        now,
    );
    t.observe(
        OTHER,
        &answer("b.vendor-cdn.com", &[(60, v4(10, 0, 0, 2))]),
        now,
    );
    // Using a.vendor-cdn.com again makes b the least recently used.
    t.observe(
        W,
        &answer("a.vendor-cdn.com", &[(60, v4(10, 0, 0, 1))]),
        now,
    );
    let seen = t.observe(
        W,
        &answer("c.vendor-cdn.com", &[(60, v4(10, 0, 0, 3))]),
        now,
    );
    assert_eq!(
        seen.changed,
        vec![(W, v4(10, 0, 0, 3)), (OTHER, v4(10, 0, 0, 2))]
    );
    assert_eq!(t.stats().evicted_names, 1);
    assert_eq!(t.stats().names, 2);
    let allowed: Vec<(u32, IpAddr)> = t.allowed().into_keys().collect();
    assert_eq!(allowed, vec![(W, v4(10, 0, 0, 1)), (W, v4(10, 0, 0, 3))]);
    // The evicted address's expiry is gone with it.
    assert!(t.expire(now + Duration::from_secs(3600)).len() == 2);

    // Shrinking the LRU evicts too.
    t.observe(
        W,
        &answer("a.vendor-cdn.com", &[(60, v4(10, 0, 0, 1))]),
        now,
    );
    t.observe(
        W,
        &answer("c.vendor-cdn.com", &[(60, v4(10, 0, 0, 3))]),
        now,
    );
    let changed = t.set_settings(TableSettings {
        max_names: 1,
        ..settings()
    });
    assert_eq!(changed, vec![(W, v4(10, 0, 0, 1))]);
    assert_eq!(t.stats().evicted_names, 2);
}

#[test]
fn set_rules_drops_bindings_of_names_no_longer_allowed() {
    let mut t = table(vec![
        rule(W, "api.vendor.com", &[443], Protocol::Tcp),
        rule(W, "*.vendor-cdn.com", &[], Protocol::Any),
    ]);
    let now = Instant::now();
    let api = v4(192, 0, 2, 1);
    let cdn = v4(198, 51, 100, 1);
    t.observe(W, &answer("api.vendor.com", &[(60, api)]), now);
    t.observe(W, &answer("x.vendor-cdn.com", &[(60, cdn)]), now);

    // The api rule goes, the CDN rule changes its ports.
    let changed = t.set_rules(vec![rule(W, "*.vendor-cdn.com", &[8443], Protocol::Tcp)]);
    assert_eq!(changed, vec![(W, api), (W, cdn)]);
    assert_eq!(t.allowed_for(W, api), None);
    assert_eq!(
        t.allowed_for(W, cdn),
        Some(vec![(vec![PortRange::single(8443)], Protocol::Tcp)])
    );
    assert_eq!(t.stats().names, 1);
    // Its expiry went with it: only the CDN address expires.
    assert_eq!(t.expire(now + Duration::from_secs(3600)), vec![(W, cdn)]);

    // The same rules again change nothing.
    t.observe(W, &answer("x.vendor-cdn.com", &[(60, cdn)]), now);
    assert!(
        t.set_rules(vec![rule(W, "*.vendor-cdn.com", &[8443], Protocol::Tcp)])
            .is_empty()
    );
}

#[test]
fn names_for_labels_denied_names_own_workload_first() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let addr = v4(192, 0, 2, 50);
    t.observe(OTHER, &answer("shared.example", &[(60, addr)]), now);
    let seen = t.observe(W, &answer("telemetry.vendor.com", &[(60, addr)]), now);
    assert_eq!(seen.allowed_name, None);
    assert!(seen.changed.is_empty());
    assert_eq!(seen.addresses, vec![addr]);
    assert_eq!(t.allowed_for(W, addr), None);
    t.observe(W, &answer("metrics.vendor.com", &[(60, addr)]), now);
    assert_eq!(
        t.names_for(W, addr),
        [
            "metrics.vendor.com",
            "telemetry.vendor.com",
            "shared.example"
        ]
    );
    assert_eq!(
        t.names_for(OTHER, addr),
        [
            "shared.example",
            "metrics.vendor.com",
            "telemetry.vendor.com"
        ]
    );
    // Seeing telemetry again makes it the newest.
    t.observe(W, &answer("telemetry.vendor.com", &[(60, addr)]), now);
    assert_eq!(t.names_for(W, addr)[0], "telemetry.vendor.com");
    assert!(t.names_for(W, v4(192, 0, 2, 51)).is_empty());
}

#[test]
fn a_cname_chain_for_an_allowed_name_allows_its_final_addresses() {
    let mut t = table(vec![rule(W, "www.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let response = parse(&message(
        1,
        "www.vendor.com.",
        RecordType::A,
        vec![
            cname_record("www.vendor.com.", 30, "edge.cdn.example."),
            a_record("edge.cdn.example.", 600, [198, 51, 100, 20]),
            a_record("unrelated.example.", 600, [6, 6, 6, 6]),
        ],
    ));
    let seen = t.observe(W, &response, now);
    assert_eq!(seen.changed, vec![(W, v4(198, 51, 100, 20))]);
    assert_eq!(t.allowed_for(W, v4(6, 6, 6, 6)), None);
    // The chain's smallest TTL (30 s) is under min_ttl: 60 s + 10 s.
    assert_eq!(
        t.entries(Some(W), now)[0].addresses,
        vec![(v4(198, 51, 100, 20), Duration::from_secs(70))]
    );
    assert_eq!(t.names_for(W, v4(198, 51, 100, 20)), ["www.vendor.com"]);

    // An allowed name reached only as a CNAME target does not allow anything.
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let response = parse(&message(
        1,
        "attacker.example.",
        RecordType::A,
        vec![
            cname_record("attacker.example.", 30, "api.vendor.com."),
            a_record("api.vendor.com.", 600, [6, 6, 6, 6]),
        ],
    ));
    assert_eq!(t.observe(W, &response, now).allowed_name, None);
    assert!(t.allowed().is_empty());
}

#[test]
fn error_answers_and_empty_answers_change_nothing_but_count() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    t.observe(W, &answer("api.vendor.com", &[(60, v4(192, 0, 2, 1))]), now);

    let mut nx = answer("api.vendor.com", &[(60, v4(192, 0, 2, 2))]);
    nx.rcode = 3;
    let seen = t.observe(W, &nx, now);
    assert_eq!(seen.allowed_name.as_deref(), Some("api.vendor.com"));
    assert!(seen.changed.is_empty());
    assert!(seen.addresses.is_empty());
    let empty = t.observe(W, &answer("api.vendor.com", &[]), now);
    assert!(empty.changed.is_empty());

    assert_eq!(t.allowed().len(), 1);
    assert_eq!(t.allowed_for(W, v4(192, 0, 2, 2)), None);
    let stats = t.stats();
    assert_eq!((stats.answers_seen, stats.answers_allowed), (3, 3));
    assert_eq!(t.entries(None, now)[0].hits, 3);
}

#[test]
fn ipv4_mapped_answers_are_ipv4_addresses() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("v6");
    let seen = t.observe(W, &answer("api.vendor.com", &[(60, mapped)]), now);
    assert_eq!(seen.changed, vec![(W, v4(192, 0, 2, 7))]);
    assert_eq!(t.allowed_for(W, mapped), Some(https()));
    assert_eq!(t.allowed_for(W, v4(192, 0, 2, 7)), Some(https()));
}

#[test]
fn huge_and_negative_ttls_are_bounded() {
    let mut t = table(vec![rule(W, "api.vendor.com", &[443], Protocol::Tcp)]);
    let now = Instant::now();
    let huge = v4(192, 0, 2, 1);
    let negative = v4(192, 0, 2, 2);
    t.observe(
        W,
        &answer(
            "api.vendor.com",
            &[(u32::MAX >> 1, huge), (u32::MAX, negative)],
        ),
        now,
    );
    let entry = &t.entries(None, now)[0];
    assert_eq!(
        entry.addresses,
        vec![
            (huge, Duration::from_secs(u64::from(MAX_TTL) + 10)),
            (negative, Duration::from_secs(70)),
        ]
    );
}

#[test]
fn settings_follow_the_policy() {
    let dns = egressd_policy::DnsSettings::default();
    let s = TableSettings::from(&dns);
    assert_eq!(s.min_ttl, Duration::from_secs(60));
    assert_eq!(s.grace, Duration::from_secs(10));
    assert_eq!(s.max_ips_per_name, 512);
    assert_eq!(s.max_names, 65536);
    assert_eq!(TableSettings::default(), s);
}

#[test]
fn the_fuzz_seeds_are_valid_messages() {
    let seed = |bytes: &[u8]| parse_response(bytes).expect("seed parses");
    let a = seed(include_bytes!("../fuzz/seeds/parse_response/a"));
    assert_eq!(chain_addresses(&a).len(), 2);
    let aaaa = seed(include_bytes!("../fuzz/seeds/parse_response/aaaa"));
    assert_eq!(aaaa.qtype, RecordKind::Aaaa);
    let cname = seed(include_bytes!("../fuzz/seeds/parse_response/cname"));
    assert_eq!(
        chain_addresses(&cname),
        vec![(
            v4(198, 51, 100, 7),
            30,
            [
                "www.vendor.com",
                "edge.cdn.example",
                "node.edge.cdn.example"
            ]
            .map(str::to_owned)
            .to_vec()
        )]
    );
    assert_eq!(
        seed(include_bytes!("../fuzz/seeds/parse_response/nx")).rcode,
        3
    );
    assert!(seed(include_bytes!("../fuzz/seeds/parse_response/tc_edns")).truncated);
    assert!(question_of_query(include_bytes!("../fuzz/seeds/parse_response/query")).is_ok());
}

/// The direct path of `name_text` writes what hickory's escaping writes, for names it takes
/// (and the others go through that escaping).
#[test]
fn name_text_writes_plain_names_as_hickory_does() {
    let mut names: Vec<Name> = [
        "api.vendor.example",
        "API.Vendor.Example.",
        "a_b.c-d.example",
        "x-.example",
        "*.wild.example",
        "xn--bcher-kva.example",
        "_srv._tcp.example",
        ".",
        "",
    ]
    .iter()
    .map(|text| Name::from_ascii(text).unwrap_or_else(|e| panic!("{text:?}: {e}")))
    .collect();
    names.push(
        Name::from_labels([&b"a.b"[..], b"c\x01d", b"e f", b"\xc3\xa9"]).expect("binary labels"),
    );
    names.push(Name::from_labels([&b"-lead"[..], b"example"]).expect("a leading dash"));
    for name in names {
        assert_eq!(
            crate::message::name_text(&name),
            crate::message::escaped_name_text(&name),
            "{name:?}"
        );
    }
}

#[test]
fn addresses_of_lists_one_workloads_held_addresses_of_both_families() {
    const OTHER: u32 = W + 1;
    let mut t = table(vec![
        rule(W, "api.vendor.com", &[443], Protocol::Tcp),
        rule(OTHER, "api.vendor.com", &[443], Protocol::Tcp),
    ]);
    let start = Instant::now();
    let v6: IpAddr = "2001:db8::9".parse().expect("ip");
    t.observe(
        W,
        &answer("api.vendor.com", &[(100, v4(203, 0, 113, 9)), (100, v6)]),
        start,
    );
    t.observe(
        OTHER,
        &answer("api.vendor.com", &[(100, v4(203, 0, 113, 10))]),
        start,
    );
    assert_eq!(t.addresses_of(W), vec![v4(203, 0, 113, 9), v6]);
    assert_eq!(t.addresses_of(OTHER), vec![v4(203, 0, 113, 10)]);
    assert_eq!(t.addresses_of(OTHER + 1), Vec::<IpAddr>::new());
}
