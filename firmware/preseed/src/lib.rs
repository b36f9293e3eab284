//! The pre-seed file: a box's first-boot settings.
//!
//! `secta-flash` writes it as [`FILE_NAME`] into the FAT boot partition of a freshly
//! written card; the box reads it once on first boot (`secta firstboot`), applies it,
//! and then removes it (it holds the Wi-Fi passphrase, the one-time admin password,
//! an invite token and possibly a VPN private key). Both sides validate with
//! [`Preseed::problems`], so a hand-edited file is checked as strictly as one the
//! flash tool wrote. The format is TOML.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Name of the pre-seed file in the root of the boot partition.
pub const FILE_NAME: &str = "secta-preseed.toml";
/// Name of the file the box leaves on the boot partition after first boot
/// (what was applied or what was wrong; no secrets).
pub const RESULT_FILE_NAME: &str = "secta-firstboot.txt";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Longest pre-seed file accepted (a VPN `.conf` is the only large part).
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// First-boot settings of one box.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preseed {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Human name of the box, shown on its pages.
    pub box_name: String,
    /// Matrix server name (the part after `:` in user ids); cannot change later.
    pub server_name: String,
    /// ISO 3166-1 alpha-2 country code (Wi-Fi regulatory domain).
    pub country: String,
    /// IANA time zone such as `Europe/Moscow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub wifi: Wifi,
    pub admin: Admin,
    /// An invite token the box creates so members can register at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite: Option<Invite>,
    /// A WireGuard `.conf` for the upstream exit of hotspot traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpn_exit_conf: Option<String>,
    /// Known federation peers: `SERVER_NAME` or `SERVER_NAME=URL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

/// The box's hotspot.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wifi {
    pub ssid: String,
    /// WPA passphrase; absent for an open network (the captive portal still greets people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<String>,
}

/// The first admin account.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Matrix localpart (`admin` → `@admin:server_name`).
    pub username: String,
    /// One-time password: it exists only on this card until first boot, which
    /// removes it; change it after the first login.
    pub password: String,
}

/// An invite (registration) token created at first boot.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    pub token: String,
    /// Registrations it allows (0 = unlimited).
    pub uses: u32,
}

// Secrets never reach logs: Debug shows their length only.
struct Redacted(usize);
impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} bytes>", self.0)
    }
}

impl fmt::Debug for Preseed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preseed")
            .field("box_name", &self.box_name)
            .field("server_name", &self.server_name)
            .field("country", &self.country)
            .field("timezone", &self.timezone)
            .field("wifi", &self.wifi)
            .field("admin", &self.admin)
            .field("invite", &self.invite)
            .field(
                "vpn_exit_conf",
                &self.vpn_exit_conf.as_ref().map(|c| Redacted(c.len())),
            )
            .field("peers", &self.peers)
            .finish()
    }
}

impl fmt::Debug for Wifi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wifi")
            .field("ssid", &self.ssid)
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|p| Redacted(p.len())),
            )
            .finish()
    }
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("username", &self.username)
            .field("password", &Redacted(self.password.len()))
            .finish()
    }
}

impl fmt::Debug for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invite")
            .field("token", &Redacted(self.token.len()))
            .field("uses", &self.uses)
            .finish()
    }
}

/// A known federation peer from the pre-seed.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    pub server_name: String,
    /// Base URL of its federation API; `None`: discovered from the server name.
    pub url: Option<String>,
}

/// Why a pre-seed file could not be read.
#[derive(Debug)]
pub enum ParseError {
    TooLarge(usize),
    NotUtf8,
    Toml(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLarge(n) => write!(
                f,
                "pre-seed file is {n} bytes, more than the {MAX_FILE_BYTES} allowed"
            ),
            ParseError::NotUtf8 => write!(f, "pre-seed file is not UTF-8 text"),
            ParseError::Toml(e) => write!(f, "pre-seed file is not valid: {e}"),
        }
    }
}

impl std::error::Error for ParseError {}

