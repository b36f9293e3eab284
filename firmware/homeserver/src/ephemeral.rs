//! Typing, receipts, read markers, account data, filters, push rules and presence.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::extract::State;
use ruma::{push::Ruleset, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    db::{user_room, UserRows},
    error::{MxError, MxResult},
    extract::{Auth, Json, PathArgs},
    now_ms, pdu,
    rooms::parse_room,
    Hs,
};

type J = axum::Json<Value>;

/// Who is typing where. In memory only: typing notices do not survive restarts.
#[derive(Default)]
pub struct Typing {
    inner: Mutex<TypingInner>,
}

#[derive(Default)]
struct TypingInner {
    version: u64,
    rooms: HashMap<String, (u64, HashMap<String, Instant>)>,
    /// Presence per user (only filled when presence is enabled).
    presence: HashMap<String, PresenceState>,
}

#[derive(Clone)]
struct PresenceState {
    presence: String,
    status_msg: Option<String>,
    last_active: Instant,
    version: u64,
}

/// After this long without activity an "online" user shows as "unavailable".
const IDLE_AFTER: Duration = Duration::from_secs(5 * 60);

impl PresenceState {
    fn content(&self) -> Value {
        let idle = self.last_active.elapsed();
        let presence = if self.presence == "online" && idle > IDLE_AFTER {
            "unavailable"
        } else {
            self.presence.as_str()
        };
        let mut c = json!({
            "presence": presence,
            "last_active_ago": idle.as_millis() as u64,
            "currently_active": presence == "online",
        });
        if let Some(m) = &self.status_msg {
            c["status_msg"] = json!(m);
        }
        c
    }
}

impl Typing {
    /// Versions start at the clock (ms), so tokens from before a restart never
    /// look newer than what comes after it.
    pub fn new() -> Self {
        let t = Self::default();
        t.inner.lock().unwrap_or_else(|p| p.into_inner()).version = now_ms();
        t
    }

    /// Sets or clears `user` typing in `room`. Returns whether anything changed.
    fn set(&self, room: &str, user: &str, until: Option<Instant>) -> bool {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let v = t.version + 1;
        let entry = t.rooms.entry(room.to_owned()).or_default();
        let changed = match until {
            Some(u) => entry.1.insert(user.to_owned(), u).is_none(),
            None => entry.1.remove(user).is_some(),
        };
        if changed {
            entry.0 = v;
            t.version = v;
        }
        changed
    }

    /// Typing of a user of another server (from an `m.typing` EDU).
    pub fn set_remote(&self, room: &str, user: &str, until: Option<Instant>) {
        self.set(room, user, until);
    }

    /// Records a presence update; returns whether others should hear of it.
    pub fn set_presence(
        &self,
        user: &str,
        presence: &str,
        status_msg: Option<Option<String>>,
    ) -> bool {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let old = t.presence.get(user).cloned();
        let status_msg =
            status_msg.unwrap_or_else(|| old.as_ref().and_then(|o| o.status_msg.clone()));
        let changed = old.as_ref().is_none_or(|o| {
            o.presence != presence
                || o.status_msg != status_msg
                || (presence == "online" && o.last_active.elapsed() > IDLE_AFTER)
        });
        let version = if changed {
            t.version += 1;
            t.version
        } else {
            old.as_ref().map_or(0, |o| o.version)
        };
        t.presence.insert(
            user.to_owned(),
            PresenceState {
                presence: presence.to_owned(),
                status_msg,
                last_active: now,
                version,
            },
        );
        changed
    }

