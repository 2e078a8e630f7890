//! Decoding the kernel's event records and reading them without blocking the datapath.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, RingBuf};
use egressd_common::event as raw;
use egressd_policy::{IPPROTO_TCP, IPPROTO_UDP, Mode};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{DatapathError, mode_from_raw};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    NewDestination,
    Denied,
    WouldDeny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    WouldDeny,
}

/// Why a verdict was reached (the kernel's reason codes, a versioned contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    AllowRule,
    NoRule,
    DenyList,
    RawSocket,
    Control,
    Inbound,
    Learning,
    Resolver,
    Fqdn,
    Unknown(u32),
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllowRule => "allow_rule",
            Reason::NoRule => "no_rule",
            Reason::DenyList => "deny_list",
            Reason::RawSocket => "raw_socket",
            Reason::Control => "control",
            Reason::Inbound => "inbound",
            Reason::Learning => "learning",
            Reason::Resolver => "resolver",
            Reason::Fqdn => "fqdn",
            Reason::Unknown(_) => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    Egress,
    SockCreate,
    Unknown(u32),
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::Egress => "egress",
            Hook::SockCreate => "sock_create",
            Hook::Unknown(_) => "unknown",
        }
    }
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub time: SystemTime,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    /// Workload id as given to `Datapath::apply`.
    pub workload: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// 1 stream, 2 datagram, 3 raw; 0 unknown.
    pub socket_type: u8,
    pub source: Option<IpAddr>,
    pub source_port: Option<u16>,
    /// None for a refused raw socket creation, which has no destination.
    pub destination: Option<IpAddr>,
    pub destination_port: Option<u16>,
    pub verdict: Verdict,
    pub reason: Reason,
    pub hook: Hook,
    pub mode: Mode,
}

fn address(bytes: [u8; 16], family: u8) -> Option<IpAddr> {
    if bytes == [0; 16] {
        return None;
    }
    let v6 = Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => Some(IpAddr::V4(v4)),
        _ => Some(IpAddr::V6(v6)),
    }
}

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    boot_offset: Option<SystemTime>,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0;
        let since_boot = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
        Clock {
            boot_offset: ok
                .then(|| SystemTime::now().checked_sub(since_boot))
                .flatten(),
        }
    }

    pub(crate) fn wall(&self, monotonic_ns: u64) -> SystemTime {
        match self.boot_offset {
            Some(boot) => boot + Duration::from_nanos(monotonic_ns),
            None => SystemTime::now(),
        }
    }
}

