//! End-to-end encryption support: the server stores and relays keys and
//! to-device messages; it never sees plaintext.
//!
//! Device keys, one-time and fallback keys, cross-signing keys and signatures,
//! device-list tracking, and to-device messages.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use axum::extract::State;
use base64::Engine;
use ruma::{
    canonical_json::CanonicalJsonObject,
    signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes},
    SigningKeyAlgorithm, UserId,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    db::WriteTxn,
    error::{MxError, MxResult},
    extract::{Auth, Json, PathArgs, QueryArgs},
    pdu,
    rooms::{joined_room_ids, parse_token},
    Hs,
};

type J = axum::Json<Value>;

/// Largest accepted key upload (one-time keys included).
const MAX_KEYS_PER_UPLOAD: usize = 200;
/// To-device messages handed out per sync.
pub const TO_DEVICE_PER_SYNC: i64 = 100;

fn invalid_signature(msg: impl Into<String>) -> MxError {
    MxError::new(http::StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", msg)
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let e = base64::engine::general_purpose::STANDARD_NO_PAD;
    e.decode(s.trim_end_matches('=')).ok()
}

/// Checks that `object` carries a valid ed25519 signature by `signer`'s key `key_id`
/// (e.g. `ed25519:DEVICEID`) made with `public_key` (unpadded base64).
pub fn check_signature(
    object: &Value,
    signer: &str,
    key_id: &str,
    public_key: &str,
) -> MxResult<()> {
    let sig = object["signatures"][signer][key_id]
        .as_str()
        .ok_or_else(|| invalid_signature(format!("missing signature {signer} {key_id}")))?;
    let obj: CanonicalJsonObject = serde_json::from_value(object.clone())
        .map_err(|e| MxError::bad_json(format!("keys are not canonical JSON: {e}")))?;
    let canonical =
        to_canonical_json_string_for_signing(&obj).map_err(|e| MxError::bad_json(e.to_string()))?;
    let key =
        decode_b64(public_key).ok_or_else(|| MxError::bad_json("public key is not base64"))?;
    let sig = decode_b64(sig).ok_or_else(|| invalid_signature("signature is not base64"))?;
    verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        &key,
        &sig,
        canonical.as_bytes(),
    )
    .map_err(|_| invalid_signature(format!("signature {signer} {key_id} does not verify")))
}

/// Records that `user`'s device list changed (new keys, removed device, cross-signing).
pub fn mark_device_list_change(w: &mut WriteTxn<'_>, user: &str) -> rusqlite::Result<()> {
    let stream = w.next_stream();
    w.tx.execute(
        "INSERT INTO device_list_updates(user_id, stream) VALUES(?1,?2)",
        params![user, stream],
    )?;
    w.note(crate::db::UserRows::DeviceLists, "", stream);
    Ok(())
}

/// Removes everything a device had: keys, pending to-device messages.
pub fn delete_device_keys(w: &mut WriteTxn<'_>, user: &str, device: &str) -> rusqlite::Result<()> {
    let had: bool = w
        .query_row(
            "SELECT 1 FROM device_keys WHERE user_id=?1 AND device_id=?2",
            params![user, device],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    for table in ["device_keys", "one_time_keys", "fallback_keys", "to_device"] {
        w.tx.execute(
            &format!("DELETE FROM {table} WHERE user_id=?1 AND device_id=?2"),
            params![user, device],
        )?;
    }
    if had {
        mark_device_list_change(w, user)?;
    }
    Ok(())
}

/// Users who share a room with `user` (and the user), for device-list fan-out.
pub fn users_sharing_rooms(c: &Connection, user: &str) -> rusqlite::Result<HashSet<String>> {
    let mut out = HashSet::new();
    out.insert(user.to_owned());
    for room in joined_room_ids(c, user)? {
        out.extend(pdu::local_members(c, &room, false)?);
    }
    Ok(out)
}

impl Hs {
    /// Wakes everyone who tracks `user`'s devices, here and on other servers.
    pub(crate) fn notify_device_change(&self, user: &str) {
        if let Ok(users) = self.db.read(|c| users_sharing_rooms(c, user)) {
            self.notify_users(users.iter().map(String::as_str));
            let servers: HashSet<String> = users
                .iter()
                .filter_map(|u| UserId::parse(u).ok())
                .map(|u| u.server_name().to_string())
                .filter(|s| s != self.server_name.as_str())
                .collect();
            for s in servers {
                let edu = json!({ "edu_type": "m.device_list_update", "content": {
                    "user_id": user, "device_id": "*", "stream_id": self.db.current_stream(), "prev_id": [],
                }});
                let _ = crate::federation::enqueue_server_edu(self, &s, edu);
            }
        }
    }
}

/// One-time key counts of a device, by algorithm (always with `signed_curve25519`).
pub fn otk_counts(
    c: &Connection,
    user: &str,
    device: &str,
) -> rusqlite::Result<Map<String, Value>> {
    let mut st = c.prepare_cached(
        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id=?1 AND device_id=?2 GROUP BY algorithm",
    )?;
    let mut m = Map::new();
    m.insert("signed_curve25519".into(), json!(0));
    for row in st.query_map(params![user, device], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })? {
        let (a, n) = row?;
        m.insert(a, json!(n));
    }
    Ok(m)
}

