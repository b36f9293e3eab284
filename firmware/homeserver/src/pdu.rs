//! Room events as federation sees them (PDUs): building, hashing, signing,
//! authorising with ruma's auth rules, storing, and formatting for clients.

use ruma::{
    canonical_json::{redact, CanonicalJsonObject, CanonicalJsonValue, RedactedBecause},
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    signatures::{hash_and_sign_event, reference_hash},
    state_res::{auth_types_for_event, check_state_dependent_auth_rules},
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId,
    RoomVersionId, UserId,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};

use crate::{
    db::{user_room, UserRows, WriteTxn},
    error::{MxError, MxResult},
    now_ms, search, Hs,
};

/// Largest PDU the spec allows.
pub const MAX_PDU_BYTES: usize = 65_536;

/// A parsed PDU, enough for ruma's auth rules.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    /// Rejected by the auth rules when it was received (kept so events citing it fail too).
    pub rejected: bool,
}

#[derive(Deserialize)]
struct RawPdu {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawValue>,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: u64,
}

impl Pdu {
    pub fn parse(event_id: OwnedEventId, json: &str) -> serde_json::Result<Self> {
        let raw: RawPdu = serde_json::from_str(json)?;
        let redacts = raw.redacts.or_else(|| {
            #[derive(Deserialize)]
            struct C {
                redacts: Option<OwnedEventId>,
            }
            if raw.kind == TimelineEventType::RoomRedaction {
                serde_json::from_str::<C>(raw.content.get())
                    .ok()
                    .and_then(|c| c.redacts)
            } else {
                None
            }
        });
        Ok(Self {
            event_id,
            room_id: raw.room_id,
            sender: raw.sender,
            origin_server_ts: raw.origin_server_ts,
            kind: raw.kind,
            content: raw.content,
            state_key: raw.state_key,
            prev_events: raw.prev_events,
            auth_events: raw.auth_events,
            redacts,
            depth: raw.depth,
            rejected: false,
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;
    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// A stored event row.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream: i64,
    pub event_id: String,
    pub room_id: String,
    pub json: String,
    pub redacted_by: Option<String>,
    pub txn_id: Option<String>,
    pub txn_device: Option<String>,
    pub prev_state: Option<String>,
}

pub const EVENT_COLS: &str =
    "stream, event_id, room_id, json, redacted_by, txn_id, txn_device, prev_state";

pub fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        stream: r.get(0)?,
        event_id: r.get(1)?,
        room_id: r.get(2)?,
        json: r.get(3)?,
        redacted_by: r.get(4)?,
        txn_id: r.get(5)?,
        txn_device: r.get(6)?,
        prev_state: r.get(7)?,
    })
}

pub fn get_event(conn: &Connection, event_id: &str) -> rusqlite::Result<Option<StoredEvent>> {
    conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE event_id=?1"
    ))?
    .query_row([event_id], row_to_event)
    .optional()
}

pub fn load_pdu(conn: &Connection, event_id: &str) -> Option<Pdu> {
    let (json, rejected): (String, bool) = conn
        .prepare_cached(
            "SELECT e.json, r.event_id IS NOT NULL FROM events e
             LEFT JOIN rejected_events r ON r.event_id=e.event_id WHERE e.event_id=?1",
        )
        .ok()?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .ok()?;
    let mut p = Pdu::parse(EventId::parse(event_id).ok()?, &json).ok()?;
    p.rejected = rejected;
    Some(p)
}

pub fn room_version(conn: &Connection, room_id: &str) -> rusqlite::Result<Option<RoomVersionId>> {
    let v: Option<String> = conn
        .prepare_cached("SELECT room_version FROM rooms WHERE room_id=?1")?
        .query_row([room_id], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| RoomVersionId::try_from(v.as_str()).ok()))
}

pub fn rules_for(version: &RoomVersionId) -> MxResult<RoomVersionRules> {
    version
        .rules()
        .ok_or_else(|| MxError::unsupported_room_version("Unsupported room version"))
}

pub fn state_event_id(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    key: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT event_id FROM room_state WHERE room_id=?1 AND type=?2 AND state_key=?3",
    )?
    .query_row(params![room_id, kind, key], |r| r.get(0))
    .optional()
}

/// Content of a current state event.
pub fn state_content(
    conn: &Connection,
    room_id: &str,
    kind: &str,
    key: &str,
) -> rusqlite::Result<Option<Value>> {
    let json: Option<String> = conn
        .prepare_cached(
            "SELECT e.json FROM room_state s JOIN events e ON e.event_id=s.event_id
             WHERE s.room_id=?1 AND s.type=?2 AND s.state_key=?3",
        )?
        .query_row(params![room_id, kind, key], |r| r.get(0))
        .optional()?;
    Ok(json
        .and_then(|j| serde_json::from_str::<Value>(&j).ok())
        .map(|mut v| v["content"].take()))
}

