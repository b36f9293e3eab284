//! Rooms: creation, membership, sending, state, history, relations, aliases, directory.

use std::sync::Arc;

use axum::extract::State;
use ruma::{OwnedRoomId, RoomAliasId, RoomId, RoomVersionId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::{MxError, MxResult},
    extract::{Auth, Json, PathArgs, QueryArgs},
    filter::EventFilter,
    pdu::{self, client_event, row_to_event, NewEvent, StoredEvent, Viewer, EVENT_COLS},
    Hs,
};

type J = axum::Json<Value>;

pub fn parse_room(s: &str) -> MxResult<OwnedRoomId> {
    RoomId::parse(s).map_err(|_| MxError::invalid_param(format!("Invalid room id: {s}")))
}

fn parse_user(s: &str) -> MxResult<ruma::OwnedUserId> {
    UserId::parse(s).map_err(|_| MxError::invalid_param(format!("Invalid user id: {s}")))
}

fn viewer(auth: &Auth) -> Viewer<'_> {
    Viewer {
        user_id: auth.user_id.as_str(),
        device_id: Some(auth.device_id.as_str()),
    }
}

/// What part of a room's history a user may see, by the spec's history-visibility
/// rules: membership and `history_visibility` *at each event* decide.
pub struct Visibility {
    memberships: Vec<(i64, String)>,
    visibility: Vec<(i64, String)>,
    /// Highest stream position that can be visible at all.
    pub until: i64,
}

fn at(list: &[(i64, String)], stream: i64) -> Option<&str> {
    let i = list.partition_point(|(s, _)| *s <= stream);
    (i > 0).then(|| list[i - 1].1.as_str())
}

impl Visibility {
    /// Loads the user's membership history and the room's visibility history.
    /// `M_FORBIDDEN` if the user can see nothing of the room.
    pub fn load(conn: &Connection, room_id: &str, user_id: &str) -> MxResult<Self> {
        if pdu::room_version(conn, room_id)?.is_none() {
            return Err(MxError::forbidden("You are not in this room"));
        }
        let history = |kind: &str, key: &str, field: &str| -> MxResult<Vec<(i64, String)>> {
            let mut st = conn.prepare_cached(
                "SELECT stream, json FROM events WHERE room_id=?1 AND type=?2 AND state_key=?3 ORDER BY stream",
            )?;
            let rows = st.query_map(params![room_id, kind, key], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (stream, json) = row?;
                let v: Value = serde_json::from_str(&json)?;
                out.push((
                    stream,
                    v["content"][field].as_str().unwrap_or_default().to_owned(),
                ));
            }
            Ok(out)
        };
        let memberships = history("m.room.member", user_id, "membership")?;
        let visibility = history("m.room.history_visibility", "", "history_visibility")?;
        let current_m = memberships.last().map(|m| m.1.as_str());
        let world = visibility.last().map(|v| v.1.as_str()) == Some("world_readable");
        let until = if current_m == Some("join") || world {
            i64::MAX
        } else if memberships.is_empty() {
            return Err(MxError::forbidden("You are not in this room"));
        } else {
            memberships.last().map_or(0, |m| m.0)
        };
        Ok(Self {
            memberships,
            visibility,
            until,
        })
    }

    /// Whether the event at `stream` is visible.
    pub fn allows(&self, stream: i64) -> bool {
        if stream > self.until {
            return false;
        }
        let hv = at(&self.visibility, stream).unwrap_or("shared");
        if hv == "world_readable" {
            return true;
        }
        let m = at(&self.memberships, stream);
        if m == Some("join") {
            return true;
        }
        if hv == "shared"
            && self
                .memberships
                .iter()
                .any(|(s, m)| *s > stream && m == "join")
        {
            return true;
        }
        hv == "invited" && m == Some("invite")
    }

    /// Whether the user is a current member (or the room is world-readable).
    pub fn is_current(&self) -> bool {
        self.until == i64::MAX
    }
}

fn require_joined(conn: &Connection, room_id: &str, user_id: &str) -> MxResult<()> {
    match pdu::membership(conn, room_id, user_id)? {
        Some(m) if m == "join" => Ok(()),
        _ => Err(MxError::forbidden("You are not joined to this room")),
    }
}

impl Hs {
    /// Appends an event and wakes the room. Returns its id.
    pub(crate) fn send(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        ev: NewEvent<'_>,
    ) -> MxResult<String> {
        let a = self
            .db
            .write(|w| self.append_event(w, room_id, sender, ev))?;
        self.notify_room(room_id.as_str());
        Ok(a.event_id.to_string())
    }