    /// The presence content of `user`, if known.
    pub fn presence_of(&self, user: &str) -> Option<Value> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.presence.get(user).map(PresenceState::content)
    }

    /// `m.presence` events of these users changed after `since` (all known when `since` is None).
    pub fn presence_events<'a>(
        &self,
        users: impl IntoIterator<Item = &'a str>,
        since: Option<u64>,
    ) -> Vec<Value> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        users
            .into_iter()
            .filter_map(|u| {
                let p = t.presence.get(u)?;
                if since.is_some_and(|s| p.version <= s) {
                    return None;
                }
                Some(json!({ "type": "m.presence", "sender": u, "content": p.content() }))
            })
            .collect()
    }

    /// Current version of the typing stream.
    pub fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).version
    }

    /// Drops expired entries; returns the rooms that changed.
    pub fn expire(&self) -> Vec<String> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut changed = Vec::new();
        let v = t.version + 1;
        for (room, (ver, users)) in t.rooms.iter_mut() {
            let before = users.len();
            users.retain(|_, until| *until > now);
            if users.len() != before {
                *ver = v;
                changed.push(room.clone());
            }
        }
        if !changed.is_empty() {
            t.version = v;
        }
        changed
    }

    /// Users typing in `room` if it changed after `since` (or always when `since` is None).
    pub fn users_if_changed(&self, room: &str, since: Option<u64>) -> Option<Vec<String>> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (ver, users) = t.rooms.get(room)?;
        if since.is_some_and(|s| *ver <= s) {
            return None;
        }
        let list: Vec<String> = users
            .iter()
            .filter(|(_, u)| **u > now)
            .map(|(k, _)| k.clone())
            .collect();
        if since.is_none() && list.is_empty() {
            return None;
        }
        Some(list)
    }
}

/// Expires typing notices in the background.
pub async fn housekeeping(hs: Arc<Hs>, shutdown: secta_runtime::Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.clone().wait() => return,
        }
        for room in hs.typing.expire() {
            hs.notify_room(&room);
        }
        if let Err(e) = crate::search::catch_up(&hs) {
            tracing::warn!(error = %e, "search indexing failed");
        }
        seconds += 1;
        if seconds % 3600 == 60 {
            if let Err(e) = prune(&hs) {
                tracing::warn!(errcode = e.errcode, "housekeeping failed");
            }
        }
    }
}

/// Drops what nobody needs any more: old notifications, media ids never uploaded.
fn prune(hs: &Hs) -> MxResult<()> {
    let now = now_ms() as i64;
    let (n, m) = hs.db.write(|w| -> rusqlite::Result<(usize, usize)> {
        let n = w.tx.execute(
            "DELETE FROM event_push WHERE ts<?1",
            [now - 30 * 24 * 3600 * 1000],
        )?;
        let m = w.tx.execute(
            "DELETE FROM media WHERE uploaded=0 AND created_ts<?1",
            [now - 24 * 3600 * 1000],
        )?;
        Ok((n, m))
    })?;
    tracing::debug!(notifications = n, media_ids = m, "pruned");
    Ok(())
}

#[derive(Deserialize)]
pub struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

pub async fn typing(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, user)): PathArgs<(String, String)>,
    Json(body): Json<TypingBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    if user != auth.user_id.as_str() {
        return Err(MxError::forbidden("You may only set your own typing state"));
    }
    let joined = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), auth.user_id.as_str()))?;
    if joined.as_deref() != Some("join") {
        return Err(MxError::forbidden("You are not in this room"));
    }
    let until = body.typing.then(|| {
        Instant::now() + Duration::from_millis(body.timeout.unwrap_or(30_000).min(120_000))
    });
    if hs
        .typing
        .set(room_id.as_str(), auth.user_id.as_str(), until)
        || body.typing
    {
        crate::federation::enqueue_room_edu(
            &hs,
            room_id.as_str(),
            json!({ "edu_type": "m.typing", "content": { "room_id": room_id, "user_id": auth.user_id, "typing": body.typing } }),
        )?;
    }
    hs.notify_room(room_id.as_str());
    Ok(axum::Json(json!({})))
}