pub fn membership(
    conn: &Connection,
    room_id: &str,
    user_id: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT membership FROM room_state WHERE room_id=?1 AND type='m.room.member' AND state_key=?2")?
        .query_row(params![room_id, user_id], |r| r.get(0))
        .optional()
}

/// Local users whose membership in the room is `join` (or also `invite`, when asked).
pub fn local_members(
    conn: &Connection,
    room_id: &str,
    with_invites: bool,
) -> rusqlite::Result<Vec<String>> {
    let sql = if with_invites {
        "SELECT state_key FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership IN ('join','invite','knock')"
    } else {
        "SELECT state_key FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership='join'"
    };
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map([room_id], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// What a new event should be.
pub struct NewEvent<'a> {
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
    /// (device id, txn id) of the client request that sent it.
    pub txn: Option<(&'a str, &'a str)>,
}

/// Where a stored event goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// In the room's timeline (and current state, for state events).
    Timeline,
    /// Outside the timeline, but part of the room's current state.
    OutlierState,
    /// Outside the timeline and the current state (auth chains).
    Outlier,
    /// In the timeline with the given state group before it (an event from
    /// another server, perhaps made on a fork of the graph). When that is not
    /// the current state, the current state stays as it is: the caller
    /// resolves it over the forward extremities.
    TimelineAfter(i64),
    /// Soft-failed (allowed by the state before it, not by the current state):
    /// in the event graph with its state, hidden from clients, never an extremity.
    SoftFailed(i64),
    /// Older history fetched from another server: in the timeline, before
    /// everything known (negative stream positions), never current state.
    Backfill,
}

/// A signed, authorised event not yet stored.
pub struct Built {
    pub pdu: Pdu,
    pub json: String,
    pub rules: RoomVersionRules,
    /// When the room had more forward extremities than an event may cite:
    /// the state groups after the cited ones, whose resolution is the state
    /// before the event (empty: the current state is).
    pub cited_groups: Vec<i64>,
}

/// The most prev events an event may cite (the PDU format's limit).
const MAX_PREV_EVENTS: usize = 20;

/// The outcome of appending an event.
#[derive(Debug, Clone)]
pub struct Appended {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub stream: i64,
}

