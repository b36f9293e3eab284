//! The box loses no acknowledged write: not when killed with SIGKILL in the middle
//! of a burst of sends, and not on a graceful SIGTERM.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(data: &Path, port: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["demo", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn secta");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ureq::get(&format!("{base}/_matrix/client/versions")).call().is_ok() {
            return Server { child, base };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("secta did not start within 30 s");
}

fn admin(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_secta")).args(["admin", "--data"]).arg(data).args(args).output().unwrap();
    assert!(out.status.success(), "admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn login(base: &str, user: &str) -> String {
    let v: Value = ureq::post(&format!("{base}/_matrix/client/v3/login"))
        .send_json(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "pw"}))
        .unwrap()
        .into_json()
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('$', "%24")
}

/// Sends from 4 threads until told to stop or the server goes away; returns acknowledged event ids.
fn burst(base: &str, token: &str, room: &str, stop: Arc<Mutex<bool>>) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..4)
        .map(|t| {
            let (base, token, room, stop) = (base.to_owned(), token.to_owned(), room.to_owned(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..5000 {
                    if *stop.lock().unwrap() {
                        break;
                    }
                    let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/t{t}-{i}", enc(&room));
                    match ureq::put(&url)
                        .set("Authorization", &format!("Bearer {token}"))
                        .timeout(Duration::from_secs(5))
                        .send_json(json!({"msgtype": "m.text", "body": format!("{t}/{i}")}))
                    {
                        Ok(r) => acked.push(r.into_json::<Value>().unwrap()["event_id"].as_str().unwrap().to_owned()),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

fn setup(data: &Path) -> (Server, String, String) {
    let server = start(data, free_port());
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
    let conn = rusqlite::Connection::open(data.join("homeserver.db")).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    drop(conn);
    let server = start(data, free_port());
    let token = login(&server.base, "alice");
    for id in acked {
        let r = ureq::get(&format!("{}/_matrix/client/v3/rooms/{}/event/{}", server.base, enc(room), enc(id)))
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
    let acked: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(acked.len() > 20, "the burst should have sent a good number before the kill ({})", acked.len());
    check_all_present(dir.path(), &acked, &room);
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, token, room) = setup(dir.path());
    let stop = Arc::new(Mutex::new(false));
    let threads = burst(&server.base, &token, &room, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "secta did not stop within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    *stop.lock().unwrap() = true;
    let acked: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(!acked.is_empty());
    // A clean shutdown checkpoints the WAL into the database file.
    let wal = dir.path().join("homeserver.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0, "WAL left behind after clean shutdown");
    check_all_present(dir.path(), &acked, &room);
}
