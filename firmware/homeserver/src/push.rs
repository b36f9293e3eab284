//! Push rules evaluated on every event (ruma's evaluator), notification rows,
//! unread and highlight counts (per thread too), and `/notifications`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use axum::extract::State;
use ruma::{
    power_levels::NotificationPowerLevels,
    push::{Action, FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
    Int, OwnedUserId, RoomId, UInt, UserId,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    db::{user_room, UserRows, WriteTxn},
    ephemeral,
    error::{MxError, MxResult},
    extract::{Auth, QueryArgs},
    pdu::{self, client_event, Viewer},
    Hs,
};

/// Each user's push rules, parsed once and kept until they change.
#[derive(Default)]
pub struct RulesCache {
    map: Mutex<HashMap<String, Arc<UserRules>>>,
}

/// A user's rules, plus the same rules without those that can only match words
/// in the message body. ruma builds a regex for every such match; when none of
/// the words occurs in the body at all, those rules cannot apply, and the cheap
/// rule set gives exactly the same answer.
pub struct UserRules {
    /// The rules are exactly the server's defaults for this user. Those depend on
    /// the user only through their id (invites for them, mentions of them), so for
    /// an event that does not contain the id, every such user gets the same answer.
    standard: bool,
    full: Ruleset,
    without_body_words: Ruleset,
    /// Lowercased literal parts of the body-word patterns.
    needles: Vec<String>,
}

fn is_body_word_condition(c: &Value) -> bool {
    (c["kind"] == "event_match" && c["key"] == "content.body")
        || c["kind"] == "contains_display_name"
}

impl UserRules {
    fn new(full: Ruleset, user: &UserId) -> MxResult<Self> {
        let mut v = serde_json::to_value(&full)?;
        let standard = v == serde_json::to_value(Ruleset::server_default(user))?;
        let mut needles = Vec::new();
        let mut note = |pattern: &str| {
            if let Some(longest) = pattern.split(['*', '?']).max_by_key(|s| s.len()) {
                needles.push(longest.to_lowercase());
            }
        };
        for kind in ["override", "underride", "room", "sender"] {
            if let Some(rules) = v.get_mut(kind).and_then(Value::as_array_mut) {
                rules.retain(|r| {
                    let word = r["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(is_body_word_condition));
                    for c in r["conditions"].as_array().into_iter().flatten() {
                        if c["kind"] == "event_match" && c["key"] == "content.body" {
                            note(c["pattern"].as_str().unwrap_or_default());
                        }
                    }
                    !word
                });
            }
        }
        for r in v["content"].as_array().into_iter().flatten() {
            note(r["pattern"].as_str().unwrap_or_default());
        }
        v["content"] = json!([]);
        let without_body_words = serde_json::from_value(v)?;
        Ok(Self {
            standard,
            full,
            without_body_words,
            needles,
        })
    }

    /// The rule set that gives the right answer for an event with this body.
    /// `body` is the event's body, already lowercased.
    fn for_body(&self, body: Option<&str>, display_name: &str) -> &Ruleset {
        let Some(body) = body else {
            return &self.without_body_words;
        };
        let may_match = body.contains(&display_name.to_lowercase())
            || self.needles.iter().any(|n| body.contains(n.as_str()));
        if may_match {
            &self.full
        } else {
            &self.without_body_words
        }
    }
}

impl RulesCache {
    fn get(&self, c: &Connection, user: &UserId) -> MxResult<Arc<UserRules>> {
        if let Some(r) = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user.as_str())
        {
            return Ok(r.clone());
        }
        let rules = Arc::new(UserRules::new(ephemeral::push_rules(c, user)?, user)?);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(user.to_string(), rules.clone());
        Ok(rules)
    }

    /// Forgets a user's cached rules (after they changed them).
    pub fn invalidate(&self, user: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }
}

pub(crate) fn power_ctx(
    c: &Connection,
    room_id: &str,
) -> MxResult<Option<PushConditionPowerLevelsCtx>> {
    let Some(version) = pdu::room_version(c, room_id)? else {
        return Ok(None);
    };
    let Some(rules) = version.rules() else {
        return Ok(None);
    };
    let pl = pdu::power_levels(c, room_id)?;
    let content = pl.content.unwrap_or_else(|| json!({}));
    let mut users = BTreeMap::new();
    for (u, l) in content["users"].as_object().into_iter().flatten() {
        if let (Ok(u), Some(l)) = (UserId::parse(u), l.as_i64()) {
            users.insert(u, Int::new_saturating(l));
        }
    }
    let users_default = Int::new_saturating(content["users_default"].as_i64().unwrap_or(0));
    let mut notifications = NotificationPowerLevels::new();
    notifications.room =
        Int::new_saturating(content["notifications"]["room"].as_i64().unwrap_or(50));
    let creators: Vec<OwnedUserId> = pl
        .creators
        .iter()
        .filter_map(|c| UserId::parse(c).ok())
        .collect();
    let plrules = RoomPowerLevelsRules::new(&rules.authorization, creators);
    Ok(Some(PushConditionPowerLevelsCtx::new(
        users,
        users_default,
        notifications,
        plrules,
    )))
}

/// Who gets notified of an event, and how: computed from the event's draft
/// (type, sender, content, state key) before it is stored, outside the writer lock.
pub struct PushPlan {
    rows: Vec<(String, bool, String)>,
}

/// Evaluates every recipient's push rules (ruma's evaluator) for an event draft.
pub fn plan(hs: &Hs, c: &Connection, room_id: &RoomId, event: &Value) -> MxResult<PushPlan> {
    let sender = event["sender"].as_str().unwrap_or_default();
    let info = hs.room_info.get(hs, c, room_id.as_str())?;
    let names = &info.joined;
    let member_count = names.len() as i64;
    let mut recipients: Vec<String> = names.keys().cloned().collect();
    if event["type"] == "m.room.member" && event["content"]["membership"] == "invite" {
        if let Some(k) = event["state_key"].as_str() {
            recipients.push(k.to_owned());
        }
    }
    recipients.retain(|u| u != sender);
    let mut rows = Vec::new();
    if recipients.is_empty() {
        return Ok(PushPlan { rows });
    }
    let power = &info.power;
    let raw: Raw<Value> = Raw::from_json(serde_json::value::to_raw_value(event)?);
    // Flattened once for all recipients (ruma's `get_actions` would flatten per call).
    let flat = FlattenedJson::from_raw(&raw);
    let body = event["content"]["body"].as_str().map(str::to_lowercase);
    // The answer for users with standard rules whom the event does not name.
    let mut standard: Option<Option<(bool, String)>> = None;
    for user in recipients {
        let Ok(uid) = UserId::parse(&user) else {
            continue;
        };
        let rules = hs.push_rules.get(c, &uid)?;
        let shared = rules.standard && !raw.json().get().contains(user.as_str());
        if shared {
            if let Some(answer) = &standard {
                if let Some((highlight, actions)) = answer {
                    rows.push((user, *highlight, actions.clone()));
                }
                continue;
            }
        }
        let display = names
            .get(&user)
            .cloned()
            .flatten()
            .unwrap_or_else(|| uid.localpart().to_owned());
        let mut ctx = PushConditionRoomCtx::new(
            room_id.to_owned(),
            UInt::new_saturating(member_count as u64),
            uid.clone(),
            display,
        );
        if let Some(p) = &power {
            ctx = ctx.with_power_levels(p.clone());
        }
        let rules = rules.for_body(body.as_deref(), &ctx.user_display_name);
        let actions: Vec<Action> = futures::executor::block_on(first_match(rules, &flat, &ctx));
        let answer = actions
            .iter()
            .any(Action::should_notify)
            .then(|| -> MxResult<_> {
                Ok((
                    actions.iter().any(Action::is_highlight),
                    serde_json::to_string(&actions)?,
                ))
            })
            .transpose()?;
        if shared {
            standard = Some(answer.clone());
        }
        if let Some((highlight, actions)) = answer {
            rows.push((user, highlight, actions));
        }
    }
    Ok(PushPlan { rows })
}

/// The actions of the first rule (in priority order) that applies, as ruma's
/// `Ruleset::get_actions` but on an event flattened once by the caller.
async fn first_match(
    rules: &Ruleset,
    event: &FlattenedJson,
    ctx: &PushConditionRoomCtx,
) -> Vec<Action> {
    for rule in rules {
        if rule.applies(event, ctx).await {
            return rule.actions().to_vec();
        }
    }
    Vec::new()
}

/// Stores the notification rows of a plan with the event they belong to.
pub fn store_plan(
    hs: &Hs,
    w: &WriteTxn<'_>,
    room_id: &RoomId,
    plan: &PushPlan,
    event_id: &str,
    stream: i64,
    thread_root: Option<&str>,
    ts: i64,
) -> rusqlite::Result<()> {
    if plan.rows.is_empty() {
        return Ok(());
    }
    // Distinct action lists, each stored once; users point at theirs by index.
    let mut distinct: Vec<&str> = Vec::new();
    let mut users = String::from("\n");
    let mut highlights = String::from("\n");
    for (user, highlight, actions) in &plan.rows {
        let i = match distinct.iter().position(|a| a == actions) {
            Some(i) => i,
            None => {
                distinct.push(actions);
                distinct.len() - 1
            }
        };
        users.push_str(&format!("{user}\t{i}\n"));
        if *highlight {
            highlights.push_str(user);
            highlights.push('\n');
        }
    }
    let actions = format!("[{}]", distinct.join(","));
    w.prepare_cached(
        "INSERT OR IGNORE INTO event_push(stream, room_id, event_id, thread_id, ts, users, highlights, actions)
         VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
    )?
    .execute(params![stream, room_id.as_str(), event_id, thread_root, ts, users, highlights, actions])?;
    let mut queued = false;
    for (user, _, _) in &plan.rows {
        queued |= crate::pushers::enqueue(hs, w, user, room_id.as_str(), event_id)?;
    }
    if queued {
        hs.push_wakeup.notify_one();
    }
    Ok(())
}

/// The `instr` needles that find a user in `event_push.users` and `.highlights`.
pub(crate) fn needles(user: &str) -> (String, String) {
    (format!("\n{user}\t"), format!("\n{user}\n"))
}

/// The actions an event's push row holds for a user, if it notified them.
pub fn actions_for(c: &Connection, stream: i64, user: &str) -> rusqlite::Result<Option<Value>> {
    let row: Option<(String, String)> = c
        .prepare_cached("SELECT users, actions FROM event_push WHERE stream=?1")?
        .query_row([stream], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.and_then(|(users, actions)| user_actions(&users, &actions, user)))
}

/// Picks one user's action list out of an `event_push` row.
fn user_actions(users: &str, actions: &str, user: &str) -> Option<Value> {
    let (needle, _) = needles(user);
    let at = users.find(&needle)? + needle.len();
    let i: usize = users[at..].split('\n').next()?.parse().ok()?;
    serde_json::from_str::<Value>(actions).ok()?.get(i).cloned()
}

/// Stream position up to which the user has read the room (main timeline or unthreaded).
fn read_up_to(
    c: &Connection,
    room: &str,
    user: &str,
    thread: Option<&str>,
) -> rusqlite::Result<i64> {
    c.prepare_cached(
        "SELECT COALESCE(MAX(e.stream),0) FROM receipts r JOIN events e ON e.event_id=r.event_id
         WHERE r.room_id=?1 AND r.user_id=?2 AND r.receipt_type IN ('m.read','m.read.private')
         AND (r.thread_id='' OR r.thread_id=?3)",
    )?
    .query_row(params![room, user, thread.unwrap_or("main")], |r| r.get(0))
}

/// Counting stops here: clients show "99+" long before.
pub(crate) const COUNT_CAP: i64 = 10_000;

/// Unread counts already worked out, so a sync counts only what is new since
/// the last one: a member who never sends read receipts would otherwise make
/// every sync count the room's whole history.
#[derive(Default)]
pub struct UnreadCache {
    map: Mutex<HashMap<(String, String, bool), Counted>>,
}

/// Counts of the notifying events in `(max(receipt, own), upto]`.
#[derive(Clone, Copy)]
struct Counted {
    upto: i64,
    receipt: i64,
    own: i64,
    notes: i64,
    highlights: i64,
}

/// Entries kept before the cache starts over.
const UNREAD_CACHE_MAX: usize = 50_000;

/// (notification_count, highlight_count) of a room: all threads together, or
/// only the main timeline when `per_thread` (then threads come from [`thread_counts`]).
/// Counts events up to stream position `upto`, which must be committed (at or
/// below [`crate::db::Db::current_stream`]); `i64::MAX` counts everything and
/// leaves the cache alone.
pub fn room_counts(
    hs: &Hs,
    c: &Connection,
    room: &str,
    user: &str,
    per_thread: bool,
    upto: i64,
) -> rusqlite::Result<(i64, i64)> {
    let key = (user.to_owned(), room.to_owned(), per_thread);
    let prev = hs
        .unread
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .copied()
        .filter(|p| p.upto <= upto);
    // Most syncs come with neither a new receipt nor a new message of the
    // user's own in the room: the hints say so without asking the database.
    let hint_key = user_room(user, room);
    let unchanged = |kind| prev.is_some_and(|p| !hs.db.may_have_changed(kind, &hint_key, p.upto));
    let receipt = match prev {
        Some(p) if unchanged(UserRows::ReadReceipt) => p.receipt,
        _ => read_up_to(c, room, user, None)?,
    };
    // The user's own newest message marks the room as read up to there.
    let own_after = prev.map_or(0, |p| p.upto);
    let own_new = if unchanged(UserRows::Sent) {
        0
    } else {
        own_newest(hs, c, room, user, own_after, upto)?
    };
    let own = own_new.max(prev.map_or(0, |p| p.own));
    let from = receipt.max(own);
    let (notes, highlights) = match prev {
        Some(p) if p.receipt == receipt && p.own == own => {
            let (n, h) = count_notifying(hs, c, room, user, per_thread, from.max(p.upto), upto)?;
            (
                (p.notes + n).min(COUNT_CAP),
                (p.highlights + h).min(COUNT_CAP),
            )
        }
        _ => count_notifying(hs, c, room, user, per_thread, from, upto)?,
    };
    if upto < i64::MAX {
        let mut map = hs.unread.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= UNREAD_CACHE_MAX {
            map.clear();
        }
        let entry = Counted {
            upto,
            receipt,
            own,
            notes,
            highlights,
        };
        map.entry(key)
            .and_modify(|e| {
                if e.upto <= upto {
                    *e = entry;
                }
            })
            .or_insert(entry);
    }
    Ok((notes, highlights))
}

/// Stream position of the user's newest event in the room within `(after, upto]`, or 0.
fn own_newest(
    hs: &Hs,
    c: &Connection,
    room: &str,
    user: &str,
    after: i64,
    upto: i64,
) -> rusqlite::Result<i64> {
    if let Some(s) = hs.db.recent.own_newest(room, user, after, upto) {
        return Ok(s);
    }
    own_newest_stored(c, room, user, after, upto)
}

/// [`own_newest`] from the database alone.
pub(crate) fn own_newest_stored(
    c: &Connection,
    room: &str,
    user: &str,
    after: i64,
    upto: i64,
) -> rusqlite::Result<i64> {
    Ok(c.prepare_cached(
        "SELECT stream FROM events WHERE room_id=?1 AND stream>?3 AND stream<=?4 AND sender=?2
             ORDER BY stream DESC LIMIT 1",
    )?
    .query_row(params![room, user, after, upto], |r| r.get(0))
    .optional()?
    .unwrap_or(0))
}

/// Notifying events for the user in `(after, upto]` (main timeline only when
/// `main_only`), capped at [`COUNT_CAP`].
fn count_notifying(
    hs: &Hs,
    c: &Connection,
    room: &str,
    user: &str,
    main_only: bool,
    after: i64,
    upto: i64,
) -> rusqlite::Result<(i64, i64)> {
    let (n, h) = needles(user);
    if let Some(found) = hs
        .db
        .recent
        .count_notifying(room, &n, &h, main_only, after, upto, COUNT_CAP)
    {
        return Ok(found);
    }
    count_notifying_stored(c, room, &n, &h, main_only, after, upto)
}

/// [`count_notifying`] from the database alone (`n`, `h`: the [`needles`]).
pub(crate) fn count_notifying_stored(
    c: &Connection,
    room: &str,
    n: &str,
    h: &str,
    main_only: bool,
    after: i64,
    upto: i64,
) -> rusqlite::Result<(i64, i64)> {
    // The room's events in the range come from `events_room_stream`, their
    // push rows by stream position (event_push has no room index of its own).
    let sql = if main_only {
        "SELECT COUNT(*), COALESCE(SUM(instr(highlights, ?5)>0),0) FROM (SELECT p.highlights
         FROM events e JOIN event_push p ON p.stream=e.stream
         WHERE e.room_id=?2 AND e.stream>?3 AND e.stream<=?6 AND p.thread_id IS NULL AND instr(p.users, ?1)>0 LIMIT ?4)"
    } else {
        "SELECT COUNT(*), COALESCE(SUM(instr(highlights, ?5)>0),0) FROM (SELECT p.highlights
         FROM events e JOIN event_push p ON p.stream=e.stream
         WHERE e.room_id=?2 AND e.stream>?3 AND e.stream<=?6 AND instr(p.users, ?1)>0 LIMIT ?4)"
    };
    c.prepare_cached(sql)?
        .query_row(params![n, room, after, COUNT_CAP, h, upto], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
}