/// Algorithms of the device's fallback keys not yet used.
pub fn unused_fallback_types(
    c: &Connection,
    user: &str,
    device: &str,
) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT algorithm FROM fallback_keys WHERE user_id=?1 AND device_id=?2 AND used=0",
    )?;
    let r = st.query_map(params![user, device], |r| r.get(0))?.collect();
    r
}

#[derive(Deserialize)]
pub struct UploadBody {
    device_keys: Option<Value>,
    #[serde(default)]
    one_time_keys: Map<String, Value>,
    #[serde(default)]
    fallback_keys: Map<String, Value>,
}

fn device_ed25519(c: &Connection, user: &str, device: &str) -> rusqlite::Result<Option<String>> {
    let json: Option<String> = c
        .query_row(
            "SELECT json FROM device_keys WHERE user_id=?1 AND device_id=?2",
            params![user, device],
            |r| r.get(0),
        )
        .optional()?;
    Ok(json
        .and_then(|j| serde_json::from_str::<Value>(&j).ok())
        .and_then(|v| {
            v["keys"][format!("ed25519:{device}")]
                .as_str()
                .map(str::to_owned)
        }))
}

pub async fn upload(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<UploadBody>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    let device = auth.device_id.as_str();
    if body.one_time_keys.len() + body.fallback_keys.len() > MAX_KEYS_PER_UPLOAD {
        return Err(MxError::too_large(format!(
            "at most {MAX_KEYS_PER_UPLOAD} keys per upload"
        )));
    }
    // Validate everything before storing anything.
    let mut signing_key = hs.db.read(|c| device_ed25519(c, user, device))?;
    if let Some(dk) = &body.device_keys {
        if dk["user_id"] != user || dk["device_id"] != device {
            return Err(MxError::invalid_param(
                "device_keys must be for the requesting user and device",
            ));
        }
        if !dk["algorithms"].is_array() || !dk["keys"].is_object() {
            return Err(MxError::bad_json("device_keys needs algorithms and keys"));
        }
        let ed = dk["keys"][format!("ed25519:{device}")]
            .as_str()
            .ok_or_else(|| MxError::bad_json("device_keys needs the device's ed25519 key"))?
            .to_owned();
        check_signature(dk, user, &format!("ed25519:{device}"), &ed)?;
        if let Some(old) = &signing_key {
            if *old != ed {
                return Err(MxError::invalid_param(
                    "the device's identity key cannot change; log in as a new device",
                ));
            }
        }
        signing_key = Some(ed);
    }
    let check_key = |key_id: &str, key: &Value| -> MxResult<String> {
        let (algorithm, _) = key_id
            .split_once(':')
            .ok_or_else(|| MxError::bad_json("key ids look like algorithm:id"))?;
        if key.is_object() && algorithm.starts_with("signed_") {
            let Some(ed) = &signing_key else {
                return Err(MxError::invalid_param(
                    "upload device keys before signed one-time keys",
                ));
            };
            check_signature(key, user, &format!("ed25519:{device}"), ed)?;
        } else if !key.is_string() && !key.is_object() {
            return Err(MxError::bad_json("a key is a string or a signed object"));
        }
        Ok(algorithm.to_owned())
    };
    let mut otks = Vec::new();
    for (id, key) in &body.one_time_keys {
        otks.push((id.clone(), check_key(id, key)?, key.to_string()));
    }
    let mut fallbacks = Vec::new();
    for (id, key) in &body.fallback_keys {
        fallbacks.push((id.clone(), check_key(id, key)?, key.to_string()));
    }
    let changed = hs.db.write(|w| -> MxResult<bool> {
        let mut changed = false;
        if let Some(dk) = &body.device_keys {
            let mut dk = dk.clone();
            if let Some(o) = dk.as_object_mut() {
                o.remove("unsigned");
            }
            let new = dk.to_string();
            let old: Option<String> = w
                .query_row("SELECT json FROM device_keys WHERE user_id=?1 AND device_id=?2", params![user, device], |r| r.get(0))
                .optional()?;
            if old.as_deref() != Some(new.as_str()) {
                w.tx.execute(
                    "INSERT INTO device_keys(user_id, device_id, json) VALUES(?1,?2,?3)
                     ON CONFLICT(user_id, device_id) DO UPDATE SET json=?3",
                    params![user, device, new],
                )?;
                mark_device_list_change(w, user)?;
                changed = true;
            }
        }
        for (id, algorithm, json) in &otks {
            let old: Option<String> = w
                .query_row(
                    "SELECT json FROM one_time_keys WHERE user_id=?1 AND device_id=?2 AND key_id=?3",
                    params![user, device, id],
                    |r| r.get(0),
                )
                .optional()?;
            match old {
                Some(o) if &o == json => {}
                Some(_) => return Err(MxError::invalid_param(format!("one-time key {id} already exists with other content"))),
                None => {
                    w.tx.execute(
                        "INSERT INTO one_time_keys(user_id, device_id, key_id, algorithm, json) VALUES(?1,?2,?3,?4,?5)",
                        params![user, device, id, algorithm, json],
                    )?;
                }
            }
        }
        for (id, algorithm, json) in &fallbacks {
            w.tx.execute(
                "INSERT INTO fallback_keys(user_id, device_id, algorithm, key_id, json, used) VALUES(?1,?2,?3,?4,?5,0)
                 ON CONFLICT(user_id, device_id, algorithm) DO UPDATE SET key_id=?4, json=?5, used=0",
                params![user, device, algorithm, id, json],
            )?;
        }
        w.persist_stream()?;
        Ok(changed)
    })?;
    if changed {
        hs.notify_device_change(user);
    }
    let counts = hs.db.read(|c| otk_counts(c, user, device))?;
    Ok(axum::Json(json!({ "one_time_key_counts": counts })))
}

