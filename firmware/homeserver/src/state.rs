//! Room state at every point of the event graph, and state resolution v2.
//!
//! Each timeline event records the state group before and after it. A group
//! is a delta (changed keys, `NULL` for a key that is gone) over a parent
//! group, with a full snapshot every [`SNAPSHOT_EVERY`] steps so loading a
//! group reads a bounded chain. `room_state` stays the materialised current
//! state that everything else reads; `room_current_group` says which group it
//! is. When the graph forks (events from other servers made while a link was
//! down), the current state is the resolution (ruma's state resolution v2)
//! of the states at the forward extremities, cached per set of groups.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
};

use ruma::{
    events::StateEventType,
    room_version_rules::RoomVersionRules,
    state_res::{utils::event_id_set::EventIdSet, StateMap},
    EventId, OwnedEventId,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::{
    db::{UserRows, WriteTxn},
    error::{MxError, MxResult},
    pdu::{self, Pdu},
    Hs,
};

/// Deltas between full snapshots.
const SNAPSHOT_EVERY: i64 = 100;

/// `(type, state_key)`.
pub(crate) type Key = (String, String);
/// A room state: key → event id.
pub(crate) type StateIds = HashMap<Key, String>;

/// The group the room's current state (`room_state`) is, if recorded.
pub(crate) fn current_group(c: &Connection, room: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT grp FROM room_current_group WHERE room_id=?1")?
        .query_row([room], |r| r.get(0))
        .optional()
}

pub(crate) fn set_current_group(c: &Connection, room: &str, grp: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO room_current_group(room_id, grp) VALUES(?1,?2)
         ON CONFLICT(room_id) DO UPDATE SET grp=?2",
    )?
    .execute(params![room, grp])?;
    Ok(())
}

/// Forgets which group the current state is (after `room_state` was written
/// from outside the graph, e.g. the state handed over by a remote join): the
/// next timeline event snapshots `room_state` afresh.
pub(crate) fn forget_current(c: &Connection, room: &str) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM room_current_group WHERE room_id=?1")?
        .execute([room])?;
    Ok(())
}

/// The current group, snapshotting `room_state` into a new full group when
/// none is recorded (rooms from before state groups, or after a remote join).
pub(crate) fn ensure_current_group(c: &Connection, room: &str) -> rusqlite::Result<i64> {
    if let Some(g) = current_group(c, room)? {
        return Ok(g);
    }
    let mut st =
        c.prepare_cached("SELECT type, state_key, event_id FROM room_state WHERE room_id=?1")?;
    let state: StateIds = st
        .query_map([room], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let g = write_group(c, room, None, 0, state.iter().map(|(k, v)| (k, Some(v))))?;
    set_current_group(c, room, g)?;
    Ok(g)
}

/// A new group holding exactly `state` (a full snapshot).
pub(crate) fn snapshot_group(
    c: &Connection,
    room: &str,
    state: &StateIds,
) -> rusqlite::Result<i64> {
    write_group(c, room, None, 0, state.iter().map(|(k, v)| (k, Some(v))))
}

fn write_group<'a>(
    c: &Connection,
    room: &str,
    parent: Option<i64>,
    depth: i64,
    entries: impl Iterator<Item = (&'a Key, Option<&'a String>)>,
) -> rusqlite::Result<i64> {
    c.prepare_cached("INSERT INTO state_groups(room_id, parent, depth) VALUES(?1,?2,?3)")?
        .execute(params![room, parent, depth])?;
    let g = c.last_insert_rowid();
    let mut st = c.prepare_cached(
        "INSERT OR REPLACE INTO state_group_entries(grp, type, state_key, event_id) VALUES(?1,?2,?3,?4)",
    )?;
    for ((t, k), e) in entries {
        st.execute(params![g, t, k, e])?;
    }
    Ok(g)
}

/// A new group: `parent` with `delta` applied (`None` removes a key).
pub(crate) fn child_group(
    c: &Connection,
    room: &str,
    parent: i64,
    delta: &[(Key, Option<String>)],
) -> rusqlite::Result<i64> {
    let depth: i64 = c
        .prepare_cached("SELECT depth FROM state_groups WHERE id=?1")?
        .query_row([parent], |r| r.get(0))?;
    if depth + 1 >= SNAPSHOT_EVERY {
        let mut full = load_group(c, parent)?;
        for (k, v) in delta {
            match v {
                Some(v) => full.insert(k.clone(), v.clone()),
                None => full.remove(k),
            };
        }
        return write_group(c, room, None, 0, full.iter().map(|(k, v)| (k, Some(v))));
    }
    write_group(
        c,
        room,
        Some(parent),
        depth + 1,
        delta.iter().map(|(k, v)| (k, v.as_ref())),
    )
}

