//! The captive portal: answers the operating systems' connectivity probes
//! ("captive" until a client accepts, then exactly what the real services say,
//! even offline, so phones stay on the Wi-Fi), the RFC 8908 API, the welcome page
//! and acceptance.
//!
//! Clients are known by the address of their connection, never by anything they
//! send, so one client cannot accept (or revoke) for another.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::json;

use std::path::PathBuf;

use crate::config::HotspotConfig;

/// Hosts of the operating systems' captive-portal probes.
pub const PROBE_HOSTS: &[&str] = &[
    "connectivitycheck.gstatic.com",
    "clients3.google.com",
    "connectivitycheck.android.com",
    "captive.apple.com",
    "www.msftconnecttest.com",
    "www.msftncsi.com",
    "detectportal.firefox.com",
    "nmcheck.gnome.org",
];

/// What a probe gets once its client is accepted: exactly the real service's answer.
fn online_answer(host: &str, path: &str) -> Option<Response> {
    let text = |ct: &'static str, body: &'static str| {
        let mut r = Response::new(Body::from(body));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-store"),
        );
        Some(r)
    };
    match (host, path) {
        (
            "connectivitycheck.gstatic.com"
            | "clients3.google.com"
            | "connectivitycheck.android.com",
            "/generate_204" | "/gen_204",
        ) => Some(StatusCode::NO_CONTENT.into_response()),
        ("captive.apple.com", "/hotspot-detect.html" | "/library/test/success.html" | "/") => text(
            "text/html",
            "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>",
        ),
        ("www.msftconnecttest.com", "/connecttest.txt") => {
            text("text/plain", "Microsoft Connect Test")
        }
        ("www.msftncsi.com", "/ncsi.txt") => text("text/plain", "Microsoft NCSI"),
        ("detectportal.firefox.com", "/success.txt" | "/canonical.html") => {
            text("text/plain", "success\n")
        }
        ("nmcheck.gnome.org", "/check_network_status.txt") => {
            text("text/plain", "NetworkManager is online\n")
        }
        _ => None,
    }
}

/// Network effects of accepting a client: nftables on the box, a record in tests.
pub trait Firewall: Send + Sync {
    fn allow(&self, ip: Ipv4Addr) -> anyhow::Result<()>;
    fn revoke(&self, ip: Ipv4Addr) -> anyhow::Result<()>;
}

/// A firewall that only remembers (tests and demo mode).
#[derive(Default)]
pub struct SimFirewall {
    allowed: Mutex<HashSet<Ipv4Addr>>,
}

impl SimFirewall {
    pub fn allowed(&self) -> HashSet<Ipv4Addr> {
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Firewall for SimFirewall {
    fn allow(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip);
        Ok(())
    }
    fn revoke(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.allowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
        Ok(())
    }
}

/// The portal service.
pub struct Portal {
    config: std::sync::RwLock<HotspotConfig>,
    box_name: String,
    firewall: Arc<dyn Firewall>,
    session: Mutex<Option<Duration>>,
    sessions: Mutex<HashMap<IpAddr, Session>>,
    url: String,
    web_ui: std::sync::OnceLock<WebUi>,
    lease_file: std::sync::OnceLock<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    until: Option<Instant>,
    accepted_ms: u64,
}

/// A hotspot client as the admin pages show it: from the lease table and the
/// portal's sessions (MAC and name only ever from the lease table).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub mac: Option<String>,
    pub hostname: Option<String>,
    /// Unix seconds when its DHCP lease ends (0: never), if it has one.
    pub lease_expires: Option<u64>,
    pub accepted: bool,
    /// When it accepted the rules (Unix ms), while its session lasts.
    pub accepted_ms: Option<u64>,
    /// Seconds left of its session (`None` with `accepted`: no limit).
    pub seconds_remaining: Option<u64>,
}

/// The built web app (`web-ui/dist`) and what it needs to know about the box.
pub struct WebUi {
    pub dir: std::path::PathBuf,
    pub homeserver: String,
    pub server_name: String,
    /// The radio's base URL (its `/status-json.xsl` and mounts), or `:PORT` for
    /// "this page's host", if the radio runs.
    pub radio: Option<String>,
    /// The panel's HTTP endpoint (virtual strip and buttons, duress wipe), if served.
    pub panel: Option<String>,
    /// Why the box is not set up yet (first boot found no usable pre-seed), if so;
    /// the welcome page says it.
    pub setup_needed: Option<String>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn session_length(c: &HotspotConfig) -> Option<Duration> {
    (c.session_minutes > 0).then(|| Duration::from_secs(c.session_minutes * 60))
}

impl Portal {
    pub fn new(config: HotspotConfig, box_name: String, firewall: Arc<dyn Firewall>) -> Arc<Self> {
        let session = session_length(&config);
        Self::with_session(config, box_name, firewall, session)
    }

