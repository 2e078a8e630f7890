//! CIDR parsing shared by allow rules and the deny list.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a host prefix).
///
/// Host bits must be clear, and IPv4-mapped IPv6 (`::ffff:a.b.c.d/96+n`) becomes the
/// IPv4 prefix it stands for, since the datapath judges such destinations as IPv4.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = match text.split_once('/') {
        None => {
            let addr: IpAddr = text
                .parse()
                .map_err(|_| "expected an IP address or a prefix like 10.0.0.0/8".to_owned())?;
            IpNet::from(addr)
        }
        Some((addr, len)) => {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 =
                len.parse().ok().filter(|len| *len <= max).ok_or_else(|| {
                    format!("prefix length {len:?} is not a number from 0 to {max}")
                })?;
            let net = IpNet::new(addr, len).map_err(|e| e.to_string())?;
            if net.trunc() != net {
                return Err(format!(
                    "host bits are set in {text}: did you mean {}?",
                    net.trunc()
                ));
            }
            net
        }
    };
    Ok(canonical_net(net))
}

/// IPv4-mapped IPv6 addresses as plain IPv4; anything else unchanged.
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Prefixes inside `::ffff:0:0/96` as the IPv4 prefix they cover; anything else unchanged.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().expect("valid net")
    }

    #[test]
    fn addresses_become_host_prefixes() {
        assert_eq!(parse_cidr("10.1.2.3"), Ok(net("10.1.2.3/32")));
        assert_eq!(parse_cidr("::1"), Ok(net("::1/128")));
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_cidr("2001:db8::/32"), Ok(net("2001:db8::/32")));
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
    }

    #[test]
    fn v4_mapped_becomes_v4() {
        assert_eq!(parse_cidr("::ffff:10.1.2.3"), Ok(net("10.1.2.3/32")));
        assert_eq!(parse_cidr("::ffff:10.0.0.0/104"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_cidr("::ffff:0.0.0.0/96"), Ok(net("0.0.0.0/0")));
        // Wider than the mapped range: stays IPv6.
        assert_eq!(parse_cidr("::fffe:0:0/95"), Ok(net("::fffe:0:0/95")));
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        assert_eq!(canonical_ip(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical_ip(ip("::1")), ip("::1"));
        assert_eq!(canonical_ip(ip("1.2.3.4")), ip("1.2.3.4"));
    }

    #[test]
    fn invalid_cidrs_are_explained() {
        let cases = [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
            ("10.0.0.0/33", "from 0 to 32"),
            ("::/129", "from 0 to 128"),
            ("10.0.0.0/x", "not a number"),
            ("10.0.0/8", "not an IP address"),
            ("example.com", "expected an IP address"),
            ("", "expected an IP address"),
        ];
        for (text, expected) in cases {
            let error = parse_cidr(text).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
