//! The box's own HTTP API beside the captive portal (same origin as the web
//! app): signing up through the portal, and the admin pages' API. It wires
//! services together, so it lives in the binary: the homeserver (accounts,
//! admins, registration mode), the hotspot (settings, clients) and the
//! WireGuard gateway's store (members' VPN peers).
//!
//! Admin calls carry the admin's Matrix access token (`Authorization: Bearer`)
//! and are refused for anyone else. Clients are known by their connection's
//! address (and the MAC the lease table gives for it), never by what they send.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Path as UrlPath, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use rusqlite::{params, OptionalExtension};
use secta_homeserver::Hs;
use secta_hotspot::{Hotspot, HotspotConfig};
use secta_wireguard::{profile, qr, store::Role, store::Store, WireguardConfig};
use serde::Deserialize;
use serde_json::{json, Value};

/// Sign-up attempts one client may make in [`RATE_WINDOW`].
const RATE_ATTEMPTS: usize = 5;
const RATE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Clients remembered by the rate limiter (oldest forgotten first).
const RATE_CLIENTS: usize = 10_000;

pub struct Web {
    hs: Arc<Hs>,
    hotspot: Arc<Hotspot>,
    data: PathBuf,
    box_name: String,
    homeserver_url: String,
    radio: Option<String>,
    wireguard: WireguardConfig,
    /// The data key: the WireGuard store is encrypted under it.
    vault: Option<Arc<secta_vault::Vault>>,
    joins: Mutex<rusqlite::Connection>,
    attempts: Mutex<HashMap<String, VecDeque<Instant>>>,
    started: Instant,
    /// The panic wipe, for the admin's duress action.
    wiper: crate::panel::Wiper,
}

fn err(status: StatusCode, errcode: &str, error: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "errcode": errcode, "error": error.into() })),
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        "M_UNKNOWN",
        e.to_string(),
    )
}

fn now_ms() -> i64 {
    secta_homeserver::now_ms() as i64
}

pub use secta_homeserver::password_problem;

