//! Transaction ids of room sends (`PUT /send/…/{txnId}`, `PUT /redact/…/{txnId}`):
//! a retry of the same request from the same device gets the same event back.
//!
//! The event row already records its transaction (`events.txn_id`,
//! `txn_device`), so the lookup is an in-memory map from a keyed hash of
//! (user, device, endpoint, txn id) to the event's stream position, checked
//! against that row. Nothing extra is written per message: a separate
//! transaction table indexed by those strings cost about two B-tree pages per
//! message, each written to the log (and encrypted) at every commit.
//!
//! The map holds the newest [`REMEMBERED`] sends of the whole box and is
//! rebuilt from the event rows at start, so a retry is recognised across
//! restarts as long as it is among them (Synapse forgets transaction ids after
//! a day; clients retry within minutes).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, Hash, Hasher},
    sync::Mutex,
};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

/// How many of the newest sends are recognised when retried.
pub(crate) const REMEMBERED: usize = 32_768;

/// How far back (in stream positions) the rebuild at start looks for them.
const SCAN_BACK: i64 = 8 * REMEMBERED as i64;

/// The endpoint scope of a send (MSC3970: a transaction id belongs to one
/// device and one endpoint).
pub(crate) fn send_scope(room_id: &str, kind: &str) -> String {
    format!("send:{room_id}:{kind}")
}

/// The endpoint scope of a redaction.
pub(crate) fn redact_scope(room_id: &str, redacts: &str) -> String {
    format!("redact:{room_id}:{redacts}")
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, i64>,
    order: VecDeque<u64>,
}

pub(crate) struct RecentTxns {
    keys: std::collections::hash_map::RandomState,
    inner: Mutex<Inner>,
}

impl RecentTxns {
    fn key(&self, user: &str, device: &str, scope: &str, txn_id: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        (user, device, scope, txn_id).hash(&mut h);
        h.finish()
    }

    fn remember_key(&self, key: u64, stream: i64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.map.insert(key, stream).is_none() {
            g.order.push_back(key);
        }
        while g.order.len() > REMEMBERED {
            if let Some(old) = g.order.pop_front() {
                g.map.remove(&old);
            }
        }
    }

    /// The event an earlier identical request made, if it is remembered and
    /// its row says so (a remembered position whose write was rolled back, or
    /// a hash collision, is not a match).
    pub(crate) fn lookup(
        &self,
        c: &Connection,
        user: &str,
        device: &str,
        scope: &str,
        txn_id: &str,
    ) -> rusqlite::Result<Option<String>> {
        let key = self.key(user, device, scope, txn_id);
        let stream = {
            let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.map.get(&key).copied()
        };
        let Some(stream) = stream else {
            return Ok(None);
        };
        c.prepare_cached(
            "SELECT event_id FROM events WHERE stream=?1 AND sender=?2 AND txn_device=?3 AND txn_id=?4",
        )?
        .query_row(params![stream, user, device, txn_id], |r| r.get(0))
        .optional()
    }

    /// Records that this request made the event at `stream`.
    pub(crate) fn remember(
        &self,
        user: &str,
        device: &str,
        scope: &str,
        txn_id: &str,
        stream: i64,
    ) {
        self.remember_key(self.key(user, device, scope, txn_id), stream);
    }

    /// Rebuilds the map from the newest event rows that carry a transaction.
    pub(crate) fn load(c: &Connection) -> rusqlite::Result<Self> {
        let t = RecentTxns {
            keys: Default::default(),
            inner: Mutex::new(Inner::default()),
        };
        let newest: i64 = c.query_row("SELECT COALESCE(MAX(stream), 0) FROM events", [], |r| {
            r.get(0)
        })?;
        let mut st = c.prepare(
            "SELECT stream, sender, txn_device, txn_id, room_id, type, json FROM events
             WHERE stream > ?1 AND txn_id IS NOT NULL AND txn_device IS NOT NULL
             ORDER BY stream DESC LIMIT ?2",
        )?;
        let mut rows = st.query(params![newest - SCAN_BACK, REMEMBERED as i64])?;
        let mut found = Vec::new();
        while let Some(r) = rows.next()? {
            let (stream, user, device, txn): (i64, String, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let (room, kind): (String, String) = (r.get(4)?, r.get(5)?);
            found.push((
                stream,
                t.key(&user, &device, &send_scope(&room, &kind), &txn),
            ));
            if kind == "m.room.redaction" {
                // Made by /send or by /redact: the row does not say which, so
                // a retry of either is recognised.
                let json: String = r.get(6)?;
                let v: Value = serde_json::from_str(&json).unwrap_or_default();
                let redacts = v["redacts"].as_str().or(v["content"]["redacts"].as_str());
                if let Some(target) = redacts {
                    found.push((
                        stream,
                        t.key(&user, &device, &redact_scope(&room, target), &txn),
                    ));
                }
            }
        }
        // Oldest first, so the newest are the last to be forgotten.
        for (stream, key) in found.into_iter().rev() {
            t.remember_key(key, stream);
        }
        Ok(t)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE events (stream INTEGER PRIMARY KEY, event_id TEXT, room_id TEXT, sender TEXT,
                 type TEXT, json TEXT, txn_id TEXT, txn_device TEXT);",
        )
        .unwrap();
        c
    }