    /// Changes `target`'s membership in `room_id`, sent by `sender`.
    pub(crate) fn set_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        reason: Option<&str>,
        extra: Option<Value>,
    ) -> MxResult<String> {
        let mut content = if sender == target && (membership == "join" || membership == "knock") {
            self.db
                .read(|c| self.member_content(c, target, membership))?
        } else if membership == "invite" {
            self.db
                .read(|c| self.member_content(c, target, membership))?
        } else {
            json!({ "membership": membership })
        };
        if let Some(r) = reason {
            content["reason"] = json!(r);
        }
        if let Some(Value::Object(extra)) = extra {
            for (k, v) in extra {
                content[k] = v;
            }
        }
        let event_id = self.send(
            room_id,
            sender,
            NewEvent {
                kind: "m.room.member",
                state_key: Some(target.as_str()),
                content,
                txn: None,
            },
        )?;
        // The target may not be joined (invites, kicks): wake them too.
        self.notify_users([target.as_str()]);
        Ok(event_id)
    }

    fn resolve_alias(&self, alias: &str) -> MxResult<OwnedRoomId> {
        let alias =
            RoomAliasId::parse(alias).map_err(|_| MxError::invalid_param("Invalid room alias"))?;
        let room: Option<String> = self.db.read(|c| {
            c.query_row(
                "SELECT room_id FROM room_aliases WHERE alias=?1",
                [alias.as_str()],
                |r| r.get(0),
            )
            .optional()
        })?;
        room.map(|r| parse_room(&r))
            .transpose()?
            .ok_or_else(|| MxError::not_found("Room alias not found"))
    }

    /// For a restricted room: when `user` is in one of the allowed rooms, the content
    /// that names a local user with invite power as the join's authoriser.
    pub(crate) fn restricted_join_extra(
        &self,
        room_id: &RoomId,
        user: &UserId,
    ) -> MxResult<Option<Value>> {
        let jr = self
            .db
            .read(|c| pdu::state_content(c, room_id.as_str(), "m.room.join_rules", ""))?;
        let rule = jr
            .as_ref()
            .and_then(|c| c["join_rule"].as_str())
            .unwrap_or("invite");
        if rule != "restricted" && rule != "knock_restricted" {
            return Ok(None);
        }
        let allowed = jr
            .as_ref()
            .and_then(|c| c["allow"].as_array().cloned())
            .unwrap_or_default();
        let ok = self.db.read(|c| -> MxResult<bool> {
            for a in &allowed {
                if let Some(r) = a["room_id"].as_str() {
                    if pdu::membership(c, r, user.as_str())?.as_deref() == Some("join") {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })?;
        if !ok {
            return Ok(None);
        }
        let authoriser = self.db.read(|c| -> MxResult<Option<String>> {
            let pl = pdu::power_levels(c, room_id.as_str())?;
            let need = pl.action("invite", 0);
            Ok(pdu::local_members(c, room_id.as_str(), false)?
                .into_iter()
                .filter(|m| UserId::parse(m).is_ok_and(|u| u.server_name() == self.server_name))
                .find(|m| pl.user(m) >= need))
        })?;
        Ok(authoriser.map(|a| json!({ "join_authorised_via_users_server": a })))
    }

    fn do_join(&self, room_id: &RoomId, user: &UserId, reason: Option<&str>) -> MxResult<()> {
        let exists = self
            .db
            .read(|c| pdu::room_version(c, room_id.as_str()))?
            .is_some();
        if !exists {
            return Err(MxError::not_found("This box does not know that room"));
        }
        let current = self
            .db
            .read(|c| pdu::membership(c, room_id.as_str(), user.as_str()))?;
        if current.as_deref() == Some("join") {
            return Ok(());
        }
        let extra = if current.as_deref() != Some("invite") {
            self.restricted_join_extra(room_id, user)?
        } else {
            None
        };
        self.set_membership(room_id, user, user, "join", reason, extra)?;
        Ok(())
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CreateRoomBody {
    visibility: Option<String>,
    room_alias_name: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    invite: Vec<String>,
    room_version: Option<String>,
    creation_content: Option<Value>,
    initial_state: Vec<Value>,
    preset: Option<String>,
    is_direct: bool,
    power_level_content_override: Option<Value>,
}

pub async fn create_room(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<CreateRoomBody>,
) -> MxResult<J> {
    let version_str = body
        .room_version
        .clone()
        .unwrap_or_else(|| hs.config.default_room_version.clone());
    let version = RoomVersionId::try_from(version_str.as_str())
        .map_err(|_| MxError::unsupported_room_version("Unsupported room version"))?;
    if !matches!(
        version,
        RoomVersionId::V10 | RoomVersionId::V11 | RoomVersionId::V12
    ) {
        return Err(MxError::unsupported_room_version(
            "This box creates rooms of version 10, 11 or 12",
        ));
    }
    let rules = pdu::rules_for(&version)?;
    let mut invitees = Vec::new();
    for i in &body.invite {
        invitees.push(parse_user(i)?);
    }
    let alias = match &body.room_alias_name {
        Some(l) => {
            let a = RoomAliasId::parse(format!("#{l}:{}", hs.server_name))
                .map_err(|_| MxError::invalid_param("Invalid room_alias_name"))?;
            let taken = hs.db.read(|c| {
                c.query_row(
                    "SELECT 1 FROM room_aliases WHERE alias=?1",
                    [a.as_str()],
                    |_| Ok(()),
                )
                .optional()
            })?;
            if taken.is_some() {
                return Err(MxError::room_in_use("Room alias already taken"));
            }
            Some(a)
        }
        None => None,
    };
    let preset = body.preset.clone().unwrap_or_else(|| {
        if body.visibility.as_deref() == Some("public") {
            "public_chat".into()
        } else {
            "private_chat".into()
        }
    });
    let (join_rule, history, guest) = match preset.as_str() {
        "public_chat" => ("public", "shared", "forbidden"),
        "private_chat" | "trusted_private_chat" => ("invite", "shared", "can_join"),
        _ => return Err(MxError::bad_json("Unknown preset")),
    };
    let me = auth.user_id.clone();
    let mut create_content = body.creation_content.clone().unwrap_or_else(|| json!({}));
    if !create_content.is_object() {
        return Err(MxError::bad_json("creation_content must be an object"));
    }
    create_content["room_version"] = json!(version.as_str());
    if rules.authorization.use_room_create_sender {
        if let Some(o) = create_content.as_object_mut() {
            o.remove("creator");
        }
    } else {
        create_content["creator"] = json!(me);
    }
    let mut users = serde_json::Map::new();
    if !rules.authorization.explicitly_privilege_room_creators {
        users.insert(me.to_string(), json!(100));
    }
    if preset == "trusted_private_chat" {
        for i in &invitees {
            users.insert(i.to_string(), json!(100));
        }
        if rules.authorization.explicitly_privilege_room_creators && !invitees.is_empty() {
            create_content["additional_creators"] = json!(invitees);
            for i in &invitees {
                users.remove(i.as_str());
            }
        }
    }
    let mut power = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100,
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "notifications": { "room": 50 },
    });
    if let Some(Value::Object(o)) = &body.power_level_content_override {
        for (k, v) in o {
            power[k] = v.clone();
        }
    }
    let visibility_public = body.visibility.as_deref() == Some("public");
    let member = hs.db.read(|c| hs.member_content(c, &me, "join"))?;
    let room_id = hs.db.write(|w| -> MxResult<OwnedRoomId> {
        let created = hs.append_create(w, &version, &me, create_content)?;
        let room_id = created.room_id;
        let invite_contents = invitees
            .iter()
            .map(|i| hs.member_content(w, i, "invite"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut send = |kind: &str, key: Option<&str>, content: Value| -> MxResult<()> {
            hs.append_event(
                w,
                &room_id,
                &me,
                NewEvent {
                    kind,
                    state_key: key,
                    content,
                    txn: None,
                },
            )?;
            Ok(())
        };
        send("m.room.member", Some(me.as_str()), member)?;
        send("m.room.power_levels", Some(""), power)?;
        if let Some(a) = &alias {
            send("m.room.canonical_alias", Some(""), json!({ "alias": a }))?;
        }
        send(
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": join_rule }),
        )?;
        send(
            "m.room.history_visibility",
            Some(""),
            json!({ "history_visibility": history }),
        )?;
        send(
            "m.room.guest_access",
            Some(""),
            json!({ "guest_access": guest }),
        )?;
        let private = preset != "public_chat";
        if private
            && hs.config.encrypt_private_rooms
            && !body
                .initial_state
                .iter()
                .any(|s| s["type"] == "m.room.encryption")
        {
            send(
                "m.room.encryption",
                Some(""),
                json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
            )?;
        }
        for st in &body.initial_state {
            let kind = st["type"]
                .as_str()
                .ok_or_else(|| MxError::bad_json("initial_state entry needs a type"))?;
            let key = st["state_key"].as_str().unwrap_or("");
            if kind == "m.room.member" || kind == "m.room.create" || kind == "m.room.power_levels" {
                return Err(MxError::bad_json(format!(
                    "{kind} cannot be set in initial_state"
                )));
            }
            send(kind, Some(key), st["content"].clone())?;
        }
        if let Some(n) = &body.name {
            send("m.room.name", Some(""), json!({ "name": n }))?;
        }
        if let Some(t) = &body.topic {
            send("m.room.topic", Some(""), json!({ "topic": t }))?;
        }
        for (i, mut c) in invitees.iter().zip(invite_contents) {
            if body.is_direct {
                c["is_direct"] = json!(true);
            }
            send("m.room.member", Some(i.as_str()), c)?;
        }
        if let Some(a) = &alias {
            w.execute(
                "INSERT INTO room_aliases(alias, room_id, creator) VALUES(?1,?2,?3)",
                params![a.as_str(), room_id.as_str(), me.as_str()],
            )?;
        }
        if visibility_public {
            w.execute(
                "UPDATE rooms SET is_public=1 WHERE room_id=?1",
                [room_id.as_str()],
            )?;
        }
        Ok(room_id)
    })?;
    hs.notify_room(room_id.as_str());
    tracing::info!(room = %room_id, creator = %me, "room created");
    Ok(axum::Json(json!({ "room_id": room_id })))
}

pub async fn joined_rooms(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let rooms = hs.db.read(|c| joined_room_ids(c, auth.user_id.as_str()))?;
    Ok(axum::Json(json!({ "joined_rooms": rooms })))
}

pub fn joined_room_ids(c: &Connection, user: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT room_id FROM room_state WHERE type='m.room.member' AND state_key=?1 AND membership='join'",
    )?;
    let r = st.query_map([user], |r| r.get(0))?.collect();
    r
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReasonBody {
    reason: Option<String>,
}

pub async fn join_by_id_or_alias(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    Json(body): Json<ReasonBody>,
) -> MxResult<J> {
    let mut via = via_servers(q.as_deref());
    let room_id = room_and_servers(&hs, &room, &mut via).await?;
    join_any(&hs, &room_id, &auth.user_id, body.reason.as_deref(), via).await?;
    Ok(axum::Json(json!({ "room_id": room_id })))
}

/// A room id, or an alias resolved here or by its server (whose answer adds
/// servers to go through to `via`).
async fn room_and_servers(
    hs: &Hs,
    room: &str,
    via: &mut Vec<ruma::OwnedServerName>,
) -> MxResult<ruma::OwnedRoomId> {
    if !room.starts_with('#') {
        return parse_room(room);
    }
    let alias =
        RoomAliasId::parse(room).map_err(|_| MxError::invalid_param("Invalid room alias"))?;
    if alias.server_name() == hs.server_name {
        return hs.resolve_alias(room);
    }
    let path = format!(
        "/_matrix/federation/v1/query/directory?room_alias={}",
        crate::federation::urlenc(alias.as_str())
    );
    let v = hs
        .fed_request("GET", alias.server_name(), &path, None)
        .await?;
    for s in v["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Ok(s) = ruma::ServerName::parse(s) {
            via.push(s);
        }
    }
    via.push(alias.server_name().to_owned());
    parse_room(v["room_id"].as_str().unwrap_or_default())
}

pub async fn join_room(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<ReasonBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    join_any(
        &hs,
        &room_id,
        &auth.user_id,
        body.reason.as_deref(),
        Vec::new(),
    )
    .await?;
    Ok(axum::Json(json!({ "room_id": room_id })))
}

/// `server_name` and `via` query parameters of a join.
fn via_servers(q: Option<&str>) -> Vec<ruma::OwnedServerName> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q.unwrap_or(""))
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == "server_name" || k == "via")
        .filter_map(|(_, v)| ruma::ServerName::parse(&v).ok())
        .collect()
}