/// Stores a receipt (`m.read`, `m.read.private`) or the fully-read marker.
fn store_receipt(
    hs: &Hs,
    room_id: &RoomId,
    user: &UserId,
    kind: &str,
    event_id: &str,
    thread_id: Option<&str>,
) -> MxResult<()> {
    hs.db.write(|w| -> MxResult<()> {
        let ev = pdu::get_event(w, event_id)?.filter(|e| e.room_id == room_id.as_str());
        let Some(ev) = ev else { return Err(MxError::not_found("Event not found in this room")) };
        if pdu::membership(w, room_id.as_str(), user.as_str())?.as_deref() != Some("join") {
            return Err(MxError::forbidden("You are not in this room"));
        }
        if kind == "m.fully_read" {
            set_account_data_row(w, user.as_str(), room_id.as_str(), "m.fully_read", &json!({ "event_id": event_id }))?;
            return Ok(());
        }
        // Receipts only move forward.
        let thread = thread_id.unwrap_or("");
        let current: Option<i64> = w
            .query_row(
                "SELECT e.stream FROM receipts r JOIN events e ON e.event_id=r.event_id
                 WHERE r.room_id=?1 AND r.user_id=?2 AND r.receipt_type=?3 AND r.thread_id=?4",
                params![room_id.as_str(), user.as_str(), kind, thread],
                |r| r.get(0),
            )
            .optional()?;
        if current.is_some_and(|c| c >= ev.stream) {
            return Ok(());
        }
        let stream = w.next_stream();
        w.tx.execute(
            "INSERT INTO receipts(room_id, user_id, receipt_type, thread_id, event_id, ts, stream) VALUES(?1,?2,?3,?4,?5,?6,?7)
             ON CONFLICT(room_id, user_id, receipt_type, thread_id) DO UPDATE SET event_id=?5, ts=?6, stream=?7",
            params![room_id.as_str(), user.as_str(), kind, thread, event_id, now_ms() as i64, stream],
        )?;
        w.note(UserRows::Room, room_id.as_str(), stream);
        w.note(UserRows::Receipts, room_id.as_str(), stream);
        w.note(UserRows::ReadReceipt, &user_room(user.as_str(), room_id.as_str()), stream);
        w.persist_stream()?;
        Ok(())
    })?;
    if kind == "m.read" {
        let mut data = json!({ "ts": now_ms() });
        if let Some(t) = thread_id {
            data["thread_id"] = json!(t);
        }
        crate::federation::enqueue_room_edu(
            hs,
            room_id.as_str(),
            json!({ "edu_type": "m.receipt", "content": { room_id.as_str(): { "m.read": { user.as_str(): { "event_ids": [event_id], "data": data } } } } }),
        )?;
    }
    if kind == "m.read.private" || kind == "m.fully_read" {
        hs.notify_users([user.as_str()]);
    } else {
        hs.notify_room(room_id.as_str());
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReceiptBody {
    thread_id: Option<String>,
}

pub async fn receipt(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind, event_id)): PathArgs<(String, String, String)>,
    Json(body): Json<ReceiptBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    if !matches!(kind.as_str(), "m.read" | "m.read.private" | "m.fully_read") {
        return Err(MxError::invalid_param("Unknown receipt type"));
    }
    if kind == "m.fully_read" && body.thread_id.is_some() {
        return Err(MxError::invalid_param("m.fully_read takes no thread_id"));
    }
    let _turn = hs.db.write_turn().await;
    store_receipt(
        &hs,
        &room_id,
        &auth.user_id,
        &kind,
        &event_id,
        body.thread_id.as_deref(),
    )?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct ReadMarkers {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

pub async fn read_markers(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<ReadMarkers>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let _turn = hs.db.write_turn().await;
    for (kind, ev) in [
        ("m.fully_read", &body.fully_read),
        ("m.read", &body.read),
        ("m.read.private", &body.read_private),
    ] {
        if let Some(ev) = ev {
            store_receipt(&hs, &room_id, &auth.user_id, kind, ev, None)?;
        }
    }
    Ok(axum::Json(json!({})))
}

pub fn set_account_data_row(
    conn: &mut crate::db::WriteTxn<'_>,
    user: &str,
    room: &str,
    kind: &str,
    content: &Value,
) -> rusqlite::Result<()> {
    let stream = conn.next_stream();
    conn.tx.execute(
        "INSERT INTO account_data(user_id, room_id, type, content, stream) VALUES(?1,?2,?3,?4,?5)
         ON CONFLICT(user_id, room_id, type) DO UPDATE SET content=?4, stream=?5",
        params![user, room, kind, content.to_string(), stream],
    )?;
    conn.note(UserRows::AccountData, user, stream);
    conn.persist_stream()
}

pub fn get_account_data_row(
    conn: &Connection,
    user: &str,
    room: &str,
    kind: &str,
) -> rusqlite::Result<Option<Value>> {
    let s: Option<String> = conn
        .query_row(
            "SELECT content FROM account_data WHERE user_id=?1 AND room_id=?2 AND type=?3",
            params![user, room, kind],
            |r| r.get(0),
        )
        .optional()?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

fn own(auth: &Auth, user: &str) -> MxResult<()> {
    if UserId::parse(user).map_err(|_| MxError::invalid_param("Invalid user id"))? != auth.user_id {
        return Err(MxError::forbidden("You may only access your own data"));
    }
    Ok(())
}

fn put_account_data(hs: &Hs, auth: &Auth, room: &str, kind: &str, content: Value) -> MxResult<J> {
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(MxError::new(
            http::StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            format!("{kind} cannot be set through account data"),
        ));
    }
    hs.db
        .write(|w| set_account_data_row(w, auth.user_id.as_str(), room, kind, &content))?;
    hs.notify_users([auth.user_id.as_str()]);
    Ok(axum::Json(json!({})))
}

pub async fn set_account_data(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user, kind)): PathArgs<(String, String)>,
    Json(content): Json<Value>,
) -> MxResult<J> {
    own(&auth, &user)?;
    put_account_data(&hs, &auth, "", &kind, content)
}

