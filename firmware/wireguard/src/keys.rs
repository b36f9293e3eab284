//! WireGuard keys: Curve25519 (x25519-dalek through boringtun's re-export),
//! base64 as in `.conf` files, hex as in the UAPI protocol.
//!
//! Secret keys never print: their `Debug` is redacted and their text form is
//! only reachable through the explicitly named `expose_*` methods.

use std::fmt;

use base64::{engine::general_purpose::STANDARD, Engine};
use boringtun::x25519;
use zeroize::Zeroizing;

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not valid base64")]
    BadBase64 { what: &'static str },
    #[error("{what} is {len} bytes long, a WireGuard key is 32")]
    WrongLength { what: &'static str, len: usize },
    #[error("{what} is not 64 hex digits")]
    BadHex { what: &'static str },
}

fn decode32(s: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| KeyError::BadBase64 { what })?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| KeyError::WrongLength { what, len })
}

fn decode_hex32(s: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let bytes = hex::decode(s.trim()).map_err(|_| KeyError::BadHex { what })?;
    bytes.try_into().map_err(|_| KeyError::BadHex { what })
}

/// A peer's or interface's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        decode32(s, "public key").map(Self)
    }
    pub fn parse_hex(s: &str) -> Result<Self, KeyError> {
        decode_hex32(s, "public key").map(Self)
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn x25519(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
    /// The first characters, enough to tell peers apart in logs.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_owned()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A 32-byte secret (private or preshared key), wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    /// A fresh private key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let s = x25519::StaticSecret::random_from_rng(rand::rngs::OsRng);
        Self(Zeroizing::new(s.to_bytes()))
    }
    /// A fresh preshared key (32 random bytes).
    pub fn generate_preshared() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k[..]);
        Self(k)
    }
    pub fn parse(s: &str, what: &'static str) -> Result<Self, KeyError> {
        decode32(s, what).map(|k| Self(Zeroizing::new(k)))
    }
    pub fn parse_hex(s: &str, what: &'static str) -> Result<Self, KeyError> {
        decode_hex32(s, what).map(|k| Self(Zeroizing::new(k)))
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(Zeroizing::new(b))
    }
    /// The public key of this private key.
    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.x25519()).to_bytes())
    }
    pub fn x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(*self.0)
    }
    pub fn bytes(&self) -> [u8; 32] {
        *self.0
    }
    /// The base64 text, for writing a `.conf` or the key file. Never log it.
    pub fn expose_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(*self.0))
    }
    /// The hex text, for the UAPI protocol. Never log it.
    pub fn expose_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_refuse_clearly() {
        let k = SecretKey::generate();
        let text = k.expose_base64();
        let back = SecretKey::parse(&text, "private key").unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(
            PublicKey::parse("not base64!").unwrap_err(),
            KeyError::BadBase64 { what: "public key" }
        );
        assert_eq!(
            PublicKey::parse(&STANDARD.encode([1u8; 31])).unwrap_err(),
            KeyError::WrongLength {
                what: "public key",
                len: 31
            }
        );
        let p = k.public();
        assert_eq!(PublicKey::parse_hex(&p.to_hex()).unwrap(), p);
        assert!(!format!("{k:?}").contains(&*text));
    }

    #[test]
    fn public_key_matches_wireguard_vector() {
        // `wg pubkey` of a fixed private key (RFC 7748 section 6.1, Alice).
        let private = SecretKey::from_bytes(
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            private.public().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }
}
