//! The `[wireguard]` section of the box's config file. Everything is off by
//! default; turning it on gives a members' VPN on UDP 51820 and box links on
//! UDP 51821. The upstream exit is switched on by `secta admin vpn exit set`.

use std::{net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::obfs::Obfuscation;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireguardConfig {
    /// Run the WireGuard gateway at all.
    pub enabled: bool,
    /// Where the `wg`-compatible UAPI sockets go (`wg show` looks here).
    pub uapi_dir: PathBuf,
    /// Threads moving packets per interface (each has its own TUN queue and UDP socket).
    pub workers: usize,
    /// Handshakes per second per interface before cookie replies are demanded.
    pub handshake_rate_limit: u64,
    pub members: MembersConfig,
    pub links: LinksConfig,
    pub exit: ExitConfig,
}

impl Default for WireguardConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            uapi_dir: PathBuf::from("/var/run/wireguard"),
            workers: 2,
            handshake_rate_limit: 100,
            members: MembersConfig::default(),
            links: LinksConfig::default(),
            exit: ExitConfig::default(),
        }
    }
}

/// Members' devices (road warriors) dialling in.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembersConfig {
    pub enabled: bool,
    pub interface: String,
    pub listen_port: u16,
    /// Addresses handed to members; the box takes the first one.
    pub subnet: String,
    /// `host:port` members' devices dial (the box's public name or address).
    pub endpoint: Option<String>,
    /// Members send all their traffic through the box (AllowedIPs 0.0.0.0/0)
    /// instead of only the box's subnet.
    pub full_tunnel: bool,
    /// DNS server written into members' `.conf` files (e.g. the box's address).
    pub dns: Option<Ipv4Addr>,
    pub mtu: u16,
    pub obfuscation: Obfuscation,
}

impl Default for MembersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interface: "secta-wg".into(),
            listen_port: 51820,
            subnet: "10.77.0.0/24".into(),
            endpoint: None,
            full_tunnel: false,
            dns: None,
            mtu: 1420,
            obfuscation: Obfuscation::default(),
        }
    }
}

/// Box-to-box links (federation travels over them).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinksConfig {
    pub enabled: bool,
    pub interface: String,
    pub listen_port: u16,
    /// Link addresses: each box takes one derived from its link key.
    pub subnet: String,
    /// `host:port` other boxes dial (absent: this box is behind NAT and only dials out).
    pub endpoint: Option<String>,
    pub keepalive: u16,
    /// The federation port other boxes reach over the link (`https://LINK-ADDRESS:PORT`).
    pub federation_port: u16,
    pub mtu: u16,
    pub obfuscation: Obfuscation,
}

impl Default for LinksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interface: "secta-link".into(),
            listen_port: 51821,
            subnet: "10.78.0.0/16".into(),
            endpoint: None,
            keepalive: 25,
            federation_port: 8448,
            mtu: 1420,
            obfuscation: Obfuscation::default(),
        }
    }
}

/// The upstream exit (a `.conf` from an outside server, stored by `vpn exit set`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExitConfig {
    pub interface: String,
    /// Routing table holding the exit's default route (and the kill switch).
    pub table: u32,
    /// Mark on the tunnel's own UDP socket, so its packets never enter `table`.
    pub fwmark: u32,
    /// Priority of the first of the box's `ip rule`s.
    pub rule_priority: u32,
    /// Traffic arriving on these interfaces (the hotspot) leaves through the exit.
    pub route_interfaces: Vec<String>,
    /// Traffic from these source prefixes leaves through the exit too.
    pub route_sources: Vec<String>,
    /// When the exit is down, routed traffic is dropped (a blackhole route in
    /// `table`), never sent out the plain uplink.
    pub kill_switch: bool,
    /// Refuse IPv6 from routed interfaces (the exit carries IPv4 here).
    pub block_ipv6: bool,
    pub mtu: u16,
}

impl Default for ExitConfig {
    fn default() -> Self {
        Self {
            interface: "secta-exit".into(),
            table: 51820,
            fwmark: 0x5ec7,
            rule_priority: 10000,
            route_interfaces: vec!["wlan0".into()],
            route_sources: Vec::new(),
            kill_switch: true,
            block_ipv6: true,
            mtu: 1420,
        }
    }
}

