//! Helpers shared by the `secta` binary's tests: start boxes, run admin commands,
//! log in, call the API.
#![allow(dead_code)]

pub mod netns;

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// A running `secta demo`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub name: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `secta demo` on `port` with extra arguments; stderr goes to `DATA.log`.
pub fn start(data: &Path, port: u16, extra: &[String]) -> Server {
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["demo", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn secta");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ureq::get(&format!("{base}/_matrix/client/versions"))
            .call()
            .is_ok()
        {
            return Server {
                child,
                base,
                name: format!("127.0.0.1:{port}"),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("secta did not start within 30 s");
}

/// Runs `secta admin --data DATA ARGS…` and returns its stdout.
pub fn admin(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_secta"))
        .args(["admin", "--data"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Logs in with password `pw` and returns the access token.
pub fn login(base: &str, user: &str) -> String {
    let v: Value = ureq::post(&format!("{base}/_matrix/client/v3/login"))
        .send_json(json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "pw"}))
        .unwrap()
        .into_json()
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// Percent-encodes the characters of Matrix ids that matter in paths.
pub fn enc(s: &str) -> String {
    s.replace('!', "%21")
        .replace(':', "%3A")
        .replace('$', "%24")
        .replace('@', "%40")
}

/// An authenticated JSON request; errors come back as "STATUS BODY".
pub fn call(method: &str, url: &str, token: &str, body: Value) -> Result<Value, String> {
    match ureq::request(method, url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
    {
        Ok(r) => Ok(r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            Err(format!("{code} {}", r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Creates a room with the given `createRoom` body and returns its id.
pub fn create_room(base: &str, token: &str, body: Value) -> String {
    call(
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        token,
        body,
    )
    .expect("createRoom")["room_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Sends an `m.text` message with transaction id `txn`.
pub fn send(base: &str, token: &str, room: &str, txn: &str, body: &str) {
    call(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        ),
        token,
        json!({"msgtype": "m.text", "body": body}),
    )
    .expect("send");
}
