//! What the gateway keeps in `DATA/wireguard/` (directory 0700, files 0600):
//! `members.key` and `links.key` (the interfaces' private keys), `exit.conf`
//! (the upstream exit as pasted), and `wireguard.db` (SQLite, WAL) with the
//! members' devices and the linked boxes.
//!
//! Opened with the box's data key ([`secta_vault::Vault`]), the database is
//! SQLCipher (its own key, `sqlcipher_key("wireguard")`) and the three files
//! are sealed with the vault's file cipher; what a box wrote in the clear
//! before is converted once, at the first open with the key. Opened without a
//! key (`[vault] encrypt = false`, or the engine used on its own), everything
//! is plain.
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
use secta_vault::{secret, FileCipher, Vault};
use zeroize::Zeroizing;

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
    const fn file(self) -> &'static str {
        match self {
            Role::Members => "members.key",
            Role::Links => "links.key",
        }
    }
}

/// The database's file name in `DATA/wireguard/`.
const DB: &str = "wireguard.db";
const EXIT: &str = "exit.conf";
/// The files sealed under the data key (besides the database).
const SECRET_FILES: [&str; 3] = [Role::Members.file(), Role::Links.file(), EXIT];

pub struct Store {
    dir: PathBuf,
    db: Connection,
    /// The file key when the box encrypts its data.
    files: Option<FileCipher>,
}

/// Whether `path` is an SQLite database in the clear.
fn is_plain_sqlite(path: &Path) -> anyhow::Result<bool> {
    secta_vault::sqlite_in_clear(path).with_context(|| format!("reading {}", path.display()))
}

/// Converts what a box wrote in the clear before encryption at rest, once:
/// the database through `sqlcipher_export` into a new file renamed over the
/// old one, and the key files and exit `.conf` re-written sealed. Done under
/// a lock so a CLI command and the running box never convert at once.
fn convert_plaintext(dir: &Path, key: &str, files: &FileCipher) -> anyhow::Result<()> {
    let path = dir.join(DB);
    let plain_db = is_plain_sqlite(&path)?;
    let plain_files: Vec<PathBuf> = SECRET_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| secret::is_plaintext(p))
        .collect();
    if !plain_db && plain_files.is_empty() {
        return Ok(());
    }
    let lock = owner_only_file(&dir.join(".convert.lock"))?;
    lock.lock()?;
    // Each checked again under the lock: another process may have done it.
    let mut done = Vec::new();
    for p in &plain_files {
        if secret::convert(files, p)? {
            done.push(p.as_path());
        }
    }
    if is_plain_sqlite(&path)? {
        encrypt_db(&path, key).with_context(|| {
            format!(
                "encrypting {} (written in the clear before encryption at rest)",
                path.display()
            )
        })?;
        done.push(&path);
    }
    secret::warn_converted(&done);
    Ok(())
}

/// Opens `path` for writing, creating it owner-only (0600) if missing.
fn owner_only_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

