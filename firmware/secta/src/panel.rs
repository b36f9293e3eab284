//! The box's panel, status feed and panic wipe, wired together.
//!
//! * [`Wiper`] runs the wipe on its own thread: it is started before any
//!   service and waits on nothing a service holds, so a hung service cannot
//!   block it. It destroys the key first, then tells the services to stop,
//!   deletes the data, waits a bounded time for the services, sweeps again and
//!   leaves the data directory in its first-boot state.
//! * [`watch`] is a thread that turns an admin's CLI wipe (`secta admin
//!   wipe`) and the dead man's switch into wipe requests.
//! * [`feed`] reports the services' state (hotspot clients, federation peers,
//!   radio on air) into the one [`Status`] channel the strip reads.
//! * [`router`] is the panel's HTTP endpoint: the strip and buttons for the
//!   web app's virtual panel (simulated backend), and the duress wipe.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
    Json, Router,
};
use secta_panel::{PanelConfig, PanelEvent, SimBoard};
use secta_runtime::{Report, Status, WipeStatus};
use secta_vault::{Vault, VaultConfig};
use serde_json::{json, Value};

/// Why a wipe was requested, and when it was decided.
struct Request {
    at: Instant,
    why: String,
}

/// Asks for the panic wipe; cloneable, never blocks.
#[derive(Clone)]
pub struct Wiper {
    tx: mpsc::Sender<Request>,
    started: Arc<AtomicBool>,
}

/// What the wiper needs from the running box.
pub struct WipeCtx {
    pub cfg: VaultConfig,
    pub data_dir: PathBuf,
    pub vault: Option<Arc<Vault>>,
    pub status: Status,
    /// Tells every service to stop (called right after the key is destroyed).
    pub stop_services: Box<dyn Fn() + Send>,
    /// Whether every service has stopped.
    pub services_stopped: Box<dyn Fn() -> bool + Send>,
}

/// How long the wiper waits for services before its final sweep.
const SERVICE_GRACE: Duration = Duration::from_secs(3);

impl Wiper {
    pub fn start(ctx: WipeCtx) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        std::thread::Builder::new()
            .name("secta-wipe".into())
            .spawn(move || {
                let Ok(req) = rx.recv() else { return };
                flag.store(true, Ordering::SeqCst);
                run_wipe(ctx, req);
            })?;
        Ok(Self { tx, started })
    }

    /// Requests the wipe (the first request wins; later ones are ignored).
    pub fn request(&self, why: impl Into<String>) {
        let why = why.into();
        tracing::warn!(reason = %why, "panic wipe requested");
        let _ = self.tx.send(Request {
            at: Instant::now(),
            why,
        });
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }
}