    /// Like [`Portal::new`] with an explicit session length (`None`: until restart).
    pub fn with_session(
        config: HotspotConfig,
        box_name: String,
        firewall: Arc<dyn Firewall>,
        session: Option<Duration>,
    ) -> Arc<Self> {
        let url = format!("http://{}/", config.hostname);
        Self::build(config, box_name, firewall, session, url)
    }

    /// A portal reached at `url` instead of `http://{hostname}/` (the demo on localhost).
    pub fn at_url(
        config: HotspotConfig,
        box_name: String,
        firewall: Arc<dyn Firewall>,
        url: String,
    ) -> Arc<Self> {
        let session = session_length(&config);
        Self::build(config, box_name, firewall, session, url)
    }

    fn build(
        config: HotspotConfig,
        box_name: String,
        firewall: Arc<dyn Firewall>,
        session: Option<Duration>,
        url: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: std::sync::RwLock::new(config),
            box_name,
            firewall,
            session: Mutex::new(session),
            sessions: Mutex::new(HashMap::new()),
            url,
            web_ui: std::sync::OnceLock::new(),
            lease_file: std::sync::OnceLock::new(),
        })
    }

    fn portal_url(&self) -> String {
        self.url.clone()
    }

    /// The settings in force.
    pub fn config(&self) -> HotspotConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// New settings (already validated and applied to hostapd/dnsmasq/nftables
    /// by the caller): texts, names and the length of new sessions.
    pub fn set_config(&self, config: HotspotConfig) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session_length(&config);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// Serves the web app from `web.dir` on the box's own name (set once).
    pub fn set_web_ui(&self, web: WebUi) {
        let _ = self.web_ui.set(web);
    }

    /// Where dnsmasq keeps its leases (clients' MAC addresses; set once).
    pub fn set_lease_file(&self, path: PathBuf) {
        let _ = self.lease_file.set(path);
    }

    fn leases(&self) -> Vec<crate::leases::Lease> {
        self.lease_file
            .get()
            .map(|f| crate::leases::read(f))
            .unwrap_or_default()
    }

    /// Seconds left of the client's session (`Some(None)`: no limit), `None` if not accepted.
    fn remaining(&self, ip: IpAddr) -> Option<Option<u64>> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(&ip)
            .and_then(|s| remaining_of(s, Instant::now()))
    }

    /// Clients with a session now (for the status strip).
    pub fn accepted_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_accepted(&self, ip: IpAddr) -> bool {
        self.remaining(ip).is_some()
    }

    /// Accepts (or extends) the client at `ip`.
    pub fn accept(&self, ip: IpAddr) -> anyhow::Result<()> {
        if let IpAddr::V4(v4) = ip {
            self.firewall.allow(v4)?;
        }
        let until = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|d| Instant::now() + d);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                ip,
                Session {
                    until,
                    accepted_ms: unix_ms(),
                },
            );
        tracing::info!("hotspot client accepted");
        Ok(())
    }

    /// The IPv4 addresses of accepted clients (for rebuilding the firewall).
    pub fn accepted_ips(&self) -> Vec<Ipv4Addr> {
        let now = Instant::now();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| remaining_of(s, now).is_some())
            .filter_map(|(ip, _)| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// What the box knows about the client at `ip` (its MAC from the lease table).
    pub fn client(&self, ip: IpAddr) -> ClientInfo {
        let leases = self.leases();
        self.client_with(ip, &leases)
    }

    fn client_with(&self, ip: IpAddr, leases: &[crate::leases::Lease]) -> ClientInfo {
        let lease = match ip {
            IpAddr::V4(v4) => crate::leases::lookup(leases, v4, unix_ms() / 1000),
            IpAddr::V6(_) => None,
        };
        let session = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied();
        let remaining = session.and_then(|s| remaining_of(&s, Instant::now()));
        ClientInfo {
            ip,
            mac: lease.map(|l| l.mac.clone()),
            hostname: lease.and_then(|l| l.hostname.clone()),
            lease_expires: lease.map(|l| l.expires),
            accepted: remaining.is_some(),
            accepted_ms: session
                .filter(|_| remaining.is_some())
                .map(|s| s.accepted_ms),
            seconds_remaining: remaining.flatten(),
        }
    }

    /// Every client with a current lease or a portal session.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let leases = self.leases();
        let now = unix_ms() / 1000;
        let mut ips: Vec<IpAddr> = leases
            .iter()
            .filter(|l| l.expires == 0 || l.expires > now)
            .map(|l| IpAddr::V4(l.ip))
            .collect();
        ips.extend(
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied(),
        );
        ips.sort();
        ips.dedup();
        ips.into_iter()
            .map(|ip| self.client_with(ip, &leases))
            .collect()
    }

    /// Ends sessions that ran out; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut gone = Vec::new();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|ip, s| {
                let keep = s.until.is_none_or(|u| u > now);
                if !keep {
                    gone.push(*ip);
                }
                keep
            });
        for ip in &gone {
            if let IpAddr::V4(v4) = ip {
                if let Err(e) = self.firewall.revoke(*v4) {
                    tracing::warn!(error = %e, "could not revoke an expired hotspot client");
                }
            }
        }
        gone.len()
    }

    /// Expires sessions every few seconds until shutdown.
    pub async fn run_expiry(self: Arc<Self>, shutdown: secta_runtime::Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => { self.expire(); }
                _ = shutdown.clone().wait() => return,
            }
        }
    }

    pub fn router(self: &Arc<Self>) -> Router {
        self.router_with(Router::new())
    }

    /// The portal with `extra` routes of the box (its admin API) in front of it:
    /// both get the portal's limits on headers and bodies.
    pub fn router_with(self: &Arc<Self>, extra: Router) -> Router {
        extra
            .merge(Router::new().fallback(handle).with_state(self.clone()))
            .layer(DefaultBodyLimit::max(MAX_BODY as usize))
            .layer(axum::middleware::from_fn(limits))
    }

    /// Serves the portal on `addr` until shutdown.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        shutdown: secta_runtime::Shutdown,
    ) -> anyhow::Result<()> {
        self.serve_with(addr, Router::new(), shutdown).await
    }

    /// Like [`Portal::serve`], with `extra` routes (see [`Portal::router_with`]).
    pub async fn serve_with(
        self: Arc<Self>,
        addr: SocketAddr,
        extra: Router,
        shutdown: secta_runtime::Shutdown,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "captive portal listening");
        tokio::spawn(self.clone().run_expiry(shutdown.clone()));
        axum::serve(
            listener,
            self.router_with(extra)
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.wait())
        .await?;
        Ok(())
    }
}