/// The changes that turn `from` into `to`.
pub(crate) fn diff(from: &StateIds, to: &StateIds) -> Vec<(Key, Option<String>)> {
    let mut out: Vec<(Key, Option<String>)> = to
        .iter()
        .filter(|(k, v)| from.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    out.extend(
        from.keys()
            .filter(|k| !to.contains_key(*k))
            .map(|k| (k.clone(), None)),
    );
    out
}

/// The whole state of a group.
pub(crate) fn load_group(c: &Connection, grp: i64) -> rusqlite::Result<StateIds> {
    let mut chain = vec![grp];
    let mut at = grp;
    while let Some(p) = c
        .prepare_cached("SELECT parent FROM state_groups WHERE id=?1")?
        .query_row([at], |r| r.get::<_, Option<i64>>(0))
        .optional()?
        .flatten()
    {
        chain.push(p);
        at = p;
        if chain.len() as i64 > SNAPSHOT_EVERY + 1 {
            break; // cannot happen; bounded all the same
        }
    }
    let mut state = StateIds::new();
    let mut st =
        c.prepare_cached("SELECT type, state_key, event_id FROM state_group_entries WHERE grp=?1")?;
    for g in chain.iter().rev() {
        let rows = st.query_map([g], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        for row in rows {
            let (k, e) = row?;
            match e {
                Some(e) => state.insert(k, e),
                None => state.remove(&k),
            };
        }
    }
    Ok(state)
}

/// The state groups before and after an event, if it is in the graph.
pub(crate) fn event_groups(c: &Connection, event: &str) -> rusqlite::Result<Option<(i64, i64)>> {
    c.prepare_cached(
        "SELECT state_before, state_after FROM events WHERE event_id=?1 AND state_after IS NOT NULL",
    )?
    .query_row([event], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
}

/// Records an event in the graph with the state before it; returns the group after it.
pub(crate) fn record_event(
    c: &Connection,
    room: &str,
    pdu: &Pdu,
    before: i64,
) -> rusqlite::Result<i64> {
    let after = match &pdu.state_key {
        Some(k) => child_group(
            c,
            room,
            before,
            &[(
                (pdu.kind.to_string(), k.clone()),
                Some(pdu.event_id.to_string()),
            )],
        )?,
        None => before,
    };
    // Every caller has stored the event's row first.
    let changed = c
        .prepare_cached("UPDATE events SET state_before=?2, state_after=?3 WHERE event_id=?1")?
        .execute(params![pdu.event_id.as_str(), before, after])?;
    if changed == 0 {
        return Err(rusqlite::Error::QueryReturnedNoRows);
    }
    Ok(after)
}

/// Marks an event as rejected by the auth rules (it stays stored, as an
/// outlier, so events that cite it are rejected too).
pub(crate) fn mark_rejected(c: &Connection, event: &str, reason: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT OR IGNORE INTO rejected_events(event_id, reason) VALUES(?1,?2)")?
        .execute(params![event, reason])?;
    Ok(())
}

/// Marks an event as soft-failed (allowed by the state before it, not by the
/// current state): in the graph, never shown to clients.
pub(crate) fn mark_soft_failed(c: &Connection, event: &str, reason: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT OR IGNORE INTO soft_failed_events(event_id, reason) VALUES(?1,?2)")?
        .execute(params![event, reason])?;
    Ok(())
}

/// Whether an event was rejected by the auth rules when it was received.
pub(crate) fn is_rejected(c: &Connection, event: &str) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT EXISTS(SELECT 1 FROM rejected_events WHERE event_id=?1)")?
        .query_row([event], |r| r.get(0))
}

/// Whether an event was rejected or soft-failed (clients never see it).
pub(crate) fn hidden_from_clients(c: &Connection, event: &str) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM rejected_events WHERE event_id=?1)
             OR EXISTS(SELECT 1 FROM soft_failed_events WHERE event_id=?1)",
    )?
    .query_row([event], |r| r.get(0))
}

