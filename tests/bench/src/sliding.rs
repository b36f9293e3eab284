//! `--scenario sliding`: simplified sliding sync (MSC4186) for one user in many rooms.
//!
//! The user creates `--rooms` rooms (200 unless given) and sends one message in each. The bench
//! then times the first response of new connections (a window of 20 rooms, and the whole list)
//! and incremental responses after one new message.

use std::{sync::Arc, time::Instant};

use serde_json::{json, Value};

use crate::{
    enc, idle_and_register, median, ms, round3, run_bounded, summary, Ctx, Method, REQ_TIMEOUT,
};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
/// The target for the first response of a user in 200 rooms.
const TARGET_MS: f64 = 100.0;

fn request(conn_id: &str, last: usize) -> Value {
    json!({
        "conn_id": conn_id,
        "lists": { "all": {
            "ranges": [[0, last]],
            "timeline_limit": 1,
            "required_state": [["m.room.name", ""], ["m.room.avatar", ""], ["m.room.encryption", ""], ["m.room.member", "$ME"]],
        }},
        "extensions": {
            "e2ee": { "enabled": true },
            "to_device": { "enabled": true },
            "account_data": { "enabled": true },
            "receipts": { "enabled": true, "rooms": ["*"] },
            "typing": { "enabled": true, "rooms": ["*"] },
        },
    })
}

/// What a response holds: (list count, rooms, rooms with a name, rooms with a timeline event, bytes).
fn shape(v: &Value) -> (Option<u64>, usize, usize, usize, usize) {
    let rooms = v.get("rooms").and_then(Value::as_object);
    let n = rooms.map_or(0, |r| r.len());
    let named = rooms.map_or(0, |r| {
        r.values()
            .filter(|r| r.get("name").and_then(Value::as_str).is_some())
            .count()
    });
    let with_tl = rooms.map_or(0, |r| {
        r.values()
            .filter(|r| {
                r.get("timeline")
                    .and_then(Value::as_array)
                    .is_some_and(|t| !t.is_empty())
            })
            .count()
    });
    (
        v.pointer("/lists/all/count").and_then(Value::as_u64),
        n,
        named,
        with_tl,
        v.to_string().len(),
    )
}

/// `runs` first responses of new connections `{prefix}{k}` with the window [0, last].
async fn first_responses(
    ctx: &Ctx,
    token: &str,
    prefix: &str,
    last: usize,
    runs: usize,
    endpoint: &str,
) -> (Vec<f64>, Option<Value>) {
    let mut lat = Vec::new();
    let mut sample = None;
    for k in 0..runs {
        if ctx.past_deadline() {
            break;
        }
        let body = request(&format!("{prefix}{k}"), last);
        let t = Instant::now();
        let v = ctx
            .http
            .call(
                endpoint,
                Method::Post,
                PATH,
                Some(token),
                Some(&body),
                REQ_TIMEOUT,
            )
            .await;
        let dt = ms(t.elapsed());
        if let Some(v) = v {
            lat.push(dt);
            sample = Some(v);
        }
    }
    (lat, sample)
}

