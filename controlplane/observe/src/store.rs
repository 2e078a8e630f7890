//! The durable flow store: one SQLite file (default `/var/lib/egressd/observed.db`).
//!
//! Schema (version 1):
//!
//! ```sql
//! schema_version (id = 1, version)                       -- one row
//! flows (id, workload, address, port, protocol,         -- UNIQUE (workload, address, port, protocol)
//!        first_seen_ms, last_seen_ms,
//!        connections, bytes_sent, packets_sent, bytes_received, packets_received,
//!        denied, would_deny)
//! flow_names (flow_id -> flows.id, name)                 -- at most MAX_NAMES per flow
//! flow_processes (flow_id -> flows.id, comm, exe)        -- at most MAX_PROCESSES per flow
//! dns_queries (workload, name, qtype,                    -- version 2: every name asked
//!              count, nxdomain, answered, first_seen_ms, last_seen_ms)
//! ```
//!
//! Addresses are text in canonical form (IPv4-mapped IPv6 as IPv4), so `sqlite3` shows
//! them as people write them; a missing port is `-1`; times are Unix milliseconds;
//! counters are saturating 63-bit integers. WAL journaling with `synchronous=NORMAL`:
//! a committed batch survives a crash of the process (and the store never holds half a
//! batch); only a power loss may take back the last few commits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::classify::is_internal;
use crate::error::ObserveError;
use crate::model::{
    FlowSample, MAX_NAMES, MAX_PROCESSES, Observation, Process, SampleVerdict, is_plaintext,
    normalize_name,
};
use crate::names::{NameObservation, QuerySample, QueryTallies};

/// The schema this build writes. Older files are migrated on open; newer ones refused.
pub const SCHEMA_VERSION: i64 = 2;

/// `MIGRATIONS[n]` takes a file from version `n` to `n + 1` (version 0: empty file).
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
    CREATE TABLE schema_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    );
    CREATE TABLE flows (
        id INTEGER PRIMARY KEY,
        workload TEXT NOT NULL,
        address TEXT NOT NULL,
        port INTEGER NOT NULL CHECK (port BETWEEN -1 AND 65535),
        protocol INTEGER NOT NULL CHECK (protocol BETWEEN 0 AND 255),
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        connections INTEGER NOT NULL DEFAULT 0,
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        packets_sent INTEGER NOT NULL DEFAULT 0,
        bytes_received INTEGER NOT NULL DEFAULT 0,
        packets_received INTEGER NOT NULL DEFAULT 0,
        denied INTEGER NOT NULL DEFAULT 0,
        would_deny INTEGER NOT NULL DEFAULT 0,
        UNIQUE (workload, address, port, protocol)
    );
    CREATE INDEX flows_last_seen ON flows (last_seen_ms);
    CREATE TABLE flow_names (
        flow_id INTEGER NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        PRIMARY KEY (flow_id, name)
    ) WITHOUT ROWID;
    CREATE TABLE flow_processes (
        flow_id INTEGER NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
        comm TEXT NOT NULL,
        exe TEXT NOT NULL,
        PRIMARY KEY (flow_id, comm, exe)
    ) WITHOUT ROWID;
    INSERT INTO schema_version (id, version) VALUES (1, 0);
"#,
    r#"
    CREATE TABLE dns_queries (
        workload TEXT NOT NULL,
        name TEXT NOT NULL,
        qtype TEXT NOT NULL,
        count INTEGER NOT NULL DEFAULT 0,
        nxdomain INTEGER NOT NULL DEFAULT 0,
        answered INTEGER NOT NULL DEFAULT 0,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        PRIMARY KEY (workload, name, qtype)
    ) WITHOUT ROWID;
    CREATE INDEX dns_queries_last_seen ON dns_queries (last_seen_ms);
"#,
];

/// How long a writer waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A missing port in the `port` column.
const NO_PORT: i64 = -1;

/// Which observations to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this workload.
    pub workload: Option<String>,
    /// Only destinations seen at or after this time (their `last_seen`).
    pub since: Option<SystemTime>,
    /// Leave out internal destinations ([`crate::is_internal`]).
    pub internet_only: bool,
}