fn iface_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl WireguardConfig {
    pub fn members_subnet(&self) -> anyhow::Result<Ipv4Net> {
        parse_subnet(&self.members.subnet, "members.subnet")
    }
    pub fn links_subnet(&self) -> anyhow::Result<Ipv4Net> {
        parse_subnet(&self.links.subnet, "links.subnet")
    }

    /// What is wrong (empty when the settings are usable).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.workers == 0 || self.workers > 64 {
            p.push(format!("workers = {} must be 1..64", self.workers));
        }
        for (what, name) in [
            ("members.interface", &self.members.interface),
            ("links.interface", &self.links.interface),
            ("exit.interface", &self.exit.interface),
        ] {
            if !iface_ok(name) {
                p.push(format!(
                    "{what} = {name:?} is not an interface name (1-15 of A-Z a-z 0-9 - _ .)"
                ));
            }
        }
        let names = [
            &self.members.interface,
            &self.links.interface,
            &self.exit.interface,
        ];
        if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
            p.push("members, links and exit need different interface names".into());
        }
        if self.members.enabled
            && self.links.enabled
            && self.members.listen_port == self.links.listen_port
            && self.members.listen_port != 0
        {
            p.push("members.listen_port and links.listen_port must differ".into());
        }
        let m = self.members_subnet();
        let l = self.links_subnet();
        for r in [&m, &l] {
            if let Err(e) = r {
                p.push(e.to_string());
            }
        }
        if let (Ok(m), Ok(l)) = (&m, &l) {
            if m.contains(&l.network()) || l.contains(&m.network()) {
                p.push(format!("members.subnet {m} overlaps links.subnet {l}"));
            }
        }
        for (what, e) in [
            ("members.endpoint", &self.members.endpoint),
            ("links.endpoint", &self.links.endpoint),
        ] {
            if let Some(e) = e {
                if let Err(why) = e.parse::<crate::conf::Endpoint>() {
                    p.push(format!("{what}: {why}"));
                }
            }
        }
        for (what, o) in [
            ("members", &self.members.obfuscation),
            ("links", &self.links.obfuscation),
        ] {
            for why in o.problems() {
                p.push(format!("{what}.obfuscation: {why}"));
            }
        }
        for s in &self.exit.route_sources {
            if crate::conf::parse_cidr(s).is_err() {
                p.push(format!("exit.route_sources: {s:?} is not IP/prefix"));
            }
        }
        for i in &self.exit.route_interfaces {
            if !iface_ok(i) {
                p.push(format!(
                    "exit.route_interfaces: {i:?} is not an interface name"
                ));
            }
        }
        if self.exit.table == 0 || self.exit.table >= 252 && self.exit.table <= 255 {
            p.push(format!(
                "exit.table = {} is a reserved routing table",
                self.exit.table
            ));
        }
        if self.exit.fwmark == 0 {
            p.push("exit.fwmark must not be 0".into());
        }
        for (what, mtu) in [
            ("members.mtu", self.members.mtu),
            ("links.mtu", self.links.mtu),
            ("exit.mtu", self.exit.mtu),
        ] {
            if !(576..=9000).contains(&mtu) {
                p.push(format!("{what} = {mtu} is outside 576..9000"));
            }
        }
        p
    }

    /// The config file text with every default (for `secta default-config`).
    pub fn default_text() -> String {
        let c = Self::default();
        format!(
            "\n[wireguard]\nenabled = {}\nuapi_dir = {:?}\nworkers = {}\nhandshake_rate_limit = {}\n\
             \n[wireguard.members]\nenabled = {}\ninterface = {:?}\nlisten_port = {}\nsubnet = {:?}\n\
             # endpoint = \"box.example.org:51820\"  (needed to hand out .conf files)\n\
             full_tunnel = {}\n# dns = \"10.77.0.1\"\nmtu = {}\n\
             # obfuscation = {{ jc = 4, jmin = 40, jmax = 70, s1 = 20, s2 = 30, h1 = 1033, h2 = 2047, h3 = 3056, h4 = 4082 }}\n\
             \n[wireguard.links]\nenabled = {}\ninterface = {:?}\nlisten_port = {}\nsubnet = {:?}\n\
             # endpoint = \"box.example.org:51821\"  (absent: this box only dials out)\n\
             keepalive = {}\nfederation_port = {}\nmtu = {}\n\
             \n[wireguard.exit]\ninterface = {:?}\ntable = {}\nfwmark = {}\nrule_priority = {}\n\
             route_interfaces = {:?}\nroute_sources = []\nkill_switch = {}\nblock_ipv6 = {}\nmtu = {}\n",
            c.enabled,
            c.uapi_dir,
            c.workers,
            c.handshake_rate_limit,
            c.members.enabled,
            c.members.interface,
            c.members.listen_port,
            c.members.subnet,
            c.members.full_tunnel,
            c.members.mtu,
            c.links.enabled,
            c.links.interface,
            c.links.listen_port,
            c.links.subnet,
            c.links.keepalive,
            c.links.federation_port,
            c.links.mtu,
            c.exit.interface,
            c.exit.table,
            c.exit.fwmark,
            c.exit.rule_priority,
            c.exit.route_interfaces,
            c.exit.kill_switch,
            c.exit.block_ipv6,
            c.exit.mtu,
        )
    }
}

fn parse_subnet(s: &str, what: &str) -> anyhow::Result<Ipv4Net> {
    let n: Ipv4Net = s
        .parse()
        .map_err(|_| anyhow::anyhow!("{what} = {s:?} is not an IPv4 prefix like 10.77.0.0/24"))?;
    if n.prefix_len() > 30 {
        anyhow::bail!("{what} = {s:?} is too small (at most /30)");
    }
    Ok(n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_off() {
        let c = WireguardConfig::default();
        assert!(!c.enabled);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let t: toml::Table = toml::from_str(&WireguardConfig::default_text()).unwrap();
        let parsed: WireguardConfig = t["wireguard"].clone().try_into().unwrap();
        assert_eq!(parsed.members.subnet, c.members.subnet);
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = WireguardConfig::default();
        c.members.interface = "a-very-long-interface-name".into();
        c.links.subnet = "10.77.0.0/16".into();
        c.members.endpoint = Some("nowhere".into());
        c.exit.table = 254;
        c.workers = 0;
        let p = c.problems().join("\n");
        for want in [
            "members.interface",
            "overlaps links.subnet",
            "members.endpoint",
            "reserved routing table",
            "workers = 0",
        ] {
            assert!(p.contains(want), "{want} missing in {p}");
        }
    }
}
