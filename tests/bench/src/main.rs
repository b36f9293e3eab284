//! `secta-bench`: a load generator for any Matrix homeserver.
//!
//! It speaks the Client-Server API over plain HTTP, creates its own users
//! through the Synapse-compatible shared-secret admin endpoint, and prints one
//! JSON object with the figures on stdout. Progress goes to stderr.
//!
//! Every loop is bounded in count and time: `--max-seconds` caps the whole
//! run, and each request has its own timeout.

use std::{
    collections::{BTreeMap, HashSet},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod keys;
mod media;
mod sliding;

use clap::Parser;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

/// What the bench does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Users, rooms, concurrent senders and long-polling /sync listeners (the default).
    Chat,
    /// End-to-end encryption keys: device keys and one-time keys upload, /keys/query, /keys/claim.
    Keys,
    /// First, full-list and incremental simplified sliding sync (MSC4186) for a user in many rooms.
    Sliding,
    /// Large media upload and download throughput, and the server's RSS meanwhile.
    Media,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Chat => "chat",
            Scenario::Keys => "keys",
            Scenario::Sliding => "sliding",
            Scenario::Media => "media",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "secta-bench",
    about = "Load generator for a Matrix homeserver (Client-Server API over HTTP)"
)]
struct Args {
    /// Workload to run; each prints its own JSON figures.
    #[arg(long, value_enum, default_value_t = Scenario::Chat)]
    scenario: Scenario,
    /// Base URL of the homeserver, e.g. http://127.0.0.1:8008 (loopback only).
    #[arg(long, required_unless_present = "spawn", conflicts_with = "spawn")]
    url: Option<String>,
    /// Pid of the server process, to read its resident memory (VmRSS). RSS figures are null without it.
    #[arg(long, conflicts_with = "spawn")]
    pid: Option<u32>,
    /// Start `BIN demo --data <fresh tempdir> --listen 127.0.0.1:<free port>` (a secta binary) and bench it.
    #[arg(long)]
    spawn: Option<PathBuf>,
    /// Keep the spawned server's data directory (and its server.log) instead of deleting it.
    #[arg(long, requires = "spawn")]
    keep_data: bool,
    /// Spawn `BIN run` with only the homeserver (no portal, radio or panel, which `demo`
    /// also starts): the Matrix server alone, as other homeservers are measured.
    #[arg(long, requires = "spawn")]
    homeserver_only: bool,
    /// Shared secret for /_synapse/admin/v1/register.
    #[arg(long, conflicts_with = "shared_secret_file")]
    shared_secret: Option<String>,
    /// File holding the shared secret (whitespace is trimmed).
    #[arg(long)]
    shared_secret_file: Option<PathBuf>,
    /// Users to register.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Rooms to create (chat: 20; sliding: 200 unless given).
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Set after parsing: --rooms was given on the command line.
    #[arg(skip)]
    rooms_given: bool,
    /// Messages to send in total.
    #[arg(long, default_value_t = 10000)]
    messages: usize,
    /// Concurrent senders (each a different user; capped at --users).
    #[arg(long, default_value_t = 50)]
    senders: usize,
    /// Long-polling /sync clients (one per user; capped at --users).
    #[arg(long, default_value_t = 100)]
    listeners: usize,
    /// Offered load in messages per second over all senders (open loop: message i is sent
    /// no earlier than i/rate s after the send phase starts). 0 = as fast as the senders can.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Listeners post an m.read receipt for the newest event of each room their sync returned
    /// (like a client showing every room), in the background.
    #[arg(long)]
    read_receipts: bool,
    /// Rooms each user is in (user 0 is in all of them).
    #[arg(long, default_value_t = 5)]
    rooms_per_user: usize,
    /// Timeline limit in the listeners' sync filter (so bursts are not cut off by limited timelines).
    #[arg(long, default_value_t = 100)]
    timeline_limit: u32,
    /// Concurrent registrations (password hashing is costly on the server).
    #[arg(long, default_value_t = 4)]
    register_concurrency: usize,
    /// Concurrent joins / room creations / initial syncs during setup.
    #[arg(long, default_value_t = 8)]
    setup_concurrency: usize,
    /// Name echoed into the JSON.
    #[arg(long)]
    label: Option<String>,
    /// Hard limit on the whole run; figures gathered so far are still printed.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// keys: devices per user (each a separate password login with a chosen device_id).
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// keys: signed_curve25519 one-time keys each device uploads (the server accepts at most 200 per upload).
    #[arg(long, default_value_t = 50)]
    one_time_keys: usize,
    /// keys: /keys/query requests for --query-users users each (sequential).
    #[arg(long, default_value_t = 100)]
    queries: usize,
    /// keys: users named in each of those queries.
    #[arg(long, default_value_t = 10)]
    query_users: usize,
    /// keys: claim rounds; each round claims one key for every device of every user (one request per user).
    #[arg(long, default_value_t = 3)]
    claim_rounds: usize,
    /// keys: concurrent /keys/claim requests.
    #[arg(long, default_value_t = 10)]
    claim_concurrency: usize,
    /// sliding: timed runs per figure (median reported); media: 3 unless given.
    #[arg(long)]
    runs: Option<usize>,
    /// media: size of the large file in MiB.
    #[arg(long, default_value_t = 50)]
    media_mb: usize,
    /// media: size of the small file in MiB (0 skips it), to see whether the server's RSS grows with the file size.
    #[arg(long, default_value_t = 10)]
    media_small_mb: usize,
}

// ---------------------------------------------------------------------------
// Figures

#[derive(Serialize, Default, Clone)]
struct SendFigures {
    p50: Option<f64>,
    p99: Option<f64>,
    mean: Option<f64>,
    max: Option<f64>,
    count: usize,
}

