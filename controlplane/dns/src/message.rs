//! DNS messages as the daemon sees them: the payload of an answer a workload's socket
//! received (or of a query it sent), decoded by hickory-proto and reduced to what the FQDN
//! table needs.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::error::DnsError;

/// Largest DNS message (TCP length prefix, EDNS payload size).
pub const MAX_MESSAGE_LEN: usize = 65535;

/// CNAME records followed from the question name before giving up.
pub const MAX_CHAIN_LEN: usize = 16;

/// The type of a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    A,
    Aaaa,
    /// Any other type, by number.
    Other(u16),
}

impl From<RecordType> for RecordKind {
    fn from(record_type: RecordType) -> Self {
        match record_type {
            RecordType::A => RecordKind::A,
            RecordType::AAAA => RecordKind::Aaaa,
            other => RecordKind::Other(u16::from(other)),
        }
    }
}

/// The data of an answer record. Only class IN records carry data; records of other classes
/// are `Other`, like record types the table has no use for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The target name: lowercase, no trailing dot.
    Cname(String),
    /// Any other type (or class), by type number.
    Other(u16),
}

/// One record of the answer section.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnswerRecord {
    /// Lowercase, no trailing dot.
    pub owner: String,
    /// As sent, in seconds.
    pub ttl: u32,
    pub data: RecordData,
}

/// A decoded DNS response with exactly one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsResponse {
    pub id: u16,
    /// The question name: lowercase, no trailing dot.
    pub question: String,
    pub qtype: RecordKind,
    /// The response code, including the EDNS extended bits (0 = NOERROR, 3 = NXDOMAIN).
    pub rcode: u16,
    /// The TC flag: the resolver cut the answer short (the client retries over TCP).
    pub truncated: bool,
    /// The answer section in wire order (authority and additional sections are dropped).
    pub answers: Vec<AnswerRecord>,
}

/// An address an answer resolves the question name to.
pub type ChainAddress = (IpAddr, u32, Vec<String>);

/// Decodes a DNS response (QR=1) with exactly one question.
pub fn parse_response(payload: &[u8]) -> Result<DnsResponse, DnsError> {
    let message = decode(payload)?;
    if message.metadata.message_type != MessageType::Response {
        return Err(DnsError::NotAResponse {
            id: message.metadata.id,
        });
    }
    let (question, qtype) = single_question(&message)?;
    Ok(DnsResponse {
        id: message.metadata.id,
        question,
        qtype,
        rcode: u16::from(message.metadata.response_code),
        truncated: message.metadata.truncation,
        answers: message.answers.iter().map(answer_record).collect(),
    })
}

/// Decodes a DNS query (QR=0) with exactly one question: its id, name (lowercase, no
/// trailing dot) and type.
pub fn question_of_query(payload: &[u8]) -> Result<(u16, String, RecordKind), DnsError> {
    let message = decode(payload)?;
    if message.metadata.message_type != MessageType::Query {
        return Err(DnsError::NotAQuery {
            id: message.metadata.id,
        });
    }
    let (name, kind) = single_question(&message)?;
    Ok((message.metadata.id, name, kind))
}

