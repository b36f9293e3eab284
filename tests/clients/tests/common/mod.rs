//! Shared harness: start a `secta demo` server, mint invite tokens through
//! `secta admin`, register matrix-sdk clients, and sync until something shows
//! up. Every wait is bounded; every failure says which endpoint it came from.

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::deserialized_responses::TimelineEvent;
use matrix_sdk::ruma::api::client::account::register;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::room::Visibility;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use matrix_sdk::sync::{State, SyncResponse};
use matrix_sdk::{Client, RoomState};
use serde_json::Value;

pub const PASSWORD: &str = "correct horse battery staple";

/// How long one "wait until the other side sees it" may take.
pub const SEE_WITHIN: Duration = Duration::from_secs(20);

/// Long-poll timeout handed to each `/sync`.
const SYNC_POLL: Duration = Duration::from_secs(2);

/// How long the server may take to answer `/versions` after start.
const STARTUP_WITHIN: Duration = Duration::from_secs(30);

/// Install a tracing subscriber once (RUST_LOG=matrix_sdk=debug shows every
/// request the client makes). Harmless when called from several tests.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Path of the binary under test: `$SECTA_BIN`, else
/// `$HOME/.cache/secta-target/debug/secta`.
pub fn secta_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SECTA_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/secta-target/debug/secta")
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(l.local_addr()?.port())
}

/// `n` distinct free ports on loopback address `ip`: all listeners are held
/// until every port is picked, so the kernel cannot hand out the same one twice.
pub fn free_ports_at(ip: &str, n: usize) -> Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).context("binding an ephemeral port"))
        .collect::<Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The loopback addresses of the two federating boxes: each has its own.
pub const IP_A: &str = "127.0.0.2";
pub const IP_B: &str = "127.0.0.3";

fn tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    if s.len() > max {
        let mut cut = s.len() - max;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        format!("[...]\n{}", &s[cut..])
    } else {
        s
    }
}

/// A running `secta demo`. Dropping it kills the server (and, if the test is
/// failing, prints the tail of its log).
pub struct Secta {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
    /// `IP:PORT`: also the server name, so users are `@x:IP:PORT`.
    pub listen: String,
    /// `http://IP:PORT`
    pub base_url: String,
    /// The federation TLS port, for a box started by [`Secta::start_pair`].
    pub tls_port: Option<u16>,
    /// The arguments after `secta`, to start the box again ([`Secta::restart`]).
    args: Vec<String>,
    log_path: PathBuf,
    // Keep last so the directory outlives the child (fields drop in order).
    data: tempfile::TempDir,
}

impl Secta {
    /// Start `secta demo --data <tmp> --listen 127.0.0.1:<free port>` and wait
    /// until `GET /_matrix/client/versions` answers 200.
    pub async fn start() -> Result<Secta> {
        let port = free_port()?;
        let mut server = Secta::spawn("127.0.0.1", port, None, &[])?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Start two boxes that federate with each other over TLS, each on its
    /// own loopback address (A on 127.0.0.2, B on 127.0.0.3):
    ///
    /// ```text
    /// secta demo --data A --listen 127.0.0.2:PA --federation-tls-listen 127.0.0.2:TA \
    ///            --peer 127.0.0.3:PB=https://127.0.0.3:TB
    /// secta demo --data B --listen 127.0.0.3:PB --federation-tls-listen 127.0.0.3:TB \
    ///            --peer 127.0.0.2:PA=https://127.0.0.2:TA
    /// ```
    ///
    /// The ports are picked free at once (all held while picking, so they
    /// differ). Both boxes start before either is waited for. Each box
    /// is a guard of its own: dropping it kills that box, and a failing test
    /// prints the end of both logs.
    pub async fn start_pair() -> Result<(Secta, Secta)> {
        let (a_ports, b_ports) = (free_ports_at(IP_A, 2)?, free_ports_at(IP_B, 2)?);
        let (pa, ta, pb, tb) = (a_ports[0], a_ports[1], b_ports[0], b_ports[1]);
        let mut a = Secta::spawn(IP_A, pa, Some(ta), &[(IP_B, pb, tb)])?;
        let mut b = Secta::spawn(IP_B, pb, Some(tb), &[(IP_A, pa, ta)])?;
        a.wait_ready()
            .await
            .context("starting box A of the federating pair")?;
        b.wait_ready()
            .await
            .context("starting box B of the federating pair")?;
        Ok((a, b))
    }

    /// `n` boxes (2 ≤ n ≤ 8) on 127.0.0.2, 127.0.0.3, …, each federating
    /// over TLS with all the others (a `--peer` for each).
    pub async fn start_group(n: usize) -> Result<Vec<Secta>> {
        let ips: Vec<String> = (0..n).map(|i| format!("127.0.0.{}", i + 2)).collect();
        let ports = ips
            .iter()
            .map(|ip| free_ports_at(ip, 2))
            .collect::<Result<Vec<_>>>()?;
        let mut boxes = Vec::with_capacity(n);
        for (i, ip) in ips.iter().enumerate() {
            let others: Vec<(&str, u16, u16)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| (ips[j].as_str(), ports[j][0], ports[j][1]))
                .collect();
            boxes.push(Secta::spawn(ip, ports[i][0], Some(ports[i][1]), &others)?);
        }
        for (i, b) in boxes.iter_mut().enumerate() {
            b.wait_ready()
                .await
                .with_context(|| format!("starting box {i} of {n}"))?;
        }
        Ok(boxes)
    }