/// Joins a local room directly, or a room of other servers through federation.
async fn join_any(
    hs: &Hs,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<&str>,
    mut via: Vec<ruma::OwnedServerName>,
) -> MxResult<()> {
    if room_is_here(hs, room_id)? {
        return hs.do_join(room_id, user, reason);
    }
    // Through the server that invited us, the room id's server and the given ones.
    let inviter: Option<String> = hs.db.read(|c| {
        c.query_row(
            "SELECT inviter_server FROM remote_invites WHERE room_id=?1 AND user_id=?2 AND declined=0",
            params![room_id.as_str(), user.as_str()],
            |r| r.get(0),
        )
        .optional()
    })?;
    if let Some(s) = inviter.and_then(|s| ruma::ServerName::parse(&s).ok()) {
        via.insert(0, s);
    }
    let via = servers_to_go_through(room_id, via, "join")?;
    hs.remote_join(room_id, user, &via).await
}

/// The servers to reach a room of other servers through: the given ones and
/// the room id's server (rooms before v12 name one); an error if none.
fn servers_to_go_through(
    room_id: &RoomId,
    mut via: Vec<ruma::OwnedServerName>,
    what: &str,
) -> MxResult<Vec<ruma::OwnedServerName>> {
    if let Some(s) = room_id.server_name() {
        via.push(s.to_owned());
    }
    via.dedup();
    if via.is_empty() {
        return Err(MxError::not_found(format!(
            "This box does not know that room; give a server to {what} through"
        )));
    }
    Ok(via)
}

pub async fn knock(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    Json(body): Json<ReasonBody>,
) -> MxResult<J> {
    let mut via = via_servers(q.as_deref());
    let room_id = room_and_servers(&hs, &room, &mut via).await?;
    if !room_is_here(&hs, &room_id)? {
        // A room of other servers: knock through one of them (make_knock/send_knock).
        let via = servers_to_go_through(&room_id, via, "knock")?;
        hs.remote_knock(&room_id, &auth.user_id, body.reason.as_deref(), &via)
            .await?;
        return Ok(axum::Json(json!({ "room_id": room_id })));
    }
    hs.set_membership(
        &room_id,
        &auth.user_id,
        &auth.user_id,
        "knock",
        body.reason.as_deref(),
        None,
    )?;
    Ok(axum::Json(json!({ "room_id": room_id })))
}

/// Whether this box takes part in the room itself (a local member, or made here),
/// so membership changes are made here rather than through another server.
fn room_is_here(hs: &Hs, room_id: &RoomId) -> MxResult<bool> {
    let local = hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .is_some();
    Ok(local
        && hs.db.read(|c| -> MxResult<bool> {
            Ok(!pdu::local_members(c, room_id.as_str(), false)?.is_empty()
                || room_id.server_name() == Some(&hs.server_name))
        })?)
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: String,
    reason: Option<String>,
}

async fn membership_action(
    hs: Arc<Hs>,
    auth: Auth,
    room: String,
    body: TargetBody,
    membership: &str,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let target = parse_user(&body.user_id)?;
    if hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .is_none()
    {
        return Err(MxError::not_found("Unknown room"));
    }
    if membership == "leave" {
        // Kick and unban need the target to be in the matching state.
        let current = hs
            .db
            .read(|c| pdu::membership(c, room_id.as_str(), target.as_str()))?;
        match current.as_deref() {
            Some("join") | Some("invite") | Some("knock") | Some("ban") => {}
            _ => return Err(MxError::forbidden("The user is not in the room")),
        }
    }
    hs.set_membership(
        &room_id,
        &auth.user_id,
        &target,
        membership,
        body.reason.as_deref(),
        None,
    )?;
    Ok(axum::Json(json!({})))
}

