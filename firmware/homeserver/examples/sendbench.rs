//! In-process send benchmark: `cargo run --release --example sendbench -p secta-homeserver`.
//! Prints the time per message for one sender (no HTTP, no network), to find the
//! cost of the write path itself.

use std::time::Instant;

use axum::{body::Body, http::Request};
use secta_homeserver::{HomeserverConfig, Hs};
use serde_json::{json, Value};
use tower::ServiceExt;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let hs = Hs::open(
        HomeserverConfig {
            server_name: "bench.box".into(),
            auth_rate_burst: 100_000,
            ..Default::default()
        },
        dir.path(),
    )
    .unwrap();
    let app = hs.router();
    let call = move |method: &str, uri: String, token: Option<String>, body: Value| {
        let app = app.clone();
        let method = method.to_owned();
        async move {
            let mut req = Request::builder()
                .method(method.as_str())
                .uri(uri)
                .header("content-type", "application/json");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let resp = app
                .oneshot(req.body(Body::from(body.to_string())).unwrap())
                .await
                .unwrap();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
        }
    };
    let members: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(25);
    let mut tokens = Vec::new();
    for i in 0..members {
        hs.admin_create_user(&format!("u{i}"), "pw", false).unwrap();
        let v = call("POST", "/_matrix/client/v3/login".into(), None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": format!("u{i}")}, "password": "pw"})).await;
        tokens.push(v["access_token"].as_str().unwrap().to_owned());
    }
    let v = call(
        "POST",
        "/_matrix/client/v3/createRoom".into(),
        Some(tokens[0].clone()),
        json!({"preset": "public_chat"}),
    )
    .await;
    let room = v["room_id"].as_str().unwrap().replace('!', "%21");
    for t in &tokens[1..] {
        call(
            "POST",
            format!("/_matrix/client/v3/join/{room}"),
            Some(t.clone()),
            json!({}),
        )
        .await;
    }
    let n = 2000;
    let senders: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let call = call.clone();
        let token = tokens[s % tokens.len()].clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / senders {
                call("PUT", format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{s}-{i}"), Some(token.clone()),
                    json!({"msgtype": "m.text", "body": format!("message number {i} with some words in it")})).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let el = start.elapsed();
    println!(
        "{members} members, {senders} senders: {:.3} ms per message, {:.0} msg/s",
        el.as_secs_f64() * 1000.0 / n as f64,
        n as f64 / el.as_secs_f64()
    );
}