impl Web {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hs: Arc<Hs>,
        hotspot: Arc<Hotspot>,
        data: &Path,
        box_name: String,
        homeserver_url: String,
        radio: Option<String>,
        wireguard: WireguardConfig,
        vault: Option<Arc<secta_vault::Vault>>,
        wiper: crate::panel::Wiper,
    ) -> anyhow::Result<Arc<Self>> {
        let db = rusqlite::Connection::open(data.join("portal.db"))?;
        // Who joined from which device is personal data: encrypted under the
        // box's data key like the homeserver's database.
        if let Some(v) = &vault {
            let key = v.sqlcipher_key("portal")?;
            db.execute_batch(&zeroize::Zeroizing::new(format!(
                "PRAGMA key = \"{}\";",
                &*key
            )))?;
        }
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS joins (
                 user_id TEXT PRIMARY KEY,
                 registered_ms INTEGER NOT NULL,
                 rules_accepted_ms INTEGER NOT NULL,
                 rules_sha256 TEXT NOT NULL,
                 ip TEXT NOT NULL,
                 mac TEXT,
                 device_name TEXT,
                 invite TEXT,
                 first_login_ms INTEGER
             );",
        )?;
        Ok(Arc::new(Self {
            hs,
            hotspot,
            data: data.to_owned(),
            box_name,
            homeserver_url,
            radio,
            wireguard,
            vault,
            joins: Mutex::new(db),
            attempts: Mutex::new(HashMap::new()),
            started: Instant::now(),
            wiper,
        }))
    }

    /// The WireGuard gateway's store (members' devices).
    fn store(&self) -> anyhow::Result<Store> {
        Store::open(&self.data, self.vault.as_deref())
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/api/register", post(register))
            .route("/api/server-qr.svg", get(server_qr))
            .route("/api/admin/status", get(status))
            .route("/api/admin/hotspot", get(hotspot_get).put(hotspot_put))
            .route(
                "/api/admin/registration",
                get(registration_get).put(registration_put),
            )
            .route("/api/admin/clients", get(clients))
            .route("/api/admin/members", get(members))
            .route("/api/admin/wipe", post(wipe))
            .route("/api/admin/vpn", get(vpn_list).post(vpn_add))
            .route("/api/admin/vpn/{name}/{action}", post(vpn_action))
            .route(
                "/api/admin/vpn/{name}",
                axum::routing::delete(vpn_remove).get(vpn_file),
            )
            .with_state(self.clone())
    }

    /// The admin behind the request's access token, or the refusal to send.
    fn admin(&self, headers: &HeaderMap) -> Result<String, Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                err(
                    StatusCode::UNAUTHORIZED,
                    "M_MISSING_TOKEN",
                    "Log in as the box's admin",
                )
            })?;
        match self.hs.whoami(token) {
            Ok(Some((user, true))) => Ok(user),
            Ok(Some(_)) => Err(err(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "This account is not an admin of the box",
            )),
            Ok(None) => Err(err(
                StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "Unknown or expired login",
            )),
            Err(e) => Err(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                e.message,
            )),
        }
    }

    /// Counts a sign-up attempt of `client`; false when it made too many lately.
    fn allow_attempt(&self, client: &str) -> bool {
        let now = Instant::now();
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RATE_CLIENTS && !map.contains_key(client) {
            map.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < RATE_WINDOW)
            });
            if map.len() >= RATE_CLIENTS {
                return false;
            }
        }
        let q = map.entry(client.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
        {
            q.pop_front();
        }
        if q.len() >= RATE_ATTEMPTS {
            return false;
        }
        q.push_back(now);
        true
    }

    /// Writes `keys` into `[section]` of `DATA/settings.toml` (owner-only: it
    /// can hold the Wi-Fi password), keeping everything else in the file.
    fn persist(&self, section: &str, keys: Vec<(&str, toml::Value)>) -> anyhow::Result<()> {
        let path = self.data.join(crate::SETTINGS_FILE);
        let mut table: toml::Table = match std::fs::read_to_string(&path) {
            Ok(t) => toml::from_str(&t)?,
            Err(_) => toml::Table::new(),
        };
        let sec = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sec) = sec else {
            anyhow::bail!("[{section}] in {} is not a table", path.display());
        };
        for (k, v) in keys {
            sec.insert(k.to_owned(), v);
        }
        let text = format!(
            "# Written by the box's admin pages; laid over the config file at start.\n{}",
            toml::to_string(&table)?
        );
        secta_runtime::write_secret_file(&path, text.as_bytes())
    }
}

/// The admin making the request, by user id (extracting it refuses everyone else).
struct Admin(String);

impl axum::extract::FromRequestParts<Arc<Web>> for Admin {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        w: &Arc<Web>,
    ) -> Result<Self, Response> {
        w.admin(&parts.headers).map(Admin)
    }
}

/// A JSON body; bad JSON gets `M_BAD_JSON` with what was wrong.
struct JsonBody<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(err(StatusCode::BAD_REQUEST, "M_BAD_JSON", e.body_text())),
        }
    }
}

#[derive(Deserialize)]
struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    invite: String,
    #[serde(default)]
    accept_rules: bool,
}

