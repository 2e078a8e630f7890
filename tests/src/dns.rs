//! DNS for the FQDN tests: a real resolver (Debian's dnsmasq) answering what the
//! test chose, a fake resolver in the test process (which sees each query and
//! answers it by hand, with forged or malformed packets when the test wants),
//! and builders of DNS messages.
//!
//! Every resolver listens on port 53 of a loopback address (`127.0.53.N`):
//! egressd only counts answers that come from port 53 of a configured resolver.
//! Every answer names addresses in 127.0.0.0/8 or `::1`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tempfile::TempDir;

/// Where Debian's dnsmasq-base puts the binary (scripts/setup-toolchain.sh installs it).
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// The port every resolver of the tests listens on (egressd only counts answers from it).
pub const DNS_PORT: u16 = 53;
/// How long dnsmasq may take to answer its first query.
const DNSMASQ_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dnsmasq has to exit after SIGTERM before it gets SIGKILL.
const DNSMASQ_STOP_TIMEOUT: Duration = Duration::from_secs(5);

fn loopback_v4(addr: &str) -> Ipv4Addr {
    let ip: Ipv4Addr = addr
        .parse()
        .unwrap_or_else(|err| panic!("bad resolver address {addr:?}: {err}"));
    assert!(
        ip.is_loopback(),
        "{ip} is not in 127.0.0.0/8: the tests only talk to loopback addresses"
    );
    ip
}

fn assert_loopback(ip: IpAddr) {
    assert!(
        ip.is_loopback() || ip.to_canonical().is_loopback(),
        "{ip} is not a loopback address: test answers only name 127.0.0.0/8 and ::1"
    );
}

/// What a [`Dnsmasq`] answers; [`DnsmasqBuilder::start`] runs it.
#[derive(Debug, Clone)]
pub struct DnsmasqBuilder {
    listen: Ipv4Addr,
    /// Lines of the `--addn-hosts` file: `ADDRESS NAME`.
    hosts: String,
    /// `--host-record=NAME,ADDRESS`.
    host_records: Vec<(String, IpAddr)>,
    /// `--cname=ALIAS,TARGET`.
    cnames: Vec<(String, String)>,
    local_ttl: Option<u32>,
    /// `--local=/DOMAIN/`.
    local_domains: Vec<String>,
    /// `--log-queries` (default on; a flood would write hundreds of megabytes).
    log_queries: bool,
}

impl DnsmasqBuilder {
    /// An A (or AAAA, for `::1`) record from the hosts file.
    pub fn host(mut self, name: &str, addr: &str) -> DnsmasqBuilder {
        let ip: IpAddr = addr
            .parse()
            .unwrap_or_else(|err| panic!("bad address {addr:?}: {err}"));
        assert_loopback(ip);
        let _ = writeln!(self.hosts, "{ip} {name}");
        self
    }

    /// Many hosts at once (`(name, address)`), written straight into the hosts file.
    pub fn hosts<I, N>(mut self, entries: I) -> DnsmasqBuilder
    where
        I: IntoIterator<Item = (N, IpAddr)>,
        N: AsRef<str>,
    {
        for (name, ip) in entries {
            assert_loopback(ip);
            let _ = writeln!(self.hosts, "{ip} {}", name.as_ref());
        }
        self
    }

    /// `--host-record=NAME,ADDRESS` (v4 or v6).
    pub fn host_record(mut self, name: &str, addr: &str) -> DnsmasqBuilder {
        let ip: IpAddr = addr
            .parse()
            .unwrap_or_else(|err| panic!("bad address {addr:?}: {err}"));
        assert_loopback(ip);
        self.host_records.push((name.to_owned(), ip));
        self
    }

    /// `--cname=ALIAS,TARGET`: TARGET must be a host of this resolver.
    pub fn cname(mut self, alias: &str, target: &str) -> DnsmasqBuilder {
        self.cnames.push((alias.to_owned(), target.to_owned()));
        self
    }

    /// Without `--log-queries`: for floods of queries.
    pub fn without_query_log(mut self) -> DnsmasqBuilder {
        self.log_queries = false;
        self
    }

    /// `--local-ttl=SECS`: the TTL of every answer (dnsmasq's default is 0).
    /// Answers for names under `domain` come from this resolver alone: names it does not
    /// know get NXDOMAIN (instead of REFUSED for want of an upstream), as an authoritative
    /// server's would.
    pub fn local_domain(mut self, domain: &str) -> DnsmasqBuilder {
        self.local_domains.push(domain.to_owned());
        self
    }