impl Hs {
    fn sign(
        &self,
        obj: &mut CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> MxResult<OwnedEventId> {
        let json_err = |e: ruma::signatures::JsonError| match e {
            ruma::signatures::JsonError::PduTooLarge => {
                MxError::too_large("Event is larger than 64 KiB")
            }
            other => MxError::bad_json(format!("Cannot sign event: {other}")),
        };
        hash_and_sign_event(
            self.server_name.as_str(),
            &self.keypair,
            obj,
            &rules.redaction,
        )
        .map_err(json_err)?;
        let hash = reference_hash(obj, rules).map_err(json_err)?;
        EventId::parse(format!("${hash}")).map_err(|e| MxError::unknown(e.to_string()))
    }

    /// Builds, signs, authorises and stores the `m.room.create` event of a new room.
    pub(crate) fn append_create(
        &self,
        w: &mut WriteTxn<'_>,
        version: &RoomVersionId,
        sender: &UserId,
        content: Value,
    ) -> MxResult<Appended> {
        let rules = rules_for(version)?;
        let ts = now_ms();
        let mut obj = json!({
            "type": "m.room.create",
            "state_key": "",
            "sender": sender,
            "content": content,
            "origin_server_ts": ts,
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        });
        let room_id: OwnedRoomId = if rules.authorization.room_create_event_id_as_room_id {
            // v12: the room id is derived from the create event's reference hash, so two
            // rooms made by one user in the same millisecond would collide: move the
            // timestamp on until the id is free.
            let mut tries = 0;
            loop {
                let mut probe = to_canonical(obj.clone())?;
                let event_id = self.sign(&mut probe, &rules)?;
                let id = RoomId::parse(format!("!{}", &event_id.as_str()[1..]))
                    .map_err(|e| MxError::unknown(e.to_string()))?;
                if room_version(w, id.as_str())?.is_none() || tries >= 1000 {
                    break id;
                }
                tries += 1;
                obj["origin_server_ts"] = json!(ts + tries);
            }
        } else {
            let id = RoomId::new_v1(&self.server_name);
            obj["room_id"] = json!(id);
            id
        };
        let mut cobj = to_canonical(obj)?;
        let event_id = self.sign(&mut cobj, &rules)?;
        let pdu_json = serde_json::to_string(&cobj).map_err(|e| MxError::unknown(e.to_string()))?;
        let pdu = Pdu::parse(event_id.clone(), &pdu_json)
            .map_err(|e| MxError::bad_json(e.to_string()))?;
        ruma::state_res::check_state_independent_auth_rules::<Pdu>(
            &rules.authorization,
            &pdu,
            |_| None,
        )
        .map_err(MxError::forbidden)?;
        if room_version(w, room_id.as_str())?.is_some() {
            return Err(MxError::room_in_use("Room already exists"));
        }
        w.execute(
            "INSERT INTO rooms(room_id, room_version, created_ts) VALUES(?1,?2,?3)",
            params![room_id.as_str(), version.as_str(), ts as i64],
        )?;
        let stream = self.store_pdu(w, room_id.as_str(), &pdu, &pdu_json, None)?;
        Ok(Appended {
            event_id,
            room_id,
            stream,
        })
    }

    /// Builds, signs, authorises (ruma's auth rules against current state) and stores an event.
    pub(crate) fn append_event(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &RoomId,
        sender: &UserId,
        ev: NewEvent<'_>,
    ) -> MxResult<Appended> {
        self.append_event_with_plan(w, room_id, sender, ev, None)
    }

    /// Like [`Hs::append_event`], with push rules already evaluated (see [`crate::push::plan`]).
    pub(crate) fn append_event_with_plan(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &RoomId,
        sender: &UserId,
        ev: NewEvent<'_>,
        plan: Option<crate::push::PushPlan>,
    ) -> MxResult<Appended> {
        let built = self.build_pdu(w, room_id, sender, &ev)?;
        self.commit_built(w, room_id, built, ev.txn, plan, None)
    }

    /// Builds, signs and authorises (against current state) a new event without storing it.
    pub(crate) fn build_pdu(
        &self,
        c: &Connection,
        room_id: &RoomId,
        sender: &UserId,
        ev: &NewEvent<'_>,
    ) -> MxResult<Built> {
        let version =
            room_version(c, room_id.as_str())?.ok_or_else(|| MxError::not_found("Unknown room"))?;
        let rules = rules_for(&version)?;
        let kind = TimelineEventType::from(ev.kind);
        let content_raw = serde_json::value::to_raw_value(&ev.content)
            .map_err(|e| MxError::bad_json(e.to_string()))?;
        let auth_types = auth_types_for_event(
            &kind,
            sender,
            ev.state_key,
            &content_raw,
            &rules.authorization,
        )
        .map_err(MxError::bad_json)?;
        let (prev_events, depth, over) = {
            let mut st = c.prepare_cached(
                "SELECT f.event_id, e.depth FROM forward_extremities f JOIN events e ON e.event_id=f.event_id
                 WHERE f.room_id=?1 ORDER BY e.depth DESC",
            )?;
            let mut rows: Vec<(String, i64)> = st
                .query_map([room_id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let over = rows.len() > MAX_PREV_EVENTS;
            rows.truncate(MAX_PREV_EVENTS);
            let depth = rows.iter().map(|r| r.1).max().unwrap_or(0) + 1;
            (
                rows.into_iter().map(|r| r.0).collect::<Vec<_>>(),
                depth,
                over,
            )
        };
        // More extremities than an event may cite: the state before it is the
        // resolution of the cited ones' states (what other servers will compute),
        // not the current state (the resolution of all of them).
        let mut cited_groups = Vec::new();
        let cited_state = if over {
            for p in &prev_events {
                if let Some((_, after)) = crate::state::event_groups(c, p)? {
                    cited_groups.push(after);
                }
            }
            cited_groups.sort_unstable();
            cited_groups.dedup();
            let states = cited_groups
                .iter()
                .map(|g| crate::state::load_group(c, *g))
                .collect::<Result<Vec<_>, _>>()?;
            Some(match states.len() {
                0 => return Err(MxError::unknown("no state at the room's extremities")),
                1 => states.into_iter().next().unwrap_or_default(),
                _ => crate::state::resolve(c, &rules, &states)?,
            })
        } else {
            None
        };
        let state_at = |ty: &str, key: &str| -> rusqlite::Result<Option<String>> {
            match &cited_state {
                Some(s) => Ok(s.get(&(ty.to_owned(), key.to_owned())).cloned()),
                None => state_event_id(c, room_id.as_str(), ty, key),
            }
        };
        let mut auth_events = Vec::new();
        for (ty, key) in &auth_types {
            if let Some(id) = state_at(&ty.to_string(), key)? {
                if !auth_events.contains(&id) {
                    auth_events.push(id);
                }
            }
        }
        let mut obj = json!({
            "type": ev.kind,
            "room_id": room_id,
            "sender": sender,
            "content": ev.content,
            "origin_server_ts": now_ms(),
            "depth": depth.min(i64::from(u32::MAX) * 1000),
            "prev_events": prev_events,
            "auth_events": auth_events,
        });
        if let Some(k) = ev.state_key {
            obj["state_key"] = json!(k);
        }
        if ev.kind == "m.room.redaction" && !rules.redaction.content_field_redacts {
            if let Some(r) = obj["content"]["redacts"].as_str().map(str::to_owned) {
                obj["redacts"] = json!(r);
            }
        }
        let mut cobj = to_canonical(obj)?;
        let event_id = self.sign(&mut cobj, &rules)?;
        let json = serde_json::to_string(&cobj).map_err(|e| MxError::unknown(e.to_string()))?;
        if json.len() > MAX_PDU_BYTES {
            return Err(MxError::too_large("Event is larger than 64 KiB"));
        }
        let pdu = Pdu::parse(event_id, &json).map_err(|e| MxError::bad_json(e.to_string()))?;
        // Allowed by the current state, and (when they differ) by the state before it.
        check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |ty: &StateEventType, key: &str| {
                state_event_id(c, room_id.as_str(), &ty.to_string(), key)
                    .ok()
                    .flatten()
                    .and_then(|id| load_pdu(c, &id))
            },
        )
        .map_err(|e| MxError::forbidden(format!("Event not allowed: {e}")))?;
        if cited_state.is_some() {
            check_state_dependent_auth_rules(
                &rules.authorization,
                &pdu,
                |ty: &StateEventType, key: &str| {
                    state_at(&ty.to_string(), key)
                        .ok()
                        .flatten()
                        .and_then(|id| load_pdu(c, &id))
                },
            )
            .map_err(|e| MxError::forbidden(format!("Event not allowed: {e}")))?;
        }
        Ok(Built {
            pdu,
            json,
            rules,
            cited_groups,
        })
    }

    /// Stores a built local event: timeline, state, push, redaction, and the
    /// federation queue of every other server in the room.
    pub(crate) fn commit_built(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &RoomId,
        built: Built,
        txn: Option<(&str, &str)>,
        plan: Option<crate::push::PushPlan>,
        skip_server: Option<&str>,
    ) -> MxResult<Appended> {
        let Built {
            pdu,
            json: pdu_json,
            rules,
            cited_groups,
        } = built;
        let event_id = pdu.event_id.clone();
        let stream = match crate::state::resolve_groups(w, room_id.as_str(), &rules, cited_groups)?
        {
            None => self.store_pdu(w, room_id.as_str(), &pdu, &pdu_json, txn)?,
            Some(before) => {
                // Not every extremity cited: its state is that of the cited ones,
                // and the current state the resolution over all that remain.
                let stream = self.store_pdu_as(
                    w,
                    room_id.as_str(),
                    &pdu,
                    &pdu_json,
                    txn,
                    Placement::TimelineAfter(before),
                )?;
                self.refresh_current_state(w, room_id.as_str(), &rules)?;
                stream
            }
        };
        self.after_store(w, room_id, &pdu, &pdu_json, stream, &rules, plan)?;
        crate::federation::enqueue_pdu(self, w, room_id, &pdu, &pdu_json, skip_server)?;
        Ok(Appended {
            event_id,
            room_id: room_id.to_owned(),
            stream,
        })
    }

    /// Push notifications and redactions for a stored timeline event (local or remote).
    pub(crate) fn after_store(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &RoomId,
        pdu: &Pdu,
        pdu_json: &str,
        stream: i64,
        rules: &RoomVersionRules,
        plan: Option<crate::push::PushPlan>,
    ) -> MxResult<()> {
        let kind = pdu.kind.to_string();
        let thread_root = if kind == "m.room.encrypted" || kind == "m.room.message" {
            serde_json::from_str::<Value>(pdu.content.get())
                .ok()
                .and_then(|c| {
                    (c["m.relates_to"]["rel_type"] == "m.thread")
                        .then(|| c["m.relates_to"]["event_id"].as_str().map(str::to_owned))
                        .flatten()
                })
        } else {
            None
        };
        let plan = match plan {
            Some(p) => p,
            None => crate::push::plan(self, w, room_id, &serde_json::from_str(pdu_json)?)?,
        };
        let ts = u64::from(pdu.origin_server_ts.0) as i64;
        crate::push::store_plan(
            self,
            w,
            room_id,
            &plan,
            pdu.event_id.as_str(),
            stream,
            thread_root.as_deref(),
            ts,
        )?;
        if let Some(target) = &pdu.redacts {
            if may_redact(w, room_id.as_str(), pdu, target.as_str())? {
                apply_redaction(w, target.as_str(), &pdu.event_id, pdu_json, rules)?;
            }
        }
        Ok(())
    }

    pub(crate) fn store_pdu(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &str,
        pdu: &Pdu,
        json: &str,
        txn: Option<(&str, &str)>,
    ) -> MxResult<i64> {
        self.store_pdu_as(w, room_id, pdu, json, txn, Placement::Timeline)
    }

    /// Inserts the `events` row of a PDU (relations, thread, previous state).
    #[allow(clippy::too_many_arguments)]
    fn insert_event_row(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &str,
        pdu: &Pdu,
        json: &str,
        stream: i64,
        outlier: bool,
        txn: Option<(&str, &str)>,
    ) -> MxResult<Value> {
        let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
        let rel = &content["m.relates_to"];
        let rel_type = rel["rel_type"].as_str();
        let relates_to = rel["event_id"]
            .as_str()
            .or_else(|| rel["m.in_reply_to"]["event_id"].as_str());
        let rel_type = rel_type.or(if relates_to.is_some() {
            Some("m.in_reply_to")
        } else {
            None
        });
        let thread_root = if rel_type == Some("m.thread") {
            relates_to
        } else {
            None
        };
        let prev_state = match &pdu.state_key {
            Some(k) => state_event_id(w, room_id, &pdu.kind.to_string(), k)?,
            None => None,
        };
        w.note(UserRows::Room, room_id, stream);
        if pdu.sender.server_name() == self.server_name {
            w.note(
                UserRows::Sent,
                &user_room(pdu.sender.as_str(), room_id),
                stream,
            );
        }
        if pdu.kind == TimelineEventType::RoomMember {
            w.note(UserRows::Membership, "", stream);
        }
        w.execute(
            "INSERT INTO events(stream, event_id, room_id, sender, type, state_key, depth, origin_server_ts, json,
                                rel_type, relates_to, thread_root, txn_id, txn_device, prev_state, outlier)
             VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
            params![
                stream,
                pdu.event_id.as_str(),
                room_id,
                pdu.sender.as_str(),
                pdu.kind.to_string(),
                pdu.state_key,
                pdu.depth as i64,
                u64::from(pdu.origin_server_ts.0) as i64,
                json,
                rel_type,
                relates_to,
                thread_root,
                txn.map(|t| t.1),
                txn.map(|t| t.0),
                prev_state,
                outlier,
            ],
        )?;
        Ok(content)
    }

    /// Stores an event as a timeline event, as an outlier (known for auth and
    /// state only, e.g. the state received when joining a room on another server)
    /// that may or may not set the current state, or as backfilled history.
    pub(crate) fn store_pdu_as(
        &self,
        w: &mut WriteTxn<'_>,
        room_id: &str,
        pdu: &Pdu,
        json: &str,
        txn: Option<(&str, &str)>,
        placement: Placement,
    ) -> MxResult<i64> {
        if let Placement::SoftFailed(before) = placement {
            let stream = w.next_stream();
            self.insert_event_row(w, room_id, pdu, json, stream, true, None)?;
            crate::state::record_event(w, room_id, pdu, before)?;
            return Ok(stream);
        }
        if placement == Placement::Backfill {
            let stream: i64 =
                w.query_row("SELECT COALESCE(MIN(stream), 0) - 1 FROM events", [], |r| {
                    r.get(0)
                })?;
            return self
                .insert_event_row(w, room_id, pdu, json, stream, false, None)
                .map(|_| stream);
        }
        let (timeline, before) = match placement {
            Placement::Timeline => (true, None),
            Placement::TimelineAfter(g) => (true, Some(g)),
            _ => (false, None),
        };
        let stream = w.next_stream();
        let content = self.insert_event_row(w, room_id, pdu, json, stream, !timeline, txn)?;
        if !timeline && placement != Placement::OutlierState {
            return Ok(stream);
        }
        let mut apply = true;
        if timeline {
            let current = crate::state::ensure_current_group(w, room_id)?;
            let before = before.unwrap_or(current);
            let after = crate::state::record_event(w, room_id, pdu, before)?;
            apply = before == current;
            if apply {
                crate::state::set_current_group(w, room_id, after)?;
            }
        } else {
            crate::state::forget_current(w, room_id)?;
        }
        for p in pdu.prev_events.iter().filter(|_| timeline) {
            w.execute(
                "DELETE FROM forward_extremities WHERE room_id=?1 AND event_id=?2",
                params![room_id, p.as_str()],
            )?;
        }
        if timeline {
            w.execute(
                "INSERT OR IGNORE INTO forward_extremities(room_id, event_id) VALUES(?1,?2)",
                params![room_id, pdu.event_id.as_str()],
            )?;
        }
        if let Some(key) = pdu.state_key.as_ref().filter(|_| apply) {
            let membership = if pdu.kind == TimelineEventType::RoomMember {
                content["membership"].as_str().map(str::to_owned)
            } else {
                None
            };
            w.execute(
                "INSERT INTO room_state(room_id, type, state_key, event_id, stream, membership) VALUES(?1,?2,?3,?4,?5,?6)
                 ON CONFLICT(room_id, type, state_key) DO UPDATE SET event_id=?4, stream=?5, membership=?6",
                params![room_id, pdu.kind.to_string(), key, pdu.event_id.as_str(), stream, membership],
            )?;
            self.room_info.state_changed(room_id, stream);
            if pdu.kind == TimelineEventType::RoomMember && membership.as_deref() == Some("join") {
                w.execute(
                    "DELETE FROM forgotten_rooms WHERE user_id=?1 AND room_id=?2",
                    params![key, room_id],
                )?;
            }
        }
        if !timeline {
            return Ok(stream);
        }
        // Search indexing follows in batches (search::catch_up).
        if is_bump(&pdu.kind) {
            w.execute(
                "UPDATE rooms SET bump_stamp=?1 WHERE room_id=?2",
                params![stream, room_id],
            )?;
        }
        Ok(stream)
    }
}

/// Whether a redaction may take effect (the auth rules leave this to the server
/// since room version 3): the target is in the same room, and the redacting user
/// is on the same server as the original sender or has the `redact` power level.
fn may_redact(c: &Connection, room_id: &str, redaction: &Pdu, target: &str) -> MxResult<bool> {
    let Some(t) = load_pdu(c, target) else {
        return Ok(false);
    };
    if t.room_id.as_deref().map(|r| r.as_str()) != Some(room_id) {
        return Ok(false);
    }
    if t.sender.server_name() == redaction.sender.server_name() {
        return Ok(true);
    }
    let pl = power_levels(c, room_id)?;
    Ok(pl.user(redaction.sender.as_str()) >= pl.action("redact", 50))
}

fn apply_redaction(
    w: &mut WriteTxn<'_>,
    target: &str,
    redaction_id: &EventId,
    redaction_json: &str,
    rules: &RoomVersionRules,
) -> MxResult<()> {
    let Some(stored) = get_event(w, target)? else {
        return Ok(());
    };
    let obj: CanonicalJsonObject =
        serde_json::from_str(&stored.json).map_err(|e| MxError::unknown(e.to_string()))?;
    let because: CanonicalJsonObject =
        serde_json::from_str(redaction_json).map_err(|e| MxError::unknown(e.to_string()))?;
    let redacted = redact(
        obj,
        &rules.redaction,
        Some(RedactedBecause::from_json(because)),
    )
    .map_err(|e| MxError::unknown(e.to_string()))?;
    let json = serde_json::to_string(&redacted).map_err(|e| MxError::unknown(e.to_string()))?;
    w.execute(
        "UPDATE events SET json=?1, redacted_by=?2 WHERE event_id=?3",
        params![json, redaction_id.as_str(), target],
    )?;
    search::unindex_event(w, stored.stream)?;
    Ok(())
}

/// Events that move a room up the room list.
pub fn is_bump(kind: &TimelineEventType) -> bool {
    matches!(
        kind.to_string().as_str(),
        "m.room.create"
            | "m.room.message"
            | "m.room.encrypted"
            | "m.sticker"
            | "m.call.invite"
            | "m.poll.start"
            | "m.beacon_info"
            | "org.matrix.msc3381.poll.start"
    )
}

pub fn to_canonical(v: Value) -> MxResult<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(v) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(MxError::bad_json("Event must be an object")),
        Err(e) => Err(MxError::bad_json(format!(
            "Event is not canonical JSON: {e}"
        ))),
    }
}

