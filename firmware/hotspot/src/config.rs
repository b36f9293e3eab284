//! The `[hotspot]` section of the box config, validated before anything is applied.

use std::net::Ipv4Addr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HotspotConfig {
    /// Run the hotspot at all (off on machines that are not the box, e.g. the demo).
    pub enabled: bool,
    /// Wireless interface.
    pub interface: String,
    pub ssid: String,
    /// WPA passphrase; `None` for an open network (the portal still greets people).
    pub passphrase: Option<String>,
    /// WPA3-SAE alongside WPA2 (transition mode) when a passphrase is set.
    pub wpa3: bool,
    /// ISO 3166 country code (regulatory domain).
    pub country: String,
    pub channel: u8,
    pub hidden: bool,
    /// The box's address on the hotspot network and its prefix length.
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub dhcp_start: Ipv4Addr,
    pub dhcp_end: Ipv4Addr,
    /// DHCP lease time, in dnsmasq syntax (e.g. `12h`).
    pub lease_time: String,
    /// The box's own name on the hotspot (`http://secta.box/`).
    pub hostname: String,
    /// Send DHCP option 114 (RFC 8910) with the RFC 8908 API URL. Off by default: the
    /// API must be HTTPS with a certificate phones trust, which an offline box lacks.
    pub dhcp_option_114: bool,
    /// Minutes a portal acceptance lasts (0: until the box restarts).
    pub session_minutes: u64,
    /// Upstream interface for forwarding accepted clients (None: offline box).
    pub uplink: Option<String>,
    /// Tunnels accepted clients may also be forwarded into (the WireGuard
    /// exit; set by the box, not in the config file).
    #[serde(skip)]
    pub tunnel_uplinks: Vec<String>,
    /// TCP ports of the box that hotspot clients may always reach (portal, web app,
    /// radio, homeserver).
    pub web_ports: Vec<u16>,
    /// Port the portal listens on (HTTP to anywhere else is redirected there).
    pub portal_port: u16,
    /// Run and supervise hostapd (off when the Wi-Fi is managed elsewhere).
    pub run_hostapd: bool,
    /// Run and supervise dnsmasq.
    pub run_dnsmasq: bool,
}

impl Default for HotspotConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interface: "wlan0".into(),
            ssid: "Secta".into(),
            passphrase: None,
            wpa3: false,
            country: "RU".into(),
            channel: 6,
            hidden: false,
            address: Ipv4Addr::new(10, 42, 0, 1),
            prefix: 24,
            dhcp_start: Ipv4Addr::new(10, 42, 0, 50),
            dhcp_end: Ipv4Addr::new(10, 42, 0, 250),
            lease_time: "12h".into(),
            hostname: "secta.box".into(),
            dhcp_option_114: false,
            session_minutes: 12 * 60,
            uplink: None,
            tunnel_uplinks: Vec::new(),
            web_ports: vec![80, 443, 8000, 8008],
            portal_port: 80,
            run_hostapd: true,
            run_dnsmasq: true,
        }
    }
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl HotspotConfig {
    /// Every problem with the settings, in words an admin can act on. Nothing is
    /// applied unless this is empty (the old configuration stays in force).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.ssid.is_empty() || self.ssid.len() > 32 {
            p.push("SSID must be 1 to 32 bytes".to_owned());
        }
        if self.ssid.chars().any(char::is_control) {
            p.push("SSID must not contain control characters".to_owned());
        }
        if let Some(pw) = &self.passphrase {
            if pw.len() < 8 || pw.len() > 63 || !pw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                p.push("Wi-Fi password must be 8 to 63 printable ASCII characters".to_owned());
            }
        }
        if self.wpa3 && self.passphrase.is_none() {
            p.push("WPA3 needs a password".to_owned());
        }
        if self.country.len() != 2 || !self.country.bytes().all(|b| b.is_ascii_uppercase()) {
            p.push("country must be a two-letter code such as RU".to_owned());
        }
        if !(1..=14).contains(&self.channel) && !(36..=165).contains(&self.channel) {
            p.push("channel must be 1-14 (2.4 GHz) or 36-165 (5 GHz)".to_owned());
        }
        if !(8..=30).contains(&self.prefix) {
            p.push("prefix must be between 8 and 30".to_owned());
        }
        for (name, ip) in [("dhcp_start", self.dhcp_start), ("dhcp_end", self.dhcp_end)] {
            if !same_subnet(ip, self.address, self.prefix) {
                p.push(format!(
                    "{name} {ip} is outside {}/{}",
                    self.address, self.prefix
                ));
            }
            if ip == self.address {
                p.push(format!("{name} must not be the box's own address"));
            }
        }
        if u32::from(self.dhcp_start) > u32::from(self.dhcp_end) {
            p.push("dhcp_start must not be after dhcp_end".to_owned());
        }
        if !valid_name(&self.interface) {
            p.push("interface name is not valid".to_owned());
        }
        if let Some(u) = &self.uplink {
            if !valid_name(u) || u == &self.interface {
                p.push("uplink must be another valid interface".to_owned());
            }
        }
        if !self.hostname.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }) {
            p.push("hostname must be a DNS name such as secta.box".to_owned());
        }
        let lt = self.lease_time.trim_end_matches(['m', 'h', 'd']);
        if lt.is_empty() || !lt.bytes().all(|b| b.is_ascii_digit()) {
            p.push("lease_time must look like 30m, 12h or 1d".to_owned());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_settings_are_named() {
        assert!(HotspotConfig::default().problems().is_empty());
        let bad = HotspotConfig {
            ssid: "x".repeat(33),
            passphrase: Some("short".into()),
            country: "russia".into(),
            channel: 200,
            dhcp_start: "192.168.1.10".parse().unwrap(),
            interface: "wlan0; rm -rf /".into(),
            ..Default::default()
        };
        let p = bad.problems();
        assert_eq!(p.len(), 7, "{p:?}");
    }
}
