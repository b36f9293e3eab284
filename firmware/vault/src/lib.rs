//! Data at rest for the Secta box.
//!
//! One random 256-bit **data key** protects everything the box stores about
//! people. It lives only in a small **key file**, wrapped (XChaCha20-Poly1305)
//! by a key-encryption key that comes from one of:
//!
//! * `none` — a fixed label: the key file alone unlocks the data. This
//!   protects nothing while the key file exists; its value is that destroying
//!   one 97-byte file makes every other byte under the data directory
//!   unreadable (crypto-erase), which is fast and does not depend on every
//!   data block being overwritten.
//! * `secret_file` — the contents of a file kept elsewhere (a USB key): the SD
//!   card alone is useless without it, even before a wipe.
//! * `passphrase` — Argon2id of a passphrase given at start (environment
//!   variable `SECTA_PASSPHRASE`): the SD card alone is useless without it.
//!
//! From the data key, HKDF-SHA256 derives separate keys: one raw SQLCipher key
//! per database and one key for files (XChaCha20-Poly1305 in the STREAM
//! construction, [`file`]). [`wipe`] destroys the key file first, then deletes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use zeroize::{Zeroize, Zeroizing};

pub mod file;
mod keyfile;
pub mod secret;
pub mod wipe;

pub use file::{Decryptor, Encryptor, FileCipher};
pub use keyfile::KekKind;

/// Name of the file (in the data directory) that records that the data there
/// is encrypted, and under which key id. Not secret.
pub const ENCRYPTED_MARKER: &str = "ENCRYPTED";

/// SQLCipher settings every connection to a box database runs right after its
/// key (they are not stored in the file, so every opener must agree). Page
/// HMACs use SHA-256 rather than SQLCipher's default SHA-512: readers decrypt
/// and check pages after every commit (WAL readers start with an empty page
/// cache whenever the log changed), and SHA-256 has CPU instructions on most
/// x86-64 (SHA-NI) and ARMv8 chips with crypto extensions (the Pi 5), where
/// SHA-512 mostly has none.
pub const SQLCIPHER_SETTINGS: &str = "PRAGMA cipher_hmac_algorithm = HMAC_SHA256;";

/// The statements that key a connection to a box database, to run before any
/// other: `PRAGMA key` with a raw key from [`Vault::sqlcipher_key`], then
/// [`SQLCIPHER_SETTINGS`].
pub fn sqlcipher_keying(key: &str) -> Zeroizing<String> {
    Zeroizing::new(format!("PRAGMA key = \"{key}\"; {SQLCIPHER_SETTINGS}"))
}

/// `[vault]`: data at rest and the panic wipe.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaultConfig {
    /// Encrypt the box's data (on by default). Turning it off is refused while
    /// encrypted data exists.
    pub encrypt: bool,
    /// The key file; default `DATA/data.key`. Put it on a medium that can
    /// really be erased (see ARCHITECTURE.md).
    pub key_file: Option<PathBuf>,
    /// Wrap the data key with the contents of this file (e.g. on a USB key).
    pub secret_file: Option<PathBuf>,
    /// Wrap the data key with a passphrase from `SECTA_PASSPHRASE`.
    pub passphrase: bool,
    /// Dead man's switch: wipe when this path (a USB key's mount point or a
    /// file on it) disappears for `deadman_grace_ms`. Armed once seen.
    pub deadman_path: Option<PathBuf>,
    pub deadman_grace_ms: u64,
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            encrypt: true,
            key_file: None,
            secret_file: None,
            passphrase: false,
            deadman_path: None,
            deadman_grace_ms: 2000,
        }
    }
}

