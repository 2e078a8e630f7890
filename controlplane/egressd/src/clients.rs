//! The control socket's client slots: how many clients it serves at once, which ones make
//! room for a new one, and the refusal when none can.
//!
//! [`MAX_CLIENTS`] clients at once, of which [`CONTROL_ONLY_CLIENTS`] only root and the
//! socket group may take: readers holding every other slot never lock an operator out.
//! When every slot a newcomer may take is held, the client that has been idle longest
//! (waiting for a request, or following events with nothing to send, for at least
//! [`EVICTABLE_AFTER`]) is disconnected to make room: a leaked connection, a client that
//! connects and never sends, or a stuck follower cannot keep `egressctl status` out. A
//! newcomer that finds no such client is refused with a message saying so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::access::Role;

pub const MAX_CLIENTS: usize = 64;
/// Of those, the slots that only root and members of `--socket-group` may take.
pub const CONTROL_ONLY_CLIENTS: usize = 16;
/// A client idle this long may be disconnected to make room for a new one.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pool {
    /// Root and the socket group only.
    Control,
    /// Anyone the daemon admits.
    Shared,
}

impl Pool {
    fn size(self) -> usize {
        match self {
            Pool::Control => CONTROL_ONLY_CLIENTS,
            Pool::Shared => MAX_CLIENTS - CONTROL_ONLY_CLIENTS,
        }
    }
}

/// What a connected client is doing, shared between its task and the registry.
#[derive(Debug)]
struct State {
    /// Milliseconds since the registry's epoch of the last sign of life: a byte received,
    /// a request answered, an event sent.
    active_at: AtomicU64,
    /// Handling a request or writing to the client: never disconnected to make room then.
    busy: AtomicBool,
    evict: Notify,
}

#[derive(Debug)]
struct Entry {
    pool: Pool,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    used: HashMap<Pool, usize>,
}

/// The slots of the control socket.
#[derive(Debug)]
pub struct Clients {
    epoch: Instant,
    table: Mutex<Table>,
}

/// Every slot the newcomer may take is held by a client that is busy or was active
/// recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub held: usize,
}

impl Full {
    pub fn message(self, role: Role) -> String {
        let reserved = match role {
            Role::Control => String::new(),
            Role::Read => format!(
                " ({CONTROL_ONLY_CLIENTS} of {MAX_CLIENTS} slots are kept for root and the socket \
                 group)"
            ),
        };
        format!(
            "egressd is serving {} control clients, the most it takes at once{reserved}, and \
             none has been idle for {}s to make room: try again",
            self.held,
            EVICTABLE_AFTER.as_secs()
        )
    }
}

/// A slot held by one client; released when dropped.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    state: Arc<State>,
    clients: Arc<Clients>,
}