/// The addresses the answer resolves the question name to: the A and AAAA records whose
/// owner is the question name or is reached from it through the answer's CNAME records
/// (at most [`MAX_CHAIN_LEN`] of them, stopping at a loop). Each comes with the smallest
/// TTL along its chain and the chain of names from the question to the record's owner.
/// Records of unrelated owners are ignored. An address listed twice is returned once, with
/// the larger TTL.
pub fn chain_addresses(response: &DnsResponse) -> Vec<ChainAddress> {
    // Names compared as the DNS does: case-insensitively, trailing dot or not (a response
    // built by hand need not be normalized like a parsed one).
    let records: Vec<(String, u32, Step)> = response
        .answers
        .iter()
        .filter_map(|record| {
            let step = match &record.data {
                RecordData::A(v4) => Step::Address(IpAddr::V4(*v4)),
                RecordData::Aaaa(v6) => Step::Address(IpAddr::V6(*v6)),
                RecordData::Cname(target) => Step::Alias(normalize(target)),
                RecordData::Other(_) => return None,
            };
            Some((normalize(&record.owner), record.ttl, step))
        })
        .collect();
    let mut out: Vec<ChainAddress> = Vec::new();
    let mut position: HashMap<IpAddr, usize> = HashMap::new();
    let mut current = normalize(&response.question);
    let mut chain = vec![current.clone()];
    let mut visited: HashSet<String> = HashSet::from([current.clone()]);
    let mut chain_ttl = u32::MAX;
    loop {
        let mut next: Option<(&str, u32)> = None;
        for (_, record_ttl, step) in records.iter().filter(|(owner, _, _)| *owner == current) {
            let addr = match step {
                Step::Address(addr) => *addr,
                Step::Alias(target) => {
                    // A name has one CNAME; if a broken answer lists several, take the first.
                    if next.is_none() {
                        next = Some((target, *record_ttl));
                    }
                    continue;
                }
            };
            let ttl = chain_ttl.min(*record_ttl);
            match position.entry(addr) {
                Entry::Occupied(seen) => {
                    if let Some(entry) = out.get_mut(*seen.get())
                        && entry.1 < ttl
                    {
                        entry.1 = ttl;
                        entry.2 = chain.clone();
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(out.len());
                    out.push((addr, ttl, chain.clone()));
                }
            }
        }
        let Some((target, ttl)) = next else { break };
        if chain.len() > MAX_CHAIN_LEN || !visited.insert(target.to_owned()) {
            break;
        }
        chain_ttl = chain_ttl.min(ttl);
        chain.push(target.to_owned());
        current = target.to_owned();
    }
    out
}

/// What an answer record contributes to a chain.
enum Step {
    Address(IpAddr),
    Alias(String),
}

/// Lowercase, without one trailing dot.
pub(crate) fn normalize(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.strip_suffix('.') {
        Some(stripped) => stripped.to_owned(),
        None => lower,
    }
}

fn decode(payload: &[u8]) -> Result<Message, DnsError> {
    if payload.len() > MAX_MESSAGE_LEN {
        return Err(DnsError::TooLarge { len: payload.len() });
    }
    Message::from_vec(payload).map_err(|error| DnsError::Malformed {
        reason: error.to_string(),
    })
}

fn single_question(message: &Message) -> Result<(String, RecordKind), DnsError> {
    match message.queries.as_slice() {
        [query] => Ok((name_text(&query.name), RecordKind::from(query.query_type))),
        queries => Err(DnsError::QuestionCount {
            count: queries.len(),
        }),
    }
}

fn answer_record(record: &Record) -> AnswerRecord {
    let data = match (&record.data, record.dns_class) {
        (RData::A(a), DNSClass::IN) => RecordData::A(a.0),
        (RData::AAAA(aaaa), DNSClass::IN) => RecordData::Aaaa(aaaa.0),
        (RData::CNAME(cname), DNSClass::IN) => RecordData::Cname(name_text(&cname.0)),
        _ => RecordData::Other(u16::from(record.record_type())),
    };
    AnswerRecord {
        owner: name_text(&record.name),
        ttl: record.ttl,
        data,
    }
}

/// A name as text: ASCII (bytes outside letters, digits, '-' and '_' escaped as in zone
/// files, so a '.' inside a label cannot pass for a label boundary), lowercase, without the
/// trailing dot. The root is "".
pub(crate) fn name_text(name: &Name) -> String {
    // Nearly every name has only letters, digits, '_' and inner '-', which `to_ascii` writes
    // as they are: those are joined here directly (`to_ascii`, which formats byte by byte,
    // was 5% of the daemon's time under 20,000 answers/s).
    let plain = name.iter().all(|label| {
        label.iter().enumerate().all(|(at, &byte)| {
            byte.is_ascii_alphanumeric() || byte == b'_' || (byte == b'-' && at > 0)
        })
    });
    if !plain {
        return escaped_name_text(name);
    }
    let mut text = String::with_capacity(64);
    for (at, label) in name.iter().enumerate() {
        if at > 0 {
            text.push('.');
        }
        text.extend(
            label
                .iter()
                .map(|byte| char::from(byte.to_ascii_lowercase())),
        );
    }
    text
}

/// [`name_text`] of any name, by hickory's escaping.
pub(crate) fn escaped_name_text(name: &Name) -> String {
    let mut text = name.to_ascii();
    text.make_ascii_lowercase();
    if name.is_fqdn() || name.is_root() {
        // `to_ascii` ends absolute names with the root's '.'.
        text.pop();
    }
    text
}