impl VaultConfig {
    pub fn key_file(&self, data_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("data.key"))
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.passphrase && self.secret_file.is_some() {
            p.push("choose one of passphrase and secret_file".into());
        }
        if !self.encrypt && (self.passphrase || self.secret_file.is_some()) {
            p.push("passphrase/secret_file need encrypt = true".into());
        }
        p
    }

    fn kek(&self) -> Result<keyfile::Kek, VaultError> {
        if let Some(f) = &self.secret_file {
            let bytes = Zeroizing::new(std::fs::read(f).map_err(|e| VaultError::Secret {
                path: f.clone(),
                why: e.to_string(),
            })?);
            if bytes.len() < 16 {
                return Err(VaultError::Secret {
                    path: f.clone(),
                    why: "shorter than 16 bytes".into(),
                });
            }
            return Ok(keyfile::Kek::Secret(bytes));
        }
        if self.passphrase {
            let p = std::env::var("SECTA_PASSPHRASE").map_err(|_| VaultError::NoPassphrase)?;
            return Ok(keyfile::Kek::Passphrase(Zeroizing::new(p)));
        }
        Ok(keyfile::Kek::None)
    }
}

/// Why the vault could not be opened. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{data} holds encrypted data (key id {key_id}) but the key file {key_file} is missing; refusing to start the services that need it and refusing to make a new key over existing data. Restore the key file, or wipe the box (`secta admin --data {data} wipe --yes`).")]
    KeyMissing {
        data: PathBuf,
        key_file: PathBuf,
        key_id: String,
    },
    #[error("the key file {key_file} cannot be opened: {why}. Refusing to start the services that need it; nothing was changed.")]
    KeyUnreadable { key_file: PathBuf, why: String },
    #[error("the key file {key_file} is for key id {found}, but the data in {data} was written under key id {want}; refusing to start.")]
    WrongKey {
        data: PathBuf,
        key_file: PathBuf,
        want: String,
        found: String,
    },
    #[error("{data} already holds data written without encryption ({example}); encrypting an existing box in place is not supported. Set `[vault] encrypt = false` to keep using it, or move the data away.")]
    PlaintextData { data: PathBuf, example: PathBuf },
    #[error("{data} holds encrypted data but `[vault] encrypt = false`; refusing to start.")]
    EncryptionOff { data: PathBuf },
    #[error("the key-encryption secret {path} cannot be read: {why}")]
    Secret { path: PathBuf, why: String },
    #[error("`[vault] passphrase = true` but SECTA_PASSPHRASE is not set")]
    NoPassphrase,
    #[error("the data key was destroyed (the box was wiped)")]
    Wiped,
    #[error("{0}")]
    Io(String),
}

/// The open data key. Zeroized on drop and on [`Vault::forget`].
pub struct Vault {
    key: RwLock<Option<Zeroizing<[u8; 32]>>>,
    key_id: String,
    key_file: PathBuf,
    kek: KekKind,
}

/// Files under the data dir that mean "a box already lives here".
const DATA_FILES: &[&str] = &["homeserver.db", "signing.key", "media"];