pub async fn get_account_data(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user, kind)): PathArgs<(String, String)>,
) -> MxResult<J> {
    own(&auth, &user)?;
    hs.db
        .read(|c| get_account_data_row(c, auth.user_id.as_str(), "", &kind))?
        .map(axum::Json)
        .ok_or_else(|| MxError::not_found("Account data not found"))
}

pub async fn set_room_account_data(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user, room, kind)): PathArgs<(String, String, String)>,
    Json(content): Json<Value>,
) -> MxResult<J> {
    own(&auth, &user)?;
    let room_id = parse_room(&room)?;
    put_account_data(&hs, &auth, room_id.as_str(), &kind, content)
}

pub async fn get_room_account_data(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user, room, kind)): PathArgs<(String, String, String)>,
) -> MxResult<J> {
    own(&auth, &user)?;
    let room_id = parse_room(&room)?;
    hs.db
        .read(|c| get_account_data_row(c, auth.user_id.as_str(), room_id.as_str(), &kind))?
        .map(axum::Json)
        .ok_or_else(|| MxError::not_found("Account data not found"))
}

pub async fn create_filter(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(user): PathArgs<String>,
    Json(filter): Json<Value>,
) -> MxResult<J> {
    own(&auth, &user)?;
    serde_json::from_value::<crate::filter::Filter>(filter.clone())
        .map_err(|e| MxError::bad_json(format!("Invalid filter: {e}")))?;
    let id = hs.db.write(|w| -> rusqlite::Result<i64> {
        let next: i64 = w.query_row(
            "SELECT COALESCE(MAX(filter_id),-1)+1 FROM filters WHERE user_id=?1",
            [auth.user_id.as_str()],
            |r| r.get(0),
        )?;
        w.tx.execute(
            "INSERT INTO filters(user_id, filter_id, json) VALUES(?1,?2,?3)",
            params![auth.user_id.as_str(), next, filter.to_string()],
        )?;
        Ok(next)
    })?;
    Ok(axum::Json(json!({ "filter_id": id.to_string() })))
}

pub fn load_filter(conn: &Connection, user: &str, id: &str) -> MxResult<Option<Value>> {
    let Ok(n) = id.parse::<i64>() else {
        return Ok(None);
    };
    let s: Option<String> = conn
        .query_row(
            "SELECT json FROM filters WHERE user_id=?1 AND filter_id=?2",
            params![user, n],
            |r| r.get(0),
        )
        .optional()?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

pub async fn get_filter(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user, id)): PathArgs<(String, String)>,
) -> MxResult<J> {
    own(&auth, &user)?;
    hs.db
        .read(|c| load_filter(c, auth.user_id.as_str(), &id))?
        .map(axum::Json)
        .ok_or_else(|| MxError::not_found("Filter not found"))
}

