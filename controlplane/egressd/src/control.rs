//! The control socket: newline-delimited JSON requests from `egressctl`, root only.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use egressd_proto::{Request, Response, read_frame_async, write_frame_async};
use tokio::io::{BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::engine::Engine;
use crate::events::EventHub;

const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not read its answers for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Shared {
    pub engine: Mutex<Engine>,
    pub events: EventHub,
    /// Group whose members may use the control socket besides root.
    pub socket_group: Option<u32>,
    pub recorder: crate::recorder::Handle,
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
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(socket = %path.display(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("control socket: more than {MAX_CLIENTS} clients, refusing one");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                tracing::debug!("control client: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Root, or a member of the configured group (primary or supplementary, read from
/// /proc/PID/status of the peer as the kernel reported it at connect time).
fn peer_may_control(stream: &UnixStream, group: Option<u32>) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    if cred.uid() == 0 {
        return true;
    }
    let Some(group) = group else {
        return false;
    };
    if cred.gid() == group {
        return true;
    }
    let Some(pid) = cred.pid() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Groups:"))
            .is_some_and(|groups| {
                groups
                    .split_whitespace()
                    .any(|g| g.parse::<u32>() == Ok(group))
            })
    })
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

async fn handle(stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let allowed = peer_may_control(&stream, shared.socket_group);
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
        if !allowed {
            let message = "permission denied: only root (or members of egressd's --socket-group) \
                           may use the control socket"
                .to_owned();
            send(&mut writer, &Response::Error { message }).await?;
            return Ok(());
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
                let response = match lock(shared)?.reload() {
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
