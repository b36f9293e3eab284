//! The key file: the data key wrapped by a key-encryption key (KEK).
//!
//! Layout (97 bytes): `SECTAK01` · KEK kind (1) · salt (16) · nonce (24) ·
//! XChaCha20-Poly1305(KEK, nonce, data key, aad = the first 25 bytes) (48).
//! A flipped bit anywhere, or the wrong secret, fails the tag.

use std::path::Path;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use zeroize::Zeroizing;

pub(crate) const MAGIC: &[u8; 8] = b"SECTAK01";
pub const LEN: usize = 8 + 1 + 16 + 24 + 48;

/// What wraps the data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KekKind {
    None,
    SecretFile,
    Passphrase,
}

impl KekKind {
    fn byte(self) -> u8 {
        match self {
            KekKind::None => 0,
            KekKind::SecretFile => 1,
            KekKind::Passphrase => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => KekKind::None,
            1 => KekKind::SecretFile,
            2 => KekKind::Passphrase,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            KekKind::None => "nothing (the key file alone unlocks the data)",
            KekKind::SecretFile => "a secret file kept elsewhere (secret_file)",
            KekKind::Passphrase => "a passphrase (Argon2id)",
        }
    }
}

pub enum Kek {
    None,
    Secret(Zeroizing<Vec<u8>>),
    Passphrase(Zeroizing<String>),
}

impl Kek {
    pub fn kind(&self) -> KekKind {
        match self {
            Kek::None => KekKind::None,
            Kek::Secret(_) => KekKind::SecretFile,
            Kek::Passphrase(_) => KekKind::Passphrase,
        }
    }

    fn derive(&self, salt: &[u8; 16]) -> Result<Zeroizing<[u8; 32]>, String> {
        let mut out = Zeroizing::new([0u8; 32]);
        match self {
            Kek::None | Kek::Secret(_) => {
                let ikm: &[u8] = match self {
                    Kek::Secret(s) => s,
                    _ => b"secta: no key-encryption secret",
                };
                hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm)
                    .expand(b"secta kek v1", out.as_mut())
                    .map_err(|e| e.to_string())?;
            }
            Kek::Passphrase(p) => {
                // 64 MiB, 3 passes: under a second on a Pi 4, once per start.
                let params =
                    argon2::Params::new(64 * 1024, 3, 1, Some(32)).map_err(|e| e.to_string())?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(p.as_bytes(), salt, out.as_mut())
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(out)
    }
}

pub fn write(path: &Path, key: &[u8; 32], kek: &Kek) -> std::io::Result<()> {
    use rand::RngCore;
    let mut head = [0u8; 25];
    head[..8].copy_from_slice(MAGIC);
    head[8] = kek.kind().byte();
    rand::rngs::OsRng.fill_bytes(&mut head[9..25]);
    let salt: [u8; 16] = head[9..25].try_into().expect("16 bytes");
    let mut nonce = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let wrap = kek.derive(&salt).map_err(std::io::Error::other)?;
    let ct = XChaCha20Poly1305::new(wrap.as_ref().into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: key,
                aad: &head,
            },
        )
        .map_err(|_| std::io::Error::other("wrapping the data key failed"))?;
    let mut file = Vec::with_capacity(LEN);
    file.extend_from_slice(&head);
    file.extend_from_slice(&nonce);
    file.extend_from_slice(&ct);
    crate::wipe::write_synced(path, &file)
}

pub fn read(path: &Path, kek: &Kek) -> Result<Zeroizing<[u8; 32]>, String> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| e.to_string())?);
    if bytes.len() != LEN || &bytes[..8] != MAGIC {
        return Err(format!(
            "not a Secta key file ({} bytes, corrupt or truncated)",
            bytes.len()
        ));
    }
    let kind = KekKind::from_byte(bytes[8]).ok_or("unknown key-encryption kind (corrupt)")?;
    if kind != kek.kind() {
        return Err(format!(
            "it is wrapped by {}, but the config provides {}",
            kind.describe(),
            kek.kind().describe()
        ));
    }
    let salt: [u8; 16] = bytes[9..25].try_into().expect("16 bytes");
    let wrap = kek.derive(&salt)?;
    let key = XChaCha20Poly1305::new(wrap.as_ref().into())
        .decrypt(
            XNonce::from_slice(&bytes[25..49]),
            Payload {
                msg: &bytes[49..],
                aad: &bytes[..25],
            },
        )
        .map_err(|_| match kind {
            KekKind::None => "it does not authenticate (corrupt)".to_owned(),
            _ => "it does not authenticate: wrong secret/passphrase, or the file is corrupt"
                .to_owned(),
        })?;
    let key = Zeroizing::new(key);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&key);
    Ok(out)
}

/// The KEK kind recorded in a key file, if it looks like one.
pub fn kind_of(path: &Path) -> Option<KekKind> {
    let bytes = std::fs::read(path).ok()?;
    (bytes.len() == LEN && &bytes[..8] == MAGIC)
        .then(|| KekKind::from_byte(bytes[8]))
        .flatten()
}