    pub fn local_ttl(mut self, secs: u32) -> DnsmasqBuilder {
        self.local_ttl = Some(secs);
        self
    }

    /// Starts dnsmasq in the foreground and waits (at most 10 s) until it answers.
    pub fn start(self) -> Dnsmasq {
        assert!(
            Path::new(DNSMASQ).is_file(),
            "{DNSMASQ} is missing: install dnsmasq-base (scripts/setup-toolchain.sh does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("egressd-test-dnsmasq-")
            .tempdir()
            .expect("create a temporary directory for dnsmasq");
        let hosts = dir.path().join("hosts");
        let log = dir.path().join("dnsmasq.log");
        let stderr = dir.path().join("dnsmasq.stderr");
        fs::write(&hosts, &self.hosts).expect("write the dnsmasq hosts file");
        let mut command = Command::new(DNSMASQ);
        command
            .arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-negcache")
            .arg("--bind-interfaces")
            .arg(format!("--listen-address={}", self.listen))
            .arg(format!("--port={DNS_PORT}"))
            .arg("--pid-file=")
            // Stays root: the hosts file lives in a private temporary directory.
            .arg("--user=root")
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--log-facility={}", log.display()));
        if self.log_queries {
            command.arg("--log-queries");
        }
        if let Some(ttl) = self.local_ttl {
            command.arg(format!("--local-ttl={ttl}"));
        }
        for (name, ip) in &self.host_records {
            command.arg(format!("--host-record={name},{ip}"));
        }
        for (alias, target) in &self.cnames {
            command.arg(format!("--cname={alias},{target}"));
        }
        for domain in &self.local_domains {
            command.arg(format!("--local=/{domain}/"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("create the dnsmasq stderr file"))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {DNSMASQ}: {err}"));
        let mut dnsmasq = Dnsmasq {
            child: Some(child),
            addr: self.listen,
            log,
            stderr,
            _dir: dir,
            command: format!("{command:?}"),
        };
        dnsmasq.wait_ready();
        dnsmasq
    }
}

/// A dnsmasq serving the test's names on `ADDR:53`, killed (and its files removed)
/// when dropped.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Option<Child>,
    addr: Ipv4Addr,
    log: PathBuf,
    stderr: PathBuf,
    command: String,
    _dir: TempDir,
}

impl Dnsmasq {
    /// A resolver on `listen:53` (a loopback address such as `127.0.53.1`) with no names
    /// yet; add them with the builder's methods.
    pub fn builder(listen: &str) -> DnsmasqBuilder {
        DnsmasqBuilder {
            listen: loopback_v4(listen),
            hosts: String::new(),
            host_records: Vec::new(),
            cnames: Vec::new(),
            local_ttl: None,
            local_domains: Vec::new(),
            log_queries: true,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    /// dnsmasq's log (queries and answers, `--log-queries`) and stderr so far.
    pub fn logs(&self) -> String {
        let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
        format!(
            "----- dnsmasq log -----\n{}----- dnsmasq stderr -----\n{}----- end of dnsmasq output -----",
            read(&self.log),
            read(&self.stderr)
        )
    }

    /// Polls with a query (every 50 ms, at most 10 s) until dnsmasq answers (it reads its
    /// hosts file before it answers anything).
    fn wait_ready(&mut self) {
        let server = SocketAddr::new(IpAddr::V4(self.addr), DNS_PORT);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "dnsmasq exited with {status} before it answered: {}\n{}",
                    self.command,
                    self.logs()
                );
            }
            let last = match udp_exchange(
                server,
                "ready.egressd-test",
                RecordType::A,
                Duration::from_millis(200),
            ) {
                Ok(_) => return,
                Err(err) => err,
            };
            if started.elapsed() > DNSMASQ_READY_TIMEOUT {
                panic!(
                    "dnsmasq on {server} did not answer within {DNSMASQ_READY_TIMEOUT:?} ({last}): {}\n{}",
                    self.command,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + DNSMASQ_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        if thread::panicking() {
            eprintln!("dnsmasq on {}:\n{}", self.addr, self.logs());
        }
    }
}

/// One query over UDP from the test process (in no workload) and its answer, decoded.
pub fn udp_exchange(
    server: SocketAddr,
    name: &str,
    kind: RecordType,
    timeout: Duration,
) -> Result<Message, String> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let socket = UdpSocket::bind(local).map_err(|err| format!("bind: {err}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|err| format!("setsockopt: {err}"))?;
    let id = 0x5eed;
    socket
        .send_to(&query_bytes(id, name, kind), server)
        .map_err(|err| format!("send to {server}: {err}"))?;
    let mut buf = [0u8; 4096];
    let (len, _) = socket
        .recv_from(&mut buf)
        .map_err(|err| format!("no answer from {server}: {err}"))?;
    Message::from_vec(&buf[..len]).map_err(|err| format!("bad answer from {server}: {err}"))
}

/// One query over TCP (two-byte length prefix) from the test process.
pub fn tcp_exchange(server: SocketAddr, name: &str, kind: RecordType) -> Result<Message, String> {
    let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(2))
        .map_err(|err| format!("connect to {server}: {err}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|err| format!("setsockopt: {err}"))?;
    let query = query_bytes(0x7cb, name, kind);
    let mut framed = u16::try_from(query.len())
        .expect("a query fits 64 KiB")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&query);
    stream
        .write_all(&framed)
        .map_err(|err| format!("send: {err}"))?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .map_err(|err| format!("read length: {err}"))?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut message)
        .map_err(|err| format!("read answer: {err}"))?;
    Message::from_vec(&message).map_err(|err| format!("bad answer: {err}"))
}

/// The A and AAAA addresses of a decoded answer, in order.
pub fn answer_addresses(message: &Message) -> Vec<IpAddr> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

fn name(text: &str) -> Name {
    let mut name = Name::from_ascii(text).unwrap_or_else(|err| panic!("bad name {text:?}: {err}"));
    name.set_fqdn(true);
    name
}

/// A standard query (RD set) for `name` of type `kind`.
pub fn query_bytes(id: u16, qname: &str, kind: RecordType) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name(qname), kind));
    message.to_vec().expect("encode a DNS query")
}

/// One record of an answer built by [`answer_bytes`].
#[derive(Debug, Clone)]
pub enum AnswerRecord {
    /// `owner`, TTL, address (A for v4, AAAA for v6).
    Address(String, u32, IpAddr),
    /// `owner`, TTL, target.
    Cname(String, u32, String),
}

impl AnswerRecord {
    pub fn address(owner: &str, ttl: u32, addr: &str) -> AnswerRecord {
        let ip: IpAddr = addr
            .parse()
            .unwrap_or_else(|err| panic!("bad address {addr:?}: {err}"));
        assert_loopback(ip);
        AnswerRecord::Address(owner.to_owned(), ttl, ip)
    }

