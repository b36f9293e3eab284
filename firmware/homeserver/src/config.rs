//! The `[homeserver]` section of the box config.

use serde::Deserialize;

/// Settings of the homeserver. Every field has a safe default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeserverConfig {
    /// The Matrix server name (the part after `:` in user ids).
    pub server_name: String,
    /// Address the client API listens on.
    pub listen: String,
    /// Base URL that clients should use, published in `/.well-known/matrix/client`.
    /// Defaults to `http://{listen}`.
    pub public_base_url: Option<String>,
    /// Allow registration without an invite token (`m.login.dummy`).
    pub open_registration: bool,
    /// Refuse weak passwords at `/register` and password changes with
    /// `M_WEAK_PASSWORD` (at least 8 characters, not the username, not one
    /// character repeated, not one of the most common). The admin CLI and
    /// shared-secret registration are the admin's own choice and not checked.
    pub password_policy: bool,
    /// Shared secret for `/_synapse/admin/v1/register`. When unset, one is generated
    /// in `DATA/registration_shared_secret` on first start.
    pub registration_shared_secret: Option<String>,
    /// Room version for new rooms.
    pub default_room_version: String,
    /// Largest accepted request body in bytes (JSON endpoints).
    pub max_request_bytes: usize,
    /// New rooms with the `private_chat` or `trusted_private_chat` preset are
    /// end-to-end encrypted (as Element expects).
    pub encrypt_private_rooms: bool,
    /// Largest media upload in bytes.
    pub media_max_bytes: u64,
    /// Presence tracking. Off costs nothing: no writes, no wake-ups.
    pub presence: bool,
    /// `full` makes SQLite fsync on every commit (survives power loss, slower on SD
    /// cards); `normal` survives a crashed or killed process but not power loss.
    pub durability: Durability,
    /// Login and registration attempts per client address: burst size.
    pub auth_rate_burst: u32,
    /// Login and registration attempts per client address: refill per second.
    pub auth_rate_per_second: f64,
    /// Longest `/sync` long-poll in milliseconds.
    pub max_sync_timeout_ms: u64,
    /// Federation with other boxes and the public Matrix network.
    pub federation: FederationConfig,
    /// After a long-poll wakes up, wait up to this long for more news before
    /// answering, so busy rooms cost a bounded number of sync responses per
    /// second. The wait grows with the load on the write path: about 1 ms
    /// when idle, this long when sends queue up.
    pub sync_coalesce_ms: u64,
}

/// The `[homeserver.federation]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Take part in federation at all.
    pub enabled: bool,
    /// Address of the TLS federation listener (`None`: federation is served only on
    /// the client listener, e.g. behind a reverse proxy or over a WireGuard link).
    pub tls_listen: Option<String>,
    /// PEM certificate chain and key for the TLS listener (default: a self-signed
    /// certificate made on first start in `DATA/federation-tls.{crt,key}`).
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Servers this box may not talk to (exact server names).
    pub blocked_servers: Vec<String>,
    /// Known peers: boxes reachable without DNS, e.g. over WireGuard links.
    pub peers: Vec<Peer>,
    /// DNS servers (`IP` or `IP:PORT`) for server discovery (SRV, A/AAAA);
    /// empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<String>,
    /// Extra certificate authorities (PEM files) trusted for other servers'
    /// TLS certificates, besides the public web PKI (e.g. a community's own CA).
    pub ca_certificates: Vec<std::path::PathBuf>,
    /// What `/.well-known/matrix/server` answers (`host[:port]`): where other
    /// servers send federation requests for this server name. Default: the
    /// server name when it has a port, else its host with the port of
    /// `tls_listen` (443 without one: a reverse proxy in front).
    pub well_known_server: Option<String>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            blocked_servers: Vec::new(),
            peers: Vec::new(),
            dns_servers: Vec::new(),
            ca_certificates: Vec::new(),
            well_known_server: None,
        }
    }
}

/// A known federation peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its Matrix server name.
    pub server_name: String,
    /// Base URL of its federation API, e.g. `https://10.8.0.2:8448` or `http://10.8.0.2:8008`.
    pub url: String,
    /// Its ed25519 verify key (`ed25519:ID` → unpadded base64), trusted without fetching.
    #[serde(default)]
    pub pinned_key: Option<(String, String)>,
    /// Accept a self-signed TLS certificate from this peer (its identity is the
    /// pinned signing key and the signatures on everything it sends).
    #[serde(default)]
    pub accept_self_signed: bool,
}

/// SQLite durability mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=NORMAL` in WAL mode.
    Normal,
    /// `synchronous=FULL`.
    Full,
}

impl Default for HomeserverConfig {
    fn default() -> Self {
        Self {
            server_name: "secta.box".to_owned(),
            listen: "0.0.0.0:8008".to_owned(),
            public_base_url: None,
            open_registration: false,
            password_policy: true,
            registration_shared_secret: None,
            default_room_version: "12".to_owned(),
            max_request_bytes: 1024 * 1024,
            encrypt_private_rooms: true,
            media_max_bytes: 100 * 1024 * 1024,
            presence: false,
            durability: Durability::Normal,
            auth_rate_burst: 10,
            auth_rate_per_second: 0.5,
            max_sync_timeout_ms: 30_000,
            sync_coalesce_ms: 10,
            federation: FederationConfig::default(),
        }
    }
}

impl HomeserverConfig {
    /// The URL clients should use.
    pub fn base_url(&self) -> String {
        match &self.public_base_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let listen = self.listen.replace("0.0.0.0", "127.0.0.1");
                format!("http://{listen}")
            }
        }
    }
}
