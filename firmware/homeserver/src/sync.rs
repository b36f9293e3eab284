//! `/sync`: initial and incremental, long-polling, filters, limited timelines.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use axum::extract::State;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use serde_json::{json, value::RawValue, Map, Value};

use crate::{
    db::UserRows,
    ephemeral,
    error::{MxError, MxResult},
    extract::{Auth, QueryArgs},
    filter::Filter,
    keys,
    pdu::{self, client_event, row_to_event, Formatted, StoredEvent, Viewer, EVENT_COLS},
    rooms::{member_events_for, Visibility},
    Hs,
};

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SyncQuery {
    since: Option<String>,
    filter: Option<String>,
    full_state: Option<bool>,
    timeout: Option<String>,
    set_presence: Option<String>,
}

/// A sync token: `s{stream}_{ephemeral}_{to-device}`.
#[derive(Clone, Copy, Debug)]
struct Since {
    stream: i64,
    typing: u64,
    to_device: i64,
}

fn parse_since(s: &str) -> MxResult<Since> {
    let bad = || MxError::invalid_param("Invalid since token");
    let s = s.strip_prefix('s').ok_or_else(bad)?;
    let mut parts = s.split('_');
    let stream = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let typing = parts.next().unwrap_or("0").parse().map_err(|_| bad())?;
    let to_device = parts.next().unwrap_or("0").parse().map_err(|_| bad())?;
    Ok(Since {
        stream,
        typing,
        to_device,
    })
}

fn load_sync_filter(conn: &Connection, user: &str, f: Option<&str>) -> MxResult<Filter> {
    let Some(f) = f else {
        return Ok(Filter::default());
    };
    let v: Value = if f.trim_start().starts_with('{') {
        serde_json::from_str(f).map_err(|e| MxError::bad_json(format!("Invalid filter: {e}")))?
    } else {
        ephemeral::load_filter(conn, user, f)?
            .ok_or_else(|| MxError::not_found("Unknown filter id"))?
    };
    serde_json::from_value(v).map_err(|e| MxError::bad_json(format!("Invalid filter: {e}")))
}

impl Hs {
    /// A `/sync` filter: inline JSON, or a stored filter id (cached: stored filters never change).
    fn sync_filter(&self, user: &str, f: Option<&str>) -> MxResult<Arc<Filter>> {
        let key = f
            .filter(|f| !f.trim_start().starts_with('{'))
            .map(|id| format!("{user}\u{0}{id}"));
        if let Some(k) = &key {
            if let Some(hit) = self
                .filter_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(k)
            {
                return Ok(hit.clone());
            }
        }
        let filter = Arc::new(self.db.read(|c| load_sync_filter(c, user, f))?);
        if let Some(k) = key {
            let mut cache = self.filter_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(k, filter.clone());
        }
        Ok(filter)
    }
}

