//! The Secta box's slim Matrix homeserver: ruma + axum + SQLite.
//!
//! Public surface: [`HomeserverConfig`], [`Hs::open`], [`Hs::router`], [`serve`] and
//! the [`admin`] functions that the `secta` CLI uses on the same database.

mod account;
pub mod admin;
mod backup;
pub mod config;
mod db;
pub mod discovery;
mod ephemeral;
mod error;
mod extract;
mod federation;
mod filter;
mod keys;
mod media;
pub mod pdu;
mod push;
mod pushers;
mod recent;
mod roominfo;
mod rooms;
mod routes;
mod search;
mod ssync;
mod state;
mod sync;
mod txns;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use ruma::{signatures::Ed25519KeyPair, DeviceId, OwnedServerName, ServerName};
use rusqlite::OptionalExtension;
use secta_runtime::Shutdown;
use tokio::sync::watch;

pub use account::password_problem;
pub use config::{Durability, FederationConfig, HomeserverConfig, Peer};
pub use db::Db;
pub use error::{MxError, MxResult};
use extract::Auth;
pub use federation::PeerStatus;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The homeserver: config, database, signing key and in-memory ephemeral state.
pub struct Hs {
    pub config: HomeserverConfig,
    pub server_name: OwnedServerName,
    pub db: Db,
    pub(crate) data_dir: std::path::PathBuf,
    /// The box's data key: the database, media and key files are encrypted
    /// under it. `None`: stored in the clear (tests, `[vault] encrypt = false`).
    pub(crate) vault: Option<Arc<secta_vault::Vault>>,
    keypair: Ed25519KeyPair,
    key_id: String,
    old_keys: Vec<OldKey>,
    notifier: Notifier,
    pub(crate) typing: ephemeral::Typing,
    pub(crate) push_rules: push::RulesCache,
    pub(crate) unread: push::UnreadCache,
    pub(crate) room_info: roominfo::RoomInfoCache,
    pub(crate) to_device_hints: keys::ToDeviceHints,
    pub(crate) key_counts: keys::KeyCountsCache,
    pub(crate) formatted: pdu::FormattedCache,
    pub(crate) txns: txns::RecentTxns,
    pub(crate) indexer: search::Indexer,
    /// Valid access tokens (by hash) as of an auth version (see `lookup_token`).
    tokens: Mutex<HashMap<String, (Auth, u64)>>,
    pub(crate) pusher_users: pushers::PusherUsers,
    pub(crate) push_wakeup: tokio::sync::Notify,
    pub(crate) fed: federation::Fed,
    pub(crate) filter_cache: Mutex<HashMap<String, Arc<filter::Filter>>>,
    rate: RateLimiter,
    shared_secret: String,
    pub(crate) uia: Mutex<HashMap<String, account::UiaSession>>,
    pub(crate) admin_nonces: Mutex<HashMap<String, Instant>>,
    /// Registration without an invite (from the config; admins change it while running).
    pub(crate) open_registration: std::sync::atomic::AtomicBool,
}

/// Access tokens remembered as valid before the map starts over.
const TOKENS_REMEMBERED: usize = 4096;

impl Hs {
    /// Opens the homeserver's storage under `data_dir` (creating keys and schema on first start).
    pub fn open(config: HomeserverConfig, data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        Self::open_with_vault(config, data_dir, None)
    }