    fn insert(c: &Connection, stream: i64, id: &str, kind: &str, json: &str, txn: Option<&str>) {
        c.execute(
            "INSERT INTO events VALUES(?1,?2,'!r:x','@a:x',?3,?4,?5,?6)",
            params![stream, id, kind, json, txn, txn.map(|_| "DEV")],
        )
        .unwrap();
    }

    #[test]
    fn a_remembered_send_is_found_only_for_the_same_request_and_row() {
        let c = db();
        let t = RecentTxns::load(&c).unwrap();
        insert(&c, 5, "$e5", "m.room.message", "{}", Some("t1"));
        let scope = send_scope("!r:x", "m.room.message");
        t.remember("@a:x", "DEV", &scope, "t1", 5);
        let found = |user: &str, dev: &str, scope: &str, txn: &str| {
            t.lookup(&c, user, dev, scope, txn).unwrap()
        };
        assert_eq!(found("@a:x", "DEV", &scope, "t1").as_deref(), Some("$e5"));
        assert_eq!(found("@a:x", "DEV", &scope, "t2"), None);
        assert_eq!(found("@a:x", "OTHER", &scope, "t1"), None);
        assert_eq!(found("@b:x", "DEV", &scope, "t1"), None);
        assert_eq!(
            found("@a:x", "DEV", &send_scope("!r:x", "m.reaction"), "t1"),
            None
        );
        // A remembered position whose row is another event (a rolled-back write).
        t.remember("@a:x", "DEV", &scope, "t9", 6);
        insert(&c, 6, "$e6", "m.room.message", "{}", Some("other"));
        assert_eq!(found("@a:x", "DEV", &scope, "t9"), None);
    }

    #[test]
    fn the_map_is_rebuilt_from_event_rows_and_stays_bounded() {
        let c = db();
        insert(&c, 1, "$m", "m.room.message", "{}", Some("t1"));
        insert(&c, 2, "$x", "m.room.message", "{}", None);
        insert(
            &c,
            3,
            "$r",
            "m.room.redaction",
            r#"{"content":{"redacts":"$m"}}"#,
            Some("t2"),
        );
        let t = RecentTxns::load(&c).unwrap();
        let scope = send_scope("!r:x", "m.room.message");
        assert_eq!(
            t.lookup(&c, "@a:x", "DEV", &scope, "t1")
                .unwrap()
                .as_deref(),
            Some("$m")
        );
        let by_redact = redact_scope("!r:x", "$m");
        let by_send = send_scope("!r:x", "m.room.redaction");
        assert_eq!(
            t.lookup(&c, "@a:x", "DEV", &by_redact, "t2")
                .unwrap()
                .as_deref(),
            Some("$r")
        );
        assert_eq!(
            t.lookup(&c, "@a:x", "DEV", &by_send, "t2")
                .unwrap()
                .as_deref(),
            Some("$r")
        );
        assert_eq!(t.len(), 3);
        for i in 0..(REMEMBERED as i64 + 10) {
            t.remember("@a:x", "DEV", &scope, &format!("n{i}"), 100 + i);
        }
        assert_eq!(t.len(), REMEMBERED);
        // The oldest went first.
        assert_eq!(t.lookup(&c, "@a:x", "DEV", &scope, "t1").unwrap(), None);
    }
}