/// A task name from the kernel: up to 16 bytes, NUL-terminated when shorter.
pub(crate) fn comm_string(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

pub(crate) fn decode(bytes: &[u8], clock: &Clock) -> Result<Event, DatapathError> {
    if bytes.len() < size_of::<raw::Event>() {
        return Err(DatapathError::ShortEvent { len: bytes.len() });
    }
    // SAFETY: length checked; Event is plain old data; read_unaligned copes with alignment.
    let event: raw::Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = match event.kind {
        raw::EVENT_NEW_DESTINATION => EventKind::NewDestination,
        raw::EVENT_DENIED => EventKind::Denied,
        raw::EVENT_WOULD_DENY => EventKind::WouldDeny,
        other => return Err(DatapathError::UnknownEventKind { kind: other }),
    };
    let verdict = match event.verdict {
        raw::VERDICT_DENY => Verdict::Deny,
        raw::VERDICT_WOULD_DENY => Verdict::WouldDeny,
        _ => Verdict::Allow,
    };
    let reason = match event.reason {
        raw::REASON_ALLOW_RULE => Reason::AllowRule,
        raw::REASON_NO_RULE => Reason::NoRule,
        raw::REASON_DENY_LIST => Reason::DenyList,
        raw::REASON_RAW_SOCKET => Reason::RawSocket,
        raw::REASON_CONTROL => Reason::Control,
        raw::REASON_INBOUND => Reason::Inbound,
        raw::REASON_LEARNING => Reason::Learning,
        raw::REASON_RESOLVER => Reason::Resolver,
        raw::REASON_FQDN => Reason::Fqdn,
        other => Reason::Unknown(other),
    };
    let hook = match event.hook {
        raw::HOOK_CONNECT4 => Hook::Connect4,
        raw::HOOK_CONNECT6 => Hook::Connect6,
        raw::HOOK_SENDMSG4 => Hook::Sendmsg4,
        raw::HOOK_SENDMSG6 => Hook::Sendmsg6,
        raw::HOOK_EGRESS => Hook::Egress,
        raw::HOOK_SOCK_CREATE => Hook::SockCreate,
        other => Hook::Unknown(other),
    };
    let has_ports = matches!(event.protocol, IPPROTO_TCP | IPPROTO_UDP) && hook != Hook::SockCreate;
    let source = address(event.src_addr, event.family);
    Ok(Event {
        kind,
        time: clock.wall(event.timestamp_ns),
        cgroup_id: event.cgroup_id,
        tgid: event.tgid,
        tid: event.tid,
        comm: comm_string(&event.comm),
        workload: event.workload,
        protocol: event.protocol,
        socket_type: event.socket_type,
        source_port: (has_ports && source.is_some()).then_some(event.src_port),
        source,
        destination: address(event.dst_addr, event.family),
        destination_port: has_ports.then_some(event.dst_port),
        verdict,
        reason,
        hook,
        mode: mode_from_raw(event.mode),
    })
}

/// A kernel ring buffer read asynchronously. The kernel never waits for it: when it is full,
/// records are dropped and counted (`Counters`).
struct RingStream {
    ring: AsyncFd<RingBuf<MapData>>,
    clock: Clock,
}

impl RingStream {
    fn new(
        ring: RingBuf<MapData>,
        clock: Clock,
        what: &'static str,
    ) -> Result<Self, DatapathError> {
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
        // as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(
            |error| DatapathError::Io {
                what,
                source: error.into_parts().1,
            },
        )?;
        Ok(RingStream { ring, clock })
    }

    /// Decodes the records available now (at most `max`) into `out`, without waiting;
    /// returns how many could not be decoded.
    fn drain<T>(
        &mut self,
        out: &mut Vec<T>,
        max: usize,
        decode: fn(&[u8], &Clock) -> Result<T, DatapathError>,
    ) -> usize {
        let clock = self.clock;
        let ring = self.ring.get_mut();
        let mut undecodable = 0;
        for _ in 0..max {
            let Some(item) = ring.next() else { break };
            match decode(&item, &clock) {
                Ok(record) => out.push(record),
                Err(_) => undecodable += 1,
            }
        }
        undecodable
    }

    /// Waits for records and decodes every available one (at most `max`) into `out`.
    /// Returns how many records could not be decoded. The kernel wakes the reader only once
    /// a backlog builds up (`ring_wakeup` in the eBPF programs), so the ring is also read
    /// every [`RING_POLL_INTERVAL`]: a lone record waits at most that long.
    async fn next_batch<T>(
        &mut self,
        out: &mut Vec<T>,
        max: usize,
        decode: fn(&[u8], &Clock) -> Result<T, DatapathError>,
    ) -> Result<usize, DatapathError> {
        loop {
            let before = out.len();
            let undecodable = self.drain(out, max, decode);
            if out.len() > before || undecodable > 0 {
                return Ok(undecodable);
            }
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard.map_err(|source| DatapathError::Io {
                        what: "waiting for a ring buffer",
                        source,
                    })?;
                    // Read right after, at the top of the loop: a record written after
                    // this either wakes the reader again or is read on the next tick.
                    guard.clear_ready();
                }
                () = tokio::time::sleep(RING_POLL_INTERVAL) => {}
            }
        }
    }
}

/// How often the ring buffers are read when the kernel has not woken the reader.
pub const RING_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

pub struct EventStream(RingStream);

impl EventStream {
    pub(crate) fn new(ring: RingBuf<MapData>, clock: Clock) -> Result<Self, DatapathError> {
        RingStream::new(ring, clock, "registering the event ring buffer").map(EventStream)
    }

    /// Waits for events and appends every available one to `out` (at most `max`); returns
    /// how many records could not be decoded.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Event>,
        max: usize,
    ) -> Result<usize, DatapathError> {
        self.0.next_batch(out, max, decode).await
    }
}