    /// Start one box on `ip:port` serving federation on `ip:tls` and knowing
    /// `peers` (address, client port, the port its TLS is reached on), and
    /// wait until it answers.
    pub async fn start_at(
        ip: &str,
        port: u16,
        tls: u16,
        peers: &[(&str, u16, u16)],
    ) -> Result<Secta> {
        let mut b = Secta::spawn(ip, port, Some(tls), peers)?;
        b.wait_ready()
            .await
            .with_context(|| format!("starting the box on {ip}"))?;
        Ok(b)
    }

    /// Kill the box (as a power cut would); its data stays for [`Secta::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the stopped box again on the same data, addresses and peers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .context("opening the server log")?;
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} demo again", self.bin.display()))?,
        );
        self.wait_ready().await.context("restarting the box")
    }

    /// Spawn `secta demo` on `ip:port` (client API), optionally serving
    /// federation over TLS on `ip:tls_port` and knowing the peer boxes
    /// `(peer address, peer client port, peer TLS port)`. Does not wait for it.
    fn spawn(
        ip: &str,
        port: u16,
        tls_port: Option<u16>,
        peers: &[(&str, u16, u16)],
    ) -> Result<Secta> {
        init_tracing();
        let bin = secta_bin();
        if !bin.is_file() {
            panic!(
                "secta binary not found at {} -- build it (cargo build -p secta) or point \
                 SECTA_BIN at it; these end-to-end tests cannot run without a server",
                bin.display()
            );
        }
        let data = tempfile::Builder::new()
            .prefix("secta-e2e-")
            .tempdir()
            .context("creating data dir")?;
        let listen = format!("{ip}:{port}");
        let base_url = format!("http://{listen}");
        let log_path = data.path().join("server.log");
        let log = File::create(&log_path).context("creating server log")?;
        let data_dir = data.path().join("data");
        std::fs::create_dir_all(&data_dir)?;

        let mut args: Vec<String> = vec![
            "demo".into(),
            "--data".into(),
            data_dir.to_string_lossy().into_owned(),
            "--listen".into(),
            listen.clone(),
        ];
        // The portal and radio on free ports of the box's own address.
        let side = free_ports_at(ip, 2)?;
        args.extend([
            "--portal-listen".into(),
            format!("{ip}:{}", side[0]),
            "--radio-listen".into(),
            format!("{ip}:{}", side[1]),
        ]);
        if let Some(t) = tls_port {
            args.extend(["--federation-tls-listen".into(), format!("{ip}:{t}")]);
        }
        for (pip, pp, pt) in peers {
            args.extend(["--peer".into(), format!("{pip}:{pp}=https://{pip}:{pt}")]);
        }
        let child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {} demo", bin.display()))?;

        Ok(Secta {
            child: Some(child),
            bin,
            port,
            listen,
            base_url,
            tls_port,
            args,
            log_path,
            data,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    pub fn server_log(&self) -> String {
        tail(&self.log_path, 8000)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/_matrix/client/versions", self.base_url);
        let http = matrix_sdk::reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < STARTUP_WITHIN {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "`secta demo --listen {}` exited early with {status}; log:\n{}",
                        self.listen,
                        self.server_log()
                    );
                }
            }
            match http.get(&url).send().await {
                Ok(resp) if resp.status().as_u16() == 200 => {
                    let body = resp.text().await.unwrap_or_default();
                    let v: Value = serde_json::from_str(&body).with_context(|| {
                        format!("GET /_matrix/client/versions: 200 but not JSON: {body}")
                    })?;
                    if !v["versions"].is_array() {
                        bail!("GET /_matrix/client/versions: no `versions` array: {body}");
                    }
                    return Ok(());
                }
                Ok(resp) => last = format!("HTTP {}", resp.status()),
                Err(e) => last = format!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "secta did not answer 200 on {url} within {STARTUP_WITHIN:?} (last: {last}); log:\n{}",
            self.server_log()
        )
    }

    /// `secta admin --data <dir> invite create --uses N`; the token is the
    /// first stdout line.
    pub fn invite(&self, uses: u32) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("admin")
            .arg("--data")
            .arg(self.data_dir())
            .args(["invite", "create", "--uses", &uses.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running `secta admin invite create`")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "`secta admin --data {} invite create --uses {uses}` failed with {}\nstdout: {stdout}\nstderr: {stderr}",
                self.data_dir().display(),
                out.status
            );
        }
        let token = stdout.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() || token.contains(char::is_whitespace) {
            bail!("`secta admin invite create` printed no token on its first line\nstdout: {stdout}\nstderr: {stderr}");
        }
        Ok(token)
    }

    /// A fresh, logged-out client with an in-memory store.
    pub async fn client(&self) -> Result<Client> {
        Client::builder()
            .homeserver_url(&self.base_url)
            .request_config(
                RequestConfig::new()
                    .timeout(Duration::from_secs(30))
                    .retry_limit(2)
                    .max_retry_time(Duration::from_secs(10)),
            )
            .build()
            .await
            .context("building matrix-sdk client")
    }

    /// Register `localpart` with `token` and return the logged-in client.
    pub async fn register(&self, localpart: &str, token: &str) -> Result<Client> {
        let client = self.client().await?;
        let resp = try_register(&client, localpart, token)
            .await?
            .map_err(|e| anyhow!("{}", describe(&e)))
            .with_context(|| {
                format!("POST /_matrix/client/v3/register for {localpart} with a valid token")
            })?;
        let expected = format!("@{localpart}:{}", self.listen);
        if resp.user_id.as_str() != expected {
            bail!(
                "register returned user_id {} but expected {expected}",
                resp.user_id
            );
        }
        if resp.access_token.is_none() {
            bail!("register returned no access_token (inhibit_login was not set)");
        }
        match client.user_id() {
            Some(u) if u.as_str() == expected => {}
            other => bail!("client not logged in after registration (user_id {other:?})"),
        }
        Ok(client)
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.listen)
    }

    /// `secta admin --data DIR federation` (queue length, failures and last
    /// error per destination), or why it could not be run. For failure
    /// messages of federation tests.
    pub fn federation_status(&self) -> String {
        match Command::new(&self.bin)
            .arg("admin")
            .arg("--data")
            .arg(self.data_dir())
            .arg("federation")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(could not run `secta admin federation`: {e})"),
        }
    }
}

