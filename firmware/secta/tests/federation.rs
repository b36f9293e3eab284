//! Two boxes on loopback federate over TLS: an invite across servers, a remote
//! join, messages both ways, and store-and-forward while one box is down.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{admin, call, create_room, enc, free_port_at, login, send, start_at, Server};
use serde_json::{json, Value};

/// Box A's and box B's loopback addresses: each box has its own.
const IP_A: &str = "127.0.0.2";
const IP_B: &str = "127.0.0.3";

/// A box on `ip:port` (client API) and `ip:port_tls` (federation over TLS),
/// whose peer `(ip, client port, TLS port)` is reached over TLS.
fn start_box(data: &Path, ip: &str, port: u16, port_tls: u16, peer: (&str, u16, u16)) -> Server {
    let (pip, peer_port, peer_tls) = peer;
    start_at(
        data,
        ip,
        port,
        &[
            "--peer".into(),
            format!("{pip}:{peer_port}=https://{pip}:{peer_tls}"),
            "--federation-tls-listen".into(),
            format!("{ip}:{port_tls}"),
        ],
    )
}

/// Syncs until `pred` holds for a response (bounded in time).
fn sync_until(
    base: &str,
    token: &str,
    what: &str,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut since: Option<String> = None;
    loop {
        let url = match &since {
            Some(s) => format!("{base}/_matrix/client/v3/sync?timeout=1000&since={s}"),
            None => format!("{base}/_matrix/client/v3/sync"),
        };
        let v = call("GET", &url, token, json!({})).expect("sync");
        if pred(&v) {
            return v;
        }
        since = v["next_batch"].as_str().map(str::to_owned);
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

fn timeline_has(v: &Value, room: &str, body: &str) -> bool {
    v["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .is_some_and(|evs| evs.iter().any(|e| e["content"]["body"] == body))
}

#[test]
fn two_boxes_chat_across_federation_and_catch_up_after_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let (pa, ta) = (free_port_at(IP_A), free_port_at(IP_A));
    let (pb, tb) = (free_port_at(IP_B), free_port_at(IP_B));
    // Both boxes track presence (off by default), to see it cross over.
    for (d, ip, p) in [(&da, IP_A, pa), (&db, IP_B, pb)] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(
            d.join("secta.toml"),
            format!("[box]\nname = \"box\"\n\n[homeserver]\nserver_name = \"{ip}:{p}\"\nlisten = \"{ip}:{p}\"\npresence = true\n"),
        )
        .unwrap();
    }
    let a = start_box(&da, IP_A, pa, ta, (IP_B, pb, tb));
    let mut b = start_box(&db, IP_B, pb, tb, (IP_A, pa, ta));
    admin(&da, &["user", "create", "alice", "--password", "pw"]);
    admin(&db, &["user", "create", "bob", "--password", "pw"]);
    admin(&db, &["user", "create", "carol", "--password", "pw"]);
    let alice = login(&a.base, "alice");
    let bob = login(&b.base, "bob");
    let bob_id = format!("@bob:{}", b.name);

    let room = create_room(
        &a.base,
        &alice,
        json!({"preset": "public_chat", "visibility": "public", "name": "Между коробками"}),
    );
    for i in 0..5 {
        send(
            &a.base,
            &alice,
            &room,
            &format!("h{i}"),
            &format!("история {i}"),
        );
    }
    // B's users see A's public directory and A's users' profiles.
    let dir = call(
        "GET",
        &format!("{}/_matrix/client/v3/publicRooms?server={}", b.base, a.name),
        &bob,
        json!({}),
    )
    .unwrap();
    assert!(
        dir["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room_id"] == room.as_str()),
        "{dir}"
    );
    let profile = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/profile/{}",
            b.base,
            enc(&format!("@alice:{}", a.name))
        ),
        &bob,
        json!({}),
    )
    .unwrap();
    assert_eq!(profile["displayname"], "alice");
    call(
        "POST",
        &format!("{}/_matrix/client/v3/rooms/{}/invite", a.base, enc(&room)),
        &alice,
        json!({"user_id": bob_id}),
    )
    .expect("invite across servers");
    sync_until(&b.base, &bob, "the invite on box B", 20, |v| {
        v["rooms"]["invite"].get(&room).is_some()
    });
    call(
        "POST",
        &format!("{}/_matrix/client/v3/join/{}", b.base, enc(&room)),
        &bob,
        json!({}),
    )
    .expect("remote join");

    // History from before bob's box was in the room comes by backfill.
    let history = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=30",
            b.base,
            enc(&room)
        ),
        &bob,
        json!({}),
    )
    .unwrap();
    let bodies: Vec<&str> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert!(
        bodies.contains(&"история 0") && bodies.contains(&"история 4"),
        "backfilled history: {history}"
    );
    let i4 = bodies.iter().position(|b| *b == "история 4").unwrap();
    let i0 = bodies.iter().position(|b| *b == "история 0").unwrap();
    assert!(i4 < i0, "newest first: {bodies:?}");

    send(&a.base, &alice, &room, "a1", "привет из A");
    sync_until(&b.base, &bob, "A's message on B", 30, |v| {
        timeline_has(v, &room, "привет из A")
    });
    send(&b.base, &bob, &room, "b1", "hello from B");
    sync_until(&a.base, &alice, "B's message on A", 30, |v| {
        timeline_has(v, &room, "hello from B")
    });
    // Carol on B declines an invite: A learns it through make_leave/send_leave.
    let carol = login(&b.base, "carol");
    let carol_id = format!("@carol:{}", b.name);
    call(
        "POST",
        &format!("{}/_matrix/client/v3/rooms/{}/invite", a.base, enc(&room)),
        &alice,
        json!({"user_id": carol_id}),
    )
    .unwrap();
    let invited = sync_until(&b.base, &carol, "carol's invite", 20, |v| {
        v["rooms"]["invite"].get(&room).is_some()
    });
    call(
        "POST",
        &format!("{}/_matrix/client/v3/rooms/{}/leave", b.base, enc(&room)),
        &carol,
        json!({}),
    )
    .expect("decline");
    // Carol's other devices hear of the decline.
    let since = invited["next_batch"].as_str().unwrap();
    let after = call(
        "GET",
        &format!("{}/_matrix/client/v3/sync?since={since}&timeout=0", b.base),
        &carol,
        json!({}),
    )
    .unwrap();
    assert_eq!(
        after["rooms"]["leave"][&room]["timeline"]["events"][0]["content"]["membership"], "leave",
        "{after}"
    );
    let state = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            a.base,
            enc(&room),
            enc(&carol_id)
        ),
        &alice,
        json!({}),
    )
    .unwrap();
    assert_eq!(state["membership"], "leave", "{state}");
    // A restricted room on A that members of `room` may join: bob (on B) joins
    // without an invite, authorised by A (join_authorised_via_users_server).
    let restricted = create_room(
        &a.base,
        &alice,
        json!({"preset": "private_chat", "room_version": "10",
               "initial_state": [{"type": "m.room.join_rules", "state_key": "",
                                  "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": room}]}}]}),
    );
    call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            b.base,
            enc(&restricted),
            a.name
        ),
        &bob,
        json!({}),
    )
    .expect("restricted join through the authorising server");
    // Presence crosses over (m.presence EDU).
    call(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/presence/{}/status",
            b.base,
            enc(&bob_id)
        ),
        &bob,
        json!({"presence": "unavailable", "status_msg": "в эфире"}),
    )
    .unwrap();
    sync_until(&a.base, &alice, "bob's presence on A", 30, |v| {
        v["presence"]["events"].as_array().is_some_and(|evs| {
            evs.iter()
                .any(|e| e["sender"] == bob_id.as_str() && e["content"]["status_msg"] == "в эфире")
        })
    });
    // Bob's join reached A, so A lists him as a member.
    let members = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/joined_members",
            a.base,
            enc(&room)
        ),
        &alice,
        json!({}),
    )
    .unwrap();
    assert!(members["joined"].get(&bob_id).is_some(), "{members}");

    // Box B goes down; A keeps the message and delivers it when B is back.
    drop(b);
    send(&a.base, &alice, &room, "a2", "пока тебя не было");
    std::thread::sleep(Duration::from_millis(1500));
    let status = admin(&da, &["federation"]);
    let queued: u32 = status
        .lines()
        .find(|l| l.starts_with(&format!("{IP_B}:{pb}")))
        .and_then(|l| l.split("queued ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(queued >= 1, "the message waits in A's queue: {status}");
    b = start_box(&db, IP_B, pb, tb, (IP_A, pa, ta));
    let bob = login(&b.base, "bob");
    let v = sync_until(
        &b.base,
        &bob,
        "the message sent while B was down",
        60,
        |v| timeline_has(v, &room, "пока тебя не было"),
    );

    // A blocks B: nothing more goes out to it.
    admin(&da, &["federation", "block", &b.name]);
    send(&a.base, &alice, &room, "a3", "только для своих");
    std::thread::sleep(Duration::from_secs(3));
    let since = v["next_batch"].as_str().unwrap().to_owned();
    let later = call(
        "GET",
        &format!("{}/_matrix/client/v3/sync?since={since}&timeout=0", b.base),
        &bob,
        json!({}),
    )
    .unwrap();
    assert!(
        !timeline_has(&later, &room, "только для своих"),
        "a blocked server still got the message"
    );
    let status = admin(&da, &["federation"]);
    assert!(status.contains("queued 0"), "{status}");

    // Still blocked, A renames the room and sends more than get_missing_events
    // brings back in one go (20).
    call(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.name/",
            a.base,
            enc(&room)
        ),
        &alice,
        json!({"name": "Переименована без B"}),
    )
    .unwrap();
    for i in 0..25 {
        send(
            &a.base,
            &alice,
            &room,
            &format!("gap{i}"),
            &format!("пропуск {i}"),
        );
    }

    // Unblocked again: the next message arrives, B fills the gap before it
    // (get_missing_events: the last 20), and the state before the oldest of
    // those comes from A's /state_ids: B has the new name, not its old state.
    admin(&da, &["federation", "unblock", &b.name]);
    send(&a.base, &alice, &room, "a4", "снова вместе");
    sync_until(&b.base, &bob, "the message after the gap", 30, |v| {
        timeline_has(v, &room, "снова вместе")
    });
    let history = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5",
            b.base,
            enc(&room)
        ),
        &bob,
        json!({}),
    )
    .unwrap();
    let bodies: Vec<&str> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert!(
        bodies.contains(&"снова вместе") && bodies.contains(&"пропуск 24"),
        "{bodies:?}"
    );
    let name = call(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.name/",
            b.base,
            enc(&room)
        ),
        &bob,
        json!({}),
    )
    .unwrap();
    assert_eq!(
        name["name"], "Переименована без B",
        "B's state after the gap"
    );
    drop(b);
}

