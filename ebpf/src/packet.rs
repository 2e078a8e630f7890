//! Parsing the packet a `cgroup_skb` program sees (it starts at the network header).

use aya_ebpf::{bindings::bpf_sock, programs::SkBuffContext};
use egressd_common::{Addr, v4_mapped};

use crate::verdict::{Flow, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FLAG_RST: u8 = 0x04;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXTENSION_HEADERS: u32 = 4;

/// What the parser found besides the flow.
pub struct Parsed {
    pub flow: Flow,
    /// Kernel-generated control traffic that must never be blocked: TCP resets, ICMP errors
    /// and echo replies, IPv6 neighbour discovery and multicast listener messages.
    pub control: bool,
    /// False when even the IP header could not be read.
    pub valid: bool,
    /// Offset of the transport header (0 when there is none).
    pub transport_offset: usize,
    /// Offset of the transport payload (0 when unknown).
    pub payload_offset: usize,
}

#[inline(always)]
fn is_icmp_control(icmp_type: u8) -> bool {
    // echo reply, destination unreachable, source quench, time exceeded, parameter problem
    matches!(icmp_type, 0 | 3 | 4 | 11 | 12)
}

#[inline(always)]
fn is_icmpv6_control(icmp_type: u8) -> bool {
    // errors 1-4, echo reply 129, MLD 130-132 and 143, neighbour discovery 133-137
    matches!(icmp_type, 1..=4 | 129..=137 | 143)
}

/// Reads ports (and TCP flags or ICMP type) at `offset` into `parsed`.
#[inline(always)]
fn parse_transport(ctx: &SkBuffContext, offset: usize, parsed: &mut Parsed) {
    parsed.transport_offset = offset;
    match parsed.flow.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Ok(ports) = ctx.load::<[u8; 4]>(offset) {
                parsed.flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
                parsed.flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
                parsed.flow.has_port = true;
            }
            if parsed.flow.protocol == IPPROTO_UDP {
                parsed.payload_offset = offset + 8;
            } else if let Ok(tcp) = ctx.load::<[u8; 2]>(offset + 12) {
                parsed.payload_offset = offset + usize::from(tcp[0] >> 4) * 4;
                parsed.control = tcp[1] & TCP_FLAG_RST != 0;
            }
        }
        IPPROTO_ICMP => {
            if let Ok(icmp_type) = ctx.load::<u8>(offset) {
                parsed.control = is_icmp_control(icmp_type);
            }
        }
        IPPROTO_ICMPV6 => {
            if let Ok(icmp_type) = ctx.load::<u8>(offset) {
                parsed.control = is_icmpv6_control(icmp_type);
            }
        }
        _ => {}
    }
}

pub const AF_INET: u32 = 2;

/// An IPv6 address given as four network-order words (as contexts hold it), and the family
/// it is judged as: an IPv4-mapped address is already the key its IPv4 address uses.
#[inline(always)]
pub fn ipv6_from_words(words: [u32; 4]) -> (Addr, u8) {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = words[i].to_ne_bytes();
        addr[i * 4] = bytes[0];
        addr[i * 4 + 1] = bytes[1];
        addr[i * 4 + 2] = bytes[2];
        addr[i * 4 + 3] = bytes[3];
        i += 1;
    }
    let family = if addr[..12] == egressd_common::V4_MAPPED_PREFIX {
        4
    } else {
        6
    };
    (addr, family)
}