fn encrypt_db(path: &Path, key: &str) -> anyhow::Result<()> {
    {
        // Fold the log into the file and remove it: a plaintext WAL must not
        // be left beside (and applied to) the encrypted database.
        let plain = Connection::open(path)?;
        plain.busy_timeout(std::time::Duration::from_secs(5))?;
        plain.pragma_update(None, "journal_mode", "DELETE")?;
    }
    let tmp = path.with_extension("db.encrypting");
    let _ = std::fs::remove_file(&tmp);
    owner_only_file(&tmp)?;
    {
        let enc = Connection::open(&tmp)?;
        enc.execute_batch(&secta_vault::sqlcipher_keying(key))?;
        enc.execute(
            "ATTACH DATABASE ?1 AS plain KEY ''",
            [path.to_string_lossy()],
        )?;
        enc.query_row("SELECT sqlcipher_export('main', 'plain')", [], |_| Ok(()))?;
        enc.execute_batch("DETACH DATABASE plain")?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    /// Opens (creating) `DATA/wireguard/`, encrypted under `vault` when given
    /// (see the module doc).
    pub fn open(data_dir: &Path, vault: Option<&Vault>) -> anyhow::Result<Self> {
        let dir = data_dir.join("wireguard");
        secta_runtime::ensure_data_dir(&dir)?;
        let path = dir.join(DB);
        let key = vault.map(|v| v.sqlcipher_key("wireguard")).transpose()?;
        let files = vault.map(Vault::file_cipher).transpose()?;
        if let (Some(k), Some(f)) = (&key, &files) {
            convert_plaintext(&dir, k, f)?;
        }
        let db = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        if let Some(k) = &key {
            db.execute_batch(&secta_vault::sqlcipher_keying(k))?;
        }
        if let Err(e) = db.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())) {
            bail!(
                "cannot read {} ({e}): {}",
                path.display(),
                if key.is_some() {
                    "it is not encrypted under this box's data key, or it is damaged; it was left as it is"
                } else {
                    "it is encrypted (or not a database) and `[vault] encrypt = false`"
                }
            );
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
        Ok(Self { dir, db, files })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private key of an interface, made on first use (by exactly one of
    /// several concurrent callers; the others read the key it made).
    pub fn key(&self, role: Role) -> anyhow::Result<SecretKey> {
        let path = self.dir.join(role.file());
        let files = self.files.as_ref();
        if !path.exists() {
            let k = SecretKey::generate();
            let mut text = k.expose_base64();
            text.push('\n');
            if secret::create(files, &path, text.as_bytes())? {
                return Ok(k);
            }
        }
        let text =
            secret::read(files, &path)?.with_context(|| format!("{} vanished", path.display()))?;
        std::str::from_utf8(&text)
            .ok()
            .and_then(|t| SecretKey::parse(t.trim(), "key file").ok())
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
        self.dir.join(EXIT)
    }

    /// Whether an exit is set in `data_dir` (without reading it).
    pub fn exit_is_set(data_dir: &Path) -> bool {
        data_dir.join("wireguard").join(EXIT).exists()
    }

    /// Stores the upstream exit's `.conf` after checking it.
    pub fn set_exit(&self, text: &str) -> anyhow::Result<WgConf> {
        let conf = WgConf::parse(text).context("the exit's .conf is refused")?;
        check_exit(&conf)?;
        secret::write(self.files.as_ref(), &self.exit_path(), text.as_bytes())?;
        Ok(conf)
    }

    pub fn clear_exit(&self) -> anyhow::Result<bool> {
        match std::fs::remove_file(self.exit_path()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The exit's `.conf` as stored (None: no exit set).
    pub(crate) fn exit_text(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        let path = self.exit_path();
        let Some(bytes) = secret::read(self.files.as_ref(), &path)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("{} is not text", path.display()))?;
        Ok(Some(Zeroizing::new(text.to_owned())))
    }

    pub fn exit(&self) -> anyhow::Result<Option<WgConf>> {
        let Some(text) = self.exit_text()? else {
            return Ok(None);
        };
        Ok(Some(WgConf::parse(&text).with_context(|| {
            format!("{} is refused", self.exit_path().display())
        })?))
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
        let mut s = Store::open(dir.path(), None).unwrap();
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
        let s = Store::open(dir.path(), None).unwrap();
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

    fn vault(dir: &Path) -> std::sync::Arc<Vault> {
        Vault::open(&Default::default(), dir).unwrap().unwrap()
    }

    fn exit_conf(key: &SecretKey) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.2.0.2/32\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\nEndpoint = 1.2.3.4:51820\n",
            &*key.expose_base64(),
            SecretKey::generate().public()
        )
    }

    /// Every file under `dir` (recursively) with its bytes.
    fn raw_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(raw_files(&p));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    fn in_the_clear(dir: &Path, secret: &str) -> Option<PathBuf> {
        raw_files(dir)
            .into_iter()
            .find(|(_, b)| b.windows(secret.len()).any(|w| w == secret.as_bytes()))
            .map(|(p, _)| p)
    }

    #[test]
    fn a_plaintext_store_from_before_is_encrypted_once_keeping_everything() {
        let dir = tempfile::tempdir().unwrap();
        let net: Ipv4Net = "10.77.0.0/24".parse().unwrap();
        let exit_key = SecretKey::generate();
        // A box from before encryption at rest: everything in the clear.
        let (member, members_key, links_key) = {
            let mut s = Store::open(dir.path(), None).unwrap();
            let m = s.add_member("phone", net, None).unwrap();
            s.add_member("laptop", net, Some(7)).unwrap();
            s.add_link(&Link {
                name: "neighbour".into(),
                public_key: SecretKey::generate().public(),
                address: Ipv4Addr::new(10, 78, 0, 9),
                endpoint: Some("box.example:51821".parse().unwrap()),
                server_name: "neighbour.example".into(),
                federation_port: 8448,
                created_ms: 1,
            })
            .unwrap();
            s.set_exit(&exit_conf(&exit_key)).unwrap();
            (
                m,
                s.key(Role::Members).unwrap(),
                s.key(Role::Links).unwrap(),
            )
        };
        let wg = dir.path().join("wireguard");
        let secrets = [
            member.private_key.expose_base64(),
            member.preshared_key.expose_base64(),
            members_key.expose_base64(),
            links_key.expose_base64(),
            exit_key.expose_base64(),
        ];
        for k in &secrets {
            assert!(
                in_the_clear(&wg, k).is_some(),
                "the old box kept it in the clear"
            );
        }

        let v = vault(dir.path());
        let s = Store::open(dir.path(), Some(&v)).unwrap();
        let members = s.members().unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].name, "phone");
        assert_eq!(members[0].private_key, member.private_key);
        assert_eq!(members[0].preshared_key, member.preshared_key);
        assert_eq!(members[1].expires_ms, Some(7));
        assert_eq!(s.links().unwrap()[0].server_name, "neighbour.example");
        assert_eq!(s.key(Role::Members).unwrap(), members_key);
        assert_eq!(s.key(Role::Links).unwrap(), links_key);
        let exit = s.exit().unwrap().unwrap();
        assert_eq!(exit.interface.private_key, exit_key);
        drop(s);

        // Nothing is left in the clear, no plaintext log beside the database,
        // and everything stays owner-only.
        for k in &secrets {
            assert_eq!(in_the_clear(&wg, k), None);
        }
        assert_eq!(in_the_clear(&wg, "SQLite format 3"), None);
        assert_eq!(in_the_clear(&wg, "neighbour"), None);
        use std::os::unix::fs::PermissionsExt;
        for (p, _) in raw_files(&wg) {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }

        // Once: a second open changes nothing it does not write.
        let before: Vec<_> = raw_files(&wg)
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "key" || e == "conf"))
            .collect();
        let mut s = Store::open(dir.path(), Some(&v)).unwrap();
        assert_eq!(s.members().unwrap().len(), 2);
        let tablet = s.add_member("tablet", net, None).unwrap();
        drop(s);
        let after: Vec<_> = raw_files(&wg)
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "key" || e == "conf"))
            .collect();
        assert_eq!(before, after);
        assert_eq!(in_the_clear(&wg, &tablet.private_key.expose_base64()), None);

        // Without the key it is not read, and says why.
        let e = format!("{:#}", Store::open(dir.path(), None).err().unwrap());
        assert!(
            e.contains("wireguard.db") && e.contains("encrypt = false"),
            "{e}"
        );
    }

    #[test]
    fn a_plaintext_log_left_by_a_power_cut_is_folded_in_before_encrypting() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let net: Ipv4Net = "10.77.0.0/24".parse().unwrap();
        let mut s = Store::open(a.path(), None).unwrap();
        let m = s.add_member("phone", net, None).unwrap();
        // The card as a power cut leaves it: the member only in the log.
        let (wa, wb) = (a.path().join("wireguard"), b.path().join("wireguard"));
        std::fs::create_dir(&wb).unwrap();
        for e in std::fs::read_dir(&wa).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, wb.join(p.file_name().unwrap())).unwrap();
        }
        drop(s);
        assert!(
            std::fs::metadata(wb.join("wireguard.db-wal"))
                .unwrap()
                .len()
                > 0
        );
        let v = vault(b.path());
        let s = Store::open(b.path(), Some(&v)).unwrap();
        assert_eq!(s.member("phone").unwrap().private_key, m.private_key);
        drop(s);
        assert_eq!(in_the_clear(&wb, &m.private_key.expose_base64()), None);
    }

    #[test]
    fn a_store_under_another_key_is_refused_naming_the_file_and_left_as_it_is() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (va, vb) = (vault(a.path()), vault(b.path()));
        let net: Ipv4Net = "10.77.0.0/24".parse().unwrap();
        {
            let mut s = Store::open(a.path(), Some(&va)).unwrap();
            s.add_member("phone", net, None).unwrap();
            s.key(Role::Members).unwrap();
            s.set_exit(&exit_conf(&SecretKey::generate())).unwrap();
        }
        let wg = a.path().join("wireguard");
        let before = raw_files(&wg);
        let e = format!("{:#}", Store::open(a.path(), Some(&vb)).err().unwrap());
        assert!(
            e.contains(&wg.join("wireguard.db").display().to_string())
                && e.contains("not encrypted under this box's data key"),
            "{e}"
        );
        assert_eq!(raw_files(&wg), before, "nothing was changed");

        // Files sealed under another key: the same, file by file; the store
        // itself still works.
        let s = Store::open(b.path(), Some(&vb)).unwrap();
        for f in ["members.key", "exit.conf"] {
            std::fs::copy(wg.join(f), s.dir().join(f)).unwrap();
        }
        let e = format!("{:#}", s.key(Role::Members).unwrap_err());
        assert!(
            e.contains("members.key") && e.contains("cannot be decrypted"),
            "{e}"
        );
        let e = format!("{:#}", s.exit().unwrap_err());
        assert!(
            e.contains("exit.conf") && e.contains("cannot be decrypted"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(s.dir().join("members.key")).unwrap(),
            std::fs::read(wg.join("members.key")).unwrap(),
            "never replaced by a new key"
        );
        assert!(s.members().unwrap().is_empty());
    }

    #[test]
    fn exit_conf_is_checked_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), None).unwrap();
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
