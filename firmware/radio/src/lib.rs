//! The Secta box's radio: an Icecast-compatible streamer.
//!
//! Sources connect with `PUT` (Icecast ≥ 2.4) or the legacy `SOURCE` method and
//! Basic auth; listeners `GET` a mount, with or without ICY metadata. Each
//! stream is one shared ring of `Bytes` chunks ([`stream::Stream`]): listeners
//! hold a position in it, a listener that falls `queue_size` behind is dropped,
//! so memory does not grow with slow listeners. Mounts fall back to other
//! mounts (and back, with `fallback_override`); the auto-DJ plays a playlist on
//! a mount while no live source is there; live shows can be recorded.
//!
//! Public surface: [`RadioConfig`], [`Radio`] (`new`, `serve`/`serve_on`,
//! `subscribe`, `now_playing`), [`list_recordings`].

mod autodj;
pub mod codec;
mod config;
mod http;
mod listener;
mod record;
mod source;
mod status;
pub mod stream;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use secta_runtime::Shutdown;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch, Semaphore},
};
use tokio_util::sync::CancellationToken;

pub use config::{valid_mount, MountConfig, RadioConfig};
pub use record::{list_recordings, list_recordings_with, Recording};
use stream::Stream;

/// What the radio says it is (`Server` header, `server_id` in the status).
pub const SERVER_ID: &str = "Icecast 2.4.4 (compatible; Secta)";

/// Something that happened on a mount, for announcements.
#[derive(Debug, Clone, PartialEq)]
pub enum RadioEvent {
    /// A live source connected.
    OnAir {
        mount: String,
        name: String,
        listen_url: String,
    },
    /// The live source left.
    OffAir { mount: String },
    /// The title changed (admin endpoint, Ogg comments, or the auto-DJ's next track).
    Title {
        mount: String,
        title: String,
        automatic: bool,
    },
}

/// One mount as the box shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct MountStatus {
    pub mount: String,
    pub name: String,
    pub title: String,
    pub listeners: usize,
    /// A live source is connected (not only the auto-DJ).
    pub live: bool,
    /// Something is playing (live or auto-DJ).
    pub on_air: bool,
    pub listen_url: String,
    pub content_type: String,
    /// Matrix room alias local part from the config, if any.
    pub room: Option<String>,
}

pub(crate) struct Mount {
    pub name: String,
    pub cfg: MountConfig,
    pub live: Mutex<Option<Arc<Stream>>>,
    pub auto: Mutex<Option<Arc<Stream>>>,
    pub listeners: AtomicUsize,
    pub peak: AtomicUsize,
}

impl Mount {
    /// The stream this mount plays itself: the live source, else the auto-DJ.
    pub fn active(&self) -> Option<Arc<Stream>> {
        let live = self.live.lock().expect("mount lock").clone();
        live.or_else(|| self.auto.lock().expect("mount lock").clone())
    }

    pub fn is_live(&self) -> bool {
        self.live.lock().expect("mount lock").is_some()
    }
}

pub(crate) struct Inner {
    pub cfg: RadioConfig,
    password: String,
    pub data_dir: PathBuf,
    /// The box's data key: recordings are encrypted under it when present.
    pub vault: Option<Arc<secta_vault::Vault>>,
    mounts: Mutex<HashMap<String, Arc<Mount>>>,
    /// Bumped whenever a stream starts or ends, so listeners re-resolve fallbacks.
    pub topology: watch::Sender<u64>,
    pub listeners: AtomicUsize,
    pub sources: AtomicUsize,
    events: broadcast::Sender<RadioEvent>,
    pub started: SystemTime,
    pub cancel: CancellationToken,
}