impl Vault {
    /// Opens the data key for `data_dir`, creating it on first start (empty data
    /// directory). `Ok(None)` when encryption is off and no encrypted data exists.
    pub fn open(cfg: &VaultConfig, data_dir: &Path) -> Result<Option<Arc<Vault>>, VaultError> {
        let key_file = cfg.key_file(data_dir);
        let marker = data_dir.join(ENCRYPTED_MARKER);
        let recorded = std::fs::read_to_string(&marker)
            .ok()
            .map(|t| parse_marker(&t));
        if !cfg.encrypt {
            if recorded.is_some() {
                return Err(VaultError::EncryptionOff {
                    data: data_dir.to_owned(),
                });
            }
            return Ok(None);
        }
        let io = |e: std::io::Error| VaultError::Io(e.to_string());
        if !key_file.exists() {
            if let Some(key_id) = recorded {
                return Err(VaultError::KeyMissing {
                    data: data_dir.to_owned(),
                    key_file,
                    key_id,
                });
            }
            if let Some(example) = DATA_FILES
                .iter()
                .map(|f| data_dir.join(f))
                .find(|p| p.exists())
            {
                return Err(VaultError::PlaintextData {
                    data: data_dir.to_owned(),
                    example,
                });
            }
            // First start: a new key, then the marker (so a crash between the
            // two leaves a key file and no data, which the next start accepts).
            let mut key = Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut());
            let kek = cfg.kek()?;
            if let Some(dir) = key_file.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            keyfile::write(&key_file, &key, &kek).map_err(io)?;
            let v = Vault::new(key, key_file, kek.kind());
            write_marker(&marker, &v.key_id).map_err(io)?;
            tracing::info!(key_id = %v.key_id, kek = ?v.kek, "created the data key");
            return Ok(Some(Arc::new(v)));
        }
        let kek = cfg.kek()?;
        let key = keyfile::read(&key_file, &kek).map_err(|why| VaultError::KeyUnreadable {
            key_file: key_file.clone(),
            why,
        })?;
        let v = Vault::new(key, key_file.clone(), kek.kind());
        match recorded {
            Some(want) if want != v.key_id => {
                return Err(VaultError::WrongKey {
                    data: data_dir.to_owned(),
                    key_file,
                    want,
                    found: v.key_id.clone(),
                })
            }
            Some(_) => {}
            None => write_marker(&marker, &v.key_id).map_err(io)?,
        }
        Ok(Some(Arc::new(v)))
    }

    fn new(key: Zeroizing<[u8; 32]>, key_file: PathBuf, kek: KekKind) -> Self {
        let id = derive(&key, b"secta key id v1");
        Self {
            key_id: hex::encode(&id[..8]),
            key: RwLock::new(Some(key)),
            key_file,
            kek,
        }
    }

    /// A short public fingerprint of the key (not secret; names the key in
    /// messages and the audit).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    pub fn kek(&self) -> KekKind {
        self.kek
    }

    /// `x'<64 hex>'`: the raw SQLCipher key for the database named `db`, for
    /// `PRAGMA key = "x'...'"` followed by [`SQLCIPHER_SETTINGS`] (raw keys
    /// skip SQLCipher's PBKDF2).
    pub fn sqlcipher_key(&self, db: &str) -> Result<Zeroizing<String>, VaultError> {
        let k = self.subkey(&format!("secta sqlcipher v1 {db}"))?;
        let mut s = Zeroizing::new(String::with_capacity(67));
        s.push_str("x'");
        s.push_str(&hex::encode(k.as_ref()));
        s.push('\'');
        Ok(s)
    }

    /// The cipher for files (media, keys, recordings).
    pub fn file_cipher(&self) -> Result<FileCipher, VaultError> {
        Ok(FileCipher::new(self.subkey("secta files v1")?))
    }

    fn subkey(&self, label: &str) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        let guard = self.key.read().unwrap_or_else(|p| p.into_inner());
        let key = guard.as_ref().ok_or(VaultError::Wiped)?;
        Ok(derive(key, label.as_bytes()))
    }

    /// Drops the data key from memory (zeroized). Every later use fails.
    pub fn forget(&self) {
        let mut guard = self.key.write().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = guard.as_mut() {
            k.zeroize();
        }
        *guard = None;
    }

    pub fn is_forgotten(&self) -> bool {
        self.key.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

fn derive(key: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, key);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn parse_marker(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("key_id = "))
        .unwrap_or("")
        .trim_matches('"')
        .to_owned()
}

fn write_marker(path: &Path, key_id: &str) -> std::io::Result<()> {
    let text = format!(
        "# The data in this folder is encrypted under the data key with this id.\n\
         # (Not secret. The key itself is in the key file; see `secta admin audit`.)\n\
         key_id = \"{key_id}\"\n"
    );
    wipe::write_synced(path, text.as_bytes())
}

