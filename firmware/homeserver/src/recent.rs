//! The newest timeline rows in memory: events and their push rows, as the
//! last commits left them.
//!
//! Every commit by the writer empties the page cache of every read
//! connection (SQLite in WAL mode keeps no page across another connection's
//! write), so each /sync after a message read the room's newest index and
//! table pages from the file again — and with the database encrypted,
//! decrypted and authenticated each of them again. The long-polling syncs
//! that one message wakes all ask for the same few rows: they are answered
//! from here.
//!
//! The writer connection's update hook notes which `events` and `event_push`
//! rows a batch touched (inserted, updated or deleted, by any statement);
//! after the batch commits, and before its stream positions are published,
//! those rows are read back from the writer's own (still valid) cache and
//! this copy follows them. It is complete for every stream position above
//! `floor`: a question reaching at or below it goes to the database.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use rusqlite::{params, Connection};

use crate::pdu::{row_to_event, StoredEvent, EVENT_COLS};

/// Memory the copy may use before its oldest rows are dropped.
pub const RECENT_BYTES: usize = 4 * 1024 * 1024;

/// Rows touched by the open batch, noted by the writer's update hook.
#[derive(Default)]
pub struct Touched {
    events: Vec<i64>,
    push: Vec<i64>,
}

impl Touched {
    /// Notes a row change (called from the update hook).
    pub fn note(&mut self, table: &str, rowid: i64) {
        match table {
            "events" => self.events.push(rowid),
            "event_push" => self.push.push(rowid),
            _ => {}
        }
    }
}

pub struct Recent {
    inner: Mutex<Inner>,
    pub(crate) touched: Arc<Mutex<Touched>>,
    budget: std::sync::atomic::AtomicUsize,
}

struct Inner {
    /// Complete for every stream position above this one.
    floor: i64,
    bytes: usize,
    rooms: HashMap<Arc<str>, RoomTail>,
    /// Stream position → room, oldest first (events and push rows share
    /// positions), to drop the oldest when over budget.
    order: BTreeMap<i64, Arc<str>>,
}

#[derive(Default)]
struct RoomTail {
    events: BTreeMap<i64, Cached>,
    push: BTreeMap<i64, PushRow>,
}

struct Cached {
    event: StoredEvent,
    sender: String,
    outlier: bool,
}

struct PushRow {
    in_thread: bool,
    users: String,
    highlights: String,
}

fn event_size(c: &Cached) -> usize {
    let e = &c.event;
    96 + e.json.len()
        + e.event_id.len()
        + e.room_id.len()
        + c.sender.len()
        + e.redacted_by.as_ref().map_or(0, String::len)
        + e.txn_id.as_ref().map_or(0, String::len)
        + e.txn_device.as_ref().map_or(0, String::len)
        + e.prev_state.as_ref().map_or(0, String::len)
}

fn push_size(p: &PushRow) -> usize {
    48 + p.users.len() + p.highlights.len()
}

