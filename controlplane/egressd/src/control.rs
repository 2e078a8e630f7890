//! The control socket: newline-delimited JSON requests from `egressctl`. Who may send what
//! is decided in [`crate::access`].

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use egressd_proto::{
    DNS_PART_BUDGET, MAX_REQUEST, ProtoError, Request, Response, read_frame_async_limited,
    write_frame_async,
};
use tokio::io::{AsyncBufReadExt as _, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::access::{Access, Peer};
use crate::clients::{Clients, Slot, Tracked};
use crate::engine::Engine;
use crate::events::EventHub;

/// A client that sends nothing for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request that has begun must arrive whole within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not read its answers for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused or evicted client is given to take its last message.
const PARTING_TIMEOUT: Duration = Duration::from_millis(500);
/// Refusals being written at once; beyond, a refused connection is closed without a word.
const MAX_REFUSALS: usize = 64;

pub struct Shared {
    pub engine: Mutex<Engine>,
    pub events: EventHub,
    /// Who may use the control socket, and for what.
    pub access: Access,
    /// One reload at a time: the file is parsed outside the engine's lock, and a reload that
    /// read an older file must not be installed after one that read a newer file.
    pub reload_serial: tokio::sync::Mutex<()>,
    pub recorder: crate::recorder::Handle,
    pub rings: RingSync,
}

/// Lets whoever reads what the daemon learns from the kernel's ring buffers (a flush of the
/// observations, which names flows after their DNS answers) have every record already in
/// the rings read first: the kernel wakes the daemon only for a backlog, so an answer can
/// otherwise wait a poll interval.
#[derive(Debug, Default)]
pub struct RingSync {
    read_now: tokio::sync::Notify,
    /// Requests so far, and the newest request whose records have been read.
    requested: std::sync::atomic::AtomicU64,
    served: std::sync::atomic::AtomicU64,
}

impl RingSync {
    /// Blocks until the ring reader has read everything the rings held when this was called,
    /// or `limit` has passed (the reader may be stuck behind the engine's lock).
    pub fn wait_until_read(&self, limit: std::time::Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.requested.fetch_add(1, SeqCst) + 1;
        self.read_now.notify_one();
        let deadline = std::time::Instant::now() + limit;
        // Bounded: at most `limit` in 1 ms steps.
        while self.served.load(SeqCst) < ticket && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Resolves when someone waits in [`RingSync::wait_until_read`].
    pub async fn requested(&self) {
        self.read_now.notified().await;
    }

    /// Called by the ring reader before it reads: the requests it will then have served.
    pub fn serving(&self) -> u64 {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Called by the ring reader once what it read is in the engine.
    pub fn served(&self, serving: u64) {
        self.served
            .fetch_max(serving, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reloads the policy file (SIGHUP, `egressctl reload`): it is read, parsed and its read group
/// resolved on a blocking thread while the daemon keeps answering; only installing it takes
/// the engine's lock. On any error the running policy stays in force.
pub async fn reload(shared: &Shared) -> Result<String, String> {
    let _serial = shared.reload_serial.lock().await;
    let path = lock(shared)
        .map_err(|e| e.to_string())?
        .config_path()
        .to_owned();
    let loaded = tokio::task::spawn_blocking(move || {
        let policy = egressd_policy::load(&path)?;
        let read_group = crate::access::resolve_read_group(&policy)?;
        Ok((policy, read_group))
    })
    .await
    .map_err(|e| format!("reloading: the parsing task failed: {e}"))?;
    let (loaded, read_group) = match loaded {
        Ok((policy, read_group)) => (Ok(policy), Some(read_group)),
        Err(error) => (Err(error), None),
    };
    let outcome = lock(shared).map_err(|e| e.to_string())?.reload(loaded);
    if let (Ok(_), Some(read_group)) = (&outcome, read_group) {
        shared.access.set_read_group(read_group);
    }
    outcome
}

/// Binds the socket: mode 0600 (0660 owned by `group` when one is configured), parent
/// created, a stale file from a dead daemon replaced, a live daemon's socket left alone.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another egressd is serving {} (stop it first, or pass --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, Some(0), Some(gid))
                .with_context(|| format!("giving {} to group {gid}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>, path: PathBuf) {
    let clients = Clients::new();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(socket = %path.display(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = Peer::of(&stream);
        let Some((peer, role)) = peer
            .clone()
            .and_then(|peer| shared.access.role(&peer).map(|role| (peer, role)))
        else {
            // Refused before a byte is read: an outsider costs no slot and no parsing.
            tracing::debug!(peer = ?peer, "control socket: refusing a client");
            refuse(stream, crate::access::refusal(peer.as_ref()), &refusals);
            continue;
        };
        let slot = match clients.admit(role) {
            Ok(slot) => slot,
            Err(full) => {
                tracing::warn!(
                    ?role,
                    uid = peer.uid,
                    clients = full.held,
                    "control socket: too many clients, refusing one"
                );
                refuse(stream, full.message(role), &refusals);
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer, &shared, &slot).await {
                tracing::debug!("control client: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Tells a client it may not use the socket (or not now), and closes the connection; at
/// most [`MAX_REFUSALS`] at once, each bounded in time.
fn refuse(stream: UnixStream, message: String, refusals: &Arc<Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let (_, write) = stream.into_split();
        let mut writer = BufWriter::new(write);
        let _ = tokio::time::timeout(
            PARTING_TIMEOUT,
            write_frame_async(&mut writer, &Response::Error { message }),
        )
        .await;
        drop(permit);
    });
}

async fn send(
    writer: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    response: &Response,
) -> anyhow::Result<()> {
    let written = tokio::time::timeout(WRITE_TIMEOUT, write_frame_async(writer, response))
        .await
        .context("client did not read its answer")?;
    let Err(ProtoError::FrameTooLarge { limit }) = written else {
        return Ok(written?);
    };
    // Nothing of it was written (frames are checked whole first): say why instead of
    // closing the connection without a word.
    let message = format!(
        "egressd's answer is larger than the control socket's limit of {} MiB per message",
        limit >> 20
    );
    tracing::warn!("control socket: {message}");
    tokio::time::timeout(
        WRITE_TIMEOUT,
        write_frame_async(writer, &Response::Error { message }),
    )
    .await
    .context("client did not read its answer")??;
    Ok(())
}

/// Tells an evicted client why the connection ends (if it takes the message at once).
async fn part(writer: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>) {
    let message = "disconnected: egressd needed this client's slot for another, and this one \
                   was idle"
        .to_owned();
    let _ = tokio::time::timeout(
        PARTING_TIMEOUT,
        write_frame_async(writer, &Response::Error { message }),
    )
    .await;
}

/// What waiting for the next request gave.
enum Next {
    Request(Request),
    /// The request could not be decoded; the connection goes on unless it is out of step.
    Bad(egressd_proto::ProtoError),
    /// End of stream, idle or request timeout, or eviction (already told).
    Leave,
}

/// Waits for the next request: at most [`IDLE_TIMEOUT`] for its first byte, then
/// [`REQUEST_TIMEOUT`] for the rest, at most [`MAX_REQUEST`] bytes, leaving at once when
/// the slot is needed by another client.
async fn next_request(
    reader: &mut BufReader<Tracked<tokio::net::unix::OwnedReadHalf>>,
    writer: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    slot: &Slot,
) -> anyhow::Result<Next> {
    slot.set_busy(false);
    let started = tokio::select! {
        () = slot.evicted() => {
            part(writer).await;
            return Ok(Next::Leave);
        }
        started = tokio::time::timeout(IDLE_TIMEOUT, reader.fill_buf()) => started,
    };
    match started {
        Err(_) => return Ok(Next::Leave),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok([])) => return Ok(Next::Leave),
        Ok(Ok(_)) => {}
    }
    let frame = tokio::select! {
        () = slot.evicted() => {
            part(writer).await;
            return Ok(Next::Leave);
        }
        frame = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_frame_async_limited::<_, Request>(reader, MAX_REQUEST),
        ) => frame,
    };
    slot.set_busy(true);
    Ok(match frame {
        Err(_) => {
            let message = format!(
                "bad request: incomplete after {}s (a request is one line of JSON)",
                REQUEST_TIMEOUT.as_secs()
            );
            let _ = send(writer, &Response::Error { message }).await;
            Next::Leave
        }
        Ok(Ok(Some(request))) => Next::Request(request),
        Ok(Ok(None)) => Next::Leave,
        Ok(Err(e)) => Next::Bad(e),
    })
}

async fn handle(
    stream: UnixStream,
    peer: Peer,
    shared: &Shared,
    slot: &Slot,
) -> anyhow::Result<()> {
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(Tracked::new(read, slot.tracker()));
    let mut writer = BufWriter::new(write);
    loop {
        let request = match next_request(&mut reader, &mut writer, slot).await? {
            Next::Leave => return Ok(()),
            Next::Request(request) => request,
            Next::Bad(e) => {
                // A bad frame gets an answer naming the problem; an oversized one ends the
                // connection because the stream is out of step.
                let oversized = matches!(e, egressd_proto::ProtoError::FrameTooLarge { .. });
                send(
                    &mut writer,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )
                .await?;
                if oversized {
                    return Ok(());
                }
                continue;
            }
        };
        // Judged by the rules in force now: a reload may have withdrawn the read group since
        // the client connected.
        let Some(role) = shared.access.role(&peer) else {
            let message = crate::access::refusal(Some(&peer));
            send(&mut writer, &Response::Error { message }).await?;
            return Ok(());
        };
        if let Err(message) = shared.access.check(role, &request) {
            tracing::info!(
                uid = peer.uid,
                request = request.kind(),
                "control socket: {message}"
            );
            send(&mut writer, &Response::Error { message }).await?;
            continue;
        }
        match request {
            Request::Status => {
                let mut report = lock(shared)?.status();
                report.observe = shared.recorder.status();
                report.events = Some(shared.events.limit_status());
                send(&mut writer, &Response::Status(Box::new(report))).await?;
            }
            Request::Flush => {
                let response = match shared.recorder.flush().await {
                    Ok(report) => Response::Flushed(report),
                    Err(message) => Response::Error { message },
                };
                send(&mut writer, &response).await?;
            }
            Request::Reload => {
                let response = match reload(shared).await {
                    Ok(message) => Response::Done { message },
                    Err(message) => Response::Error { message },
                };
                send(&mut writer, &response).await?;
            }
            Request::SetMode { mode, workload } => {
                let response = match lock(shared)?.set_mode(mode, workload.as_deref()) {
                    Ok(message) => Response::Done { message },
                    Err(message) => Response::Error { message },
                };
                send(&mut writer, &response).await?;
            }
            Request::Dns { workload } => {
                let frames = match lock(shared)?.dns_report(workload.as_deref()) {
                    Ok(report) => report.into_frames(DNS_PART_BUDGET),
                    Err(message) => vec![Response::Error { message }],
                };
                for frame in &frames {
                    send(&mut writer, frame).await?;
                }
            }
            Request::Events { follow, limit } => {
                // Subscribe before reading the backlog so nothing falls in between.
                let mut live = follow.then(|| shared.events.subscribe());
                for record in shared
                    .events
                    .recent(limit.unwrap_or(crate::events::BACKLOG))
                {
                    send(&mut writer, &Response::Event(record)).await?;
                }
                if let Some(live) = live.as_mut() {
                    // Between events the follower counts as idle: it may be disconnected to
                    // make room, and it is noticed when it goes away even if no event comes.
                    slot.set_busy(false);
                    loop {
                        let received = tokio::select! {
                            () = slot.evicted() => {
                                part(&mut writer).await;
                                return Ok(());
                            }
                            gone = follower_gone(&mut reader) => {
                                if gone {
                                    return Ok(());
                                }
                                continue;
                            }
                            received = live.recv() => received,
                        };
                        match received {
                            Ok(record) => {
                                slot.set_busy(true);
                                send(&mut writer, &Response::Event(record)).await?;
                                slot.set_busy(false);
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                                tracing::warn!("events follower too slow, skipped {missed} events");
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        }
                    }
                }
                send(&mut writer, &Response::EndOfEvents).await?;
            }
        }
    }
}

/// While following events: true when the client closed the connection; bytes it sends
/// meanwhile are read and dropped (false).
async fn follower_gone(reader: &mut BufReader<Tracked<tokio::net::unix::OwnedReadHalf>>) -> bool {
    match reader.fill_buf().await {
        Ok([]) | Err(_) => true,
        Ok(bytes) => {
            let len = bytes.len();
            reader.consume(len);
            false
        }
    }
}

fn lock(shared: &Shared) -> anyhow::Result<std::sync::MutexGuard<'_, Engine>> {
    shared
        .engine
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state is poisoned"))
}
