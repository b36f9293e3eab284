//! The `[radio]` section of the box config.

use std::path::PathBuf;

use serde::Deserialize;

/// The radio's settings. Every field has a safe default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RadioConfig {
    /// Run the radio at all.
    pub enabled: bool,
    /// Where sources and listeners connect (Icecast's usual port is 8000).
    pub listen: String,
    /// Base URL listeners reach the radio at (for announcements and status);
    /// default `http://<listen>`.
    pub public_url: Option<String>,
    /// Password of user `source` on every mount without its own; `None`: a random
    /// one generated once in `DATA/radio/source_password` (owner-only).
    pub source_password: Option<String>,
    /// Listeners on the whole server.
    pub max_listeners: usize,
    /// Live sources at once (each is a mount).
    pub max_sources: usize,
    /// Bytes of recent audio sent at once to a new listener so playback starts quickly.
    pub burst_size: usize,
    /// Bytes of audio kept per stream; a listener that falls this far behind is dropped.
    pub queue_size: usize,
    /// A source that sends nothing for this long is disconnected.
    pub source_timeout_secs: u64,
    /// A request head must arrive within this time.
    pub header_timeout_secs: u64,
    /// A write to a listener that takes longer than this drops the listener.
    pub send_timeout_secs: u64,
    /// Largest request head (431 beyond).
    pub max_header_bytes: usize,
    /// Audio bytes between ICY metadata blocks.
    pub metaint: usize,
    /// Open connections of any kind; more are closed at once.
    pub max_connections: usize,
    /// Mounts with their own settings; sources may also use any other mount name
    /// with the global password.
    pub mounts: Vec<MountConfig>,
}

impl Default for RadioConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:8000".into(),
            public_url: None,
            source_password: None,
            max_listeners: 1000,
            max_sources: 8,
            burst_size: 65536,
            queue_size: 524288,
            source_timeout_secs: 10,
            header_timeout_secs: 10,
            send_timeout_secs: 15,
            max_header_bytes: 8192,
            metaint: 16000,
            max_connections: 1100,
            mounts: Vec::new(),
        }
    }
}

/// One mount's settings (`[[radio.mounts]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MountConfig {
    /// Mount path, e.g. `/live`.
    pub name: String,
    /// Source password for this mount (default: the global one).
    pub password: Option<String>,
    /// Listeners on this mount (default: only the global limit).
    pub max_listeners: Option<usize>,
    /// Where listeners go when this mount has no source, e.g. `/autodj`.
    pub fallback: Option<String>,
    /// Move listeners back from the fallback when the source returns.
    pub fallback_override: bool,
    /// A folder of audio files the auto-DJ plays while no live source is connected.
    pub playlist: Option<PathBuf>,
    /// Codec the auto-DJ sends: `mp3` (files in other codecs are skipped).
    pub playlist_codec: Option<String>,
    /// Record live shows on this mount to `DATA/radio/recordings/`.
    pub record: bool,
    /// Shown name when the source sends no `ice-name`.
    pub stream_name: Option<String>,
    /// Matrix room alias (local part) the box announces this mount in.
    pub room: Option<String>,
}

impl RadioConfig {
    /// Problems that make the settings unusable, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!("listen {:?} is not HOST:PORT", self.listen));
        }
        if self.queue_size < self.burst_size {
            p.push("queue_size must be at least burst_size".into());
        }
        if self.metaint == 0 || self.metaint > 65536 {
            p.push("metaint must be 1..=65536".into());
        }
        if self.max_header_bytes < 512 {
            p.push("max_header_bytes must be at least 512".into());
        }
        for m in &self.mounts {
            if !valid_mount(&m.name) {
                p.push(format!(
                    "mount name {:?} must be / followed by letters, digits, . _ -",
                    m.name
                ));
            }
            if let Some(f) = &m.fallback {
                if !valid_mount(f) || f == &m.name {
                    p.push(format!("fallback {f:?} of {} is not another mount", m.name));
                }
            }
            if let Some(c) = &m.playlist_codec {
                if c != "mp3" {
                    p.push(format!(
                        "playlist_codec {c:?} of {}: only \"mp3\" is supported",
                        m.name
                    ));
                }
            }
        }
        p
    }

    /// The settings of `mount`, or defaults for an unlisted one.
    pub fn mount(&self, name: &str) -> MountConfig {
        self.mounts
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .unwrap_or_else(|| MountConfig {
                name: name.to_owned(),
                ..Default::default()
            })
    }

    /// The base URL listeners use.
    pub fn base_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let host = self.listen.replace("0.0.0.0", "127.0.0.1");
                format!("http://{host}")
            }
        }
    }
}

/// A mount name: `/` then 1–64 of `[A-Za-z0-9._-]`, not starting with `/admin`.
pub fn valid_mount(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest.len() <= 64
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && rest != "admin"
        && !rest.starts_with("status")
        && rest != "recordings.json"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_settings_are_named() {
        assert!(RadioConfig::default().problems().is_empty());
        let c = RadioConfig {
            listen: "nope".into(),
            burst_size: 10,
            queue_size: 5,
            mounts: vec![MountConfig {
                name: "/a".into(),
                fallback: Some("/a".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = c.problems().join("\n");
        assert!(p.contains("listen"), "{p}");
        assert!(p.contains("queue_size"), "{p}");
        assert!(p.contains("fallback"), "{p}");
    }

    #[test]
    fn mount_names() {
        assert!(valid_mount("/live"));
        assert!(valid_mount("/radio-1.mp3"));
        assert!(!valid_mount("live"));
        assert!(!valid_mount("/"));
        assert!(!valid_mount("/a/b"));
        assert!(!valid_mount("/admin"));
        assert!(!valid_mount("/status-json.xsl"));
        assert!(!valid_mount("/%2e%2e"));
    }
}
