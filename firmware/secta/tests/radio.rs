//! The radio inside the box: `secta demo` serves it, and the radio bot
//! announces shows in the Matrix room #radio and answers !эфир.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};

fn frames(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        let mut f = vec![(i % 97) as u8; 417];
        f[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
        v.extend(f);
    }
    v
}

/// Syncs (≤ 20 s) until a message in `room` satisfies `want`; returns its body.
fn wait_message(
    base: &str,
    token: &str,
    room: &str,
    since: &mut String,
    want: &dyn Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let url = format!("{base}/_matrix/client/v3/sync?timeout=1000&since={since}");
        let v = call("GET", &url, token, Value::Null).unwrap();
        *since = v["next_batch"].as_str().unwrap().to_owned();
        for ev in v["rooms"]["join"][room]["timeline"]["events"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let body = ev["content"]["body"].as_str().unwrap_or("");
            if ev["sender"]
                .as_str()
                .is_some_and(|s| s.starts_with("@radio:"))
                && want(body)
            {
                return body.to_owned();
            }
        }
    }
    panic!("no matching message from the radio bot");
}

#[test]
fn the_radio_bot_announces_shows_and_answers_now_playing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("box");
    let (port, radio_port) = (free_port(), free_port());
    let server = start(
        &data,
        port,
        &[
            "--portal-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--radio-listen".into(),
            format!("127.0.0.1:{radio_port}"),
        ],
    );
    let base = server.base.clone();
    admin(&data, &["user", "create", "alice", "--password", "pw"]);
    let token = login(&base, "alice");
    let alias = format!("#radio:{}", server.name);
    let mut room = None;
    for _ in 0..100 {
        let url = format!(
            "{base}/_matrix/client/v3/join/{}",
            enc(&alias).replace('#', "%23")
        );
        if let Ok(v) = call("POST", &url, &token, json!({})) {
            room = v["room_id"].as_str().map(str::to_owned);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let room = room.expect("the bot made #radio");
    let v = call(
        "GET",
        &format!("{base}/_matrix/client/v3/sync?timeout=0"),
        &token,
        Value::Null,
    )
    .unwrap();
    let mut since = v["next_batch"].as_str().unwrap().to_owned();

    // A show goes on air.
    // The generated source password is kept encrypted; the admin CLI shows it.
    let password = admin(&data, &["radio-password"]);
    assert_eq!(password.trim().len(), 20, "{password}");
    let stored = std::fs::read(data.join("radio/source_password")).unwrap();
    assert!(!stored
        .windows(password.trim().len())
        .any(|w| w == password.trim().as_bytes()));
    let mut src = TcpStream::connect(("127.0.0.1", radio_port)).unwrap();
    let auth = {
        let raw = format!("source:{}", password.trim());
        // Tiny base64 (std has none).
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in raw.as_bytes().chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    write!(src, "SOURCE /live HTTP/1.0\r\nAuthorization: Basic {auth}\r\nContent-Type: audio/mpeg\r\nice-name: Утренний эфир\r\n\r\n").unwrap();
    let mut ok = [0u8; 19];
    src.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"HTTP/1.0 200 OK\r\n\r\n");
    src.write_all(&frames(30)).unwrap();
    let on_air = wait_message(&base, &token, &room, &mut since, &|b| b.contains("В эфире"));
    assert!(on_air.contains("Утренний эфир"), "{on_air}");
    assert!(
        on_air.contains(&format!("http://127.0.0.1:{radio_port}/live")),
        "{on_air}"
    );
    assert!(on_air.contains("On air"), "{on_air}");

    // A listener, then !эфир and !np.
    let mut listener = TcpStream::connect(("127.0.0.1", radio_port)).unwrap();
    listener.write_all(b"GET /live HTTP/1.0\r\n\r\n").unwrap();
    let mut head = [0u8; 15];
    listener.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.0 200 OK");
    let send = |body: &str, txn: &str| {
        let url = format!(
            "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(&room)
        );
        call(
            "PUT",
            &url,
            &token,
            json!({"msgtype": "m.text", "body": body}),
        )
        .unwrap();
    };
    send("!эфир", "t1");
    let reply = wait_message(&base, &token, &room, &mut since, &|b| b.contains("слушают"));
    assert!(reply.starts_with("В эфире Утренний эфир"), "{reply}");
    assert!(reply.contains("слушают: 1"), "{reply}");
    send("!np", "t2");
    let reply = wait_message(&base, &token, &room, &mut since, &|b| {
        b.contains("listening")
    });
    assert!(reply.starts_with("On air"), "{reply}");

    // Off air.
    drop(src);
    let off = wait_message(&base, &token, &room, &mut since, &|b| {
        b.contains("Эфир окончен")
    });
    assert!(off.contains("Off air"), "{off}");
}