#[derive(Serialize, Default, Clone)]
struct DeliveryFigures {
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    /// Deliveries received (one per listener per message from another user).
    count: usize,
    /// Deliveries that should have been received for the messages the server accepted.
    expected: usize,
    /// The same event seen twice by one listener.
    duplicates: usize,
    /// Incremental sync responses with a limited timeline in some room (events may be skipped).
    limited_timelines: usize,
    /// Sync responses the listeners received while messages were sent: with
    /// `count`, how many events one response carries (the server's coalescing).
    sync_responses: usize,
}

#[derive(Serialize, Default, Clone)]
struct Report {
    label: String,
    url: String,
    run_id: String,
    users: usize,
    rooms: usize,
    messages: usize,
    senders: usize,
    listeners: usize,
    /// Offered messages/s (null = closed loop, as fast as possible).
    rate: Option<f64>,
    read_receipts: bool,
    startup_ms: Option<f64>,
    idle_rss_kb: Option<u64>,
    rss_after_kb: Option<u64>,
    /// VmRSS after registration (password hashing), after rooms/joins, and right after the send phase.
    rss_after_register_kb: Option<u64>,
    rss_after_setup_kb: Option<u64>,
    rss_after_send_kb: Option<u64>,
    peak_rss_kb: Option<u64>,
    users_registered: usize,
    register_ms: Option<f64>,
    rooms_created: usize,
    joins_ok: usize,
    setup_ms: Option<f64>,
    listeners_ready: usize,
    send_ms: SendFigures,
    messages_sent_ok: usize,
    send_wall_ms: Option<f64>,
    throughput_msgs_per_s: Option<f64>,
    /// CPU seconds (user + system) the server and this bench used during the send phase.
    server_cpu_s_send: Option<f64>,
    bench_cpu_s_send: Option<f64>,
    /// CPU seconds of the server over the whole run (from the first request to the end).
    server_cpu_s_total: Option<f64>,
    delivery_ms: DeliveryFigures,
    initial_sync_ms: Option<f64>,
    initial_sync_rooms: Option<usize>,
    initial_sync_bytes: Option<usize>,
    /// Non-2xx responses and transport failures: endpoint -> "status errcode" -> count.
    errors: BTreeMap<String, BTreeMap<String, u64>>,
    errors_total: u64,
    /// Lines with WARN / ERROR in the spawned server's log (only with --spawn).
    server_log: Option<BTreeMap<String, u64>>,
    /// /proc/loadavg 1-minute figure before and after the run: other work on the machine skews the figures.
    loadavg_1m_before: Option<f64>,
    loadavg_1m_after: Option<f64>,
    timed_out: bool,
    wall_s: f64,
}

fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// HTTP

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Put,
}

struct Http {
    client: reqwest::Client,
    base: String,
    errors: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    /// First response body (truncated) per "endpoint status errcode", for the new scenarios' reports.
    samples: Mutex<BTreeMap<String, String>>,
}

const REQ_TIMEOUT: Duration = Duration::from_secs(60);

impl Http {
    fn count(&self, endpoint: &str, what: &str) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *e.entry(endpoint.to_owned())
            .or_default()
            .entry(what.to_owned())
            .or_default() += 1;
    }

    /// Counts a failure like `count` and keeps the first sample of its body (or error text).
    fn count_with_sample(&self, endpoint: &str, what: &str, sample: &str) {
        self.count(endpoint, what);
        let mut m = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(format!("{endpoint} {what}"))
            .or_insert_with(|| sample.chars().take(500).collect());
    }

    /// One request. Returns the JSON body on 2xx; counts anything else under `endpoint`
    /// and returns None. 429 is retried (up to 5 times, honouring retry_after_ms up to 5 s).
    async fn call(
        &self,
        endpoint: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Option<Value> {
        let url = format!("{}{}", self.base, path);
        for attempt in 0..=5 {
            let mut rb = match method {
                Method::Get => self.client.get(&url),
                Method::Post => self.client.post(&url),
                Method::Put => self.client.put(&url),
            }
            .timeout(timeout);
            if let Some(t) = token {
                rb = rb.bearer_auth(t);
            }
            if let Some(b) = body {
                rb = rb.json(b);
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.count_with_sample(
                        endpoint,
                        if e.is_timeout() {
                            "timeout"
                        } else {
                            "transport"
                        },
                        &e.to_string(),
                    );
                    return None;
                }
            };
            let status = resp.status();
            let bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timeout (body)"
                    } else {
                        "transport (body)"
                    };
                    self.count_with_sample(endpoint, what, &e.to_string());
                    return None;
                }
            };
            let v: Option<Value> = serde_json::from_slice(&bytes).ok();
            if status.is_success() {
                if v.is_none() {
                    self.count_with_sample(
                        endpoint,
                        &format!("{} bad JSON", status.as_u16()),
                        &String::from_utf8_lossy(&bytes),
                    );
                }
                return v;
            }
            let errcode = v
                .as_ref()
                .and_then(|v| v.get("errcode"))
                .and_then(Value::as_str)
                .unwrap_or("-");
            self.count_with_sample(
                endpoint,
                &format!("{} {}", status.as_u16(), errcode),
                &String::from_utf8_lossy(&bytes),
            );
            if status.as_u16() == 429 && attempt < 5 {
                let wait = v
                    .as_ref()
                    .and_then(|v| v.get("retry_after_ms"))
                    .and_then(Value::as_u64)
                    .unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(wait.clamp(10, 5000))).await;
                continue;
            }
            return None;
        }
        None
    }

    /// One request whose failure is expected or examined by the caller: nothing is counted.
    /// Returns the status and the body parsed as JSON (Null if it is not JSON).
    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{}", self.base, path);
        let mut rb = match method {
            Method::Get => self.client.get(&url),
            Method::Post => self.client.post(&url),
            Method::Put => self.client.put(&url),
        }
        .timeout(REQ_TIMEOUT);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of a sorted slice.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn read_rss_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// utime + stime of a process in seconds (`/proc/PID/stat`, assuming USER_HZ = 100 as on Linux).