/// Merges stored third-party signatures into a key object for the viewer.
fn with_signatures(
    c: &Connection,
    mut key: Value,
    target_user: &str,
    target_key: &str,
    viewer: &str,
) -> rusqlite::Result<Value> {
    let mut st = c.prepare_cached(
        "SELECT signer_user, signer_key, signature FROM key_signatures WHERE target_user=?1 AND target_key=?2",
    )?;
    for row in st.query_map(params![target_user, target_key], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })? {
        let (signer, key_id, sig) = row?;
        // Signatures by other users (user-signing) are shown only to the signer.
        if signer == target_user || signer == viewer {
            key["signatures"][&signer][&key_id] = json!(sig);
        }
    }
    Ok(key)
}

fn cross_signing_key(c: &Connection, user: &str, kind: &str) -> rusqlite::Result<Option<Value>> {
    let j: Option<String> = c
        .query_row(
            "SELECT json FROM cross_signing_keys WHERE user_id=?1 AND key_type=?2",
            params![user, kind],
            |r| r.get(0),
        )
        .optional()?;
    Ok(j.and_then(|j| serde_json::from_str(&j).ok()))
}

/// The public key (unpadded base64) and key id of a cross-signing key object.
fn cs_public(key: &Value) -> Option<(String, String)> {
    key["keys"]
        .as_object()?
        .iter()
        .next()
        .and_then(|(id, v)| Some((id.clone(), v.as_str()?.to_owned())))
}

#[derive(Deserialize)]
pub struct QueryBody {
    pub(crate) device_keys: BTreeMap<String, Vec<String>>,
}

/// Splits a per-user map into this server's users and other servers' users.
fn split_by_server<T: Clone>(
    hs: &Hs,
    map: &BTreeMap<String, T>,
) -> MxResult<(BTreeMap<String, T>, BTreeMap<String, BTreeMap<String, T>>)> {
    let mut local = BTreeMap::new();
    let mut remote: BTreeMap<String, BTreeMap<String, T>> = BTreeMap::new();
    for (user, v) in map {
        let u = UserId::parse(user)
            .map_err(|_| MxError::invalid_param(format!("invalid user id {user}")))?;
        if u.server_name() == hs.server_name {
            local.insert(user.clone(), v.clone());
        } else {
            remote
                .entry(u.server_name().to_string())
                .or_default()
                .insert(user.clone(), v.clone());
        }
    }
    Ok((local, remote))
}

/// Merges a remote server's answer, taking only the users that were asked of it
/// (a server may speak for its own users, never for anyone else's).
fn merge_into(out: &mut Value, part: &Value, keys: &[&str], asked: &HashSet<String>) {
    for k in keys {
        if let (Some(dst), Some(src)) = (out[*k].as_object_mut(), part[*k].as_object()) {
            for (user, v) in src.iter().filter(|(u, _)| asked.contains(*u)) {
                dst.insert(user.clone(), v.clone());
            }
        }
    }
}