impl Inner {
    /// The mount `name`, creating it (with defaults if unlisted).
    pub fn mount_entry(&self, name: &str) -> Arc<Mount> {
        let mut m = self.mounts.lock().expect("mounts lock");
        m.entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Mount {
                    name: name.to_owned(),
                    cfg: self.cfg.mount(name),
                    live: Mutex::new(None),
                    auto: Mutex::new(None),
                    listeners: AtomicUsize::new(0),
                    peak: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    pub fn find_mount(&self, name: &str) -> Option<Arc<Mount>> {
        self.mounts.lock().expect("mounts lock").get(name).cloned()
    }

    pub fn all_mounts(&self) -> Vec<Arc<Mount>> {
        let mut v: Vec<_> = self
            .mounts
            .lock()
            .expect("mounts lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// What a listener of `home` hears: its own stream, or its fallback's (≤ 8 hops).
    pub fn resolve(&self, home: &Arc<Mount>) -> Option<(Arc<Mount>, Arc<Stream>)> {
        let mut m = home.clone();
        for _ in 0..8 {
            if let Some(s) = m.active() {
                return Some((m, s));
            }
            m = self.find_mount(m.cfg.fallback.as_deref()?)?;
        }
        None
    }

    /// The source password for `mount`.
    pub fn password_for<'a>(&'a self, cfg: &'a MountConfig) -> &'a str {
        cfg.password.as_deref().unwrap_or(&self.password)
    }

    pub fn changed(&self) {
        self.topology.send_modify(|v| *v += 1);
    }

    pub fn emit(&self, e: RadioEvent) {
        let _ = self.events.send(e);
    }

    pub fn listen_url(&self, mount: &str) -> String {
        format!("{}{mount}", self.cfg.base_url())
    }
}

/// Constant-time comparison for passwords.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The radio service. Cheap to clone.
#[derive(Clone)]
pub struct Radio(Arc<Inner>);

impl Radio {
    /// Prepares the radio: validates the settings, loads or creates the source
    /// password in `DATA/radio/`, and the configured mounts.
    pub fn new(cfg: RadioConfig, data_dir: &Path) -> anyhow::Result<Radio> {
        Self::new_with_vault(cfg, data_dir, None)
    }

    /// Like [`Radio::new`], with the source password and recorded shows
    /// encrypted under the box's data key.
    pub fn new_with_vault(
        cfg: RadioConfig,
        data_dir: &Path,
        vault: Option<Arc<secta_vault::Vault>>,
    ) -> anyhow::Result<Radio> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            anyhow::bail!("invalid [radio] settings: {}", problems.join("; "));
        }
        let dir = data_dir.join("radio");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let password = match &cfg.source_password {
            Some(p) => p.clone(),
            None => {
                // Sealed under the data key when there is one (a plaintext one
                // from before is converted); made only when there is none.
                let f = dir.join("source_password");
                let cipher = vault.as_ref().map(|v| v.file_cipher()).transpose()?;
                secta_vault::secret::password(cipher.as_ref(), &f, || {
                    use rand::Rng;
                    rand::thread_rng()
                        .sample_iter(rand::distributions::Alphanumeric)
                        .take(20)
                        .map(char::from)
                        .collect()
                })?
            }
        };
        let inner = Arc::new(Inner {
            password,
            data_dir: data_dir.to_owned(),
            vault,
            mounts: Mutex::new(HashMap::new()),
            topology: watch::channel(0).0,
            listeners: AtomicUsize::new(0),
            sources: AtomicUsize::new(0),
            events: broadcast::channel(256).0,
            started: SystemTime::now(),
            cancel: CancellationToken::new(),
            cfg,
        });
        for m in &inner.cfg.mounts {
            inner.mount_entry(&m.name);
        }
        Ok(Radio(inner))
    }

    /// The password sources use where a mount has none of its own (never logged).
    pub fn source_password(&self) -> &str {
        &self.0.password
    }

    /// The base URL of the radio (listen URLs are this plus the mount).
    pub fn base_url(&self) -> String {
        self.0.cfg.base_url()
    }

    /// Events for announcements.
    pub fn subscribe(&self) -> broadcast::Receiver<RadioEvent> {
        self.0.events.subscribe()
    }

    /// Every known mount with what it plays now.
    pub fn now_playing(&self) -> Vec<MountStatus> {
        self.0
            .all_mounts()
            .iter()
            .map(|m| {
                let s = m.active();
                let info = s.as_ref().map(|s| s.info()).unwrap_or_default();
                MountStatus {
                    mount: m.name.clone(),
                    name: info
                        .name
                        .or_else(|| m.cfg.stream_name.clone())
                        .unwrap_or_else(|| m.name.clone()),
                    title: info.title,
                    listeners: m.listeners.load(Ordering::Relaxed),
                    live: m.is_live(),
                    on_air: s.is_some(),
                    listen_url: self.0.listen_url(&m.name),
                    content_type: s
                        .map(|s| s.codec.content_type().to_owned())
                        .unwrap_or_default(),
                    room: m.cfg.room.clone(),
                }
            })
            .collect()
    }

    /// Binds `cfg.listen` and serves until shutdown.
    pub async fn serve(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let addr: SocketAddr = self.0.cfg.listen.parse()?;
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the radio to {addr}"))?;
        self.serve_on(l, shutdown).await
    }

    /// Serves on a bound listener until shutdown; starts the auto-DJ of every
    /// mount with a playlist.
    pub async fn serve_on(self, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
        let inner = self.0.clone();
        tracing::info!(addr = %listener.local_addr()?, "radio listening");
        for m in inner.cfg.mounts.iter().filter(|m| m.playlist.is_some()) {
            tokio::spawn(autodj::run(inner.clone(), inner.mount_entry(&m.name)));
        }
        let conns = Arc::new(Semaphore::new(inner.cfg.max_connections));
        let cancel = inner.cancel.clone();
        tokio::spawn({
            let cancel = cancel.clone();
            async move {
                shutdown.wait().await;
                cancel.cancel();
            }
        });
        loop {
            let (sock, _peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "radio accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                drop(sock);
                continue;
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                handle(inner, sock).await;
                drop(permit);
            });
        }
        // Let sources and listeners see the cancellation and end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

/// One connection: read the head, dispatch.
async fn handle(inner: Arc<Inner>, mut sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let timeout = Duration::from_secs(inner.cfg.header_timeout_secs);
    let req = match http::read_head(&mut sock, inner.cfg.max_header_bytes, timeout).await {
        Ok(r) => r,
        Err(http::HeadError::Gone) => return,
        Err(http::HeadError::Status(code, reason)) => {
            http::error(&mut sock, code, reason, "").await;
            return;
        }
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("PUT" | "SOURCE", _) => source::run(inner, sock, req).await,
        ("GET" | "HEAD", "/status-json.xsl") => {
            let body = status::json(&inner);
            http::respond(
                &mut sock,
                200,
                "OK",
                "application/json",
                "",
                body.as_bytes(),
            )
            .await
        }
        ("GET", "/admin/metadata") => status::admin_metadata(&inner, &mut sock, &req).await,
        ("GET" | "HEAD", "/recordings.json") => {
            let cipher = inner.vault.as_ref().and_then(|v| v.file_cipher().ok());
            let list = record::list_recordings_with(&inner.data_dir, cipher.as_ref());
            let body = serde_json::to_vec(&list).unwrap_or_default();
            http::respond(&mut sock, 200, "OK", "application/json", "", &body).await
        }
        ("GET" | "HEAD", p) if valid_mount(p) => listener::run(inner, sock, req).await,
        ("GET" | "HEAD", _) => http::error(&mut sock, 404, "Not Found", "").await,
        ("OPTIONS", _) => {
            http::respond(
                &mut sock,
                204,
                "No Content",
                "text/plain",
                "Allow: GET, HEAD, PUT, SOURCE, OPTIONS\r\n",
                b"",
            )
            .await
        }
        _ => {
            http::error(
                &mut sock,
                405,
                "Method Not Allowed",
                "Allow: GET, HEAD, PUT, SOURCE, OPTIONS\r\n",
            )
            .await
        }
    }
}

/// Serves the radio described by `cfg` until shutdown (the service entry point).
pub async fn serve(cfg: RadioConfig, data_dir: &Path, shutdown: Shutdown) -> anyhow::Result<()> {
    Radio::new(cfg, data_dir)?.serve(shutdown).await
}
