//! Passing and receiving sockets with SCM_RIGHTS, and connecting a raw socket fd.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockaddrStorage, UnixAddr};

/// How long to wait for the sender to connect and send.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one connection on `listener` and returns the first file descriptor
/// passed over it with SCM_RIGHTS. Bounded; panics on timeout.
pub fn receive_fd(listener: &UnixListener) -> OwnedFd {
    let stream = accept_one(listener, "sender");
    stream
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let message = socket::recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("recvmsg with SCM_RIGHTS");
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in message.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors for us; each
            // is owned exactly once here.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    // `stream` closes when this returns: the sender sees EOF and exits.
    fds.into_iter()
        .next()
        .expect("the sender passed a file descriptor")
}

/// `connect()` on an existing socket fd.
pub fn connect_fd(fd: &OwnedFd, ip: IpAddr, port: u16) -> Result<(), Errno> {
    socket::connect(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(ip, port)),
    )
}

/// Accepts one connection on `listener` and passes `fd` over it with SCM_RIGHTS.
/// Bounded; panics on timeout.
pub fn send_fd(listener: &UnixListener, fd: &OwnedFd) {
    let stream = accept_one(listener, "receiver");
    let fds = [fd.as_raw_fd()];
    socket::sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(b"s")],
        &[socket::ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg with SCM_RIGHTS");
}

/// The first connection to `listener` within [`RECEIVE_TIMEOUT`], as a blocking stream;
/// panics naming the `peer` that never came.
fn accept_one(listener: &UnixListener, peer: &str) -> UnixStream {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("no {peer} connected within {RECEIVE_TIMEOUT:?}: {err}"),
        }
    };
    stream.set_nonblocking(false).expect("blocking stream");
    stream
}