/// The state before an event whose `prev_events` are given: the state after
/// the one prev event, or the resolution of the states after each of them.
/// `None` when none of the prev events is in the graph here.
pub(crate) fn state_before(
    c: &Connection,
    room: &str,
    rules: &RoomVersionRules,
    prevs: &[OwnedEventId],
) -> MxResult<Option<i64>> {
    let mut groups: Vec<i64> = Vec::new();
    for p in prevs {
        if let Some((_, after)) = event_groups(c, p.as_str())? {
            groups.push(after);
        }
    }
    resolve_groups(c, room, rules, groups)
}

/// One group for the resolution of several (the group itself when they agree).
pub(crate) fn resolve_groups(
    c: &Connection,
    room: &str,
    rules: &RoomVersionRules,
    mut groups: Vec<i64>,
) -> MxResult<Option<i64>> {
    groups.sort_unstable();
    groups.dedup();
    match groups.len() {
        0 => return Ok(None),
        1 => return Ok(Some(groups[0])),
        _ => {}
    }
    let key = groups
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if let Some(g) = c
        .prepare_cached("SELECT grp FROM state_resolutions WHERE inputs=?1")?
        .query_row([&key], |r| r.get(0))
        .optional()?
    {
        return Ok(Some(g));
    }
    let states = groups
        .iter()
        .map(|g| load_group(c, *g))
        .collect::<Result<Vec<_>, _>>()?;
    let resolved = resolve(c, rules, &states)?;
    // Stored as a delta over the first input, whose state is already at hand.
    let g = child_group(c, room, groups[0], &diff(&states[0], &resolved))?;
    c.prepare_cached("INSERT OR REPLACE INTO state_resolutions(inputs, grp) VALUES(?1,?2)")?
        .execute(params![key, g])?;
    Ok(Some(g))
}

/// State resolution v2 (ruma's) over several room states.
pub(crate) fn resolve(
    c: &Connection,
    rules: &RoomVersionRules,
    states: &[StateIds],
) -> MxResult<StateIds> {
    let v2 = rules
        .state_res
        .v2_rules()
        .ok_or_else(|| MxError::unknown("room version without state resolution v2"))?;
    let cache: RefCell<HashMap<String, Option<Pdu>>> = RefCell::new(HashMap::new());
    let fetch = |id: &str| -> Option<Pdu> {
        if let Some(hit) = cache.borrow().get(id) {
            return hit.clone();
        }
        let p = pdu::load_pdu(c, id);
        cache.borrow_mut().insert(id.to_owned(), p.clone());
        p
    };
    let maps: Vec<StateMap<OwnedEventId>> = states
        .iter()
        .map(|s| {
            s.iter()
                .filter_map(|((t, k), e)| {
                    Some((
                        (StateEventType::from(t.as_str()), k.clone()),
                        EventId::parse(e).ok()?,
                    ))
                })
                .collect()
        })
        .collect();
    let chains: Vec<EventIdSet<OwnedEventId>> = states
        .iter()
        .map(|s| {
            auth_chain(&fetch, s.values().cloned())
                .into_iter()
                .filter_map(|e| EventId::parse(&e).ok())
                .collect()
        })
        .collect();
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        v2,
        maps.iter(),
        chains,
        |id: &EventId| fetch(id.as_str()),
        |conflicted: &StateMap<Vec<OwnedEventId>>| {
            let starts: Vec<String> = conflicted
                .values()
                .flatten()
                .map(|e| e.to_string())
                .collect();
            Some(
                conflicted_subgraph(&fetch, &starts)
                    .into_iter()
                    .filter_map(|e| EventId::parse(&e).ok())
                    .collect(),
            )
        },
    )
    .map_err(|e| MxError::unknown(format!("state resolution failed: {e}")))?;
    Ok(resolved
        .into_iter()
        .map(|((t, k), e)| ((t.to_string(), k), e.to_string()))
        .collect())
}