impl Clients {
    pub fn new() -> Arc<Clients> {
        Arc::new(Clients {
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A slot for a client of `role`: a free one, or one taken from the client idle the
    /// longest (which is told to leave).
    pub fn admit(self: &Arc<Self>, role: Role) -> Result<Slot, Full> {
        let now = self.now_ms();
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let pools: &[Pool] = match role {
            Role::Control => &[Pool::Control, Pool::Shared],
            Role::Read => &[Pool::Shared],
        };
        let free = pools
            .iter()
            .copied()
            .find(|pool| table.used.get(pool).copied().unwrap_or(0) < pool.size());
        let pool = match free {
            Some(pool) => pool,
            None => {
                let evictable_ms = u64::try_from(EVICTABLE_AFTER.as_millis()).unwrap_or(0);
                let victim = table
                    .entries
                    .iter()
                    .filter(|(_, entry)| pools.contains(&entry.pool))
                    .filter(|(_, entry)| !entry.state.busy.load(Ordering::Relaxed))
                    .map(|(&id, entry)| (entry.state.active_at.load(Ordering::Relaxed), id))
                    .filter(|&(active_at, _)| now.saturating_sub(active_at) >= evictable_ms)
                    .min();
                let Some((_, id)) = victim else {
                    return Err(Full {
                        held: table.entries.len(),
                    });
                };
                let Some(entry) = table.entries.remove(&id) else {
                    return Err(Full {
                        held: table.entries.len(),
                    });
                };
                // Its slot is the newcomer's now; its task leaves when it sees the notice.
                entry.state.evict.notify_one();
                *table.used.entry(entry.pool).or_default() -= 1;
                entry.pool
            }
        };
        let state = Arc::new(State {
            active_at: AtomicU64::new(now),
            busy: AtomicBool::new(false),
            evict: Notify::new(),
        });
        table.next_id += 1;
        let id = table.next_id;
        table.entries.insert(
            id,
            Entry {
                pool,
                state: state.clone(),
            },
        );
        *table.used.entry(pool).or_default() += 1;
        Ok(Slot {
            id,
            state,
            clients: self.clone(),
        })
    }

    /// Clients holding a slot now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries
            .len()
    }
}

impl Slot {
    /// The client showed a sign of life.
    pub fn active(&self) {
        self.state
            .active_at
            .store(self.clients.now_ms(), Ordering::Relaxed);
    }

    /// The client is being served (true) or waits (false); both are signs of life.
    pub fn set_busy(&self, busy: bool) {
        self.active();
        self.state.busy.store(busy, Ordering::Relaxed);
    }

    /// Completes when the slot was given to another client: the connection must end.
    pub async fn evicted(&self) {
        self.state.evict.notified().await;
    }

    /// A shared clock for [`Tracked`] readers.
    pub fn tracker(&self) -> Tracker {
        Tracker {
            state: self.state.clone(),
            clients: self.clients.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self
            .clients
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Absent when it was evicted: the slot already went to another client.
        if let Some(entry) = table.entries.remove(&self.id) {
            *table.used.entry(entry.pool).or_default() -= 1;
        }
    }
}

/// Marks a client active whenever bytes arrive from it.
#[derive(Debug, Clone)]
pub struct Tracker {
    state: Arc<State>,
    clients: Arc<Clients>,
}

/// A reader that counts every byte received as a sign of life of its client.
pub struct Tracked<R> {
    inner: R,
    tracker: Tracker,
}

impl<R> Tracked<R> {
    pub fn new(inner: R, tracker: Tracker) -> Self {
        Tracked { inner, tracker }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.tracker
                .state
                .active_at
                .store(self.tracker.clients.now_ms(), Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_leave_the_control_slots_free() {
        let clients = Clients::new();
        let readers: Vec<Slot> = (0..MAX_CLIENTS - CONTROL_ONLY_CLIENTS)
            .map(|_| {
                let slot = clients.admit(Role::Read).expect("a shared slot");
                slot.set_busy(true);
                slot
            })
            .collect();
        let full = clients
            .admit(Role::Read)
            .expect_err("the shared slots are taken");
        assert!(
            full.message(Role::Read).contains("kept for root"),
            "{full:?}"
        );
        let operators: Vec<Slot> = (0..CONTROL_ONLY_CLIENTS)
            .map(|_| clients.admit(Role::Control).expect("a control slot"))
            .collect();
        assert_eq!(clients.held(), MAX_CLIENTS);
        drop(readers);
        assert_eq!(clients.held(), CONTROL_ONLY_CLIENTS);
        drop(operators);
        assert_eq!(clients.held(), 0);
    }

    #[tokio::test]
    async fn the_longest_idle_client_makes_room() {
        let clients = Clients::new();
        let slots: Vec<Slot> = (0..MAX_CLIENTS)
            .map(|_| clients.admit(Role::Control).expect("a slot"))
            .collect();
        // Nobody has been idle long enough yet.
        assert!(clients.admit(Role::Control).is_err());
        for slot in &slots[1..] {
            slot.set_busy(true);
        }
        // The first client stays idle; pretend a second has passed.
        slots[0].state.active_at.store(0, Ordering::Relaxed);
        tokio::time::sleep(EVICTABLE_AFTER + Duration::from_millis(10)).await;
        let newcomer = clients.admit(Role::Control).expect("room made");
        tokio::time::timeout(Duration::from_secs(1), slots[0].evicted())
            .await
            .expect("the idle client is told to leave");
        assert_eq!(clients.held(), MAX_CLIENTS);
        drop(slots);
        assert_eq!(clients.held(), 1, "only the newcomer");
        drop(newcomer);
        assert_eq!(clients.held(), 0);
    }

    #[tokio::test]
    async fn a_reader_cannot_evict_an_operator() {
        let clients = Clients::new();
        let operators: Vec<Slot> = (0..MAX_CLIENTS)
            .map(|_| clients.admit(Role::Control).expect("a slot"))
            .collect();
        for slot in &operators[..CONTROL_ONLY_CLIENTS] {
            slot.state.active_at.store(0, Ordering::Relaxed);
        }
        for slot in &operators[CONTROL_ONLY_CLIENTS..] {
            slot.set_busy(true);
        }
        tokio::time::sleep(EVICTABLE_AFTER + Duration::from_millis(10)).await;
        // The idle ones hold control slots, which readers may not take.
        let held = operators
            .iter()
            .filter(|slot| {
                clients
                    .table
                    .lock()
                    .map(|t| {
                        t.entries
                            .get(&slot.id)
                            .is_some_and(|e| e.pool == Pool::Control)
                    })
                    .unwrap_or(false)
            })
            .count();
        assert_eq!(held, CONTROL_ONLY_CLIENTS);
        assert!(clients.admit(Role::Read).is_err());
        assert!(clients.admit(Role::Control).is_ok());
    }
}