    pub fn cname(owner: &str, ttl: u32, target: &str) -> AnswerRecord {
        AnswerRecord::Cname(owner.to_owned(), ttl, target.to_owned())
    }
}

/// A response (QR, AA, RD, RA) with id `id`, the question `qname`/`kind` and `records`
/// in the answer section. Owner names are compressed, as resolvers send them.
pub fn answer_bytes(id: u16, qname: &str, kind: RecordType, records: &[AnswerRecord]) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Response, OpCode::Query);
    message.metadata.authoritative = true;
    message.metadata.recursion_desired = true;
    message.metadata.recursion_available = true;
    message.add_query(Query::query(name(qname), kind));
    for record in records {
        let record = match record {
            AnswerRecord::Address(owner, ttl, IpAddr::V4(v4)) => {
                Record::from_rdata(name(owner), *ttl, RData::A(A(*v4)))
            }
            AnswerRecord::Address(owner, ttl, IpAddr::V6(v6)) => {
                Record::from_rdata(name(owner), *ttl, RData::AAAA(AAAA(*v6)))
            }
            AnswerRecord::Cname(owner, ttl, target) => {
                Record::from_rdata(name(owner), *ttl, RData::CNAME(CNAME(name(target))))
            }
        };
        message.add_answer(record);
    }
    message.to_vec().expect("encode a DNS answer")
}

/// A query a [`FakeResolver`] received.
#[derive(Debug, Clone)]
pub struct ReceivedQuery {
    /// The socket that sent it: where answers go.
    pub from: SocketAddr,
    pub id: u16,
    /// As sent, without the trailing dot.
    pub name: String,
    pub kind: RecordType,
    pub bytes: Vec<u8>,
}

