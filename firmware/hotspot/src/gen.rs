//! Configuration text for hostapd, dnsmasq and nftables, generated from a
//! validated [`HotspotConfig`]. Pure functions: tested without the programs, and
//! checked with `dnsmasq --test` / `nft -c` where those are installed.

use std::{fmt::Write, net::Ipv4Addr, path::Path};

use crate::{config::HotspotConfig, portal::PROBE_HOSTS};

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    })
}

/// `hostapd.conf`. The SSID is written as hex, so no character can break the file.
pub fn hostapd_conf(c: &HotspotConfig) -> String {
    let mut s = String::new();
    let band = if c.channel <= 14 { "g" } else { "a" };
    let _ = writeln!(s, "# Written by secta; edits are overwritten.");
    let _ = writeln!(s, "interface={}\ndriver=nl80211", c.interface);
    let _ = writeln!(s, "ssid2={}\nutf8_ssid=1", hex(&c.ssid));
    let _ = writeln!(s, "country_code={}\nieee80211d=1", c.country);
    let _ = writeln!(
        s,
        "hw_mode={band}\nchannel={}\nieee80211n=1\nwmm_enabled=1",
        c.channel
    );
    let _ = writeln!(s, "ignore_broadcast_ssid={}", u8::from(c.hidden));
    let _ = writeln!(s, "auth_algs=1");
    if let Some(pw) = &c.passphrase {
        let _ = writeln!(s, "wpa=2\nrsn_pairwise=CCMP\nwpa_passphrase={pw}");
        if c.wpa3 {
            let _ = writeln!(
                s,
                "wpa_key_mgmt=WPA-PSK SAE\nieee80211w=1\nsae_require_mfp=1"
            );
        } else {
            let _ = writeln!(s, "wpa_key_mgmt=WPA-PSK");
        }
    }
    s
}

/// `dnsmasq.conf`. Offline, every name resolves to the box (so any page leads to the
/// portal); online, only the box's own name and the OS probe hosts do.
pub fn dnsmasq_conf(
    c: &HotspotConfig,
    online: bool,
    upstream: &[Ipv4Addr],
    lease_file: &Path,
) -> String {
    let mut s = String::new();
    let box_ip = c.address;
    let _ = writeln!(s, "# Written by secta; edits are overwritten.");
    let _ = writeln!(
        s,
        "interface={}\nbind-interfaces\nlisten-address={box_ip}",
        c.interface
    );
    let _ = writeln!(
        s,
        "dhcp-range={},{},{},{}",
        c.dhcp_start,
        c.dhcp_end,
        netmask(c.prefix),
        c.lease_time
    );
    let _ = writeln!(
        s,
        "dhcp-option=option:router,{box_ip}\ndhcp-option=option:dns-server,{box_ip}"
    );
    let _ = writeln!(
        s,
        "dhcp-authoritative\ndhcp-leasefile={}",
        lease_file.display()
    );
    if c.dhcp_option_114 {
        let _ = writeln!(s, "dhcp-option=114,\"https://{}/api/captive\"", c.hostname);
    }
    let _ = writeln!(s, "domain-needed\nbogus-priv\nno-hosts\nlocal-ttl=60");
    let _ = writeln!(s, "address=/{}/{box_ip}", c.hostname);
    if online && !upstream.is_empty() {
        let _ = writeln!(s, "no-resolv");
        for u in upstream {
            let _ = writeln!(s, "server={u}");
        }
        for h in PROBE_HOSTS {
            let _ = writeln!(s, "address=/{h}/{box_ip}");
        }
    } else {
        let _ = writeln!(s, "no-resolv\naddress=/#/{box_ip}");
    }
    s
}

/// The name of the nftables table the box owns.
pub const NFT_TABLE: &str = "secta_hotspot";