fn remaining_of(s: &Session, now: Instant) -> Option<Option<u64>> {
    match s.until {
        None => Some(None),
        Some(until) => (until > now).then(|| Some(until.duration_since(now).as_secs())),
    }
}

/// Largest request head the portal reads (headers of real browsers are ~1-2 KiB).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Refuses oversized heads and declared bodies with a clear answer before any
/// handler runs.
async fn limits(req: Request, next: axum::middleware::Next) -> Response {
    let head: usize = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > MAX_HEADER_BYTES {
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Слишком большие заголовки запроса / Request headers too large",
        )
            .into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "Слишком большой запрос / Request too large",
        )
            .into_response();
    }
    next.run(req).await
}

/// A file of the built web app; `/` is `index.html`. Paths never leave `dir`.
/// A precompressed copy (`FILE.br`, `FILE.gz`, written by the web app's build)
/// is sent instead when the browser accepts that encoding.
async fn static_file(dir: &std::path::Path, path: &str, accept_encoding: &str) -> Response {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let ok = rel
        .split('/')
        .all(|c| !c.is_empty() && c != ".." && c != "." && !c.contains('\\'));
    if !ok {
        return StatusCode::NOT_FOUND.into_response();
    }
    let file = dir.join(rel);
    let ct = match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("wasm") => "application/wasm",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    };
    let accepts = |coding: &str| {
        accept_encoding.split(',').any(|part| {
            let mut it = part.split(';');
            let name = it.next().unwrap_or("").trim();
            let q_zero = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            name.eq_ignore_ascii_case(coding) && !q_zero
        })
    };
    let mut body = None;
    for (coding, ext) in [("br", "br"), ("gzip", "gz")] {
        if accepts(coding) {
            let mut name = file.clone().into_os_string();
            name.push(".");
            name.push(ext);
            if let Ok(bytes) = tokio::fs::read(&name).await {
                body = Some((bytes, Some(coding)));
                break;
            }
        }
    }
    let (bytes, coding) = match body {
        Some(b) => b,
        None => match tokio::fs::read(&file).await {
            Ok(bytes) => (bytes, None),
            Err(_) => return StatusCode::NOT_FOUND.into_response(),
        },
    };
    let mut r = Response::new(Body::from(bytes));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Some(c) = coding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(c));
    }
    let cache = if rel.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

fn redirect(to: &str) -> Response {
    let mut r = (StatusCode::FOUND, format!("<a href=\"{to}\">{to}</a>")).into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    r
}