impl Recent {
    /// An empty copy, complete above `stream` (the newest position at open).
    pub fn new(stream: i64, budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::empty(stream)),
            touched: Arc::default(),
            budget: budget.into(),
        }
    }

    /// Changes the memory budget (smaller in tests, to see rows dropped).
    #[cfg(test)]
    pub fn set_budget(&self, bytes: usize) {
        self.budget
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what a batch that did not commit touched.
    pub fn discard_batch(&self) {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        t.events.clear();
        t.push.clear();
    }

    /// After a commit (writer lock held, before the new stream position is
    /// published): reads back what the batch touched. On a read error the
    /// copy is emptied and starts over above `stream`, never left stale.
    pub fn absorb(&self, conn: &Connection, stream: i64) {
        let (mut events, mut push) = {
            let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut t.events), std::mem::take(&mut t.push))
        };
        if events.is_empty() && push.is_empty() {
            return;
        }
        let floor = self.lock().floor;
        for v in [&mut events, &mut push] {
            v.retain(|&s| s > floor);
            v.sort_unstable();
            v.dedup();
        }
        let read = read_rows(conn, &events, &push);
        let mut inner = self.lock();
        match read {
            Ok((ev_rows, push_rows)) => {
                for (s, row) in events.iter().zip(ev_rows) {
                    inner.put_event(*s, row);
                }
                for (s, row) in push.iter().zip(push_rows) {
                    inner.put_push(*s, row);
                }
                let budget = self.budget.load(std::sync::atomic::Ordering::Relaxed);
                while inner.bytes > budget {
                    if !inner.drop_oldest() {
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading back the newest rows failed; starting over");
                *inner = Inner::empty(stream);
            }
        }
    }

    /// The room's newest `limit` timeline events in `(after, upto]`, oldest
    /// first, and whether more were left out — as
    /// [`crate::sync::events_between`] answers from the database; `None`
    /// when the copy does not hold the answer.
    pub fn events_between(
        &self,
        room: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Option<(Vec<StoredEvent>, bool)> {
        let inner = self.lock();
        let want = usize::try_from(limit).ok()?.saturating_add(1);
        let lo = after.max(inner.floor);
        let mut rows: Vec<StoredEvent> = match inner.rooms.get(room) {
            Some(t) if lo < upto => t
                .events
                .range(lo + 1..=upto)
                .rev()
                .filter(|(_, c)| !c.outlier)
                .take(want)
                .map(|(_, c)| c.event.clone())
                .collect(),
            _ => Vec::new(),
        };
        // Below the floor the copy knows nothing, unless the newest rows
        // above it already fill the answer.
        if after < inner.floor && rows.len() < want {
            return None;
        }
        let limited = rows.len() == want;
        rows.truncate(want - 1);
        rows.reverse();
        Some((rows, limited))
    }

    /// (count, highlights) of push rows in `(after, upto]` whose user list
    /// holds `needle` (main timeline only when `main_only`), counting at
    /// most `cap` rows; `None` when the copy does not reach back to `after`.
    #[allow(clippy::too_many_arguments)]
    pub fn count_notifying(
        &self,
        room: &str,
        needle: &str,
        highlight_needle: &str,
        main_only: bool,
        after: i64,
        upto: i64,
        cap: i64,
    ) -> Option<(i64, i64)> {
        let inner = self.lock();
        if after < inner.floor {
            return None;
        }
        let Some(t) = inner.rooms.get(room).filter(|_| after < upto) else {
            return Some((0, 0));
        };
        let (mut n, mut h) = (0, 0);
        for p in t
            .push
            .range(after + 1..=upto)
            .map(|(_, p)| p)
            .filter(|p| !(main_only && p.in_thread) && p.users.contains(needle))
            .take(usize::try_from(cap).unwrap_or(0))
        {
            n += 1;
            h += i64::from(p.highlights.contains(highlight_needle));
        }
        Some((n, h))
    }

    /// Stream position of `user`'s newest event in the room within
    /// `(after, upto]`, or 0; `None` when the copy does not reach back.
    pub fn own_newest(&self, room: &str, user: &str, after: i64, upto: i64) -> Option<i64> {
        let inner = self.lock();
        if after < inner.floor {
            return None;
        }
        Some(
            inner
                .rooms
                .get(room)
                .filter(|_| after < upto)
                .and_then(|t| {
                    t.events
                        .range(after + 1..=upto)
                        .rev()
                        .find(|(_, c)| c.sender == user)
                        .map(|(s, _)| *s)
                })
                .unwrap_or(0),
        )
    }
}

type EventRow = Option<(StoredEvent, String, bool)>;
type PushRead = Option<(String, bool, String, String)>;

/// The current rows at these stream positions (sorted; `None`: no such row
/// now), read run by run: a batch's new rows are consecutive positions, so
/// one range query per table usually reads them all.
fn read_rows(
    conn: &Connection,
    events: &[i64],
    push: &[i64],
) -> rusqlite::Result<(Vec<EventRow>, Vec<PushRead>)> {
    let mut ev_st = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS}, sender, outlier FROM events WHERE stream BETWEEN ?1 AND ?2"
    ))?;
    let ev_rows = by_runs(events, |lo, hi| {
        ev_st
            .query_map([lo, hi], |r| {
                Ok((r.get(0)?, (row_to_event(r)?, r.get(8)?, r.get(9)?)))
            })?
            .collect()
    })?;
    let mut push_st = conn.prepare_cached(
        "SELECT stream, room_id, thread_id IS NOT NULL, users, highlights FROM event_push
         WHERE stream BETWEEN ?1 AND ?2",
    )?;
    let push_rows = by_runs(push, |lo, hi| {
        push_st
            .query_map(params![lo, hi], |r| {
                Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            })?
            .collect()
    })?;
    Ok((ev_rows, push_rows))
}