/// How much history [`Store::prune`] keeps. A zero disables that limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Flows not seen for this many days are dropped. Default 30.
    pub days: u32,
    /// Above this many flows, the least recently seen are dropped. Default 1,000,000.
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            days: 30,
            max_rows: 1_000_000,
        }
    }
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// Flows older than the retention.
    pub expired: u64,
    /// Flows dropped to get under `max_rows`.
    pub evicted: u64,
    /// Flows left.
    pub remaining: u64,
}

/// The observation store. One writer (the daemon) and any number of readers may have
/// it open at once.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it, mode 0640, if missing) and migrates the store at `path`.
    pub fn open(path: &Path) -> Result<Store, ObserveError> {
        create_private(path).map_err(|source| ObserveError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(path).map_err(|source| ObserveError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.configure(true)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store for reading only (`egressctl` next to a running
    /// daemon). Never creates or migrates: an older schema is an error too.
    pub fn open_read_only(path: &Path) -> Result<Store, ObserveError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| ObserveError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.configure(false)?;
        let found = schema_version(&store.conn, &store.path)?;
        if found > SCHEMA_VERSION {
            return Err(store.too_new(found));
        }
        if found < SCHEMA_VERSION {
            return Err(ObserveError::SchemaTooOld {
                path: store.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, step: &'static str) -> impl Fn(rusqlite::Error) -> ObserveError + '_ {
        sql_error(&self.path, step)
    }

    fn too_new(&self, found: i64) -> ObserveError {
        ObserveError::SchemaTooNew {
            path: self.path.clone(),
            found,
            supported: SCHEMA_VERSION,
        }
    }

    fn configure(&self, writable: bool) -> Result<(), ObserveError> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(self.sql("setting the busy timeout"))?;
        self.conn
            .pragma_update(None, "foreign_keys", true)
            .map_err(self.sql("enabling foreign keys"))?;
        if writable {
            // Only takes effect on a new file; lets prune() give pages back.
            self.conn
                .pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(self.sql("setting auto_vacuum"))?;
            let mode: String = self
                .conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(self.sql("switching to WAL journaling"))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(ObserveError::Sql {
                    path: self.path.clone(),
                    step: "switching to WAL journaling",
                    source: rusqlite::Error::InvalidParameterName(format!(
                        "journal_mode is {mode:?} (is the file on a filesystem without shared memory?)"
                    )),
                });
            }
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(self.sql("setting synchronous=NORMAL"))?;
        }
        Ok(())
    }

    /// Brings the file to [`SCHEMA_VERSION`] in one transaction.
    fn migrate(&mut self) -> Result<(), ObserveError> {
        // A transaction borrows the connection, so errors name the path through this field.
        let path = &self.path;
        let sql = |step: &'static str| sql_error(path, step);
        // IMMEDIATE: two processes opening a new file at once do not both migrate.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting the schema migration"))?;
        let found = schema_version(&tx, path)?;
        if found > SCHEMA_VERSION {
            return Err(ObserveError::SchemaTooNew {
                path: path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        for version in found..SCHEMA_VERSION {
            let index = usize::try_from(version).unwrap_or(usize::MAX);
            let migration = MIGRATIONS.get(index).copied().unwrap_or_default();
            tx.execute_batch(migration)
                .map_err(sql("migrating the schema"))?;
        }
        tx.execute(
            "UPDATE schema_version SET version = ?1 WHERE id = 1",
            [SCHEMA_VERSION],
        )
        .map_err(sql("recording the schema version"))?;
        tx.commit().map_err(sql("committing the schema migration"))
    }

    /// Adds one flush of the datapath in one transaction: all of it or, after a crash,
    /// none of it. Counters add up (saturating), `first_seen` keeps the earliest,
    /// `last_seen` the latest, names and processes are united (bounded by
    /// [`MAX_NAMES`] and [`MAX_PROCESSES`]).
    pub fn record(&mut self, samples: &[FlowSample]) -> Result<(), ObserveError> {
        if samples.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| ObserveError::Sql {
                path: path.clone(),
                step: "starting a batch",
                source,
            })?;
        record_in(&tx, samples).map_err(|(step, source)| ObserveError::Sql {
            path: path.clone(),
            step,
            source,
        })?;
        tx.commit().map_err(|source| ObserveError::Sql {
            path,
            step: "committing a batch",
            source,
        })
    }

    /// The observations that pass `filter`, most important first
    /// ([`sort_most_important_first`]).
    pub fn observations(&self, filter: &Filter) -> Result<Vec<Observation>, ObserveError> {
        let since = filter.since.map(to_millis);
        let workload = filter.workload.as_deref();
        let mut flows = self
            .conn
            .prepare_cached(
                "SELECT id, workload, address, port, protocol, first_seen_ms, last_seen_ms,
                        connections, bytes_sent, packets_sent, bytes_received, packets_received,
                        denied, would_deny
                 FROM flows
                 WHERE (?1 IS NULL OR workload = ?1) AND (?2 IS NULL OR last_seen_ms >= ?2)",
            )
            .map_err(self.sql("reading flows"))?;
        let rows = flows
            .query_map(params![workload, since], |row| {
                Ok(FlowRow {
                    id: row.get(0)?,
                    workload: row.get(1)?,
                    address: row.get(2)?,
                    port: row.get(3)?,
                    protocol: row.get(4)?,
                    first_seen_ms: row.get(5)?,
                    last_seen_ms: row.get(6)?,
                    counters: [
                        row.get(7)?,
                        row.get(8)?,
                        row.get(9)?,
                        row.get(10)?,
                        row.get(11)?,
                        row.get(12)?,
                        row.get(13)?,
                    ],
                })
            })
            .map_err(self.sql("reading flows"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("reading flows"))?;

        let mut names: HashMap<i64, Vec<String>> = HashMap::new();
        let mut name_rows = self
            .conn
            .prepare_cached(
                "SELECT n.flow_id, n.name FROM flow_names n JOIN flows f ON f.id = n.flow_id
                 WHERE (?1 IS NULL OR f.workload = ?1) AND (?2 IS NULL OR f.last_seen_ms >= ?2)
                 ORDER BY n.flow_id, n.name",
            )
            .map_err(self.sql("reading DNS names"))?;
        for row in name_rows
            .query_map(params![workload, since], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(self.sql("reading DNS names"))?
        {
            let (id, name) = row.map_err(self.sql("reading DNS names"))?;
            names.entry(id).or_default().push(name);
        }

        let mut processes: HashMap<i64, Vec<Process>> = HashMap::new();
        let mut process_rows = self
            .conn
            .prepare_cached(
                "SELECT p.flow_id, p.comm, p.exe FROM flow_processes p JOIN flows f ON f.id = p.flow_id
                 WHERE (?1 IS NULL OR f.workload = ?1) AND (?2 IS NULL OR f.last_seen_ms >= ?2)
                 ORDER BY p.flow_id, p.comm, p.exe",
            )
            .map_err(self.sql("reading processes"))?;
        for row in process_rows
            .query_map(params![workload, since], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .map_err(self.sql("reading processes"))?
        {
            let (id, comm, exe) = row.map_err(self.sql("reading processes"))?;
            let exe = (!exe.is_empty()).then_some(exe);
            processes.entry(id).or_default().push(Process { comm, exe });
        }

        let mut observations = Vec::with_capacity(rows.len());
        for row in rows {
            let observation = self.observation(row, &mut names, &mut processes)?;
            if filter.internet_only && is_internal(observation.key.address) {
                continue;
            }
            observations.push(observation);
        }
        sort_most_important_first(&mut observations);
        Ok(observations)
    }

    fn observation(
        &self,
        row: FlowRow,
        names: &mut HashMap<i64, Vec<String>>,
        processes: &mut HashMap<i64, Vec<Process>>,
    ) -> Result<Observation, ObserveError> {
        let corrupt = |what: &'static str, value: String| ObserveError::Corrupt {
            path: self.path.clone(),
            what,
            value,
            row: row.id,
        };
        let address: IpAddr = row
            .address
            .parse()
            .map_err(|_| corrupt("address", row.address.clone()))?;
        let port = match row.port {
            NO_PORT => None,
            port => Some(u16::try_from(port).map_err(|_| corrupt("port", port.to_string()))?),
        };
        let protocol = u8::try_from(row.protocol)
            .map_err(|_| corrupt("protocol", row.protocol.to_string()))?;
        let [
            connections,
            bytes_sent,
            packets_sent,
            bytes_received,
            packets_received,
            denied,
            would_deny,
        ] = row.counters.map(|value| u64::try_from(value).unwrap_or(0));
        Ok(Observation {
            key: crate::model::FlowKey::new(row.workload, address, port, protocol),
            dns_names: names.remove(&row.id).unwrap_or_default(),
            first_seen: from_millis(row.first_seen_ms),
            last_seen: from_millis(row.last_seen_ms),
            connections,
            bytes_sent,
            packets_sent,
            bytes_received,
            packets_received,
            processes: processes.remove(&row.id).unwrap_or_default(),
            denied,
            would_deny,
            plaintext: is_plaintext(protocol, port),
        })
    }

    /// Adds answered DNS questions, aggregated per (workload, name, type), in one
    /// transaction.
    pub fn record_queries(&mut self, samples: &[QuerySample]) -> Result<(), ObserveError> {
        let mut tallies = QueryTallies::new();
        for sample in samples {
            tallies.add(sample.clone(), usize::MAX);
        }
        self.record_query_tallies(&tallies)
    }

    /// Adds counted answers to the names' rows, one statement per question.
    pub fn record_query_tallies(&mut self, tallies: &QueryTallies) -> Result<(), ObserveError> {
        if tallies.is_empty() {
            return Ok(());
        }
        let path = &self.path;
        let sql = |step: &'static str| sql_error(path, step);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting a batch of DNS questions"))?;
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO dns_queries
                       (workload, name, qtype, count, nxdomain, answered, first_seen_ms, last_seen_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (workload, name, qtype) DO UPDATE SET
                       count = min(count + excluded.count, 9223372036854775807),
                       nxdomain = min(nxdomain + excluded.nxdomain, 9223372036854775807),
                       answered = min(answered + excluded.answered, 9223372036854775807),
                       first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
                       last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
                )
                .map_err(sql("preparing to record DNS questions"))?;
            for ((workload, name, qtype), tally) in tallies.iter() {
                upsert
                    .execute(params![
                        workload,
                        name,
                        qtype,
                        clamp_counter(tally.count),
                        clamp_counter(tally.nxdomain),
                        clamp_counter(tally.answered),
                        to_millis(tally.first_seen),
                        to_millis(tally.last_seen),
                    ])
                    .map_err(sql("recording a DNS question"))?;
            }
        }
        tx.commit().map_err(sql("committing DNS questions"))
    }

    /// The names workloads asked for that pass `filter` (`internet_only` does not apply:
    /// names have no address), with whether a connection to one of their addresses was
    /// seen and the tunnelling flag ([`crate::flag_tunnelling`]), most asked first.
    pub fn names(&self, filter: &Filter) -> Result<Vec<NameObservation>, ObserveError> {
        let since = filter.since.map(to_millis);
        let workload = filter.workload.as_deref();
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT q.workload, q.name, q.qtype, q.count, q.nxdomain, q.answered,
                        q.first_seen_ms, q.last_seen_ms,
                        EXISTS (SELECT 1 FROM flow_names n JOIN flows f ON f.id = n.flow_id
                                WHERE f.workload = q.workload AND n.name = q.name)
                 FROM dns_queries q
                 WHERE (?1 IS NULL OR q.workload = ?1) AND (?2 IS NULL OR q.last_seen_ms >= ?2)
                 ORDER BY q.count DESC, q.workload, q.name, q.qtype",
            )
            .map_err(self.sql("reading DNS questions"))?;
        let rows = statement
            .query_map(params![workload, since], |row| {
                Ok(NameObservation {
                    workload: row.get(0)?,
                    name: row.get(1)?,
                    qtype: row.get(2)?,
                    count: clamp_stored(row.get(3)?),
                    nxdomain: clamp_stored(row.get(4)?),
                    answered: clamp_stored(row.get(5)?),
                    first_seen: from_millis(row.get(6)?),
                    last_seen: from_millis(row.get(7)?),
                    connected: row.get(8)?,
                    tunnelling: None,
                })
            })
            .map_err(self.sql("reading DNS questions"))?;
        let mut names = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("reading DNS questions"))?;
        crate::names::flag_tunnelling(&mut names);
        Ok(names)
    }

    /// Drops what is older than the retention, then the least recently seen flows above
    /// `max_rows`, in one transaction, and gives freed pages back to the filesystem.
    pub fn prune(&mut self, retention: Retention) -> Result<PruneStats, ObserveError> {
        self.prune_at(retention, SystemTime::now())
    }

    /// [`Store::prune`] with an explicit clock.
    pub fn prune_at(
        &mut self,
        retention: Retention,
        now: SystemTime,
    ) -> Result<PruneStats, ObserveError> {
        // A transaction borrows the connection, so errors name the path through this field.
        let path = &self.path;
        let sql = |step: &'static str| sql_error(path, step);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting to prune"))?;
        let mut stats = PruneStats::default();
        if retention.days > 0 {
            let age = Duration::from_secs(u64::from(retention.days) * 86_400);
            let cutoff = to_millis(now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH));
            let expired = tx
                .execute("DELETE FROM flows WHERE last_seen_ms < ?1", [cutoff])
                .map_err(sql("dropping expired flows"))?;
            stats.expired = expired as u64;
            tx.execute("DELETE FROM dns_queries WHERE last_seen_ms < ?1", [cutoff])
                .map_err(sql("dropping expired DNS questions"))?;
        }
        if retention.max_rows > 0 {
            let limit = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
            tx.execute(
                "DELETE FROM dns_queries WHERE (workload, name, qtype) IN
                   (SELECT workload, name, qtype FROM dns_queries
                    ORDER BY last_seen_ms DESC LIMIT -1 OFFSET ?1)",
                [limit],
            )
            .map_err(sql("evicting the oldest DNS questions"))?;
        }
        let count: i64 = tx
            .query_row("SELECT count(*) FROM flows", [], |row| row.get(0))
            .map_err(sql("counting flows"))?;
        let mut remaining = u64::try_from(count).unwrap_or(0);
        if retention.max_rows > 0 && remaining > retention.max_rows {
            let excess = i64::try_from(remaining - retention.max_rows).unwrap_or(i64::MAX);
            let evicted = tx
                .execute(
                    "DELETE FROM flows WHERE id IN
                       (SELECT id FROM flows ORDER BY last_seen_ms ASC, id ASC LIMIT ?1)",
                    [excess],
                )
                .map_err(sql("evicting the oldest flows"))?;
            stats.evicted = evicted as u64;
            remaining -= stats.evicted;
        }
        stats.remaining = remaining;
        tx.commit().map_err(sql("committing the prune"))?;
        if stats.expired + stats.evicted > 0 {
            self.conn
                .execute_batch("PRAGMA incremental_vacuum")
                .map_err(sql("returning free pages"))?;
        }
        Ok(stats)
    }

    /// `PRAGMA integrity_check`: `["ok"]` for a sound file, else SQLite's findings.
    pub fn integrity_check(&self) -> Result<Vec<String>, ObserveError> {
        let mut statement = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(self.sql("checking integrity"))?;
        statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(self.sql("checking integrity"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("checking integrity"))
    }
}

/// The file's schema version; 0 for a file without the version table.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, ObserveError> {
    let sql = |source| ObserveError::Sql {
        path: path.to_path_buf(),
        step: "reading the schema version",
        source,
    };
    let has_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
            [],
            |row| row.get(0),
        )
        .map_err(sql)?;
    if !has_table {
        return Ok(0);
    }
    conn.query_row(
        "SELECT version FROM schema_version WHERE id = 1",
        [],
        |row| row.get(0),
    )
    .optional()
    .map_err(sql)
    .map(|version| version.unwrap_or(0))
}

struct FlowRow {
    id: i64,
    workload: String,
    address: String,
    port: i64,
    protocol: i64,
    first_seen_ms: i64,
    last_seen_ms: i64,
    counters: [i64; 7],
}

/// `column = column + excluded.column`, saturating at i64::MAX.
fn saturating_add(column: &str) -> String {
    format!(
        "{column} = CASE WHEN {column} > 9223372036854775807 - excluded.{column} \
         THEN 9223372036854775807 ELSE {column} + excluded.{column} END"
    )
}

fn record_in(
    tx: &Transaction<'_>,
    samples: &[FlowSample],
) -> Result<(), (&'static str, rusqlite::Error)> {
    let counters = [
        "connections",
        "bytes_sent",
        "packets_sent",
        "bytes_received",
        "packets_received",
        "denied",
        "would_deny",
    ];
    let updates: Vec<String> = counters
        .iter()
        .map(|column| saturating_add(column))
        .collect();
    let upsert = format!(
        "INSERT INTO flows (workload, address, port, protocol, first_seen_ms, last_seen_ms,
                            connections, bytes_sent, packets_sent, bytes_received, packets_received,
                            denied, would_deny)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (workload, address, port, protocol) DO UPDATE SET
            first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
            last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
            {}
         RETURNING id",
        updates.join(",\n            ")
    );
    let mut upsert = tx
        .prepare_cached(&upsert)
        .map_err(|e| ("upserting a flow", e))?;
    let mut add_name = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO flow_names (flow_id, name)
             SELECT ?1, ?2 WHERE (SELECT count(*) FROM flow_names WHERE flow_id = ?1) < ?3",
        )
        .map_err(|e| ("adding a DNS name", e))?;
    let mut add_process = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO flow_processes (flow_id, comm, exe)
             SELECT ?1, ?2, ?3 WHERE (SELECT count(*) FROM flow_processes WHERE flow_id = ?1) < ?4",
        )
        .map_err(|e| ("adding a process", e))?;
    for sample in samples {
        let key = sample.key.canonical();
        let (denied, would_deny) = match sample.verdict {
            SampleVerdict::Allowed => (0, 0),
            SampleVerdict::Denied => (sample.verdict_count(), 0),
            SampleVerdict::WouldDeny => (0, sample.verdict_count()),
        };
        let first = to_millis(sample.first_seen.min(sample.last_seen));
        let last = to_millis(sample.last_seen.max(sample.first_seen));
        let id: i64 = upsert
            .query_row(
                params![
                    key.workload,
                    key.address.to_string(),
                    key.port.map_or(NO_PORT, i64::from),
                    i64::from(key.protocol),
                    first,
                    last,
                    clamp_counter(sample.connections),
                    clamp_counter(sample.bytes_sent),
                    clamp_counter(sample.packets_sent),
                    clamp_counter(sample.bytes_received),
                    clamp_counter(sample.packets_received),
                    clamp_counter(denied),
                    clamp_counter(would_deny),
                ],
                |row| row.get(0),
            )
            .map_err(|e| ("upserting a flow", e))?;
        if let Some(name) = sample
            .dns_name
            .as_deref()
            .map(normalize_name)
            .filter(|n| !n.is_empty())
        {
            add_name
                .execute(params![id, name, MAX_NAMES as i64])
                .map_err(|e| ("adding a DNS name", e))?;
        }
        for process in sample
            .connect_process
            .iter()
            .chain(sample.send_process.iter())
        {
            add_process
                .execute(params![
                    id,
                    process.comm,
                    process.exe.as_deref().unwrap_or(""),
                    MAX_PROCESSES as i64
                ])
                .map_err(|e| ("adding a process", e))?;
        }
    }
    Ok(())
}