/// A DNS answer (UDP from port 53) that a workload's socket received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub time: SystemTime,
    pub cgroup_id: u64,
    pub workload: u32,
    pub server: SocketAddr,
    pub client: SocketAddr,
    /// Length of the message on the wire; `payload` holds at most its first `DNS_PAYLOAD_MAX` bytes.
    pub message_len: usize,
    pub payload: Vec<u8>,
    /// The question name matched an FQDN rule of the workload.
    pub name_allowed: bool,
    /// Came over TCP.
    pub tcp: bool,
    /// Addresses the kernel allowed from it before the socket saw it.
    pub inserted: u32,
    /// The kernel created or changed no allow entry for it: every address it allowed was
    /// held with these rules already (see [`crate::Datapath::set_fqdn_address`]).
    pub entries_unchanged: bool,
    /// Not an answer: a query whose name no FQDN rule matches (`dns_queries =
    /// "allowlisted"`), refused (`Deny`) or reported (`WouldDeny`, audit mode). The payload
    /// is the query; `server` is the resolver it was for.
    pub refused_query: Option<Verdict>,
    /// For a refused query: the process and thread that created the socket, and its name
    /// (0 and empty for answers).
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
}

/// Decodes one record of the DNS ring: a `DnsAnswer` cut after its `payload_len` bytes of
/// payload.
pub(crate) fn decode_dns(bytes: &[u8], clock: &Clock) -> Result<DnsAnswer, DatapathError> {
    let payload = bytes
        .get(raw::DNS_ANSWER_HEADER_LEN..)
        .ok_or(DatapathError::ShortEvent { len: bytes.len() })?;
    let mut whole = [0u8; size_of::<raw::DnsAnswer>()];
    let kept = bytes.len().min(whole.len());
    whole[..kept].copy_from_slice(&bytes[..kept]);
    // SAFETY: `whole` is a DnsAnswer's size; DnsAnswer is plain old data, valid for any bytes;
    // read_unaligned copes with alignment.
    let answer: raw::DnsAnswer = unsafe { std::ptr::read_unaligned(whole.as_ptr().cast()) };
    let len = answer.payload_len as usize;
    if len > payload.len().min(raw::DNS_PAYLOAD_MAX) {
        return Err(DatapathError::ShortEvent { len: bytes.len() });
    }
    let unspecified = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    Ok(DnsAnswer {
        time: clock.wall(answer.timestamp_ns),
        cgroup_id: answer.cgroup_id,
        workload: answer.workload,
        server: SocketAddr::new(
            address(answer.server_addr, answer.family).unwrap_or(unspecified),
            answer.server_port,
        ),
        client: SocketAddr::new(
            address(answer.client_addr, answer.family).unwrap_or(unspecified),
            answer.client_port,
        ),
        message_len: answer.message_len as usize,
        payload: payload[..len].to_vec(),
        name_allowed: answer.flags & raw::DNS_ANSWER_NAME_ALLOWED != 0,
        tcp: answer.flags & raw::DNS_ANSWER_TCP != 0,
        inserted: answer.inserted,
        entries_unchanged: answer.flags & raw::DNS_ANSWER_ENTRIES_UNCHANGED != 0,
        refused_query: if answer.flags & raw::DNS_QUERY_REFUSED != 0 {
            Some(Verdict::Deny)
        } else if answer.flags & raw::DNS_QUERY_WOULD_REFUSE != 0 {
            Some(Verdict::WouldDeny)
        } else {
            None
        },
        pid: answer.tgid,
        tid: answer.tid,
        comm: comm_string(&answer.comm),
    })
}

/// DNS answers received by workloads, for FQDN rules.
pub struct DnsAnswerStream(RingStream);

impl DnsAnswerStream {
    pub(crate) fn new(ring: RingBuf<MapData>, clock: Clock) -> Result<Self, DatapathError> {
        RingStream::new(ring, clock, "registering the DNS answer ring buffer").map(DnsAnswerStream)
    }

