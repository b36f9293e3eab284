//! The standard WireGuard `.conf` format (as `wg-quick` and the phone apps read
//! it), plus the AmneziaWG keys `Jc Jmin Jmax S1 S2 H1..H4` in `[Interface]`.
//!
//! Parsing refuses anything doubtful with the line it is on: missing or
//! malformed keys, bad addresses, duplicate peers, overlapping AllowedIPs, and
//! scripts (`PreUp`/`PostUp`/…: the box never runs commands from a file).

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    str::FromStr,
};

use ipnet::IpNet;

use crate::{
    keys::{PublicKey, SecretKey},
    obfs::Obfuscation,
};

/// A refused `.conf`: the 1-based line (0 = the file as a whole) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{msg}", if *line > 0 { format!("line {line}: ") } else { String::new() })]
pub struct ConfError {
    pub line: usize,
    pub msg: String,
}

fn err<T>(line: usize, msg: impl Into<String>) -> Result<T, ConfError> {
    Err(ConfError {
        line,
        msg: msg.into(),
    })
}

/// Where a peer is reached: a host name or IP literal and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Resolves the host (DNS for names) to a socket address, preferring IPv4.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} has no address", self.host),
                )
            })
    }
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("endpoint {s:?} is not [IPv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("endpoint {s:?} has a bad IPv6 address"))?;
            (h, p)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| format!("endpoint {s:?} has no :port"))?
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("endpoint {s:?} has a bad port"))?;
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !valid_host {
            return Err(format!("endpoint {s:?} has a bad host name"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The `[Interface]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub private_key: SecretKey,
    /// Addresses of this end, with their prefix (`10.77.0.2/32`).
    pub addresses: Vec<IpNet>,
    pub listen_port: Option<u16>,
    /// DNS servers (IP literals) for this end.
    pub dns: Vec<IpAddr>,
    /// DNS search domains (non-IP entries of `DNS =`).
    pub dns_search: Vec<String>,
    pub mtu: Option<u16>,
    pub fwmark: Option<u32>,
    pub obfuscation: Obfuscation,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<Endpoint>,
    pub persistent_keepalive: Option<u16>,
}

/// A whole `.conf` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConf {
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

/// `IP/prefix` or a bare IP (a host: /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("{s:?} is not an IP address or IP/prefix"))
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[derive(Default)]
struct PartialIface {
    line: usize,
    private_key: Option<SecretKey>,
    addresses: Vec<IpNet>,
    listen_port: Option<u16>,
    dns: Vec<IpAddr>,
    dns_search: Vec<String>,
    mtu: Option<u16>,
    fwmark: Option<u32>,
    obfs: Obfuscation,
}

struct PartialPeer {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<SecretKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
}

fn num<T: FromStr>(line: usize, key: &str, v: &str) -> Result<T, ConfError> {
    v.parse()
        .or_else(|_| err(line, format!("{key} = {v:?} is not a valid number")))
}

impl WgConf {
    /// Parses a `.conf` file.
    pub fn parse(text: &str) -> Result<Self, ConfError> {
        enum Sec {
            None,
            Iface,
            Peer,
        }
        let mut sec = Sec::None;
        let mut iface: Option<PartialIface> = None;
        let mut peers: Vec<PartialPeer> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            if l.starts_with('[') {
                match l.to_ascii_lowercase().as_str() {
                    "[interface]" => {
                        if iface.is_some() {
                            return err(line, "a second [Interface] section");
                        }
                        iface = Some(PartialIface {
                            line,
                            ..Default::default()
                        });
                        sec = Sec::Iface;
                    }
                    "[peer]" => {
                        peers.push(PartialPeer {
                            line,
                            public_key: None,
                            preshared_key: None,
                            allowed_ips: Vec::new(),
                            endpoint: None,
                            persistent_keepalive: None,
                        });
                        sec = Sec::Peer;
                    }
                    _ => return err(line, format!("unknown section {l}")),
                }
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                return err(line, format!("expected `Key = value`, got {l:?}"));
            };
            let (k, v) = (k.trim(), v.trim());
            let key = k.to_ascii_lowercase();
            if matches!(key.as_str(), "preup" | "postup" | "predown" | "postdown") {
                return err(
                    line,
                    format!("{k} scripts are not supported (the box never runs commands from a .conf); remove the line"),
                );
            }
            match sec {
                Sec::None => return err(line, format!("{k} outside of a section")),
                Sec::Iface => {
                    let s = iface.as_mut().expect("in [Interface]");
                    let o = &mut s.obfs;
                    match key.as_str() {
                        "privatekey" => {
                            s.private_key = Some(
                                SecretKey::parse(v, "PrivateKey")
                                    .or_else(|e| err(line, e.to_string()))?,
                            )
                        }
                        "address" => {
                            for a in list(v) {
                                s.addresses.push(
                                    parse_cidr(a)
                                        .or_else(|e| err(line, format!("Address: {e}")))?,
                                );
                            }
                        }
                        "listenport" => s.listen_port = Some(num(line, k, v)?),
                        "dns" => {
                            for d in list(v) {
                                match d.parse::<IpAddr>() {
                                    Ok(ip) => s.dns.push(ip),
                                    Err(_)
                                        if d.chars().all(|c| {
                                            c.is_ascii_alphanumeric() || c == '-' || c == '.'
                                        }) =>
                                    {
                                        s.dns_search.push(d.to_owned())
                                    }
                                    Err(_) => {
                                        return err(
                                            line,
                                            format!(
                                                "DNS: {d:?} is neither an IP address nor a domain"
                                            ),
                                        )
                                    }
                                }
                            }
                        }
                        "mtu" => {
                            let m: u16 = num(line, k, v)?;
                            if !(576..=9000).contains(&m) {
                                return err(line, format!("MTU = {m} is outside 576..9000"));
                            }
                            s.mtu = Some(m)
                        }
                        "fwmark" => {
                            s.fwmark = Some(if v == "off" {
                                0
                            } else if let Some(h) = v.strip_prefix("0x") {
                                u32::from_str_radix(h, 16).or_else(|_| {
                                    err(line, format!("FwMark = {v:?} is not a number"))
                                })?
                            } else {
                                num(line, k, v)?
                            })
                        }
                        "jc" => o.jc = num(line, k, v)?,
                        "jmin" => o.jmin = num(line, k, v)?,
                        "jmax" => o.jmax = num(line, k, v)?,
                        "s1" => o.s1 = num(line, k, v)?,
                        "s2" => o.s2 = num(line, k, v)?,
                        "h1" => o.h1 = num(line, k, v)?,
                        "h2" => o.h2 = num(line, k, v)?,
                        "h3" => o.h3 = num(line, k, v)?,
                        "h4" => o.h4 = num(line, k, v)?,
                        // wg-quick settings the box decides itself.
                        "table" | "saveconfig" => {}
                        _ => return err(line, format!("unknown key {k} in [Interface]")),
                    }
                }
                Sec::Peer => {
                    let p = peers.last_mut().expect("in [Peer]");
                    match key.as_str() {
                        "publickey" => {
                            p.public_key = Some(
                                PublicKey::parse(v)
                                    .or_else(|e| err(line, format!("PublicKey: {e}")))?,
                            )
                        }
                        "presharedkey" => {
                            p.preshared_key = Some(
                                SecretKey::parse(v, "PresharedKey")
                                    .or_else(|e| err(line, e.to_string()))?,
                            )
                        }
                        "allowedips" => {
                            for a in list(v) {
                                p.allowed_ips.push(
                                    parse_cidr(a)
                                        .or_else(|e| err(line, format!("AllowedIPs: {e}")))?
                                        .trunc(),
                                );
                            }
                        }
                        "endpoint" => {
                            p.endpoint = Some(v.parse().or_else(|e: String| err(line, e))?)
                        }
                        "persistentkeepalive" => {
                            p.persistent_keepalive = match v {
                                "off" | "0" => None,
                                _ => Some(num(line, k, v)?),
                            }
                        }
                        _ => return err(line, format!("unknown key {k} in [Peer]")),
                    }
                }
            }
        }
        let Some(iface) = iface else {
            return err(0, "no [Interface] section");
        };
        let Some(private_key) = iface.private_key else {
            return err(iface.line, "[Interface] has no PrivateKey");
        };
        let problems = iface.obfs.problems();
        if !problems.is_empty() {
            return err(
                iface.line,
                format!("obfuscation settings: {}", problems.join("; ")),
            );
        }
        let own = private_key.public();
        let mut out = Vec::with_capacity(peers.len());
        for p in peers {
            let Some(public_key) = p.public_key else {
                return err(p.line, "[Peer] has no PublicKey");
            };
            if public_key == own {
                return err(p.line, "this [Peer] has the interface's own key");
            }
            if let Some(prev) = out
                .iter()
                .position(|q: &(usize, Peer)| q.1.public_key == public_key)
            {
                return err(
                    p.line,
                    format!(
                        "duplicate peer: the same PublicKey as the [Peer] on line {}",
                        out[prev].0
                    ),
                );
            }
            for a in &p.allowed_ips {
                for (ql, q) in &out {
                    if let Some(b) = q.allowed_ips.iter().find(|b| overlaps(a, b)) {
                        return err(
                            p.line,
                            format!("AllowedIPs {a} overlaps {b} of the [Peer] on line {ql}"),
                        );
                    }
                }
            }
            out.push((
                p.line,
                Peer {
                    public_key,
                    preshared_key: p.preshared_key,
                    allowed_ips: p.allowed_ips,
                    endpoint: p.endpoint,
                    persistent_keepalive: p.persistent_keepalive,
                },
            ));
        }
        Ok(WgConf {
            interface: Interface {
                private_key,
                addresses: iface.addresses,
                listen_port: iface.listen_port,
                dns: iface.dns,
                dns_search: iface.dns_search,
                mtu: iface.mtu,
                fwmark: iface.fwmark.filter(|m| *m != 0),
                obfuscation: iface.obfs,
            },
            peers: out.into_iter().map(|(_, p)| p).collect(),
        })
    }

    /// The file text. Parsing it gives back an equal `WgConf`.
    pub fn to_text(&self) -> String {
        let i = &self.interface;
        let mut s = String::from("[Interface]\n");
        let _ = writeln!(s, "PrivateKey = {}", &*i.private_key.expose_base64());
        if !i.addresses.is_empty() {
            let _ = writeln!(s, "Address = {}", join(&i.addresses));
        }
        if let Some(p) = i.listen_port {
            let _ = writeln!(s, "ListenPort = {p}");
        }
        if !i.dns.is_empty() || !i.dns_search.is_empty() {
            let mut all: Vec<String> = i.dns.iter().map(IpAddr::to_string).collect();
            all.extend(i.dns_search.iter().cloned());
            let _ = writeln!(s, "DNS = {}", all.join(", "));
        }
        if let Some(m) = i.mtu {
            let _ = writeln!(s, "MTU = {m}");
        }
        if let Some(m) = i.fwmark {
            let _ = writeln!(s, "FwMark = {m:#x}");
        }
        for (k, v) in i.obfuscation.conf_lines() {
            let _ = writeln!(s, "{k} = {v}");
        }
        for p in &self.peers {
            let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", p.public_key);
            if let Some(psk) = &p.preshared_key {
                let _ = writeln!(s, "PresharedKey = {}", &*psk.expose_base64());
            }
            if !p.allowed_ips.is_empty() {
                let _ = writeln!(s, "AllowedIPs = {}", join(&p.allowed_ips));
            }
            if let Some(e) = &p.endpoint {
                let _ = writeln!(s, "Endpoint = {e}");
            }
            if let Some(k) = p.persistent_keepalive {
                let _ = writeln!(s, "PersistentKeepalive = {k}");
            }
        }
        s
    }
}

fn join(v: &[IpNet]) -> String {
    v.iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether two prefixes share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        SecretKey::generate().expose_base64().to_string()
    }
    fn pubkey() -> String {
        SecretKey::generate().public().to_base64()
    }

    #[test]
    fn round_trip_standard_conf() {
        let text = format!(
            "# a comment\n[Interface]\nPrivateKey = {}\nAddress = 10.77.0.2/32, fd77::2/128\nDNS = 10.77.0.1, box.lan\nMTU = 1420\n\n\
             [Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = 10.77.0.0/24\nEndpoint = box.example.org:51820\nPersistentKeepalive = 25\n\n\
             [Peer]\nPublicKey = {}\nAllowedIPs = 192.168.5.7/24\nEndpoint = [2001:db8::1]:4000\n",
            key(), pubkey(), key(), pubkey()
        );
        let c = WgConf::parse(&text).unwrap();
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(
            c.interface.dns,
            vec!["10.77.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.interface.dns_search, vec!["box.lan".to_owned()]);
        assert_eq!(c.peers.len(), 2);
        // AllowedIPs are normalised to their network, as `wg` does.
        assert_eq!(c.peers[1].allowed_ips[0].to_string(), "192.168.5.0/24");
        assert_eq!(
            c.peers[1].endpoint.as_ref().unwrap().to_string(),
            "[2001:db8::1]:4000"
        );
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        let again = WgConf::parse(&c.to_text()).unwrap();
        assert_eq!(again, c);
        assert_eq!(again.to_text(), c.to_text());
    }

    #[test]
    fn keys_are_case_insensitive_and_obfuscation_round_trips() {
        let text = format!(
            "[interface]\nprivatekey={}\nlistenport=51820\nfwmark=0xca6c\nJc = 4\nJmin = 40\nJmax = 70\nS1 = 20\nS2 = 30\nH1 = 111\nH2 = 222\nH3 = 333\nH4 = 444\n[PEER]\npublickey={}\nallowedips=0.0.0.0/0,::/0\n",
            key(),
            pubkey()
        );
        let c = WgConf::parse(&text).unwrap();
        assert_eq!(c.interface.fwmark, Some(0xca6c));
        assert_eq!(c.interface.obfuscation.h3, 333);
        assert_eq!(WgConf::parse(&c.to_text()).unwrap(), c);
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let k = key();
        let p = pubkey();
        let cases: Vec<(String, &str)> = vec![
            (format!("[Peer]\nPublicKey = {p}\n"), "no [Interface]"),
            ("[Interface]\nAddress = 10.0.0.2/32\n".into(), "line 1: [Interface] has no PrivateKey"),
            ("[Interface]\nPrivateKey = abc$\n".into(), "line 2: PrivateKey is not valid base64"),
            (
                "[Interface]\nPrivateKey = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n".into(),
                "line 2: PrivateKey is 30 bytes long",
            ),
            (format!("[Interface]\nPrivateKey = {k}\n[Peer]\nAllowedIPs = 10.0.0.0/24\n"), "line 3: [Peer] has no PublicKey"),
            (format!("[Interface]\nPrivateKey = {k}\nAddress = 10.0.0.300/24\n"), "line 3: Address: \"10.0.0.300/24\""),
            (format!("[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nAllowedIPs = 10.0.0.0/33\n"), "line 5: AllowedIPs"),
            (
                format!("[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\n[Peer]\nPublicKey = {p}\n"),
                "line 5: duplicate peer: the same PublicKey as the [Peer] on line 3",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nAllowedIPs = 10.0.0.0/24\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.0.0.9/32\n",
                    pubkey()
                ),
                "line 6: AllowedIPs 10.0.0.9/32 overlaps 10.0.0.0/24 of the [Peer] on line 3",
            ),
            (format!("[Interface]\nPrivateKey = {k}\nPostUp = rm -rf /\n"), "line 3: PostUp scripts are not supported"),
            (format!("[Interface]\nPrivateKey = {k}\nColour = blue\n"), "line 3: unknown key Colour"),
            (format!("[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nEndpoint = host\n"), "line 5: endpoint \"host\" has no :port"),
            (format!("[Interface]\nPrivateKey = {k}\nListenPort = 70000\n"), "line 3: ListenPort = \"70000\" is not a valid number"),
            (format!("[Interface]\nPrivateKey = {k}\nJc = 3\nJmin = 50\nJmax = 10\n"), "line 1: obfuscation settings"),
            (format!("[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {}\n", SecretKey::parse(&k, "k").unwrap().public()), "own key"),
            (format!("[Interface]\nPrivateKey = {k}\njunk\n"), "line 3: expected `Key = value`"),
        ];
        for (text, want) in cases {
            let e = WgConf::parse(&text).expect_err(&text).to_string();
            assert!(e.contains(want), "got {e:?}, want {want:?} for\n{text}");
        }
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!("1.2.3.4:51820".parse::<Endpoint>().unwrap().port, 51820);
        assert!("1.2.3.4:0".parse::<Endpoint>().is_err());
        assert!("[fe80::1:51820".parse::<Endpoint>().is_err());
        assert!("bad host:1".parse::<Endpoint>().is_err());
        let e: Endpoint = "127.0.0.1:9".parse().unwrap();
        assert_eq!(e.resolve().unwrap(), "127.0.0.1:9".parse().unwrap());
    }
}
