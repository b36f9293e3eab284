//! SQLite storage: one writer connection, a few readers, WAL mode.
//!
//! Every row that `/sync` cares about carries a `stream` position taken from one
//! counter while the writer lock is held, so positions are committed in order and
//! a reader that saw position N has seen every row at or below N.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering},
        Condvar, Mutex,
    },
};

use rusqlite::{Connection, OpenFlags};

use crate::config::Durability;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    localpart TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    displayname TEXT,
    avatar_url TEXT,
    is_admin INTEGER NOT NULL DEFAULT 0,
    deactivated INTEGER NOT NULL DEFAULT 0,
    created_ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    last_seen_ts INTEGER,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);
-- Only the SHA-256 of each access token is stored.
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS access_tokens_device ON access_tokens(user_id, device_id);
CREATE TABLE IF NOT EXISTS registration_tokens (
    token TEXT PRIMARY KEY,
    uses_allowed INTEGER,
    completed INTEGER NOT NULL DEFAULT 0,
    expiry_ts INTEGER,
    created_ts INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS filters (
    user_id TEXT NOT NULL,
    filter_id INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);
CREATE TABLE IF NOT EXISTS rooms (
    room_id TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    is_public INTEGER NOT NULL DEFAULT 0,
    created_ts INTEGER NOT NULL,
    bump_stamp INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    stream INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    depth INTEGER NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    json TEXT NOT NULL,
    rel_type TEXT,
    relates_to TEXT,
    thread_root TEXT,
    redacted_by TEXT,
    txn_id TEXT,
    txn_device TEXT,
    prev_state TEXT,
    -- 1 for events known only as state or auth (from a remote join), not in the timeline.
    outlier INTEGER NOT NULL DEFAULT 0,
    -- The state groups before and after the event, once it is in the room's
    -- graph (on the row, not in a table keyed by event id: that put one
    -- random B-tree page into every commit per message).
    state_before INTEGER,
    state_after INTEGER
);
CREATE INDEX IF NOT EXISTS events_room_stream ON events(room_id, stream);
CREATE INDEX IF NOT EXISTS events_state ON events(room_id, type, state_key, stream) WHERE state_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_relates ON events(relates_to, stream) WHERE relates_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_thread ON events(room_id, thread_root, stream) WHERE thread_root IS NOT NULL;
CREATE TABLE IF NOT EXISTS forward_extremities (
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_state (
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    stream INTEGER NOT NULL,
    membership TEXT,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE INDEX IF NOT EXISTS room_state_members ON room_state(type, state_key, membership);
-- Room state at each point of the event graph (see state.rs): deltas over a
-- parent group, a full snapshot (parent NULL) every hundred steps.
CREATE TABLE IF NOT EXISTS state_groups (
    id INTEGER PRIMARY KEY,
    room_id TEXT NOT NULL,
    parent INTEGER,
    depth INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state_group_entries (
    grp INTEGER NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT,
    PRIMARY KEY (grp, type, state_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_current_group (room_id TEXT PRIMARY KEY, grp INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_resolutions (inputs TEXT PRIMARY KEY, grp INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected_events (event_id TEXT PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS soft_failed_events (event_id TEXT PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID;
-- A transaction id is scoped to one device and one endpoint (spec v1.7, MSC3970).
CREATE TABLE IF NOT EXISTS txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    request TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, request, txn_id)
);
CREATE TABLE IF NOT EXISTS room_aliases (
    alias TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS room_aliases_room ON room_aliases(room_id);
CREATE TABLE IF NOT EXISTS account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    stream INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);
CREATE INDEX IF NOT EXISTS account_data_stream ON account_data(user_id, stream);
CREATE TABLE IF NOT EXISTS receipts (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX IF NOT EXISTS receipts_stream ON receipts(stream);
CREATE TABLE IF NOT EXISTS forgotten_rooms (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
CREATE TABLE IF NOT EXISTS pushers (
    user_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, app_id, pushkey)
);
CREATE TABLE IF NOT EXISTS device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);
CREATE INDEX IF NOT EXISTS one_time_keys_alg ON one_time_keys(user_id, device_id, algorithm);
CREATE TABLE IF NOT EXISTS fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    json TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);
CREATE TABLE IF NOT EXISTS cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);
CREATE TABLE IF NOT EXISTS key_signatures (
    target_user TEXT NOT NULL,
    target_key TEXT NOT NULL,
    signer_user TEXT NOT NULL,
    signer_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer_user, signer_key)
);
CREATE TABLE IF NOT EXISTS device_list_updates (
    user_id TEXT NOT NULL,
    stream INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS device_list_updates_stream ON device_list_updates(stream);
CREATE TABLE IF NOT EXISTS to_device (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS to_device_target ON to_device(user_id, device_id, id);
CREATE TABLE IF NOT EXISTS backup_versions (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);
CREATE TABLE IF NOT EXISTS backup_keys (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
CREATE TABLE IF NOT EXISTS media (
    media_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    content_type TEXT,
    filename TEXT,
    size INTEGER,
    created_ts INTEGER NOT NULL,
    uploaded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS media_thumbnails (
    media_id TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    method TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (media_id, width, height, method)
);
CREATE TABLE IF NOT EXISTS sliding_sync_positions (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    conn_id TEXT NOT NULL,
    pos INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, conn_id, pos)
);
-- One row per event that notified anyone. Users are listed in one string, not a
-- row each, so a message to a room of N members writes one row instead of N
-- scattered ones. `users` is "\n@a:b\t0\n@c:d\t1\n": each notified user and the
-- index of their actions in `actions` (a JSON array of action lists);
-- `highlights` is "\n@a:b\n" for the users among them it highlights. User ids
-- never contain tabs or newlines, so `instr(users, char(10)||?||char(9))` is exact.
CREATE TABLE IF NOT EXISTS event_push (
    stream INTEGER PRIMARY KEY,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    thread_id TEXT,
    ts INTEGER NOT NULL,
    users TEXT NOT NULL,
    highlights TEXT NOT NULL,
    actions TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS event_push_thread ON event_push(room_id, thread_id, stream) WHERE thread_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS push_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS push_queue_due ON push_queue(next_try);
CREATE INDEX IF NOT EXISTS push_queue_pusher ON push_queue(user_id, app_id, pushkey, id);
CREATE TABLE IF NOT EXISTS server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key TEXT NOT NULL,
    valid_until INTEGER NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
CREATE TABLE IF NOT EXISTS fed_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fed_queue_dest ON fed_queue(destination, kind, id);
CREATE TABLE IF NOT EXISTS fed_destinations (
    server_name TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,
    retry_at INTEGER NOT NULL DEFAULT 0,
    last_success INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS fed_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE TABLE IF NOT EXISTS remote_invites (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    room_version TEXT NOT NULL,
    event_json TEXT NOT NULL,
    invite_state TEXT NOT NULL,
    stream INTEGER NOT NULL,
    inviter_server TEXT NOT NULL,
    -- 1 once the user declined: kept (with the leave event) so other devices hear of it.
    declined INTEGER NOT NULL DEFAULT 0,
    -- 'invite' (from another server), or 'knock' (ours, on a room of another server).
    membership TEXT NOT NULL DEFAULT 'invite',
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS blocked_servers (server_name TEXT PRIMARY KEY, ts INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS events_fts USING fts5(
    stems, room_id UNINDEXED, event_stream UNINDEXED, tokenize = 'unicode61 remove_diacritics 0'
);
"#;

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name=?2")?
        .exists([table, column])
}

fn has_table(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    conn.prepare("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1")?
        .exists([table])
}

/// Brings databases made by older versions up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_bump = has_column(conn, "rooms", "bump_stamp")?;
    if !has_bump {
        conn.execute_batch("ALTER TABLE rooms ADD COLUMN bump_stamp INTEGER NOT NULL DEFAULT 0;")?;
    }
    let has_outlier = has_column(conn, "events", "outlier")?;
    if !has_outlier {
        conn.execute_batch("ALTER TABLE events ADD COLUMN outlier INTEGER NOT NULL DEFAULT 0;")?;
    }
    let has_declined = has_column(conn, "remote_invites", "declined")?;
    if !has_declined {
        conn.execute_batch(
            "ALTER TABLE remote_invites ADD COLUMN declined INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    let has_knocks = has_column(conn, "remote_invites", "membership")?;
    if !has_knocks {
        conn.execute_batch(
            "ALTER TABLE remote_invites ADD COLUMN membership TEXT NOT NULL DEFAULT 'invite';",
        )?;
    }
    let has_state_groups = has_column(conn, "events", "state_after")?;
    if !has_state_groups {
        conn.execute_batch(
            "ALTER TABLE events ADD COLUMN state_before INTEGER;
             ALTER TABLE events ADD COLUMN state_after INTEGER;",
        )?;
    }
    let old_event_state = has_table(conn, "event_state")?;
    if old_event_state {
        conn.execute_batch(
            "BEGIN;
             UPDATE events SET (state_before, state_after) =
                 (SELECT before_grp, after_grp FROM event_state s WHERE s.event_id = events.event_id)
             WHERE event_id IN (SELECT event_id FROM event_state);
             DROP TABLE event_state;
             COMMIT;",
        )?;
    }
    let txn_scoped: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('txns') WHERE name='request' AND pk>0")?
        .exists([])?;
    if !txn_scoped {
        conn.execute_batch(
            "ALTER TABLE txns RENAME TO txns_old;
             CREATE TABLE txns (user_id TEXT NOT NULL, device_id TEXT NOT NULL, request TEXT NOT NULL, txn_id TEXT NOT NULL,
                 event_id TEXT NOT NULL, PRIMARY KEY (user_id, device_id, request, txn_id));
             INSERT OR IGNORE INTO txns SELECT user_id, device_id, request, txn_id, event_id FROM txns_old;
             DROP TABLE txns_old;",
        )?;
    }
    // One B-tree, not a table and its key's index: both were rewritten by
    // every message (the extremity moves on).
    let extremities_rowid: bool = conn
        .prepare(
            "SELECT 1 FROM sqlite_master WHERE name='forward_extremities' AND sql NOT LIKE '%WITHOUT ROWID%'",
        )?
        .exists([])?;
    if extremities_rowid {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE forward_extremities RENAME TO forward_extremities_old;
             CREATE TABLE forward_extremities (room_id TEXT NOT NULL, event_id TEXT NOT NULL,
                 PRIMARY KEY (room_id, event_id)) WITHOUT ROWID;
             INSERT OR IGNORE INTO forward_extremities SELECT room_id, event_id FROM forward_extremities_old;
             DROP TABLE forward_extremities_old;
             COMMIT;",
        )?;
    }
    // A room's notifying events are found through `events_room_stream`: an
    // index of its own cost one more page per room in every commit.
    conn.execute_batch("DROP INDEX IF EXISTS event_push_room;")?;
    // Search indexing runs behind the writes (search::catch_up); databases
    // from before were indexed as each event was stored.
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) SELECT 'fts_upto', COALESCE(MAX(stream), 0) FROM events",
        [],
    )?;
    let old_notifications = has_table(conn, "notifications")?;
    if old_notifications {
        // One row per (user, event) became one row per event.
        conn.execute_batch(
            "BEGIN;
             INSERT OR IGNORE INTO event_push(stream, room_id, event_id, thread_id, ts, users, highlights, actions)
             SELECT stream, MAX(room_id), MAX(event_id), MAX(thread_id), MAX(ts),
                    char(10) || group_concat(user_id || char(9) || i || char(10), '' ORDER BY i),
                    char(10) || COALESCE(group_concat(CASE WHEN highlight THEN user_id || char(10) END, '' ORDER BY i), ''),
                    json_group_array(json(actions) ORDER BY i)
             FROM (SELECT *, row_number() OVER (PARTITION BY stream ORDER BY user_id) - 1 AS i FROM notifications)
             GROUP BY stream;
             DROP TABLE notifications;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// The database handle shared by all requests.
///
/// Writes use group commit: writers queue for the one write connection, each
/// runs inside a savepoint of a shared transaction, and the last writer in the
/// queue (or the 32nd) commits for all of them. Nobody returns success before the
/// commit that contains their write, so "acknowledged means committed" holds,
/// while a burst of concurrent writes costs one WAL commit instead of many.
pub struct Db {
    writer: Mutex<Writer>,
    /// Writers waiting for the writer lock.
    queued: AtomicUsize,
    /// Handlers holding or waiting for a write turn.
    wanting_turns: AtomicUsize,
    /// Outcome of each finished batch, by generation.
    commits: Mutex<Commits>,
    committed: Condvar,
    readers: Mutex<Vec<Connection>>,
    /// Turns for hot request handlers before they write (see [`Db::write_turn`]).
    turns: tokio::sync::Semaphore,
    path: std::path::PathBuf,
    /// SQLCipher key (`x'…'`) every connection is keyed with right after open.
    key: Option<zeroize::Zeroizing<String>>,
    /// Highest committed stream position.
    stream: AtomicI64,
    /// The newest events and push rows as committed (see [`crate::recent`]).
    pub(crate) recent: crate::recent::Recent,
    hints: UserHints,
    /// WAL length in frames, as the checkpointer last saw it.
    wal_frames: std::sync::Arc<AtomicI64>,
    /// [`WAL_RESTART_PAGES`], smaller in tests.
    wal_restart_pages: i64,
    /// No WAL restart is tried before this (after one that readers blocked).
    next_restart: Mutex<std::time::Instant>,
    /// Moves committed WAL frames into the database file off the write path.
    _checkpointer: Checkpointer,
}

/// A background thread that checkpoints the WAL (PASSIVE: it never blocks the
/// writer or readers). The writer's own auto-checkpoint is off, so a commit
/// never pays for copying pages into the main file and syncing it.
struct Checkpointer {
    stop: std::sync::Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the checkpointer looks for new WAL frames.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Checkpointer {
    /// `wal_frames` gets the WAL's length in frames after each pass.
    fn start(
        path: &Path,
        key: Option<&str>,
        wal_frames: std::sync::Arc<AtomicI64>,
    ) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        apply_key(&conn, key)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        let stop = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("secta-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !*stopped {
                    stopped = cv
                        .wait_timeout(stopped, CHECKPOINT_EVERY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    match conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
                    {
                        Ok(frames) => wal_frames.store(frames, Ordering::Relaxed),
                        Err(e) => tracing::warn!(error = %e, "background WAL checkpoint failed"),
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// WAL size (pages, 64 MiB) past which the writer restarts the log after a
/// commit. A restart holds the writer for ~10-20 ms (it copies and syncs what
/// the checkpointer has not yet), so it should come seldom: every ~1.5 s at
/// 1,000 messages/s with this size, every ~0.5 s with 4096 pages.
const WAL_RESTART_PAGES: i64 = 16384;

/// How long a restart may wait for readers to leave the WAL, and how long to
/// leave it before trying again when they did not (a long read, e.g. a backup).
const WAL_RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
const WAL_RESTART_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Checkpointer {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    conn: Connection,
    in_txn: bool,
    /// Stream positions handed out in the open transaction go up from here.
    next: i64,
    /// Generation of the open batch.
    generation: u64,
    batch: usize,
}

#[derive(Default)]
struct Commits {
    /// Every batch below this generation is finished.
    done: u64,
    /// Generations whose commit failed (kept briefly for their waiters).
    failed: Vec<(u64, String)>,
}

/// Runs one statement through the connection's statement cache (transaction
/// control runs for every write, and `execute_batch` would parse it each time).
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Undoes and ends the `op` savepoint after a failed or panicking write.
fn rollback_savepoint(conn: &Connection) {
    let _ = exec(conn, "ROLLBACK TO op");
    let _ = exec(conn, "RELEASE op");
}

/// Read connections kept open between reads. Opening one parses the whole
/// schema, so a burst of concurrent reads (a group commit releases up to
/// [`MAX_BATCH`] writers at once, each then reading) must not churn them.
const MAX_IDLE_READERS: usize = 16;

/// Request handlers that may write at once after [`Db::write_turn`].
const WRITE_TURNS: usize = 16;

/// Largest batch before a commit is forced, so early writers do not wait long.
const MAX_BATCH: usize = 32;

/// Keys a connection for SQLCipher: must be its first statement. A raw key
/// (`x'…'`, from the box's data key) skips SQLCipher's PBKDF2, so opening a
/// reader stays cheap. No key: a plain SQLite database.
fn apply_key(conn: &Connection, key: Option<&str>) -> rusqlite::Result<()> {
    if let Some(k) = key {
        conn.execute_batch(&secta_vault::sqlcipher_keying(k))?;
    }
    Ok(())
}

/// Settings every connection (writer and readers) shares.
fn configure_common(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(256);
    // Plans must not depend on bound values: otherwise a statement compared
    // against a partial index or with `LIMIT ?` is compiled again whenever the
    // value changes, and the statement cache saves nothing.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    configure_common(conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // A modest page cache: RAM is scarce on the box.
    conn.pragma_update(None, "cache_size", -4000)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The checkpointer thread copies the WAL into the database file; the writer
    // only restarts the WAL when it has grown large (`Db::maybe_restart_wal`),
    // and the file is cut back to this size afterwards (above that length, so
    // a restarted log is written over the same blocks, not grown again).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", 72 * 1024 * 1024)?;
    Ok(())
}

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, durability: Durability) -> anyhow::Result<Self> {
        Self::open_keyed(path, durability, None)
    }

    /// Like [`Db::open`], encrypted with SQLCipher under `key` (`x'<64 hex>'`).
    pub fn open_keyed(
        path: &Path,
        durability: Durability,
        key: Option<zeroize::Zeroizing<String>>,
    ) -> anyhow::Result<Self> {
        let conn = Connection::open(path)?;
        apply_key(&conn, key.as_deref().map(String::as_str))?;
        if let Err(e) = conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())) {
            anyhow::bail!(
                "cannot read {} ({e}): {}",
                path.display(),
                if key.is_some() {
                    "it is not encrypted under this box's data key"
                } else {
                    "it is encrypted (or not a database); the data key is needed"
                }
            );
        }
        configure(&conn, durability)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let stream: i64 = conn.query_row(
            "SELECT MAX(m) FROM (
                SELECT COALESCE(MAX(stream),0) AS m FROM events
                UNION ALL SELECT COALESCE(MAX(stream),0) FROM account_data
                UNION ALL SELECT COALESCE(MAX(stream),0) FROM receipts
                UNION ALL SELECT COALESCE(MAX(stream),0) FROM device_list_updates
                UNION ALL SELECT COALESCE(MAX(stream),0) FROM remote_invites
                UNION ALL SELECT COALESCE(CAST(value AS INTEGER),0) FROM meta WHERE key='stream')",
            [],
            |r| r.get(0),
        )?;
        let wal_frames = std::sync::Arc::new(AtomicI64::new(0));
        // Any row change that can end a token's validity (a token deleted, a
        // user deactivated) marks the open batch; see [`Db::auth_version`].
        let auth_dirty = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dirty = auth_dirty.clone();
        let recent = crate::recent::Recent::new(stream, crate::recent::RECENT_BYTES);
        let touched = recent.touched.clone();
        conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, rowid: i64| match table {
                "access_tokens" | "users" => dirty.store(true, Ordering::Release),
                "events" | "event_push" => touched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .note(table, rowid),
                _ => {}
            },
        ));
        Ok(Self {
            writer: Mutex::new(Writer {
                conn,
                in_txn: false,
                next: stream,
                generation: 0,
                batch: 0,
            }),
            queued: AtomicUsize::new(0),
            wanting_turns: AtomicUsize::new(0),
            commits: Mutex::new(Commits::default()),
            committed: Condvar::new(),
            readers: Mutex::new(Vec::new()),
            turns: tokio::sync::Semaphore::new(WRITE_TURNS),
            path: path.to_owned(),
            _checkpointer: Checkpointer::start(
                path,
                key.as_deref().map(String::as_str),
                wal_frames.clone(),
            )?,
            key,
            stream: AtomicI64::new(stream),
            recent,
            hints: UserHints {
                newest: Mutex::new(Hints {
                    floor: stream,
                    top: stream,
                    map: HashMap::new(),
                }),
                auth_dirty,
                ..Default::default()
            },
            wal_frames,
            wal_restart_pages: WAL_RESTART_PAGES,
            next_restart: Mutex::new(std::time::Instant::now()),
        })
    }

    /// Runs `f` atomically (a savepoint in the current batch) and returns once the
    /// batch holding it is committed. Stream positions taken with
    /// [`WriteTxn::next_stream`] become visible only after that commit.
    pub fn write<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        // Waiting for the writer blocks this thread: on the multi-threaded runtime,
        // tell tokio so the worker's other tasks move to another thread meanwhile.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            tokio::task::block_in_place(|| self.write_now(f))
        } else {
            self.write_now(f)
        }
    }

    /// Waits, without holding a thread, for one of a few turns to write. Every
    /// writer waiting in [`Db::write`] holds an OS thread (`block_in_place`), so
    /// handlers that many clients call at once (sending messages, receipts) take a
    /// turn first: fifty concurrent senders then cost a handful of threads, not
    /// fifty, while group commit still batches the writers that hold turns.
    pub async fn write_turn(&self) -> WriteTurn<'_> {
        self.wanting_turns.fetch_add(1, Ordering::AcqRel);
        // Counted from here, so a handler dropped while waiting is uncounted too.
        let mut turn = WriteTurn {
            db: self,
            _permit: None,
        };
        turn._permit = self.turns.acquire().await.ok();
        turn
    }

    /// How busy the write path is, from 0 (no handler holds or wants a write
    /// turn) to 1 (every turn is taken and more are waiting).
    pub fn write_pressure(&self) -> f64 {
        (self.wanting_turns.load(Ordering::Acquire) as f64 / WRITE_TURNS as f64).min(1.0)
    }

    fn write_now<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let mut st = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.queued.fetch_sub(1, Ordering::AcqRel);
        if !st.in_txn {
            if let Err(e) = exec(&st.conn, "BEGIN IMMEDIATE") {
                return Err(e.into());
            }
            st.in_txn = true;
            st.next = self.stream.load(Ordering::Acquire);
        }
        let my_generation = st.generation;
        let mut panicked = None;
        let out = match exec(&st.conn, "SAVEPOINT op") {
            Err(e) => Err(E::from(e)),
            Ok(()) => {
                let start_next = st.next;
                // A panic inside `f` must not leave the shared transaction half-written.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut w = WriteTxn {
                        tx: &st.conn,
                        next: start_next,
                        hints: &self.hints,
                    };
                    let out = f(&mut w);
                    (out, w.next)
                }));
                match run {
                    Ok((Ok(v), next)) => match exec(&st.conn, "RELEASE op") {
                        Ok(()) => {
                            st.next = next;
                            st.batch += 1;
                            Ok(v)
                        }
                        Err(e) => {
                            rollback_savepoint(&st.conn);
                            Err(e.into())
                        }
                    },
                    Ok((Err(e), _)) => {
                        rollback_savepoint(&st.conn);
                        Err(e)
                    }
                    Err(p) => {
                        rollback_savepoint(&st.conn);
                        panicked = Some(p);
                        Err(E::from(rusqlite::Error::InvalidQuery))
                    }
                }
            }
        };
        // Some errors (disk full, I/O) make SQLite roll back the whole transaction:
        // then the batch is lost, and everyone waiting on it must hear so.
        if out.is_err() && st.in_txn && st.conn.is_autocommit() {
            st.in_txn = false;
            self.fail_batch(&mut st, "the transaction was rolled back by SQLite");
            drop(st);
            if let Some(p) = panicked {
                std::panic::resume_unwind(p);
            }
            return out;
        }
        let succeeded = out.is_ok();
        if self.queued.load(Ordering::Acquire) == 0 || st.batch >= MAX_BATCH {
            let commit = self.commit_locked(&mut st);
            drop(st);
            if let Some(p) = panicked {
                std::panic::resume_unwind(p);
            }
            return match (out, commit) {
                (Ok(v), Ok(())) => Ok(v),
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(e.into()),
            };
        }
        drop(st);
        if let Some(p) = panicked {
            std::panic::resume_unwind(p);
        }
        if !succeeded {
            return out;
        }
        // Someone queued behind us will commit this batch.
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        while commits.done <= my_generation {
            commits = self
                .committed
                .wait(commits)
                .unwrap_or_else(|p| p.into_inner());
        }
        if let Some((_, msg)) = commits.failed.iter().find(|(g, _)| *g == my_generation) {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(format!("commit failed: {msg}")),
            )
            .into());
        }
        out
    }

    /// Ends the open batch as failed (writer lock held) and wakes its waiters.
    fn fail_batch(&self, st: &mut Writer, why: &str) {
        self.hints.batch_ended();
        self.recent.discard_batch();
        st.batch = 0;
        st.next = self.stream.load(Ordering::Acquire);
        let generation = st.generation;
        st.generation += 1;
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        commits.done = generation + 1;
        commits
            .failed
            .retain(|(g, _)| generation.saturating_sub(*g) < 1024);
        commits.failed.push((generation, why.to_owned()));
        drop(commits);
        self.committed.notify_all();
    }

    /// Commits the open batch (writer lock held) and wakes its waiters.
    fn commit_locked(&self, st: &mut Writer) -> rusqlite::Result<()> {
        let result = if st.in_txn {
            exec(&st.conn, "COMMIT")
        } else {
            Ok(())
        };
        if result.is_err() {
            let _ = exec(&st.conn, "ROLLBACK");
            self.recent.discard_batch();
        } else if st.in_txn {
            // The copy holds the batch's rows before anyone reads up to them.
            self.recent.absorb(&st.conn, st.next);
            self.stream.store(st.next, Ordering::Release);
        }
        self.hints.batch_ended();
        st.in_txn = false;
        st.batch = 0;
        let generation = st.generation;
        st.generation += 1;
        let mut commits = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        commits.done = generation + 1;
        commits
            .failed
            .retain(|(g, _)| generation.saturating_sub(*g) < 1024);
        if let Err(e) = &result {
            commits.failed.push((generation, e.to_string()));
        }
        drop(commits);
        self.committed.notify_all();
        if result.is_ok() {
            self.maybe_restart_wal(st);
        }
        result
    }

    /// A PASSIVE checkpoint never lets the WAL start over while writes keep
    /// coming, so once it is long the writer (between batches, its waiters
    /// already answered) checkpoints with RESTART: the checkpointer has copied
    /// nearly all of it, so this is mostly waiting for readers to leave the WAL —
    /// briefly, and not again for a while if a long read holds it.
    fn maybe_restart_wal(&self, st: &Writer) {
        if self.wal_frames.load(Ordering::Relaxed) < self.wal_restart_pages {
            return;
        }
        let now = std::time::Instant::now();
        let mut next = self.next_restart.lock().unwrap_or_else(|p| p.into_inner());
        if now < *next {
            return;
        }
        let _ = st.conn.busy_timeout(WAL_RESTART_WAIT);
        let outcome = st
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
        let _ = st.conn.busy_timeout(std::time::Duration::from_secs(10));
        match outcome {
            Ok(0) => self.wal_frames.store(0, Ordering::Relaxed),
            Ok(_) => {
                tracing::debug!("WAL restart deferred: readers still in the WAL");
                *next = now + WAL_RESTART_RETRY;
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL restart failed");
                *next = now + WAL_RESTART_RETRY;
            }
        }
    }

    /// Runs `f` with a read connection (each statement sees the latest commit).
    pub fn read<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.read_with(false, f)
    }

    /// Runs `f` with a read connection in one read transaction: one consistent
    /// snapshot, and the WAL read lock taken once (for many-statement reads).
    pub fn read_snapshot<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        self.read_with(true, f)
    }

    fn read_with<T, E: From<rusqlite::Error>>(
        &self,
        snapshot: bool,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = {
            let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            pool.pop()
        };
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                apply_key(&c, self.key.as_deref().map(String::as_str))?;
                configure_common(&c)?;
                // Small: in WAL mode any commit by the writer empties it anyway.
                c.pragma_update(None, "cache_size", -1000)?;
                c
            }
        };
        let began = snapshot && exec(&conn, "BEGIN").is_ok();
        let out = f(&conn);
        if began {
            let _ = exec(&conn, "COMMIT");
        }
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        out
    }

    /// Whether rows of this kind under this key may have been written after
    /// stream position `since` (false only when certainly not).
    pub fn may_have_changed(&self, kind: UserRows, key: &str, since: i64) -> bool {
        let h = self.hints.newest.lock().unwrap_or_else(|p| p.into_inner());
        since < h.floor
            || h.map
                .get(&(kind, key.to_owned()))
                .is_some_and(|&s| s > since)
    }

    /// Changes whenever a committed write changed one-time or fallback keys: a
    /// value read before a query and unchanged after it means the query saw
    /// the keys of that version.
    pub fn keys_version(&self) -> u64 {
        self.hints.keys_version.load(Ordering::Acquire)
    }

    /// Changes whenever a committed write changed access tokens or users: a
    /// token found valid while this value was unchanged is still valid (read
    /// it before the lookup; it is raised after the commit).
    pub fn auth_version(&self) -> u64 {
        self.hints.auth_version.load(Ordering::Acquire)
    }

    /// Highest committed stream position.
    pub fn current_stream(&self) -> i64 {
        self.stream.load(Ordering::Acquire)
    }

    /// Flushes the WAL into the main file (used on clean shutdown).
    pub fn checkpoint(&self) {
        let mut st = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if st.in_txn {
            if let Err(e) = self.commit_locked(&mut st) {
                tracing::warn!(error = %e, "commit before checkpoint failed");
            }
        }
        if let Err(e) = st.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// A turn to write (see [`Db::write_turn`]), given back when dropped.
pub struct WriteTurn<'a> {
    db: &'a Db,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        self.db.wanting_turns.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A write (a savepoint of the current batch) with access to the stream counter.
pub struct WriteTxn<'a> {
    pub tx: &'a Connection,
    next: i64,
    hints: &'a UserHints,
}