    /// Waits for answers and appends every available one to `out` (at most `max`).
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<DnsAnswer>,
        max: usize,
    ) -> Result<usize, DatapathError> {
        self.0.next_batch(out, max, decode_dns).await
    }

    /// Appends the answers available now (at most `max`) without waiting; returns how many
    /// could not be decoded.
    pub fn drain(&mut self, out: &mut Vec<DnsAnswer>, max: usize) -> usize {
        self.0.drain(out, max, decode_dns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_bytes(event: &raw::Event) -> Vec<u8> {
        // SAFETY: Event is plain old data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const raw::Event).cast::<u8>(),
                size_of::<raw::Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_denied_ipv4_connect() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let event = raw::Event {
            kind: raw::EVENT_DENIED,
            verdict: raw::VERDICT_DENY,
            reason: raw::REASON_NO_RULE,
            hook: raw::HOOK_CONNECT6,
            mode: egressd_common::policy::MODE_STRICT,
            protocol: IPPROTO_TCP,
            family: 4,
            dst_addr: egressd_common::v4_mapped([127, 0, 0, 9]),
            dst_port: 80,
            comm,
            tgid: 42,
            workload: 3,
            ..Default::default()
        };
        let decoded = decode(&raw_bytes(&event), &Clock::new()).expect("decodes");
        assert_eq!(decoded.kind, EventKind::Denied);
        assert_eq!(decoded.destination, Some("127.0.0.9".parse().expect("ip")));
        assert_eq!(decoded.destination_port, Some(80));
        assert_eq!(decoded.comm, "curl");
        assert_eq!(decoded.hook, Hook::Connect6);
        assert_eq!(decoded.mode, Mode::Strict);
        assert_eq!(decoded.source, None);
    }

    #[test]
    fn short_and_unknown_records_are_errors_not_panics() {
        assert!(decode(&[0u8; 8], &Clock::new()).is_err());
        let event = raw::Event {
            kind: 99,
            ..Default::default()
        };
        assert!(decode(&raw_bytes(&event), &Clock::new()).is_err());
    }

    /// A DNS record as the kernel writes it: the header, then `payload` and nothing after.
    fn dns_record(payload: &[u8], payload_len: u32) -> Vec<u8> {
        let mut answer = raw::DnsAnswer {
            timestamp_ns: 0,
            cgroup_id: 7,
            workload: 3,
            payload_len,
            message_len: payload.len() as u32,
            server_port: 53,
            client_port: 40000,
            server_addr: egressd_common::v4_mapped([127, 0, 0, 53]),
            client_addr: egressd_common::v4_mapped([127, 0, 0, 1]),
            family: 4,
            protocol: 17,
            flags: raw::DNS_ANSWER_NAME_ALLOWED,
            inserted: 1,
            tgid: 0,
            tid: 0,
            comm: [0; 16],
            payload: [0; raw::DNS_PAYLOAD_MAX],
        };
        answer.payload[..payload.len()].copy_from_slice(payload);
        // SAFETY: DnsAnswer is plain old data without padding.
        let whole = unsafe {
            std::slice::from_raw_parts(
                (&answer as *const raw::DnsAnswer).cast::<u8>(),
                size_of::<raw::DnsAnswer>(),
            )
        };
        whole[..raw::DNS_ANSWER_HEADER_LEN + payload.len()].to_vec()
    }

    #[test]
    fn dns_records_end_after_their_payload() {
        let payload = [0xab; 100];
        let record = dns_record(&payload, 100);
        assert_eq!(record.len(), 196);
        let decoded = decode_dns(&record, &Clock::new()).expect("decodes");
        assert_eq!(decoded.payload, payload);
        assert_eq!(decoded.workload, 3);
        assert_eq!(decoded.server, "127.0.0.53:53".parse().expect("address"));
        assert!(decoded.name_allowed);
        assert_eq!(decoded.refused_query, None);
    }

    #[test]
    fn dns_records_shorter_than_they_claim_are_errors_not_panics() {
        // A payload length past the record's end.
        let record = dns_record(&[1; 10], 11);
        assert!(decode_dns(&record, &Clock::new()).is_err());
        // Cut inside the header.
        assert!(decode_dns(&record[..50], &Clock::new()).is_err());
        // A length past the largest payload the kernel copies.
        let mut long = dns_record(&[1; 10], 10);
        let at = core::mem::offset_of!(raw::DnsAnswer, payload_len);
        long[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_dns(&long, &Clock::new()).is_err());
    }
}
