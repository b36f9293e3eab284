//! What the gateway keeps in `DATA/wireguard/` (directory 0700, files 0600):
//! `members.key` and `links.key` (the interfaces' private keys), `exit.conf`
//! (the upstream exit as pasted), and `wireguard.db` (SQLite, WAL) with the
//! members' devices and the linked boxes.
//!
//! SQLite rather than a state file: the CLI and the running box change it at
//! the same time, address allocation must be atomic with the insert (a UNIQUE
//! constraint makes two concurrent `peers add` unable to get one address), and
//! it is the project's storage.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    alloc,
    conf::{Endpoint, WgConf},
    keys::{PublicKey, SecretKey},
};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A member's device.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub public_key: PublicKey,
    /// Kept so the `.conf` and QR can be shown again (the box is the other end
    /// of the tunnel, so holding it reveals nothing the box's own key does not).
    pub private_key: SecretKey,
    pub preshared_key: SecretKey,
    pub address: Ipv4Addr,
    pub enabled: bool,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

impl Member {
    /// Whether the device may connect now.
    pub fn active(&self, now_ms: i64) -> bool {
        self.enabled && self.expires_ms.is_none_or(|e| e > now_ms)
    }
}

/// Another box this one is linked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub public_key: PublicKey,
    pub address: Ipv4Addr,
    pub endpoint: Option<Endpoint>,
    /// Its Matrix server name (federation goes to `https://ADDRESS:federation_port`).
    pub server_name: String,
    pub federation_port: u16,
    pub created_ms: i64,
}

/// Which interface a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Members,
    Links,
}

impl Role {
    fn file(self) -> &'static str {
        match self {
            Role::Members => "members.key",
            Role::Links => "links.key",
        }
    }
}

pub struct Store {
    dir: PathBuf,
    db: Connection,
}