/// Denied and would-deny first (by how many), then plaintext, then by connections
/// (descending); ties in key order, so the output is stable.
pub fn sort_most_important_first(observations: &mut [Observation]) {
    observations.sort_by(|a, b| {
        b.is_denied()
            .cmp(&a.is_denied())
            .then_with(|| {
                b.denied
                    .saturating_add(b.would_deny)
                    .cmp(&a.denied.saturating_add(a.would_deny))
            })
            .then_with(|| b.plaintext.cmp(&a.plaintext))
            .then_with(|| b.connections.cmp(&a.connections))
            .then_with(|| a.key.cmp(&b.key))
    });
}

/// A stored counter as read back (never negative in files egressd wrote).
fn clamp_stored(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn clamp_counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Unix milliseconds; times before the epoch become 0.
fn to_millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

fn from_millis(millis: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// Creates the file with mode 0640 if it does not exist (SQLite would use 0644, and
/// the store says which hosts every workload talks to). The WAL and shared-memory
/// files SQLite creates next to it copy this mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests;

/// Maps a SQLite error at `step` to one that names the store's file.
fn sql_error<'a>(
    path: &'a Path,
    step: &'static str,
) -> impl Fn(rusqlite::Error) -> ObserveError + 'a {
    move |source| ObserveError::Sql {
        path: path.to_owned(),
        step,
        source,
    }
}
