//! Types shared by the eBPF programs (`egressd-ebpf`) and the userspace datapath
//! (`egressd-datapath`). Every type is `#[repr(C)]`, `Copy`, and sized so that it has no
//! implicit padding: a const assertion next to each one catches drift.
//!
//! Numeric codes here (modes, verdicts, reasons, hooks, counters) are a versioned contract
//! between kernel and userspace and with pinned state: never renumber, retire instead.
#![no_std]

pub mod dns;
pub mod event;
pub mod flow;
pub mod policy;
pub mod socket;

/// Addresses are kept as 16 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so that an
/// IPv4-mapped IPv6 destination and the same IPv4 destination are one key.
pub type Addr = [u8; 16];

/// The IPv4-mapped prefix `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `a.b.c.d` (network byte order bytes) as an IPv4-mapped 16-byte address.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    // `::ffff:a.b.c.d` as one 128-bit value: assembled byte by byte, LLVM keeps each of a
    // flow's 32 address bytes in a stack slot of its own, more than the eBPF programs' 512-byte
    // stack can spare.
    (((u32::from_le_bytes(octets) as u128) << 96) | (0xffff << 80)).to_le_bytes()
}

/// Bumped whenever a map layout or a numeric code changes meaning; recorded by userspace so
/// that pinned state from another layout is never misread. 4: `SOCKET_STATE` is cloned into
/// accepted sockets (`BPF_F_CLONE`). 5: the event ring buffer is 2 MiB. 6: DNS answer records
/// end after their payload; their ring is 1 MiB.
pub const LAYOUT_VERSION: u32 = 6;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_is_the_ipv4_mapped_ipv6_address() {
        for octets in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [192, 0, 2, 255],
            [255, 255, 255, 255],
        ] {
            let mut expected = [0u8; 16];
            expected[..12].copy_from_slice(&V4_MAPPED_PREFIX);
            expected[12..].copy_from_slice(&octets);
            assert_eq!(v4_mapped(octets), expected, "{octets:?}");
        }
    }
}