/// Sign-up from the welcome page: the member accepts the rules, gets an
/// account, and the sign of joining is recorded (when, which rules, from which
/// device by its lease).
async fn register(
    State(w): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(b): JsonBody<RegisterBody>,
) -> Response {
    let client = w.hotspot.portal().client(peer.ip());
    let key = client.mac.clone().unwrap_or_else(|| peer.ip().to_string());
    if !w.allow_attempt(&key) {
        let mut r = err(
            StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            "Too many sign-up attempts from this device; try again in a few minutes",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("600"));
        return r;
    }
    if !b.accept_rules {
        return err(
            StatusCode::BAD_REQUEST,
            "SECTA_RULES_NOT_ACCEPTED",
            "Accept the rules of the box to join",
        );
    }
    let username = b.username.trim().to_lowercase();
    if let Some((reason, text)) = password_problem(&username, &b.password) {
        let mut r = err(StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD", text);
        if let Ok(v) = HeaderValue::from_str(reason) {
            r.headers_mut().insert("x-secta-reason", v);
        }
        return r;
    }
    let invite = b.invite.trim();
    let invite = (!invite.is_empty()).then_some(invite);
    let hs = w.hs.clone();
    let (u, p, i) = (
        username.clone(),
        b.password.clone(),
        invite.map(str::to_owned),
    );
    let res = tokio::task::spawn_blocking(move || hs.register_member(&u, &p, i.as_deref())).await;
    let user_id = match res {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            let status = match e.errcode {
                "M_FORBIDDEN" => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            return err(status, e.errcode, e.message);
        }
        Err(e) => return internal(e),
    };
    // Accepting the rules in the form is accepting them on the portal too.
    if !client.accepted {
        if let Err(e) = w.hotspot.portal().accept(peer.ip()) {
            tracing::warn!(error = %e, "opening the hotspot for a new member failed");
        }
    }
    let rules = w.hotspot.portal().config().rules;
    let rules_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(rules.as_bytes()))
    };
    let now = now_ms();
    let db = w.joins.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = db.execute(
        "INSERT OR REPLACE INTO joins (user_id, registered_ms, rules_accepted_ms, rules_sha256, ip, mac, device_name, invite)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            user_id,
            now,
            client.accepted_ms.map_or(now, |t| t as i64),
            rules_hash,
            peer.ip().to_string(),
            client.mac,
            client.hostname,
            invite
        ],
    ) {
        tracing::warn!(error = %e, "recording a new member's joining failed");
    }
    Json(json!({ "user_id": user_id })).into_response()
}