// ---- Push rules: stored as the user's `m.push_rules` account data. ----

pub fn push_rules(conn: &Connection, user: &UserId) -> MxResult<Ruleset> {
    match get_account_data_row(conn, user.as_str(), "", "m.push_rules")? {
        Some(v) => serde_json::from_value(v["global"].clone())
            .map_err(|e| MxError::unknown(format!("stored push rules: {e}"))),
        None => Ok(Ruleset::server_default(user)),
    }
}

fn save_push_rules(hs: &Hs, user: &UserId, rules: &Ruleset) -> MxResult<()> {
    let v = json!({ "global": rules });
    hs.db
        .write(|w| set_account_data_row(w, user.as_str(), "", "m.push_rules", &v))?;
    hs.push_rules.invalidate(user.as_str());
    hs.notify_users([user.as_str()]);
    Ok(())
}

pub async fn get_push_rules(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    Ok(axum::Json(json!({ "global": rules })))
}

pub async fn get_push_rules_global(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    Ok(axum::Json(json!(rules)))
}

fn rule_kind(kind: &str) -> MxResult<ruma::push::RuleKind> {
    use ruma::push::RuleKind;
    Ok(match kind {
        "override" => RuleKind::Override,
        "underride" => RuleKind::Underride,
        "sender" => RuleKind::Sender,
        "room" => RuleKind::Room,
        "content" => RuleKind::Content,
        _ => return Err(MxError::invalid_param("Unknown push rule kind")),
    })
}

fn find_rule(rules: &Ruleset, kind: &str, rule_id: &str) -> MxResult<Value> {
    let all = serde_json::to_value(rules)?;
    all[kind]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["rule_id"] == rule_id).cloned())
        .ok_or_else(|| MxError::not_found("Push rule not found"))
}

pub async fn get_push_rule(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, rule_id)): PathArgs<(String, String)>,
) -> MxResult<J> {
    rule_kind(&kind)?;
    let rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    Ok(axum::Json(find_rule(&rules, &kind, &rule_id)?))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RulePosition {
    before: Option<String>,
    after: Option<String>,
}

pub async fn put_push_rule(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, rule_id)): PathArgs<(String, String)>,
    crate::extract::QueryArgs(pos): crate::extract::QueryArgs<RulePosition>,
    Json(mut body): Json<Value>,
) -> MxResult<J> {
    use ruma::push::NewPushRule;
    rule_kind(&kind)?;
    if rule_id.starts_with('.') {
        return Err(MxError::invalid_param(
            "Server-default rules cannot be replaced",
        ));
    }
    body["rule_id"] = json!(rule_id);
    let new_rule: NewPushRule = match kind.as_str() {
        "override" => NewPushRule::Override(
            serde_json::from_value(body).map_err(|e| MxError::bad_json(e.to_string()))?,
        ),
        "underride" => NewPushRule::Underride(
            serde_json::from_value(body).map_err(|e| MxError::bad_json(e.to_string()))?,
        ),
        "sender" => NewPushRule::Sender(
            serde_json::from_value(body).map_err(|e| MxError::bad_json(e.to_string()))?,
        ),
        "room" => NewPushRule::Room(
            serde_json::from_value(body).map_err(|e| MxError::bad_json(e.to_string()))?,
        ),
        _ => NewPushRule::Content(
            serde_json::from_value(body).map_err(|e| MxError::bad_json(e.to_string()))?,
        ),
    };
    let mut rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    rules
        .insert(new_rule, pos.after.as_deref(), pos.before.as_deref())
        .map_err(|e| MxError::new(http::StatusCode::BAD_REQUEST, "M_UNKNOWN", e.to_string()))?;
    save_push_rules(&hs, &auth.user_id, &rules)?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_push_rule(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, rule_id)): PathArgs<(String, String)>,
) -> MxResult<J> {
    let k = rule_kind(&kind)?;
    let mut rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    rules.remove(k, &rule_id).map_err(|e| match e {
        ruma::push::RemovePushRuleError::NotFound => MxError::not_found("Push rule not found"),
        other => MxError::new(
            http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            other.to_string(),
        ),
    })?;
    save_push_rules(&hs, &auth.user_id, &rules)?;
    Ok(axum::Json(json!({})))
}