/// What `secta admin audit` says about the data at rest, never the key.
#[derive(Debug, serde::Serialize)]
pub struct Audit {
    pub encrypted: bool,
    pub key_id: Option<String>,
    pub key_file: PathBuf,
    pub key_file_present: bool,
    pub key_wrapped_by: Option<String>,
    pub wipe_in_progress: bool,
    /// Every file and folder a wipe destroys (key material first).
    pub would_destroy: Vec<PathBuf>,
    pub bytes: u64,
    /// Entries of the data directory holding encrypted files, with how many.
    pub encrypted_files: Vec<EncryptedEntry>,
    /// Files (not empty) whose bytes are in the clear: a wipe deletes them
    /// but cannot crypto-erase them.
    pub clear_files: Vec<PathBuf>,
}

#[derive(Debug, serde::Serialize)]
pub struct EncryptedEntry {
    pub path: PathBuf,
    pub files: usize,
}

/// Whether a file's bytes are encrypted, judged by its bytes (None: empty).
/// Files written by [`FileCipher`] and key files start with their magic; a
/// database (`*.db` and its `-wal`, `-shm`, `-journal`) is in the clear when
/// the database starts with SQLite's header, SQLCipher's start with random
/// bytes.
fn is_encrypted(path: &Path) -> Option<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .ok()?;
    if head.is_empty() {
        return None;
    }
    if head.starts_with(file::MAGIC) || head.starts_with(keyfile::MAGIC) {
        return Some(true);
    }
    let name = path.file_name()?.to_string_lossy();
    let db = ["-wal", "-shm", "-journal"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(&name);
    if !db.ends_with(".db") {
        return Some(false);
    }
    // A database file with a whole header that is not SQLite's.
    let db = path.with_file_name(db);
    let whole = std::fs::metadata(&db).is_ok_and(|m| m.len() >= 16);
    Some(whole && !sqlite_in_clear(&db).unwrap_or(true))
}

/// Whether `path` is an SQLite database in the clear (its header is readable;
/// SQLCipher's start with random bytes). A missing or short file is not.
pub fn sqlite_in_clear(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 16];
    match std::fs::File::open(path) {
        Ok(mut f) => Ok(f.read_exact(&mut head).is_ok() && &head == b"SQLite format 3\0"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn files_under(p: &Path, out: &mut Vec<PathBuf>) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                files_under(&e.path(), out);
            }
        }
        Ok(m) if m.is_file() => out.push(p.to_owned()),
        _ => {}
    }
}

/// Inspects `data_dir` without opening anything.
pub fn audit(cfg: &VaultConfig, data_dir: &Path) -> Audit {
    let key_file = cfg.key_file(data_dir);
    let key_id = std::fs::read_to_string(data_dir.join(ENCRYPTED_MARKER))
        .ok()
        .map(|t| parse_marker(&t));
    let plan = wipe::plan(cfg, data_dir);
    let mut would_destroy = plan.keys.clone();
    would_destroy.extend(plan.data.iter().cloned());
    let bytes = plan.data.iter().map(|p| wipe::size_of(p)).sum();
    let (mut encrypted_files, mut clear_files) = (Vec::new(), Vec::new());
    for entry in &plan.data {
        let mut files = Vec::new();
        files_under(entry, &mut files);
        files.sort();
        let mut n = 0;
        for f in files {
            match is_encrypted(&f) {
                Some(true) => n += 1,
                Some(false) => clear_files.push(f),
                None => {}
            }
        }
        if n > 0 {
            encrypted_files.push(EncryptedEntry {
                path: entry.clone(),
                files: n,
            });
        }
    }
    Audit {
        encrypted: key_id.is_some(),
        key_wrapped_by: keyfile::kind_of(&key_file).map(|k| k.describe().to_owned()),
        key_file_present: key_file.exists(),
        key_file,
        key_id,
        wipe_in_progress: data_dir.join(wipe::WIPE_MARKER).exists(),
        would_destroy,
        bytes,
        encrypted_files,
        clear_files,
    }
}