impl Drop for Secta {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // SECTA_E2E_KEEP_LOGS=DIR keeps every server's whole log as
        // DIR/secta-<port>.log (the temp dir goes away with the guard).
        if let Some(dir) = std::env::var_os("SECTA_E2E_KEEP_LOGS") {
            let dir = PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&self.log_path, dir.join(format!("secta-{}.log", self.port)));
        }
        if std::thread::panicking() {
            eprintln!(
                "----- secta server log ({}) -----\n{}\n----- end server log -----",
                self.listen,
                self.server_log()
            );
        }
    }
}

/// Two-step UIA registration. The outer `Result` is a harness-level surprise
/// (the server did not answer the first step with a 401 UIA offering
/// `m.login.registration_token`); the inner one is the final outcome.
pub async fn try_register(
    client: &Client,
    localpart: &str,
    token: &str,
) -> Result<std::result::Result<register::v3::Response, matrix_sdk::Error>> {
    let mut req = register::v3::Request::new();
    req.username = Some(localpart.to_owned());
    req.password = Some(PASSWORD.to_owned());
    req.initial_device_display_name = Some("secta e2e test".to_owned());

    let first = client.matrix_auth().register(req.clone()).await;
    let session = match first {
        Ok(resp) => bail!(
            "POST /register without `auth` succeeded ({}): the server must demand \
             m.login.registration_token via a 401 UIA response",
            resp.user_id
        ),
        Err(e) => match e.as_uiaa_response() {
            Some(info) => {
                let offers_token = info.flows.iter().any(|f| {
                    f.stages
                        .iter()
                        .any(|s| s.as_str() == "m.login.registration_token")
                });
                if !offers_token {
                    bail!(
                        "POST /register: 401 UIA flows do not offer m.login.registration_token: {:?}",
                        info.flows
                    );
                }
                info.session.clone()
            }
            None => bail!(
                "POST /register without `auth`: expected a 401 UIA response, got: {}",
                describe(&e)
            ),
        },
    };

    let mut stage = uiaa::RegistrationToken::new(token.to_owned());
    stage.session = session;
    req.auth = Some(uiaa::AuthData::RegistrationToken(stage));
    Ok(client.matrix_auth().register(req).await)
}