/// The flow of a connected TCP socket, read from the socket instead of the packet: every
/// packet of the connection goes to the socket's peer, so the per-packet path skips the
/// packet loads. An IPv4-mapped peer of an AF_INET6 socket reads as the IPv4 key.
///
/// # Safety
/// `sk` must be a full socket from the program's context.
#[inline(always)]
pub unsafe fn from_tcp_socket(sk: *mut bpf_sock) -> Parsed {
    // Context fields must be loaded whole at fixed offsets (the verifier forbids pointer
    // arithmetic on sockets); volatile reads keep LLVM from splitting them.
    // SAFETY: the caller vouches for sk; each read is one field of the context.
    let (family, dst_ip4, src_ip4, dst_port, src_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            core::ptr::read_volatile(&raw const (*sk).src_ip4),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
            core::ptr::read_volatile(&raw const (*sk).src_port),
        )
    };
    let mut flow = Flow::empty();
    if family == AF_INET {
        flow.family = 4;
        flow.dst = v4_mapped(dst_ip4.to_ne_bytes());
        flow.src = v4_mapped(src_ip4.to_ne_bytes());
    } else {
        // SAFETY: as above, one 32-bit field load each.
        let words = unsafe {
            [
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ]
        };
        let (dst, family) = ipv6_from_words(words);
        flow.family = family;
        flow.dst = dst;
    }
    flow.dst_port = u16::from_be(dst_port);
    flow.src_port = src_port as u16;
    flow.protocol = IPPROTO_TCP;
    flow.has_port = true;
    Parsed {
        flow,
        control: false,
        valid: true,
        transport_offset: 0,
        payload_offset: 0,
    }
}

#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Parsed {
    let mut parsed = Parsed {
        flow: Flow::empty(),
        control: false,
        valid: false,
        transport_offset: 0,
        payload_offset: 0,
    };
    // Branch on the packet's protocol, never the socket's family: an IPv4-mapped destination
    // on an AF_INET6 socket produces IPv4 packets.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    if ethertype == ETH_P_IP {
        let Ok(header) = ctx.load::<[u8; 20]>(0) else {
            return parsed;
        };
        parsed.valid = true;
        parsed.flow.family = 4;
        parsed.flow.protocol = header[9];
        parsed.flow.src = v4_mapped([header[12], header[13], header[14], header[15]]);
        parsed.flow.dst = v4_mapped([header[16], header[17], header[18], header[19]]);
        let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
        if fragment_offset == 0 {
            let header_len = usize::from(header[0] & 0x0f) * 4;
            parse_transport(ctx, header_len, &mut parsed);
        }
    } else if ethertype == ETH_P_IPV6 {
        let Ok(header) = ctx.load::<[u8; 40]>(0) else {
            return parsed;
        };
        parsed.valid = true;
        parsed.flow.family = 6;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&header[8..24]);
        dst.copy_from_slice(&header[24..40]);
        parsed.flow.src = src;
        parsed.flow.dst = dst;
        let mut next = header[6];
        let mut offset: usize = 40;
        let mut walked = 0;
        while walked < MAX_EXTENSION_HEADERS {
            match next {
                // hop-by-hop, routing, destination options
                0 | 43 | 60 => {
                    let Ok(ext) = ctx.load::<[u8; 2]>(offset) else {
                        break;
                    };
                    next = ext[0];
                    offset += (usize::from(ext[1]) + 1) * 8;
                }
                // fragment: only the first fragment carries the transport header
                44 => {
                    let Ok(ext) = ctx.load::<[u8; 4]>(offset) else {
                        break;
                    };
                    next = ext[0];
                    offset += 8;
                    if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                        parsed.flow.protocol = next;
                        return parsed;
                    }
                }
                _ => break,
            }
            walked += 1;
        }
        parsed.flow.protocol = next;
        parse_transport(ctx, offset, &mut parsed);
    }
    parsed
}

/// Whether a TCP packet carries data (not a bare ACK), from its IP and TCP header lengths.
/// IPv6 extension headers are not walked: TCP segments rarely carry them, and the answer
/// only decides whether the sending task is worth recording.
#[inline(always)]
pub fn tcp_carries_data(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let ip_header = if first >> 4 == 4 {
        usize::from(first & 0x0f) * 4
    } else {
        40
    };
    // Bounded for the verifier: an IPv4 header is at most 60 bytes.
    let ip_header = ip_header & 0x7f;
    let Ok(data_offset) = ctx.load::<u8>(ip_header + 12) else {
        return false;
    };
    let headers = ip_header + usize::from(data_offset >> 4) * 4;
    ctx.len() as usize > headers
}

/// Whether a parsed packet carries transport payload (UDP data, TCP data).
#[inline(always)]
pub fn carries_payload(ctx: &SkBuffContext, parsed: &Parsed) -> bool {
    parsed.payload_offset != 0 && ctx.len() as usize > parsed.payload_offset
}