impl Preseed {
    /// Reads a pre-seed file's bytes (structure only; see [`Preseed::problems`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ParseError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)?;
        // toml's messages quote the offending line, which may hold a secret:
        // keep only the first line of the message (it names the position).
        toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ParseError::Toml(format!("{msg}{at}"))
        })
    }

    /// The file's text, with a header saying what it is.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("pre-seed always serializes");
        format!(
            "# Secta box first-boot settings, written by secta-flash.\n\
             # The box applies them once on first boot and then deletes this file\n\
             # (it holds secrets). See README: \"Image and flashing\".\n{body}"
        )
    }

    /// The peers as server name and optional URL (only meaningful without problems).
    pub fn peer_specs(&self) -> Vec<PeerSpec> {
        self.peers
            .iter()
            .map(|p| match p.split_once('=') {
                Some((name, url)) => PeerSpec {
                    server_name: name.trim().to_owned(),
                    url: Some(url.trim().trim_end_matches('/').to_owned()),
                },
                None => PeerSpec {
                    server_name: p.trim().to_owned(),
                    url: None,
                },
            })
            .collect()
    }

    /// Every problem with the settings, in words a person can act on. Nothing is
    /// applied (or written to a card) unless this is empty.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.version != VERSION {
            p.push(format!(
                "version {} is not supported (this box reads version {VERSION})",
                self.version
            ));
        }
        let name = self.box_name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            p.push("box name must be 1 to 64 characters without control characters".into());
        }
        if let Some(e) = server_name_problem(&self.server_name) {
            p.push(e);
        }
        if let Some(e) = country_problem(&self.country) {
            p.push(e);
        }
        if let Some(tz) = &self.timezone {
            if let Some(e) = timezone_syntax_problem(tz) {
                p.push(e);
            }
        }
        p.extend(ssid_problem(&self.wifi.ssid));
        if let Some(pw) = &self.wifi.passphrase {
            p.extend(passphrase_problem(pw));
        }
        p.extend(username_problem(&self.admin.username));
        let n = self.admin.password.chars().count();
        if !(10..=256).contains(&n) || self.admin.password.chars().any(char::is_control) {
            p.push("admin password must be 10 to 256 characters without control characters".into());
        }
        if let Some(inv) = &self.invite {
            let t = &inv.token;
            if t.len() < 8
                || t.len() > 64
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
            {
                p.push("invite token must be 8 to 64 characters of A-Z a-z 0-9 . _ ~ -".into());
            }
        }
        // Its contents are checked by the WireGuard gateway's own parser (see
        // secta_wireguard::store::exit_conf_problem) in secta-flash and at first boot.
        if let Some(conf) = &self.vpn_exit_conf {
            if conf.trim().is_empty() || conf.len() > 16 * 1024 {
                p.push("VPN exit .conf must be 1 byte to 16 KiB".into());
            }
        }
        if self.peers.len() > 100 {
            p.push("at most 100 federation peers".into());
        }
        for spec in self.peer_specs() {
            if let Some(e) = server_name_problem(&spec.server_name) {
                p.push(format!("federation peer: {e}"));
            }
            if let Some(u) = &spec.url {
                match url::Url::parse(u) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                    }
                    _ => p.push(format!(
                        "federation peer {}: URL must be http:// or https:// with a host, got {u:?}",
                        spec.server_name
                    )),
                }
            }
        }
        p
    }
}

/// A Matrix server name: hostname (DNS name, IPv4, `[IPv6]`) and optional port.
pub fn server_name_problem(s: &str) -> Option<String> {
    if ruma_identifiers_validation::server_name::validate(s).is_err() {
        return Some(format!(
            "server name {s:?} is not valid (a host name such as box.example.org, an IP address, optionally :port)"
        ));
    }
    None
}

/// An ISO 3166-1 alpha-2 code (upper case).
pub fn country_problem(s: &str) -> Option<String> {
    let known = s.len() == 2
        && s.bytes().all(|b| b.is_ascii_uppercase())
        && isocountry::CountryCode::for_alpha2(s).is_ok();
    (!known)
        .then(|| format!("country {s:?} is not an ISO 3166-1 two-letter code such as RU, DE, KZ"))
}

/// An IANA zone name's shape (`Area/Location`, or `UTC`); whether it exists is
/// checked where a zone database is at hand.
pub fn timezone_syntax_problem(tz: &str) -> Option<String> {
    let ok = !tz.is_empty()
        && tz.len() <= 64
        && !tz.starts_with('/')
        && !tz
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
    (!ok).then(|| format!("time zone {tz:?} is not a zone name such as Europe/Moscow"))
}

/// 1 to 32 bytes (802.11), no control characters.
pub fn ssid_problem(ssid: &str) -> Option<String> {
    if ssid.is_empty() || ssid.len() > 32 {
        return Some(format!(
            "Wi-Fi name (SSID) must be 1 to 32 bytes, {:?} is {}",
            ssid,
            ssid.len()
        ));
    }
    ssid.chars()
        .any(char::is_control)
        .then(|| "Wi-Fi name (SSID) must not contain control characters".into())
}