/// An nftables script that atomically replaces the hotspot table: DNS, DHCP and
/// the box's web ports always; HTTP elsewhere redirected to the portal until a
/// client is accepted; forwarding only for accepted clients.
pub fn nft_ruleset(c: &HotspotConfig, accepted: &[Ipv4Addr]) -> String {
    let mut s = String::new();
    let iface = &c.interface;
    let box_ip = c.address;
    let ports: Vec<String> = c.web_ports.iter().map(u16::to_string).collect();
    let elements = if accepted.is_empty() {
        String::new()
    } else {
        format!(
            "elements = {{ {} }}",
            accepted
                .iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // Creating then deleting makes the delete succeed even on first start; the
    // whole file is applied as one transaction.
    let _ = writeln!(
        s,
        "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}"
    );
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(s, "  set accepted {{ type ipv4_addr; {elements} }}");
    let _ = writeln!(
        s,
        "  chain input {{ type filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(s, "    iifname \"{iface}\" udp dport {{ 53, 67 }} accept");
    let _ = writeln!(
        s,
        "    iifname \"{iface}\" tcp dport {{ 53, {} }} accept",
        ports.join(", ")
    );
    let _ = writeln!(s, "    iifname \"{iface}\" icmp type echo-request accept");
    let _ = writeln!(
        s,
        "    iifname \"{iface}\" ct state established,related accept"
    );
    let _ = writeln!(s, "    iifname \"{iface}\" drop\n  }}");
    let _ = writeln!(
        s,
        "  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;"
    );
    let _ = writeln!(
        s,
        "    iifname \"{iface}\" ip saddr != @accepted ip daddr != {box_ip} tcp dport 80 dnat ip to {box_ip}:{}\n  }}",
        c.portal_port
    );
    let _ = writeln!(
        s,
        "  chain forward {{ type filter hook forward priority filter; policy accept;"
    );
    match &c.uplink {
        Some(up) => {
            let _ = writeln!(
                s,
                "    iifname \"{iface}\" oifname \"{up}\" ip saddr @accepted accept"
            );
            let _ = writeln!(
                s,
                "    iifname \"{up}\" oifname \"{iface}\" ct state established,related accept"
            );
        }
        None => {}
    }
    for t in &c.tunnel_uplinks {
        let _ = writeln!(
            s,
            "    iifname \"{iface}\" oifname \"{t}\" ip saddr @accepted accept"
        );
        let _ = writeln!(
            s,
            "    iifname \"{t}\" oifname \"{iface}\" ct state established,related accept"
        );
    }
    let _ = writeln!(
        s,
        "    iifname \"{iface}\" drop\n    oifname \"{iface}\" drop\n  }}"
    );
    if let Some(up) = &c.uplink {
        let _ = writeln!(
            s,
            "  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(
            s,
            "    oifname \"{up}\" ip saddr @accepted masquerade\n  }}"
        );
    }
    let _ = writeln!(s, "}}");
    s
}

/// Removes the hotspot table (on stop).
pub fn nft_teardown() -> String {
    format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HotspotConfig {
        HotspotConfig {
            ssid: "Секта \"free\"\nwifi".into(),
            passphrase: Some("correct horse".into()),
            wpa3: true,
            uplink: Some("eth0".into()),
            dhcp_option_114: true,
            ..Default::default()
        }
    }

    #[test]
    fn hostapd_escapes_the_ssid_and_sets_security() {
        let h = hostapd_conf(&sample());
        assert!(h.contains(&format!("ssid2={}", hex("Секта \"free\"\nwifi"))));
        assert_eq!(
            h.lines().filter(|l| l.starts_with("ssid")).count(),
            1,
            "no raw SSID line: {h}"
        );
        assert!(h.contains("wpa_key_mgmt=WPA-PSK SAE") && h.contains("ieee80211w=1"));
        assert!(h.contains("country_code=RU") && h.contains("hw_mode=g"));
        let open = hostapd_conf(&HotspotConfig::default());
        assert!(!open.contains("wpa="), "open network has no WPA lines");
    }

    #[test]
    fn dnsmasq_offline_answers_everything_with_the_box() {
        let d = dnsmasq_conf(&sample(), false, &[], Path::new("/data/leases"));
        assert!(d.contains("address=/#/10.42.0.1"));
        assert!(d.contains("dhcp-range=10.42.0.50,10.42.0.250,255.255.255.0,12h"));
        assert!(d.contains("dhcp-option=114,\"https://secta.box/api/captive\""));
        let online = dnsmasq_conf(
            &sample(),
            true,
            &["1.1.1.1".parse().unwrap()],
            Path::new("/data/leases"),
        );
        assert!(!online.contains("address=/#/"));
        assert!(
            online.contains("server=1.1.1.1")
                && online.contains("address=/captive.apple.com/10.42.0.1")
        );
        let no114 = dnsmasq_conf(&HotspotConfig::default(), false, &[], Path::new("/l"));
        assert!(!no114.contains("114"));
    }

    #[test]
    fn nft_redirects_until_accepted_and_forwards_only_accepted() {
        let n = nft_ruleset(&sample(), &["10.42.0.77".parse().unwrap()]);
        assert!(n.starts_with("table inet secta_hotspot {}\ndelete table inet secta_hotspot\n"));
        assert!(n.contains("elements = { 10.42.0.77 }"));
        assert!(n.contains(
            "ip saddr != @accepted ip daddr != 10.42.0.1 tcp dport 80 dnat ip to 10.42.0.1:80"
        ));
        assert!(n.contains("oifname \"eth0\" ip saddr @accepted accept"));
        assert!(n.contains("masquerade"));
        let tunnel = nft_ruleset(
            &HotspotConfig {
                tunnel_uplinks: vec!["secta-exit".into()],
                ..sample()
            },
            &[],
        );
        assert!(tunnel.contains("oifname \"secta-exit\" ip saddr @accepted accept"));
        let offline = nft_ruleset(&HotspotConfig::default(), &[]);
        assert!(!offline.contains("masquerade") && !offline.contains("elements"));
    }

    /// Checks the generated files with the real programs when they are installed.
    #[test]
    fn real_tools_accept_the_files() {
        let dir = std::env::temp_dir().join(format!("secta-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dnsmasq = std::path::Path::new("/usr/sbin/dnsmasq");
        if dnsmasq.exists() {
            let f = dir.join("dnsmasq.conf");
            std::fs::write(
                &f,
                dnsmasq_conf(
                    &sample(),
                    true,
                    &["1.1.1.1".parse().unwrap()],
                    &dir.join("leases"),
                ),
            )
            .unwrap();
            let out = std::process::Command::new(dnsmasq)
                .arg("--test")
                .arg(format!("--conf-file={}", f.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "dnsmasq --test: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            eprintln!("SKIPPED: dnsmasq --test (dnsmasq is not installed)");
        }
        let nft = std::path::Path::new("/usr/sbin/nft");
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if nft.exists() && root {
            let f = dir.join("rules.nft");
            std::fs::write(&f, nft_ruleset(&sample(), &["10.42.0.77".parse().unwrap()])).unwrap();
            let out = std::process::Command::new(nft)
                .args(["-c", "-f"])
                .arg(&f)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stderr).contains("Operation not permitted") {
                eprintln!("SKIPPED: nft -c (no CAP_NET_ADMIN here)");
            } else {
                assert!(
                    out.status.success(),
                    "nft -c: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        } else {
            eprintln!("SKIPPED: nft -c (nft not installed or not root)");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