    /// Like [`Hs::open`], with everything stored encrypted under the box's
    /// data key: the database through SQLCipher, media and key files with
    /// XChaCha20-Poly1305 (see `secta-vault`).
    pub fn open_with_vault(
        config: HomeserverConfig,
        data_dir: &Path,
        vault: Option<Arc<secta_vault::Vault>>,
    ) -> anyhow::Result<Arc<Self>> {
        secta_runtime::ensure_data_dir(data_dir)?;
        let server_name = ServerName::parse(&config.server_name)
            .with_context(|| format!("invalid server_name {:?}", config.server_name))?;
        ruma::RoomVersionId::try_from(config.default_room_version.as_str())
            .ok()
            .and_then(|v| v.rules())
            .with_context(|| {
                format!(
                    "unsupported default_room_version {:?}",
                    config.default_room_version
                )
            })?;
        let db_key = vault
            .as_ref()
            .map(|v| v.sqlcipher_key("homeserver.db"))
            .transpose()?;
        let db = Db::open_keyed(&data_dir.join("homeserver.db"), config.durability, db_key)?;
        let secrets = Secrets(vault.as_deref());
        let (keypair, key_id) = load_or_create_signing_key(data_dir, secrets)?;
        let old_keys = load_old_keys(data_dir);
        let recent_txns = db.read(txns::RecentTxns::load)?;
        let shared_secret = match &config.registration_shared_secret {
            Some(s) => s.clone(),
            // In the clear on purpose: it is the admin's credential for
            // shared-secret registration tools, read from the file by them.
            None => load_or_create_shared_secret(data_dir, Secrets(None))?,
        };
        let rate = RateLimiter::new(config.auth_rate_burst, config.auth_rate_per_second);
        if let Some(w) = &config.federation.well_known_server {
            ServerName::parse(w)
                .with_context(|| format!("invalid federation.well_known_server {w:?}"))?;
        }
        let fed = federation::Fed::new(&config.federation)?;
        let open_registration = std::sync::atomic::AtomicBool::new(config.open_registration);
        Ok(Arc::new(Self {
            config,
            server_name,
            db,
            data_dir: data_dir.to_owned(),
            vault,
            keypair,
            key_id,
            old_keys,
            notifier: Notifier::default(),
            typing: ephemeral::Typing::new(),
            push_rules: push::RulesCache::default(),
            unread: push::UnreadCache::default(),
            room_info: roominfo::RoomInfoCache::default(),
            to_device_hints: keys::ToDeviceHints::default(),
            key_counts: keys::KeyCountsCache::default(),
            formatted: pdu::FormattedCache::default(),
            txns: recent_txns,
            indexer: Default::default(),
            tokens: Mutex::new(HashMap::new()),
            pusher_users: pushers::PusherUsers::default(),
            push_wakeup: tokio::sync::Notify::new(),
            fed,
            filter_cache: Mutex::new(HashMap::new()),
            rate,
            shared_secret,
            uia: Mutex::new(HashMap::new()),
            admin_nonces: Mutex::new(HashMap::new()),
            open_registration,
        }))
    }

