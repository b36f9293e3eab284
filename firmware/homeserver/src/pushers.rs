//! Delivery of notifications to HTTP pushers (push gateways, spec "Push Gateway
//! API"). A box that is offline keeps a bounded queue per pusher and retries with
//! back-off; nothing is sent for users who configured no pusher.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use rusqlite::{params, Connection};
use serde_json::{json, Value};

use crate::{db::WriteTxn, now_ms, pdu, Hs};

/// Notifications kept per pusher while its gateway is unreachable.
const MAX_QUEUED_PER_PUSHER: i64 = 100;
/// Longest wait between attempts.
const MAX_BACKOFF_MS: i64 = 3600 * 1000;

/// Users who have at least one HTTP pusher (so most events cost nothing here).
#[derive(Default)]
pub struct PusherUsers {
    set: Mutex<Option<HashSet<String>>>,
}

impl PusherUsers {
    fn contains(&self, c: &Connection, user: &str) -> rusqlite::Result<bool> {
        let mut guard = self.set.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let mut st = c.prepare(
                "SELECT DISTINCT user_id FROM pushers WHERE json LIKE '%\"kind\":\"http\"%'",
            )?;
            let users = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<HashSet<_>, _>>()?;
            *guard = Some(users);
        }
        Ok(guard.as_ref().is_some_and(|s| s.contains(user)))
    }

    /// Forgets the cached set (after pushers changed).
    pub fn invalidate(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Queues the notification of `user` about `event_id` for each of their HTTP pushers.
pub fn enqueue(
    hs: &Hs,
    w: &WriteTxn<'_>,
    user: &str,
    room_id: &str,
    event_id: &str,
) -> rusqlite::Result<bool> {
    if !hs.pusher_users.contains(w, user)? {
        return Ok(false);
    }
    let mut st = w.prepare_cached("SELECT app_id, pushkey FROM pushers WHERE user_id=?1")?;
    let pushers = st
        .query_map([user], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (app, key) in &pushers {
        w.tx.execute(
            "INSERT INTO push_queue(user_id, app_id, pushkey, room_id, event_id, next_try) VALUES(?1,?2,?3,?4,?5,?6)",
            params![user, app, key, room_id, event_id, now_ms() as i64],
        )?;
        // Bounded: the oldest notifications go first.
        w.tx.execute(
            "DELETE FROM push_queue WHERE id IN (SELECT id FROM push_queue WHERE user_id=?1 AND app_id=?2 AND pushkey=?3
             ORDER BY id DESC LIMIT -1 OFFSET ?4)",
            params![user, app, key, MAX_QUEUED_PER_PUSHER],
        )?;
    }
    Ok(!pushers.is_empty())
}

struct Job {
    id: i64,
    user: String,
    app: String,
    key: String,
    room: String,
    event: String,
    attempts: i64,
}

fn payload(hs: &Hs, c: &Connection, job: &Job, pusher: &Value) -> rusqlite::Result<Option<Value>> {
    let Some(ev) = pdu::get_event(c, &job.event)? else {
        return Ok(None);
    };
    let pdu: Value = serde_json::from_str(&ev.json).unwrap_or_default();
    let sender = pdu["sender"].as_str().unwrap_or_default();
    let sender_name = pdu::state_content(c, &job.room, "m.room.member", sender)?
        .and_then(|m| m["displayname"].as_str().map(str::to_owned));
    let room_name = pdu::state_content(c, &job.room, "m.room.name", "")?
        .and_then(|m| m["name"].as_str().map(str::to_owned));
    let (unread, _) = crate::push::room_counts(hs, c, &job.room, &job.user, false, i64::MAX)?;
    let actions = crate::push::actions_for(c, ev.stream, &job.user)?;
    let tweaks: Value = actions
        .and_then(|a| a.as_array().cloned())
        .map(|acts| {
            let mut t = serde_json::Map::new();
            for a in acts {
                if let Some(name) = a["set_tweak"].as_str() {
                    t.insert(
                        name.to_owned(),
                        a.get("value").cloned().unwrap_or(json!(true)),
                    );
                }
            }
            Value::Object(t)
        })
        .unwrap_or_else(|| json!({}));
    let event_id_only = pusher["data"]["format"] == "event_id_only";
    let mut n = json!({
        "event_id": job.event,
        "room_id": job.room,
        "counts": { "unread": unread },
        "prio": if tweaks.get("highlight").and_then(Value::as_bool) == Some(true) { "high" } else { "low" },
        "devices": [{
            "app_id": job.app,
            "pushkey": job.key,
            "pushkey_ts": 0,
            "data": pusher["data"].as_object().map(|d| { let mut d = d.clone(); d.remove("url"); Value::Object(d) }).unwrap_or(json!({})),
            "tweaks": tweaks,
        }],
    });
    if !event_id_only {
        n["type"] = pdu["type"].clone();
        n["sender"] = json!(sender);
        if let Some(s) = sender_name {
            n["sender_display_name"] = json!(s);
        }
        if let Some(r) = room_name {
            n["room_name"] = json!(r);
        }
        n["content"] = pdu["content"].clone();
    }
    Ok(Some(json!({ "notification": n })))
}

/// Sends due notifications until shutdown.
pub async fn deliver(hs: Arc<Hs>, shutdown: secta_runtime::Shutdown) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "push delivery disabled: no HTTP client");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hs.push_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.clone().wait() => return,
        }
        let now = now_ms() as i64;
        let jobs: Vec<Job> = match hs.db.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, user_id, app_id, pushkey, room_id, event_id, attempts FROM push_queue WHERE next_try<=?1 ORDER BY id LIMIT 20",
            )?;
            let r = st
                .query_map([now], |r| {
                    Ok(Job { id: r.get(0)?, user: r.get(1)?, app: r.get(2)?, key: r.get(3)?, room: r.get(4)?, event: r.get(5)?, attempts: r.get(6)? })
                })?
                .collect::<Result<Vec<_>, _>>();
            r
        }) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "reading the push queue failed");
                continue;
            }
        };
        for job in jobs {
            let prepared = hs
                .db
                .read(|c| -> rusqlite::Result<Option<(String, Value)>> {
                    let pusher: Option<String> = c
                    .query_row(
                        "SELECT json FROM pushers WHERE user_id=?1 AND app_id=?2 AND pushkey=?3",
                        params![job.user, job.app, job.key],
                        |r| r.get(0),
                    )
                    .ok();
                    let Some(pusher) = pusher.and_then(|p| serde_json::from_str::<Value>(&p).ok())
                    else {
                        return Ok(None);
                    };
                    let Some(url) = pusher["data"]["url"].as_str().map(str::to_owned) else {
                        return Ok(None);
                    };
                    Ok(payload(&hs, c, &job, &pusher)?.map(|p| (url, p)))
                });
            let outcome = match prepared {
                Ok(Some((url, body))) => match client.post(&url).json(&body).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        let rejected = resp.json::<Value>().await.ok().and_then(|v| {
                            v["rejected"]
                                .as_array()
                                .map(|a| a.iter().any(|k| k == job.key.as_str()))
                        });
                        Ok(rejected.unwrap_or(false))
                    }
                    Ok(resp) => Err(format!("gateway answered {}", resp.status())),
                    Err(e) => Err(if e.is_timeout() {
                        "timeout".to_owned()
                    } else if e.is_connect() {
                        "unreachable".to_owned()
                    } else {
                        "request failed".to_owned()
                    }),
                },
                Ok(None) => Ok(false), // pusher or event gone: drop the job
                Err(e) => Err(e.to_string()),
            };
            let result = hs.db.write(|w| -> rusqlite::Result<()> {
                match &outcome {
                    Ok(rejected) => {
                        w.tx.execute("DELETE FROM push_queue WHERE id=?1", [job.id])?;
                        if *rejected {
                            // The gateway says this pushkey is dead: remove the pusher.
                            w.tx.execute(
                                "DELETE FROM pushers WHERE user_id=?1 AND app_id=?2 AND pushkey=?3",
                                params![job.user, job.app, job.key],
                            )?;
                            w.tx.execute(
                                "DELETE FROM push_queue WHERE user_id=?1 AND app_id=?2 AND pushkey=?3",
                                params![job.user, job.app, job.key],
                            )?;
                        }
                    }
                    Err(_) => {
                        let backoff = (1000i64 << job.attempts.min(22)).min(MAX_BACKOFF_MS);
                        w.tx.execute(
                            "UPDATE push_queue SET attempts=attempts+1, next_try=?1 WHERE id=?2",
                            params![now_ms() as i64 + backoff, job.id],
                        )?;
                    }
                }
                Ok(())
            });
            if let Err(e) = result {
                tracing::warn!(error = %e, "updating the push queue failed");
            }
            if let Ok(true) = outcome {
                hs.pusher_users.invalidate();
            }
            if let Err(reason) = outcome {
                tracing::debug!(app = %job.app, attempts = job.attempts + 1, %reason, "push delivery will be retried");
            }
        }
    }
}