pub async fn invite(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<TargetBody>,
) -> MxResult<J> {
    let target = parse_user(&body.user_id)?;
    if target.server_name() == hs.server_name {
        let exists = hs.db.read(|c| {
            c.query_row(
                "SELECT 1 FROM users WHERE user_id=?1 AND deactivated=0",
                [target.as_str()],
                |_| Ok(()),
            )
            .optional()
        })?;
        if exists.is_none() {
            return Err(MxError::not_found("No such user on this box"));
        }
    }
    let room_id = parse_room(&room)?;
    let current = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), target.as_str()))?;
    if matches!(current.as_deref(), Some("join") | Some("ban")) {
        return Err(MxError::forbidden(
            "The user is already in the room or banned",
        ));
    }
    if target.server_name() != hs.server_name {
        hs.remote_invite(&room_id, &auth.user_id, &target, body.reason.as_deref())
            .await?;
        return Ok(axum::Json(json!({})));
    }
    membership_action(hs, auth, room, body, "invite").await
}

pub async fn kick(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<TargetBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let target = parse_user(&body.user_id)?;
    let current = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), target.as_str()))?;
    if current.as_deref() == Some("ban") {
        return Err(MxError::forbidden("The user is banned; unban instead"));
    }
    membership_action(hs, auth, room, body, "leave").await
}

pub async fn ban(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<TargetBody>,
) -> MxResult<J> {
    membership_action(hs, auth, room, body, "ban").await
}

pub async fn unban(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<TargetBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let target = parse_user(&body.user_id)?;
    let current = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), target.as_str()))?;
    if current.as_deref() != Some("ban") {
        return Err(MxError::forbidden("The user is not banned"));
    }
    membership_action(hs, auth, room, body, "leave").await
}

pub async fn leave(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<ReasonBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let current = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), auth.user_id.as_str()))?;
    if current.is_none() {
        // Declining an invite from another server: tell the room (through the
        // inviting server), then forget the invite here.
        let inviter: Option<String> = hs.db.read(|c| {
            c.query_row(
                "SELECT inviter_server FROM remote_invites WHERE room_id=?1 AND user_id=?2 AND declined=0",
                params![room_id.as_str(), auth.user_id.as_str()],
                |r| r.get(0),
            )
            .optional()
        })?;
        if let Some(server) = inviter {
            let mut leave = json!({ "type": "m.room.member", "state_key": auth.user_id, "sender": auth.user_id,
                                    "content": { "membership": "leave" }, "origin_server_ts": crate::now_ms() });
            if let Ok(s) = ruma::ServerName::parse(&server) {
                match hs.remote_leave(&room_id, &auth.user_id, &s).await {
                    Ok(ev) => leave = ev,
                    Err(e) => tracing::info!(
                        errcode = e.errcode,
                        "could not tell the inviting server; declining here anyway"
                    ),
                }
            }
            // Kept as declined, with a new stream position, so the user's other devices hear of it.
            hs.db.write(|w| -> rusqlite::Result<()> {
                let stream = w.next_stream();
                w.execute(
                    "UPDATE remote_invites SET declined=1, event_json=?1, stream=?2 WHERE room_id=?3 AND user_id=?4",
                    params![leave.to_string(), stream, room_id.as_str(), auth.user_id.as_str()],
                )?;
                w.note(crate::db::UserRows::RemoteInvites, auth.user_id.as_str(), stream);
                w.persist_stream()
            })?;
            hs.notify_users([auth.user_id.as_str()]);
            return Ok(axum::Json(json!({})));
        }
    }
    match current.as_deref() {
        Some("join") | Some("invite") | Some("knock") => {
            hs.set_membership(
                &room_id,
                &auth.user_id,
                &auth.user_id,
                "leave",
                body.reason.as_deref(),
                None,
            )?;
        }
        Some("leave") | Some("ban") => {}
        _ => return Err(MxError::not_found("You are not in this room")),
    }
    Ok(axum::Json(json!({})))
}

pub async fn forget(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let current = hs
        .db
        .read(|c| pdu::membership(c, room_id.as_str(), auth.user_id.as_str()))?;
    match current.as_deref() {
        Some("leave") | Some("ban") => {}
        Some(_) => {
            return Err(MxError::new(
                http::StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "Leave the room before forgetting it",
            ))
        }
        None => return Err(MxError::not_found("You were never in this room")),
    }
    hs.db.write(|w| {
        w.execute(
            "INSERT OR IGNORE INTO forgotten_rooms(user_id, room_id) VALUES(?1,?2)",
            params![auth.user_id.as_str(), room_id.as_str()],
        )
    })?;
    Ok(axum::Json(json!({})))
}

pub async fn send_message(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind, txn_id)): PathArgs<(String, String, String)>,
    Json(content): Json<Value>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    if kind.is_empty() || kind.len() > 255 {
        return Err(MxError::invalid_param("Invalid event type"));
    }
    let _turn = hs.db.write_turn().await;
    send_with_txn(
        &hs,
        &auth,
        &room_id,
        &crate::txns::send_scope(room_id.as_str(), &kind),
        &txn_id,
        &kind,
        None,
        content,
    )
}

/// Sends once per (device, endpoint, transaction id): a retry gets the same event id.
#[allow(clippy::too_many_arguments)]
fn send_with_txn(
    hs: &Hs,
    auth: &Auth,
    room_id: &RoomId,
    request: &str,
    txn_id: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
) -> MxResult<J> {
    let mut draft =
        json!({ "type": kind, "sender": auth.user_id, "room_id": room_id, "content": content });
    if let Some(k) = state_key {
        draft["state_key"] = json!(k);
    }
    let mut plan = Some(hs.db.read(|c| crate::push::plan(hs, c, room_id, &draft))?);
    let (event_id, fresh) = hs.db.write(|w| -> MxResult<(String, bool)> {
        let (user, device) = (auth.user_id.as_str(), auth.device_id.as_str());
        if let Some(ev) = hs.txns.lookup(w, user, device, request, txn_id)? {
            return Ok((ev, false));
        }
        let a = hs.append_event_with_plan(
            w,
            room_id,
            &auth.user_id,
            NewEvent {
                kind,
                state_key,
                content,
                txn: Some((device, txn_id)),
            },
            plan.take(),
        )?;
        hs.txns.remember(user, device, request, txn_id, a.stream);
        Ok((a.event_id.to_string(), true))
    })?;
    if fresh {
        hs.notify_room(room_id.as_str());
    }
    Ok(axum::Json(json!({ "event_id": event_id })))
}

pub async fn redact(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id, txn_id)): PathArgs<(String, String, String)>,
    Json(body): Json<ReasonBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let target = hs
        .db
        .read(|c| pdu::get_event(c, &event_id))?
        .filter(|e| e.room_id == room_id.as_str())
        .ok_or_else(|| MxError::not_found("Event not found"))?;
    let original_sender = serde_json::from_str::<Value>(&target.json)?["sender"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if original_sender != auth.user_id.as_str() {
        let allowed = hs.db.read(|c| -> MxResult<bool> {
            let pl = pdu::power_levels(c, room_id.as_str())?;
            Ok(pl.user(auth.user_id.as_str()) >= pl.action("redact", 50))
        })?;
        if !allowed {
            return Err(MxError::forbidden("You may not redact other users' events"));
        }
    }
    let mut content = json!({ "redacts": event_id });
    if let Some(r) = body.reason {
        content["reason"] = json!(r);
    }
    send_with_txn(
        &hs,
        &auth,
        &room_id,
        &crate::txns::redact_scope(room_id.as_str(), &event_id),
        &txn_id,
        "m.room.redaction",
        None,
        content,
    )
}