    /// The public half of the signing key, as `(key id, unpadded base64)`.
    pub fn verify_key(&self) -> (String, String) {
        use base64::Engine;
        (
            self.key_id.clone(),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.keypair.public_key()),
        )
    }

    pub(crate) fn lookup_token(&self, token: &str) -> MxResult<Option<Auth>> {
        let hash = extract::token_hash(token);
        // Every request checks its token: remembered while no token or user
        // changed since, so a busy box does not read (and, encrypted, decrypt)
        // the same pages after every commit.
        let version = self.db.auth_version();
        {
            let cache = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((auth, v)) = cache.get(&hash) {
                if *v == version {
                    return Ok(Some(auth.clone()));
                }
            }
        }
        let row = self.db.read(|c| {
            c.prepare_cached(
                "SELECT t.user_id, t.device_id, u.is_admin FROM access_tokens t JOIN users u ON u.user_id=t.user_id
                 WHERE t.token_hash=?1 AND u.deactivated=0",
            )?
            .query_row([&hash], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?)))
            .optional()
        })?;
        let auth = row.and_then(|(u, d, a)| {
            Some(Auth {
                user_id: u.try_into().ok()?,
                device_id: <&DeviceId>::from(d.as_str()).to_owned(),
                is_admin: a,
            })
        });
        if let Some(a) = &auth {
            let mut cache = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= TOKENS_REMEMBERED {
                cache.clear();
            }
            cache.insert(hash, (a.clone(), version));
        }
        Ok(auth)
    }

    /// The user id behind an access token, if it belongs to a server admin
    /// (for admin endpoints served outside the homeserver, e.g. the panel's).
    pub fn admin_for_token(&self, token: &str) -> Option<String> {
        match self.lookup_token(token) {
            Ok(Some(a)) if a.is_admin => Some(a.user_id.to_string()),
            _ => None,
        }
    }

    /// Wakes the long-polling syncs of these users.
    pub(crate) fn notify_users<'a>(&self, users: impl IntoIterator<Item = &'a str>) {
        let pos = self.db.current_stream();
        self.notifier.notify(users, pos);
    }

    /// Wakes every local member (joined or invited) of the room.
    pub(crate) fn notify_room(&self, room_id: &str) {
        // Called after commit: the federation sender now sees any queue rows
        // the write added (a wake-up from inside the transaction can come too
        // early, and the sender would then wait for its next round).
        self.fed.wakeup.notify_one();
        if let Ok(info) = self.db.read(|c| self.room_info.get(self, c, room_id)) {
            self.notify_users(info.wake.iter().map(String::as_str));
        }
    }

    /// How long a long-poll that just woke waits for more news before it
    /// answers: about a millisecond while the write path is idle (news goes out
    /// at once), up to `sync_coalesce_ms` as writes queue up — then every
    /// answer carries more events, and building fewer of them leaves the CPU to
    /// the writers.
    pub(crate) fn sync_coalesce(&self) -> std::time::Duration {
        let max = self.config.sync_coalesce_ms as f64;
        let ms = if max <= 1.0 {
            max
        } else {
            1.0 + (max - 1.0) * self.db.write_pressure()
        };
        std::time::Duration::from_micros((ms * 1000.0) as u64)
    }

    pub(crate) fn check_rate(&self, key: &str) -> MxResult<()> {
        self.rate.check(key)
    }

    /// Starts the background tasks: typing expiry and housekeeping, push delivery.
    /// [`serve`] does this; embedders that use [`Hs::router`] directly call it once.
    pub fn start_background(self: &Arc<Self>, shutdown: Shutdown) {
        tokio::spawn(ephemeral::housekeeping(self.clone(), shutdown.clone()));
        tokio::spawn(pushers::deliver(self.clone(), shutdown.clone()));
        tokio::spawn(federation::sender(self.clone(), shutdown));
    }

    /// Builds the HTTP router of the Client-Server API (and the admin endpoints).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        routes::router(self.clone())
    }
}

/// A signing key this server used before a rotation: (key id, public key, expired at ms).
pub type OldKey = (String, String, u64);