/// Where the newest rows of a few kinds were written, recorded by this process
/// before commit: a sync whose token is at or past a hint (and past the start
/// of this process) knows nothing of that kind changed and skips the query.
/// A hint may run ahead of what is committed (a batch still open, or rolled
/// back): that only costs a query, never a missed row.
#[derive(Default)]
pub struct UserHints {
    newest: Mutex<Hints>,
    /// A write of the open batch changed one-time or fallback keys.
    keys_dirty: std::sync::atomic::AtomicBool,
    /// Counts batches that changed one-time or fallback keys, raised after
    /// their commit (see [`Db::keys_version`]).
    keys_version: std::sync::atomic::AtomicU64,
    /// A write of the open batch changed access tokens or users (set by the
    /// writer connection's update hook).
    auth_dirty: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Counts batches that changed access tokens or users, raised after their
    /// commit (see [`Db::auth_version`]).
    auth_version: std::sync::atomic::AtomicU64,
}

impl UserHints {
    /// After a batch ends (committed or rolled back): raises the versions of
    /// what it changed.
    fn batch_ended(&self) {
        if self.keys_dirty.swap(false, Ordering::AcqRel) {
            self.keys_version.fetch_add(1, Ordering::AcqRel);
        }
        if self.auth_dirty.swap(false, Ordering::AcqRel) {
            self.auth_version.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[derive(Default)]
struct Hints {
    /// Hints cover only positions after this one: the start of this process,
    /// raised to the newest hint whenever the map is emptied to bound it.
    floor: i64,
    /// The newest position any hint was noted at.
    top: i64,
    map: HashMap<(UserRows, String), i64>,
}

/// Hints kept before the map starts over (at ~100 bytes each).
const MAX_HINTS: usize = 100_000;

/// The kinds of rows [`UserHints`] keeps track of, and what their key is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum UserRows {
    /// A user's global or per-room account data (key: user id).
    AccountData,
    /// Invites from other servers (key: user id).
    RemoteInvites,
    /// A timeline event or receipt in a room (key: room id).
    Room,
    /// A receipt in a room (key: room id).
    Receipts,
    /// A local user's event in a room (key: [`user_room`]).
    Sent,
    /// A local user's read receipt in a room (key: [`user_room`]).
    ReadReceipt,
    /// Any membership event, or any device-list change (key: empty).
    Membership,
    /// A room's current state rewritten without a timeline event of its own:
    /// a resolution across a fork, or the state a remote join brought (key: room id).
    StateRewritten,
    DeviceLists,
}

/// The key of a per-user, per-room hint.
pub fn user_room(user: &str, room: &str) -> String {
    let mut k = String::with_capacity(user.len() + room.len() + 1);
    k.push_str(user);
    k.push('\u{0}');
    k.push_str(room);
    k
}

impl UserHints {
    fn note(&self, kind: UserRows, key: &str, stream: i64) {
        let mut h = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        h.top = h.top.max(stream);
        if let Some(e) = h.map.get_mut(&(kind, key.to_owned())) {
            *e = (*e).max(stream);
            return;
        }
        if h.map.len() >= MAX_HINTS {
            h.floor = h.top;
            h.map.clear();
        }
        h.map.insert((kind, key.to_owned()), stream);
    }
}

impl WriteTxn<'_> {
    /// Runs a statement through the connection's statement cache (the write
    /// path runs the same few statements for every event; parsing them each
    /// time showed in profiles).
    pub fn execute<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.tx.prepare_cached(sql)?.execute(params)
    }