/// Per-thread unread counts: thread root → (notification_count, highlight_count).
pub fn thread_counts(
    c: &Connection,
    room: &str,
    user: &str,
) -> rusqlite::Result<BTreeMap<String, (i64, i64)>> {
    let (n, h) = needles(user);
    let mut st = c.prepare_cached(
        "SELECT DISTINCT thread_id FROM event_push WHERE room_id=?1 AND thread_id IS NOT NULL AND instr(users, ?2)>0",
    )?;
    let threads: Vec<String> = st
        .query_map(params![room, n], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = BTreeMap::new();
    for t in threads {
        let from = read_up_to(c, room, user, Some(&t))?;
        let (count, high): (i64, i64) = c.prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(instr(highlights, ?5)>0),0) FROM (SELECT highlights FROM event_push
             WHERE room_id=?2 AND thread_id=?3 AND stream>?4 AND instr(users, ?1)>0 LIMIT ?6)",
        )?
        .query_row(params![n, room, t, from, h, COUNT_CAP], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if count > 0 {
            out.insert(t, (count, high));
        }
    }
    Ok(out)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NotificationsQuery {
    from: Option<String>,
    limit: Option<String>,
    only: Option<String>,
}

pub async fn notifications(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<NotificationsQuery>,
) -> MxResult<axum::Json<Value>> {
    let user = auth.user_id.as_str();
    let from: i64 = match &q.from {
        Some(f) => f
            .parse()
            .map_err(|_| MxError::invalid_param("Invalid from token"))?,
        None => i64::MAX,
    };
    let limit: i64 = match &q.limit {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| MxError::invalid_param("limit must be an integer"))?
            .clamp(1, 100),
        None => 20,
    };
    let only_highlight = q.only.as_deref() == Some("highlight");
    let v = Viewer {
        user_id: user,
        device_id: Some(auth.device_id.as_str()),
    };
    let out = hs.db.read(|c| -> MxResult<Value> {
        let (n, h) = needles(user);
        let mut st = c.prepare_cached(
            "SELECT room_id, stream, event_id, users, actions, ts, thread_id FROM event_push
             WHERE stream<?2 AND instr(users, ?1)>0 AND (?3=0 OR instr(highlights, ?5)>0) ORDER BY stream DESC LIMIT ?4",
        )?;
        let rows = st
            .query_map(params![n, from, only_highlight, limit + 1, h], |r| {
                let users: String = r.get(3)?;
                let actions: String = r.get(4)?;
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    user_actions(&users, &actions, user).unwrap_or_else(|| json!([])),
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() as i64 > limit;
        let mut list = Vec::new();
        for (room, stream, event_id, actions, ts, thread) in rows.iter().take(limit as usize) {
            let Some(ev) = pdu::get_event(c, event_id)? else { continue };
            let read = read_up_to(c, room, user, thread.as_deref())? >= *stream;
            list.push(json!({
                "actions": actions,
                "event": client_event(c, &ev, &v, true),
                "read": read,
                "room_id": room,
                "ts": ts,
            }));
        }
        let mut out = json!({ "notifications": list });
        if more {
            if let Some(last) = rows.get(limit as usize - 1) {
                out["next_token"] = json!(last.1.to_string());
            }
        }
        Ok(out)
    })?;
    Ok(axum::Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripped_rules_deserialize() {
        let user = UserId::parse("@a:x").unwrap();
        let mut rules = Ruleset::server_default(&user);
        let keyword: ruma::push::NewPushRule = ruma::push::NewPushRule::Content(
            serde_json::from_value(
                json!({"rule_id": "pizza", "pattern": "pizza*", "actions": ["notify"]}),
            )
            .unwrap(),
        );
        rules.insert(keyword, None, None).unwrap();
        let r = UserRules::new(rules, &user).unwrap();
        assert!(!r.standard, "a keyword rule makes the rules the user's own");
        assert!(
            UserRules::new(Ruleset::server_default(&user), &user)
                .unwrap()
                .standard
        );
        assert_eq!(r.needles, vec!["pizza".to_owned()]);
        assert!(std::ptr::eq(
            r.for_body(Some("hello"), "Alice"),
            &r.without_body_words
        ));
        assert!(std::ptr::eq(
            r.for_body(Some("hi alice!"), "Alice"),
            &r.full
        ));
        assert!(std::ptr::eq(
            r.for_body(Some(&"PIZZAS tonight".to_lowercase()), "Alice"),
            &r.full
        ));
    }
}
