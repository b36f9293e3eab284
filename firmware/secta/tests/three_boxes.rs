//! Three boxes in one room: B is down while A sends 1,000 messages and
//! catches up in order when it returns; C joins later and reads the history
//! it was not there for (backfill).

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{admin, call, create_room, enc, free_port_at, login, send, start_at, Server};
use serde_json::json;

const SENT_WHILE_DOWN: usize = 1000;

/// A box on its own loopback address `me.0` with client port `me.1` and TLS
/// port `me.2`, peered with the others.
fn start_box(data: &Path, me: (&str, u16, u16), others: &[(&str, u16, u16)]) -> Server {
    std::fs::create_dir_all(data).unwrap();
    let mut args = vec![
        "--federation-tls-listen".to_string(),
        format!("{}:{}", me.0, me.2),
    ];
    for (ip, p, t) in others {
        args.push("--peer".into());
        args.push(format!("{ip}:{p}=https://{ip}:{t}"));
    }
    start_at(data, me.0, me.1, &args)
}

/// A box's address and two free ports there (client API, federation TLS).
fn ports(ip: &'static str) -> (&'static str, u16, u16) {
    (ip, free_port_at(ip), free_port_at(ip))
}

/// Every message body of the room as a user of `base` sees it, oldest first,
/// paginating back through `/messages` (bounded).
fn all_bodies(base: &str, token: &str, room: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..100 {
        let mut url = format!(
            "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
            enc(room)
        );
        if let Some(f) = &from {
            url.push_str(&format!("&from={f}"));
        }
        let v = call("GET", &url, token, json!({})).expect("/messages");
        let chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        out.extend(
            chunk
                .iter()
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)),
        );
        match v["end"].as_str() {
            Some(e) if !chunk.is_empty() => from = Some(e.to_owned()),
            _ => break,
        }
    }
    out.reverse();
    out
}

/// The newest message body of the room as a user of `base` sees it.
fn newest_body(base: &str, token: &str, room: &str) -> Option<String> {
    let url = format!(
        "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1",
        enc(room)
    );
    let v = call("GET", &url, token, json!({})).ok()?;
    v["chunk"][0]["content"]["body"].as_str().map(str::to_owned)
}

fn wait_for(what: &str, secs: u64, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_returning_box_catches_up_in_order_and_a_late_box_reads_history() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let pa = ports("127.0.0.2");
    let pb = ports("127.0.0.3");
    let pc = ports("127.0.0.4");
    let a = start_box(&da, pa, &[pb, pc]);
    let b = start_box(&db, pb, &[pa, pc]);
    let c = start_box(&dc, pc, &[pa, pb]);
    admin(&da, &["user", "create", "alice", "--password", "pw"]);
    admin(&db, &["user", "create", "bob", "--password", "pw"]);
    admin(&dc, &["user", "create", "carol", "--password", "pw"]);
    let alice = login(&a.base, "alice");
    let bob = login(&b.base, "bob");

    let room = create_room(
        &a.base,
        &alice,
        json!({"preset": "public_chat", "name": "Три коробки"}),
    );
    let join = |base: &str, token: &str| {
        call(
            "POST",
            &format!(
                "{base}/_matrix/client/v3/join/{}?server_name={}",
                enc(&room),
                enc(&a.name)
            ),
            token,
            json!({}),
        )
        .expect("join across boxes");
    };
    join(&b.base, &bob);
    send(&a.base, &alice, &room, "first", "до перерыва");
    wait_for("the first message on B", 30, || {
        newest_body(&b.base, &bob, &room).as_deref() == Some("до перерыва")
    });

    // B goes down; A keeps talking.
    drop(b);
    let expected: Vec<String> = (0..SENT_WHILE_DOWN)
        .map(|i| format!("сообщение {i:04}"))
        .collect();
    for (i, body) in expected.iter().enumerate() {
        send(&a.base, &alice, &room, &format!("m{i}"), body);
    }
    // B comes back; A's queue delivers what it missed.
    let back = Instant::now();
    let b = start_box(&db, pb, &[pa, pc]);
    let bob = login(&b.base, "bob");
    wait_for("B to catch up", 120, || {
        newest_body(&b.base, &bob, &room).as_ref() == expected.last()
    });
    eprintln!(
        "B caught up on {SENT_WHILE_DOWN} messages {:.1} s after it restarted",
        back.elapsed().as_secs_f64()
    );
    let on_b: Vec<String> = all_bodies(&b.base, &bob, &room)
        .into_iter()
        .filter(|m| m.starts_with("сообщение "))
        .collect();
    assert_eq!(on_b.len(), SENT_WHILE_DOWN, "none missing, none twice");
    assert_eq!(on_b, expected, "in the order they were sent");

    // C joins now and reads back through history it was not there for.
    let carol = login(&c.base, "carol");
    join(&c.base, &carol);
    let on_c = all_bodies(&c.base, &carol, &room);
    assert!(
        on_c.contains(&"сообщение 0999".to_owned())
            && on_c.contains(&"сообщение 0500".to_owned())
            && on_c.contains(&"до перерыва".to_owned()),
        "backfilled history on C: {} messages, first {:?}",
        on_c.len(),
        on_c.first()
    );
    // And C's own message reaches both other boxes.
    send(&c.base, &carol, &room, "c1", "привет от C");
    for (base, tok) in [(&a.base, &alice), (&b.base, &bob)] {
        wait_for("C's message", 30, || {
            newest_body(base, tok, &room).as_deref() == Some("привет от C")
        });
    }
}