/// WPA2/WPA3 passphrase: 8 to 63 printable ASCII characters.
pub fn passphrase_problem(pw: &str) -> Option<String> {
    (pw.len() < 8 || pw.len() > 63 || !pw.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .then(|| "Wi-Fi password must be 8 to 63 printable ASCII characters".into())
}

/// A Matrix localpart as the spec wants for new users.
pub fn username_problem(u: &str) -> Option<String> {
    let ok = !u.is_empty()
        && u.len() <= 64
        && ruma_identifiers_validation::localpart_is_backwards_compatible(u).is_ok()
        && u.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-/+".contains(&b));
    (!ok).then(|| {
        format!("admin username {u:?} must be 1 to 64 of a-z 0-9 . _ = - / + (lower case)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Preseed {
        Preseed {
            version: VERSION,
            box_name: "Коммуна".into(),
            server_name: "box.example.org".into(),
            country: "RU".into(),
            timezone: Some("Europe/Moscow".into()),
            wifi: Wifi {
                ssid: "Secta".into(),
                passphrase: Some("correct horse battery".into()),
            },
            admin: Admin {
                username: "admin".into(),
                password: "one-time-secret-1".into(),
            },
            invite: Some(Invite {
                token: "welcome-token-1".into(),
                uses: 20,
            }),
            vpn_exit_conf: None,
            peers: vec![
                "other.box".into(),
                "10.8.0.2:8448=https://10.8.0.2:8448".into(),
            ],
        }
    }

    const WG: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 10.9.0.2/32\n\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n";

    #[test]
    fn round_trip_and_valid() {
        let mut s = sample();
        s.vpn_exit_conf = Some(WG.into());
        assert_eq!(s.problems(), Vec::<String>::new());
        let back = Preseed::parse(s.to_toml().as_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            back.peer_specs()[1].url.as_deref(),
            Some("https://10.8.0.2:8448")
        );
        assert_eq!(back.peer_specs()[0].url, None);
    }

    #[test]
    fn debug_hides_secrets() {
        let mut s = sample();
        s.vpn_exit_conf = Some(WG.into());
        let d = format!("{s:?}");
        for secret in [
            "correct horse",
            "one-time-secret",
            "welcome-token",
            "yAnz5TF",
        ] {
            assert!(!d.contains(secret), "{secret} in {d}");
        }
    }

    #[test]
    fn parse_errors_do_not_echo_secrets() {
        let text =
            "version = 1\n[admin]\npassword = \"hunter2hunter2\"\nbogus = \"topsecretvalue\"\n";
        let e = Preseed::parse(text.as_bytes()).unwrap_err().to_string();
        assert!(!e.contains("topsecretvalue"), "{e}");
        assert!(Preseed::parse(&[0xff, 0xfe]).is_err());
        assert!(Preseed::parse(&vec![b' '; MAX_FILE_BYTES + 1]).is_err());
    }

    #[test]
    fn every_bad_value_is_named() {
        type Change = Box<dyn Fn(&mut Preseed)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.wifi.ssid = String::new()), "SSID"),
            (Box::new(|s| s.wifi.ssid = "x".repeat(33)), "SSID"),
            (
                Box::new(|s| s.wifi.ssid = "Сеть-с-длинным-именем".into()),
                "SSID",
            ), // 39 bytes
            (
                Box::new(|s| s.wifi.passphrase = Some("short".into())),
                "Wi-Fi password",
            ),
            (
                Box::new(|s| s.wifi.passphrase = Some("пароль-по-русски".into())),
                "Wi-Fi password",
            ),
            (
                Box::new(|s| s.server_name = "bad name".into()),
                "server name",
            ),
            (
                Box::new(|s| s.server_name = "box.example:99999999".into()),
                "server name",
            ),
            (Box::new(|s| s.country = "XX".into()), "country"),
            (Box::new(|s| s.country = "ru".into()), "country"),
            (
                Box::new(|s| s.timezone = Some("../../etc/passwd".into())),
                "time zone",
            ),
            (Box::new(|s| s.admin.username = "Admin".into()), "username"),
            (
                Box::new(|s| s.admin.password = "short".into()),
                "admin password",
            ),
            (
                Box::new(|s| s.invite.as_mut().unwrap().token = "a b".into()),
                "invite token",
            ),
            (Box::new(|s| s.vpn_exit_conf = Some(" \n".into())), "VPN"),
            (
                Box::new(|s| s.peers = vec!["ok.example=ftp://x".into()]),
                "federation peer",
            ),
            (
                Box::new(|s| s.peers = vec!["no spaces".into()]),
                "federation peer",
            ),
            (Box::new(|s| s.version = 2), "version"),
            (Box::new(|s| s.box_name = " ".into()), "box name"),
        ];
        for (change, word) in cases {
            let mut s = sample();
            change(&mut s);
            let p = s.problems();
            assert!(
                p.iter().any(|m| m.contains(word)),
                "{word}: {p:?} for {s:?}"
            );
        }
    }
}