/// Who is looking at an event (for `unsigned.transaction_id` and bundled relations).
pub struct Viewer<'a> {
    pub user_id: &'a str,
    pub device_id: Option<&'a str>,
}

/// Formats a stored event the way the Client-Server API shows it.
pub fn client_event(
    conn: &Connection,
    ev: &StoredEvent,
    viewer: &Viewer<'_>,
    with_room_id: bool,
) -> Value {
    let mut out = client_fields(ev, with_room_id);
    let unsigned = client_unsigned(
        conn,
        ev,
        viewer,
        with_room_id,
        out.get("origin_server_ts").and_then(Value::as_u64),
        out.get("sender").and_then(Value::as_str),
    );
    out.insert("unsigned".into(), Value::Object(unsigned));
    Value::Object(out)
}

/// The fields of an event's client form that are the same for every viewer
/// (all but `unsigned`).
fn client_fields(ev: &StoredEvent, with_room_id: bool) -> serde_json::Map<String, Value> {
    let mut pdu: serde_json::Map<String, Value> =
        serde_json::from_str(&ev.json).unwrap_or_default();
    let mut out = serde_json::Map::new();
    for key in [
        "content",
        "origin_server_ts",
        "sender",
        "type",
        "state_key",
        "redacts",
    ] {
        if let Some(v) = pdu.remove(key) {
            out.insert(key.to_owned(), v);
        }
    }
    if out.get("type").and_then(Value::as_str) == Some("m.room.redaction")
        && !out.contains_key("redacts")
    {
        if let Some(r) = out["content"].get("redacts").cloned() {
            out.insert("redacts".into(), r);
        }
    }
    out.insert("event_id".into(), json!(ev.event_id));
    if with_room_id {
        out.insert("room_id".into(), json!(ev.room_id));
    }
    out
}