async fn server_qr(State(w): State<Arc<Web>>) -> Response {
    match qr::svg(&w.homeserver_url) {
        Ok(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            svg,
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

async fn status(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    let users = w.hs.admin_list_users().map(|u| u.len()).unwrap_or(0);
    let wg = &w.wireguard;
    let members_running = wg.enabled && crate::vpn::live(wg, &wg.members.interface).is_some();
    let members = w
        .store()
        .and_then(|s| s.members())
        .map(|m| m.len())
        .unwrap_or(0);
    let radio = match &w.radio {
        Some(listen) => {
            let answering = match listen.parse::<SocketAddr>() {
                Ok(a) => {
                    let a = if a.ip().is_unspecified() {
                        SocketAddr::from(([127, 0, 0, 1], a.port()))
                    } else {
                        a
                    };
                    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(a))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
                Err(_) => false,
            };
            json!({ "enabled": true, "listen": listen, "answering": answering })
        }
        None => json!({ "enabled": false }),
    };
    Json(json!({
        "box_name": w.box_name,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": w.started.elapsed().as_secs(),
        "homeserver": {
            "running": true,
            "url": w.homeserver_url,
            "users": users,
            "open_registration": w.hs.open_registration(),
        },
        "hotspot": w.hotspot.status(),
        "radio": radio,
        "wireguard": { "enabled": wg.enabled, "running": members_running, "members": members },
    }))
    .into_response()
}

fn hotspot_json(c: &HotspotConfig) -> Value {
    json!({
        "ssid": c.ssid,
        "open": c.passphrase.is_none(),
        "wpa3": c.wpa3,
        "hidden": c.hidden,
        "channel": c.channel,
        "country": c.country,
        "session_minutes": c.session_minutes,
        "about": c.about,
        "rules": c.rules,
        "interface": c.interface,
        "address": c.address,
        "hostname": c.hostname,
    })
}

async fn hotspot_get(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    Json(hotspot_json(&w.hotspot.portal().config())).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HotspotChange {
    ssid: Option<String>,
    /// `true`: no password (open network).
    open: Option<bool>,
    /// A new Wi-Fi password (closing the network or changing it), typed twice.
    passphrase: Option<String>,
    passphrase_confirm: Option<String>,
    wpa3: Option<bool>,
    hidden: Option<bool>,
    channel: Option<u8>,
    country: Option<String>,
    session_minutes: Option<u64>,
    about: Option<String>,
    rules: Option<String>,
}

async fn hotspot_put(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(b): JsonBody<HotspotChange>,
) -> Response {
    let ch = b;
    let old = w.hotspot.portal().config();
    let mut new = old.clone();
    let mut problems = Vec::new();
    if let Some(v) = ch.ssid {
        new.ssid = v;
    }
    match (ch.open, ch.passphrase) {
        (Some(true), Some(_)) => problems.push("an open network has no password".to_owned()),
        (Some(true), None) => new.passphrase = None,
        (_, Some(pw)) => {
            if ch.passphrase_confirm.as_deref() != Some(pw.as_str()) {
                problems.push(
                    "the two Wi-Fi passwords differ: type the new password twice (or you could lock yourself out of the Wi-Fi)"
                        .to_owned(),
                );
            }
            new.passphrase = Some(pw);
        }
        (Some(false), None) if old.passphrase.is_none() => {
            problems.push("closing the network needs a Wi-Fi password".to_owned())
        }
        _ => {}
    }
    if let Some(v) = ch.wpa3 {
        new.wpa3 = v;
    }
    if let Some(v) = ch.hidden {
        new.hidden = v;
    }
    if let Some(v) = ch.channel {
        new.channel = v;
    }
    if let Some(v) = ch.country {
        new.country = v.trim().to_uppercase();
    }
    if let Some(v) = ch.session_minutes {
        new.session_minutes = v;
    }
    if let Some(v) = ch.about {
        new.about = v.replace("\r\n", "\n");
    }
    if let Some(v) = ch.rules {
        new.rules = v.replace("\r\n", "\n");
    }
    if new.wpa3 && new.passphrase.is_none() {
        // WPA3 goes with a password; an open network simply has none.
        new.wpa3 = false;
    }
    // An admin on the hotspot itself must be able to see the network again.
    let on_hotspot = match peer.ip() {
        IpAddr::V4(ip) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(old.prefix))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(old.address) & mask
        }
        IpAddr::V6(_) => false,
    };
    if on_hotspot && new.hidden && !old.hidden {
        problems.push(
            "you are connected through this Wi-Fi: hiding it would make reconnecting hard; hide it from another connection (VPN or cable)"
                .to_owned(),
        );
    }
    if !problems.is_empty() {
        return Json(json!({ "ok": false, "problems": problems }))
            .into_response()
            .with_status(StatusCode::BAD_REQUEST);
    }
    let hotspot = w.hotspot.clone();
    let candidate = new.clone();
    let applied = match tokio::task::spawn_blocking(move || hotspot.apply(candidate)).await {
        Ok(Ok(a)) => a,
        Ok(Err(problems)) => {
            return Json(json!({ "ok": false, "problems": problems }))
                .into_response()
                .with_status(StatusCode::BAD_REQUEST)
        }
        Err(e) => return internal(e),
    };
    let saved = w.persist(
        "hotspot",
        vec![
            ("ssid", new.ssid.clone().into()),
            (
                "passphrase",
                new.passphrase.clone().unwrap_or_default().into(),
            ),
            ("wpa3", new.wpa3.into()),
            ("hidden", new.hidden.into()),
            ("channel", i64::from(new.channel).into()),
            ("country", new.country.clone().into()),
            ("session_minutes", (new.session_minutes as i64).into()),
            ("about", new.about.clone().into()),
            ("rules", new.rules.clone().into()),
        ],
    );
    if let Err(e) = saved {
        tracing::warn!(error = %format!("{e:#}"), "saving the hotspot settings failed");
        return Json(json!({ "ok": true, "applied": applied, "saved": false,
            "problems": [format!("applied, but not saved for the next start: {e:#}")] }))
        .into_response();
    }
    let reconnect = on_hotspot && applied.hostapd;
    Json(
        json!({ "ok": true, "applied": applied, "saved": true, "reconnect": reconnect,
                 "settings": hotspot_json(&new) }),
    )
    .into_response()
}

trait WithStatus {
    fn with_status(self, s: StatusCode) -> Response;
}

impl WithStatus for Response {
    fn with_status(mut self, s: StatusCode) -> Response {
        *self.status_mut() = s;
        self
    }
}

async fn registration_get(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    Json(json!({ "open": w.hs.open_registration() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistrationChange {
    open: bool,
}

async fn registration_put(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    JsonBody(b): JsonBody<RegistrationChange>,
) -> Response {
    let ch = b;
    if let Err(e) = w.persist("homeserver", vec![("open_registration", ch.open.into())]) {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            format!("could not save the setting: {e:#}"),
        );
    }
    w.hs.set_open_registration(ch.open);
    Json(json!({ "open": ch.open })).into_response()
}

async fn clients(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    Json(json!({ "clients": w.hotspot.portal().clients() })).into_response()
}

async fn members(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    let users = match w.hs.admin_list_users() {
        Ok(u) => u,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.errcode, e.message),
    };
    let db = w.joins.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for u in users {
        let join = db
            .query_row(
                "SELECT registered_ms, rules_accepted_ms, rules_sha256, ip, mac, device_name, first_login_ms FROM joins WHERE user_id=?1",
                [&u.user_id],
                |r| {
                    Ok(json!({
                        "registered_ms": r.get::<_, i64>(0)?,
                        "rules_accepted_ms": r.get::<_, i64>(1)?,
                        "rules_sha256": r.get::<_, String>(2)?,
                        "ip": r.get::<_, String>(3)?,
                        "mac": r.get::<_, Option<String>>(4)?,
                        "device_name": r.get::<_, Option<String>>(5)?,
                        "first_login_ms": r.get::<_, Option<i64>>(6)?,
                    }))
                },
            )
            .optional()
            .ok()
            .flatten();
        // The first login is noted once, the first time it is seen.
        let join = match join {
            Some(mut j) if j["first_login_ms"].is_null() => {
                if let Ok(Some(t)) = w.hs.earliest_device_login(&u.user_id) {
                    let _ = db.execute(
                        "UPDATE joins SET first_login_ms=?1 WHERE user_id=?2 AND first_login_ms IS NULL",
                        params![t, u.user_id],
                    );
                    j["first_login_ms"] = json!(t);
                }
                Some(j)
            }
            j => j,
        };
        out.push(json!({
            "user_id": u.user_id,
            "displayname": u.displayname,
            "admin": u.admin,
            "deactivated": u.deactivated,
            "created_ts": u.created_ts,
            "joining": join,
        }));
    }
    Json(json!({ "members": out })).into_response()
}

fn peer_json(m: &secta_wireguard::store::Member, live: Option<&crate::vpn::Live>) -> Value {
    let key = m.public_key.to_base64();
    let seen = live.and_then(|l| l.peers.iter().find(|p| p.0 == key));
    let handshake = seen
        .and_then(|p| p.1)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    json!({
        "name": m.name,
        "address": m.address,
        "enabled": m.enabled,
        "active": m.active(secta_wireguard::store::now_ms()),
        "expires_ms": m.expires_ms,
        "created_ms": m.created_ms,
        "public_key": key,
        "last_handshake": handshake,
        "rx_bytes": seen.map(|p| p.2),
        "tx_bytes": seen.map(|p| p.3),
    })
}

fn vpn_error(e: anyhow::Error) -> Response {
    let text = format!("{e:#}");
    let status = if text.contains("no device named") {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::BAD_REQUEST
    };
    err(status, "SECTA_VPN", text)
}

/// Runs a store operation off the async threads and answers with its JSON.
async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => vpn_error(e),
        Err(e) => internal(e),
    }
}

async fn vpn_list(State(w): State<Arc<Web>>, _admin: Admin) -> Response {
    let cfg = w.wireguard.clone();
    blocking(move || -> anyhow::Result<Value> {
        let store = w.store()?;
        let live = crate::vpn::live(&cfg, &cfg.members.interface);
        let peers: Vec<Value> = store
            .members()?
            .iter()
            .map(|m| peer_json(m, live.as_ref()))
            .collect();
        Ok(json!({
            "enabled": cfg.enabled,
            "running": live.is_some(),
            "endpoint": cfg.members.endpoint,
            "peers": peers,
        }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerAdd {
    name: String,
    /// Days until the device stops working (none: no expiry).
    expires_days: Option<u32>,
}

async fn vpn_add(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    JsonBody(b): JsonBody<PeerAdd>,
) -> Response {
    let cfg = w.wireguard.clone();
    blocking(move || -> anyhow::Result<Value> {
        if cfg.members.endpoint.is_none() {
            anyhow::bail!("set [wireguard.members] endpoint = \"HOST:PORT\" (the address members' devices dial) in the config first");
        }
        let mut store = w.store()?;
        let expires = b
            .expires_days
            .map(|d| secta_wireguard::store::now_ms() + i64::from(d) * 86_400_000);
        let m = store.add_member(b.name.trim(), cfg.members_subnet()?, expires)?;
        Ok(peer_json(&m, None))
    })
    .await
}

/// Refuses to cut the admin's own tunnel: the request comes from that peer.
fn own_tunnel(store: &Store, name: &str, from: IpAddr) -> anyhow::Result<()> {
    let m = store.member(name)?;
    if IpAddr::V4(m.address) == from {
        anyhow::bail!(
            "you are connected through {name} right now: disabling or removing it would cut you off; do it from another connection"
        );
    }
    Ok(())
}

async fn vpn_action(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Response {
    blocking(move || -> anyhow::Result<Value> {
        let store = w.store()?;
        match action.as_str() {
            "enable" => store.set_enabled(&name, true)?,
            "disable" => {
                own_tunnel(&store, &name, peer.ip())?;
                store.set_enabled(&name, false)?
            }
            _ => anyhow::bail!("unknown action {action:?} (enable or disable)"),
        }
        Ok(json!({}))
    })
    .await
}

async fn vpn_remove(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    blocking(move || -> anyhow::Result<Value> {
        let store = w.store()?;
        own_tunnel(&store, &name, peer.ip())?;
        store.remove(&name)?;
        Ok(json!({}))
    })
    .await
}

#[derive(Deserialize)]
struct FileQuery {
    /// `conf` (the WireGuard file) or `qr` (SVG of it).
    format: String,
}

/// A device's `.conf` (download) or its QR code (SVG), never cached.
async fn vpn_file(
    State(w): State<Arc<Web>>,
    _admin: Admin,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<FileQuery>,
) -> Response {
    let cfg = w.wireguard.clone();
    let n = name.clone();
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let store = w.store()?;
        let m = store.member(&n)?;
        Ok(profile::member_conf(&m, &store.key(Role::Members)?.public(), &cfg)?.to_text())
    })
    .await;
    let text = match res {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return vpn_error(e),
        Err(e) => return internal(e),
    };
    let (body, ct) = match q.format.as_str() {
        "conf" => (text, "text/plain; charset=utf-8"),
        "qr" => match qr::svg(&text) {
            Ok(s) => (s, "image/svg+xml"),
            Err(e) => return vpn_error(e),
        },
        _ => {
            return err(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                "format must be conf or qr",
            )
        }
    };
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if q.format == "conf" {
        // Names are checked by the store ([A-Za-z0-9 ._-] and Cyrillic), but be safe in the header.
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}.conf\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_passwords_are_named() {
        assert_eq!(password_problem("anya", "short").unwrap().0, "short");
        assert_eq!(
            password_problem("anya", "anya-the-great").unwrap().0,
            "username"
        );
        assert_eq!(password_problem("bo", "aaaaaaaaaa").unwrap().0, "repeated");
        assert_eq!(password_problem("bo", "Password1").unwrap().0, "common");
        assert_eq!(password_problem("bo", "йцукенгш").unwrap().0, "common");
        assert_eq!(password_problem("bo", &"x".repeat(600)).unwrap().0, "long");
        assert!(password_problem("anya", "длинный пароль").is_none());
        assert!(password_problem("anya", "correct horse").is_none());
    }
}

/// The admin's duress action: `POST /api/admin/wipe` with `{"confirm": "wipe"}`.
/// The wipe runs on its own thread (key first); the answer comes before it ends.
async fn wipe(
    State(web): State<Arc<Web>>,
    Admin(admin): Admin,
    body: Option<Json<Value>>,
) -> Response {
    if body.as_ref().and_then(|b| b["confirm"].as_str()) != Some("wipe") {
        return err(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "Send {\"confirm\": \"wipe\"} to wipe the box",
        );
    }
    let wiper = &web.wiper;
    if wiper.started() {
        return err(
            StatusCode::CONFLICT,
            "M_UNKNOWN",
            "The box is already being wiped",
        );
    }
    wiper.request(format!("admin duress action by {admin} (web app)"));
    (StatusCode::ACCEPTED, Json(json!({"wipe": "started"}))).into_response()
}