fn read_cpu_s(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn run_id() -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0) as u64;
    let mut x = n ^ ((std::process::id() as u64) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    // xorshift to spread the bits, then base36.
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..7)
        .map(|i| alphabet[((x >> (i * 5)) % 36) as usize] as char)
        .collect()
}

// ---------------------------------------------------------------------------
// Spawned server

struct Spawned {
    child: Child,
    dir: PathBuf,
    keep: bool,
}

impl Spawned {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `extra_hs_config`: lines added to the `[homeserver]` section of a `secta.toml` written into the
/// fresh data directory before the first start (what `secta demo` would write, plus these lines).
fn spawn_server(
    bin: &Path,
    dir: &Path,
    extra_hs_config: Option<&str>,
    homeserver_only: bool,
) -> anyhow_lite::Result<(Child, String)> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
    let listen = format!("127.0.0.1:{port}");
    let log =
        std::fs::File::create(dir.join("server.log")).map_err(|e| format!("server.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("server.log: {e}"))?;
    let data = dir.join("data");
    let config = data.join("secta.toml");
    if extra_hs_config.is_some() || homeserver_only {
        std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
        let mut text = format!(
            "# Written by secta-bench before the first start.\n[box]\ndata_dir = {:?}\nname = \"Secta demo\"\n\n\
             [homeserver]\nserver_name = {listen:?}\nlisten = {listen:?}\n{}\n",
            data.to_string_lossy(),
            extra_hs_config.unwrap_or("")
        );
        if homeserver_only {
            text.push_str("\n[hotspot]\nenabled = false\n\n[radio]\nenabled = false\n");
        }
        std::fs::write(&config, text).map_err(|e| format!("writing secta.toml: {e}"))?;
    }
    let mut cmd = Command::new(bin);
    if homeserver_only {
        cmd.arg("run").arg("--config").arg(&config);
    } else {
        cmd.arg("demo")
            .arg("--data")
            .arg(&data)
            .arg("--listen")
            .arg(&listen);
    }
    let child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    Ok((child, format!("http://{listen}")))
}

fn count_log_levels(path: &Path) -> Option<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut m = BTreeMap::new();
    for level in ["WARN", "ERROR"] {
        m.insert(
            level.to_owned(),
            text.lines().filter(|l| l.contains(level)).count() as u64,
        );
    }
    Some(m)
}

/// Minimal error type: a message.
mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, String>;
}

// ---------------------------------------------------------------------------
// Workload

struct User {
    user_id: String,
    token: String,
}

struct Ctx {
    http: Http,
    args: Args,
    run: String,
    pid: Option<u32>,
    report: Mutex<Report>,
    /// Figures of the keys, sliding and media scenarios (the chat scenario fills `report`).
    figs: Mutex<serde_json::Map<String, Value>>,
    started: Instant,
    deadline: Instant,
}

impl Ctx {
    fn rep(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Records one figure of a keys / sliding / media run.
    fn set(&self, key: &str, value: impl Serialize) {
        let v = serde_json::to_value(value).unwrap_or(Value::Null);
        self.figs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), v);
    }
    /// VmRSS of the server, when its pid is known.
    fn rss_kb(&self) -> Option<u64> {
        self.pid.and_then(|p| read_rss_kb(p, "VmRSS:"))
    }
    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }
    fn progress(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:7.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

async fn register_user(ctx: &Ctx, secret: &str, username: &str, password: &str) -> Option<User> {
    let path = "/_synapse/admin/v1/register";
    let nonce = ctx
        .http
        .call("register_nonce", Method::Get, path, None, None, REQ_TIMEOUT)
        .await?;
    let nonce = nonce.get("nonce")?.as_str()?.to_owned();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(username.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(b"notadmin");
    let mac = hex::encode(mac.finalize().into_bytes());
    let body = json!({ "nonce": nonce, "username": username, "password": password, "admin": false, "mac": mac });
    let v = ctx
        .http
        .call(
            "register",
            Method::Post,
            path,
            None,
            Some(&body),
            REQ_TIMEOUT,
        )
        .await?;
    Some(User {
        user_id: v.get("user_id")?.as_str()?.to_owned(),
        token: v.get("access_token")?.as_str()?.to_owned(),
    })
}

/// A user created by a keys / sliding / media run, with the password it was registered with.
struct Registered {
    user: Arc<User>,
    username: String,
    password: String,
}

/// Runs `futs` with at most `concurrency` at a time (each is skipped once past the deadline);
/// results in the same order. A future starts only once it holds a permit, so it can time itself.
async fn run_bounded<T, F>(ctx: &Arc<Ctx>, concurrency: usize, futs: Vec<F>) -> Vec<Option<T>>
where
    F: std::future::Future<Output = Option<T>> + Send + 'static,
    T: Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let handles: Vec<_> = futs
        .into_iter()
        .map(|f| {
            let (sem, ctx) = (sem.clone(), ctx.clone());
            tokio::spawn(async move {
                let _p = sem.acquire().await.ok()?;
                if ctx.past_deadline() {
                    return None;
                }
                f.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.ok().flatten());
    }
    out
}

/// Waits 1 s, records `idle_rss_kb`, registers `n` users (`bench<run>_<i>`) and records
/// `users_registered`, `register_ms` and `rss_after_register_kb`.
async fn idle_and_register(ctx: &Arc<Ctx>, secret: &str, n: usize) -> Vec<Option<Arc<Registered>>> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.set("idle_rss_kb", ctx.rss_kb());
    ctx.progress(format!("registering {n} users (run id {})", ctx.run));
    let t0 = Instant::now();
    let futs: Vec<_> = (0..n)
        .map(|i| {
            let (ctx, secret) = (ctx.clone(), secret.to_owned());
            async move {
                let username = format!("bench{}_{i}", ctx.run);
                let password = format!("pw-{}-{i}-bench", ctx.run);
                let user = register_user(&ctx, &secret, &username, &password).await?;
                Some(Arc::new(Registered {
                    user: Arc::new(user),
                    username,
                    password,
                }))
            }
        })
        .collect();
    let users = run_bounded(ctx, ctx.args.register_concurrency, futs).await;
    let ok = users.iter().filter(|u| u.is_some()).count();
    ctx.set("users_registered", ok);
    ctx.set("register_ms", round3(ms(t0.elapsed())));
    ctx.set("rss_after_register_kb", ctx.rss_kb());
    ctx.progress(format!(
        "registered {ok}/{n} users in {:.1}s",
        t0.elapsed().as_secs_f64()
    ));
    users
}

/// {p50, p99, mean, min, max, count} of latency samples in ms (nulls when there are none).
fn summary(samples: &[f64]) -> Value {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    json!({
        "p50": pct(&v, 50.0).map(round3),
        "p99": pct(&v, 99.0).map(round3),
        "mean": (!v.is_empty()).then(|| round3(v.iter().sum::<f64>() / v.len() as f64)),
        "min": v.first().copied().map(round3),
        "max": v.last().copied().map(round3),
        "count": v.len(),
    })
}

/// Median (the lower one for an even count: nearest-rank p50).
fn median(samples: &[f64]) -> Option<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 50.0).map(round3)
}