/// An event's `unsigned` as this viewer sees it now: its age, the viewer's
/// transaction id, the redaction, the state it replaced, bundled relations.
fn client_unsigned(
    conn: &Connection,
    ev: &StoredEvent,
    viewer: &Viewer<'_>,
    with_room_id: bool,
    ts: Option<u64>,
    sender: Option<&str>,
) -> serde_json::Map<String, Value> {
    let mut unsigned = serde_json::Map::new();
    if let Some(ts) = ts {
        unsigned.insert("age".into(), json!(now_ms().saturating_sub(ts)));
    }
    if let (Some(txn), Some(dev), Some(vdev)) = (&ev.txn_id, &ev.txn_device, viewer.device_id) {
        if dev == vdev && sender == Some(viewer.user_id) {
            unsigned.insert("transaction_id".into(), json!(txn));
        }
    }
    if let Some(by) = &ev.redacted_by {
        if let Ok(Some(r)) = get_event(conn, by) {
            unsigned.insert(
                "redacted_because".into(),
                client_event(conn, &r, viewer, with_room_id),
            );
        }
    }
    if let Some(prev) = &ev.prev_state {
        unsigned.insert("replaces_state".into(), json!(prev));
        if let Ok(Some(p)) = get_event(conn, prev) {
            if let Ok(v) = serde_json::from_str::<Value>(&p.json) {
                unsigned.insert("prev_content".into(), v["content"].clone());
                unsigned.insert("prev_sender".into(), v["sender"].clone());
            }
        }
    }
    if ev.redacted_by.is_none() {
        if let Some(rel) = bundled_relations(conn, ev, viewer) {
            unsigned.insert("m.relations".into(), rel);
        }
    }
    unsigned
}