    /// Records that a row of this kind under this key was written at `stream`
    /// (see [`Db::may_have_changed`]); every writer of such rows calls it.
    pub fn note(&self, kind: UserRows, key: &str, stream: i64) {
        self.hints.note(kind, key, stream);
    }

    /// Records that this write changes one-time or fallback keys (see
    /// [`Db::keys_version`]).
    pub fn keys_changed(&self) {
        self.hints.keys_dirty.store(true, Ordering::Release);
    }

    /// Takes the next stream position.
    pub fn next_stream(&mut self) -> i64 {
        self.next += 1;
        self.next
    }

    /// Persists the stream counter so positions never go backwards after restart
    /// even if the newest rows were rows that get deleted.
    pub fn persist_stream(&self) -> rusqlite::Result<()> {
        self.tx.execute(
            "INSERT INTO meta(key,value) VALUES('stream',?1) ON CONFLICT(key) DO UPDATE SET value=?1",
            [self.next.to_string()],
        )?;
        Ok(())
    }
}

impl std::ops::Deref for WriteTxn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_groups_move_from_the_old_table_onto_the_event_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            // A database as older versions left it: the groups in `event_state`.
            let db = Db::open(&path, Durability::Normal).unwrap();
            db.write(|w| {
                w.tx.execute_batch(
                    "INSERT INTO events(stream, event_id, room_id, sender, type, depth, origin_server_ts, json)
                     VALUES(1, '$a', '!r:x', '@u:x', 'm.room.create', 1, 0, '{}'),
                           (2, '$b', '!r:x', '@u:x', 'm.room.message', 2, 0, '{}'),
                           (3, '$c', '!r:x', '@u:x', 'm.room.message', 3, 0, '{}');
                     CREATE TABLE event_state (event_id TEXT PRIMARY KEY, before_grp INTEGER NOT NULL,
                         after_grp INTEGER NOT NULL) WITHOUT ROWID;
                     INSERT INTO event_state VALUES('$a', 0, 7), ('$b', 7, 7);",
                )
            })
            .unwrap();
        }
        let db = Db::open(&path, Durability::Normal).unwrap();
        let groups = |id: &str| db.read(|c| crate::state::event_groups(c, id)).unwrap();
        assert_eq!(groups("$a"), Some((0, 7)));
        assert_eq!(groups("$b"), Some((7, 7)));
        assert_eq!(groups("$c"), None, "an event without state has none");
        let old_table: bool = db
            .read(|c| {
                c.prepare("SELECT 1 FROM sqlite_master WHERE name='event_state'")?
                    .exists([])
            })
            .unwrap();
        assert!(!old_table);
    }

    #[test]
    fn older_databases_keep_their_extremities_and_search_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            // As older versions left it: a rowid table of extremities, every
            // stored event already indexed, no `fts_upto`.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE forward_extremities (room_id TEXT NOT NULL, event_id TEXT NOT NULL,
                     PRIMARY KEY (room_id, event_id));
                 INSERT INTO forward_extremities VALUES('!r:x', '$b'), ('!s:x', '$c');",
            )
            .unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute_batch(
                "INSERT INTO events(stream, event_id, room_id, sender, type, depth, origin_server_ts, json)
                 VALUES(4, '$b', '!r:x', '@u:x', 'm.room.message', 2, 0, '{}');",
            )
            .unwrap();
        }
        let db = Db::open(&path, Durability::Normal).unwrap();
        let (sql, rows, upto): (String, Vec<String>, String) = db
            .read(|c| {
                let sql = c.query_row(
                    "SELECT sql FROM sqlite_master WHERE name='forward_extremities'",
                    [],
                    |r| r.get(0),
                )?;
                let rows = c
                    .prepare("SELECT room_id || event_id FROM forward_extremities ORDER BY 1")?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let upto = c.query_row("SELECT value FROM meta WHERE key='fts_upto'", [], |r| {
                    r.get(0)
                })?;
                Ok::<_, rusqlite::Error>((sql, rows, upto))
            })
            .unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
        assert_eq!(rows, vec!["!r:x$b", "!s:x$c"]);
        assert_eq!(upto, "4", "what was stored before is indexed already");
    }

    #[test]
    fn failed_and_panicking_writes_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        let put = |k: &str| format!("INSERT INTO meta(key, value) VALUES('{k}', 'v')");
        db.write(|w| w.tx.execute(&put("a"), [])).unwrap();
        let err: Result<(), rusqlite::Error> = db.write(|w| {
            w.tx.execute(&put("b"), [])?;
            Err(rusqlite::Error::InvalidQuery)
        });
        assert!(err.is_err());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Result<(), rusqlite::Error> = db.write(|w| {
                w.tx.execute(&put("c"), [])?;
                panic!("boom");
            });
        }));
        assert!(caught.is_err(), "the panic reaches the caller");
        db.write(|w| w.tx.execute(&put("d"), [])).unwrap();
        let keys: Vec<String> = db
            .read(|c| {
                let mut st = c.prepare("SELECT key FROM meta WHERE value='v' ORDER BY key")?;
                let r = st.query_map([], |r| r.get(0))?.collect();
                r
            })
            .unwrap();
        assert_eq!(keys, vec!["a", "d"]);
    }

    #[test]
    fn per_user_notification_rows_are_folded_into_one_row_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                r#"CREATE TABLE notifications (user_id TEXT NOT NULL, room_id TEXT NOT NULL, stream INTEGER NOT NULL,
                    event_id TEXT NOT NULL, thread_id TEXT, highlight INTEGER NOT NULL, actions TEXT NOT NULL,
                    ts INTEGER NOT NULL, PRIMARY KEY (user_id, room_id, stream)) WITHOUT ROWID;
                   INSERT INTO notifications VALUES('@a:x','!r:x',7,'$e',NULL,0,'["notify"]',1);
                   INSERT INTO notifications VALUES('@b:x','!r:x',7,'$e',NULL,1,'["notify",{"set_tweak":"highlight"}]',1);
                   INSERT INTO notifications VALUES('@a:x','!r:x',9,'$f','$root',0,'["notify"]',2);"#,
            )
            .unwrap();
        }
        let db = Db::open(&path, Durability::Normal).unwrap();
        let rows: Vec<(i64, String, String, Option<String>)> = db
            .read(|c| {
                let mut st = c.prepare(
                    "SELECT stream, users, highlights, thread_id FROM event_push ORDER BY stream",
                )?;
                let r = st
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect();
                r
            })
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    7,
                    "\n@a:x\t0\n@b:x\t1\n".to_owned(),
                    "\n@b:x\n".to_owned(),
                    None
                ),
                (
                    9,
                    "\n@a:x\t0\n".to_owned(),
                    "\n".to_owned(),
                    Some("$root".to_owned())
                ),
            ]
        );
        let b = db.read(|c| crate::push::actions_for(c, 7, "@b:x")).unwrap();
        assert_eq!(
            b,
            Some(serde_json::json!(["notify", {"set_tweak": "highlight"}]))
        );
        assert_eq!(
            db.read(|c| crate::push::actions_for(c, 7, "@c:x")).unwrap(),
            None
        );
        let gone: bool = db
            .read(|c| {
                c.prepare("SELECT 1 FROM sqlite_master WHERE name='notifications'")?
                    .exists([])
            })
            .unwrap();
        assert!(!gone);
    }

    #[test]
    fn the_wal_starts_over_under_constant_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut db = Db::open(&path, Durability::Normal).unwrap();
        // The mechanism at a 16 MiB threshold, so the test writes only ~50 MiB.
        db.wal_restart_pages = 4096;
        let wal = dir.path().join("w.db-wal");
        let value = "x".repeat(1000);
        let started = std::time::Instant::now();
        let mut max_wal = 0;
        // 64 000 rows of 1 KB in 64 batches, paced so the checkpointer (every
        // 250 ms) sees the WAL grow; without restarts it would hold all ~50 MiB.
        for batch in 0..64 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(120),
                "too slow"
            );
            db.write(|w| -> rusqlite::Result<()> {
                for i in 0..1000 {
                    w.tx.execute(
                        "INSERT INTO meta(key, value) VALUES(?1, ?2)",
                        rusqlite::params![format!("k{batch}-{i}"), value],
                    )?;
                }
                Ok(())
            })
            .unwrap();
            max_wal = max_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        assert!(max_wal < 40 * 1024 * 1024, "WAL grew to {max_wal} bytes");
        let rows: i64 = db
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                    r.get(0)
                })
            })
            .unwrap();
        assert_eq!(rows, 64_000);
    }
}
