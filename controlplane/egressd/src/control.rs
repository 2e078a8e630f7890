//! The control socket: newline-delimited JSON requests from `egressctl`. Who may send what
//! is decided in [`crate::access`].

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use egressd_proto::{Request, Response, read_frame_async, write_frame_async};
use tokio::io::{BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::access::{Access, Peer, Role};
use crate::engine::Engine;
use crate::events::EventHub;

const MAX_CLIENTS: usize = 64;
/// Of those, the slots that only root and members of `--socket-group` may take: readers
/// holding every other one (`egressctl events --follow`) never lock an operator out.
const CONTROL_ONLY_CLIENTS: usize = 16;
/// A client that sends nothing for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not read its answers for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Shared {
    pub engine: Mutex<Engine>,
    pub events: EventHub,
    /// Who may use the control socket, and for what.
    pub access: Access,
    /// One reload at a time: the file is parsed outside the engine's lock, and a reload that
    /// read an older file must not be installed after one that read a newer file.
    pub reload_serial: tokio::sync::Mutex<()>,
    pub recorder: crate::recorder::Handle,
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
    let shared_slots = Arc::new(Semaphore::new(MAX_CLIENTS - CONTROL_ONLY_CLIENTS));
    let control_slots = Arc::new(Semaphore::new(CONTROL_ONLY_CLIENTS));
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
        let Some(role) = peer.as_ref().and_then(|peer| shared.access.role(peer)) else {
            // Refused before a byte is read: an outsider costs no slot and no parsing.
            tracing::debug!(peer = ?peer, "control socket: refusing a client");
            tokio::spawn(refuse(stream, crate::access::refusal(peer.as_ref())));
            continue;
        };
        let slot = match role {
            Role::Control => control_slots
                .clone()
                .try_acquire_owned()
                .or_else(|_| shared_slots.clone().try_acquire_owned()),
            Role::Read => shared_slots.clone().try_acquire_owned(),
        };
        let Ok(slot) = slot else {
            tracing::warn!(?role, "control socket: too many clients, refusing one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Some(peer) = peer
                && let Err(e) = handle(stream, peer, &shared).await
            {
                tracing::debug!("control client: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Tells a client it may not use the socket, and closes the connection.
async fn refuse(stream: UnixStream, message: String) {
    let (_, write) = stream.into_split();
    let mut writer = BufWriter::new(write);
    let _ = send(&mut writer, &Response::Error { message }).await;
}

async fn send(
    writer: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>,
    response: &Response,
) -> anyhow::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write_frame_async(writer, response))
        .await
        .context("client did not read its answer")??;
    Ok(())
}

async fn handle(stream: UnixStream, peer: Peer, shared: &Shared) -> anyhow::Result<()> {
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    loop {
        let request =
            match tokio::time::timeout(IDLE_TIMEOUT, read_frame_async::<_, Request>(&mut reader))
                .await
            {
                Err(_) => return Ok(()),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(request))) => request,
                Ok(Err(e)) => {
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
                let response = match lock(shared)?.dns_report(workload.as_deref()) {
                    Ok(report) => Response::Dns(report),
                    Err(message) => Response::Error { message },
                };
                send(&mut writer, &response).await?;
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
                    loop {
                        match live.recv().await {
                            Ok(record) => send(&mut writer, &Response::Event(record)).await?,
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

fn lock(shared: &Shared) -> anyhow::Result<std::sync::MutexGuard<'_, Engine>> {
    shared
        .engine
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state is poisoned"))
}