/// An event's viewer-independent client form, serialized once and shared by
/// every sync that sends the event (a busy room's message goes to each of its
/// members' syncs): the fields as JSON without the closing brace, and what
/// filters look at.
pub struct Formatted {
    head: String,
    redacted: bool,
    pub kind: String,
    pub sender: String,
    pub has_url: bool,
    ts: Option<u64>,
}

/// Recently formatted events by id (bounded: started over when full).
#[derive(Default)]
pub struct FormattedCache {
    map: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Formatted>>>,
}

const FORMATTED_MAX: usize = 2048;

impl FormattedCache {
    /// The event's shared form. A redaction rewrites a stored event, so an
    /// entry is used only while the event's redaction state is the same.
    pub fn get(&self, ev: &StoredEvent) -> std::sync::Arc<Formatted> {
        let redacted = ev.redacted_by.is_some();
        {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = map.get(&ev.event_id).filter(|f| f.redacted == redacted) {
                return f.clone();
            }
        }
        let fields = client_fields(ev, false);
        let text = |k: &str| {
            fields
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let mut head = Value::Object(fields.clone()).to_string();
        head.pop();
        let f = std::sync::Arc::new(Formatted {
            kind: text("type"),
            sender: text("sender"),
            has_url: fields.get("content").is_some_and(|c| c["url"].is_string()),
            ts: fields.get("origin_server_ts").and_then(Value::as_u64),
            head,
            redacted,
        });
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= FORMATTED_MAX {
            map.clear();
        }
        map.insert(ev.event_id.clone(), f.clone());
        f
    }
}

/// [`client_event`] (without the room id) as JSON text, from the shared form.
pub fn client_event_json(
    conn: &Connection,
    f: &Formatted,
    ev: &StoredEvent,
    viewer: &Viewer<'_>,
) -> Box<RawValue> {
    let unsigned = client_unsigned(conn, ev, viewer, false, f.ts, Some(&f.sender));
    let mut json = String::with_capacity(f.head.len() + 64);
    json.push_str(&f.head);
    json.push_str(",\"unsigned\":");
    json.push_str(&Value::Object(unsigned).to_string());
    json.push('}');
    RawValue::from_string(json).expect("an object with one more member is JSON")
}

fn bundled_relations(conn: &Connection, ev: &StoredEvent, viewer: &Viewer<'_>) -> Option<Value> {
    let has: bool = conn
        .prepare_cached("SELECT 1 FROM events WHERE relates_to=?1 LIMIT 1")
        .and_then(|mut st| st.query_row([&ev.event_id], |_| Ok(true)))
        .optional()
        .ok()
        .flatten()
        .unwrap_or(false);
    if !has {
        return None;
    }
    let mut rel = serde_json::Map::new();
    let sender: Option<String> = serde_json::from_str::<Value>(&ev.json)
        .ok()
        .and_then(|v| v["sender"].as_str().map(str::to_owned));
    // Latest edit by the original sender.
    if let Ok(Some(edit)) = conn
        .query_row(
            &format!(
                "SELECT {EVENT_COLS} FROM events WHERE relates_to=?1 AND rel_type='m.replace' AND sender=?2
                 AND redacted_by IS NULL ORDER BY stream DESC LIMIT 1"
            ),
            params![ev.event_id, sender],
            row_to_event,
        )
        .optional()
    {
        let formatted = client_event_plain(conn, &edit, viewer);
        rel.insert("m.replace".into(), formatted);
    }
    // Thread summary.
    let count: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE room_id=?1 AND thread_root=?2 AND redacted_by IS NULL",
            params![ev.room_id, ev.event_id],
            |r| r.get(0),
        )
        .unwrap_or(0);
    if count > 0 {
        let latest = conn
            .query_row(
                &format!(
                    "SELECT {EVENT_COLS} FROM events WHERE room_id=?1 AND thread_root=?2 AND redacted_by IS NULL
                     ORDER BY stream DESC LIMIT 1"
                ),
                params![ev.room_id, ev.event_id],
                row_to_event,
            )
            .ok();
        let participated: bool = sender.as_deref() == Some(viewer.user_id)
            || conn
                .query_row(
                    "SELECT 1 FROM events WHERE room_id=?1 AND thread_root=?2 AND sender=?3 LIMIT 1",
                    params![ev.room_id, ev.event_id, viewer.user_id],
                    |_| Ok(true),
                )
                .optional()
                .ok()
                .flatten()
                .unwrap_or(false);
        rel.insert(
            "m.thread".into(),
            json!({
                "latest_event": latest.map(|l| client_event_plain(conn, &l, viewer)),
                "count": count,
                "current_user_participated": participated,
            }),
        );
    }
    if rel.is_empty() {
        None
    } else {
        Some(Value::Object(rel))
    }
}