pub async fn run(ctx: Arc<Ctx>, secret: String) {
    let a = &ctx.args;
    let n_rooms = if a.rooms_given { a.rooms } else { 200 };
    let runs = a.runs.unwrap_or(5).max(1);
    ctx.set("rooms", n_rooms);
    ctx.set("runs", runs);
    ctx.set("first_sliding_sync_target_ms", TARGET_MS);
    let users = idle_and_register(&ctx, &secret, 1).await;
    let Some(Some(reg)) = users.into_iter().next() else {
        ctx.progress("no user: stopping");
        return;
    };
    let token = reg.user.token.clone();

    // 1. Rooms, created by the user, with one message each.
    ctx.progress(format!("creating {n_rooms} rooms with one message each"));
    let t = Instant::now();
    let futs: Vec<_> = (0..n_rooms)
        .map(|r| {
            let (ctx, token) = (ctx.clone(), token.clone());
            async move {
                let body = json!({ "preset": "public_chat", "name": format!("room {r}") });
                // Retried (up to 3 more times, 2 ms apart): secta answers 400 M_ROOM_IN_USE when
                // one user creates two rooms in the same millisecond (room v12 ids are the hash of
                // the create event). Every failure still counts under errors.create_room.
                let mut v = None;
                for attempt in 0..4 {
                    if attempt > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                    v = ctx
                        .http
                        .call(
                            "create_room",
                            Method::Post,
                            "/_matrix/client/v3/createRoom",
                            Some(&token),
                            Some(&body),
                            REQ_TIMEOUT,
                        )
                        .await;
                    if v.is_some() {
                        break;
                    }
                }
                let room = v?.get("room_id")?.as_str()?.to_owned();
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}-setup-{r}",
                    enc(&room),
                    ctx.run
                );
                let msg = json!({ "msgtype": "m.text", "body": format!("hello from room {r}") });
                let sent = ctx
                    .http
                    .call(
                        "send",
                        Method::Put,
                        &path,
                        Some(&token),
                        Some(&msg),
                        REQ_TIMEOUT,
                    )
                    .await
                    .is_some();
                Some((room, sent))
            }
        })
        .collect();
    let rooms = run_bounded(&ctx, a.setup_concurrency, futs).await;
    let created: Vec<String> = rooms.iter().flatten().map(|r| r.0.clone()).collect();
    ctx.set("rooms_created", created.len());
    ctx.set(
        "messages_sent",
        rooms.iter().flatten().filter(|r| r.1).count(),
    );
    ctx.set("setup_ms", round3(ms(t.elapsed())));
    ctx.set("rss_after_setup_kb", ctx.rss_kb());
    ctx.progress(format!(
        "{} rooms in {:.1}s",
        created.len(),
        t.elapsed().as_secs_f64()
    ));
    if created.is_empty() {
        return;
    }

    // 2. First response, window of 20 rooms, new connection each run.
    let (lat, v) = first_responses(&ctx, &token, "bench", 19, runs, "sliding_sync_first").await;
    ctx.set("first_sliding_sync_ms", median(&lat));
    ctx.set(
        "first_sliding_sync_runs_ms",
        lat.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
    );
    ctx.set(
        "first_sliding_sync_meets_target",
        median(&lat).map(|m| m <= TARGET_MS),
    );
    if let Some(v) = &v {
        let (count, n, named, with_tl, bytes) = shape(v);
        ctx.set("first_sliding_sync_list_count", count);
        ctx.set("first_sliding_sync_rooms", n);
        ctx.set("first_sliding_sync_rooms_named", named);
        ctx.set("first_sliding_sync_rooms_with_timeline", with_tl);
        ctx.set("first_sliding_sync_bytes", bytes);
        ctx.progress(format!(
            "first response: median {:.1} ms, count {count:?}, {n} rooms, {bytes} bytes",
            median(&lat).unwrap_or(0.0)
        ));
    }

    // 3. First response for the whole list.
    let last = created.len().max(1) - 1;
    let (lat, v) =
        first_responses(&ctx, &token, "benchfull", last, runs, "sliding_sync_full").await;
    ctx.set("full_list_sliding_sync_ms", median(&lat));
    ctx.set(
        "full_list_sliding_sync_runs_ms",
        lat.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
    );
    if let Some(v) = &v {
        let (count, n, named, with_tl, bytes) = shape(v);
        ctx.set("full_list_sliding_sync_list_count", count);
        ctx.set("full_list_sliding_sync_rooms", n);
        ctx.set("full_list_sliding_sync_rooms_named", named);
        ctx.set("full_list_sliding_sync_rooms_with_timeline", with_tl);
        ctx.set("full_list_sliding_sync_bytes", bytes);
        ctx.progress(format!(
            "full list: median {:.1} ms, {n} rooms, {bytes} bytes",
            median(&lat).unwrap_or(0.0)
        ));
    }

    // 4. Incremental: one new message in one of the oldest rooms (outside the window), then
    // the request with the last pos. The server answers as soon as there is news (timeout 10 s).
    let conn = "benchinc";
    let body = request(conn, 19);
    let mut pos = ctx
        .http
        .call(
            "sliding_sync_first",
            Method::Post,
            PATH,
            Some(&token),
            Some(&body),
            REQ_TIMEOUT,
        )
        .await
        .and_then(|v| v.get("pos").and_then(Value::as_str).map(str::to_owned));
    let mut lat = Vec::new();
    let (mut seen, mut rooms_in_resp) = (0usize, Vec::new());
    for k in 0..runs {
        let Some(p) = pos.clone() else { break };
        if ctx.past_deadline() {
            break;
        }
        let room = &created[k % created.len()];
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}-inc-{k}",
            enc(room),
            ctx.run
        );
        let msg = json!({ "msgtype": "m.text", "body": format!("incremental {k}") });
        let Some(event_id) = ctx
            .http
            .call(
                "send",
                Method::Put,
                &path,
                Some(&token),
                Some(&msg),
                REQ_TIMEOUT,
            )
            .await
            .and_then(|v| v.get("event_id").and_then(Value::as_str).map(str::to_owned))
        else {
            continue;
        };
        let t = Instant::now();
        let v = ctx
            .http
            .call(
                "sliding_sync_incremental",
                Method::Post,
                &format!("{PATH}?pos={}&timeout=10000", enc(&p)),
                Some(&token),
                Some(&body),
                REQ_TIMEOUT,
            )
            .await;
        let dt = ms(t.elapsed());
        let Some(v) = v else { break };
        lat.push(dt);
        rooms_in_resp.push(
            v.get("rooms")
                .and_then(Value::as_object)
                .map_or(0, |r| r.len()) as f64,
        );
        let has = v
            .pointer(&format!(
                "/rooms/{}/timeline",
                room.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_array)
            .is_some_and(|t| {
                t.iter()
                    .any(|e| e.get("event_id").and_then(Value::as_str) == Some(event_id.as_str()))
            });
        seen += usize::from(has);
        pos = v.get("pos").and_then(Value::as_str).map(str::to_owned);
    }
    ctx.set("incremental_sliding_sync_ms", median(&lat));
    ctx.set(
        "incremental_sliding_sync_runs_ms",
        lat.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
    );
    ctx.set("incremental_sliding_sync_summary", summary(&lat));
    ctx.set(
        "incremental_new_message_seen",
        format!("{seen}/{}", lat.len()),
    );
    ctx.set(
        "incremental_rooms_per_response",
        rooms_in_resp.iter().map(|x| *x as u64).collect::<Vec<_>>(),
    );
    ctx.progress(format!(
        "incremental: median {:.1} ms, new message seen {seen}/{}",
        median(&lat).unwrap_or(0.0),
        lat.len()
    ));
    ctx.set("rss_end_kb", ctx.rss_kb());
}
