//! AmneziaWG-style obfuscation against DPI, applied around boringtun's packets:
//! `Jc` junk datagrams of `Jmin..=Jmax` random bytes before every handshake
//! initiation, `S1`/`S2` random bytes before handshake initiations/responses,
//! and message types `H1..H4` instead of 1..4.
//!
//! boringtun formats and checks standard messages; the header is swapped after
//! it formats a message and swapped back before it sees one, so its MACs (and
//! cookie replies under load) stay valid. Both ends must use the same settings;
//! with the defaults (all off) packets are byte-for-byte standard WireGuard.

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

pub const INIT: u32 = 1;
pub const RESPONSE: u32 = 2;
pub const COOKIE: u32 = 3;
pub const DATA: u32 = 4;
pub const INIT_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_LEN: usize = 64;
pub const DATA_MIN_LEN: usize = 32;
/// Largest junk datagram / padded handshake (AmneziaWG's limit).
pub const MAX_JUNK: usize = 1280;

/// Obfuscation settings of one interface (the `.conf` keys Jc, Jmin, Jmax, S1, S2, H1–H4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Obfuscation {
    pub jc: u16,
    pub jmin: u16,
    pub jmax: u16,
    pub s1: u16,
    pub s2: u16,
    pub h1: u32,
    pub h2: u32,
    pub h3: u32,
    pub h4: u32,
}

impl Default for Obfuscation {
    fn default() -> Self {
        Self {
            jc: 0,
            jmin: 0,
            jmax: 0,
            s1: 0,
            s2: 0,
            h1: INIT,
            h2: RESPONSE,
            h3: COOKIE,
            h4: DATA,
        }
    }
}

impl Obfuscation {
    /// Whether any obfuscation is on.
    pub fn is_on(&self) -> bool {
        *self != Self::default()
    }

    /// Settings with fresh random values that satisfy [`Obfuscation::problems`]
    /// (what an admin gets from `--obfuscate`): 4–8 junk packets of 40–70 bytes,
    /// 15–150 bytes of padding, random headers above 4.
    pub fn random() -> Self {
        let mut rng = rand::rngs::OsRng;
        loop {
            let mut h = [0u32; 4];
            for v in &mut h {
                *v = rng.gen_range(5..=u32::MAX);
            }
            let o = Self {
                jc: rng.gen_range(4..=8),
                jmin: 40,
                jmax: 70,
                s1: rng.gen_range(15..=150),
                s2: rng.gen_range(15..=150),
                h1: h[0],
                h2: h[1],
                h3: h[2],
                h4: h[3],
            };
            if o.problems().is_empty() {
                return o;
            }
        }
    }