/// A client event without bundled relations (used inside bundles to stop recursion).
fn client_event_plain(conn: &Connection, ev: &StoredEvent, viewer: &Viewer<'_>) -> Value {
    let mut e = ev.clone();
    e.redacted_by = None;
    let mut v = client_event_no_bundle(conn, &e, viewer);
    v["room_id"] = json!(ev.room_id);
    v
}

fn client_event_no_bundle(_conn: &Connection, ev: &StoredEvent, viewer: &Viewer<'_>) -> Value {
    let mut out = client_fields(ev, false);
    let mut unsigned = serde_json::Map::new();
    if let (Some(txn), Some(dev), Some(vdev)) = (&ev.txn_id, &ev.txn_device, viewer.device_id) {
        if dev == vdev {
            unsigned.insert("transaction_id".into(), json!(txn));
        }
    }
    out.insert("unsigned".into(), Value::Object(unsigned));
    Value::Object(out)
}

/// The stripped state shown with invites and knocks.
pub fn stripped_state(conn: &Connection, room_id: &str) -> rusqlite::Result<Vec<Value>> {
    let mut out = Vec::new();
    for kind in [
        "m.room.create",
        "m.room.join_rules",
        "m.room.name",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.encryption",
        "m.room.topic",
    ] {
        if let Some(id) = state_event_id(conn, room_id, kind, "")? {
            if let Some(ev) = get_event(conn, &id)? {
                let v: Value = serde_json::from_str(&ev.json).unwrap_or_default();
                out.push(json!({"type": v["type"], "state_key": v["state_key"], "sender": v["sender"], "content": v["content"]}));
            }
        }
    }
    Ok(out)
}