/// Positions further apart than this start a new run (and a new query).
const RUN_GAP: i64 = 8;

/// For sorted `positions`: the row at each, fetched with `range(lo, hi)`
/// (rows as (position, row), ascending) once per run of close positions.
fn by_runs<T>(
    positions: &[i64],
    mut range: impl FnMut(i64, i64) -> rusqlite::Result<Vec<(i64, T)>>,
) -> rusqlite::Result<Vec<Option<T>>> {
    let mut out = Vec::with_capacity(positions.len());
    let mut i = 0;
    while i < positions.len() {
        let mut j = i + 1;
        while j < positions.len() && positions[j] - positions[j - 1] <= RUN_GAP {
            j += 1;
        }
        let mut rows = range(positions[i], positions[j - 1])?
            .into_iter()
            .peekable();
        for &p in &positions[i..j] {
            while rows.next_if(|(s, _)| *s < p).is_some() {}
            out.push(rows.next_if(|(s, _)| *s == p).map(|(_, r)| r));
        }
        i = j;
    }
    Ok(out)
}

impl Inner {
    fn empty(floor: i64) -> Self {
        Self {
            floor,
            bytes: 0,
            rooms: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn put_event(&mut self, stream: i64, row: EventRow) {
        let row = row.map(|(event, sender, outlier)| {
            let room = event.room_id.clone();
            let cached = Cached {
                event,
                sender,
                outlier,
            };
            (room, cached)
        });
        self.put(stream, row, |t| &mut t.events, event_size);
    }

    fn put_push(&mut self, stream: i64, row: PushRead) {
        let row = row.map(|(room, in_thread, users, highlights)| {
            let p = PushRow {
                in_thread,
                users,
                highlights,
            };
            (room, p)
        });
        self.put(stream, row, |t| &mut t.push, push_size);
    }

    /// Sets (or, for `None`: a deleted row, or one whose insert was rolled
    /// back, removes) the row at `stream` in one of the rooms' maps.
    fn put<T>(
        &mut self,
        stream: i64,
        row: Option<(String, T)>,
        map: fn(&mut RoomTail) -> &mut BTreeMap<i64, T>,
        size: fn(&T) -> usize,
    ) {
        let Some((room, value)) = row else {
            let room = self.order.get(&stream).cloned();
            if let Some(old) = room.and_then(|r| map(self.rooms.get_mut(&r)?).remove(&stream)) {
                self.bytes -= size(&old);
            }
            return;
        };
        let key = match self.rooms.get_key_value(room.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(room),
        };
        let added = size(&value);
        let tail = self.rooms.entry(key.clone()).or_default();
        let old = map(tail).insert(stream, value).map(|o| size(&o));
        self.bytes = self.bytes + added - old.unwrap_or(0);
        self.order.insert(stream, key);
    }

    /// Drops the oldest position and raises the floor to it; false when empty.
    fn drop_oldest(&mut self) -> bool {
        let Some((stream, room)) = self.order.pop_first() else {
            return false;
        };
        if let Some(t) = self.rooms.get_mut(&room) {
            if let Some(old) = t.events.remove(&stream) {
                self.bytes -= event_size(&old);
            }
            if let Some(old) = t.push.remove(&stream) {
                self.bytes -= push_size(&old);
            }
            if t.events.is_empty() && t.push.is_empty() {
                self.rooms.remove(&room);
            }
        }
        self.floor = self.floor.max(stream);
        true
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use crate::{
        config::Durability,
        db::Db,
        push::{count_notifying_stored, needles, own_newest_stored, COUNT_CAP},
        sync::events_between_stored,
    };

    const ROOMS: [&str; 3] = ["!a:x", "!b:x", "!c:x"];
    const USERS: [&str; 4] = ["@u0:x", "@u1:x", "@u2:x", "@u3:x"];

    /// Every answer the copy gives equals the database's, through inserts,
    /// redactions, deletions, rolled-back writes, rows below the floor and
    /// rows dropped for the budget; and it does answer most questions.
    #[test]
    fn answers_from_memory_equal_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        db.recent.set_budget(24 * 1024);
        let mut rng = StdRng::seed_from_u64(7);
        let (mut asked, mut answered) = (0, 0);
        for round in 0..150 {
            // One batch of a few writes (group commit puts several in one).
            let writes = rng.gen_range(1..6);
            for _ in 0..writes {
                let kind = rng.gen_range(0..10);
                let seed: u64 = rng.gen();
                let _ = db.write(|w| -> rusqlite::Result<()> {
                    let mut r = StdRng::seed_from_u64(seed);
                    match kind {
                        // Redact a random earlier event.
                        0 => {
                            let top: i64 = w.tx.query_row(
                                "SELECT COALESCE(MAX(stream), 1) FROM events",
                                [],
                                |r| r.get(0),
                            )?;
                            let s = r.gen_range(1..=top.max(1));
                            w.tx.execute(
                                "UPDATE events SET json='{\"redacted\":true}', redacted_by='$r' WHERE stream=?1",
                                [s],
                            )?;
                        }
                        // Forget a random push row (housekeeping prunes old ones).
                        1 => {
                            let top: i64 = w.tx.query_row(
                                "SELECT COALESCE(MAX(stream), 1) FROM events",
                                [],
                                |r| r.get(0),
                            )?;
                            let s = r.gen_range(1..=top.max(1));
                            w.tx.execute("DELETE FROM event_push WHERE stream=?1", [s])?;
                        }
                        // A write that fails after inserting: rolled back.
                        2 => {
                            let s = w.next_stream();
                            insert(w.tx, &mut r, s)?;
                            return Err(rusqlite::Error::InvalidQuery);
                        }
                        // A backfilled event, below every position.
                        3 => {
                            let s: i64 = w.tx.query_row(
                                "SELECT COALESCE(MIN(stream), 0) - 1 FROM events",
                                [],
                                |r| r.get(0),
                            )?;
                            insert(w.tx, &mut r, s)?;
                        }
                        _ => {
                            let s = w.next_stream();
                            insert(w.tx, &mut r, s)?;
                        }
                    }
                    w.persist_stream()
                });
            }
            let top = db.current_stream();
            for _ in 0..40 {
                let room = ROOMS[rng.gen_range(0..ROOMS.len())];
                let user = USERS[rng.gen_range(0..USERS.len())];
                // Mostly as syncs ask (the newest few positions), sometimes
                // anywhere in the history.
                let (upto, after) = if rng.gen_bool(0.7) {
                    (top, (top - rng.gen_range(0..30)).max(-3))
                } else {
                    let upto = rng.gen_range(0..=top);
                    (upto, rng.gen_range(-3..=upto))
                };
                let limit = rng.gen_range(0..8);
                let main_only = rng.gen_bool(0.5);
                asked += 1;
                let stored = db
                    .read(|c| events_between_stored(c, room, after, upto, limit))
                    .unwrap();
                if let Some((mem, limited)) = db.recent.events_between(room, after, upto, limit) {
                    answered += 1;
                    let ids = |v: &[crate::pdu::StoredEvent]| {
                        v.iter()
                            .map(|e| {
                                (
                                    e.stream,
                                    e.event_id.clone(),
                                    e.json.clone(),
                                    e.redacted_by.clone(),
                                )
                            })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(
                        (ids(&mem), limited),
                        (ids(&stored.0), stored.1),
                        "round {round}: events of {room} in ({after}, {upto}] limit {limit}"
                    );
                }
                let (n, h) = needles(user);
                if let Some(mem) = db
                    .recent
                    .count_notifying(room, &n, &h, main_only, after, upto, COUNT_CAP)
                {
                    let stored = db
                        .read(|c| count_notifying_stored(c, room, &n, &h, main_only, after, upto))
                        .unwrap();
                    assert_eq!(
                        mem, stored,
                        "round {round}: counts of {user} in {room} ({after}, {upto}]"
                    );
                }
                if let Some(mem) = db.recent.own_newest(room, user, after, upto) {
                    let stored = db
                        .read(|c| own_newest_stored(c, room, user, after, upto))
                        .unwrap();
                    assert_eq!(mem, stored, "round {round}: newest of {user} in {room}");
                }
            }
        }
        assert!(
            answered * 2 > asked,
            "the copy answered only {answered} of {asked} questions"
        );
        assert!(
            db.recent.lock().floor > 0,
            "the budget never dropped a row: the test did not reach below the floor"
        );
    }

    #[test]
    fn rows_are_read_run_by_run_and_missing_ones_are_none() {
        let stored = [1, 3, 20, 22, 40, 55];
        let mut queries = Vec::new();
        let got = super::by_runs(&[1, 2, 3, 20, 21, 22, 40, 41], |lo, hi| {
            queries.push((lo, hi));
            Ok(stored
                .iter()
                .filter(|s| (lo..=hi).contains(*s))
                .map(|s| (*s, s * 10))
                .collect())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                Some(10),
                None,
                Some(30),
                Some(200),
                None,
                Some(220),
                Some(400),
                None
            ]
        );
        assert_eq!(queries, vec![(1, 3), (20, 22), (40, 41)]);
    }

    /// An event row (outlier one time in eight) and, mostly, its push row.
    fn insert(c: &rusqlite::Connection, r: &mut StdRng, s: i64) -> rusqlite::Result<()> {
        let room = ROOMS[r.gen_range(0..ROOMS.len())];
        let sender = USERS[r.gen_range(0..USERS.len())];
        let body = "x".repeat(r.gen_range(10..400));
        c.execute(
            "INSERT INTO events(stream, event_id, room_id, sender, type, depth, origin_server_ts, json, outlier)
             VALUES(?1, '$e' || ?1, ?2, ?3, 'm.room.message', 1, 0, ?4, ?5)",
            rusqlite::params![s, room, sender, format!("{{\"body\":\"{body}\"}}"), r.gen_bool(0.125)],
        )?;
        if r.gen_bool(0.8) {
            let mut users = String::from("\n");
            let mut highlights = String::from("\n");
            for u in USERS.iter().filter(|u| **u != sender) {
                if r.gen_bool(0.7) {
                    users.push_str(&format!("{u}\t0\n"));
                    if r.gen_bool(0.3) {
                        highlights.push_str(&format!("{u}\n"));
                    }
                }
            }
            let thread = r.gen_bool(0.25).then_some("$root");
            c.execute(
                "INSERT INTO event_push(stream, room_id, event_id, thread_id, ts, users, highlights, actions)
                 VALUES(?1, ?2, '$e' || ?1, ?3, 0, ?4, ?5, '[]')",
                rusqlite::params![s, room, thread, users, highlights],
            )?;
        }
        Ok(())
    }
}