/// Every event reachable through `auth_events` from `start` (bounded).
fn auth_chain(
    fetch: &impl Fn(&str) -> Option<Pdu>,
    start: impl IntoIterator<Item = String>,
) -> HashSet<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: Vec<String> = start.into_iter().collect();
    while let Some(id) = queue.pop() {
        if seen.len() > 100_000 {
            break;
        }
        let Some(p) = fetch(&id) else { continue };
        for a in p.auth_events {
            if seen.insert(a.to_string()) {
                queue.push(a.to_string());
            }
        }
    }
    seen
}

/// The conflicted state subgraph (room version 12): the events on auth-event
/// paths from one conflicted event to another, the conflicted events included.
fn conflicted_subgraph(fetch: &impl Fn(&str) -> Option<Pdu>, conflicted: &[String]) -> Vec<String> {
    let targets: HashSet<&str> = conflicted.iter().map(String::as_str).collect();
    // Whether each visited event leads (through auth events) to a conflicted
    // one; depth first without recursion (auth chains can be long).
    let mut leads: HashMap<String, bool> = HashMap::new();
    let mut stack: Vec<(String, bool)> = conflicted.iter().map(|c| (c.clone(), false)).collect();
    let mut budget = 100_000usize;
    while let Some((id, done)) = stack.pop() {
        let auth = fetch(&id).map(|p| p.auth_events).unwrap_or_default();
        if done {
            let any = auth
                .iter()
                .any(|a| targets.contains(a.as_str()) || leads.get(a.as_str()) == Some(&true));
            leads.insert(id, any);
            continue;
        }
        if leads.contains_key(&id) || budget == 0 {
            continue;
        }
        budget -= 1;
        leads.insert(id.clone(), false);
        stack.push((id, true));
        for a in auth {
            if !leads.contains_key(a.as_str()) {
                stack.push((a.to_string(), false));
            }
        }
    }
    leads
        .into_iter()
        .filter(|(id, l)| *l || targets.contains(id.as_str()))
        .map(|(id, _)| id)
        .collect()
}

impl Hs {
    /// Makes the room's current state the resolution of the states at its
    /// forward extremities, rewriting `room_state` where it changes.
    pub(crate) fn refresh_current_state(
        &self,
        w: &mut WriteTxn<'_>,
        room: &str,
        rules: &RoomVersionRules,
    ) -> MxResult<()> {
        let mut st = w.prepare_cached(
            "SELECT e.state_after FROM forward_extremities f JOIN events e ON e.event_id=f.event_id
             WHERE f.room_id=?1 AND e.state_after IS NOT NULL",
        )?;
        let groups: Vec<i64> = st
            .query_map([room], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        drop(st);
        let Some(target) = resolve_groups(w, room, rules, groups)? else {
            return Ok(());
        };
        let current = ensure_current_group(w, room)?;
        if target == current {
            return Ok(());
        }
        let from = load_group(w, current)?;
        let to = load_group(w, target)?;
        let changes = diff(&from, &to);
        if !changes.is_empty() {
            let stream = w.next_stream();
            for ((t, k), e) in &changes {
                match e {
                    Some(e) => {
                        let membership = (t == "m.room.member")
                            .then(|| pdu::get_event(w, e).ok().flatten())
                            .flatten()
                            .and_then(|ev| serde_json::from_str::<Value>(&ev.json).ok())
                            .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned));
                        w.execute(
                            "INSERT INTO room_state(room_id, type, state_key, event_id, stream, membership) VALUES(?1,?2,?3,?4,?5,?6)
                             ON CONFLICT(room_id, type, state_key) DO UPDATE SET event_id=?4, stream=?5, membership=?6",
                            params![room, t, k, e, stream, membership],
                        )?;
                    }
                    None => {
                        w.execute(
                            "DELETE FROM room_state WHERE room_id=?1 AND type=?2 AND state_key=?3",
                            params![room, t, k],
                        )?;
                    }
                }
            }
            self.room_info.state_changed(room, stream);
            // Syncs skip rooms the hints call unchanged: this room changed, and
            // without an event of its own (see `sync::build`).
            w.note(UserRows::Room, room, stream);
            w.note(UserRows::StateRewritten, room, stream);
            if changes.iter().any(|((t, _), _)| t == "m.room.member") {
                w.note(UserRows::Membership, "", stream);
            }
            tracing::info!(
                room,
                changed = changes.len(),
                "room state resolved across a fork"
            );
        }
        set_current_group(w, room, target)?;
        Ok(())
    }
}