/// Current state of a room as client events.
pub fn current_state(
    conn: &Connection,
    room_id: &str,
    viewer: &Viewer<'_>,
) -> rusqlite::Result<Vec<Value>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {} FROM room_state s JOIN events e ON e.event_id=s.event_id WHERE s.room_id=?1 ORDER BY e.stream",
        EVENT_COLS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ")
    ))?;
    let rows = st
        .query_map([room_id], row_to_event)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .iter()
        .map(|e| client_event(conn, e, viewer, true))
        .collect())
}

/// Power levels of a room as a map, with the spec's defaults filled in.
pub fn power_levels(conn: &Connection, room_id: &str) -> rusqlite::Result<PowerLevels> {
    let content = state_content(conn, room_id, "m.room.power_levels", "")?;
    let creators = room_creators(conn, room_id)?;
    Ok(PowerLevels { content, creators })
}

/// Creators of the room (v12 gives them unlimited power).
fn room_creators(conn: &Connection, room_id: &str) -> rusqlite::Result<Vec<String>> {
    let Some(version) = room_version(conn, room_id)? else {
        return Ok(vec![]);
    };
    let Some(rules) = version.rules() else {
        return Ok(vec![]);
    };
    if !rules.authorization.explicitly_privilege_room_creators {
        return Ok(vec![]);
    }
    let Some(id) = state_event_id(conn, room_id, "m.room.create", "")? else {
        return Ok(vec![]);
    };
    let Some(ev) = get_event(conn, &id)? else {
        return Ok(vec![]);
    };
    let v: Value = serde_json::from_str(&ev.json).unwrap_or_default();
    let mut out = vec![v["sender"].as_str().unwrap_or_default().to_owned()];
    if let Some(extra) = v["content"]["additional_creators"].as_array() {
        out.extend(extra.iter().filter_map(|c| c.as_str().map(str::to_owned)));
    }
    Ok(out)
}

pub struct PowerLevels {
    pub content: Option<Value>,
    pub creators: Vec<String>,
}

impl PowerLevels {
    pub fn user(&self, user_id: &str) -> i64 {
        if self.creators.iter().any(|c| c == user_id) {
            return i64::MAX;
        }
        match &self.content {
            None => 0,
            Some(c) => c["users"][user_id]
                .as_i64()
                .or_else(|| c["users_default"].as_i64())
                .unwrap_or(0),
        }
    }
    pub fn action(&self, name: &str, default: i64) -> i64 {
        self.content
            .as_ref()
            .and_then(|c| c[name].as_i64())
            .unwrap_or(default)
    }
}
