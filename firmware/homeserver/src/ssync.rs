//! Simplified Sliding Sync (MSC4186), as Element X and matrix-sdk's room list use it.
//!
//! A connection (`conn_id` per device) remembers which rooms it has been sent and
//! up to which stream position; that state is kept in SQLite per `pos`, so a `pos`
//! survives a restart.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use axum::extract::State;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    ephemeral,
    error::{MxError, MxResult},
    extract::{Auth, Json, QueryArgs},
    keys, pdu,
    pdu::{client_event, Viewer},
    rooms::Visibility,
    sync::{account_data_since, events_between, receipts_since},
    Hs,
};

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SsQuery {
    pos: Option<String>,
    timeout: Option<u64>,
    set_presence: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RoomDetails {
    required_state: Vec<(String, String)>,
    timeline_limit: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ListFilters {
    is_dm: Option<bool>,
    is_encrypted: Option<bool>,
    is_invite: Option<bool>,
    room_types: Vec<Option<String>>,
    not_room_types: Vec<Option<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ListReq {
    ranges: Vec<(u64, u64)>,
    #[serde(flatten)]
    details: RoomDetails,
    filters: Option<ListFilters>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExtToggle {
    enabled: Option<bool>,
    since: Option<String>,
    limit: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Extensions {
    to_device: ExtToggle,
    e2ee: ExtToggle,
    account_data: ExtToggle,
    receipts: ExtToggle,
    typing: ExtToggle,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SsBody {
    conn_id: Option<String>,
    txn_id: Option<String>,
    lists: BTreeMap<String, ListReq>,
    room_subscriptions: BTreeMap<String, RoomDetails>,
    extensions: Extensions,
}

/// What a connection has been sent, stored per `pos`.
#[derive(Serialize, Deserialize, Default, Clone)]
struct ConnState {
    stream: i64,
    eph: u64,
    /// Room id → stream position up to which it has been sent (joined rooms).
    rooms: HashMap<String, i64>,
    /// Room id → membership position of the invite (or knock) already sent.
    #[serde(default)]
    invites: HashMap<String, i64>,
    /// List name → room count last sent.
    counts: BTreeMap<String, usize>,
}

fn unknown_pos() -> MxError {
    MxError::new(
        http::StatusCode::BAD_REQUEST,
        "M_UNKNOWN_POS",
        "Unknown or expired pos; start a new connection",
    )
}

fn load_state(
    c: &Connection,
    user: &str,
    device: &str,
    conn: &str,
    pos: i64,
) -> MxResult<ConnState> {
    let s: Option<String> = c
        .query_row(
            "SELECT state FROM sliding_sync_positions WHERE user_id=?1 AND device_id=?2 AND conn_id=?3 AND pos=?4",
            params![user, device, conn, pos],
            |r| r.get(0),
        )
        .optional()?;
    let s = s.ok_or_else(unknown_pos)?;
    serde_json::from_str(&s).map_err(|_| unknown_pos())
}

/// Facts about one of the user's rooms used for filtering and sorting.
struct RoomMeta {
    room_id: String,
    membership: String,
    membership_stream: i64,
    bump: i64,
    /// For an invite from (or our knock on) a room this box does not hold:
    /// the stripped state that came with it, the user's member event last.
    remote: Option<Vec<Value>>,
}

impl RoomMeta {
    /// Content of a stripped state event of a room this box does not hold.
    fn remote_content(&self, kind: &str, key: &str) -> Option<&Value> {
        self.remote
            .as_ref()?
            .iter()
            .rev()
            .find(|e| e["type"] == kind && e["state_key"] == key)
            .map(|e| &e["content"])
    }
}

fn user_rooms(c: &Connection, user: &str) -> rusqlite::Result<Vec<RoomMeta>> {
    let mut st = c.prepare_cached(
        "SELECT s.room_id, s.membership, s.stream, r.bump_stamp FROM room_state s JOIN rooms r ON r.room_id=s.room_id
         WHERE s.type='m.room.member' AND s.state_key=?1 AND s.membership IN ('join','invite','knock')",
    )?;
    let r = st
        .query_map([user], |r| {
            let membership: String = r.get(1)?;
            let ms: i64 = r.get(2)?;
            let bump: i64 = r.get(3)?;
            Ok(RoomMeta {
                room_id: r.get(0)?,
                bump: if membership == "join" {
                    bump.max(ms)
                } else {
                    ms
                },
                membership,
                membership_stream: ms,
                remote: None,
            })
        })?
        .collect::<rusqlite::Result<Vec<RoomMeta>>>()?;
    // Invites from other servers to rooms not held here, and knocks on them.
    let held: HashSet<String> = r.iter().map(|m| m.room_id.clone()).collect();
    let mut st = c.prepare_cached(
        "SELECT room_id, membership, stream, event_json, invite_state FROM remote_invites WHERE user_id=?1 AND declined=0",
    )?;
    let rows = st.query_map([user], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut r = r;
    for row in rows {
        let (room_id, membership, ms, ev, stripped) = row?;
        if held.contains(&room_id) {
            continue;
        }
        let ev: Value = serde_json::from_str(&ev).unwrap_or_default();
        let events = crate::federation::remote_stripped_state(&ev, &stripped);
        r.push(RoomMeta {
            room_id,
            membership,
            membership_stream: ms,
            bump: ms,
            remote: Some(events),
        });
    }
    Ok(r)
}

fn direct_rooms(c: &Connection, user: &str) -> rusqlite::Result<HashSet<String>> {
    let mut out = HashSet::new();
    if let Some(v) = ephemeral::get_account_data_row(c, user, "", "m.direct")? {
        for rooms in v.as_object().into_iter().flat_map(|o| o.values()) {
            for r in rooms.as_array().into_iter().flatten() {
                if let Some(r) = r.as_str() {
                    out.insert(r.to_owned());
                }
            }
        }
    }
    Ok(out)
}

fn is_dm(
    c: &Connection,
    m: &RoomMeta,
    direct: &HashSet<String>,
    user: &str,
) -> rusqlite::Result<bool> {
    if direct.contains(&m.room_id) {
        return Ok(true);
    }
    if m.remote.is_some() {
        return Ok(m
            .remote_content("m.room.member", user)
            .is_some_and(|c| c["is_direct"].as_bool() == Some(true)));
    }
    if m.membership == "invite" {
        let content = pdu::state_content(c, &m.room_id, "m.room.member", user)?;
        return Ok(content.is_some_and(|c| c["is_direct"].as_bool() == Some(true)));
    }
    Ok(false)
}

fn passes(
    c: &Connection,
    m: &RoomMeta,
    f: &ListFilters,
    direct: &HashSet<String>,
    user: &str,
) -> rusqlite::Result<bool> {
    if let Some(want) = f.is_invite {
        if (m.membership == "invite") != want {
            return Ok(false);
        }
    }
    if let Some(want) = f.is_dm {
        if is_dm(c, m, direct, user)? != want {
            return Ok(false);
        }
    }
    if let Some(want) = f.is_encrypted {
        let encrypted = match &m.remote {
            Some(_) => m.remote_content("m.room.encryption", "").is_some(),
            None => pdu::state_event_id(c, &m.room_id, "m.room.encryption", "")?.is_some(),
        };
        if encrypted != want {
            return Ok(false);
        }
    }
    if !f.room_types.is_empty() || !f.not_room_types.is_empty() {
        let t = match &m.remote {
            Some(_) => m.remote_content("m.room.create", "").cloned(),
            None => pdu::state_content(c, &m.room_id, "m.room.create", "")?,
        }
        .and_then(|v| v["type"].as_str().map(str::to_owned));
        if !f.room_types.is_empty() && !f.room_types.contains(&t) {
            return Ok(false);
        }
        if f.not_room_types.contains(&t) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn merge(into: &mut RoomDetails, other: &RoomDetails) {
    for rs in &other.required_state {
        if !into.required_state.contains(rs) {
            into.required_state.push(rs.clone());
        }
    }
    into.timeline_limit = match (into.timeline_limit, other.timeline_limit) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
}

/// Whether a state event (type, key) is asked for by `required_state`.
fn wanted(
    req: &[(String, String)],
    kind: &str,
    key: &str,
    user: &str,
    lazy_members: &HashSet<String>,
) -> bool {
    req.iter().any(|(t, k)| {
        let type_ok = t == "*" || t == kind;
        let key_ok = k == "*"
            || k == key
            || (k == "$ME" && key == user)
            || (k == "$LAZY" && kind == "m.room.member" && lazy_members.contains(key));
        type_ok && key_ok
    })
}

fn state_for(
    c: &Connection,
    room: &str,
    req: &[(String, String)],
    after: i64,
    user: &str,
    lazy: &HashSet<String>,
    v: &Viewer<'_>,
) -> rusqlite::Result<Vec<Value>> {
    if req.is_empty() {
        return Ok(vec![]);
    }
    let mut st = c.prepare_cached(&format!(
        "SELECT {} FROM room_state s JOIN events e ON e.event_id=s.event_id WHERE s.room_id=?1 AND s.stream>?2 ORDER BY s.stream",
        pdu::EVENT_COLS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ")
    ))?;
    let rows = st
        .query_map(params![room, after], pdu::row_to_event)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for e in &rows {
        let ce = client_event(c, e, v, false);
        let kind = ce["type"].as_str().unwrap_or_default();
        let key = ce["state_key"].as_str().unwrap_or_default();
        if wanted(req, kind, key, user, lazy) {
            out.push(ce);
        }
    }
    Ok(out)
}

struct Built {
    body: Value,
    state: ConnState,
    has_news: bool,
}

#[allow(clippy::too_many_arguments)]
fn build(
    hs: &Hs,
    c: &Connection,
    auth: &Auth,
    req: &SsBody,
    prev: Option<&ConnState>,
    to_device: Option<(Vec<Value>, i64)>,
    upto: i64,
) -> MxResult<Built> {
    let user = auth.user_id.as_str();
    let v = Viewer {
        user_id: user,
        device_id: Some(auth.device_id.as_str()),
    };
    let eph = hs.typing.version();
    let since = prev.map(|p| p.stream);
    let mut state = prev.cloned().unwrap_or_default();
    let mut has_news = false;

    let mut rooms_meta = user_rooms(c, user)?;
    rooms_meta.sort_by(|a, b| b.bump.cmp(&a.bump).then_with(|| a.room_id.cmp(&b.room_id)));
    let direct = direct_rooms(c, user)?;
    // Rooms in the window and what each wants.
    let mut window: BTreeMap<String, RoomDetails> = BTreeMap::new();
    let mut lists = Map::new();
    let mut counts = BTreeMap::new();
    for (name, list) in &req.lists {
        let mut filtered = Vec::new();
        for m in &rooms_meta {
            if list
                .filters
                .as_ref()
                .is_none_or(|f| passes(c, m, f, &direct, user).unwrap_or(false))
            {
                filtered.push(m);
            }
        }
        for (lo, hi) in &list.ranges {
            for m in filtered
                .iter()
                .skip(*lo as usize)
                .take((hi.saturating_sub(*lo) + 1).min(10_000) as usize)
            {
                merge(window.entry(m.room_id.clone()).or_default(), &list.details);
            }
        }
        lists.insert(name.clone(), json!({ "count": filtered.len() }));
        counts.insert(name.clone(), filtered.len());
    }
    if prev.is_none_or(|p| p.counts != counts) {
        has_news = true;
    }
    let meta: HashMap<&str, &RoomMeta> =
        rooms_meta.iter().map(|m| (m.room_id.as_str(), m)).collect();
    for (room, details) in &req.room_subscriptions {
        if meta.contains_key(room.as_str())
            || Visibility::load(c, room, user).is_ok_and(|vis| vis.is_current())
        {
            merge(window.entry(room.clone()).or_default(), details);
        }
    }
    // Rooms the connection knows that the user has since left: send the leave once.
    let mut left = Vec::new();
    if let Some(p) = prev {
        for (room, sent) in &p.rooms {
            if meta.contains_key(room.as_str()) {
                continue;
            }
            if let Some(m) = pdu::membership(c, room, user)? {
                let ms: i64 = c
                    .query_row(
                        "SELECT stream FROM room_state WHERE room_id=?1 AND type='m.room.member' AND state_key=?2",
                        params![room, user],
                        |r| r.get(0),
                    )
                    .unwrap_or(0);
                if ms > *sent && (m == "leave" || m == "ban") {
                    left.push((room.clone(), *sent, ms));
                }
            }
        }
    }

    let mut rooms_out = Map::new();
    for (room, details) in &window {
        let known = state.rooms.get(room).copied();
        let m = meta.get(room.as_str());
        let membership = m.map_or("join", |m| m.membership.as_str());
        let limit = details.timeline_limit.unwrap_or(1).min(100) as i64;
        let mut r = Map::new();
        if membership == "invite" || membership == "knock" {
            let ms = m.map_or(0, |m| m.membership_stream);
            if state.invites.get(room).is_some_and(|k| *k >= ms) {
                continue;
            }
            let remote = m.and_then(|m| m.remote.as_ref());
            let mut invite_state = match remote {
                Some(r) => r.clone(),
                None => pdu::stripped_state(c, room)?,
            };
            let member = match remote {
                Some(_) => None,
                None => pdu::state_event_id(c, room, "m.room.member", user)?,
            };
            if let Some(id) = member {
                if let Some(ev) = pdu::get_event(c, &id)? {
                    let ce = client_event(c, &ev, &v, false);
                    invite_state.push(json!({ "type": ce["type"], "state_key": ce["state_key"], "sender": ce["sender"], "content": ce["content"] }));
                    // The inviter's member event, so the client can show who invited.
                    if let Some(inviter) = ce["sender"].as_str().filter(|s| *s != user) {
                        if let Some(content) =
                            pdu::state_content(c, room, "m.room.member", inviter)?
                        {
                            invite_state.push(json!({ "type": "m.room.member", "state_key": inviter, "sender": inviter, "content": content }));
                        }
                    }
                }
            }
            r.insert("initial".into(), json!(true));
            r.insert("invite_state".into(), json!(invite_state));
            r.insert("bump_stamp".into(), json!(m.map_or(0, |m| m.bump)));
            if let Some(m) = m {
                r.insert("is_dm".into(), json!(is_dm(c, m, &direct, user)?));
            }
            let name = match m.filter(|m| m.remote.is_some()) {
                Some(m) => m.remote_content("m.room.name", "").cloned(),
                None => pdu::state_content(c, room, "m.room.name", "")?,
            }
            .and_then(|n| n["name"].as_str().map(str::to_owned));
            if let Some(n) = name {
                r.insert("name".into(), json!(n));
            }
            rooms_out.insert(room.clone(), Value::Object(r));
            state.invites.insert(room.clone(), ms);
            state.rooms.remove(room);
            continue;
        }
        // A room first seen as an invite is new to the client once joined: full state.
        let initial = known.is_none();
        let after = known.unwrap_or(0);
        let (events, limited) = if initial {
            if limit == 0 {
                (vec![], true)
            } else {
                events_between(hs, c, room, 0, upto, limit)?
            }
        } else {
            events_between(hs, c, room, after, upto, limit.max(1))?
        };
        let vis = Visibility::load(c, room, user).ok();
        let events: Vec<_> = events
            .into_iter()
            .filter(|e| vis.as_ref().is_some_and(|vv| vv.allows(e.stream)))
            .collect();
        let state_changed: bool = !initial
            && c.query_row(
                "SELECT 1 FROM room_state WHERE room_id=?1 AND stream>?2 LIMIT 1",
                params![room, after],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        let receipts_changed = !initial && receipts_since(c, room, user, after, upto)?.is_some();
        if !initial && events.is_empty() && !state_changed && !receipts_changed {
            continue;
        }
        let timeline: Vec<Value> = events
            .iter()
            .map(|e| client_event(c, e, &v, false))
            .collect();
        let lazy: HashSet<String> = timeline
            .iter()
            .filter_map(|e| e["sender"].as_str().map(str::to_owned))
            .collect();
        let required = state_for(
            c,
            room,
            &details.required_state,
            if initial { 0 } else { after },
            user,
            &lazy,
            &v,
        )?;
        let (notes, highlights) = crate::push::room_counts(hs, c, room, user, false, upto)?;
        if initial {
            r.insert("initial".into(), json!(true));
        }
        let name = pdu::state_content(c, room, "m.room.name", "")?
            .and_then(|n| n["name"].as_str().map(str::to_owned));
        if initial || state_changed {
            if let Some(n) = &name {
                r.insert("name".into(), json!(n));
            }
            if let Some(a) = pdu::state_content(c, room, "m.room.avatar", "")?
                .and_then(|a| a["url"].as_str().map(str::to_owned))
            {
                r.insert("avatar".into(), json!(a));
            }
            if name.is_none() {
                let mut st = c.prepare_cached(
                    "SELECT s.state_key, e.json FROM room_state s JOIN events e ON e.event_id=s.event_id
                     WHERE s.room_id=?1 AND s.type='m.room.member' AND s.membership IN ('join','invite') AND s.state_key<>?2
                     ORDER BY s.stream LIMIT 5",
                )?;
                let heroes: Vec<Value> = st
                    .query_map(params![room, user], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })?
                    .filter_map(Result::ok)
                    .map(|(u, j)| {
                        let ev: Value = serde_json::from_str(&j).unwrap_or_default();
                        let mut h = json!({ "user_id": u });
                        if let Some(n) = ev["content"]["displayname"].as_str() {
                            h["displayname"] = json!(n);
                        }
                        if let Some(a) = ev["content"]["avatar_url"].as_str() {
                            h["avatar_url"] = json!(a);
                        }
                        h
                    })
                    .collect();
                r.insert("heroes".into(), json!(heroes));
            }
        }
        let count = |m: &str| -> rusqlite::Result<i64> {
            c.query_row(
                "SELECT COUNT(*) FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership=?2",
                params![room, m],
                |r| r.get(0),
            )
        };
        r.insert("joined_count".into(), json!(count("join")?));
        r.insert("invited_count".into(), json!(count("invite")?));
        r.insert("notification_count".into(), json!(notes));
        r.insert("highlight_count".into(), json!(highlights));
        r.insert("bump_stamp".into(), json!(m.map_or(0, |m| m.bump)));
        if let Some(m) = m {
            r.insert("is_dm".into(), json!(is_dm(c, m, &direct, user)?));
        }
        r.insert(
            "num_live".into(),
            json!(if initial || since.is_none() {
                0
            } else {
                timeline.len()
            }),
        );
        r.insert("limited".into(), json!(limited));
        if let Some(first) = events.first() {
            r.insert("prev_batch".into(), json!(format!("s{}", first.stream - 1)));
        }
        r.insert("timeline".into(), json!(timeline));
        r.insert("required_state".into(), json!(required));
        rooms_out.insert(room.clone(), Value::Object(r));
        state.rooms.insert(room.clone(), upto);
        state.invites.remove(room);
    }
    for (room, sent, left_at) in &left {
        // Up to the leave and no further: what came after is not the user's to see.
        let (events, limited) = events_between(hs, c, room, *sent, *left_at, 10)?;
        let timeline: Vec<Value> = events
            .iter()
            .map(|e| client_event(c, e, &v, false))
            .collect();
        // The user's own membership, so the client knows the room is gone.
        let mut required = Vec::new();
        if let Some(id) = pdu::state_event_id(c, room, "m.room.member", user)? {
            if let Some(ev) = pdu::get_event(c, &id)? {
                required.push(client_event(c, &ev, &v, false));
            }
        }
        rooms_out.insert(
            room.clone(),
            json!({ "timeline": timeline, "limited": limited, "required_state": required, "bump_stamp": left_at }),
        );
        state.rooms.remove(room);
    }
    // Invites that were declined or withdrawn are dropped from the connection's memory.
    state.invites.retain(|room, _| {
        meta.get(room.as_str())
            .is_some_and(|m| m.membership == "invite" || m.membership == "knock")
    });
    if !rooms_out.is_empty() {
        has_news = true;
    }

    // Extensions.
    let ext = &req.extensions;
    let mut extensions = Map::new();
    if let Some((events, next)) = to_device {
        if !events.is_empty() {
            has_news = true;
        }
        extensions.insert(
            "to_device".into(),
            json!({ "next_batch": next.to_string(), "events": events }),
        );
    }
    if ext.e2ee.enabled == Some(true) {
        let (changed, dl_left) = match since {
            Some(s) => keys::device_list_delta(&hs.db, c, user, s, upto)?,
            None => (vec![], vec![]),
        };
        if !changed.is_empty() || !dl_left.is_empty() {
            has_news = true;
        }
        let (otk_counts, fallback_types) =
            keys::device_key_counts(&hs, user, auth.device_id.as_str())?;
        extensions.insert(
            "e2ee".into(),
            json!({
                "device_lists": { "changed": changed, "left": dl_left },
                "device_one_time_keys_count": otk_counts,
                "device_unused_fallback_key_types": fallback_types,
            }),
        );
    }
    if ext.account_data.enabled == Some(true) {
        let global = account_data_since(c, user, "", since.unwrap_or(0), upto)?;
        let mut rooms = Map::new();
        for m in &rooms_meta {
            let initial_room = rooms_out
                .get(&m.room_id)
                .is_some_and(|r| r["initial"] == true);
            let ad = account_data_since(
                c,
                user,
                &m.room_id,
                if initial_room { 0 } else { since.unwrap_or(0) },
                upto,
            )?;
            if !ad.is_empty() {
                rooms.insert(m.room_id.clone(), json!(ad));
            }
        }
        if !global.is_empty() || !rooms.is_empty() {
            has_news = true;
        }
        extensions.insert(
            "account_data".into(),
            json!({ "global": global, "rooms": rooms }),
        );
    }
    if ext.receipts.enabled == Some(true) {
        let mut rooms = Map::new();
        for room in window.keys() {
            let initial_room = rooms_out.get(room).is_some_and(|r| r["initial"] == true);
            if let Some(r) = receipts_since(
                c,
                room,
                user,
                if initial_room { 0 } else { since.unwrap_or(0) },
                upto,
            )? {
                rooms.insert(room.clone(), r);
            }
        }
        extensions.insert("receipts".into(), json!({ "rooms": rooms }));
    }
    if ext.typing.enabled == Some(true) {
        let mut rooms = Map::new();
        for room in window.keys() {
            let initial_room = rooms_out.get(room).is_some_and(|r| r["initial"] == true);
            let since_eph = if initial_room {
                None
            } else {
                prev.map(|p| p.eph)
            };
            if let Some(users) = hs.typing.users_if_changed(room, since_eph) {
                rooms.insert(
                    room.clone(),
                    json!({ "type": "m.typing", "content": { "user_ids": users } }),
                );
            }
        }
        if !rooms.is_empty() {
            has_news = true;
        }
        extensions.insert("typing".into(), json!({ "rooms": rooms }));
    }
    state.stream = upto;
    state.eph = eph;
    state.counts = counts;
    let mut body = json!({ "lists": lists, "rooms": rooms_out, "extensions": extensions });
    if let Some(t) = &req.txn_id {
        body["txn_id"] = json!(t);
        has_news = true;
    }
    Ok(Built {
        body,
        state,
        has_news,
    })
}

pub async fn sliding_sync(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<SsQuery>,
    Json(req): Json<SsBody>,
) -> MxResult<axum::Json<Value>> {
    let user = auth.user_id.as_str().to_owned();
    let device = auth.device_id.as_str().to_owned();
    let conn_id = req.conn_id.clone().unwrap_or_default();
    if conn_id.len() > 64 {
        return Err(MxError::invalid_param("conn_id too long"));
    }
    let prev_pos: Option<i64> = q
        .pos
        .as_deref()
        .map(|p| p.parse().map_err(|_| unknown_pos()))
        .transpose()?;
    let prev = match prev_pos {
        Some(p) => Some(hs.db.read(|c| load_state(c, &user, &device, &conn_id, p))?),
        None => None,
    };
    if let Some(p) = q.set_presence.as_deref() {
        if matches!(p, "online" | "offline" | "unavailable") {
            ephemeral::update_presence(&hs, &user, p, None)?;
        }
    } else {
        ephemeral::update_presence(&hs, &user, "online", None)?;
    }
    let timeout = q.timeout.unwrap_or(0).min(hs.config.max_sync_timeout_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
    let mut rx = hs.notifier.subscribe(&user);
    let built = loop {
        rx.borrow_and_update();
        // Stream position first, then the to-device queue (see `sync`).
        let upto = hs.db.current_stream();
        let to_device = if req.extensions.to_device.enabled == Some(true) {
            let since: i64 = req
                .extensions
                .to_device
                .since
                .as_deref()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let limit = req
                .extensions
                .to_device
                .limit
                .unwrap_or(keys::TO_DEVICE_PER_SYNC as u64)
                .clamp(1, 1000) as i64;
            let (events, next) = keys::take_to_device(&hs, &user, &device, since, limit)?;
            Some((events, next))
        } else {
            None
        };
        let built = hs
            .db
            .read_snapshot(|c| build(&hs, c, &auth, &req, prev.as_ref(), to_device, upto))?;
        if prev.is_none() || built.has_news || tokio::time::Instant::now() >= deadline {
            break built;
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { break built; }
                tokio::time::sleep(hs.sync_coalesce()).await;
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    };
    let new_pos = prev_pos.unwrap_or(0) + 1;
    let state_json = serde_json::to_string(&built.state)?;
    hs.db.write(|w| -> rusqlite::Result<()> {
        w.tx.execute(
            "INSERT OR REPLACE INTO sliding_sync_positions(user_id, device_id, conn_id, pos, state) VALUES(?1,?2,?3,?4,?5)",
            params![user, device, conn_id, new_pos, state_json],
        )?;
        // Keep a few older positions for clients that retry a request.
        w.tx.execute(
            "DELETE FROM sliding_sync_positions WHERE user_id=?1 AND device_id=?2 AND conn_id=?3 AND (pos<?4 OR pos>?5)",
            params![user, device, conn_id, new_pos - 3, new_pos],
        )?;
        Ok(())
    })?;
    let mut body = built.body;
    body["pos"] = json!(new_pos.to_string());
    Ok(axum::Json(body))
}