pub async fn get_push_rule_attr(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, rule_id, attr)): PathArgs<(String, String, String)>,
) -> MxResult<J> {
    rule_kind(&kind)?;
    let rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    let rule = find_rule(&rules, &kind, &rule_id)?;
    match attr.as_str() {
        "enabled" => Ok(axum::Json(json!({ "enabled": rule["enabled"] }))),
        "actions" => Ok(axum::Json(json!({ "actions": rule["actions"] }))),
        _ => Err(MxError::unrecognized("Unknown push rule attribute")),
    }
}

pub async fn put_push_rule_attr(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, rule_id, attr)): PathArgs<(String, String, String)>,
    Json(body): Json<Value>,
) -> MxResult<J> {
    let k = rule_kind(&kind)?;
    let mut rules = hs.db.read(|c| push_rules(c, &auth.user_id))?;
    let not_found = |_| MxError::not_found("Push rule not found");
    match attr.as_str() {
        "enabled" => {
            let enabled = body["enabled"]
                .as_bool()
                .ok_or_else(|| MxError::bad_json("enabled must be a boolean"))?;
            rules.set_enabled(k, &rule_id, enabled).map_err(not_found)?;
        }
        "actions" => {
            let actions = serde_json::from_value(body["actions"].clone())
                .map_err(|e| MxError::bad_json(e.to_string()))?;
            rules.set_actions(k, &rule_id, actions).map_err(not_found)?;
        }
        _ => return Err(MxError::unrecognized("Unknown push rule attribute")),
    }
    save_push_rules(&hs, &auth.user_id, &rules)?;
    Ok(axum::Json(json!({})))
}

// ---- Presence: when disabled in config, it is accepted and costs nothing. ----

pub async fn get_presence(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    PathArgs(user): PathArgs<String>,
) -> MxResult<J> {
    let user = UserId::parse(&user).map_err(|_| MxError::invalid_param("Invalid user id"))?;
    let exists = hs.db.read(|c| {
        c.query_row(
            "SELECT 1 FROM users WHERE user_id=?1",
            [user.as_str()],
            |_| Ok(()),
        )
        .optional()
    })?;
    if exists.is_none() {
        return Err(MxError::not_found("Unknown user"));
    }
    let content = if hs.config.presence {
        hs.typing.presence_of(user.as_str())
    } else {
        None
    };
    Ok(axum::Json(
        content.unwrap_or_else(|| json!({ "presence": "offline" })),
    ))
}

