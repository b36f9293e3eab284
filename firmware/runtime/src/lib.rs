//! Shared runtime pieces of the Secta box.
//!
//! Every service crate gets the same three things from here: its section of the
//! one TOML config file (with safe defaults), the box's data directory, and a
//! [`Shutdown`] signal it must honour. This crate depends on no service.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

pub mod status;
pub use status::{BoxStatus, Report, Status, WipeStatus};

/// The parsed config file: a TOML table that each service reads its own section of.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    table: toml::Table,
    path: Option<PathBuf>,
}

impl ConfigFile {
    /// Reads `path`. A missing file is an error; use [`ConfigFile::default`] for "all defaults".
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).map(|mut c| {
            c.path = Some(path.to_owned());
            c
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text).context("config file is not valid TOML")?;
        Ok(Self { table, path: None })
    }

    /// The section `name` deserialized into `T`; a missing section yields `T::default()`.
    /// Unknown keys are rejected by types that use `#[serde(deny_unknown_fields)]`.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> anyhow::Result<T> {
        match self.table.get(name) {
            None => Ok(T::default()),
            Some(value) => value
                .clone()
                .try_into()
                .with_context(|| format!("invalid [{name}] section in config")),
        }
    }

    /// Lays `other` over this file: keys of a section in `other` replace the
    /// same keys here; sections and keys it does not name are kept. (The box's
    /// admin pages write their changes to such a file in the data directory.)
    pub fn overlay(&mut self, other: &ConfigFile) {
        for (name, value) in &other.table {
            match (self.table.get_mut(name), value) {
                (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => {
                    for (k, v) in theirs {
                        mine.insert(k.clone(), v.clone());
                    }
                }
                _ => {
                    self.table.insert(name.clone(), value.clone());
                }
            }
        }
    }

    /// The raw table of section `name` (empty when missing).
    pub fn table(&self, name: &str) -> toml::Table {
        match self.table.get(name) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => toml::Table::new(),
        }
    }

    /// Where the file came from, if it came from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// The `[box]` section: settings shared by every service.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoxConfig {
    /// Where all of the box's data lives.
    pub data_dir: PathBuf,
    /// Human name of the box, shown on its pages.
    pub name: String,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    pub log: String,
    /// `true` for JSON log lines (for log shippers), `false` for human-readable ones.
    pub log_json: bool,
    /// The built web app (`web-ui/dist`), served by the portal.
    pub web_ui_dir: PathBuf,
}

impl Default for BoxConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/data/secta"),
            name: "Secta".to_owned(),
            log: "info,ruma_state_res=warn".to_owned(),
            log_json: false,
            web_ui_dir: PathBuf::from("/usr/share/secta/web-ui"),
        }
    }
}

/// Creates the data directory (owner-only) if it is missing.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", dir.display()))?;
    }
    Ok(())
}

/// A temporary file beside `path`, unique to this process and call, owner-only.
fn secret_temp(path: &Path, contents: &[u8]) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "secret".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = f.write_all(contents).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    Ok(tmp)
}

/// Writes a secret file readable only by its owner, atomically (concurrent
/// writers each use their own temporary file; the last rename wins).
pub fn write_secret_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = secret_temp(path, contents)?;
    fs::rename(&tmp, path).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("renaming into {}", path.display())
    })?;
    Ok(())
}

/// Creates a secret file only if none exists yet, atomically: of concurrent
/// callers exactly one creates it. Returns false (and writes nothing) when the
/// file was already there, so the caller reads that one instead.
pub fn create_secret_file(path: &Path, contents: &[u8]) -> anyhow::Result<bool> {
    let tmp = secret_temp(path, contents)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Sets up structured logging. Call once, early.
pub fn init_logging(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SECTA_LOG")
        .unwrap_or_else(|_| EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A shutdown signal shared by all services of one process.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half of [`Shutdown`].
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    /// A new signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Resolves once shutdown was requested.
    pub async fn wait(mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }
}

impl ShutdownTrigger {
    /// Asks every service to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Triggers on SIGINT or SIGTERM.
    pub async fn on_signals(self) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        self.trigger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_created_once_under_concurrency() {
        let dir = std::env::temp_dir().join(format!("secta-rt-secret-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("members.key");
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let p = path.clone();
                    s.spawn(move || create_secret_file(&p, format!("key {i}").as_bytes()).unwrap())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1, "exactly one creator");
        let kept = fs::read_to_string(&path).unwrap();
        assert!(kept.starts_with("key "));
        // Concurrent replacements never fail and leave one whole file, no temporaries.
        std::thread::scope(|s| {
            for i in 0..8 {
                let p = path.clone();
                s.spawn(move || write_secret_file(&p, format!("new {i}").as_bytes()).unwrap());
            }
        });
        assert!(fs::read_to_string(&path).unwrap().starts_with("new "));
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary files left behind"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn overlay_replaces_named_keys_only() {
        let mut base = ConfigFile::parse(
            "[hotspot]\nssid = \"Old\"\ninterface = \"wlan0\"\n[radio]\nenabled = true\n",
        )
        .unwrap();
        let over = ConfigFile::parse(
            "[hotspot]\nssid = \"New\"\n[homeserver]\nopen_registration = true\n",
        )
        .unwrap();
        base.overlay(&over);
        let h = base.table("hotspot");
        assert_eq!(h["ssid"].as_str(), Some("New"));
        assert_eq!(h["interface"].as_str(), Some("wlan0"));
        assert_eq!(base.table("radio")["enabled"].as_bool(), Some(true));
        assert_eq!(
            base.table("homeserver")["open_registration"].as_bool(),
            Some(true)
        );
        assert!(base.table("missing").is_empty());
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        port: u16,
    }

    #[test]
    fn missing_section_gives_defaults_and_unknown_keys_fail() {
        let c = ConfigFile::parse("[demo]\nport = 5\n").unwrap();
        assert_eq!(c.section::<Demo>("demo").unwrap(), Demo { port: 5 });
        assert_eq!(c.section::<Demo>("other").unwrap(), Demo::default());
        let bad = ConfigFile::parse("[demo]\nprot = 5\n").unwrap();
        assert!(bad.section::<Demo>("demo").is_err());
        assert!(ConfigFile::parse("[demo\n").is_err());
    }

    #[tokio::test]
    async fn shutdown_wakes_waiters() {
        let (trigger, shutdown) = Shutdown::new();
        let waiter = tokio::spawn(shutdown.clone().wait());
        assert!(!shutdown.is_requested());
        trigger.trigger();
        waiter.await.unwrap();
        assert!(shutdown.is_requested());
    }
}