pub async fn query(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<QueryBody>,
) -> MxResult<J> {
    if body.device_keys.len() > 1000 {
        return Err(MxError::too_large("too many users in one query"));
    }
    let (local, remote) = split_by_server(&hs, &body.device_keys)?;
    let mut out = hs
        .db
        .read(|c| local_query(&hs, c, auth.user_id.as_str(), &local))?;
    for (server, users) in remote {
        let Ok(name) = ruma::ServerName::parse(&server) else {
            continue;
        };
        let asked: HashSet<String> = users.keys().cloned().collect();
        let req = json!({ "device_keys": users });
        match hs
            .fed_request(
                "POST",
                &name,
                "/_matrix/federation/v1/user/keys/query",
                Some(&req),
            )
            .await
        {
            Ok(v) => merge_into(
                &mut out,
                &v,
                &["device_keys", "master_keys", "self_signing_keys"],
                &asked,
            ),
            Err(e) => {
                out["failures"][&server] = json!({ "errcode": e.errcode, "error": e.message });
            }
        }
    }
    Ok(axum::Json(out))
}

/// Keys of this server's users, as `/keys/query` shows them to `viewer`.
pub(crate) fn local_query(
    hs: &Hs,
    c: &Connection,
    viewer: &str,
    wanted_keys: &BTreeMap<String, Vec<String>>,
) -> MxResult<Value> {
    let body = QueryBody {
        device_keys: wanted_keys.clone(),
    };
    {
        let mut device_keys = Map::new();
        let mut master = Map::new();
        let mut self_signing = Map::new();
        let mut user_signing = Map::new();
        let mut failures = Map::new();
        for (user, wanted) in &body.device_keys {
            if UserId::parse(user).is_err() {
                return Err(MxError::invalid_param(format!("invalid user id {user}")));
            }
            if UserId::parse(user).is_ok_and(|u| u.server_name() != hs.server_name) {
                failures.insert(
                    user.rsplit(':').next().unwrap_or_default().to_owned(),
                    json!({"errcode": "M_UNAVAILABLE"}),
                );
                continue;
            }
            let mut devices = Map::new();
            let mut st = c.prepare_cached(
                "SELECT k.device_id, k.json, d.display_name FROM device_keys k
                 LEFT JOIN devices d ON d.user_id=k.user_id AND d.device_id=k.device_id WHERE k.user_id=?1",
            )?;
            let rows = st
                .query_map([user], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            for (device, json, name) in rows {
                if !wanted.is_empty() && !wanted.contains(&device) {
                    continue;
                }
                let mut v: Value = serde_json::from_str(&json)?;
                v = with_signatures(c, v, user, &device, viewer)?;
                if let Some(n) = name {
                    v["unsigned"] = json!({ "device_display_name": n });
                }
                devices.insert(device, v);
            }
            device_keys.insert(user.clone(), Value::Object(devices));
            if let Some(k) = cross_signing_key(c, user, "master")? {
                let kid = cs_public(&k).map(|(_, p)| p).unwrap_or_default();
                master.insert(user.clone(), with_signatures(c, k, user, &kid, viewer)?);
            }
            if let Some(k) = cross_signing_key(c, user, "self_signing")? {
                self_signing.insert(user.clone(), k);
            }
            if user == viewer {
                if let Some(k) = cross_signing_key(c, user, "user_signing")? {
                    user_signing.insert(user.clone(), k);
                }
            }
        }
        Ok(json!({
            "device_keys": device_keys,
            "master_keys": master,
            "self_signing_keys": self_signing,
            "user_signing_keys": user_signing,
            "failures": failures,
        }))
    }
}

#[derive(Deserialize)]
pub struct ClaimBody {
    pub(crate) one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

pub async fn claim(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    Json(body): Json<ClaimBody>,
) -> MxResult<J> {
    if body
        .one_time_keys
        .values()
        .map(BTreeMap::len)
        .sum::<usize>()
        > 5000
    {
        return Err(MxError::too_large("too many devices in one claim"));
    }
    let (local, remote) = split_by_server(&hs, &body.one_time_keys)?;
    let mut out = local_claim(&hs, &local)?;
    for (server, users) in remote {
        let Ok(name) = ruma::ServerName::parse(&server) else {
            continue;
        };
        let asked: HashSet<String> = users.keys().cloned().collect();
        let req = json!({ "one_time_keys": users });
        match hs
            .fed_request(
                "POST",
                &name,
                "/_matrix/federation/v1/user/keys/claim",
                Some(&req),
            )
            .await
        {
            Ok(v) => merge_into(&mut out, &v, &["one_time_keys"], &asked),
            Err(e) => {
                out["failures"][&server] = json!({ "errcode": e.errcode, "error": e.message });
            }
        }
    }
    Ok(axum::Json(out))
}

/// Claims one-time keys (or fallback keys) of this server's users.
pub(crate) fn local_claim(
    hs: &Hs,
    wanted: &BTreeMap<String, BTreeMap<String, String>>,
) -> MxResult<Value> {
    let body = ClaimBody {
        one_time_keys: wanted.clone(),
    };
    hs.db.write(|w| -> MxResult<Value> {
        let mut keys = Map::new();
        let mut failures = Map::new();
        for (user, devices) in &body.one_time_keys {
            let parsed = UserId::parse(user).map_err(|_| MxError::invalid_param(format!("invalid user id {user}")))?;
            if parsed.server_name() != hs.server_name {
                failures.insert(parsed.server_name().to_string(), json!({"errcode": "M_UNAVAILABLE"}));
                continue;
            }
            let mut per_user = Map::new();
            for (device, algorithm) in devices {
                let otk: Option<(String, String)> = w
                    .query_row(
                        "SELECT key_id, json FROM one_time_keys WHERE user_id=?1 AND device_id=?2 AND algorithm=?3
                         ORDER BY rowid LIMIT 1",
                        params![user, device, algorithm],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let found = match otk {
                    Some((id, json)) => {
                        w.tx.execute(
                            "DELETE FROM one_time_keys WHERE user_id=?1 AND device_id=?2 AND key_id=?3",
                            params![user, device, id],
                        )?;
                        Some((id, json))
                    }
                    None => {
                        let fb: Option<(String, String)> = w
                            .query_row(
                                "SELECT key_id, json FROM fallback_keys WHERE user_id=?1 AND device_id=?2 AND algorithm=?3",
                                params![user, device, algorithm],
                                |r| Ok((r.get(0)?, r.get(1)?)),
                            )
                            .optional()?;
                        if fb.is_some() {
                            w.tx.execute(
                                "UPDATE fallback_keys SET used=1 WHERE user_id=?1 AND device_id=?2 AND algorithm=?3",
                                params![user, device, algorithm],
                            )?;
                        }
                        fb
                    }
                };
                if let Some((id, json)) = found {
                    let v: Value = serde_json::from_str(&json)?;
                    per_user.insert(device.clone(), json!({ id: v }));
                }
            }
            if !per_user.is_empty() {
                keys.insert(user.clone(), Value::Object(per_user));
            }
        }
        Ok(json!({ "one_time_keys": keys, "failures": failures }))
    })
}

/// Users whose device lists changed (or who started/stopped sharing a room with
/// `user`) between two stream positions.
pub fn device_list_delta(
    db: &crate::db::Db,
    c: &Connection,
    user: &str,
    from: i64,
    to: i64,
) -> rusqlite::Result<(Vec<String>, Vec<String>)> {
    // Cheap checks first: most syncs see neither key changes nor membership changes.
    use crate::db::UserRows::{DeviceLists, Membership};
    if !db.may_have_changed(DeviceLists, "", from) && !db.may_have_changed(Membership, "", from) {
        return Ok((Vec::new(), Vec::new()));
    }
    let any: bool = c
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM device_list_updates WHERE stream>?1 AND stream<=?2)
                 OR EXISTS(SELECT 1 FROM events WHERE stream>?1 AND stream<=?2 AND type='m.room.member')",
        )?
        .query_row(params![from, to], |r| r.get(0))?;
    if !any {
        return Ok((Vec::new(), Vec::new()));
    }
    let sharing = users_sharing_rooms(c, user)?;
    let mut changed: HashSet<String> = HashSet::new();
    let mut left: HashSet<String> = HashSet::new();
    let mut st = c.prepare_cached(
        "SELECT DISTINCT user_id FROM device_list_updates WHERE stream>?1 AND stream<=?2",
    )?;
    for u in st.query_map(params![from, to], |r| r.get::<_, String>(0))? {
        let u = u?;
        if sharing.contains(&u) {
            changed.insert(u);
        }
    }
    // Membership changes in rooms the user is or was in.
    let mut st = c.prepare_cached(
        "SELECT e.room_id, e.state_key, e.json FROM events e WHERE e.stream>?1 AND e.stream<=?2 AND e.type='m.room.member'
         AND EXISTS (SELECT 1 FROM room_state s WHERE s.room_id=e.room_id AND s.type='m.room.member' AND s.state_key=?3)",
    )?;
    let rows = st
        .query_map(params![from, to, user], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (room, target, json) in rows {
        let membership = serde_json::from_str::<Value>(&json)
            .ok()
            .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned));
        let joined = membership.as_deref() == Some("join");
        if target == user {
            // The user joined or left a room: everyone in it.
            let mut st = c.prepare_cached(
                "SELECT state_key FROM room_state WHERE room_id=?1 AND type='m.room.member' AND membership='join'",
            )?;
            for m in st.query_map([&room], |r| r.get::<_, String>(0))? {
                let m = m?;
                if m == user {
                    continue;
                }
                if joined {
                    changed.insert(m);
                } else if !sharing.contains(&m) {
                    left.insert(m);
                }
            }
        } else if joined && sharing.contains(&target) {
            changed.insert(target);
        } else if !joined && !sharing.contains(&target) {
            left.insert(target);
        }
    }
    for u in &left {
        changed.remove(u);
    }
    let mut changed: Vec<String> = changed.into_iter().collect();
    let mut left: Vec<String> = left.into_iter().collect();
    changed.sort();
    left.sort();
    Ok((changed, left))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: String,
    to: String,
}

