//! Per-room facts every message needs — the members with their display names
//! (push rules), whose syncs to wake, the power levels (push rules) — kept in
//! memory until the room's state changes.
//!
//! Validity works by stream position: every write that changes a room's
//! current state reports the position of the change ([`RoomInfoCache::state_changed`],
//! called inside the write transaction, before commit). An entry is used only
//! if it was built from a database view at or after the latest change. An
//! entry built before the change commits is thus never trusted, and a change
//! that rolls back only costs a few extra rebuilds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::push::PushConditionPowerLevelsCtx;
use rusqlite::Connection;
use serde_json::Value;

use crate::{error::MxResult, Hs};

/// What the cache holds for one room.
pub struct RoomInfo {
    /// Joined members and their display names.
    pub joined: HashMap<String, Option<String>>,
    /// Joined, invited and knocking users: whose syncs a new event wakes.
    pub wake: Vec<String>,
    /// Power levels as push rules see them (`None` for an unknown room version).
    pub power: Option<PushConditionPowerLevelsCtx>,
}

#[derive(Default)]
struct Slot {
    /// Stream position of the newest state change reported.
    changed: i64,
    /// The info and the committed position its view included.
    info: Option<(i64, Arc<RoomInfo>)>,
}

/// Rooms kept before the cache starts over.
const MAX_ROOMS: usize = 10_000;

#[derive(Default)]
pub struct RoomInfoCache {
    map: Mutex<HashMap<String, Slot>>,
}

impl RoomInfoCache {
    /// Called by every write that changes the room's current state, with the
    /// stream position of that change.
    pub fn state_changed(&self, room: &str, stream: i64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map.entry(room.to_owned()).or_default();
        slot.changed = slot.changed.max(stream);
    }

    /// The room's info. `c` must see at least everything committed when this
    /// is called (a plain read connection, or the writer's transaction).
    pub fn get(&self, hs: &Hs, c: &Connection, room: &str) -> MxResult<Arc<RoomInfo>> {
        let upto = hs.db.current_stream();
        if let Some(slot) = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(room) {
            if let Some((built, info)) = &slot.info {
                if *built >= slot.changed {
                    return Ok(info.clone());
                }
            }
        }
        let info = Arc::new(load(c, room)?);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ROOMS && !map.contains_key(room) {
            map.clear();
        }
        let slot = map.entry(room.to_owned()).or_default();
        if slot.info.as_ref().is_none_or(|(built, _)| *built <= upto) {
            slot.info = Some((upto, info.clone()));
        }
        Ok(info)
    }
}

fn load(c: &Connection, room: &str) -> MxResult<RoomInfo> {
    let mut joined = HashMap::new();
    let mut wake = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT s.state_key, s.membership, e.json FROM room_state s JOIN events e ON e.event_id=s.event_id
         WHERE s.room_id=?1 AND s.type='m.room.member' AND s.membership IN ('join','invite','knock')",
    )?;
    let rows = st.query_map([room], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (user, membership, json) = row?;
        if membership == "join" {
            let name = serde_json::from_str::<Value>(&json)
                .ok()
                .and_then(|v| v["content"]["displayname"].as_str().map(str::to_owned));
            joined.insert(user.clone(), name);
        }
        wake.push(user);
    }
    Ok(RoomInfo {
        joined,
        wake,
        power: crate::push::power_ctx(c, room)?,
    })
}