/// The room indices user `i` should be in.
fn planned_rooms(i: usize, rooms: usize, per_user: usize) -> Vec<usize> {
    if rooms == 0 {
        return vec![];
    }
    if i == 0 {
        return (0..rooms).collect();
    }
    let mut v: Vec<usize> = (0..per_user.min(rooms)).map(|k| (i + k) % rooms).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Sends of one message: (latency ms, deliveries expected).
struct Shared {
    next_msg: AtomicUsize,
    sent_ok: AtomicUsize,
    expected: AtomicUsize,
    received: AtomicUsize,
    duplicates: AtomicUsize,
    limited: AtomicUsize,
    sync_responses: AtomicUsize,
    send_lat: Mutex<Vec<f64>>,
    deliv_lat: Mutex<Vec<f64>>,
    last_progress: AtomicU64,
}

async fn listener(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    user: Arc<User>,
    mut since: String,
    mut stop: watch::Receiver<bool>,
) {
    let filter =
        enc(&json!({ "room": { "timeline": { "limit": ctx.args.timeline_limit } } }).to_string());
    let mut seen: HashSet<String> = HashSet::new();
    let marker = ctx.run.clone();
    loop {
        if *stop.borrow() || ctx.past_deadline() {
            return;
        }
        let path = format!(
            "/_matrix/client/v3/sync?since={}&timeout=30000&filter={filter}",
            enc(&since)
        );
        let req = ctx.http.call(
            "sync",
            Method::Get,
            &path,
            Some(&user.token),
            None,
            Duration::from_secs(45),
        );
        let res = tokio::select! {
            r = req => r,
            _ = stop.changed() => return,
        };
        let now = now_us();
        if res.is_some() {
            shared.sync_responses.fetch_add(1, Ordering::Relaxed);
        }
        let Some(v) = res else {
            // Back off a little so a failing server is not hammered; still bounded by stop/deadline.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {},
                _ = stop.changed() => return,
            }
            continue;
        };
        let mut lats = Vec::new();
        if let Some(join) = v.pointer("/rooms/join").and_then(Value::as_object) {
            for (room_id, room) in join {
                if ctx.args.read_receipts {
                    let last = room
                        .pointer("/timeline/events")
                        .and_then(Value::as_array)
                        .and_then(|e| e.last());
                    if let Some(eid) = last.and_then(|e| e.get("event_id")).and_then(Value::as_str)
                    {
                        let path = format!(
                            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                            enc(room_id),
                            enc(eid)
                        );
                        let (ctx, user) = (ctx.clone(), user.clone());
                        tokio::spawn(async move {
                            ctx.http
                                .call(
                                    "receipt",
                                    Method::Post,
                                    &path,
                                    Some(&user.token),
                                    Some(&json!({})),
                                    REQ_TIMEOUT,
                                )
                                .await;
                        });
                    }
                }
                if room.pointer("/timeline/limited").and_then(Value::as_bool) == Some(true) {
                    shared.limited.fetch_add(1, Ordering::Relaxed);
                }
                let Some(events) = room.pointer("/timeline/events").and_then(Value::as_array)
                else {
                    continue;
                };
                for ev in events {
                    if ev.get("type").and_then(Value::as_str) != Some("m.room.message") {
                        continue;
                    }
                    if ev.get("sender").and_then(Value::as_str) == Some(user.user_id.as_str()) {
                        continue;
                    }
                    let Some(content) = ev.get("content") else {
                        continue;
                    };
                    if content.get("bench_run").and_then(Value::as_str) != Some(marker.as_str()) {
                        continue;
                    }
                    let Some(ts) = content.get("bench_ts_us").and_then(Value::as_i64) else {
                        continue;
                    };
                    if let Some(id) = ev.get("event_id").and_then(Value::as_str) {
                        if !seen.insert(id.to_owned()) {
                            shared.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    lats.push((now - ts) as f64 / 1000.0);
                }
            }
        }
        if !lats.is_empty() {
            shared.received.fetch_add(lats.len(), Ordering::Relaxed);
            shared
                .deliv_lat
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(lats);
        }
        match v.get("next_batch").and_then(Value::as_str) {
            Some(nb) => since = nb.to_owned(),
            None => {
                ctx.http.count("sync", "2xx without next_batch");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    ctx: Arc<Ctx>,
    shared: Arc<Shared>,
    user: Arc<User>,
    sender_idx: usize,
    rooms: Vec<(String, usize)>, // (room id, deliveries expected per message: listeners in room other than me)
    phase_start: Instant,
) {
    if rooms.is_empty() {
        return;
    }
    let total = ctx.args.messages;
    let mut k = sender_idx; // spread the first messages over rooms
    let mut lat = Vec::new();
    loop {
        let i = shared.next_msg.fetch_add(1, Ordering::Relaxed);
        if i >= total || ctx.past_deadline() {
            break;
        }
        if ctx.args.rate > 0.0 {
            let at = phase_start + Duration::from_secs_f64(i as f64 / ctx.args.rate);
            tokio::time::sleep_until(at.into()).await;
        }
        let (room, expect) = &rooms[k % rooms.len()];
        k += 1;
        let txn = format!("{}-{i}", ctx.run);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        let ts = now_us();
        let body = json!({
            "msgtype": "m.text",
            "body": format!("bench {} {i} {ts}", ctx.run),
            "bench_run": ctx.run,
            "bench_ts_us": ts,
        });
        let t0 = Instant::now();
        let ok = ctx
            .http
            .call(
                "send",
                Method::Put,
                &path,
                Some(&user.token),
                Some(&body),
                REQ_TIMEOUT,
            )
            .await;
        let d = ms(t0.elapsed());
        if ok.is_some() {
            lat.push(d);
            shared.expected.fetch_add(*expect, Ordering::Relaxed);
            let n = shared.sent_ok.fetch_add(1, Ordering::Relaxed) + 1;
            let step = (total / 10).max(1);
            if n.is_multiple_of(step)
                && shared.last_progress.fetch_max(n as u64, Ordering::Relaxed) < n as u64
            {
                let cpu = ctx
                    .pid
                    .and_then(|p| read_cpu_s(&p.to_string()))
                    .map(|c| format!(", server cpu {c:.1}s"))
                    .unwrap_or_default();
                ctx.progress(format!(
                    "sent {n}/{total}, deliveries {}/{}{cpu}",
                    shared.received.load(Ordering::Relaxed),
                    shared.expected.load(Ordering::Relaxed)
                ));
            }
        }
    }
    shared
        .send_lat
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(lat);
}

async fn workload(ctx: Arc<Ctx>, secret: String, idle_wait: bool) {
    let a = &ctx.args;
    if idle_wait {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if let Some(pid) = ctx.pid {
        ctx.rep().idle_rss_kb = read_rss_kb(pid, "VmRSS:");
    }

    // 1. Users.
    ctx.progress(format!(
        "registering {} users (run id {})",
        a.users, ctx.run
    ));
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(a.register_concurrency.max(1)));
    let mut handles = Vec::new();
    for i in 0..a.users {
        let ctx = ctx.clone();
        let sem = sem.clone();
        let secret = secret.clone();
        handles.push(tokio::spawn(async move {
            let _p = sem.acquire().await.ok()?;
            if ctx.past_deadline() {
                return None;
            }
            let username = format!("bench{}_{i}", ctx.run);
            let password = format!("pw-{}-{i}-bench", ctx.run);
            register_user(&ctx, &secret, &username, &password).await
        }));
    }
    let mut users: Vec<Option<Arc<User>>> = Vec::new();
    for h in handles {
        users.push(h.await.ok().flatten().map(Arc::new));
    }
    let n_ok = users.iter().filter(|u| u.is_some()).count();
    {
        let mut r = ctx.rep();
        r.users_registered = n_ok;
        r.register_ms = Some(round3(ms(t0.elapsed())));
        r.rss_after_register_kb = ctx.pid.and_then(|p| read_rss_kb(p, "VmRSS:"));
    }
    ctx.progress(format!(
        "registered {n_ok}/{} users in {:.1}s",
        a.users,
        t0.elapsed().as_secs_f64()
    ));
    if n_ok == 0 {
        ctx.progress("no users: stopping");
        return;
    }

    // 2. Rooms and memberships.
    let t1 = Instant::now();
    let sem = Arc::new(Semaphore::new(a.setup_concurrency.max(1)));
    let mut handles = Vec::new();
    for r in 0..a.rooms {
        let creator = users[r % a.users].clone();
        let ctx = ctx.clone();
        let sem = sem.clone();
        handles.push(tokio::spawn(async move {
            let creator = creator?;
            let _p = sem.acquire().await.ok()?;
            if ctx.past_deadline() {
                return None;
            }
            let body =
                json!({ "preset": "public_chat", "name": format!("bench {} room {r}", ctx.run) });
            let v = ctx
                .http
                .call(
                    "create_room",
                    Method::Post,
                    "/_matrix/client/v3/createRoom",
                    Some(&creator.token),
                    Some(&body),
                    REQ_TIMEOUT,
                )
                .await?;
            v.get("room_id").and_then(Value::as_str).map(str::to_owned)
        }));
    }
    let mut room_ids: Vec<Option<String>> = Vec::new();
    for h in handles {
        room_ids.push(h.await.ok().flatten());
    }
    let rooms_created = room_ids.iter().filter(|r| r.is_some()).count();
    ctx.rep().rooms_created = rooms_created;
    ctx.progress(format!("created {rooms_created}/{} rooms", a.rooms));

    // membership[i] = rooms user i is actually in.
    let mut membership: Vec<Vec<usize>> = vec![Vec::new(); a.users];
    let mut joins = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let Some(u) = u else { continue };
        for r in planned_rooms(i, a.rooms, a.rooms_per_user) {
            let Some(room) = room_ids[r].clone() else {
                continue;
            };
            if r % a.users == i {
                membership[i].push(r); // the creator
                continue;
            }
            let ctx = ctx.clone();
            let sem = sem.clone();
            let u = u.clone();
            joins.push((
                i,
                r,
                tokio::spawn(async move {
                    let _p = sem.acquire().await.ok()?;
                    if ctx.past_deadline() {
                        return None;
                    }
                    let path = format!("/_matrix/client/v3/join/{}", enc(&room));
                    ctx.http
                        .call(
                            "join",
                            Method::Post,
                            &path,
                            Some(&u.token),
                            Some(&json!({})),
                            REQ_TIMEOUT,
                        )
                        .await
                }),
            ));
        }
    }
    let mut joins_ok = 0;
    for (i, r, h) in joins {
        if h.await.ok().flatten().is_some() {
            membership[i].push(r);
            joins_ok += 1;
        }
    }
    for m in &mut membership {
        m.sort_unstable();
    }
    {
        let mut rep = ctx.rep();
        rep.joins_ok = joins_ok;
        rep.setup_ms = Some(round3(ms(t1.elapsed())));
        rep.rss_after_setup_kb = ctx.pid.and_then(|p| read_rss_kb(p, "VmRSS:"));
    }
    ctx.progress(format!(
        "{joins_ok} joins done in {:.1}s",
        t1.elapsed().as_secs_f64()
    ));
    if ctx.past_deadline() {
        return;
    }

    // 3. Listeners: initial sync for next_batch, then long-poll.
    let n_listeners = a.listeners.min(a.users);
    let shared = Arc::new(Shared {
        next_msg: AtomicUsize::new(0),
        sent_ok: AtomicUsize::new(0),
        expected: AtomicUsize::new(0),
        received: AtomicUsize::new(0),
        duplicates: AtomicUsize::new(0),
        limited: AtomicUsize::new(0),
        sync_responses: AtomicUsize::new(0),
        send_lat: Mutex::new(Vec::new()),
        deliv_lat: Mutex::new(Vec::new()),
        last_progress: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let init_filter = enc(&json!({ "room": { "timeline": { "limit": 1 } } }).to_string());
    let mut inits = Vec::new();
    for u in users.iter().take(n_listeners) {
        let Some(u) = u.clone() else { continue };
        let ctx = ctx.clone();
        let sem = sem.clone();
        let f = init_filter.clone();
        inits.push((
            u.clone(),
            tokio::spawn(async move {
                let _p = sem.acquire().await.ok()?;
                let path = format!("/_matrix/client/v3/sync?timeout=0&filter={f}");
                let v = ctx
                    .http
                    .call(
                        "sync_listener_initial",
                        Method::Get,
                        &path,
                        Some(&u.token),
                        None,
                        REQ_TIMEOUT,
                    )
                    .await?;
                v.get("next_batch")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }),
        ));
    }
    let mut listener_tasks = Vec::new();
    // is_listener[i]: user i runs a listener that is live.
    let mut is_listener = vec![false; a.users];
    for (u, h) in inits {
        let Some(since) = h.await.ok().flatten() else {
            continue;
        };
        let idx = users
            .iter()
            .position(|x| x.as_ref().is_some_and(|x| Arc::ptr_eq(x, &u)))
            .unwrap_or(usize::MAX);
        if idx < a.users {
            is_listener[idx] = true;
        }
        listener_tasks.push(tokio::spawn(listener(
            ctx.clone(),
            shared.clone(),
            u,
            since,
            stop_rx.clone(),
        )));
    }
    ctx.rep().listeners_ready = listener_tasks.len();
    ctx.progress(format!("{} listeners long-polling", listener_tasks.len()));
    // Give the listeners a moment to have their long-polls in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // listeners in room r
    let mut listeners_in_room = vec![0usize; a.rooms];
    for (i, m) in membership.iter().enumerate() {
        if is_listener[i] {
            for &r in m {
                listeners_in_room[r] += 1;
            }
        }
    }

    // 4. Send phase.
    let n_senders = a.senders.min(a.users);
    ctx.progress(format!(
        "sending {} messages from {n_senders} senders",
        a.messages
    ));
    let t2 = Instant::now();
    let cpu0 = (
        ctx.pid.and_then(|p| read_cpu_s(&p.to_string())),
        read_cpu_s("self"),
    );
    let mut senders = Vec::new();
    for s in 0..n_senders {
        let Some(u) = users[s].clone() else { continue };
        let rooms: Vec<(String, usize)> = membership[s]
            .iter()
            .filter_map(|&r| {
                let id = room_ids[r].clone()?;
                Some((id, listeners_in_room[r] - usize::from(is_listener[s])))
            })
            .collect();
        senders.push(tokio::spawn(sender(
            ctx.clone(),
            shared.clone(),
            u,
            s,
            rooms,
            t2,
        )));
    }
    for h in senders {
        let _ = h.await;
    }
    let send_wall = t2.elapsed();
    let sent_ok = shared.sent_ok.load(Ordering::Relaxed);
    {
        let mut lat = shared
            .send_lat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        lat.sort_by(f64::total_cmp);
        let mut r = ctx.rep();
        r.messages_sent_ok = sent_ok;
        r.send_wall_ms = Some(round3(ms(send_wall)));
        r.rss_after_send_kb = ctx.pid.and_then(|p| read_rss_kb(p, "VmRSS:"));
        let cpu1 = (
            ctx.pid.and_then(|p| read_cpu_s(&p.to_string())),
            read_cpu_s("self"),
        );
        r.server_cpu_s_send = cpu0.0.zip(cpu1.0).map(|(a, b)| round3(b - a));
        r.bench_cpu_s_send = cpu0.1.zip(cpu1.1).map(|(a, b)| round3(b - a));
        r.throughput_msgs_per_s = Some(round3(sent_ok as f64 / send_wall.as_secs_f64().max(1e-9)));
        r.send_ms = SendFigures {
            p50: pct(&lat, 50.0).map(round3),
            p99: pct(&lat, 99.0).map(round3),
            mean: (!lat.is_empty()).then(|| round3(lat.iter().sum::<f64>() / lat.len() as f64)),
            max: lat.last().copied().map(round3),
            count: lat.len(),
        };
    }
    ctx.progress(format!(
        "send phase: {sent_ok}/{} ok in {:.1}s ({:.0} msg/s)",
        a.messages,
        send_wall.as_secs_f64(),
        sent_ok as f64 / send_wall.as_secs_f64().max(1e-9)
    ));

    // 5. Drain (≤ 5 s), stop the listeners (bounded), then user 0's initial sync.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain_until
        && !ctx.past_deadline()
        && shared.received.load(Ordering::Relaxed) < shared.expected.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let stop_deadline = Instant::now() + Duration::from_secs(5);
    for h in listener_tasks {
        let left = stop_deadline.saturating_duration_since(Instant::now());
        let abort = h.abort_handle();
        if tokio::time::timeout(left, h).await.is_err() {
            abort.abort();
        }
    }
    {
        let mut lat = shared
            .deliv_lat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        lat.sort_by(f64::total_cmp);
        let mut r = ctx.rep();
        r.delivery_ms = DeliveryFigures {
            p50: pct(&lat, 50.0).map(round3),
            p99: pct(&lat, 99.0).map(round3),
            max: lat.last().copied().map(round3),
            count: lat.len(),
            expected: shared.expected.load(Ordering::Relaxed),
            duplicates: shared.duplicates.load(Ordering::Relaxed),
            limited_timelines: shared.limited.load(Ordering::Relaxed),
            sync_responses: shared.sync_responses.load(Ordering::Relaxed),
        };
    }
    ctx.progress(format!(
        "deliveries: {}/{}",
        shared.received.load(Ordering::Relaxed),
        shared.expected.load(Ordering::Relaxed)
    ));

    if let Some(u0) = users[0].clone() {
        let t3 = Instant::now();
        // Timed to the last byte and parsed; initial_sync_bytes is the size of the re-serialised JSON.
        let res = ctx
            .http
            .call(
                "initial_sync",
                Method::Get,
                "/_matrix/client/v3/sync?timeout=0",
                Some(&u0.token),
                None,
                REQ_TIMEOUT,
            )
            .await;
        let d = ms(t3.elapsed());
        if let Some(v) = res {
            let n = v
                .pointer("/rooms/join")
                .and_then(Value::as_object)
                .map(|m| m.len())
                .unwrap_or(0);
            let mut r = ctx.rep();
            r.initial_sync_ms = Some(round3(d));
            r.initial_sync_rooms = Some(n);
            r.initial_sync_bytes = Some(v.to_string().len());
            drop(r);
            ctx.progress(format!("initial sync of user 0: {d:.1} ms, {n} rooms"));
        }
    }
}

/// `[homeserver]` lines for a server spawned for the keys scenario (see `spawn_server`).
const SPAWN_KEYS_CONFIG: &str = "auth_rate_burst = 100000\nauth_rate_per_second = 1000.0";

/// Prints the JSON object of a keys / sliding / media run: common fields, then the scenario's
/// figures (keys in alphabetical order, as serde_json's map keeps them).
#[allow(clippy::too_many_arguments)]
fn print_scenario_figures(
    ctx: &Ctx,
    spawned: Option<Spawned>,
    spawn_config: Option<&str>,
    startup_ms: Option<f64>,
    load_before: Option<f64>,
    cpu_start: Option<f64>,
    timed_out: bool,
    started: Instant,
) -> i32 {
    let mut o = ctx.figs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let rep = ctx.rep().clone();
    let mut put = |k: &str, v: Value| {
        o.insert(k.to_owned(), v);
    };
    put("scenario", json!(ctx.args.scenario.name()));
    put("label", json!(rep.label));
    put("url", json!(rep.url));
    put("run_id", json!(ctx.run));
    put("startup_ms", json!(startup_ms));
    put("spawn_config", json!(spawn_config));
    put("loadavg_1m_before", json!(load_before));
    put("timed_out", json!(timed_out));
    if let Some(pid) = ctx.pid {
        put("rss_after_kb", json!(read_rss_kb(pid, "VmRSS:")));
        put("peak_rss_kb", json!(read_rss_kb(pid, "VmHWM:")));
        put(
            "server_cpu_s_total",
            json!(cpu_start
                .zip(read_cpu_s(&pid.to_string()))
                .map(|(a, b)| round3(b - a))),
        );
    }
    let errors = ctx
        .http
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let total: u64 = errors.values().flat_map(|m| m.values()).sum();
    put("errors", json!(errors));
    put("errors_total", json!(total));
    put(
        "error_samples",
        json!(*ctx.http.samples.lock().unwrap_or_else(|p| p.into_inner())),
    );
    if let Some(mut sp) = spawned {
        sp.stop();
        put(
            "server_log",
            json!(count_log_levels(&sp.dir.join("server.log"))),
        );
        if sp.keep {
            eprintln!("server data and log kept in {}", sp.dir.display());
        }
    }
    put("loadavg_1m_after", json!(loadavg_1m()));
    put("wall_s", json!(round3(started.elapsed().as_secs_f64())));
    match serde_json::to_string(&o) {
        Ok(s) => {
            println!("{s}");
            0
        }
        Err(e) => {
            eprintln!("secta-bench: {e}");
            2
        }
    }
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    args.rooms_given =
        matches.value_source("rooms") == Some(clap::parser::ValueSource::CommandLine);
    let started = Instant::now();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("secta-bench: tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(run(args, started));
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

async fn run(args: Args, started: Instant) -> i32 {
    let run = run_id();
    let load_before = loadavg_1m();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let client = match reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("secta-bench: http client: {e}");
            return 2;
        }
    };

    // Server: spawned or given.
    let mut spawned: Option<Spawned> = None;
    let mut startup_ms = None;
    let (url, pid) = if let Some(bin) = &args.spawn {
        let dir = std::env::temp_dir().join(format!("secta-bench-{run}"));
        let t = Instant::now();
        // The keys scenario logs in users × devices times with a password: secta's default
        // per-address limit (burst 10, 0.5/s) would make that take minutes, so the spawned
        // server gets a higher one. Other scenarios use the defaults.
        let extra = (args.scenario == Scenario::Keys).then_some(SPAWN_KEYS_CONFIG);
        let (child, url) = match spawn_server(bin, &dir, extra, args.homeserver_only) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("secta-bench: {e}");
                return 2;
            }
        };
        let pid = child.id();
        let mut sp = Spawned {
            child,
            dir,
            keep: args.keep_data,
        };
        // Poll /versions every 5 ms, for at most 30 s.
        let probe = format!("{url}/_matrix/client/versions");
        let mut ready = false;
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = sp.child.try_wait() {
                eprintln!(
                    "secta-bench: server exited early ({status}); log in {}",
                    sp.dir.join("server.log").display()
                );
                sp.keep = true;
                return 2;
            }
            if let Ok(r) = client
                .get(&probe)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                if r.status().as_u16() == 200 {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !ready {
            eprintln!(
                "secta-bench: server not ready after 30 s; log in {}",
                sp.dir.join("server.log").display()
            );
            sp.keep = true;
            return 2;
        }
        startup_ms = Some(round3(ms(t.elapsed())));
        eprintln!(
            "[{:7.1}s] spawned {} at {url} (pid {pid}), ready in {:.1} ms",
            started.elapsed().as_secs_f64(),
            bin.display(),
            startup_ms.unwrap_or(0.0)
        );
        spawned = Some(sp);
        (url, Some(pid))
    } else {
        (
            args.url
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_owned(),
            args.pid,
        )
    };

    // Loopback only.
    let host_ok = reqwest::Url::parse(&url).ok().and_then(|u| {
        let h = u
            .host_str()?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        Some(
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()),
        )
    });
    if host_ok != Some(true) {
        eprintln!("secta-bench: {url:?} is not a loopback http URL; refusing");
        return 2;
    }

    let secret = if let Some(s) = &args.shared_secret {
        s.clone()
    } else if let Some(f) = &args.shared_secret_file {
        match std::fs::read_to_string(f) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => {
                eprintln!("secta-bench: reading {}: {e}", f.display());
                return 2;
            }
        }
    } else if let Some(sp) = &spawned {
        match std::fs::read_to_string(sp.dir.join("data").join("registration_shared_secret")) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => {
                eprintln!("secta-bench: reading the spawned server's shared secret: {e}");
                return 2;
            }
        }
    } else {
        eprintln!("secta-bench: --shared-secret or --shared-secret-file is needed with --url");
        return 2;
    };

    let label = args.label.clone().unwrap_or_else(|| match &args.spawn {
        Some(b) => b
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "spawned".into()),
        None => url.clone(),
    });
    let report = Report {
        label,
        url: url.clone(),
        run_id: run.clone(),
        users: args.users,
        rooms: args.rooms,
        messages: args.messages,
        senders: args.senders.min(args.users),
        listeners: args.listeners.min(args.users),
        rate: (args.rate > 0.0).then_some(args.rate),
        read_receipts: args.read_receipts,
        startup_ms,
        loadavg_1m_before: load_before,
        ..Default::default()
    };
    let scenario = args.scenario;
    let spawn_config =
        (scenario == Scenario::Keys && spawned.is_some()).then_some(SPAWN_KEYS_CONFIG);
    let ctx = Arc::new(Ctx {
        http: Http {
            client,
            base: url,
            errors: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(BTreeMap::new()),
        },
        args,
        run,
        pid,
        report: Mutex::new(report),
        figs: Mutex::new(serde_json::Map::new()),
        started,
        deadline,
    });

    let cpu_start = pid.and_then(|p| read_cpu_s(&p.to_string()));
    let left = deadline.saturating_duration_since(Instant::now());
    let work = match scenario {
        Scenario::Chat => tokio::spawn(workload(ctx.clone(), secret, true)),
        Scenario::Keys => tokio::spawn(keys::run(ctx.clone(), secret)),
        Scenario::Sliding => tokio::spawn(sliding::run(ctx.clone(), secret)),
        Scenario::Media => tokio::spawn(media::run(ctx.clone(), secret)),
    };
    let abort = work.abort_handle();
    let timed_out = tokio::time::timeout(left, work).await.is_err();
    if timed_out {
        abort.abort();
        ctx.progress("--max-seconds reached: printing what was measured");
    }

    if scenario != Scenario::Chat {
        return print_scenario_figures(
            &ctx,
            spawned,
            spawn_config,
            startup_ms,
            load_before,
            cpu_start,
            timed_out,
            started,
        );
    }

    let mut rep = ctx.rep().clone();
    rep.timed_out = timed_out;
    if let Some(pid) = pid {
        rep.rss_after_kb = read_rss_kb(pid, "VmRSS:");
        rep.peak_rss_kb = read_rss_kb(pid, "VmHWM:");
        rep.server_cpu_s_total = cpu_start
            .zip(read_cpu_s(&pid.to_string()))
            .map(|(a, b)| round3(b - a));
    }
    rep.errors = ctx
        .http
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    rep.errors_total = rep.errors.values().flat_map(|m| m.values()).sum();
    if let Some(mut sp) = spawned {
        sp.stop();
        rep.server_log = count_log_levels(&sp.dir.join("server.log"));
        if sp.keep {
            eprintln!("server data and log kept in {}", sp.dir.display());
        }
    }
    rep.loadavg_1m_after = loadavg_1m();
    rep.wall_s = round3(started.elapsed().as_secs_f64());
    match serde_json::to_string(&rep) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("secta-bench: {e}");
            return 2;
        }
    }
    0
}
