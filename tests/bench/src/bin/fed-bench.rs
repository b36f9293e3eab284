//! Federation figures between two `secta` boxes on loopback (TLS between them),
//! printed as one JSON object: delivery latency A→B, catch-up time for events
//! queued while B was down, and the time and B's peak RSS to join a room with
//! many state events.
//!
//! `fed-bench --spawn PATH/TO/secta [--messages 200] [--queued 10000] [--state 5000]`

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "fed-bench",
    about = "Federation figures between two secta boxes"
)]
struct Args {
    /// The `secta` binary to run as both boxes.
    #[arg(long)]
    spawn: PathBuf,
    /// Messages A→B for the delivery latency (sent one at a time).
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Messages A sends while B is down, for the catch-up time.
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// State events in the room B joins, for the join figures.
    #[arg(long, default_value_t = 5000)]
    state: usize,
    /// Keep the boxes' data directories.
    #[arg(long)]
    keep: bool,
}

struct Box_ {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    tls: u16,
    peer: (u16, u16),
    child: Option<Child>,
    base: String,
}

impl Box_ {
    fn start(&mut self) {
        let log = std::fs::File::create(self.data.with_extension("log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("demo")
            .arg("--data")
            .arg(&self.data)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args([
                "--federation-tls-listen",
                &format!("127.0.0.1:{}", self.tls),
            ])
            .args([
                "--peer",
                &format!(
                    "127.0.0.1:{}=https://127.0.0.1:{}",
                    self.peer.0, self.peer.1
                ),
            ])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn secta");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn admin(&self, args: &[&str]) {
        let out = Command::new(&self.bin)
            .args(["admin", "--data"])
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Box_ {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn enc(s: &str) -> String {
    s.replace('!', "%21")
        .replace(':', "%3A")
        .replace('$', "%24")
        .replace('@', "%40")
        .replace('#', "%23")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 1000.0).round() / 1000.0
}

struct Http {
    c: reqwest::Client,
}

impl Http {
    async fn call(
        &self,
        method: &str,
        url: &str,
        token: &str,
        body: Value,
    ) -> Result<Value, String> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.c.request(m, url).bearer_auth(token);
        if method != "GET" {
            rb = rb.json(&body);
        }
        let r = rb.send().await.map_err(|e| e.to_string())?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!("{status} {v}"))
        }
    }

    async fn wait_up(&self, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self
                .c
                .get(format!("{base}/_matrix/client/versions"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{base} did not start within 60 s");
    }

    async fn login(&self, base: &str, user: &str) -> String {
        let v = self
            .call(
                "POST",
                &format!("{base}/_matrix/client/v3/login"),
                "",
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "pw"}),
            )
            .await
            .expect("login");
        v["access_token"].as_str().unwrap().to_owned()
    }

    async fn send(&self, base: &str, token: &str, room: &str, txn: &str, body: &str) {
        self.call(
            "PUT",
            &format!(
                "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                enc(room)
            ),
            token,
            json!({"msgtype": "m.text", "body": body}),
        )
        .await
        .expect("send");
    }
}

/// Sends `n` messages from A with up to 8 in flight; bodies `{prefix}{i}`.
async fn burst(h: &Arc<Http>, base: &str, token: &str, room: &str, prefix: &str, n: usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (h, base, token, room, prefix) = (
            h.clone(),
            base.to_owned(),
            token.to_owned(),
            room.to_owned(),
            prefix.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            h.send(
                &base,
                &token,
                &room,
                &format!("{prefix}{i}"),
                &format!("{prefix}{i}"),
            )
            .await;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("secta-fed-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pa, pb) = ((free_port(), free_port()), (free_port(), free_port()));
    let mk = |name: &str, me: (u16, u16), peer: (u16, u16)| Box_ {
        bin: args.spawn.clone(),
        data: dir.join(name),
        port: me.0,
        tls: me.1,
        peer,
        child: None,
        base: format!("http://127.0.0.1:{}", me.0),
    };
    let mut a = mk("a", pa, pb);
    let mut b = mk("b", pb, pa);
    let h = Arc::new(Http {
        c: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
    });
    for x in [&mut a, &mut b] {
        std::fs::create_dir_all(&x.data).unwrap();
        x.start();
        h.wait_up(&x.base).await;
    }
    a.admin(&["user", "create", "alice", "--password", "pw"]);
    b.admin(&["user", "create", "bob", "--password", "pw"]);
    let alice = h.login(&a.base, "alice").await;
    let mut bob = h.login(&b.base, "bob").await;
    let a_name = format!("127.0.0.1:{}", pa.0);
    let create = |body: Value| {
        let (h, base, alice) = (h.clone(), a.base.clone(), alice.clone());
        async move {
            h.call(
                "POST",
                &format!("{base}/_matrix/client/v3/createRoom"),
                &alice,
                body,
            )
            .await
            .expect("createRoom")["room_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let join_url = |base: &str, room: &str| {
        format!(
            "{base}/_matrix/client/v3/join/{}?server_name={}",
            enc(room),
            enc(&a_name)
        )
    };
    let room = create(json!({"preset": "public_chat"})).await;
    h.call("POST", &join_url(&b.base, &room), &bob, json!({}))
        .await
        .expect("join");

    // 1. Delivery latency A→B: bob long-polls on B, alice sends one at a time.
    eprintln!("fed-bench: delivery latency, {} messages", args.messages);
    let v = h
        .call(
            "GET",
            &format!("{}/_matrix/client/v3/sync", b.base),
            &bob,
            json!({}),
        )
        .await
        .unwrap();
    let mut since = v["next_batch"].as_str().unwrap().to_owned();
    let mut lat = Vec::new();
    for i in 0..args.messages {
        let body = format!("lat{i}");
        let sent = Instant::now();
        h.send(&a.base, &alice, &room, &body, &body).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        'wait: while Instant::now() < deadline {
            let v = h
                .call(
                    "GET",
                    &format!(
                        "{}/_matrix/client/v3/sync?timeout=10000&since={since}",
                        b.base
                    ),
                    &bob,
                    json!({}),
                )
                .await
                .unwrap();
            since = v["next_batch"].as_str().unwrap().to_owned();
            for e in v["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if e["content"]["body"] == body.as_str() {
                    lat.push(sent.elapsed().as_secs_f64() * 1000.0);
                    break 'wait;
                }
            }
        }
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());

    // 2. Catch-up: B down while A sends, then B back.
    eprintln!(
        "fed-bench: catch-up, {} messages queued while B is down",
        args.queued
    );
    b.stop();
    let t = Instant::now();
    burst(&h, &a.base, &alice, &room, "q", args.queued).await;
    let queue_ms = t.elapsed().as_secs_f64() * 1000.0;
    let last = format!("q{}", args.queued - 1);
    let back = Instant::now();
    b.start();
    h.wait_up(&b.base).await;
    // B speaking to A is what tells A it is back (A retries at once).
    bob = h.login(&b.base, "bob").await;
    h.send(&b.base, &bob, &room, "back", "back").await;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut caught_up = None;
    while Instant::now() < deadline {
        let recent = h
            .call(
                "GET",
                &format!(
                    "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=3",
                    b.base,
                    enc(&room)
                ),
                &bob,
                json!({}),
            )
            .await
            .ok();
        let arrived = recent.is_some_and(|v| {
            v["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["content"]["body"] == last.as_str())
        });
        if arrived {
            caught_up = Some(back.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. Join a room with many state events, B freshly restarted (its peak RSS
    // then covers start-up and the join).
    eprintln!("fed-bench: join a room with {} state events", args.state);
    let big = create(json!({"preset": "public_chat"})).await;
    let sem = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..args.state {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (h, base, alice, big) = (h.clone(), a.base.clone(), alice.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            h.call(
                "PUT",
                &format!(
                    "{base}/_matrix/client/v3/rooms/{}/state/org.secta.bench/k{i}",
                    enc(&big)
                ),
                &alice,
                json!({"n": i, "pad": "x".repeat(64)}),
            )
            .await
            .expect("state");
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    b.stop();
    b.start();
    h.wait_up(&b.base).await;
    bob = h.login(&b.base, "bob").await;
    let rss_before = kb(b.pid(), "VmRSS:");
    let t = Instant::now();
    let joined = h
        .call("POST", &join_url(&b.base, &big), &bob, json!({}))
        .await;
    let join_s = t.elapsed().as_secs_f64();
    let peak = kb(b.pid(), "VmHWM:");
    let state_on_b = h
        .call(
            "GET",
            &format!("{}/_matrix/client/v3/rooms/{}/state", b.base, enc(&big)),
            &bob,
            json!({}),
        )
        .await
        .map(|v| v.as_array().map_or(0, Vec::len))
        .unwrap_or(0);

    let out = json!({
        "delivery_ms": {"p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99), "max": lat.last(), "count": lat.len()},
        "catch_up": {"queued": args.queued, "queue_fill_ms": queue_ms.round(), "seconds_after_restart": caught_up},
        "join": {
            "state_events": args.state, "ok": joined.is_ok(), "error": joined.err(),
            "seconds": (join_s * 1000.0).round() / 1000.0,
            "state_on_b": state_on_b,
            "b_rss_before_kb": rss_before, "b_peak_rss_kb": peak,
        },
    });
    println!("{out}");
    a.stop();
    b.stop();
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
