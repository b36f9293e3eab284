//! Full-text search over room messages: SQLite FTS5 on stemmed words, so that
//! Russian and English word forms find each other («голосование» → «голосования»).

use std::sync::Arc;

use axum::extract::State;
use ruma::events::TimelineEventType;
use rusqlite::{params, Connection, OptionalExtension};
use rust_stemmers::{Algorithm, Stemmer};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    db::WriteTxn,
    error::{MxError, MxResult},
    extract::{Auth, Json, QueryArgs},
    filter::EventFilter,
    pdu::{self, client_event, Viewer},
    rooms::joined_room_ids,
    Hs,
};

/// Splits text into lowercase words and stems each with the stemmer of its script.
pub fn stems(text: &str) -> Vec<String> {
    thread_local! {
        static RU: Stemmer = Stemmer::create(Algorithm::Russian);
        static EN: Stemmer = Stemmer::create(Algorithm::English);
    }
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let lower = w.to_lowercase().replace('ё', "е");
            let cyrillic = lower
                .chars()
                .any(|c| ('\u{0400}'..='\u{04FF}').contains(&c));
            if cyrillic {
                RU.with(|s| s.stem(&lower).into_owned())
            } else if lower.chars().all(|c| c.is_ascii_alphabetic()) {
                EN.with(|s| s.stem(&lower).into_owned())
            } else {
                lower
            }
        })
        .collect()
}

/// The content field whose text is indexed, for the kinds of event that are.
fn searchable_field(kind: &TimelineEventType) -> Option<&'static str> {
    match kind {
        TimelineEventType::RoomMessage => Some("body"),
        TimelineEventType::RoomName => Some("name"),
        TimelineEventType::RoomTopic => Some("topic"),
        _ => None,
    }
}

fn searchable_text(kind: &TimelineEventType, content: &Value) -> Option<String> {
    content[searchable_field(kind)?].as_str().map(str::to_owned)
}

/// Events indexed per write: large enough that FTS5 writes one segment for
/// many messages, small enough that other writers wait only briefly.
const INDEX_BATCH: i64 = 1000;

/// Search indexing runs behind the writes that store messages: indexing each
/// message in its own commit wrote a new FTS5 segment (and its structure
/// record, document sizes and content) per commit, a sixth of every commit's
/// pages — each encrypted on the write path. `meta.fts_upto` is the stream
/// position up to which timeline events are indexed; what lies after it is
/// indexed in batches (every second by the housekeeping task, and before
/// every search, so search always sees every stored message).
#[derive(Default)]
pub struct Indexer {
    /// The committed stream position the last catch-up started from: no
    /// backlog can exist while the stream has not moved past it.
    checked: std::sync::atomic::AtomicI64,
}

/// Indexes the events stored since the last catch-up.
pub fn catch_up(hs: &Hs) -> rusqlite::Result<()> {
    use std::sync::atomic::Ordering;
    // Bounded: each round indexes up to INDEX_BATCH events and a round that
    // finds fewer ends it; the writers that arrive meanwhile are not chased.
    for _ in 0..64 {
        let now = hs.db.current_stream();
        if hs.indexer.checked.load(Ordering::Acquire) >= now {
            return Ok(());
        }
        let more = hs.db.write(index_backlog)?;
        if !more {
            hs.indexer.checked.fetch_max(now, Ordering::AcqRel);
            return Ok(());
        }
    }
    Ok(())
}