fn load_old_keys(dir: &Path) -> Vec<OldKey> {
    std::fs::read_to_string(dir.join("old_signing_keys.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Replaces the server's signing key: the old public key stays published (in
/// `old_verify_keys`, expired now) so events signed with it still verify. Run
/// while the box is stopped; the new key is used from the next start.
pub fn rotate_signing_key(
    dir: &Path,
    vault: Option<&secta_vault::Vault>,
) -> anyhow::Result<String> {
    use base64::Engine;
    let secrets = Secrets(vault);
    let (old, old_id) = load_or_create_signing_key(dir, secrets)?;
    let mut olds = load_old_keys(dir);
    olds.push((
        old_id,
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(old.public_key()),
        now_ms(),
    ));
    secta_runtime::write_secret_file(
        &dir.join("old_signing_keys.json"),
        serde_json::to_string(&olds)?.as_bytes(),
    )?;
    std::fs::remove_file(dir.join("signing.key"))?;
    let (_, new_id) = load_or_create_signing_key(dir, secrets)?;
    Ok(new_id)
}

/// Small secret files (signing key, shared secret): encrypted under the data
/// key when there is one, owner-only either way.
#[derive(Clone, Copy)]
struct Secrets<'a>(Option<&'a secta_vault::Vault>);

impl Secrets<'_> {
    fn cipher(&self) -> anyhow::Result<Option<secta_vault::FileCipher>> {
        Ok(self.0.map(|v| v.file_cipher()).transpose()?)
    }

    /// `Ok(None)` if the file does not exist.
    fn read(&self, path: &Path) -> anyhow::Result<Option<String>> {
        let Some(bytes) = secta_vault::secret::read(self.cipher()?.as_ref(), path)? else {
            return Ok(None);
        };
        Ok(Some(String::from_utf8(bytes.to_vec()).with_context(
            || format!("{} is not text", path.display()),
        )?))
    }

    fn write(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        secta_vault::secret::write(self.cipher()?.as_ref(), path, text.as_bytes())
    }
}

fn load_or_create_signing_key(
    dir: &Path,
    secrets: Secrets<'_>,
) -> anyhow::Result<(Ed25519KeyPair, String)> {
    use base64::Engine;
    let path = dir.join("signing.key");
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(text) = secrets.read(&path)? {
        let (version, der) = text
            .trim()
            .split_once(' ')
            .context("malformed signing.key")?;
        let der = b64.decode(der).context("malformed signing.key")?;
        let kp = Ed25519KeyPair::from_der(&der, version.to_owned())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok((kp, format!("ed25519:{version}")));
    }
    let der = Ed25519KeyPair::generate();
    let version: String = {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        (0..6)
            .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
            .collect()
    };
    secrets.write(&path, &format!("{version} {}\n", b64.encode(&der)))?;
    let kp = Ed25519KeyPair::from_der(&der, version.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((kp, format!("ed25519:{version}")))
}

fn load_or_create_shared_secret(dir: &Path, secrets: Secrets<'_>) -> anyhow::Result<String> {
    let path = dir.join("registration_shared_secret");
    if let Some(s) = secrets.read(&path)? {
        let s = s.trim().to_owned();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let secret = random_string(48);
    secrets.write(&path, &format!("{secret}\n"))?;
    Ok(secret)
}

/// A random alphanumeric string from the OS-seeded CSPRNG.
pub fn random_string(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
        .collect()
}

/// Per-user wake-up channels for long-polling `/sync`.
#[derive(Default)]
struct Notifier {
    users: Mutex<HashMap<String, watch::Sender<i64>>>,
}

impl Notifier {
    fn subscribe(&self, user: &str) -> watch::Receiver<i64> {
        let mut map = self.users.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(user.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify<'a>(&self, users: impl IntoIterator<Item = &'a str>, pos: i64) {
        let map = self.users.lock().unwrap_or_else(|p| p.into_inner());
        for u in users {
            if let Some(tx) = map.get(u) {
                tx.send_replace(pos);
            }
        }
    }
}

/// A token bucket per client address for login and registration.
struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn new(burst: u32, per_second: f64) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(0.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, key: &str) -> MxResult<()> {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            let (burst, rate) = (self.burst, self.per_second);
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let entry = map.entry(key.to_owned()).or_insert((self.burst, now));
        let refill = now.duration_since(entry.1).as_secs_f64() * self.per_second;
        entry.0 = (entry.0 + refill).min(self.burst);
        entry.1 = now;
        if entry.0 >= 1.0 {
            entry.0 -= 1.0;
            Ok(())
        } else {
            let wait = if self.per_second > 0.0 {
                (1.0 - entry.0) / self.per_second
            } else {
                60.0
            };
            Err(MxError::limit_exceeded((wait * 1000.0).ceil() as u64))
        }
    }
}

/// Serves the homeserver on `addr` until `shutdown`; in-flight requests finish,
/// then the database is checkpointed.
pub async fn serve(hs: Arc<Hs>, addr: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    serve_on(hs, listener, shutdown).await
}

/// Like [`serve`], on a listener the caller bound.
pub async fn serve_on(
    hs: Arc<Hs>,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let app = hs
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(addr = %listener.local_addr()?, server_name = %hs.server_name, "homeserver listening");
    hs.start_background(shutdown.clone());
    if let Some(addr) = hs
        .config
        .federation
        .tls_listen
        .clone()
        .filter(|_| hs.config.federation.enabled)
    {
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad federation.tls_listen {addr:?}"))?;
        let (hs2, sd) = (hs.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = federation::serve_tls(hs2, addr, sd).await {
                tracing::error!(error = %e, "federation TLS listener failed");
            }
        });
    }
    let wait = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(wait.wait());
    // Long-polls hold connections open: give them a moment, then stop anyway.
    tokio::select! {
        r = server => r?,
        _ = async { shutdown.wait().await; tokio::time::sleep(Duration::from_secs(5)).await } => {
            tracing::info!("graceful shutdown took too long; closing remaining connections");
        }
    }
    hs.db.checkpoint();
    tracing::info!("homeserver stopped");
    Ok(())
}