/// bob on B knocks on a room of A (make_knock/send_knock through A); alice
/// sees the knock, invites him, and he joins.
#[test]
fn a_user_knocks_on_a_room_of_another_box_and_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let (ip_a, ip_b) = ("127.0.0.4", "127.0.0.5");
    let (pa, ta) = (free_port_at(ip_a), free_port_at(ip_a));
    let (pb, tb) = (free_port_at(ip_b), free_port_at(ip_b));
    for d in [&da, &db] {
        std::fs::create_dir_all(d).unwrap();
    }
    let a = start_box(&da, ip_a, pa, ta, (ip_b, pb, tb));
    let b = start_box(&db, ip_b, pb, tb, (ip_a, pa, ta));
    admin(&da, &["user", "create", "alice", "--password", "pw"]);
    admin(&db, &["user", "create", "bob", "--password", "pw"]);
    admin(&db, &["user", "create", "carol", "--password", "pw"]);
    let alice = login(&a.base, "alice");
    let bob = login(&b.base, "bob");
    let carol = login(&b.base, "carol");
    let bob_id = format!("@bob:{}", b.name);
    let carol_id = format!("@carol:{}", b.name);
    let knock_room = create_room(
        &a.base,
        &alice,
        json!({"preset": "private_chat", "name": "Стучите",
               "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}]}),
    );
    let closed = create_room(&a.base, &alice, json!({"preset": "private_chat"}));

    // A room that does not take knocks refuses, with A's reason.
    let refused = call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/knock/{}?via={}",
            b.base,
            enc(&closed),
            enc(&a.name)
        ),
        &bob,
        json!({}),
    )
    .unwrap_err();
    assert!(refused.starts_with("403"), "{refused}");

    let v = call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/knock/{}?via={}",
            b.base,
            enc(&knock_room),
            enc(&a.name)
        ),
        &bob,
        json!({"reason": "пустите, пожалуйста"}),
    )
    .expect("knock through A");
    assert_eq!(v["room_id"], knock_room.as_str());
    // Bob's client shows the knock, with the room's stripped state.
    let knocked = sync_until(&b.base, &bob, "the knock in bob's sync", 20, |v| {
        v["rooms"]["knock"].get(&knock_room).is_some()
    });
    let stripped = &knocked["rooms"]["knock"][&knock_room]["knock_state"]["events"];
    assert!(
        stripped
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Стучите"),
        "{stripped}"
    );
    // Alice sees bob knocking, with his reason.
    sync_until(&a.base, &alice, "bob's knock on A", 20, |v| {
        v["rooms"]["join"][&knock_room]["timeline"]["events"]
            .as_array()
            .is_some_and(|evs| {
                evs.iter().any(|e| {
                    e["state_key"] == bob_id.as_str()
                        && e["content"]["membership"] == "knock"
                        && e["content"]["reason"] == "пустите, пожалуйста"
                })
            })
    });
    // She lets him in: the invite reaches B (no longer a knock there), he joins.
    let since = knocked["next_batch"].as_str().unwrap().to_owned();
    call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            a.base,
            enc(&knock_room)
        ),
        &alice,
        json!({"user_id": bob_id}),
    )
    .expect("invite the knocking user");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since = since;
    loop {
        let v = call(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=1000",
                b.base
            ),
            &bob,
            json!({}),
        )
        .unwrap();
        if v["rooms"]["invite"].get(&knock_room).is_some() {
            assert!(v["rooms"]["knock"].get(&knock_room).is_none(), "{v}");
            break;
        }
        since = v["next_batch"].as_str().unwrap().to_owned();
        assert!(Instant::now() < deadline, "the invite did not reach bob");
    }
    call(
        "POST",
        &format!("{}/_matrix/client/v3/join/{}", b.base, enc(&knock_room)),
        &bob,
        json!({}),
    )
    .expect("bob joins after the invite");
    send(&b.base, &bob, &knock_room, "k1", "спасибо, что впустили");
    sync_until(&a.base, &alice, "bob's message on A", 30, |v| {
        timeline_has(v, &knock_room, "спасибо, что впустили")
    });

    // Carol knocks too and is refused: her box hears it (the room is not
    // there) and her clients see her knock end.
    call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/knock/{}?via={}",
            b.base,
            enc(&knock_room),
            enc(&a.name)
        ),
        &carol,
        json!({}),
    )
    .expect("carol knocks");
    let knocked = sync_until(&b.base, &carol, "carol's knock", 20, |v| {
        v["rooms"]["knock"].get(&knock_room).is_some()
    });
    sync_until(&a.base, &alice, "carol's knock on A", 20, |v| {
        v["rooms"]["join"][&knock_room]["timeline"]["events"]
            .as_array()
            .is_some_and(|evs| {
                evs.iter().any(|e| {
                    e["state_key"] == carol_id.as_str() && e["content"]["membership"] == "knock"
                })
            })
    });
    call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/kick",
            a.base,
            enc(&knock_room)
        ),
        &alice,
        json!({"user_id": carol_id, "reason": "не сегодня"}),
    )
    .expect("refuse carol's knock");
    let mut since = knocked["next_batch"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = call(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=1000",
                b.base
            ),
            &carol,
            json!({}),
        )
        .unwrap();
        let left = &v["rooms"]["leave"][&knock_room]["timeline"]["events"][0];
        if left["content"]["membership"] == "leave" {
            assert_eq!(left["content"]["reason"], "не сегодня", "{v}");
            break;
        }
        since = v["next_batch"].as_str().unwrap().to_owned();
        assert!(
            Instant::now() < deadline,
            "carol never heard her knock was refused"
        );
    }
}