pub async fn changes(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<ChangesQuery>,
) -> MxResult<J> {
    let from = parse_token(&q.from)?;
    let to = parse_token(&q.to)?;
    let (changed, left) = hs
        .db
        .read(|c| device_list_delta(&hs.db, c, auth.user_id.as_str(), from, to))?;
    Ok(axum::Json(json!({ "changed": changed, "left": left })))
}

#[derive(Deserialize)]
pub struct SigningUpload {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

fn check_cs_key(key: &Value, user: &str, usage: &str) -> MxResult<(String, String)> {
    if key["user_id"] != user {
        return Err(MxError::invalid_param(format!(
            "{usage} key must belong to the uploading user"
        )));
    }
    if !key["usage"]
        .as_array()
        .is_some_and(|u| u.iter().any(|x| x == usage))
    {
        return Err(MxError::invalid_param(format!(
            "{usage} key must have usage {usage}"
        )));
    }
    let (id, public) =
        cs_public(key).ok_or_else(|| MxError::bad_json(format!("{usage} key has no keys")))?;
    if id != format!("ed25519:{public}") {
        return Err(MxError::invalid_param(
            "cross-signing key ids are ed25519:<public key>",
        ));
    }
    Ok((id, public))
}

pub async fn upload_signing_keys(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<SigningUpload>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    let existing = hs.db.read(|c| cross_signing_key(c, user, "master"))?;
    // The first upload needs no extra auth (MSC3967); replacing keys does.
    let replacing = match (&existing, &body.master_key) {
        (Some(old), Some(new)) => old != new,
        (Some(_), None) => body.self_signing_key.is_some() || body.user_signing_key.is_some(),
        (None, _) => false,
    };
    if replacing {
        hs.require_password(&auth, body.auth.as_ref()).await?;
    }
    let master = match &body.master_key {
        Some(m) => m.clone(),
        None => existing
            .clone()
            .ok_or_else(|| MxError::missing_param("master_key is required for the first upload"))?,
    };
    let (master_id, master_pub) = check_cs_key(&master, user, "master")?;
    for (key, usage) in [
        (&body.self_signing_key, "self_signing"),
        (&body.user_signing_key, "user_signing"),
    ] {
        if let Some(k) = key {
            check_cs_key(k, user, usage)?;
            check_signature(k, user, &master_id, &master_pub)?;
        }
    }
    hs.db.write(|w| -> rusqlite::Result<()> {
        for (key, kind) in [
            (&body.master_key, "master"),
            (&body.self_signing_key, "self_signing"),
            (&body.user_signing_key, "user_signing"),
        ] {
            if let Some(k) = key {
                w.tx.execute(
                    "INSERT INTO cross_signing_keys(user_id, key_type, json) VALUES(?1,?2,?3)
                     ON CONFLICT(user_id, key_type) DO UPDATE SET json=?3",
                    params![user, kind, k.to_string()],
                )?;
            }
        }
        mark_device_list_change(w, user)?;
        w.persist_stream()
    })?;
    hs.notify_device_change(user);
    Ok(axum::Json(json!({})))
}

pub async fn upload_signatures(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<BTreeMap<String, BTreeMap<String, Value>>>,
) -> MxResult<J> {
    let me = auth.user_id.as_str();
    let mut failures: Map<String, Value> = Map::new();
    let mut accepted: Vec<(String, String, String, String, String)> = Vec::new();
    let mut touched: HashSet<String> = HashSet::new();
    hs.db.read(|c| -> MxResult<()> {
        let ssk = cross_signing_key(c, me, "self_signing")?.and_then(|k| cs_public(&k));
        let usk = cross_signing_key(c, me, "user_signing")?.and_then(|k| cs_public(&k));
        for (target_user, keys) in &body {
            for (target_key, signed) in keys {
                let mut fail = |code: &str, msg: String| {
                    failures
                        .entry(target_user.clone())
                        .or_insert_with(|| json!({}))[target_key] =
                        json!({ "errcode": code, "error": msg });
                };
                // What is being signed, as stored.
                let stored: Option<Value> = if target_user == me {
                    match cross_signing_key(c, me, "master")? {
                        Some(m) if cs_public(&m).is_some_and(|(_, p)| &p == target_key) => Some(m),
                        _ => c
                            .query_row(
                                "SELECT json FROM device_keys WHERE user_id=?1 AND device_id=?2",
                                params![me, target_key],
                                |r| r.get::<_, String>(0),
                            )
                            .optional()?
                            .and_then(|j| serde_json::from_str(&j).ok()),
                    }
                } else {
                    cross_signing_key(c, target_user, "master")?
                        .filter(|m| cs_public(m).is_some_and(|(_, p)| &p == target_key))
                };
                let Some(stored) = stored else {
                    fail("M_NOT_FOUND", "no such key".into());
                    continue;
                };
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("signatures");
                        o.remove("unsigned");
                    }
                    v
                };
                if strip(&stored) != strip(signed) {
                    fail(
                        "M_INVALID_SIGNATURE",
                        "signed object differs from the stored key".into(),
                    );
                    continue;
                }
                let Some(sigs) = signed["signatures"][me].as_object() else {
                    fail("M_INVALID_SIGNATURE", "no signature by the uploader".into());
                    continue;
                };
                for (key_id, sig) in sigs {
                    if stored["signatures"][me][key_id] == *sig {
                        continue; // already there
                    }
                    // Which of the uploader's keys made it?
                    let signer_pub = if let Some(dev) = key_id
                        .strip_prefix("ed25519:")
                        .filter(|_| target_user == me)
                    {
                        if ssk.as_ref().is_some_and(|(id, _)| id == key_id) {
                            ssk.as_ref().map(|(_, p)| p.clone())
                        } else {
                            device_ed25519(c, me, dev)?
                        }
                    } else if target_user != me && usk.as_ref().is_some_and(|(id, _)| id == key_id)
                    {
                        usk.as_ref().map(|(_, p)| p.clone())
                    } else {
                        None
                    };
                    let Some(public) = signer_pub else {
                        fail(
                            "M_INVALID_SIGNATURE",
                            format!("unknown signing key {key_id}"),
                        );
                        continue;
                    };
                    if let Err(e) = check_signature(signed, me, key_id, &public) {
                        fail("M_INVALID_SIGNATURE", e.message);
                        continue;
                    }
                    accepted.push((
                        target_user.clone(),
                        target_key.clone(),
                        me.to_owned(),
                        key_id.clone(),
                        sig.as_str().unwrap_or_default().to_owned(),
                    ));
                    touched.insert(target_user.clone());
                }
            }
        }
        Ok(())
    })?;
    if !accepted.is_empty() {
        hs.db.write(|w| -> rusqlite::Result<()> {
            for (tu, tk, su, sk, sig) in &accepted {
                w.tx.execute(
                    "INSERT INTO key_signatures(target_user, target_key, signer_user, signer_key, signature) VALUES(?1,?2,?3,?4,?5)
                     ON CONFLICT(target_user, target_key, signer_user, signer_key) DO UPDATE SET signature=?5",
                    params![tu, tk, su, sk, sig],
                )?;
            }
            for u in &touched {
                mark_device_list_change(w, u)?;
            }
            w.persist_stream()
        })?;
        for u in &touched {
            hs.notify_device_change(u);
        }
    }
    Ok(axum::Json(json!({ "failures": failures })))
}

