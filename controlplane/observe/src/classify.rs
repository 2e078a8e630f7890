//! Internet or not: what `--internet-only` leaves out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egressd_policy::canonical_ip;
use ipnet::Ipv4Net;

/// 100.64.0.0/10, carrier-grade NAT (RFC 6598); std's `is_shared` is not stable.
const CGNAT: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(net) => net,
    Err(_) => panic!("100.64.0.0/10 is a valid prefix"),
};

/// Whether `addr` stays off the public internet: loopback, RFC 1918 private, CGNAT
/// 100.64.0.0/10, link-local (169.254.0.0/16, fe80::/10), unique local fc00::/7,
/// multicast, unspecified (0.0.0.0/8, ::), the IPv4 broadcast address, and
/// IPv4-mapped IPv6 addresses of any of those.
pub fn is_internal(addr: IpAddr) -> bool {
    match canonical_ip(addr) {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(addr: Ipv4Addr) -> bool {
    addr.is_loopback()
        || addr.is_private()
        || CGNAT.contains(&addr)
        || addr.is_link_local()
        || addr.is_multicast()
        || addr.is_broadcast()
        // 0.0.0.0/8: "this network", only valid as a source.
        || addr.octets()[0] == 0
}

fn is_internal_v6(addr: Ipv6Addr) -> bool {
    addr.is_loopback()
        || addr.is_unspecified()
        || addr.is_unicast_link_local()
        || addr.is_unique_local()
        || addr.is_multicast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal(text: &str) -> bool {
        is_internal(text.parse().expect("ip"))
    }

    #[test]
    fn internal_v4_ranges() {
        for text in [
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
        ] {
            assert!(internal(text), "{text} is internal");
        }
    }

    #[test]
    fn public_v4_addresses_and_range_edges() {
        for text in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "223.255.255.255",
        ] {
            assert!(!internal(text), "{text} is on the internet");
        }
    }

    #[test]
    fn internal_v6_ranges() {
        for text in [
            "::1",
            "::",
            "fe80::1",
            "febf:ffff::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::fb",
            "ff05::1:3",
        ] {
            assert!(internal(text), "{text} is internal");
        }
        for text in [
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "fec0::1",
            "fbff::1",
        ] {
            assert!(!internal(text), "{text} is on the internet");
        }
    }

    #[test]
    fn v4_mapped_addresses_are_judged_as_v4() {
        assert!(internal("::ffff:10.1.2.3"));
        assert!(internal("::ffff:127.0.0.1"));
        assert!(internal("::ffff:100.64.0.1"));
        assert!(internal("::ffff:169.254.169.254"));
        assert!(!internal("::ffff:1.1.1.1"));
    }
}
