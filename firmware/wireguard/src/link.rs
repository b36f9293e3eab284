//! Box-to-box links: the pairing code one box shows and the other enters (or
//! scans as a QR). It carries the box's link public key, link address,
//! federation port, Matrix server name and, unless the box is behind NAT, the
//! endpoint to dial; a checksum catches typing mistakes. Both boxes enter the
//! other's code; the one behind NAT keeps the link up with keepalives.

use std::net::Ipv4Addr;

use anyhow::{bail, Context};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use sha2::{Digest, Sha256};

use crate::{conf::Endpoint, keys::PublicKey, store::Link};

const PREFIX: &str = "secta-link:";
const VERSION: u8 = 1;

/// What a pairing code says about a box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCode {
    pub public_key: PublicKey,
    pub address: Ipv4Addr,
    pub federation_port: u16,
    pub endpoint: Option<Endpoint>,
    pub server_name: String,
}

impl PairingCode {
    pub fn encode(&self) -> String {
        let mut b = vec![VERSION];
        b.extend_from_slice(&self.public_key.0);
        b.extend_from_slice(&self.address.octets());
        b.extend_from_slice(&self.federation_port.to_be_bytes());
        let ep = self
            .endpoint
            .as_ref()
            .map(Endpoint::to_string)
            .unwrap_or_default();
        b.push(ep.len() as u8);
        b.extend_from_slice(ep.as_bytes());
        b.push(self.server_name.len() as u8);
        b.extend_from_slice(self.server_name.as_bytes());
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum[..4]);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    pub fn decode(code: &str) -> anyhow::Result<Self> {
        let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        let body = code
            .strip_prefix(PREFIX)
            .context("not a Secta pairing code (it starts with \"secta-link:\")")?;
        let b = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| anyhow::anyhow!("the pairing code is damaged (not base64url)"))?;
        if b.len() < 1 + 32 + 4 + 2 + 1 + 1 + 4 {
            bail!("the pairing code is too short (cut off?)");
        }
        let (data, sum) = b.split_at(b.len() - 4);
        if Sha256::digest(data)[..4] != *sum {
            bail!("the pairing code's checksum does not match (a typo?)");
        }
        if data[0] != VERSION {
            bail!("pairing code version {} is not supported", data[0]);
        }
        let mut at = 1;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            let s = data
                .get(at..at + n)
                .context("the pairing code is cut off")?;
            at += n;
            Ok(s)
        };
        let public_key = PublicKey(take(32)?.try_into().expect("32"));
        let address = Ipv4Addr::from(<[u8; 4]>::try_from(take(4)?).expect("4"));
        let federation_port = u16::from_be_bytes(take(2)?.try_into().expect("2"));
        let n = take(1)?[0] as usize;
        let ep = std::str::from_utf8(take(n)?).context("bad endpoint text")?;
        let endpoint = if ep.is_empty() {
            None
        } else {
            Some(ep.parse().map_err(anyhow::Error::msg)?)
        };
        let n = take(1)?[0] as usize;
        let server_name = std::str::from_utf8(take(n)?)
            .context("bad server name")?
            .to_owned();
        if server_name.is_empty() {
            bail!("the pairing code has no server name");
        }
        Ok(Self {
            public_key,
            address,
            federation_port,
            endpoint,
            server_name,
        })
    }

    /// The link this code describes, under a local name.
    pub fn to_link(&self, name: &str) -> Link {
        Link {
            name: name.to_owned(),
            public_key: self.public_key,
            address: self.address,
            endpoint: self.endpoint.clone(),
            server_name: self.server_name.clone(),
            federation_port: self.federation_port,
            created_ms: crate::store::now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn codes_round_trip_and_typos_are_caught() {
        let c = PairingCode {
            public_key: SecretKey::generate().public(),
            address: Ipv4Addr::new(10, 78, 3, 4),
            federation_port: 8448,
            endpoint: Some("box-a.example.org:51821".parse().unwrap()),
            server_name: "box-a.example.org".into(),
        };
        let text = c.encode();
        assert!(text.len() < 160, "{} chars", text.len());
        assert_eq!(PairingCode::decode(&text).unwrap(), c);
        // Spaces and line breaks from copying are ignored.
        let spaced = format!("{} \n{}", &text[..30], &text[30..]);
        assert_eq!(PairingCode::decode(&spaced).unwrap(), c);
        let nat = PairingCode {
            endpoint: None,
            ..c.clone()
        };
        assert_eq!(PairingCode::decode(&nat.encode()).unwrap(), nat);
        let mut typo = text.clone().into_bytes();
        let i = typo.len() - 10;
        typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
        let e = PairingCode::decode(std::str::from_utf8(&typo).unwrap()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(PairingCode::decode("hello")
            .unwrap_err()
            .to_string()
            .contains("not a Secta pairing code"));
        assert!(PairingCode::decode(&text[..40]).is_err());
    }
}