impl From<serde_json::Error> for MxError {
    fn from(e: serde_json::Error) -> Self {
        MxError::unknown(format!("corrupt stored JSON: {e}"))
    }
}

pub async fn get_state(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let v = hs.db.read(|c| -> MxResult<Vec<Value>> {
        if !Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?.is_current() {
            return Err(MxError::forbidden("You are no longer in this room"));
        }
        Ok(pdu::current_state(c, room_id.as_str(), &viewer(&auth))?)
    })?;
    Ok(axum::Json(Value::Array(v)))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StateQuery {
    format: Option<String>,
}

fn state_event_response(
    hs: &Hs,
    auth: &Auth,
    room: &str,
    kind: &str,
    key: &str,
    format: Option<&str>,
) -> MxResult<J> {
    let room_id = parse_room(room)?;
    hs.db.read(|c| {
        if !Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?.is_current() {
            return Err(MxError::forbidden("You are no longer in this room"));
        }
        let id = pdu::state_event_id(c, room_id.as_str(), kind, key)?
            .ok_or_else(|| MxError::not_found("State event not found"))?;
        let ev =
            pdu::get_event(c, &id)?.ok_or_else(|| MxError::not_found("State event not found"))?;
        let ce = client_event(c, &ev, &viewer(auth), true);
        Ok(axum::Json(if format == Some("event") {
            ce
        } else {
            ce["content"].clone()
        }))
    })
}

pub async fn get_state_event(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind, key)): PathArgs<(String, String, String)>,
    QueryArgs(q): QueryArgs<StateQuery>,
) -> MxResult<J> {
    state_event_response(&hs, &auth, &room, &kind, &key, q.format.as_deref())
}

pub async fn get_state_event_empty_key(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<StateQuery>,
) -> MxResult<J> {
    state_event_response(&hs, &auth, &room, &kind, "", q.format.as_deref())
}

fn put_state_inner(
    hs: &Hs,
    auth: &Auth,
    room: &str,
    kind: &str,
    key: &str,
    content: Value,
) -> MxResult<J> {
    let room_id = parse_room(room)?;
    if kind == "m.room.create" {
        return Err(MxError::forbidden("The create event cannot be replaced"));
    }
    if kind == "m.room.canonical_alias" {
        for a in content["alias"].as_str().into_iter().chain(
            content["alt_aliases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        ) {
            let points: Option<String> = hs.db.read(|c| {
                c.query_row(
                    "SELECT room_id FROM room_aliases WHERE alias=?1",
                    [a],
                    |r| r.get(0),
                )
                .optional()
            })?;
            if points.as_deref() != Some(room_id.as_str()) {
                return Err(MxError::new(
                    http::StatusCode::BAD_REQUEST,
                    "M_BAD_ALIAS",
                    format!("{a} does not point to this room"),
                ));
            }
        }
    }
    let event_id = hs.send(
        &room_id,
        &auth.user_id,
        NewEvent {
            kind,
            state_key: Some(key),
            content,
            txn: None,
        },
    )?;
    if kind == "m.room.member" {
        hs.notify_users([key]);
    }
    Ok(axum::Json(json!({ "event_id": event_id })))
}

pub async fn put_state(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind, key)): PathArgs<(String, String, String)>,
    Json(content): Json<Value>,
) -> MxResult<J> {
    put_state_inner(&hs, &auth, &room, &kind, &key, content)
}

pub async fn put_state_empty_key(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, kind)): PathArgs<(String, String)>,
    Json(content): Json<Value>,
) -> MxResult<J> {
    put_state_inner(&hs, &auth, &room, &kind, "", content)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
}