fn html(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn welcome(p: &Portal, accepted: bool) -> Response {
    let name = escape(&p.box_name);
    let action = if accepted {
        "<p lang=\"ru\">Вы подключены.</p><p lang=\"en\">You are connected.</p>".to_owned()
    } else {
        "<form method=\"post\" action=\"/accept\"><button type=\"submit\">Принимаю правила и вхожу / I accept</button></form>".to_owned()
    };
    html(format!(
        "<!doctype html><html lang=\"ru\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{name}</title></head><body><h1>{name}</h1>\
         <p lang=\"ru\">Добро пожаловать. Здесь общаются без внешних серверов: чат работает и без интернета.</p>\
         <p lang=\"en\">Welcome. This box works without the internet: chat here even offline.</p>{action}</body></html>"
    ))
}

/// Largest request body the portal takes (its forms are tiny).
const MAX_BODY: u64 = 16 * 1024;

async fn handle(
    State(p): State<Arc<Portal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let ip = peer.ip();
    let config = p.config();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(a, b)| {
                    if b.bytes().all(|c| c.is_ascii_digit()) {
                        a
                    } else {
                        h
                    }
                })
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    let accepted = p.is_accepted(ip);
    let is_box = host == config.hostname
        || host == config.address.to_string()
        || host == "localhost"
        || host == "127.0.0.1";
    if is_box {
        return match (req.method(), path.as_str()) {
            (&Method::GET, "/api/captive") => {
                // RFC 8908.
                let mut body = json!({ "captive": !accepted, "user-portal-url": p.portal_url(), "can-extend-session": true });
                if let Some(Some(secs)) = p.remaining(ip) {
                    body["seconds-remaining"] = json!(secs);
                }
                let mut r = Response::new(Body::from(body.to_string()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/captive+json"),
                );
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, no-store"),
                );
                r
            }
            (&Method::POST, "/accept") | (&Method::POST, "/extend") => match p.accept(ip) {
                Ok(()) => welcome(&p, true),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a hotspot client failed");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Не получилось открыть доступ / Could not open access",
                    )
                        .into_response()
                }
            },
            (&Method::GET, "/box.json") => {
                let mut body = json!({
                    "box_name": p.box_name,
                    "accepted": accepted,
                    "about": config.about,
                    "rules": config.rules,
                });
                if let Some(w) = p.web_ui.get() {
                    body["homeserver"] = json!(w.homeserver);
                    body["server_name"] = json!(w.server_name);
                    if let Some(r) = &w.radio {
                        body["radio"] = json!(r);
                    }
                    if let Some(p) = &w.panel {
                        body["panel"] = json!(p);
                    }
                    if let Some(why) = &w.setup_needed {
                        body["setup_needed"] = json!(why);
                    }
                }
                let mut r = Response::new(Body::from(body.to_string()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            (&Method::GET, path) => match p.web_ui.get() {
                Some(w) => {
                    let ae = req
                        .headers()
                        .get(header::ACCEPT_ENCODING)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    static_file(&w.dir, path, ae).await
                }
                None if path == "/" => welcome(&p, accepted),
                None => StatusCode::NOT_FOUND.into_response(),
            },
            _ => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if PROBE_HOSTS.contains(&host.as_str()) {
        if accepted {
            if let Some(r) = online_answer(&host, &path) {
                return r;
            }
        }
        return redirect(&p.portal_url());
    }
    if accepted && matches!(path.as_str(), "/generate_204" | "/gen_204") {
        // Android builds of some vendors probe their own hosts (MIUI, EMUI,
        // ColorOS…) with Google's path; offline their names lead here too.
        return StatusCode::NO_CONTENT.into_response();
    }
    if accepted {
        // Offline, every name points at the box: say so instead of a broken page.
        return html(format!(
            "<!doctype html><meta charset=\"utf-8\"><p>Интернета сейчас нет. Коробка работает: <a href=\"{0}\">{0}</a></p>\
             <p>No internet right now. The box works: <a href=\"{0}\">{0}</a></p>",
            p.portal_url()
        ));
    }
    redirect(&p.portal_url())
}

/// The real firewall: elements of the `accepted` set in the box's nftables table.
pub struct NftFirewall;

impl NftFirewall {
    fn nft(script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Installs the hotspot rules (atomically replacing earlier ones).
    pub fn apply(config: &HotspotConfig, accepted: &[Ipv4Addr]) -> anyhow::Result<()> {
        Self::nft(&crate::gen::nft_ruleset(config, accepted))
    }

    /// Removes the hotspot rules.
    pub fn teardown() -> anyhow::Result<()> {
        Self::nft(&crate::gen::nft_teardown())
    }
}

impl Firewall for NftFirewall {
    fn allow(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        Self::nft(&format!(
            "add element inet {} accepted {{ {ip} }}\n",
            crate::gen::NFT_TABLE
        ))
    }
    fn revoke(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        Self::nft(&format!(
            "delete element inet {} accepted {{ {ip} }}\n",
            crate::gen::NFT_TABLE
        ))
    }
}
