//! Data at rest and the panic wipe, end to end through the `secta` binary:
//! a box with users, rooms, 1,000 messages, media, a VPN member, an exit and
//! the radio's passwords keeps no plaintext under its data directory; holding
//! the simulated panic button while clients send wipes it (key first, then
//! files) into its first-boot state; a wipe cut by `kill -9` is finished by
//! the next start; a missing key file stops the services that need it instead
//! of making a new key.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use serde_json::{json, Value};

struct Box_ {
    server: Server,
    panel: String,
}

fn start_box(data: &Path, env: &[(&str, &str)]) -> Box_ {
    let port = free_port();
    let panel_port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_extension("log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["demo", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--portal-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--radio-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--panel-listen", &format!("127.0.0.1:{panel_port}")])
        // Federation over TLS too: its self-signed key is made on first start.
        .args([
            "--federation-tls-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn secta");
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        name: format!("127.0.0.1:{port}"),
    };
    let panel = format!("http://127.0.0.1:{panel_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("{}/_matrix/client/versions", server.base))
        .call()
        .is_err()
        || ureq::get(&format!("{panel}/panel")).call().is_err()
    {
        assert!(Instant::now() < deadline, "the box did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Box_ { server, panel }
}

fn panel_state(b: &Box_) -> Value {
    ureq::get(&format!("{}/panel", b.panel))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

fn press(b: &Box_, pressed: bool) {
    ureq::post(&format!("{}/panel/buttons/0", b.panel))
        .send_json(json!({ "pressed": pressed }))
        .unwrap();
}

/// Every regular file under `dir`, with its bytes.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether a file opens as an SQLite database with any table in it (without a key).
fn opens_as_database(p: &Path) -> bool {
    rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .is_ok_and(|n| n > 0)
}

fn wipe_line(data: &Path) -> Value {
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    let line = log
        .lines()
        .find_map(|l| l.split_once("WIPE ").map(|(_, j)| j.to_owned()))
        .expect("a WIPE line in the log");
    serde_json::from_str(&line).unwrap()
}

fn upload(base: &str, token: &str, bytes: &[u8]) -> String {
    let v: Value = ureq::post(&format!(
        "{base}/_matrix/media/v3/upload?filename=canary.bin"
    ))
    .set("Authorization", &format!("Bearer {token}"))
    .set("Content-Type", "application/octet-stream")
    .send_bytes(bytes)
    .unwrap()
    .into_json()
    .unwrap();
    v["content_uri"].as_str().unwrap().to_owned()
}

fn download(base: &str, token: &str, mxc: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let path = mxc.trim_start_matches("mxc://");
    let mut req = ureq::get(&format!("{base}/_matrix/client/v1/media/download/{path}"))
        .set("Authorization", &format!("Bearer {token}"));
    if let Some(r) = range {
        req = req.set("Range", r);
    }
    let resp = req.call().unwrap();
    let status = resp.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
    (status, body)
}

const WORD: &str = "zebracanary";

#[test]
fn encrypted_box_wipes_under_load_into_first_boot_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("box");
    let b = start_box(&data, &[]);
    let base = b.server.base.clone();
    admin(&data, &["user", "create", "alice", "--password", "pw"]);
    admin(&data, &["user", "create", "bob", "--password", "pw"]);
    let alice = login(&base, "alice");
    let bob = login(&base, "bob");
    let room = create_room(
        &base,
        &alice,
        json!({"preset": "public_chat", "name": "Plaintext room name zebracanary"}),
    );
    call(
        "POST",
        &format!("{base}/_matrix/client/v3/rooms/{}/join", enc(&room)),
        &bob,
        json!({}),
    )
    .unwrap();
    for i in 0..1000 {
        let (tok, who) = if i % 2 == 0 {
            (&alice, "alice")
        } else {
            (&bob, "bob")
        };
        send(
            &base,
            tok,
            &room,
            &format!("t{i}"),
            &format!("{who} says {WORD} number {i}"),
        );
    }
    // Media: a recognisable pattern, 300 KB (five file chunks).
    let media: Vec<u8> = (0..300_000u32)
        .flat_map(|i| {
            if i % 1000 == 0 {
                b"MEDIACANARY".to_vec()
            } else {
                vec![(i % 251) as u8]
            }
        })
        .collect();
    let mxc = upload(&base, &alice, &media);
    let (status, body) = download(&base, &bob, &mxc, None);
    assert_eq!((status, body.len()), (200, media.len()));
    assert!(body == media);
    let (status, body) = download(&base, &bob, &mxc, Some("bytes=131000-131099"));
    assert_eq!(status, 206);
    assert_eq!(body, &media[131_000..131_100]);
    let (status, body) = download(&base, &bob, &mxc, Some("bytes=-10"));
    assert_eq!((status, body.as_slice()), (206, &media[media.len() - 10..]));
    // Search works on the encrypted database.
    let found = call(
        "POST",
        &format!("{base}/_matrix/client/v3/search"),
        &alice,
        json!({"search_categories": {"room_events": {"search_term": WORD}}}),
    )
    .unwrap();
    assert!(
        found["search_categories"]["room_events"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );

    // VPN keys and the radio's passwords: a member's device (its private and
    // preshared keys), an upstream exit (its private key), the source and bot
    // passwords.
    {
        use std::io::Write;
        let mut cfg = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("secta.toml"))
            .unwrap();
        writeln!(cfg, "\n[wireguard.members]\nendpoint = \"192.0.2.1:51820\"").unwrap();
    }
    let member_conf = admin(&data, &["vpn", "peers", "add", "phone"]);
    let conf_key = |conf: &str, name: &str| -> String {
        conf.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {conf}"))
            .trim_start_matches([' ', '='])
            .trim()
            .to_owned()
    };
    let exit_key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    let exit_file = tmp.path().join("exit.conf");
    std::fs::write(
        &exit_file,
        format!("[Interface]\nPrivateKey = {exit_key}\nAddress = 10.9.0.2/32\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n"),
    )
    .unwrap();
    admin(&data, &["vpn", "exit", "set", exit_file.to_str().unwrap()]);
    assert!(admin(&data, &["vpn", "peers", "list"]).starts_with("phone\t"));
    let source_password = admin(&data, &["radio-password"]).trim().to_owned();
    let vault = secta_vault::Vault::open(&Default::default(), &data)
        .unwrap()
        .unwrap();
    let bot_password = secta_vault::secret::read(
        Some(&vault.file_cipher().unwrap()),
        &data.join("radio/bot_password"),
    )
    .unwrap()
    .expect("the radio bot's password was made");
    drop(vault);
    let secrets = [
        (
            "a member's WireGuard private key",
            conf_key(&member_conf, "PrivateKey"),
        ),
        (
            "a member's preshared key",
            conf_key(&member_conf, "PresharedKey"),
        ),
        ("the exit's private key", exit_key.to_owned()),
        ("the radio's source password", source_password),
        (
            "the radio bot's password",
            String::from_utf8(bot_password.to_vec()).unwrap(),
        ),
    ];
    for (what, s) in &secrets {
        assert!(s.len() >= 20, "{what}: {s:?}");
    }

    // The audit: encrypted, where the key is, what would go; never the key.
    let audit = admin(&data, &["audit"]);
    assert!(audit.contains("encrypted:        yes"), "{audit}");
    assert!(audit.contains(&data.join("data.key").display().to_string()));
    assert!(audit.contains("homeserver.db") && audit.contains("media"));
    // It lists the VPN keys and the radio's files among the encrypted ones,
    // and none of them in the clear.
    let section = |title: &str| -> String {
        let after = audit
            .split(title)
            .nth(1)
            .unwrap_or_else(|| panic!("{audit}"));
        after
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (encrypted, clear) = (
        section("encrypted under the data key"),
        section("in the clear ("),
    );
    for entry in ["wireguard", "radio", "homeserver.db", "media"] {
        assert!(
            encrypted.contains(&format!("{} (", data.join(entry).display())),
            "{entry} not listed as encrypted: {audit}"
        );
    }
    for f in [
        "wireguard",
        "source_password",
        "bot_password",
        "media",
        "homeserver.db",
    ] {
        assert!(!clear.contains(f), "{f} listed in the clear: {audit}");
    }
    let audit_json: Value = serde_json::from_str(&admin(&data, &["audit", "--json"])).unwrap();
    assert_eq!(audit_json["encrypted"], true);
    let key_bytes = std::fs::read(data.join("data.key")).unwrap();
    assert!(!audit.contains(&hex(&key_bytes[49..81])));

    // No plaintext anywhere under the data directory (WAL and all).
    let files = all_files(&data);
    assert!(files.iter().any(|(p, _)| p.ends_with("homeserver.db")));
    assert!(files
        .iter()
        .any(|(p, _)| p.ends_with("wireguard/wireguard.db")));
    for (p, bytes) in &files {
        for (what, s) in &secrets {
            assert!(
                !contains(bytes, s.as_bytes()),
                "{what} in the clear in {}",
                p.display()
            );
        }
        assert!(
            !contains(bytes, WORD.as_bytes()),
            "message text in the clear in {}",
            p.display()
        );
        assert!(
            !contains(bytes, b"MEDIACANARY"),
            "media bytes in the clear in {}",
            p.display()
        );
        assert!(
            !contains(bytes, b"SQLite format 3"),
            "an unencrypted SQLite file: {}",
            p.display()
        );
        assert!(
            !contains(bytes, b"@alice:"),
            "a user id in the clear in {}",
            p.display()
        );
        assert!(
            !contains(bytes, b"PRIVATE KEY"),
            "a private key in the clear in {}",
            p.display()
        );
    }
    assert!(
        files.iter().any(|(p, _)| p.ends_with("federation-tls.key")),
        "the federation TLS key was made"
    );
    assert!(!opens_as_database(&data.join("homeserver.db")));

    // Clients keep sending while the panic button is held.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = [alice.clone(), bob.clone()]
        .into_iter()
        .enumerate()
        .map(|(k, tok)| {
            let (base, room, stop, sent) = (base.clone(), room.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && i < 5000 {
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/load{k}-{i}",
                        enc(&room)
                    );
                    if call(
                        "PUT",
                        &url,
                        &tok,
                        json!({"msgtype": "m.text", "body": "load"}),
                    )
                    .is_ok()
                    {
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = sent.load(Ordering::SeqCst);
    press(&b, true);
    // The strip counts down (armed), then the wipe runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_armed = false;
    loop {
        let s = panel_state(&b);
        let state = s["status"]["wipe"]["state"].as_str().unwrap().to_owned();
        saw_armed |= state == "armed";
        if state == "wiped" {
            break;
        }
        assert!(Instant::now() < deadline, "not wiped in time: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    press(&b, false);
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }
    assert!(saw_armed, "the countdown was shown");
    assert!(
        sent.load(Ordering::SeqCst) > before,
        "clients were sending during the countdown"
    );

    // The strip shows "wiped" (all LEDs the same lit colour) from its next frame on.
    let wiped_frame = |s: &Value| {
        let frame: Vec<&str> = s["frame"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        frame.iter().all(|c| *c == frame[0] && *c != "#000000")
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut s = panel_state(&b);
    while !wiped_frame(&s) {
        assert!(
            Instant::now() < deadline,
            "the strip does not show wiped: {s}"
        );
        std::thread::sleep(Duration::from_millis(10));
        s = panel_state(&b);
    }
    assert_eq!(s["rows"], json!(["wiped"]));

    // Key first, everything gone, nothing opens, within the budget.
    let w = wipe_line(&data);
    assert!(w["reason"].as_str().unwrap().contains("LongPress"), "{w}");
    let key_ms = w["key_destroyed_ms"].as_f64().unwrap();
    assert!(key_ms <= w["files_deleted_ms"].as_f64().unwrap());
    assert!(w["finished_ms"].as_f64().unwrap() < 5000.0, "{w}");
    assert_eq!(w["errors"], json!([]));
    assert_eq!(w["services_stopped"], true, "{w}");
    assert!(!data.join("data.key").exists());
    let mut left: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec![".lock", "secta.toml"], "first-boot state");
    for (p, bytes) in all_files(&data) {
        assert!(
            !opens_as_database(&p),
            "{} opens as a database",
            p.display()
        );
        assert!(!contains(&bytes, WORD.as_bytes()));
    }
    // The homeserver is gone; the panel still answers.
    assert!(ureq::get(&format!("{base}/_matrix/client/versions"))
        .call()
        .is_err());

    // Next start: a new box.
    drop(b);
    let b = start_box(&data, &[]);
    let r = ureq::post(&format!("{}/_matrix/client/v3/login", b.server.base))
        .send_json(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw"}));
    assert!(
        matches!(r, Err(ureq::Error::Status(403, _))),
        "old accounts are gone"
    );
    assert!(data.join("data.key").exists());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_wipe_cut_by_kill_9_is_finished_by_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("box");
    // The wipe pauses 3 s after destroying the key (a test hook), so the kill lands mid-wipe.
    let mut b = start_box(&data, &[("SECTA_WIPE_TEST_PAUSE_MS", "3000")]);
    admin(
        &data,
        &["user", "create", "carol", "--password", "pw", "--admin"],
    );
    let carol = login(&b.server.base, "carol");
    let room = create_room(&b.server.base, &carol, json!({}));
    send(&b.server.base, &carol, &room, "1", "before the wipe");
    // The duress action through the HTTP endpoint (as the web app's admin page does).
    let r = ureq::post(&format!("{}/admin/wipe", b.panel))
        .set("Authorization", "Bearer wrong")
        .send_json(json!({"confirm": "wipe"}));
    assert!(matches!(r, Err(ureq::Error::Status(403, _))));
    let r = ureq::post(&format!("{}/admin/wipe", b.panel))
        .set("Authorization", &format!("Bearer {carol}"))
        .send_json(json!({"confirm": "nope"}));
    assert!(matches!(r, Err(ureq::Error::Status(400, _))));
    let r = ureq::post(&format!("{}/admin/wipe", b.panel))
        .set("Authorization", &format!("Bearer {carol}"))
        .send_json(json!({"confirm": "wipe"}))
        .unwrap();
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while data.join("data.key").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Power loss: key gone, data still there, marker there.
    b.server.child.kill().unwrap();
    b.server.child.wait().unwrap();
    assert!(data.join(".wipe-in-progress").exists());
    assert!(
        data.join("homeserver.db").exists(),
        "killed before the files went"
    );
    let audit = admin(&data, &["audit"]);
    assert!(audit.contains("WIPE IN PROGRESS"), "{audit}");
    // Other admin commands refuse until the wipe is finished.
    let out = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["admin", "--data"])
        .arg(&data)
        .args(["user", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The next start finishes the wipe before anything else and comes up new.
    let b = start_box(&data, &[]);
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("finished the interrupted wipe"), "{log}");
    assert!(!data.join(".wipe-in-progress").exists());
    let r = ureq::post(&format!("{}/_matrix/client/v3/login", b.server.base))
        .send_json(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carol"}, "password": "pw"}));
    assert!(matches!(r, Err(ureq::Error::Status(403, _))));
}

#[test]
fn a_missing_key_file_refuses_to_start_and_makes_no_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("box");
    drop(start_box(&data, &[]));
    std::fs::remove_file(data.join("data.key")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["demo", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--portal-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--panel-listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key file") && err.contains("refusing"),
        "{err}"
    );
    assert!(
        !data.join("data.key").exists(),
        "no new key over existing data"
    );
    assert!(data.join("homeserver.db").exists(), "nothing deleted");
    // The admin CLI says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["admin", "--data"])
        .arg(&data)
        .args(["user", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing"));
    // `secta admin wipe --yes` gets such a box back to its first-boot state.
    assert!(admin(&data, &["wipe", "--yes"]).contains("first-boot state"));
    let mut left: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec![".lock", "secta.toml"]);
}