/// Indexes up to [`INDEX_BATCH`] timeline events after `meta.fts_upto` and
/// moves it past them; whether more may remain.
fn index_backlog(w: &mut WriteTxn<'_>) -> rusqlite::Result<bool> {
    let upto: i64 =
        w.tx.query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key='fts_upto'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let rows: Vec<(i64, String, String, String)> =
        w.tx.prepare_cached(
            "SELECT stream, room_id, type, json FROM events WHERE stream>?1 AND outlier=0
             ORDER BY stream LIMIT ?2",
        )?
        .query_map(params![upto, INDEX_BATCH], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let Some(last) = rows.last().map(|r| r.0) else {
        return Ok(false);
    };
    for (stream, room, kind, json) in &rows {
        let kind = TimelineEventType::from(kind.as_str());
        // Only the kinds with searchable text are worth parsing.
        if searchable_field(&kind).is_none() {
            continue;
        }
        let Ok(mut pdu) = serde_json::from_str::<Value>(json) else {
            continue;
        };
        index_event(w, *stream, room, &kind, &pdu["content"].take())?;
    }
    w.tx.execute(
        "INSERT INTO meta(key, value) VALUES('fts_upto', ?1)
         ON CONFLICT(key) DO UPDATE SET value=?1",
        [last.to_string()],
    )?;
    Ok(rows.len() as i64 == INDEX_BATCH)
}

/// Indexes one event (again, if it already was: indexing is idempotent).
fn index_event(
    w: &WriteTxn<'_>,
    stream: i64,
    room_id: &str,
    kind: &TimelineEventType,
    content: &Value,
) -> rusqlite::Result<()> {
    let Some(text) = searchable_text(kind, content) else {
        return Ok(());
    };
    let s = stems(&text).join(" ");
    if s.is_empty() {
        return Ok(());
    }
    w.execute(
        "INSERT OR REPLACE INTO events_fts(rowid, stems, room_id, event_stream) VALUES(?1,?2,?3,?1)",
        params![stream, s, room_id],
    )?;
    Ok(())
}

pub fn unindex_event(w: &WriteTxn<'_>, stream: i64) -> rusqlite::Result<()> {
    w.execute("DELETE FROM events_fts WHERE rowid=?1", [stream])?;
    Ok(())
}

/// An FTS5 query matching every stemmed word of `term`.
pub fn fts_query(term: &str) -> Option<String> {
    let words = stems(term);
    if words.is_empty() {
        return None;
    }
    Some(
        words
            .iter()
            .map(|w| format!("\"{}\"", w.replace('"', "")))
            .collect::<Vec<_>>()
            .join(" AND "),
    )
}

#[derive(Deserialize)]
pub struct SearchBody {
    search_categories: Categories,
}

#[derive(Deserialize)]
struct Categories {
    room_events: Option<RoomEvents>,
}

#[derive(Deserialize)]
struct RoomEvents {
    search_term: String,
    #[serde(default)]
    filter: EventFilter,
    order_by: Option<String>,
    event_context: Option<Value>,
    #[serde(default)]
    include_state: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SearchQuery {
    next_batch: Option<String>,
}

pub async fn search(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<SearchQuery>,
    Json(body): Json<SearchBody>,
) -> MxResult<axum::Json<Value>> {
    let Some(re) = body.search_categories.room_events else {
        return Ok(axum::Json(json!({ "search_categories": {} })));
    };
    let offset: i64 = match &q.next_batch {
        Some(n) => n
            .parse()
            .map_err(|_| MxError::invalid_param("Invalid next_batch"))?,
        None => 0,
    };
    let limit = re.filter.limit.unwrap_or(10).clamp(1, 100) as i64;
    let recent = match re.order_by.as_deref() {
        None | Some("rank") => false,
        Some("recent") => true,
        _ => return Err(MxError::invalid_param("order_by must be rank or recent")),
    };
    let v = Viewer {
        user_id: auth.user_id.as_str(),
        device_id: Some(auth.device_id.as_str()),
    };
    // Everything stored so far, even the last second's messages, is searchable.
    catch_up(&hs)?;
    let out = hs.db.read(|c| -> MxResult<Value> {
        let rooms: Vec<String> =
            joined_room_ids(c, auth.user_id.as_str())?.into_iter().filter(|r| re.filter.allows_room(r)).collect();
        let Some(query) = fts_query(&re.search_term) else {
            return Ok(json!({ "search_categories": { "room_events": { "count": 0, "results": [], "highlights": [] } } }));
        };
        let room_list = serde_json::to_string(&rooms)?;
        let order = if recent { "f.rowid DESC" } else { "bm25(events_fts) ASC, f.rowid DESC" };
        let total: i64 = c.query_row(
            "SELECT COUNT(*) FROM events_fts f WHERE events_fts MATCH ?1 AND f.room_id IN (SELECT value FROM json_each(?2))",
            params![query, room_list],
            |r| r.get(0),
        )?;
        let mut st = c.prepare(&format!(
            "SELECT f.rowid, bm25(events_fts) FROM events_fts f WHERE events_fts MATCH ?1
             AND f.room_id IN (SELECT value FROM json_each(?2)) ORDER BY {order} LIMIT ?3 OFFSET ?4"
        ))?;
        let hits: Vec<(i64, f64)> = st
            .query_map(params![query, room_list, limit, offset], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut results = Vec::new();
        let mut state = serde_json::Map::new();
        for (stream, rank) in &hits {
            let ev = c
                .query_row(&format!("SELECT {} FROM events WHERE stream=?1", pdu::EVENT_COLS), [stream], pdu::row_to_event)?;
            let ce = client_event(c, &ev, &v, true);
            if !re.filter.allows(&ce) {
                continue;
            }
            let mut r = json!({ "rank": -rank, "result": ce });
            if let Some(ctx) = &re.event_context {
                r["context"] = context_for(c, &ev, ctx, &v)?;
            }
            if re.include_state && !state.contains_key(&ev.room_id) {
                state.insert(ev.room_id.clone(), json!(pdu::current_state(c, &ev.room_id, &v)?));
            }
            results.push(r);
        }
        let mut room_events = json!({
            "count": total,
            "results": results,
            "highlights": re.search_term.split_whitespace().collect::<Vec<_>>(),
        });
        if re.include_state {
            room_events["state"] = Value::Object(state);
        }
        if offset + limit < total {
            room_events["next_batch"] = json!((offset + limit).to_string());
        }
        Ok(json!({ "search_categories": { "room_events": room_events } }))
    })?;
    Ok(axum::Json(out))
}

fn context_for(
    c: &Connection,
    ev: &pdu::StoredEvent,
    ctx: &Value,
    v: &Viewer<'_>,
) -> MxResult<Value> {
    let before = ctx["before_limit"].as_i64().unwrap_or(5).clamp(0, 20);
    let after = ctx["after_limit"].as_i64().unwrap_or(5).clamp(0, 20);
    let q = |sql: &str, n: i64| -> MxResult<Vec<Value>> {
        let mut st = c.prepare_cached(sql)?;
        let rows = st
            .query_map(params![ev.room_id, ev.stream, n], pdu::row_to_event)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.iter().map(|e| client_event(c, e, v, true)).collect())
    };
    let b = q(&format!("SELECT {} FROM events WHERE room_id=?1 AND outlier=0 AND stream<?2 ORDER BY stream DESC LIMIT ?3", pdu::EVENT_COLS), before)?;
    let a = q(&format!("SELECT {} FROM events WHERE room_id=?1 AND outlier=0 AND stream>?2 ORDER BY stream ASC LIMIT ?3", pdu::EVENT_COLS), after)?;
    Ok(
        json!({ "events_before": b, "events_after": a, "start": format!("s{}", ev.stream - 1), "end": format!("s{}", ev.stream) }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn russian_word_forms_share_a_stem() {
        assert_eq!(stems("голосование"), stems("голосования"));
        assert_eq!(stems("Голосованию!"), stems("голосование"));
        assert_ne!(stems("голосование"), stems("радио"));
        assert_eq!(stems("meetings"), stems("meeting"));
        assert_eq!(fts_query("  ").as_deref(), None);
    }
}
