//! Small domain types shared by the policy, the datapath wrapper and the control socket.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Enforcement mode of a workload: the observe-then-deny rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nothing is denied; every destination is recorded.
    Learning,
    /// The policy is evaluated; what strict would deny is allowed and logged as would-deny.
    Audit,
    /// Deny by default; only the allowlist passes.
    Strict,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Learning, Mode::Audit, Mode::Strict];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Learning => "learning",
            Mode::Audit => "audit",
            Mode::Strict => "strict",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: expected learning, audit or strict")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

/// Transport protocol an allow rule applies to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
    #[default]
    Any,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Any];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Any => "any",
        }
    }

    /// Whether this rule protocol covers a packet of IP protocol number `ip_protocol`.
    pub fn covers(self, ip_protocol: u8) -> bool {
        match self {
            Protocol::Any => true,
            Protocol::Tcp => ip_protocol == IPPROTO_TCP,
            Protocol::Udp => ip_protocol == IPPROTO_UDP,
            Protocol::Icmp => ip_protocol == IPPROTO_ICMP || ip_protocol == IPPROTO_ICMPV6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: expected tcp, udp, icmp or any")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|protocol| protocol.as_str() == s)
            .ok_or_else(|| UnknownProtocol(s.to_owned()))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An inclusive range of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What happens to processes that belong to no workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Left alone: no checks, no events.
    #[default]
    Allow,
    /// Treated as the workload named `host`.
    Apply,
}

impl Unmatched {
    pub const ALL: [Unmatched; 2] = [Unmatched::Allow, Unmatched::Apply];

    pub fn as_str(self) -> &'static str {
        match self {
            Unmatched::Allow => "allow",
            Unmatched::Apply => "apply",
        }
    }
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {0:?} for unmatched: expected allow or apply")]
pub struct UnknownUnmatched(pub String);

impl FromStr for Unmatched {
    type Err = UnknownUnmatched;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Unmatched::ALL
            .into_iter()
            .find(|unmatched| unmatched.as_str() == s)
            .ok_or_else(|| UnknownUnmatched(s.to_owned()))
    }
}
