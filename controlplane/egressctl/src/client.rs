//! A blocking connection to the daemon's control socket.

use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use egressd_proto::{ProtoError, Request, Response, read_frame, write_frame};

/// How long to wait for an answer, except while following events and reloading.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long `reload` waits: the daemon parses, compiles and writes a policy of 100,000 rules
/// in a few seconds, more on a node whose CPUs are busy, and giving up early would leave the
/// operator believing a reload failed that is still going on.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The daemon refused the request (`Response::Error`); its message is the
/// whole story.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(pub String);

pub struct Client {
    path: PathBuf,
    read_timeout: Option<Duration>,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to `path`; `read_timeout` bounds every wait for a frame
    /// (`None`: wait forever).
    pub fn connect(path: &Path, read_timeout: Option<Duration>) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|err| {
            anyhow!(
                "cannot connect to {}: {}{}",
                path.display(),
                os_message(&err),
                hint(&err)
            )
        })?;
        stream
            .set_read_timeout(read_timeout)
            .context("setting the socket read timeout")?;
        stream
            .set_write_timeout(Some(TIMEOUT))
            .context("setting the socket write timeout")?;
        let writer = stream.try_clone().context("cloning the socket")?;
        Ok(Client {
            path: path.to_owned(),
            read_timeout,
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let Err(err) = write_frame(&mut self.writer, request) else {
            return Ok(());
        };
        // The daemon refuses a client it does not admit before reading its request, and closes
        // the connection: writing may then fail, but its answer is there to read.
        if let Ok(Some(Response::Error { message })) = read_frame(&mut self.reader) {
            return Err(DaemonError(message).into());
        }
        Err(self.describe(err))
            .with_context(|| format!("sending to egressd at {}", self.path.display()))
    }

    /// The next frame; `None` when the daemon closed the connection.
    pub fn receive(&mut self) -> anyhow::Result<Option<Response>> {
        read_frame(&mut self.reader)
            .map_err(|err| self.describe(err))
            .with_context(|| format!("reading from egressd at {}", self.path.display()))
    }

    /// Sends `request` and returns the single answer.
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Response> {
        self.send(request)?;
        self.receive()?
            .ok_or_else(|| anyhow!("egressd closed the connection without answering"))
    }

    /// Sends `request`, expecting `Done` (its message) or `Error`.
    pub fn call_for_message(&mut self, request: &Request) -> anyhow::Result<String> {
        match self.call(request)? {
            Response::Done { message } => Ok(message),
            other => Err(unexpected(other)),
        }
    }

    /// Turns a timeout into words; other errors pass through.
    fn describe(&self, err: ProtoError) -> anyhow::Error {
        match err {
            ProtoError::Io(io_err)
                if matches!(
                    io_err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let waited = self.read_timeout.unwrap_or(TIMEOUT);
                anyhow!("no answer within {} s", waited.as_secs())
            }
            other => other.into(),
        }
    }
}

/// The error for a response that does not fit the request: the daemon's own
/// error, or a protocol mismatch.
pub fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message } => DaemonError(message).into(),
        other => anyhow!("unexpected answer from egressd: {}", kind(&other)),
    }
}

fn kind(response: &Response) -> &'static str {
    match response {
        Response::Status(_) => "status",
        Response::Done { .. } => "done",
        Response::Error { .. } => "error",
        Response::Event(_) => "event",
        Response::EndOfEvents => "end_of_events",
        Response::DnsNames { .. } => "dns_names",
        Response::Dns(_) => "dns",
        Response::Flushed(_) => "flushed",
    }
}

/// `No such file or directory`, without the ` (os error 2)` suffix.
fn os_message(err: &io::Error) -> String {
    let message = err.to_string();
    match message.rfind(" (os error ") {
        Some(at) if message.ends_with(')') => message[..at].to_owned(),
        _ => message,
    }
}

fn hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => " (is egressd running?)",
        io::ErrorKind::PermissionDenied => {
            " (run egressctl as root, or as a member of egressd's --socket-group or of the \
             policy's [control] read_group)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_name_the_socket_and_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.sock");
        let err = Client::connect(&path, Some(TIMEOUT))
            .err()
            .expect("no daemon");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to {}: No such file or directory (is egressd running?)",
                path.display()
            )
        );
    }

    #[test]
    fn os_error_suffix_is_dropped() {
        let err = io::Error::from_raw_os_error(111);
        assert_eq!(os_message(&err), "Connection refused");
        let err = io::Error::other("plain");
        assert_eq!(os_message(&err), "plain");
    }

    #[test]
    fn daemon_errors_keep_their_message() {
        let err = unexpected(Response::Error {
            message: "no workload named \"x\"".into(),
        });
        assert!(err.downcast_ref::<DaemonError>().is_some());
        assert_eq!(err.to_string(), "no workload named \"x\"");
        let err = unexpected(Response::EndOfEvents);
        assert_eq!(
            err.to_string(),
            "unexpected answer from egressd: end_of_events"
        );
    }
}