fn run_wipe(ctx: WipeCtx, req: Request) {
    ctx.status.report(Report::Wipe(WipeStatus::InProgress));
    let stop = &ctx.stop_services;
    let report = secta_vault::wipe::run(
        &ctx.cfg,
        &ctx.data_dir,
        ctx.vault.as_deref(),
        req.at,
        || {
            stop();
            // Test hook: hold the wipe here so a test can cut power mid-wipe.
            if let Some(ms) = std::env::var("SECTA_WIPE_TEST_PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
        },
    );
    let deadline = Instant::now() + SERVICE_GRACE;
    while !(ctx.services_stopped)() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_ms = req.at.elapsed().as_secs_f64() * 1000.0;
    let services_stopped = (ctx.services_stopped)();
    let finish = secta_vault::wipe::finish(&ctx.cfg, &ctx.data_dir);
    let finished_ms = req.at.elapsed().as_secs_f64() * 1000.0;
    ctx.status.report(Report::Wipe(WipeStatus::Wiped));
    let line = json!({
        "event": "wipe finished",
        "reason": req.why,
        "key_destroyed_ms": report.key_destroyed_ms,
        "files_deleted_ms": report.files_deleted_ms,
        "services_stopped_ms": stopped_ms,
        "services_stopped": services_stopped,
        "finished_ms": finished_ms,
        "key_files": report.keys,
        "entries": report.entries,
        "errors": report.errors,
        "finish_error": finish.err().map(|e| e.to_string()),
    });
    // One machine-readable line (tests and the bench read it).
    tracing::warn!("WIPE {line}");
}

/// Watches for an admin's CLI wipe (its marker appears, or the key file that
/// existed at start disappears) and the dead man's switch (a configured path
/// gone for the grace time, once it was seen), every 100 ms.
pub fn watch(cfg: VaultConfig, data_dir: PathBuf, wiper: Wiper) -> std::io::Result<()> {
    let key_file = cfg.key_file(&data_dir);
    let key_existed = key_file.exists();
    let marker = data_dir.join(secta_vault::wipe::WIPE_MARKER);
    std::thread::Builder::new()
        .name("secta-wipe-watch".into())
        .spawn(move || {
            let mut deadman_armed = false;
            let mut missing_since: Option<Instant> = None;
            if let Some(p) = &cfg.deadman_path {
                if !p.exists() {
                    tracing::warn!(path = %p.display(), "dead man's switch not armed until its path appears");
                }
            }
            while !wiper.started() {
                if marker.exists() || (key_existed && !key_file.exists()) {
                    wiper.request("admin wipe (secta admin wipe)");
                    return;
                }
                if let Some(p) = &cfg.deadman_path {
                    if p.exists() {
                        if !deadman_armed {
                            tracing::info!(path = %p.display(), "dead man's switch armed");
                        }
                        deadman_armed = true;
                        missing_since = None;
                    } else if deadman_armed {
                        let since = *missing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= Duration::from_millis(cfg.deadman_grace_ms) {
                            wiper.request(format!("dead man's switch: {} is gone", p.display()));
                            return;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })?;
    Ok(())
}

/// Starts the panel hardware (if any); a completed wipe gesture requests the wipe.
pub fn start_panel(
    cfg: &PanelConfig,
    status: &Status,
    wiper: &Wiper,
) -> anyhow::Result<Option<(secta_panel::Panel, Option<SimBoard>)>> {
    let Some((hw, sim)) = secta_panel::open(cfg).map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let w = wiper.clone();
    let panel = secta_panel::Panel::start(cfg, hw, status.clone(), move |e| {
        if let PanelEvent::Wipe(t) = e {
            w.request(format!("panel: {t:?}"));
        }
    })?;
    tracing::info!(backend = ?cfg.backend, leds = cfg.leds, "panel started");
    Ok(Some((panel, sim)))
}

/// Reports what the services show through their public interfaces into the
/// status channel, until `shutdown`.
pub async fn feed(
    status: Status,
    hs: Option<Arc<secta_homeserver::Hs>>,
    portal: Option<Arc<secta_hotspot::Portal>>,
    radio: Option<secta_radio::Radio>,
    shutdown: secta_runtime::Shutdown,
) {
    if let Some(radio) = &radio {
        let mut events = radio.subscribe();
        let s = status.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let mut on_air = std::collections::HashSet::new();
            loop {
                let e = tokio::select! {
                    e = events.recv() => e,
                    _ = sd.clone().wait() => return,
                };
                match e {
                    Ok(secta_radio::RadioEvent::OnAir { mount, .. }) => {
                        on_air.insert(mount);
                    }
                    Ok(secta_radio::RadioEvent::OffAir { mount }) => {
                        on_air.remove(&mount);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
                s.report(Report::RadioOnAir(!on_air.is_empty()));
            }
        });
    }
    loop {
        if let Some(p) = &portal {
            status.report(Report::HotspotClients(p.accepted_count() as u32));
        }
        if let Some(hs) = &hs {
            if hs.config.federation.enabled {
                if let Ok(peers) = hs.federation_status() {
                    let reachable = peers
                        .iter()
                        .filter(|p| p.failures == 0 && p.last_success.is_some())
                        .count();
                    status.report(Report::FederationPeers {
                        reachable: reachable as u32,
                        known: peers.len() as u32,
                    });
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.clone().wait() => return,
        }
    }
}

/// State of the panel's HTTP endpoint.
pub struct PanelApi {
    pub cfg: PanelConfig,
    pub status: Status,
    pub sim: Option<SimBoard>,
    pub wiper: Wiper,
    /// For checking admin tokens; dropped when the wipe starts.
    pub hs: Mutex<Option<Arc<secta_homeserver::Hs>>>,
}

impl PanelApi {
    fn frame(&self) -> Vec<secta_panel::Rgb> {
        // The simulated strip shows what its SPI bus received (the same
        // render → encode path as real LEDs); otherwise render the table.
        self.sim
            .as_ref()
            .and_then(|b| b.frame())
            .unwrap_or_else(|| {
                let t = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
                secta_panel::pattern::render(
                    &self.status.snapshot(),
                    t,
                    self.cfg.leds,
                    self.cfg.brightness,
                )
            })
    }

    fn state(&self) -> Value {
        let status = self.status.snapshot();
        let frame: Vec<String> = self.frame().iter().map(|c| c.hex()).collect();
        let buttons: Vec<Value> = self
            .cfg
            .buttons
            .iter()
            .enumerate()
            .map(|(i, b)| {
                json!({
                    "name": b.name,
                    "pressed": self.sim.as_ref().is_some_and(|s| s.is_pressed(i)),
                })
            })
            .collect();
        let version = format!(
            "{:x}",
            hash(&(
                frame.join(""),
                format!("{status:?}"),
                format!("{buttons:?}")
            ))
        );
        json!({
            "version": version,
            "frame": frame,
            "rows": secta_panel::pattern::active_rows(&status),
            "status": status,
            "buttons": buttons,
            "simulated": self.sim.is_some(),
            "wipe_hold_ms": self.cfg.wipe_hold_ms,
        })
    }
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn hash(v: &impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v)
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct StateQuery {
    /// Long-poll: answer once the state differs from this version (≤ 10 s).
    since: Option<String>,
}

async fn get_state(State(api): State<Arc<PanelApi>>, Query(q): Query<StateQuery>) -> Json<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = api.state();
        if q.since.as_deref() != s["version"].as_str() || Instant::now() >= deadline {
            return Json(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(serde::Deserialize)]
struct Press {
    pressed: bool,
}

async fn press(
    State(api): State<Arc<PanelApi>>,
    UrlPath(i): UrlPath<usize>,
    Json(p): Json<Press>,
) -> (StatusCode, Json<Value>) {
    let Some(board) = &api.sim else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "the panel is not simulated: press the real button"})),
        );
    };
    if i >= board.buttons() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such button"})),
        );
    }
    board.set(i, p.pressed);
    (
        StatusCode::OK,
        Json(json!({"button": i, "pressed": p.pressed})),
    )
}

#[derive(serde::Deserialize)]
struct WipeBody {
    confirm: String,
}

/// The admin's duress action: `POST /admin/wipe` with an admin's access token
/// and `{"confirm": "wipe"}`.
async fn admin_wipe(
    State(api): State<Arc<PanelApi>>,
    headers: HeaderMap,
    body: Option<Json<WipeBody>>,
) -> (StatusCode, Json<Value>) {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let hs = api.hs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let admin = match (token, hs) {
        (Some(t), Some(hs)) => tokio::task::spawn_blocking(move || hs.admin_for_token(&t))
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    let Some(admin) = admin else {
        let done = api.wiper.started();
        return (
            if done {
                StatusCode::CONFLICT
            } else {
                StatusCode::FORBIDDEN
            },
            Json(
                json!({"error": if done { "the box is already being wiped" } else { "an admin's access token is required" }}),
            ),
        );
    };
    if body.is_none_or(|b| b.confirm != "wipe") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "send {\"confirm\": \"wipe\"} to wipe the box"})),
        );
    }
    api.hs.lock().unwrap_or_else(|p| p.into_inner()).take();
    api.wiper
        .request(format!("admin duress action by {admin} (web)"));
    (StatusCode::ACCEPTED, Json(json!({"wipe": "started"})))
}

pub fn router(api: Arc<PanelApi>) -> Router {
    Router::new()
        .route("/panel", get(get_state))
        .route("/panel/buttons/{i}", post(press))
        .route("/admin/wipe", post(admin_wipe))
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                ]),
        )
        .with_state(api)
}
