//! The box loses no acknowledged write: not when killed with SIGKILL in the middle
//! of a burst of sends, and not on a graceful SIGTERM.

mod common;

use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{admin, enc, free_port, login, start, Server};
use serde_json::{json, Value};

/// Sends from 4 threads until told to stop or the server goes away; returns acknowledged event ids.
fn burst(
    base: &str,
    token: &str,
    room: &str,
    stop: Arc<Mutex<bool>>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..4)
        .map(|t| {
            let (base, token, room, stop) = (
                base.to_owned(),
                token.to_owned(),
                room.to_owned(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..5000 {
                    if *stop.lock().unwrap() {
                        break;
                    }
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/t{t}-{i}",
                        enc(&room)
                    );
                    match ureq::put(&url)
                        .set("Authorization", &format!("Bearer {token}"))
                        .timeout(Duration::from_secs(5))
                        .send_json(json!({"msgtype": "m.text", "body": format!("{t}/{i}")}))
                    {
                        Ok(r) => acked.push(
                            r.into_json::<Value>().unwrap()["event_id"]
                                .as_str()
                                .unwrap()
                                .to_owned(),
                        ),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

fn setup(data: &Path) -> (Server, String, String) {
    let server = start(data, free_port(), &[]);
    admin(data, &["user", "create", "alice", "--password", "pw"]);
    let token = login(&server.base, "alice");
    let v: Value = ureq::post(&format!("{}/_matrix/client/v3/createRoom", server.base))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(json!({}))
        .unwrap()
        .into_json()
        .unwrap();
    (server, token, v["room_id"].as_str().unwrap().to_owned())
}

fn check_all_present(data: &Path, acked: &[String], room: &str) {
    // The database is encrypted: key the connection as the box does.
    let vault = secta_vault::Vault::open(&Default::default(), data)
        .unwrap()
        .unwrap();
    let conn = rusqlite::Connection::open(data.join("homeserver.db")).unwrap();
    let key = vault.sqlcipher_key("homeserver.db").unwrap();
    conn.execute_batch(&secta_vault::sqlcipher_keying(&key))
        .unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(conn);
    let server = start(data, free_port(), &[]);
    let token = login(&server.base, "alice");
    for id in acked {
        let r = ureq::get(&format!(
            "{}/_matrix/client/v3/rooms/{}/event/{}",
            server.base,
            enc(room),
            enc(id)
        ))
        .set("Authorization", &format!("Bearer {token}"))
        .call();
        assert!(r.is_ok(), "acknowledged event {id} lost after restart");
    }
}

#[test]
fn sigkill_mid_burst_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, token, room) = setup(dir.path());
    let stop = Arc::new(Mutex::new(false));
    let threads = burst(&server.base, &token, &room, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    *stop.lock().unwrap() = true;
    let acked: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        acked.len() > 20,
        "the burst should have sent a good number before the kill ({})",
        acked.len()
    );
    check_all_present(dir.path(), &acked, &room);
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, token, room) = setup(dir.path());
    let stop = Arc::new(Mutex::new(false));
    let threads = burst(&server.base, &token, &room, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "secta did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    *stop.lock().unwrap() = true;
    let acked: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(!acked.is_empty());
    // A clean shutdown checkpoints the WAL into the database file.
    let wal = dir.path().join("homeserver.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL left behind after clean shutdown"
    );
    check_all_present(dir.path(), &acked, &room);
}
