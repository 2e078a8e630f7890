//! The addresses the kernel's fast path takes from an answer, found the way it walks the
//! message (ebpf/src/dns.rs `allow_answers`). The daemon needs them when it cannot parse an
//! answer as a whole: the kernel has already allowed them, and only the daemon can withdraw
//! them. This mirrors a kernel program, so it is deliberately no real DNS parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Records the kernel walks per answer (`egressd_common::dns::MAX_ANSWER_RECORDS`).
const MAX_RECORDS: usize = egressd_common::dns::MAX_ANSWER_RECORDS as usize;
const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// A/AAAA addresses of the answer records that have compressed owner names, in order,
/// stopping where the kernel stops. IPv4-mapped IPv6 comes back as IPv4.
pub fn fast_path_addresses(payload: &[u8]) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let Some(answers) = payload.get(6..8).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return addresses;
    };
    // The question name: uncompressed labels, then type and class.
    let mut offset = HEADER_LEN;
    loop {
        let Some(&len) = payload.get(offset) else {
            return addresses;
        };
        if len == 0 {
            offset += 1;
            break;
        }
        if len > 63 {
            return addresses;
        }
        offset += usize::from(len) + 1;
    }
    offset += 4;
    for _ in 0..usize::from(answers).min(MAX_RECORDS) {
        match payload.get(offset) {
            Some(owner) if owner & 0xc0 == 0xc0 => offset += 2,
            _ => break,
        }
        let Some(fixed) = payload.get(offset..offset + 10) else {
            break;
        };
        offset += 10;
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let length = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let address = match (kind, length) {
            (TYPE_A, 4) => payload
                .get(offset..offset + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            (TYPE_AAAA, 16) => payload
                .get(offset..offset + 16)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(|b| egressd_policy::canonical_ip(IpAddr::V6(Ipv6Addr::from(b)))),
            _ => None,
        };
        if let Some(address) = address {
            addresses.push(address);
        }
        offset += length;
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header with `answers` records, question `a.test` A IN.
    fn message(answers: u16, records: &[&[u8]]) -> Vec<u8> {
        let mut bytes = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
        bytes.extend_from_slice(&answers.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes.extend_from_slice(b"\x01a\x04test\x00\x00\x01\x00\x01");
        for record in records {
            bytes.extend_from_slice(record);
        }
        bytes
    }

    const A_RECORD: &[u8] = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x43\x01";

    #[test]
    fn finds_what_the_kernel_takes_even_from_broken_messages() {
        // Claims five answers, holds one: the kernel took the one.
        let broken = message(5, &[A_RECORD]);
        assert_eq!(
            fast_path_addresses(&broken),
            vec!["127.0.67.1".parse::<IpAddr>().expect("ip")]
        );
        // Self-pointing owner: still a compressed owner to the kernel.
        let mut looped = A_RECORD.to_vec();
        looped[1] = 0x1d;
        assert_eq!(fast_path_addresses(&message(1, &[&looped])).len(), 1);
    }

    #[test]
    fn stops_where_the_kernel_stops() {
        let uncompressed =
            b"\x01a\x04test\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01";
        assert!(fast_path_addresses(&message(2, &[uncompressed, A_RECORD])).is_empty());
        assert!(fast_path_addresses(&[]).is_empty());
        assert!(fast_path_addresses(&message(1, &[&A_RECORD[..14]])).is_empty());
    }
}