pub async fn sync(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<SyncQuery>,
) -> MxResult<axum::Json<SyncResponse>> {
    let since = q.since.as_deref().map(parse_since).transpose()?;
    let timeout = match q.timeout.as_deref() {
        None => 0,
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| MxError::invalid_param("timeout must be an integer"))?,
    }
    .min(hs.config.max_sync_timeout_ms);
    let filter = hs.sync_filter(auth.user_id.as_str(), q.filter.as_deref())?;
    let full_state = q.full_state.unwrap_or(false);
    let presence = q.set_presence.as_deref().unwrap_or("online");
    if !matches!(presence, "online" | "offline" | "unavailable") {
        return Err(MxError::invalid_param(
            "set_presence must be online, offline or unavailable",
        ));
    }
    ephemeral::update_presence(&hs, auth.user_id.as_str(), presence, None)?;
    let mut rx = hs.notifier.subscribe(auth.user_id.as_str());
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
    loop {
        rx.borrow_and_update();
        // The stream position is read before the to-device queue, so a room key sent
        // to-device is never missing from a response that carries its event.
        let upto = hs.db.current_stream();
        let to_device = keys::take_to_device(
            &hs,
            auth.user_id.as_str(),
            auth.device_id.as_str(),
            since.map_or(0, |s| s.to_device),
            keys::TO_DEVICE_PER_SYNC,
        )?;
        let expired = tokio::time::Instant::now() >= deadline;
        // Every change but typing, presence and to-device moves the stream: when none
        // of them moved since the token, there is nothing to build.
        let nothing_new = !full_state
            && to_device.0.is_empty()
            && since.is_some_and(|s| s.stream >= upto && s.typing >= hs.typing.version());
        if !nothing_new || expired {
            let (resp, empty) = hs.db.read_snapshot(|c| {
                build(&hs, c, &auth, &filter, since, full_state, to_device, upto)
            })?;
            if since.is_none() || !empty || full_state || expired {
                return Ok(axum::Json(resp));
            }
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { continue; }
                tokio::time::sleep(hs.sync_coalesce()).await;
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn membership_rows(
    c: &Connection,
    user: &str,
) -> rusqlite::Result<Vec<(String, String, i64, String)>> {
    let mut st = c.prepare_cached(
        "SELECT s.room_id, s.membership, s.stream, s.event_id FROM room_state s
         WHERE s.type='m.room.member' AND s.state_key=?1
         AND NOT EXISTS (SELECT 1 FROM forgotten_rooms f WHERE f.user_id=?1 AND f.room_id=s.room_id)",
    )?;
    let r = st
        .query_map([user], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect();
    r
}

/// The room's newest `limit` timeline events in `(after, upto]`, oldest first,
/// and whether more were left out. `upto` must be committed (at or below
/// [`crate::db::Db::current_stream`]); the newest rows come from memory.
pub(crate) fn events_between(
    hs: &Hs,
    c: &Connection,
    room: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> rusqlite::Result<(Vec<StoredEvent>, bool)> {
    if let Some(found) = hs.db.recent.events_between(room, after, upto, limit) {
        return Ok(found);
    }
    events_between_stored(c, room, after, upto, limit)
}

/// [`events_between`] from the database alone.
pub(crate) fn events_between_stored(
    c: &Connection,
    room: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> rusqlite::Result<(Vec<StoredEvent>, bool)> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE room_id=?1 AND outlier=0 AND stream>?2 AND stream<=?3 ORDER BY stream DESC LIMIT ?4"
    ))?;
    let mut rows: Vec<StoredEvent> = st
        .query_map(params![room, after, upto, limit + 1], row_to_event)?
        .collect::<Result<_, _>>()?;
    let limited = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    rows.reverse();
    Ok((rows, limited))
}

pub(crate) fn account_data_since(
    c: &Connection,
    user: &str,
    room: &str,
    since: i64,
    upto: i64,
) -> rusqlite::Result<Vec<Value>> {
    let mut st = c.prepare_cached(
        "SELECT type, content FROM account_data WHERE user_id=?1 AND room_id=?2 AND stream>?3 AND stream<=?4 ORDER BY stream",
    )?;
    let r = st
        .query_map(params![user, room, since, upto], |r| {
            let content: String = r.get(1)?;
            Ok(json!({ "type": r.get::<_, String>(0)?, "content": serde_json::from_str::<Value>(&content).unwrap_or(Value::Null) }))
        })?
        .collect();
    r
}

pub(crate) fn receipts_since(
    c: &Connection,
    room: &str,
    user: &str,
    since: i64,
    upto: i64,
) -> rusqlite::Result<Option<Value>> {
    let mut st = c.prepare_cached(
        "SELECT user_id, receipt_type, thread_id, event_id, ts FROM receipts WHERE room_id=?1 AND stream>?2 AND stream<=?3",
    )?;
    let mut content = Map::new();
    let rows = st.query_map(params![room, since, upto], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    for row in rows {
        let (u, kind, thread, ev, ts) = row?;
        if kind == "m.read.private" && u != user {
            continue;
        }
        let mut receipt = json!({ "ts": ts });
        if !thread.is_empty() {
            receipt["thread_id"] = json!(thread);
        }
        let entry = content.entry(ev).or_insert_with(|| json!({}));
        entry[&kind][&u] = receipt;
    }
    Ok(if content.is_empty() {
        None
    } else {
        Some(json!({ "type": "m.receipt", "content": content }))
    })
}

pub(crate) fn summary(c: &Connection, room: &str, user: &str) -> rusqlite::Result<Value> {
    let count = |m: &str| -> rusqlite::Result<i64> {
        c.prepare_cached("SELECT COUNT(*) FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership=?2")?
            .query_row(params![room, m], |r| r.get(0))
    };
    let mut st = c.prepare_cached(
        "SELECT state_key FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership IN ('join','invite')
         AND state_key<>?2 ORDER BY stream LIMIT 5",
    )?;
    let heroes: Vec<String> = st
        .query_map(params![room, user], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(
        json!({ "m.heroes": heroes, "m.joined_member_count": count("join")?, "m.invited_member_count": count("invite")? }),
    )
}

/// A `/sync` response. Joined rooms' timelines are JSON text made from the
/// shared form of each event ([`pdu::Formatted`]), not value trees.
#[derive(Serialize)]
pub struct SyncResponse {
    next_batch: String,
    rooms: Rooms,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

#[derive(Serialize)]
struct Rooms {
    join: BTreeMap<String, JoinedRoom>,
    invite: Map<String, Value>,
    leave: Map<String, Value>,
    knock: Map<String, Value>,
}

#[derive(Serialize)]
struct JoinedRoom {
    timeline: Timeline,
    state: Events,
    ephemeral: Events,
    account_data: Events,
    unread_notifications: Value,
    unread_thread_notifications: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Value>,
}

#[derive(Serialize)]
struct Timeline {
    events: Vec<Box<RawValue>>,
    limited: bool,
    prev_batch: String,
}

#[derive(Serialize)]
struct Events {
    events: Vec<Value>,
}

/// Builds one sync response; the flag says whether it carries nothing new.
fn build(
    hs: &Hs,
    c: &Connection,
    auth: &Auth,
    filter: &Filter,
    since: Option<Since>,
    full_state: bool,
    (to_device, to_device_pos): (Vec<Value>, i64),
    upto: i64,
) -> MxResult<(SyncResponse, bool)> {
    let user = auth.user_id.as_str();
    let v = Viewer {
        user_id: user,
        device_id: Some(auth.device_id.as_str()),
    };
    let typing_now = hs.typing.version();
    let from = since.map_or(0, |s| s.stream);
    let rf = &filter.room;
    let tl_limit = rf.timeline.limit.unwrap_or(10).clamp(1, 100) as i64;
    let mut join = BTreeMap::new();
    let mut invite = Map::new();
    let mut leave = Map::new();
    let mut knock = Map::new();
    for (room, membership, mstream, member_event) in membership_rows(c, user)? {
        if !rf.allows_room(&room) || mstream > upto {
            continue;
        }
        let newly = since.is_some_and(|s| mstream > s.stream);
        match membership.as_str() {
            "join" => {
                let initial_room = since.is_none() || newly || full_state;
                // Rooms with nothing new are skipped without a query: the hints
                // know which rooms had events or receipts, and whose per-room
                // account data changed, since the token.
                let room_changed = since.is_none_or(|s| {
                    hs.db.may_have_changed(UserRows::Room, &room, s.stream)
                        || hs
                            .db
                            .may_have_changed(UserRows::AccountData, user, s.stream)
                });
                let typing = hs.typing.users_if_changed(
                    &room,
                    if initial_room {
                        None
                    } else {
                        since.map(|s| s.typing)
                    },
                );
                if !initial_room && !room_changed && typing.is_none() {
                    continue;
                }
                let ad_from = if initial_room { 0 } else { from };
                let room_ad = if hs.db.may_have_changed(UserRows::AccountData, user, ad_from) {
                    account_data_since(c, user, &room, ad_from, upto)?
                } else {
                    Vec::new()
                };
                let tl_from = if initial_room && since.is_none() {
                    0
                } else {
                    from
                };
                let (events, mut limited) = if rf.timeline.limit == Some(0) {
                    (vec![], true)
                } else {
                    events_between(
                        hs,
                        c,
                        &room,
                        if newly && !full_state {
                            from.min(mstream - 1)
                        } else {
                            tl_from
                        },
                        upto,
                        tl_limit,
                    )?
                };
                if initial_room && since.is_none() && events.first().is_some_and(|e| e.stream > 1) {
                    limited = limited || events.len() as i64 >= tl_limit;
                }
                let receipts = if initial_room {
                    receipts_since(c, &room, user, 0, upto)?
                } else if hs.db.may_have_changed(UserRows::Receipts, &room, from) {
                    receipts_since(c, &room, user, from, upto)?
                } else {
                    None
                };
                // State rewritten since `since` without a timeline event of its own
                // (a resolution across a fork) may be all there is to say.
                let resolved = !initial_room
                    && hs
                        .db
                        .may_have_changed(UserRows::StateRewritten, &room, from);
                let quiet = !initial_room
                    && typing.is_none()
                    && events.is_empty()
                    && receipts.is_none()
                    && room_ad.is_empty();
                if quiet && !resolved {
                    // A hint ahead of this snapshot, or only outliers: nothing to say.
                    continue;
                }
                let tl_start = events.first().map_or(upto + 1, |e| e.stream);
                let vis = if initial_room {
                    Some(Visibility::load(c, &room, user)?)
                } else {
                    None
                };
                // Each event's viewer-independent form is shared by every sync
                // that sends it; only `unsigned` is made for this viewer.
                let timeline: Vec<(Arc<Formatted>, &StoredEvent)> = events
                    .iter()
                    .filter(|e| vis.as_ref().is_none_or(|v| v.allows(e.stream)))
                    .map(|e| (hs.formatted.get(e), e))
                    .filter(|(f, _)| rf.timeline.allows_fields(&f.kind, &f.sender, f.has_url))
                    .collect();
                // State between `since` (or the beginning) and the start of the timeline;
                // and, when it was rewritten, what the room's state is now, less what
                // the timeline carries.
                let state_from = if initial_room {
                    0
                } else if limited || resolved {
                    from
                } else {
                    i64::MAX
                };
                let state_to = if resolved { upto + 1 } else { tl_start };
                let mut state = Vec::new();
                if state_from != i64::MAX {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {} FROM room_state s JOIN events e ON e.event_id=s.event_id
                         WHERE s.room_id=?1 AND s.stream>?2 AND s.stream<?3 ORDER BY s.stream",
                        EVENT_COLS
                            .split(", ")
                            .map(|c| format!("e.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))?;
                    let in_timeline: HashSet<&str> =
                        events.iter().map(|e| e.event_id.as_str()).collect();
                    let rows: Vec<StoredEvent> = st
                        .query_map(params![room, state_from, state_to], row_to_event)?
                        .filter(|r| {
                            r.as_ref()
                                .map_or(true, |e| !in_timeline.contains(e.event_id.as_str()))
                        })
                        .collect::<Result<_, _>>()?;
                    let lazy = rf.state.lazy_load_members && !full_state;
                    let senders: HashSet<&str> =
                        timeline.iter().map(|(f, _)| f.sender.as_str()).collect();
                    for e in &rows {
                        let ce = client_event(c, e, &v, false);
                        if ce["type"] == "m.room.member" && lazy {
                            let key = ce["state_key"].as_str().unwrap_or_default();
                            if key != user && !senders.contains(key) {
                                continue;
                            }
                        }
                        if rf.state.allows(&ce) {
                            state.push(ce);
                        }
                    }
                    if lazy {
                        // Lazy-loaded members: the member events of timeline senders.
                        let have: HashSet<String> = state
                            .iter()
                            .filter(|e| e["type"] == "m.room.member")
                            .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
                            .collect();
                        let missing: Vec<String> = senders
                            .iter()
                            .filter(|s| !have.contains(**s))
                            .map(|s| s.to_string())
                            .collect();
                        if !initial_room {
                            state.extend(member_events_for(c, &room, &missing, &v)?);
                        }
                    }
                }
                if quiet && state.is_empty() {
                    continue;
                }
                let mut ephemeral = Vec::new();
                if let Some(users) = typing {
                    ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
                }
                if let Some(r) = receipts {
                    ephemeral.push(r);
                }
                let ephemeral: Vec<Value> = ephemeral
                    .into_iter()
                    .filter(|e| rf.ephemeral.allows_type(e["type"].as_str().unwrap_or("")))
                    .collect();
                let per_thread = rf.timeline.unread_thread_notifications;
                let (notes, highlights) =
                    crate::push::room_counts(hs, c, &room, user, per_thread, upto)?;
                let mut thread_notes = Map::new();
                if per_thread {
                    for (t, (n, h)) in crate::push::thread_counts(c, &room, user)? {
                        thread_notes
                            .insert(t, json!({ "notification_count": n, "highlight_count": h }));
                    }
                }
                let prev_batch = format!("s{}", tl_start - 1);
                let summary = if initial_room
                    || events.iter().any(|e| e.json.contains("\"m.room.member\""))
                {
                    Some(summary(c, &room, user)?)
                } else {
                    None
                };
                let entry = JoinedRoom {
                    timeline: Timeline {
                        events: timeline
                            .iter()
                            .map(|(f, e)| pdu::client_event_json(c, f, e, &v))
                            .collect(),
                        limited,
                        prev_batch,
                    },
                    state: Events { events: state },
                    ephemeral: Events { events: ephemeral },
                    account_data: Events {
                        events: room_ad
                            .into_iter()
                            .filter(|e| {
                                rf.account_data
                                    .allows_type(e["type"].as_str().unwrap_or(""))
                            })
                            .collect(),
                    },
                    unread_notifications: json!({ "notification_count": notes, "highlight_count": highlights }),
                    unread_thread_notifications: thread_notes,
                    summary,
                };
                join.insert(room, entry);
            }
            "invite" => {
                if since.is_some() && !newly {
                    continue;
                }
                let mut events = pdu::stripped_state(c, &room)?;
                if let Some(ev) = pdu::get_event(c, &member_event)? {
                    let ce = client_event(c, &ev, &v, false);
                    events.push(json!({ "type": ce["type"], "state_key": ce["state_key"], "sender": ce["sender"], "content": ce["content"] }));
                    let inviter = ce["sender"].as_str().unwrap_or_default().to_owned();
                    for m in member_events_for(c, &room, &[inviter], &v)? {
                        events.push(json!({ "type": m["type"], "state_key": m["state_key"], "sender": m["sender"], "content": m["content"] }));
                    }
                }
                invite.insert(room, json!({ "invite_state": { "events": events } }));
            }
            "knock" => {
                if since.is_some() && !newly {
                    continue;
                }
                let events = pdu::stripped_state(c, &room)?;
                knock.insert(room, json!({ "knock_state": { "events": events } }));
            }
            "leave" | "ban" => {
                if !(newly || (since.is_none() && rf.include_leave)) {
                    continue;
                }
                let (events, limited) = events_between(hs, c, &room, from, mstream, tl_limit)?;
                let tl_start = events.first().map_or(mstream, |e| e.stream);
                let timeline: Vec<Value> = events
                    .iter()
                    .map(|e| client_event(c, e, &v, false))
                    .filter(|e| rf.timeline.allows(e))
                    .collect();
                leave.insert(
                    room,
                    json!({
                        "timeline": { "events": timeline, "limited": limited, "prev_batch": format!("s{}", tl_start - 1) },
                        "state": { "events": [] },
                        "account_data": { "events": [] },
                    }),
                );
            }
            _ => {}
        }
    }
    // Invites from other servers to rooms this box does not hold yet, and our knocks on them.
    if hs.db.may_have_changed(
        UserRows::RemoteInvites,
        user,
        if since.is_some() { from } else { 0 },
    ) {
        let mut st = c.prepare_cached(
            "SELECT room_id, event_json, invite_state, declined, membership FROM remote_invites WHERE user_id=?1 AND stream>?2 AND stream<=?3",
        )?;
        let rows = st
            .query_map(
                params![user, if since.is_some() { from } else { 0 }, upto],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        for (room, ev, state, declined, membership) in rows {
            if invite.contains_key(&room)
                || join.contains_key(&room)
                || knock.contains_key(&room)
                || !rf.allows_room(&room)
            {
                continue;
            }
            let ev: Value = serde_json::from_str(&ev).unwrap_or_default();
            if declined {
                // Declined since the token: the other devices drop the invite.
                if since.is_some() {
                    let mut e = json!({ "type": ev["type"], "state_key": ev["state_key"], "sender": ev["sender"],
                                        "content": ev["content"], "origin_server_ts": ev["origin_server_ts"] });
                    e["event_id"] = ev
                        .get("event_id")
                        .cloned()
                        .unwrap_or_else(|| json!(format!("$declined-{room}")));
                    leave.insert(room, json!({ "timeline": { "events": [e], "limited": false }, "state": { "events": [] } }));
                }
                continue;
            }
            let events = crate::federation::remote_stripped_state(&ev, &state);
            if membership == "knock" {
                // Our knock on a room of another server, until it is answered.
                knock.insert(room, json!({ "knock_state": { "events": events } }));
            } else {
                invite.insert(room, json!({ "invite_state": { "events": events } }));
            }
        }
    }
    let global_ad_rows = if hs.db.may_have_changed(UserRows::AccountData, user, from) {
        account_data_since(c, user, "", from, upto)?
    } else {
        Vec::new()
    };
    let global_ad: Vec<Value> = global_ad_rows
        .into_iter()
        .filter(|e| {
            filter
                .account_data
                .allows_type(e["type"].as_str().unwrap_or(""))
        })
        .collect();
    let presence = if hs.config.presence {
        let mut users: HashSet<String> = HashSet::new();
        for room in crate::rooms::joined_room_ids(c, user)? {
            users.extend(pdu::local_members(c, &room, false)?);
        }
        hs.typing
            .presence_events(users.iter().map(String::as_str), since.map(|s| s.typing))
    } else {
        Vec::new()
    };
    let presence: Vec<Value> = presence
        .into_iter()
        .filter(|e| filter.presence.allows(e))
        .collect();
    let (changed, left) = match since {
        Some(s) => keys::device_list_delta(&hs.db, c, user, s.stream, upto)?,
        None => (Vec::new(), Vec::new()),
    };
    let empty = join.is_empty()
        && invite.is_empty()
        && leave.is_empty()
        && knock.is_empty()
        && global_ad.is_empty()
        && presence.is_empty()
        && to_device.is_empty()
        && changed.is_empty()
        && left.is_empty();
    let (otk_counts, fallback_types) = keys::device_key_counts(hs, user, auth.device_id.as_str())?;
    let rest = json!({
        "account_data": { "events": global_ad },
        "presence": { "events": presence },
        "to_device": { "events": to_device },
        "device_lists": { "changed": changed, "left": left },
        "device_one_time_keys_count": otk_counts,
        "device_unused_fallback_key_types": fallback_types,
    });
    let Value::Object(rest) = rest else {
        unreachable!("json! of an object")
    };
    let resp = SyncResponse {
        next_batch: format!("s{upto}_{typing_now}_{to_device_pos}"),
        rooms: Rooms {
            join,
            invite,
            leave,
            knock,
        },
        rest,
    };
    Ok((resp, empty))
}