#[derive(Deserialize)]
pub struct ToDeviceBody {
    messages: BTreeMap<String, BTreeMap<String, Value>>,
}

pub async fn send_to_device(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((kind, txn_id)): PathArgs<(String, String)>,
    Json(body): Json<ToDeviceBody>,
) -> MxResult<J> {
    let me = auth.user_id.as_str();
    let mut recipients = Vec::new();
    let mut remote: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>> = BTreeMap::new();
    for (user, devices) in &body.messages {
        let u = UserId::parse(user)
            .map_err(|_| MxError::invalid_param(format!("invalid user id {user}")))?;
        if u.server_name() != hs.server_name {
            remote
                .entry(u.server_name().to_string())
                .or_default()
                .insert(user.clone(), devices.clone());
        } else {
            recipients.push(user.clone());
        }
    }
    let request = format!("todevice:{kind}");
    let fresh = hs.db.write(|w| -> MxResult<bool> {
        let prior: Option<String> = w
            .query_row(
                "SELECT event_id FROM txns WHERE user_id=?1 AND device_id=?2 AND request=?3 AND txn_id=?4",
                params![me, auth.device_id.as_str(), request, txn_id],
                |r| r.get(0),
            )
            .optional()?;
        if prior.is_some() {
            return Ok(false);
        }
        for (user, devices) in body.messages.iter().filter(|(u, _)| recipients.contains(u)) {
            for (device, content) in devices {
                let targets: Vec<String> = if device == "*" {
                    let mut st = w.prepare_cached("SELECT device_id FROM devices WHERE user_id=?1")?;
                    let r = st.query_map([user], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
                    r
                } else {
                    // Messages for devices that do not exist are dropped, as the spec says.
                    let exists: Option<String> = w
                        .query_row("SELECT device_id FROM devices WHERE user_id=?1 AND device_id=?2", params![user, device], |r| r.get(0))
                        .optional()?;
                    exists.into_iter().collect()
                };
                for t in targets {
                    queue_to_device(&hs, w, (user.as_str(), t.as_str()), me, &kind, &content.to_string())?;
                }
            }
        }
        w.tx.execute(
            "INSERT INTO txns(user_id, device_id, txn_id, request, event_id) VALUES(?1,?2,?3,?4,'')",
            params![me, auth.device_id.as_str(), txn_id, request],
        )?;
        Ok(true)
    })?;
    if fresh {
        hs.notify_users(recipients.iter().map(String::as_str));
        // Other servers get an `m.direct_to_device` EDU each, through the federation queue.
        for (server, messages) in remote {
            let edu = json!({ "edu_type": "m.direct_to_device", "content": {
                "sender": me, "type": kind, "message_id": crate::random_string(16), "messages": messages,
            }});
            crate::federation::enqueue_server_edu(&hs, &server, edu)?;
        }
    }
    Ok(axum::Json(json!({})))
}

/// Acknowledges to-device messages up to `acked` and returns the next batch for
/// the device with the highest id handed out.
/// What this process knows of each device's to-device queue, so that the
/// syncs with nothing new (nearly all of them) skip its queries.
#[derive(Default)]
pub struct ToDeviceHints {
    inner: std::sync::Mutex<ToDeviceInner>,
}

#[derive(Default)]
struct ToDeviceInner {
    /// Highest queue id when this process first looked.
    startup_max: Option<i64>,
    /// Highest id queued for a device since (recorded before commit).
    newest: std::collections::HashMap<(String, String), i64>,
    /// Acknowledged ids already deleted for a device.
    deleted_upto: std::collections::HashMap<(String, String), i64>,
}

/// Queues one to-device message (every producer goes through here, so the
/// hints above never miss a message).
pub(crate) fn queue_to_device(
    hs: &Hs,
    w: &crate::db::WriteTxn<'_>,
    (user, device): (&str, &str),
    sender: &str,
    kind: &str,
    content: &str,
) -> rusqlite::Result<()> {
    w.tx.execute(
        "INSERT INTO to_device(user_id, device_id, sender, type, content) VALUES(?1,?2,?3,?4,?5)",
        params![user, device, sender, kind, content],
    )?;
    let id = w.tx.last_insert_rowid();
    let mut h = hs
        .to_device_hints
        .inner
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let e = h
        .newest
        .entry((user.to_owned(), device.to_owned()))
        .or_insert(id);
    *e = (*e).max(id);
    Ok(())
}

/// Deletes the messages a sync token acknowledged (if any are left).
fn take_acked(hs: &Hs, user: &str, device: &str, acked: i64) -> MxResult<()> {
    let pending_ack = hs.db.read(|c| {
        c.query_row(
            "SELECT 1 FROM to_device WHERE user_id=?1 AND device_id=?2 AND id<=?3 LIMIT 1",
            params![user, device, acked],
            |_| Ok(()),
        )
        .optional()
    })?;
    if pending_ack.is_some() {
        hs.db.write(|w| {
            w.tx.execute(
                "DELETE FROM to_device WHERE user_id=?1 AND device_id=?2 AND id<=?3",
                params![user, device, acked],
            )
        })?;
    }
    Ok(())
}

pub fn take_to_device(
    hs: &Hs,
    user: &str,
    device: &str,
    acked: i64,
    limit: i64,
) -> MxResult<(Vec<Value>, i64)> {
    let key = (user.to_owned(), device.to_owned());
    let startup_max = {
        let known = hs
            .to_device_hints
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .startup_max;
        match known {
            Some(m) => m,
            None => {
                let m: i64 = hs.db.read(|c| {
                    c.query_row("SELECT COALESCE(MAX(id),0) FROM to_device", [], |r| {
                        r.get(0)
                    })
                })?;
                let mut h = hs
                    .to_device_hints
                    .inner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *h.startup_max.get_or_insert(m)
            }
        }
    };
    let (newest, deleted) = {
        let h = hs
            .to_device_hints
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (
            h.newest.get(&key).copied().unwrap_or(0).max(startup_max),
            h.deleted_upto.get(&key).copied().unwrap_or(0),
        )
    };
    if acked > deleted {
        take_acked(hs, user, device, acked)?;
        hs.to_device_hints
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deleted_upto
            .entry(key)
            .and_modify(|d| *d = (*d).max(acked))
            .or_insert(acked);
    }
    if acked >= newest {
        return Ok((Vec::new(), acked));
    }
    hs.db.read(|c| -> MxResult<(Vec<Value>, i64)> {
        let mut st = c.prepare_cached(
            "SELECT id, sender, type, content FROM to_device WHERE user_id=?1 AND device_id=?2 AND id>?3 ORDER BY id LIMIT ?4",
        )?;
        let mut last = acked;
        let mut out = Vec::new();
        for row in st.query_map(params![user, device, acked, limit], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })? {
            let (id, sender, kind, content) = row?;
            last = id;
            out.push(json!({ "sender": sender, "type": kind, "content": serde_json::from_str::<Value>(&content)? }));
        }
        Ok((out, last))
    })
}