pub async fn members(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<MembersQuery>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let chunk = hs.db.read(|c| -> MxResult<Vec<Value>> {
        Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let mut st = c.prepare_cached(&format!(
            "SELECT {} FROM room_state s JOIN events e ON e.event_id=s.event_id
             WHERE s.room_id=?1 AND s.type='m.room.member' ORDER BY e.stream",
            EVENT_COLS
                .split(", ")
                .map(|c| format!("e.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
        let evs = st
            .query_map([room_id.as_str()], row_to_event)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(evs
            .iter()
            .map(|e| client_event(c, e, &viewer(&auth), true))
            .filter(|e| {
                let m = e["content"]["membership"].as_str().unwrap_or_default();
                q.membership.as_deref().is_none_or(|w| w == m)
                    && q.not_membership.as_deref() != Some(m)
            })
            .collect())
    })?;
    Ok(axum::Json(json!({ "chunk": chunk })))
}

pub async fn joined_members(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let joined = hs.db.read(|c| -> MxResult<serde_json::Map<String, Value>> {
        require_joined(c, room_id.as_str(), auth.user_id.as_str())?;
        let mut st = c.prepare_cached(
            "SELECT s.state_key, e.json FROM room_state s JOIN events e ON e.event_id=s.event_id
             WHERE s.room_id=?1 AND s.type='m.room.member' AND s.membership='join'",
        )?;
        let rows = st.query_map([room_id.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = serde_json::Map::new();
        for row in rows {
            let (user, json) = row?;
            let v: Value = serde_json::from_str(&json)?;
            out.insert(user, json!({ "display_name": v["content"]["displayname"], "avatar_url": v["content"]["avatar_url"] }));
        }
        Ok(out)
    })?;
    Ok(axum::Json(json!({ "joined": joined })))
}

/// Parses a pagination token: `s123_4` (sync tokens too) or a bare number.
pub fn parse_token(t: &str) -> MxResult<i64> {
    let t = t.strip_prefix('s').unwrap_or(t);
    let n = t.split('_').next().unwrap_or_default();
    n.parse::<i64>()
        .map_err(|_| MxError::invalid_param("Invalid pagination token"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<String>,
    filter: Option<String>,
}

fn parse_limit(s: Option<&str>, default: i64, max: i64) -> MxResult<i64> {
    match s {
        None => Ok(default),
        Some(v) => v
            .parse::<i64>()
            .map(|n| n.clamp(0, max))
            .map_err(|_| MxError::invalid_param("limit must be an integer")),
    }
}

pub fn parse_event_filter(s: Option<&str>) -> MxResult<EventFilter> {
    match s {
        None => Ok(EventFilter::default()),
        Some(f) => {
            serde_json::from_str(f).map_err(|e| MxError::bad_json(format!("Invalid filter: {e}")))
        }
    }
}

/// Member events of the given senders (lazy-loaded members).
pub fn member_events_for(
    conn: &Connection,
    room_id: &str,
    senders: &[String],
    v: &Viewer<'_>,
) -> rusqlite::Result<Vec<Value>> {
    let mut out = Vec::new();
    for s in senders {
        if let Some(id) = pdu::state_event_id(conn, room_id, "m.room.member", s)? {
            if let Some(e) = pdu::get_event(conn, &id)? {
                out.push(client_event(conn, &e, v, true));
            }
        }
    }
    Ok(out)
}

pub async fn messages(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<MessagesQuery>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let backward = match q.dir.as_deref() {
        Some("b") => true,
        Some("f") => false,
        _ => return Err(MxError::invalid_param("dir must be 'b' or 'f'")),
    };
    let limit = parse_limit(q.limit.as_deref(), 10, 1000)?;
    let filter = parse_event_filter(q.filter.as_deref())?;
    let from = q.from.as_deref().map(parse_token).transpose()?;
    let to = q.to.as_deref().map(parse_token).transpose()?;
    let v = viewer(&auth);
    if backward && hs.config.federation.enabled {
        // At the start of what this box holds of a room that began elsewhere: ask another server.
        let older: i64 = hs.db.read(|c| {
            c.prepare_cached("SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE room_id=?1 AND outlier=0 AND stream<=?2 LIMIT ?3)")?
                .query_row(params![room_id.as_str(), from.unwrap_or(i64::MAX), limit], |r| r.get(0))
        })?;
        if older < limit {
            if let Err(e) = hs.backfill(&room_id, limit.max(20)).await {
                tracing::debug!(errcode = e.errcode, "backfill failed");
            }
        }
    }
    let out = hs.db.read(|c| -> MxResult<Value> {
        let vis = Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let until = vis.until;
        let now = hs.db.current_stream();
        let from = from.unwrap_or(if backward { now } else { i64::MIN });
        let (lo, hi) = if backward {
            (to.unwrap_or(i64::MIN), from.min(until))
        } else {
            (from, to.unwrap_or(i64::MAX).min(until))
        };
        let sql = format!(
            "SELECT {EVENT_COLS} FROM events WHERE room_id=?1 AND outlier=0 AND stream>?2 AND stream<=?3 ORDER BY stream {} LIMIT ?4",
            if backward { "DESC" } else { "ASC" }
        );
        let mut st = c.prepare_cached(&sql)?;
        let mut chunk = Vec::new();
        let mut last = None;
        let mut scanned = 0i64;
        let mut pos_lo = lo;
        let mut pos_hi = hi;
        // Filtering may drop events: keep reading batches until the page is full.
        while (chunk.len() as i64) < limit && scanned < 10_000 {
            let batch: Vec<StoredEvent> =
                st.query_map(params![room_id.as_str(), pos_lo, pos_hi, limit.max(1) * 2], row_to_event)?.collect::<Result<_, _>>()?;
            if batch.is_empty() {
                break;
            }
            scanned += batch.len() as i64;
            for e in &batch {
                last = Some(e.stream);
                if backward { pos_hi = e.stream - 1 } else { pos_lo = e.stream }
                if !vis.allows(e.stream) {
                    continue;
                }
                let ce = client_event(c, e, &v, true);
                if filter.allows(&ce) {
                    chunk.push(ce);
                    if chunk.len() as i64 >= limit {
                        break;
                    }
                }
            }
        }
        let start = format!("s{from}");
        let mut out = json!({ "start": start, "chunk": chunk });
        if let Some(l) = last {
            let end = if backward { l - 1 } else { l };
            let exhausted = if backward { end <= lo } else { end >= hi.min(now) };
            if !(exhausted && chunk_len(&out) < limit as usize) {
                out["end"] = json!(format!("s{end}"));
            }
        }
        if filter.lazy_load_members {
            let mut senders: Vec<String> =
                out["chunk"].as_array().into_iter().flatten().filter_map(|e| e["sender"].as_str().map(str::to_owned)).collect();
            senders.sort();
            senders.dedup();
            out["state"] = json!(member_events_for(c, room_id.as_str(), &senders, &v)?);
        }
        Ok(out)
    })?;
    Ok(axum::Json(out))
}

fn chunk_len(v: &Value) -> usize {
    v["chunk"].as_array().map_or(0, Vec::len)
}

pub async fn get_event(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    hs.db.read(|c| {
        let vis = Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let ev = pdu::get_event(c, &event_id)?
            .filter(|e| e.room_id == room_id.as_str() && vis.allows(e.stream))
            .filter(|_| !crate::state::hidden_from_clients(c, &event_id).unwrap_or(true))
            .ok_or_else(|| MxError::not_found("Event not found"))?;
        Ok(axum::Json(client_event(c, &ev, &viewer(&auth), true)))
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ContextQuery {
    limit: Option<String>,
    filter: Option<String>,
}

pub async fn context(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<ContextQuery>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let limit = parse_limit(q.limit.as_deref(), 10, 100)?;
    let filter = parse_event_filter(q.filter.as_deref())?;
    let v = viewer(&auth);
    hs.db.read(|c| {
        let vis = Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let until = vis.until;
        let ev = pdu::get_event(c, &event_id)?
            .filter(|e| e.room_id == room_id.as_str() && vis.allows(e.stream))
            .ok_or_else(|| MxError::not_found("Event not found"))?;
        let before_n = limit / 2;
        let after_n = limit - before_n;
        let fetch = |sql: &str, n: i64| -> MxResult<Vec<StoredEvent>> {
            let mut st = c.prepare_cached(sql)?;
            let rows = st.query_map(params![room_id.as_str(), ev.stream, until, n], row_to_event)?.collect::<Result<_, _>>()?;
            Ok(rows)
        };
        let before = fetch(
            &format!("SELECT {EVENT_COLS} FROM events WHERE room_id=?1 AND outlier=0 AND stream<?2 AND stream<=?3 ORDER BY stream DESC LIMIT ?4"),
            before_n,
        )?;
        let after = fetch(
            &format!("SELECT {EVENT_COLS} FROM events WHERE room_id=?1 AND outlier=0 AND stream>?2 AND stream<=?3 ORDER BY stream ASC LIMIT ?4"),
            after_n,
        )?;
        let start = before.last().map_or(ev.stream - 1, |e| e.stream - 1);
        let end = after.last().map_or(ev.stream, |e| e.stream);
        let fmt = |evs: &[StoredEvent]| -> Vec<Value> {
            evs.iter().filter(|e| vis.allows(e.stream)).map(|e| client_event(c, e, &v, true)).filter(|e| filter.allows(e)).collect()
        };
        let state = pdu::current_state(c, room_id.as_str(), &v)?;
        Ok(axum::Json(json!({
            "event": client_event(c, &ev, &v, true),
            "events_before": fmt(&before),
            "events_after": fmt(&after),
            "start": format!("s{start}"),
            "end": format!("s{end}"),
            "state": state,
        })))
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RelationsQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    dir: Option<String>,
    recurse: Option<bool>,
}

fn relations_inner(
    hs: &Hs,
    auth: &Auth,
    room: &str,
    event_id: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    q: RelationsQuery,
) -> MxResult<J> {
    let room_id = parse_room(room)?;
    let limit = parse_limit(q.limit.as_deref(), 50, 1000)?;
    let backward = q.dir.as_deref() != Some("f");
    let from = q.from.as_deref().map(parse_token).transpose()?;
    let to = q.to.as_deref().map(parse_token).transpose()?;
    let v = viewer(auth);
    let _ = q.recurse;
    hs.db.read(|c| {
        let vis = Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        pdu::get_event(c, event_id)?
            .filter(|e| e.room_id == room_id.as_str() && vis.allows(e.stream))
            .ok_or_else(|| MxError::not_found("Event not found"))?;
        let (lo, hi) = if backward {
            (to.unwrap_or(0), from.unwrap_or(i64::MAX).min(vis.until))
        } else {
            (from.unwrap_or(0), to.unwrap_or(i64::MAX).min(vis.until))
        };
        let sql = format!(
            "SELECT {EVENT_COLS} FROM events WHERE relates_to=?1 AND room_id=?2 AND stream>?3 AND stream<=?4
             AND (?5 IS NULL OR rel_type=?5) AND (?6 IS NULL OR type=?6) ORDER BY stream {} LIMIT ?7",
            if backward { "DESC" } else { "ASC" }
        );
        let mut st = c.prepare_cached(&sql)?;
        let rows: Vec<StoredEvent> = st
            .query_map(params![event_id, room_id.as_str(), lo, hi, rel_type, event_type, limit + 1], row_to_event)?
            .collect::<Result<_, _>>()?;
        let more = rows.len() as i64 > limit;
        let rows = &rows[..rows.len().min(limit as usize)];
        let mut out = json!({ "chunk": rows.iter().filter(|e| vis.allows(e.stream)).map(|e| client_event(c, e, &v, true)).collect::<Vec<_>>() });
        if more {
            if let Some(l) = rows.last() {
                out["next_batch"] = json!(format!("s{}", if backward { l.stream - 1 } else { l.stream }));
            }
        }
        Ok(axum::Json(out))
    })
}

pub async fn relations(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<RelationsQuery>,
) -> MxResult<J> {
    relations_inner(&hs, &auth, &room, &event_id, None, None, q)
}

pub async fn relations_typed(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id, rel_type)): PathArgs<(String, String, String)>,
    QueryArgs(q): QueryArgs<RelationsQuery>,
) -> MxResult<J> {
    relations_inner(&hs, &auth, &room, &event_id, Some(&rel_type), None, q)
}

pub async fn relations_typed2(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, event_id, rel_type, event_type)): PathArgs<(String, String, String, String)>,
    QueryArgs(q): QueryArgs<RelationsQuery>,
) -> MxResult<J> {
    relations_inner(
        &hs,
        &auth,
        &room,
        &event_id,
        Some(&rel_type),
        Some(&event_type),
        q,
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ThreadsQuery {
    include: Option<String>,
    from: Option<String>,
    limit: Option<String>,
}

pub async fn threads(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<ThreadsQuery>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let limit = parse_limit(q.limit.as_deref(), 50, 500)?;
    let from = q
        .from
        .as_deref()
        .map(parse_token)
        .transpose()?
        .unwrap_or(i64::MAX);
    let participated = match q.include.as_deref() {
        None | Some("all") => false,
        Some("participated") => true,
        _ => {
            return Err(MxError::invalid_param(
                "include must be 'all' or 'participated'",
            ))
        }
    };
    let v = viewer(&auth);
    hs.db.read(|c| {
        let vis = Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let until = vis.until;
        let mut st = c.prepare_cached(
            "SELECT thread_root, MAX(stream) AS latest FROM events WHERE room_id=?1 AND thread_root IS NOT NULL
             AND stream<=?2 GROUP BY thread_root HAVING latest<=?3 ORDER BY latest DESC",
        )?;
        let roots: Vec<(String, i64)> = st
            .query_map(params![room_id.as_str(), until, from], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut chunk = Vec::new();
        let mut next = None;
        for (root, latest) in roots {
            if chunk.len() as i64 >= limit {
                next = Some(latest);
                break;
            }
            let Some(ev) = pdu::get_event(c, &root)?.filter(|e| vis.allows(e.stream)) else { continue };
            let ce = client_event(c, &ev, &v, true);
            if participated && !ce["unsigned"]["m.relations"]["m.thread"]["current_user_participated"].as_bool().unwrap_or(false) {
                continue;
            }
            chunk.push(ce);
        }
        let mut out = json!({ "chunk": chunk });
        if let Some(n) = next {
            out["next_batch"] = json!(format!("s{n}"));
        }
        Ok(axum::Json(out))
    })
}

pub async fn room_aliases(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let aliases = hs.db.read(|c| -> MxResult<Vec<String>> {
        Visibility::load(c, room_id.as_str(), auth.user_id.as_str())?;
        let mut st =
            c.prepare_cached("SELECT alias FROM room_aliases WHERE room_id=?1 ORDER BY alias")?;
        let r = st
            .query_map([room_id.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(r)
    })?;
    Ok(axum::Json(json!({ "aliases": aliases })))
}

pub async fn get_alias(
    State(hs): State<Arc<Hs>>,
    PathArgs(alias): PathArgs<String>,
) -> MxResult<J> {
    let room_id = hs.resolve_alias(&alias)?;
    Ok(axum::Json(
        json!({ "room_id": room_id, "servers": [hs.server_name] }),
    ))
}

#[derive(Deserialize)]
pub struct AliasBody {
    room_id: String,
}

pub async fn put_alias(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(alias): PathArgs<String>,
    Json(body): Json<AliasBody>,
) -> MxResult<J> {
    let alias =
        RoomAliasId::parse(&alias).map_err(|_| MxError::invalid_param("Invalid room alias"))?;
    if alias.server_name() != hs.server_name {
        return Err(MxError::invalid_param("Alias must be on this server"));
    }
    let room_id = parse_room(&body.room_id)?;
    hs.db.write(|w| -> MxResult<()> {
        if pdu::room_version(w, room_id.as_str())?.is_none() {
            return Err(MxError::not_found("Unknown room"));
        }
        require_joined(w, room_id.as_str(), auth.user_id.as_str())?;
        let n = w.execute(
            "INSERT OR IGNORE INTO room_aliases(alias, room_id, creator) VALUES(?1,?2,?3)",
            params![alias.as_str(), room_id.as_str(), auth.user_id.as_str()],
        )?;
        if n == 0 {
            return Err(MxError::new(
                http::StatusCode::CONFLICT,
                "M_UNKNOWN",
                "Room alias already exists",
            ));
        }
        Ok(())
    })?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_alias(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(alias): PathArgs<String>,
) -> MxResult<J> {
    let alias =
        RoomAliasId::parse(&alias).map_err(|_| MxError::invalid_param("Invalid room alias"))?;
    hs.db.write(|w| -> MxResult<()> {
        let row: Option<(String, String)> = w
            .query_row(
                "SELECT room_id, creator FROM room_aliases WHERE alias=?1",
                [alias.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((room_id, creator)) = row else {
            return Err(MxError::not_found("Room alias not found"));
        };
        let pl = pdu::power_levels(w, &room_id)?;
        let may = creator == auth.user_id.as_str()
            || auth.is_admin
            || pl.user(auth.user_id.as_str()) >= pl.action("state_default", 50);
        if !may {
            return Err(MxError::forbidden("You may not remove this alias"));
        }
        w.execute("DELETE FROM room_aliases WHERE alias=?1", [alias.as_str()])?;
        Ok(())
    })?;
    Ok(axum::Json(json!({})))
}

pub async fn get_visibility(
    State(hs): State<Arc<Hs>>,
    PathArgs(room): PathArgs<String>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let public: Option<bool> = hs.db.read(|c| {
        c.query_row(
            "SELECT is_public FROM rooms WHERE room_id=?1",
            [room_id.as_str()],
            |r| r.get(0),
        )
        .optional()
    })?;
    let public = public.ok_or_else(|| MxError::not_found("Unknown room"))?;
    Ok(axum::Json(
        json!({ "visibility": if public { "public" } else { "private" } }),
    ))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: String,
}

pub async fn set_visibility(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    Json(body): Json<VisibilityBody>,
) -> MxResult<J> {
    let room_id = parse_room(&room)?;
    let public = match body.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => {
            return Err(MxError::invalid_param(
                "visibility must be public or private",
            ))
        }
    };
    hs.db.write(|w| -> MxResult<()> {
        if pdu::room_version(w, room_id.as_str())?.is_none() {
            return Err(MxError::not_found("Unknown room"));
        }
        let pl = pdu::power_levels(w, room_id.as_str())?;
        if !auth.is_admin && pl.user(auth.user_id.as_str()) < pl.action("state_default", 50) {
            return Err(MxError::forbidden("You may not publish this room"));
        }
        w.execute(
            "UPDATE rooms SET is_public=?1 WHERE room_id=?2",
            params![public, room_id.as_str()],
        )?;
        Ok(())
    })?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
    server: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PublicRoomsBody {
    limit: Option<i64>,
    since: Option<String>,
    filter: Option<Value>,
    server: Option<String>,
}

fn public_rooms_inner(hs: &Hs, limit: i64, since: Option<&str>, term: Option<&str>) -> MxResult<J> {
    let offset = match since {
        Some(s) => s
            .strip_prefix('p')
            .unwrap_or(s)
            .parse::<i64>()
            .map_err(|_| MxError::invalid_param("Invalid since token"))?,
        None => 0,
    };
    let limit = limit.clamp(1, 500);
    let term = term.map(str::to_lowercase);
    hs.db.read(|c| {
        let mut st = c.prepare_cached("SELECT room_id FROM rooms WHERE is_public=1 ORDER BY created_ts")?;
        let rooms: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut entries = Vec::new();
        for room_id in &rooms {
            let get = |k: &str| pdu::state_content(c, room_id, k, "");
            let name = get("m.room.name")?.and_then(|v| v["name"].as_str().map(str::to_owned));
            let topic = get("m.room.topic")?.and_then(|v| v["topic"].as_str().map(str::to_owned));
            let alias = get("m.room.canonical_alias")?.and_then(|v| v["alias"].as_str().map(str::to_owned));
            if let Some(t) = &term {
                let hay = format!("{} {} {}", name.as_deref().unwrap_or(""), topic.as_deref().unwrap_or(""), alias.as_deref().unwrap_or(""))
                    .to_lowercase();
                if !hay.contains(t.as_str()) {
                    continue;
                }
            }
            let joined: i64 = c.query_row(
                "SELECT COUNT(*) FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership='join'",
                [room_id],
                |r| r.get(0),
            )?;
            let hv = get("m.room.history_visibility")?.and_then(|v| v["history_visibility"].as_str().map(str::to_owned));
            let guest = get("m.room.guest_access")?.and_then(|v| v["guest_access"].as_str().map(str::to_owned));
            let jr = get("m.room.join_rules")?.and_then(|v| v["join_rule"].as_str().map(str::to_owned));
            let avatar = get("m.room.avatar")?.and_then(|v| v["url"].as_str().map(str::to_owned));
            let room_type = get("m.room.create")?.and_then(|v| v["type"].as_str().map(str::to_owned));
            let mut e = json!({
                "room_id": room_id,
                "num_joined_members": joined,
                "world_readable": hv.as_deref() == Some("world_readable"),
                "guest_can_join": guest.as_deref() == Some("can_join"),
                "join_rule": jr.unwrap_or_else(|| "invite".into()),
            });
            for (k, v) in [("name", name), ("topic", topic), ("canonical_alias", alias), ("avatar_url", avatar), ("room_type", room_type)] {
                if let Some(v) = v {
                    e[k] = json!(v);
                }
            }
            entries.push(e);
        }
        let total = entries.len() as i64;
        entries.sort_by(|a, b| b["num_joined_members"].as_i64().cmp(&a["num_joined_members"].as_i64()));
        let page: Vec<Value> = entries.into_iter().skip(offset as usize).take(limit as usize).collect();
        let mut out = json!({ "chunk": page, "total_room_count_estimate": total });
        if offset + limit < total {
            out["next_batch"] = json!(format!("p{}", offset + limit));
        }
        if offset > 0 {
            out["prev_batch"] = json!(format!("p{}", (offset - limit).max(0)));
        }
        Ok(axum::Json(out))
    })
}

/// The directory of another server, through federation.
async fn remote_directory(
    hs: &Hs,
    server: &str,
    limit: i64,
    since: Option<&str>,
    term: Option<&str>,
) -> MxResult<J> {
    let name = ruma::ServerName::parse(server)
        .map_err(|_| MxError::invalid_param("Invalid server name"))?;
    let mut body = json!({ "limit": limit });
    if let Some(s) = since {
        body["since"] = json!(s);
    }
    if let Some(t) = term {
        body["filter"] = json!({ "generic_search_term": t });
    }
    hs.fed_request(
        "POST",
        &name,
        "/_matrix/federation/v1/publicRooms",
        Some(&body),
    )
    .await
    .map(axum::Json)
}

/// `POST /_matrix/federation/v1/publicRooms`: this box's directory for other servers.
pub async fn federation_public_rooms(
    State(hs): State<Arc<Hs>>,
    req: crate::federation::FedRequest,
) -> MxResult<J> {
    let body: PublicRoomsBody = serde_json::from_value(req.body).unwrap_or_default();
    let term = body
        .filter
        .as_ref()
        .and_then(|f| f["generic_search_term"].as_str().map(str::to_owned));
    public_rooms_inner(
        &hs,
        body.limit.unwrap_or(100),
        body.since.as_deref(),
        term.as_deref(),
    )
}

pub async fn public_rooms_get(
    State(hs): State<Arc<Hs>>,
    QueryArgs(q): QueryArgs<PublicRoomsQuery>,
) -> MxResult<J> {
    let limit = parse_limit(q.limit.as_deref(), 100, 500)?;
    match q
        .server
        .as_deref()
        .filter(|s| *s != hs.server_name.as_str())
    {
        Some(s) => remote_directory(&hs, s, limit, q.since.as_deref(), None).await,
        None => public_rooms_inner(&hs, limit, q.since.as_deref(), None),
    }
}

pub async fn public_rooms_post(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    Json(body): Json<PublicRoomsBody>,
) -> MxResult<J> {
    let term = body
        .filter
        .as_ref()
        .and_then(|f| f["generic_search_term"].as_str().map(str::to_owned));
    let limit = body.limit.unwrap_or(100);
    match body
        .server
        .as_deref()
        .filter(|s| *s != hs.server_name.as_str())
    {
        Some(s) => remote_directory(&hs, s, limit, body.since.as_deref(), term.as_deref()).await,
        None => public_rooms_inner(&hs, limit, body.since.as_deref(), term.as_deref()),
    }
}
