//! Server-side key backup (`/room_keys`): encrypted room keys the server only stores.

use std::{collections::BTreeMap, sync::Arc};

use axum::extract::State;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::{MxError, MxResult},
    extract::{Auth, Json, PathArgs, QueryArgs},
    rooms::parse_room,
    Hs,
};

type J = axum::Json<Value>;

/// Latest live backup version of a user.
fn current_version(c: &Connection, user: &str) -> rusqlite::Result<Option<i64>> {
    c.query_row(
        "SELECT MAX(version) FROM backup_versions WHERE user_id=?1 AND deleted=0",
        [user],
        |r| r.get(0),
    )
}

fn version_info(c: &Connection, user: &str, version: i64) -> MxResult<Value> {
    let row: Option<(String, String, i64)> = c
        .query_row(
            "SELECT algorithm, auth_data, etag FROM backup_versions WHERE user_id=?1 AND version=?2 AND deleted=0",
            params![user, version],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (algorithm, auth_data, etag) =
        row.ok_or_else(|| MxError::not_found("Unknown backup version"))?;
    let count: i64 = c.query_row(
        "SELECT COUNT(*) FROM backup_keys WHERE user_id=?1 AND version=?2",
        params![user, version],
        |r| r.get(0),
    )?;
    Ok(json!({
        "algorithm": algorithm,
        "auth_data": serde_json::from_str::<Value>(&auth_data)?,
        "count": count,
        "etag": etag.to_string(),
        "version": version.to_string(),
    }))
}

fn parse_version(v: &str) -> MxResult<i64> {
    v.parse()
        .map_err(|_| MxError::not_found("Unknown backup version"))
}

#[derive(Deserialize)]
pub struct VersionBody {
    algorithm: String,
    auth_data: Value,
    version: Option<String>,
}

pub async fn create_version(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<VersionBody>,
) -> MxResult<J> {
    if !body.auth_data.is_object() {
        return Err(MxError::bad_json("auth_data must be an object"));
    }
    let user = auth.user_id.as_str();
    let version = hs.db.write(|w| -> rusqlite::Result<i64> {
        let next: i64 = w.query_row(
            "SELECT COALESCE(MAX(version),0)+1 FROM backup_versions WHERE user_id=?1",
            [user],
            |r| r.get(0),
        )?;
        w.tx.execute(
            "INSERT INTO backup_versions(user_id, version, algorithm, auth_data) VALUES(?1,?2,?3,?4)",
            params![user, next, body.algorithm, body.auth_data.to_string()],
        )?;
        Ok(next)
    })?;
    Ok(axum::Json(json!({ "version": version.to_string() })))
}

pub async fn get_current_version(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let user = auth.user_id.as_str();
    hs.db.read(|c| {
        let v = current_version(c, user)?
            .ok_or_else(|| MxError::not_found("No current backup version"))?;
        version_info(c, user, v).map(axum::Json)
    })
}

pub async fn get_version(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(version): PathArgs<String>,
) -> MxResult<J> {
    let v = parse_version(&version)?;
    hs.db
        .read(|c| version_info(c, auth.user_id.as_str(), v).map(axum::Json))
}

pub async fn update_version(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(version): PathArgs<String>,
    Json(body): Json<VersionBody>,
) -> MxResult<J> {
    let v = parse_version(&version)?;
    if body.version.as_deref().is_some_and(|bv| bv != version) {
        return Err(MxError::invalid_param(
            "version in body does not match the path",
        ));
    }
    let user = auth.user_id.as_str();
    hs.db.write(|w| -> MxResult<()> {
        let alg: Option<String> = w
            .query_row(
                "SELECT algorithm FROM backup_versions WHERE user_id=?1 AND version=?2 AND deleted=0",
                params![user, v],
                |r| r.get(0),
            )
            .optional()?;
        match alg {
            None => Err(MxError::not_found("Unknown backup version")),
            Some(a) if a != body.algorithm => Err(MxError::invalid_param("algorithm cannot change")),
            Some(_) => {
                w.tx.execute(
                    "UPDATE backup_versions SET auth_data=?1 WHERE user_id=?2 AND version=?3",
                    params![body.auth_data.to_string(), user, v],
                )?;
                Ok(())
            }
        }
    })?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_version(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(version): PathArgs<String>,
) -> MxResult<J> {
    let v = parse_version(&version)?;
    let user = auth.user_id.as_str();
    let n = hs.db.write(|w| -> rusqlite::Result<usize> {
        w.tx.execute(
            "DELETE FROM backup_keys WHERE user_id=?1 AND version=?2",
            params![user, v],
        )?;
        w.tx.execute(
            "UPDATE backup_versions SET deleted=1 WHERE user_id=?1 AND version=?2 AND deleted=0",
            params![user, v],
        )
    })?;
    if n == 0 {
        return Err(MxError::not_found("Unknown backup version"));
    }
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: String,
}

/// Checks `version` is the current one (uploads go only to the current version).
fn check_current(c: &Connection, user: &str, version: &str, for_write: bool) -> MxResult<i64> {
    let v = parse_version(version)?;
    let current = current_version(c, user)?;
    if for_write && current != Some(v) {
        let mut e = MxError::new(
            http::StatusCode::FORBIDDEN,
            "M_WRONG_ROOM_KEYS_VERSION",
            "Wrong backup version",
        );
        if let Some(cur) = current {
            e = e.with_extra("current_version", json!(cur.to_string()));
        }
        return Err(e);
    }
    let exists: Option<i64> = c
        .query_row(
            "SELECT 1 FROM backup_versions WHERE user_id=?1 AND version=?2 AND deleted=0",
            params![user, v],
            |r| r.get(0),
        )
        .optional()?;
    exists
        .map(|_| v)
        .ok_or_else(|| MxError::not_found("Unknown backup version"))
}

/// Whether `new` should replace `old` (the spec's preference order).
fn better(new: &Value, old: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    if verified(new) != verified(old) {
        return verified(new);
    }
    let idx = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    if idx(new) != idx(old) {
        return idx(new) < idx(old);
    }
    new["forwarded_count"].as_u64().unwrap_or(u64::MAX)
        < old["forwarded_count"].as_u64().unwrap_or(u64::MAX)
}

fn valid_session(v: &Value) -> MxResult<()> {
    if v["first_message_index"].is_u64()
        && v["forwarded_count"].is_u64()
        && v["is_verified"].is_boolean()
        && v["session_data"].is_object()
    {
        Ok(())
    } else {
        Err(MxError::bad_json("KeyBackupData needs first_message_index, forwarded_count, is_verified and session_data"))
    }
}

fn store_keys(
    hs: &Hs,
    user: &str,
    version: &str,
    rooms: BTreeMap<String, BTreeMap<String, Value>>,
) -> MxResult<J> {
    for (room, sessions) in &rooms {
        parse_room(room)?;
        for s in sessions.values() {
            valid_session(s)?;
        }
    }
    let out = hs.db.write(|w| -> MxResult<Value> {
        let v = check_current(w, user, version, true)?;
        let mut changed = false;
        for (room, sessions) in &rooms {
            for (session, data) in sessions {
                let old: Option<String> = w
                    .query_row(
                        "SELECT json FROM backup_keys WHERE user_id=?1 AND version=?2 AND room_id=?3 AND session_id=?4",
                        params![user, v, room, session],
                        |r| r.get(0),
                    )
                    .optional()?;
                let replace = match &old {
                    None => true,
                    Some(o) => better(data, &serde_json::from_str(o)?),
                };
                if replace {
                    w.tx.execute(
                        "INSERT INTO backup_keys(user_id, version, room_id, session_id, json) VALUES(?1,?2,?3,?4,?5)
                         ON CONFLICT(user_id, version, room_id, session_id) DO UPDATE SET json=?5",
                        params![user, v, room, session, data.to_string()],
                    )?;
                    changed = true;
                }
            }
        }
        if changed {
            w.tx.execute("UPDATE backup_versions SET etag=etag+1 WHERE user_id=?1 AND version=?2", params![user, v])?;
        }
        let info = version_info(w, user, v)?;
        Ok(json!({ "count": info["count"], "etag": info["etag"] }))
    })?;
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct RoomsBody {
    rooms: BTreeMap<String, RoomSessions>,
}

#[derive(Deserialize)]
pub struct RoomSessions {
    sessions: BTreeMap<String, Value>,
}

pub async fn put_all(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<VersionQuery>,
    Json(b): Json<RoomsBody>,
) -> MxResult<J> {
    let rooms = b.rooms.into_iter().map(|(r, s)| (r, s.sessions)).collect();
    store_keys(&hs, auth.user_id.as_str(), &q.version, rooms)
}

pub async fn put_room(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<VersionQuery>,
    Json(b): Json<RoomSessions>,
) -> MxResult<J> {
    store_keys(
        &hs,
        auth.user_id.as_str(),
        &q.version,
        BTreeMap::from([(room, b.sessions)]),
    )
}

pub async fn put_session(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, session)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<VersionQuery>,
    Json(b): Json<Value>,
) -> MxResult<J> {
    store_keys(
        &hs,
        auth.user_id.as_str(),
        &q.version,
        BTreeMap::from([(room, BTreeMap::from([(session, b)]))]),
    )
}

fn load_keys(
    c: &Connection,
    user: &str,
    v: i64,
    room: Option<&str>,
    session: Option<&str>,
) -> MxResult<Map<String, Value>> {
    let mut st = c.prepare_cached(
        "SELECT room_id, session_id, json FROM backup_keys WHERE user_id=?1 AND version=?2
         AND (?3 IS NULL OR room_id=?3) AND (?4 IS NULL OR session_id=?4)",
    )?;
    let mut rooms: Map<String, Value> = Map::new();
    for row in st.query_map(params![user, v, room, session], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })? {
        let (r, s, j) = row?;
        rooms.entry(r).or_insert_with(|| json!({ "sessions": {} }))["sessions"][&s] =
            serde_json::from_str(&j)?;
    }
    Ok(rooms)
}

pub async fn get_all(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    hs.db.read(|c| {
        let v = check_current(c, user, &q.version, false)?;
        Ok(axum::Json(
            json!({ "rooms": load_keys(c, user, v, None, None)? }),
        ))
    })
}

pub async fn get_room(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    hs.db.read(|c| {
        let v = check_current(c, user, &q.version, false)?;
        let rooms = load_keys(c, user, v, Some(&room), None)?;
        Ok(axum::Json(
            rooms
                .get(&room)
                .cloned()
                .unwrap_or_else(|| json!({ "sessions": {} })),
        ))
    })
}

pub async fn get_session(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, session)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    let user = auth.user_id.as_str();
    hs.db.read(|c| {
        let v = check_current(c, user, &q.version, false)?;
        let rooms = load_keys(c, user, v, Some(&room), Some(&session))?;
        rooms
            .get(&room)
            .and_then(|r| r["sessions"].get(&session).cloned())
            .map(axum::Json)
            .ok_or_else(|| MxError::not_found("No such session in the backup"))
    })
}