/// One line describing a matrix-sdk error with whatever HTTP detail it has:
/// status, errcode, message, and UIA state.
pub fn describe(e: &matrix_sdk::Error) -> String {
    if let Some(info) = e.as_uiaa_response() {
        let err = info
            .auth_error
            .as_ref()
            .map(|b| format!("errcode {} ({})", b.kind.errcode(), b.message))
            .unwrap_or_else(|| "no errcode".to_owned());
        return format!(
            "HTTP 401 UIA, {err}; flows {:?}; completed {:?}; session {:?}",
            info.flows
                .iter()
                .map(|f| f.stages.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            info.completed
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            info.session
        );
    }
    if let Some(api) = e.as_client_api_error() {
        let kind = api
            .error_kind()
            .map(|k| k.errcode().to_string())
            .unwrap_or_else(|| "<no errcode>".into());
        return format!("HTTP {} {kind}: {:?}", api.status_code, api.body);
    }
    format!("{e} ({e:?})")
}

/// errcode of a failed request, from either a plain error body or a UIA body.
pub fn errcode(e: &matrix_sdk::Error) -> Option<String> {
    if let Some(info) = e.as_uiaa_response() {
        return info
            .auth_error
            .as_ref()
            .map(|b| b.kind.errcode().to_string());
    }
    e.client_api_error_kind().map(|k| k.errcode().to_string())
}

/// Turn a matrix-sdk result into anyhow with the endpoint named.
pub trait At<T> {
    fn at(self, endpoint: &str) -> Result<T>;
}

impl<T> At<T> for std::result::Result<T, matrix_sdk::Error> {
    fn at(self, endpoint: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{endpoint} failed: {}", describe(&e)))
    }
}

/// The event as plain JSON.
pub fn json_of(ev: &TimelineEvent) -> Value {
    serde_json::from_str(ev.raw().json().get()).expect("event JSON")
}

/// Timeline events of `room` in one sync response, as JSON.
pub fn timeline(resp: &SyncResponse, room: &RoomId) -> Vec<Value> {
    resp.rooms
        .joined
        .get(room)
        .map(|u| u.timeline.events.iter().map(json_of).collect())
        .unwrap_or_default()
}

/// Timeline plus state events of `room` in one sync response, as JSON.
pub fn timeline_and_state(resp: &SyncResponse, room: &RoomId) -> Vec<Value> {
    let Some(u) = resp.rooms.joined.get(room) else {
        return vec![];
    };
    let mut out: Vec<Value> = u.timeline.events.iter().map(json_of).collect();
    let state = match &u.state {
        State::Before(v) | State::After(v) => v,
    };
    out.extend(
        state
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r.json().get()).ok()),
    );
    out
}