#[derive(Deserialize)]
pub struct PresenceBody {
    presence: String,
    #[serde(default, deserialize_with = "double_option")]
    status_msg: Option<Option<String>>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Records presence and tells the user's rooms; nothing at all when presence is off.
pub fn update_presence(
    hs: &Hs,
    user: &str,
    presence: &str,
    status_msg: Option<Option<String>>,
) -> MxResult<()> {
    if !hs.config.presence {
        return Ok(());
    }
    if hs.typing.set_presence(user, presence, status_msg) {
        let rooms = hs.db.read(|c| crate::rooms::joined_room_ids(c, user))?;
        for room in &rooms {
            hs.notify_room(room);
        }
        // Other servers sharing a room hear of it (`m.presence` EDU), local users only.
        let local = ruma::UserId::parse(user).is_ok_and(|u| u.server_name() == hs.server_name);
        if local && hs.config.federation.enabled {
            if let Some(content) = hs.typing.presence_of(user) {
                let servers: std::collections::HashSet<String> = hs
                    .db
                    .read(|c| crate::keys::users_sharing_rooms(c, user))?
                    .iter()
                    .filter_map(|u| ruma::UserId::parse(u).ok())
                    .map(|u| u.server_name().to_string())
                    .filter(|s| s != hs.server_name.as_str())
                    .collect();
                let mut push = content.clone();
                push["user_id"] = json!(user);
                let edu = json!({ "edu_type": "m.presence", "content": { "push": [push] } });
                for s in servers {
                    crate::federation::enqueue_server_edu(hs, &s, edu.clone())?;
                }
            }
        }
    }
    Ok(())
}

pub async fn set_presence(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(user): PathArgs<String>,
    Json(body): Json<PresenceBody>,
) -> MxResult<J> {
    own(&auth, &user)?;
    if !matches!(body.presence.as_str(), "online" | "offline" | "unavailable") {
        return Err(MxError::invalid_param(
            "presence must be online, offline or unavailable",
        ));
    }
    update_presence(&hs, auth.user_id.as_str(), &body.presence, body.status_msg)?;
    Ok(axum::Json(json!({})))
}

// ---- Pushers: stored so clients can manage them; the box has no push gateway
// of its own and sends nothing to outside services. ----

pub async fn get_pushers(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let pushers = hs.db.read(|c| -> MxResult<Vec<Value>> {
        let mut st =
            c.prepare_cached("SELECT json FROM pushers WHERE user_id=?1 ORDER BY app_id, pushkey")?;
        let rows = st
            .query_map([auth.user_id.as_str()], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect())
    })?;
    Ok(axum::Json(json!({ "pushers": pushers })))
}

#[derive(Deserialize)]
pub struct PusherBody {
    pushkey: String,
    kind: Option<String>,
    app_id: String,
    app_display_name: Option<String>,
    device_display_name: Option<String>,
    profile_tag: Option<String>,
    lang: Option<String>,
    data: Option<Value>,
    #[serde(default)]
    append: bool,
}

pub async fn set_pusher(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<PusherBody>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    if body.pushkey.len() > 512 || body.app_id.len() > 64 {
        return Err(MxError::invalid_param("pushkey or app_id too long"));
    }
    match body.kind.as_deref() {
        None => {
            hs.db.write(|w| {
                w.tx.execute(
                    "DELETE FROM pushers WHERE user_id=?1 AND app_id=?2 AND pushkey=?3",
                    params![user, body.app_id, body.pushkey],
                )
            })?;
        }
        Some(kind) => {
            if kind != "http" && kind != "email" {
                return Err(MxError::invalid_param("kind must be http or email"));
            }
            let (Some(app_name), Some(device_name), Some(lang), Some(data)) = (
                &body.app_display_name,
                &body.device_display_name,
                &body.lang,
                &body.data,
            ) else {
                return Err(MxError::missing_param(
                    "app_display_name, device_display_name, lang and data are required",
                ));
            };
            if kind == "http" {
                let url = data["url"]
                    .as_str()
                    .ok_or_else(|| MxError::invalid_param("http pushers need data.url"))?;
                let ok = (url.starts_with("https://") || url.starts_with("http://"))
                    && url.ends_with("/_matrix/push/v1/notify");
                if !ok {
                    return Err(MxError::invalid_param(
                        "data.url must be an http(s) URL ending in /_matrix/push/v1/notify",
                    ));
                }
            }
            let json = json!({
                "pushkey": body.pushkey, "kind": kind, "app_id": body.app_id, "app_display_name": app_name,
                "device_display_name": device_name, "profile_tag": body.profile_tag, "lang": lang, "data": data,
            });
            hs.db.write(|w| -> rusqlite::Result<()> {
                if !body.append {
                    w.tx.execute(
                        "DELETE FROM pushers WHERE app_id=?1 AND pushkey=?2 AND user_id<>?3",
                        params![body.app_id, body.pushkey, user],
                    )?;
                }
                w.tx.execute(
                    "INSERT INTO pushers(user_id, app_id, pushkey, json) VALUES(?1,?2,?3,?4)
                     ON CONFLICT(user_id, app_id, pushkey) DO UPDATE SET json=?4",
                    params![user, body.app_id, body.pushkey, json.to_string()],
                )?;
                Ok(())
            })?;
        }
    }
    hs.pusher_users.invalidate();
    Ok(axum::Json(json!({})))
}