fn delete_keys(
    hs: &Hs,
    user: &str,
    version: &str,
    room: Option<&str>,
    session: Option<&str>,
) -> MxResult<J> {
    let out = hs.db.write(|w| -> MxResult<Value> {
        let v = check_current(w, user, version, false)?;
        let n = w.tx.execute(
            "DELETE FROM backup_keys WHERE user_id=?1 AND version=?2 AND (?3 IS NULL OR room_id=?3) AND (?4 IS NULL OR session_id=?4)",
            params![user, v, room, session],
        )?;
        if n > 0 {
            w.tx.execute("UPDATE backup_versions SET etag=etag+1 WHERE user_id=?1 AND version=?2", params![user, v])?;
        }
        let info = version_info(w, user, v)?;
        Ok(json!({ "count": info["count"], "etag": info["etag"] }))
    })?;
    Ok(axum::Json(out))
}

pub async fn delete_all(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    delete_keys(&hs, auth.user_id.as_str(), &q.version, None, None)
}

pub async fn delete_room(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    delete_keys(&hs, auth.user_id.as_str(), &q.version, Some(&room), None)
}

pub async fn delete_session(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((room, session)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<VersionQuery>,
) -> MxResult<J> {
    delete_keys(
        &hs,
        auth.user_id.as_str(),
        &q.version,
        Some(&room),
        Some(&session),
    )
}
