//! dnsmasq's lease table: which MAC address (and device name) holds which IP.
//! The portal knows a client by its connection's address and looks its MAC up
//! here; nothing a client sends in a form is ever taken as its MAC.

use std::{net::Ipv4Addr, path::Path};

/// One line of dnsmasq's lease file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// Unix seconds when the lease ends (0: infinite).
    pub expires: u64,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: Ipv4Addr,
    /// The name the device gave in its DHCP request, if any.
    pub hostname: Option<String>,
}

/// The most lines read (a box hands out at most a few hundred leases).
const MAX_LEASES: usize = 10_000;

fn valid_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':')
            .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Parses dnsmasq's lease file format (`EXPIRY MAC IP HOSTNAME CLIENT-ID`, `*`
/// for none). Malformed lines (and IPv6 `duid` lines) are skipped.
pub fn parse(text: &str) -> Vec<Lease> {
    text.lines()
        .take(MAX_LEASES)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let expires = f.next()?.parse().ok()?;
            let mac = f.next()?;
            if !valid_mac(mac) {
                return None;
            }
            let ip = f.next()?.parse().ok()?;
            let hostname = f
                .next()
                .filter(|h| *h != "*")
                .map(|h| h.chars().filter(|c| !c.is_control()).take(63).collect());
            Some(Lease {
                expires,
                mac: mac.to_ascii_lowercase(),
                ip,
                hostname,
            })
        })
        .collect()
}

/// Reads the lease file; a missing or unreadable file is an empty table.
pub fn read(path: &Path) -> Vec<Lease> {
    use std::io::Read;
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            // Bounded: a lease line is under 200 bytes.
            if f.take(2 * 1024 * 1024).read_to_string(&mut text).is_err() {
                return Vec::new();
            }
            parse(&text)
        }
        Err(_) => Vec::new(),
    }
}

/// The lease of `ip`, if it has a current one (`now` in Unix seconds).
pub fn lookup(leases: &[Lease], ip: Ipv4Addr, now: u64) -> Option<&Lease> {
    leases
        .iter()
        .filter(|l| l.ip == ip && (l.expires == 0 || l.expires > now))
        .max_by_key(|l| if l.expires == 0 { u64::MAX } else { l.expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsmasq_lines_and_skips_junk() {
        let text = "1900000000 AA:bb:cc:00:11:22 10.42.0.77 pixel-7 01:aa:bb:cc:00:11:22\n\
                    1900000100 de:ad:be:ef:00:01 10.42.0.78 * *\n\
                    duid 00:01:00:01:2c:aa\n\
                    garbage line\n\
                    1900000000 not-a-mac 10.42.0.79 x *\n\
                    0 de:ad:be:ef:00:02 10.42.0.80 \u{1b}[31mred *\n";
        let l = parse(text);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0].mac, "aa:bb:cc:00:11:22");
        assert_eq!(l[0].hostname.as_deref(), Some("pixel-7"));
        assert_eq!(l[1].hostname, None);
        assert!(!l[2].hostname.as_deref().unwrap().contains('\u{1b}'));
        let ip: Ipv4Addr = "10.42.0.77".parse().unwrap();
        assert_eq!(
            lookup(&l, ip, 1_800_000_000).unwrap().mac,
            "aa:bb:cc:00:11:22"
        );
        assert!(lookup(&l, ip, 1_900_000_001).is_none(), "expired");
        assert!(lookup(&l, "10.42.0.80".parse().unwrap(), u64::MAX - 1).is_some());
        assert!(read(Path::new("/nonexistent/leases")).is_empty());
    }
}
