//! Two boxes whose link is cut while both change the same room: after the
//! link heals, both hold the same state, chosen by state resolution v2 (not
//! by whoever spoke last), and every message reached both sides.
//!
//! Each box reaches the other's TLS port through a TCP relay in this test,
//! which can be cut (open connections closed, new ones refused) and healed.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{admin, call, create_room, enc, free_port_at, login, send, start_at, Server};
use serde_json::{json, Value};

/// A TCP relay (on `ip`) to `ip:to` that can be cut and healed.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Relay {
    fn new(ip: &'static str, to: u16) -> Self {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(c);
                    continue;
                }
                let Ok(u) = TcpStream::connect((ip, to)) else {
                    continue;
                };
                for (from, into) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)] {
                    let flag = flag.clone();
                    thread::spawn(move || pipe(from, into, &flag));
                }
            }
        });
        Relay { port, up }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

/// Copies bytes one way until either side closes or the relay is cut.
fn pipe(mut from: TcpStream, mut into: TcpStream, up: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if !up.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = into.shutdown(Shutdown::Both);
}

/// Each box has its own loopback address.
const IP_A: &str = "127.0.0.2";
const IP_B: &str = "127.0.0.3";

/// A box on `ip`, whose peer (`peer_ip:peer_port`) is reached through the relay on port `via`.
fn start_box(data: &Path, ip: &str, port: u16, tls: u16, peer: (&str, u16, u16)) -> Server {
    let (peer_ip, peer_port, via) = peer;
    std::fs::create_dir_all(data).unwrap();
    start_at(
        data,
        ip,
        port,
        &[
            "--peer".into(),
            format!("{peer_ip}:{peer_port}=https://{peer_ip}:{via}"),
            "--federation-tls-listen".into(),
            format!("{ip}:{tls}"),
        ],
    )
}

fn get(base: &str, token: &str, path: &str) -> Result<Value, String> {
    call("GET", &format!("{base}{path}"), token, json!({}))
}