/// A resolver played by the test process: a UDP socket on `ADDR:53` that hands each
/// query to the test, which answers (or not) with whatever bytes it likes. List its
/// address in `dns.resolvers` and the kernel counts its answers like a real resolver's.
#[derive(Debug)]
pub struct FakeResolver {
    pub socket: UdpSocket,
    pub addr: Ipv4Addr,
}

impl FakeResolver {
    /// Binds `addr:53` (root).
    pub fn bind(addr: &str) -> FakeResolver {
        let ip = loopback_v4(addr);
        let socket = UdpSocket::bind((ip, DNS_PORT))
            .unwrap_or_else(|err| panic!("cannot bind {ip}:{DNS_PORT} (udp): {err}"));
        FakeResolver { socket, addr: ip }
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    /// Waits (at most `timeout`) for the next query; panics when none comes or it does
    /// not decode.
    pub fn recv_query(&self, timeout: Duration) -> ReceivedQuery {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("set the fake resolver's read timeout");
        let mut buf = [0u8; 4096];
        let (len, from) = self.socket.recv_from(&mut buf).unwrap_or_else(|err| {
            panic!(
                "the fake resolver on {}:53 got no query within {timeout:?}: {err}",
                self.addr
            )
        });
        let bytes = buf[..len].to_vec();
        let message = Message::from_vec(&bytes)
            .unwrap_or_else(|err| panic!("the fake resolver got a bad query ({err}): {bytes:?}"));
        let query = message
            .queries
            .first()
            .unwrap_or_else(|| panic!("the fake resolver got a query without a question"));
        let mut name = query.name().to_ascii();
        if name.ends_with('.') {
            name.pop();
        }
        ReceivedQuery {
            from,
            id: message.metadata.id,
            name,
            kind: query.query_type(),
            bytes,
        }
    }

    /// Sends `bytes` from `addr:53` to `to`.
    pub fn send(&self, bytes: &[u8], to: SocketAddr) {
        self.socket
            .send_to(bytes, to)
            .unwrap_or_else(|err| panic!("the fake resolver cannot send to {to}: {err}"));
    }
}

/// Raw DNS wire pieces, for malformed messages hickory would refuse to build.
pub mod wire {
    /// A header: id, flags (`0x8180`: a response, RD, RA, NOERROR) and the four counts.
    pub fn header(id: u16, flags: u16, questions: u16, answers: u16) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&questions.to_be_bytes());
        out.extend_from_slice(&answers.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    }

    /// Flags of a normal response.
    pub const RESPONSE: u16 = 0x8180;

    /// `name` in uncompressed wire form (labels, then the zero byte).
    pub fn name(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.trim_end_matches('.').split('.') {
            out.push(u8::try_from(label.len()).expect("a label fits 63 bytes"));
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A question: name, type, class IN.
    pub fn question(qname: &str, kind: u16) -> Vec<u8> {
        let mut out = name(qname);
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out
    }

    /// A record after its owner name: type, class IN, TTL, rdlength, rdata.
    pub fn record_tail(kind: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(
            &u16::try_from(rdata.len())
                .expect("rdata fits 64 KiB")
                .to_be_bytes(),
        );
        out.extend_from_slice(rdata);
        out
    }

    /// A compression pointer to `offset`.
    pub fn pointer(offset: u16) -> [u8; 2] {
        (0xc000 | offset).to_be_bytes()
    }

    pub const TYPE_A: u16 = 1;
    pub const TYPE_CNAME: u16 = 5;
    pub const TYPE_TXT: u16 = 16;
    pub const TYPE_AAAA: u16 = 28;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_answers_decode_with_their_records() {
        let bytes = answer_bytes(
            7,
            "alias.test",
            RecordType::A,
            &[
                AnswerRecord::cname("alias.test", 30, "target.test"),
                AnswerRecord::address("target.test", 30, "127.0.0.9"),
            ],
        );
        let message = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(message.metadata.id, 7);
        assert_eq!(
            answer_addresses(&message),
            vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]
        );
    }

    #[test]
    fn wire_pieces_match_hickory() {
        let mut raw = wire::header(9, 0x0100, 1, 0);
        raw.extend(wire::question("a.test", wire::TYPE_A));
        assert_eq!(raw, query_bytes(9, "a.test", RecordType::A));
    }
}