/// Ephemeral events (m.typing, m.receipt) of `room` in one sync response.
pub fn ephemeral(resp: &SyncResponse, room: &RoomId) -> Vec<Value> {
    resp.rooms
        .joined
        .get(room)
        .map(|u| {
            u.ephemeral
                .iter()
                .filter_map(|r| serde_json::from_str::<Value>(r.json().get()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One `/sync` (reusing the client's stored `since`), bounded in time.
pub async fn sync_once(client: &Client) -> Result<SyncResponse> {
    let settings = SyncSettings::default().timeout(SYNC_POLL);
    tokio::time::timeout(
        SYNC_POLL + Duration::from_secs(30),
        client.sync_once(settings),
    )
    .await
    .map_err(|_| anyhow!("GET /_matrix/client/v3/sync did not return within 32 s"))?
    .at("GET /_matrix/client/v3/sync")
}

/// Sync repeatedly until `done` returns true for some response (`done` may
/// keep state across responses), or fail after `within`.
pub async fn sync_until<F>(client: &Client, what: &str, within: Duration, mut done: F) -> Result<()>
where
    F: FnMut(&SyncResponse) -> bool,
{
    let who = client
        .user_id()
        .map(|u| u.to_string())
        .unwrap_or_else(|| "<logged out>".into());
    let deadline = Instant::now() + within;
    let mut syncs = 0u32;
    loop {
        if Instant::now() >= deadline {
            bail!("{who}: timed out after {within:?} ({syncs} syncs) waiting for {what}");
        }
        let resp = sync_once(client)
            .await
            .with_context(|| format!("{who} waiting for {what}"))?;
        syncs += 1;
        if done(&resp) {
            return Ok(());
        }
    }
}

/// Whether an event (as the client holds it) is still encrypted, i.e. the
/// client could not decrypt it. Decrypted events show their inner type.
pub fn is_utd(ev: &Value) -> bool {
    ev["type"] == "m.room.encrypted"
}

/// Body of an `m.room.message` event JSON, if it is one.
pub fn body(ev: &Value) -> Option<&str> {
    if ev["type"] != "m.room.message" {
        return None;
    }
    ev["content"]["body"].as_str()
}

/// alice and bob, registered with one 2-use invite, both joined to a private
/// chat alice created. Both clients have synced past the join.
pub struct Pair {
    pub server: Secta,
    pub alice: Client,
    pub bob: Client,
    pub room_id: OwnedRoomId,
}

impl Pair {
    pub async fn setup() -> Result<Pair> {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        // Initial syncs, so later syncs are incremental.
        sync_once(&alice).await.context("alice initial sync")?;
        sync_once(&bob).await.context("bob initial sync")?;

        let room_id = create_private_chat(&alice, "secta e2e").await?;
        let bob_id = matrix_sdk::ruma::UserId::parse(server.user_id("bob"))?;
        alice
            .get_room(&room_id)
            .ok_or_else(|| anyhow!("alice's client does not know the room she created"))?
            .invite_user_by_id(&bob_id)
            .await
            .at("POST /rooms/{roomId}/invite (alice invites bob)")?;

        let rid = room_id.clone();
        sync_until(&bob, "the invite to alice's room", SEE_WITHIN, |r| {
            r.rooms.invited.contains_key(&rid)
        })
        .await?;
        let room = bob
            .get_room(&room_id)
            .ok_or_else(|| anyhow!("bob's client saw the invite but has no room object"))?;
        if room.state() != RoomState::Invited {
            bail!(
                "bob's room state after invite sync is {:?}, expected Invited",
                room.state()
            );
        }
        room.join()
            .await
            .at("POST /rooms/{roomId}/join (bob joins)")?;

        sync_until_member_joined(&alice, &room_id, &server.user_id("bob"), SEE_WITHIN).await?;
        let rid = room_id.clone();
        sync_until(&bob, "the joined room in bob's sync", SEE_WITHIN, |r| {
            r.rooms.joined.contains_key(&rid)
        })
        .await?;
        Ok(Pair {
            server,
            alice,
            bob,
            room_id,
        })
    }

    pub fn room(&self, client: &Client) -> Result<matrix_sdk::Room> {
        let r = client
            .get_room(&self.room_id)
            .ok_or_else(|| anyhow!("client has no room {}", self.room_id))?;
        if r.state() != RoomState::Joined {
            bail!(
                "room {} is {:?} in the client, expected Joined",
                self.room_id,
                r.state()
            );
        }
        Ok(r)
    }
}

/// `POST /createRoom` with the private_chat preset.
pub async fn create_private_chat(client: &Client, name: &str) -> Result<OwnedRoomId> {
    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    req.visibility = Visibility::Private;
    req.name = Some(name.to_owned());
    let room = client
        .create_room(req)
        .await
        .at("POST /_matrix/client/v3/createRoom (preset private_chat)")?;
    Ok(room.room_id().to_owned())
}

impl Secta {
    /// Log in `localpart` with the password as a NEW device (a second
    /// matrix-sdk client with its own in-memory crypto store).
    pub async fn login(&self, localpart: &str, device_name: &str) -> Result<Client> {
        let client = self.client().await?;
        client
            .matrix_auth()
            .login_username(self.user_id(localpart), PASSWORD)
            .initial_device_display_name(device_name)
            .await
            .map_err(|e| anyhow!("{}", describe(&e)))
            .with_context(|| {
                format!("POST /_matrix/client/v3/login for {localpart} ({device_name})")
            })?;
        Ok(client)
    }

    /// A raw HTTP view of the server as `client`'s device (its access token).
    pub fn raw_as(&self, client: &Client) -> Result<RawHttp> {
        let token = client
            .access_token()
            .ok_or_else(|| anyhow!("client has no access token"))?;
        RawHttp::new(&self.base_url, &token)
    }
}

/// Plain HTTP requests with an access token, for checks the SDK hides
/// (exact status codes, errcodes, raw sync fields).
pub struct RawHttp {
    http: matrix_sdk::reqwest::Client,
    base_url: String,
    token: String,
}

/// Status and JSON body of a raw request.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub body: Value,
}

/// Status, headers and body bytes of a raw request.
#[derive(Debug)]
pub struct RawBytes {
    pub status: u16,
    pub headers: matrix_sdk::reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl RawBytes {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON (error bodies), or Null.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
}

impl RawResponse {
    pub fn errcode(&self) -> &str {
        self.body["errcode"].as_str().unwrap_or("<none>")
    }
}

impl RawHttp {
    pub fn new(base_url: &str, token: &str) -> Result<RawHttp> {
        let http = matrix_sdk::reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(RawHttp {
            http,
            base_url: base_url.to_owned(),
            token: token.to_owned(),
        })
    }

    /// `method` on `/_matrix/client/v3{path}` (path includes any query string).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse> {
        self.call_abs(method, &format!("/_matrix/client/v3{path}"), body)
            .await
    }

    /// `method` on `{path}` as given (e.g. `/_matrix/client/v1/media/config`).
    pub async fn call_abs(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse> {
        let url = format!("{}{path}", self.base_url);
        let method = matrix_sdk::reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method.clone(), &url);
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_string(b)?);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}: no HTTP response"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| {
                format!("{method} {path}: HTTP {status}, body is not JSON: {text}")
            })?
        };
        Ok(RawResponse { status, body })
    }

    /// `method` on `{path}` as given, with a raw body; returns status,
    /// headers and the body bytes (for media).
    pub async fn bytes_abs(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<RawBytes> {
        let url = format!("{}{path}", self.base_url);
        let method = matrix_sdk::reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(method.clone(), &url);
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some((ctype, b)) = body {
            req = req.header("content-type", ctype).body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}: no HTTP response"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: reading the body"))?
            .to_vec();
        Ok(RawBytes {
            status,
            headers,
            bytes,
        })
    }

    /// Like `call`, but anything other than 200 is an error naming the endpoint.
    pub async fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let r = self.call(method, path, body).await?;
        if r.status != 200 {
            bail!(
                "{method} {path}: expected 200, got HTTP {} {}",
                r.status,
                r.body
            );
        }
        Ok(r.body)
    }

    /// One raw `/sync` (no filter). `since` None is an initial sync.
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Result<Value> {
        let path = match since {
            Some(s) => format!("/sync?since={s}&timeout={timeout_ms}"),
            None => "/sync?timeout=0".to_owned(),
        };
        self.ok("GET", &path, None).await
    }
}