/// A member name: 1–32 letters (any script), digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let n = name.chars().count();
    if n == 0
        || n > 32
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!("bad name {name:?}: use 1-32 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// Checks that `name` is a valid and unused member name.
fn free_name(db: &Connection, name: &str) -> anyhow::Result<()> {
    check_name(name)?;
    let taken: bool = db.query_row(
        "SELECT EXISTS(SELECT 1 FROM members WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )?;
    if taken {
        bail!("a device named {name:?} already exists");
    }
    Ok(())
}

impl Store {
    /// Opens (creating) `DATA/wireguard/`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let dir = data_dir.join("wireguard");
        secta_runtime::ensure_data_dir(&dir)?;
        let path = dir.join("wireguard.db");
        let db = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS members (
                name TEXT PRIMARY KEY,
                public_key TEXT NOT NULL UNIQUE,
                private_key TEXT NOT NULL,
                preshared_key TEXT NOT NULL,
                address TEXT NOT NULL UNIQUE,
                enabled INTEGER NOT NULL DEFAULT 1,
                created_ms INTEGER NOT NULL,
                expires_ms INTEGER
             );
             CREATE TABLE IF NOT EXISTS links (
                name TEXT PRIMARY KEY,
                public_key TEXT NOT NULL UNIQUE,
                address TEXT NOT NULL UNIQUE,
                endpoint TEXT,
                server_name TEXT NOT NULL,
                federation_port INTEGER NOT NULL,
                created_ms INTEGER NOT NULL
             );",
        )?;
        Ok(Self { dir, db })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private key of an interface, made on first use (by exactly one of
    /// several concurrent callers; the others read the key it made).
    pub fn key(&self, role: Role) -> anyhow::Result<SecretKey> {
        let path = self.dir.join(role.file());
        if !path.exists() {
            let k = SecretKey::generate();
            let mut text = k.expose_base64().to_string();
            text.push('\n');
            if secta_runtime::create_secret_file(&path, text.as_bytes())? {
                return Ok(k);
            }
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        SecretKey::parse(text.trim(), "key file")
            .with_context(|| format!("{} is damaged", path.display()))
    }

    /// Adds a member's device with fresh keys and the lowest free address.
    pub fn add_member(
        &mut self,
        name: &str,
        subnet: Ipv4Net,
        expires_ms: Option<i64>,
    ) -> anyhow::Result<Member> {
        let tx = self.db.transaction()?;
        free_name(&tx, name)?;
        let used: HashSet<Ipv4Addr> = {
            let mut st = tx.prepare("SELECT address FROM members")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.filter_map(|r| r.ok()?.parse().ok()).collect()
        };
        let address = alloc::allocate(subnet, &used).map_err(anyhow::Error::msg)?;
        let private_key = SecretKey::generate();
        let m = Member {
            name: name.to_owned(),
            public_key: private_key.public(),
            private_key,
            preshared_key: SecretKey::generate_preshared(),
            address,
            enabled: true,
            created_ms: now_ms(),
            expires_ms,
        };
        tx.execute(
            "INSERT INTO members (name, public_key, private_key, preshared_key, address, enabled, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)",
            params![
                m.name,
                m.public_key.to_base64(),
                &*m.private_key.expose_base64(),
                &*m.preshared_key.expose_base64(),
                m.address.to_string(),
                m.created_ms,
                m.expires_ms
            ],
        )?;
        tx.commit()?;
        Ok(m)
    }

    pub fn members(&self) -> anyhow::Result<Vec<Member>> {
        let mut st = self.db.prepare(
            "SELECT name, public_key, private_key, preshared_key, address, enabled, created_ms, expires_ms
             FROM members ORDER BY address",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, public, private, psk, address, enabled, created_ms, expires_ms) = row?;
            out.push(Member {
                public_key: PublicKey::parse(&public)?,
                private_key: SecretKey::parse(&private, "stored private key")?,
                preshared_key: SecretKey::parse(&psk, "stored preshared key")?,
                address: address.parse().context("stored address")?,
                name,
                enabled,
                created_ms,
                expires_ms,
            });
        }
        // Numeric order (the text order puts .10 before .2).
        out.sort_by_key(|m| m.address);
        Ok(out)
    }

    pub fn member(&self, name: &str) -> anyhow::Result<Member> {
        self.members()?
            .into_iter()
            .find(|m| m.name == name)
            .with_context(|| format!("no device named {name:?} (see `vpn peers list`)"))
    }

    fn change(&self, sql: &str, p: impl rusqlite::Params, name: &str) -> anyhow::Result<()> {
        if self.db.execute(sql, p)? == 0 {
            bail!("no device named {name:?} (see `vpn peers list`)");
        }
        Ok(())
    }

    pub fn set_enabled(&self, name: &str, enabled: bool) -> anyhow::Result<()> {
        self.change(
            "UPDATE members SET enabled = ?2 WHERE name = ?1",
            params![name, enabled],
            name,
        )
    }

    pub fn set_expiry(&self, name: &str, expires_ms: Option<i64>) -> anyhow::Result<()> {
        self.change(
            "UPDATE members SET expires_ms = ?2 WHERE name = ?1",
            params![name, expires_ms],
            name,
        )
    }

    pub fn rename(&self, name: &str, new: &str) -> anyhow::Result<()> {
        free_name(&self.db, new)?;
        self.change(
            "UPDATE members SET name = ?2 WHERE name = ?1",
            params![name, new],
            name,
        )
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<Member> {
        let m = self.member(name)?;
        self.change("DELETE FROM members WHERE name = ?1", [name], name)?;
        Ok(m)
    }

    pub fn add_link(&self, l: &Link) -> anyhow::Result<()> {
        check_name(&l.name)?;
        let clash: Option<String> = self
            .db
            .query_row(
                "SELECT name FROM links WHERE name = ?1 OR public_key = ?2 OR address = ?3",
                params![l.name, l.public_key.to_base64(), l.address.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(other) = clash {
            bail!("already linked: {other:?} has that name, key or address (remove it first)");
        }
        self.db.execute(
            "INSERT INTO links (name, public_key, address, endpoint, server_name, federation_port, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                l.name,
                l.public_key.to_base64(),
                l.address.to_string(),
                l.endpoint.as_ref().map(Endpoint::to_string),
                l.server_name,
                l.federation_port,
                l.created_ms
            ],
        )?;
        Ok(())
    }

    pub fn links(&self) -> anyhow::Result<Vec<Link>> {
        let mut st = self.db.prepare(
            "SELECT name, public_key, address, endpoint, server_name, federation_port, created_ms FROM links ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, u16>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, key, address, endpoint, server_name, federation_port, created_ms) = row?;
            out.push(Link {
                name,
                public_key: PublicKey::parse(&key)?,
                address: address.parse().context("stored link address")?,
                endpoint: endpoint
                    .map(|e| e.parse().map_err(anyhow::Error::msg))
                    .transpose()?,
                server_name,
                federation_port,
                created_ms,
            });
        }
        Ok(out)
    }

    pub fn remove_link(&self, name: &str) -> anyhow::Result<Link> {
        let l = self
            .links()?
            .into_iter()
            .find(|l| l.name == name)
            .with_context(|| format!("no link named {name:?} (see `vpn link list`)"))?;
        self.db
            .execute("DELETE FROM links WHERE name = ?1", [name])?;
        Ok(l)
    }

    fn exit_path(&self) -> PathBuf {
        self.dir.join("exit.conf")
    }

    /// Stores the upstream exit's `.conf` after checking it.
    pub fn set_exit(&self, text: &str) -> anyhow::Result<WgConf> {
        let conf = WgConf::parse(text).context("the exit's .conf is refused")?;
        check_exit(&conf)?;
        secta_runtime::write_secret_file(&self.exit_path(), text.as_bytes())?;
        Ok(conf)
    }

    pub fn clear_exit(&self) -> anyhow::Result<bool> {
        match std::fs::remove_file(self.exit_path()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn exit(&self) -> anyhow::Result<Option<WgConf>> {
        let path = self.exit_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                Ok(Some(WgConf::parse(&text).with_context(|| {
                    format!("{} is refused", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Why `text` cannot be the upstream exit's `.conf` (None: it can), in words
/// that never quote a key (the pre-seed's checks show this to people and logs).
pub fn exit_conf_problem(text: &str) -> Option<String> {
    match WgConf::parse(text) {
        Err(e) => {
            let key_line = e.line > 0
                && text.lines().nth(e.line - 1).is_some_and(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("privatekey") || l.contains("presharedkey")
                });
            Some(if key_line {
                format!("line {}: the key is not valid", e.line)
            } else {
                e.to_string()
            })
        }
        Ok(c) => check_exit(&c).err().map(|e| format!("{e:#}")),
    }
}

/// An exit `.conf` must have one peer with an endpoint, routing IPv4 everywhere,
/// and an IPv4 address for this end.
pub fn check_exit(c: &WgConf) -> anyhow::Result<()> {
    if c.peers.len() != 1 {
        bail!(
            "an exit .conf needs exactly one [Peer] (the exit server), this one has {}",
            c.peers.len()
        );
    }
    let p = &c.peers[0];
    if p.endpoint.is_none() {
        bail!("the exit's [Peer] has no Endpoint");
    }
    if !p
        .allowed_ips
        .iter()
        .any(|n| n.prefix_len() == 0 && n.addr().is_ipv4())
    {
        bail!("the exit's [Peer] must have AllowedIPs 0.0.0.0/0 (it carries all routed traffic)");
    }
    if !c.interface.addresses.iter().any(|a| a.addr().is_ipv4()) {
        bail!("the exit's [Interface] has no IPv4 Address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_conf_problems_never_quote_a_key() {
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let good = format!("[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.2/32\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n");
        assert_eq!(exit_conf_problem(&good), None);
        let garbled = good.replace("PrivateKey = ", "PrivateKey ");
        let p = exit_conf_problem(&garbled).unwrap();
        assert!(p.starts_with("line 2") && !p.contains(key), "{p}");
        let no_route = good.replace("0.0.0.0/0", "10.0.0.0/8");
        assert!(exit_conf_problem(&no_route).unwrap().contains("AllowedIPs"));
    }

    #[test]
    fn members_are_added_listed_changed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let net: Ipv4Net = "10.77.0.0/24".parse().unwrap();
        let a = s.add_member("телефон-Маши", net, None).unwrap();
        let b = s.add_member("laptop", net, Some(now_ms() - 1)).unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(b.address, Ipv4Addr::new(10, 77, 0, 3));
        assert!(s
            .add_member("laptop", net, None)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert!(s.add_member("bad name", net, None).is_err());
        let list = s.members().unwrap();
        assert!(list[0].active(now_ms()) && !list[1].active(now_ms()));
        s.set_enabled("телефон-Маши", false).unwrap();
        assert!(!s.member("телефон-Маши").unwrap().enabled);
        s.rename("laptop", "ноутбук").unwrap();
        assert!(s.rename("nobody", "x").is_err());
        // A freed address is reused.
        s.remove("телефон-Маши").unwrap();
        let c = s.add_member("tablet", net, None).unwrap();
        assert_eq!(c.address, Ipv4Addr::new(10, 77, 0, 2));
        // Keys survive a reopen, and the files are owner-only.
        let k = s.key(Role::Members).unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.key(Role::Members).unwrap().public(), k.public());
        assert_ne!(s.key(Role::Links).unwrap().public(), k.public());
        assert_eq!(s.member("tablet").unwrap().private_key, c.private_key);
        use std::os::unix::fs::PermissionsExt;
        for f in ["members.key", "wireguard.db"] {
            let mode = std::fs::metadata(dir.path().join("wireguard").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
        }
    }

    #[test]
    fn exit_conf_is_checked_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let k = SecretKey::generate();
        let p = SecretKey::generate().public();
        let split = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.2.0.2/32\n[Peer]\nPublicKey = {p}\nAllowedIPs = 10.2.0.0/24\nEndpoint = 1.2.3.4:51820\n",
            &*k.expose_base64()
        );
        assert!(s
            .set_exit(&split)
            .unwrap_err()
            .to_string()
            .contains("0.0.0.0/0"));
        assert!(s.set_exit("[Interface]\n").is_err());
        assert!(s.exit().unwrap().is_none());
        let good = split.replace("10.2.0.0/24", "0.0.0.0/0, ::/0");
        s.set_exit(&good).unwrap();
        assert_eq!(s.exit().unwrap().unwrap().peers.len(), 1);
        assert!(s.clear_exit().unwrap());
        assert!(!s.clear_exit().unwrap());
    }
}