fn put_state(base: &str, token: &str, room: &str, kind: &str, content: Value) {
    call(
        "PUT",
        &format!("{base}/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room)),
        token,
        content,
    )
    .unwrap_or_else(|e| panic!("setting {kind}: {e}"));
}

/// Waits (bounded) until `pred` holds of what `probe` returns.
fn wait_for(what: &str, secs: u64, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

fn bodies(base: &str, token: &str, room: &str) -> Vec<String> {
    get(
        base,
        token,
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
            enc(room)
        ),
    )
    .map(|v| {
        v["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn a_cut_link_heals_into_the_same_resolved_state_on_both_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let (pa, ta) = (free_port_at(IP_A), free_port_at(IP_A));
    let (pb, tb) = (free_port_at(IP_B), free_port_at(IP_B));
    let to_b = Relay::new(IP_B, tb);
    let to_a = Relay::new(IP_A, ta);
    let a = start_box(&da, IP_A, pa, ta, (IP_B, pb, to_b.port));
    let b = start_box(&db, IP_B, pb, tb, (IP_A, pa, to_a.port));
    admin(&da, &["user", "create", "alice", "--password", "pw"]);
    admin(&db, &["user", "create", "bob", "--password", "pw"]);
    let alice = login(&a.base, "alice");
    let bob = login(&b.base, "bob");
    let bob_id = format!("@bob:{}", b.name);

    let room = create_room(
        &a.base,
        &alice,
        json!({"preset": "public_chat", "name": "Исходное имя"}),
    );
    call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            b.base,
            enc(&room),
            enc(&a.name)
        ),
        &bob,
        json!({}),
    )
    .expect("bob joins across the link");
    // Alice makes bob a moderator, and both boxes agree on it.
    let pl_path = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
        enc(&room)
    );
    let mut pl = get(&a.base, &alice, &pl_path).unwrap();
    pl["users"][&bob_id] = json!(100);
    put_state(&a.base, &alice, &room, "m.room.power_levels", pl.clone());
    wait_for("bob's power level on B", 30, || {
        get(&b.base, &bob, &pl_path).is_ok_and(|v| v["users"][&bob_id] == 100)
    });

    // The link goes down. Meanwhile alice demotes bob on A, and bob, still a
    // moderator as far as B knows, renames the room; both keep talking.
    to_b.set_up(false);
    to_a.set_up(false);
    thread::sleep(Duration::from_millis(300));
    pl["users"][&bob_id] = json!(0);
    put_state(&a.base, &alice, &room, "m.room.power_levels", pl);
    send(&a.base, &alice, &room, "a-cut", "пока связи нет (A)");
    put_state(
        &b.base,
        &bob,
        &room,
        "m.room.name",
        json!({"name": "Имя от Боба"}),
    );
    send(&b.base, &bob, &room, "b-cut", "пока связи нет (B)");
    let name_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
    assert_eq!(
        get(&b.base, &bob, &name_path).unwrap()["name"],
        "Имя от Боба",
        "B took bob's rename while cut off"
    );
    thread::sleep(Duration::from_secs(2)); // both queues fail a few times
                                           // Bob's client is up to date before the heal: what follows comes to it
                                           // by incremental syncs.
    let mut since = get(&b.base, &bob, "/_matrix/client/v3/sync?timeout=0").unwrap()["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    // The link heals: each side's queue delivers what the other missed.
    to_b.set_up(true);
    to_a.set_up(true);
    wait_for("both messages on both boxes", 90, || {
        let (on_a, on_b) = (bodies(&a.base, &alice, &room), bodies(&b.base, &bob, &room));
        ["пока связи нет (A)", "пока связи нет (B)"]
            .iter()
            .all(|m| on_a.iter().any(|x| x == m) && on_b.iter().any(|x| x == m))
    });
    // Resolution puts alice's power-level change first: with it bob may not
    // rename the room, so both boxes keep the original name and bob at 0.
    wait_for("the same resolved state on both boxes", 30, || {
        [(&a.base, &alice), (&b.base, &bob)]
            .iter()
            .all(|(base, tok)| {
                get(base, tok, &name_path).is_ok_and(|v| v["name"] == "Исходное имя")
                    && get(base, tok, &pl_path).is_ok_and(|v| v["users"][&bob_id] == 0)
            })
    });
    // Bob's rename was undone by the resolution alone (no new event): his
    // incremental sync says so, in the room's state section.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(
            &b.base,
            &bob,
            &format!("/_matrix/client/v3/sync?since={since}&timeout=1000"),
        )
        .unwrap();
        let back = v["rooms"]["join"][&room]["state"]["events"]
            .as_array()
            .is_some_and(|evs| {
                evs.iter()
                    .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Исходное имя")
            });
        if back {
            break;
        }
        since = v["next_batch"].as_str().unwrap().to_owned();
        assert!(
            Instant::now() < deadline,
            "bob's incremental sync never showed the resolved room name"
        );
    }
    let state_ids = |base: &str, tok: &str| -> Vec<String> {
        let mut ids: Vec<String> = get(
            base,
            tok,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
        )
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        state_ids(&a.base, &alice),
        state_ids(&b.base, &bob),
        "the whole current state is the same on both boxes"
    );
    // And the room goes on: bob, now an ordinary member, is still heard.
    send(&b.base, &bob, &room, "b-after", "снова вместе");
    wait_for("bob's message after the heal on A", 30, || {
        bodies(&a.base, &alice, &room)
            .iter()
            .any(|x| x == "снова вместе")
    });
    // Bob can no longer rename the room on his own box.
    let denied = call(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.name/",
            b.base,
            enc(&room)
        ),
        &bob,
        json!({"name": "ещё раз"}),
    )
    .unwrap_err();
    assert!(denied.starts_with("403"), "{denied}");
}