/// User ids listed in a raw sync's `device_lists.{field}`.
pub fn device_list(sync: &Value, field: &str) -> Vec<String> {
    sync["device_lists"][field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Run a test body with an overall deadline; a timeout or error panics with
/// the full context chain.
pub async fn bounded<F>(name: &str, secs: u64, fut: F)
where
    F: Future<Output = Result<()>>,
{
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{name} failed: {e:#}"),
        Err(_) => panic!("{name} did not finish within {secs} s"),
    }
}

/// Send a plain-text message (encrypted by the SDK if the room is).
pub async fn send_text(room: &matrix_sdk::Room, text: &str) -> Result<OwnedEventId> {
    Ok(room
        .send(RoomMessageEventContent::text_plain(text))
        .await
        .at("PUT /rooms/{roomId}/send/m.room.message/{txnId}")?
        .response
        .event_id)
}

/// Sync `client` until `user`'s join to the room shows in its timeline or state.
pub async fn sync_until_member_joined(
    client: &Client,
    rid: &RoomId,
    user: &str,
    within: Duration,
) -> Result<()> {
    sync_until(client, &format!("{user}'s join"), within, |r| {
        timeline_and_state(r, rid).iter().any(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == user
                && e["content"]["membership"] == "join"
        })
    })
    .await
}

/// `POST /createRoom` with the `public_chat` preset and a name.
pub async fn create_public_room(client: &Client, name: &str) -> Result<matrix_sdk::Room> {
    let mut req = create_room::v3::Request::new();
    req.preset = Some(create_room::v3::RoomPreset::PublicChat);
    req.name = Some(name.to_owned());
    client
        .create_room(req)
        .await
        .at("POST /createRoom (public_chat)")
}