    /// What is wrong with these settings (empty when usable).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.jc > 128 {
            p.push(format!("Jc = {} is more than 128 junk packets", self.jc));
        }
        if self.jc > 0 && (self.jmin > self.jmax || self.jmax as usize > MAX_JUNK) {
            p.push(format!(
                "junk sizes must satisfy Jmin ≤ Jmax ≤ {MAX_JUNK} (Jmin = {}, Jmax = {})",
                self.jmin, self.jmax
            ));
        }
        if self.s1 as usize > MAX_JUNK - INIT_LEN {
            p.push(format!(
                "S1 = {} is more than {}",
                self.s1,
                MAX_JUNK - INIT_LEN
            ));
        }
        if self.s2 as usize > MAX_JUNK - RESPONSE_LEN {
            p.push(format!(
                "S2 = {} is more than {}",
                self.s2,
                MAX_JUNK - RESPONSE_LEN
            ));
        }
        if self.s1 as usize + INIT_LEN == self.s2 as usize + RESPONSE_LEN {
            p.push("S1 + 56 = S2 makes initiations and responses the same size".into());
        }
        let h = [self.h1, self.h2, self.h3, self.h4];
        for i in 0..4 {
            if h[i] == 0 {
                p.push(format!("H{} must not be 0", i + 1));
            }
            for j in i + 1..4 {
                if h[i] == h[j] {
                    p.push(format!("H{} and H{} must differ", i + 1, j + 1));
                }
            }
        }
        p
    }

    /// The `.conf` lines for these settings (none when off).
    pub fn conf_lines(&self) -> Vec<(&'static str, String)> {
        if !self.is_on() {
            return Vec::new();
        }
        vec![
            ("Jc", self.jc.to_string()),
            ("Jmin", self.jmin.to_string()),
            ("Jmax", self.jmax.to_string()),
            ("S1", self.s1.to_string()),
            ("S2", self.s2.to_string()),
            ("H1", self.h1.to_string()),
            ("H2", self.h2.to_string()),
            ("H3", self.h3.to_string()),
            ("H4", self.h4.to_string()),
        ]
    }

    /// Junk datagrams to send before a handshake initiation.
    pub fn junk(&self) -> Vec<Vec<u8>> {
        let mut rng = rand::rngs::OsRng;
        (0..self.jc)
            .map(|_| {
                let n = rng.gen_range(self.jmin..=self.jmax.max(self.jmin)) as usize;
                let mut v = vec![0u8; n];
                rng.fill_bytes(&mut v);
                v
            })
            .collect()
    }

    /// Turns a standard message boringtun made (in `buf[off..off+len]`, with at
    /// least `S1` free bytes before `off`) into its obfuscated form; returns the
    /// range to send and whether junk should go first (a handshake initiation).
    pub fn wrap(&self, buf: &mut [u8], off: usize, len: usize) -> (usize, usize, bool) {
        if len < 4 {
            return (off, len, false);
        }
        let ty = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
        let (h, pad) = match (ty, len) {
            (INIT, INIT_LEN) => (self.h1, self.s1 as usize),
            (RESPONSE, RESPONSE_LEN) => (self.h2, self.s2 as usize),
            (COOKIE, COOKIE_LEN) => (self.h3, 0),
            (DATA, _) => (self.h4, 0),
            _ => return (off, len, false),
        };
        buf[off..off + 4].copy_from_slice(&h.to_le_bytes());
        let start = off - pad.min(off);
        rand::rngs::OsRng.fill_bytes(&mut buf[start..off]);
        (start, len + (off - start), ty == INIT && self.jc > 0)
    }

    /// Recognises an obfuscated datagram and restores the standard message in
    /// place; returns its range, or `None` for junk (dropped).
    pub fn unwrap(&self, buf: &mut [u8]) -> Option<(usize, usize)> {
        let n = buf.len();
        let header = |at: usize| -> Option<u32> {
            buf.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        let (s1, s2) = (self.s1 as usize, self.s2 as usize);
        let (at, ty) = if n == s1 + INIT_LEN && header(s1) == Some(self.h1) {
            (s1, INIT)
        } else if n == s2 + RESPONSE_LEN && header(s2) == Some(self.h2) {
            (s2, RESPONSE)
        } else if n == COOKIE_LEN && header(0) == Some(self.h3) {
            (0, COOKIE)
        } else if n >= DATA_MIN_LEN && header(0) == Some(self.h4) {
            (0, DATA)
        } else {
            return None;
        };
        buf[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        Some((at, n - at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_standard_wireguard() {
        let o = Obfuscation::default();
        assert!(!o.is_on());
        assert!(o.problems().is_empty());
        let mut buf = vec![0u8; 200];
        buf[0] = 1;
        let (s, l, junk) = o.wrap(&mut buf, 0, INIT_LEN);
        assert_eq!((s, l, junk), (0, INIT_LEN, false));
        assert_eq!(buf[0..4], [1, 0, 0, 0]);
        let mut pkt = buf[..INIT_LEN].to_vec();
        assert_eq!(o.unwrap(&mut pkt), Some((0, INIT_LEN)));
    }

    #[test]
    fn wrap_and_unwrap_round_trip_every_message() {
        let o = Obfuscation::random();
        assert!(o.is_on() && o.problems().is_empty(), "{o:?}");
        for (ty, len) in [
            (INIT, INIT_LEN),
            (RESPONSE, RESPONSE_LEN),
            (COOKIE, COOKIE_LEN),
            (DATA, 100),
        ] {
            let off = 200;
            let mut buf = vec![0u8; off + len];
            buf[off..off + 4].copy_from_slice(&ty.to_le_bytes());
            for (i, b) in buf[off + 4..].iter_mut().enumerate() {
                *b = i as u8;
            }
            let original = buf[off..].to_vec();
            let (s, l, junk) = o.wrap(&mut buf, off, len);
            assert_eq!(junk, ty == INIT);
            let mut wire = buf[s..s + l].to_vec();
            assert_ne!(wire[..4], original[..4], "type {ty} header not replaced");
            let (a, m) = o.unwrap(&mut wire).expect("recognised");
            assert_eq!(&wire[a..a + m], &original[..], "type {ty}");
        }
        // Junk and standard packets are not taken for messages.
        let mut std_init = vec![0u8; INIT_LEN];
        std_init[0] = 1;
        assert_eq!(o.unwrap(&mut std_init), None);
        for j in o.junk() {
            assert!((o.jmin as usize..=o.jmax as usize).contains(&j.len()));
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let o = Obfuscation {
            jc: 200,
            jmin: 90,
            jmax: 10,
            s1: 0,
            s2: 56,
            h1: 7,
            h2: 7,
            ..Default::default()
        };
        let p = o.problems().join("; ");
        assert!(p.contains("Jc = 200"), "{p}");
        assert!(p.contains("Jmin ≤ Jmax"), "{p}");
        assert!(p.contains("S1 + 56 = S2"), "{p}");
        assert!(p.contains("H1 and H2"), "{p}");
    }
}
