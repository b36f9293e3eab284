//! The upstream exit: chosen traffic (by default what arrives from the
//! hotspot) leaves through a WireGuard server outside, by policy routing.
//!
//! - The exit's default route lives in its own table (`exit.table`); rules send
//!   the routed interfaces and sources there.
//! - The tunnel's own UDP socket carries `exit.fwmark`, and a rule of higher
//!   priority sends marked packets to the main table, so the tunnel never
//!   routes itself into itself.
//! - Kill switch: the table also holds a blackhole default route of the
//!   worst metric. When the tunnel interface goes away (the box's engine
//!   stops or crashes) the blackhole is all that is left, so routed traffic is
//!   dropped, never sent out the plain uplink. When the exit server stops
//!   answering, packets still go into the tunnel and die there.
//! - IPv6 from routed interfaces is refused (`prohibit` rules): the exit
//!   carries IPv4, and IPv6 would otherwise leave directly.
//! - DNS: the box's resolver reaches the exit's DNS servers (the `.conf`'s
//!   `DNS =`) only through the table; clients' own DNS traffic is routed like
//!   the rest of theirs.
//! - Loose reverse-path filtering (`rp_filter = 2`), since answers arrive on
//!   the tunnel interface for addresses routed elsewhere in the main table.
//! - Routed traffic is masqueraded to the box's tunnel address.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::Context;
use ipnet::IpNet;

use crate::{
    conf::{parse_cidr, WgConf},
    config::ExitConfig,
    device::{DeviceConfig, PeerConfig},
    net::{NetOp, Rule, RuleAction},
    store::check_exit,
};

/// The nftables table of the exit (family inet).
pub const NFT_TABLE: &str = "secta_wg_exit";

/// What to start for an exit `.conf`: the engine, the network changes, the nftables table body.
pub fn plan(
    conf: &WgConf,
    cfg: &ExitConfig,
    workers: usize,
) -> anyhow::Result<(DeviceConfig, Vec<NetOp>, String)> {
    check_exit(conf)?;
    let iface = cfg.interface.clone();
    let i = &conf.interface;
    let p = &conf.peers[0];
    let endpoint = p
        .endpoint
        .as_ref()
        .expect("checked")
        .resolve()
        .with_context(|| "resolving the exit's Endpoint")?;
    let mut dev = DeviceConfig::new(&iface, i.private_key.clone());
    dev.listen_port = i.listen_port.unwrap_or(0);
    dev.fwmark = cfg.fwmark;
    dev.obfuscation = i.obfuscation;
    dev.workers = workers;
    dev.peers.push(PeerConfig {
        public_key: p.public_key,
        preshared_key: p.preshared_key.clone(),
        allowed_ips: p.allowed_ips.clone(),
        endpoint: Some(endpoint),
        persistent_keepalive: p.persistent_keepalive.or(Some(25)),
    });
    let any4: IpNet = "0.0.0.0/0".parse().expect("literal");
    let mut ops = vec![NetOp::LinkUp {
        iface: iface.clone(),
        mtu: i.mtu.unwrap_or(cfg.mtu),
    }];
    for a in i.addresses.iter().filter(|a| a.addr().is_ipv4()) {
        ops.push(NetOp::AddrAdd {
            iface: iface.clone(),
            addr: *a,
        });
    }
    ops.push(NetOp::Route {
        dest: any4,
        iface: iface.clone(),
        table: Some(cfg.table),
    });
    ops.push(NetOp::Sysctl {
        key: format!("net.ipv4.conf.{iface}.rp_filter"),
        value: "2".into(),
    });
    ops.extend(routing(cfg, &i.dns)?);
    let mut nft = String::new();
    let _ = writeln!(
        nft,
        "  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{iface}\" masquerade\n  }}"
    );
    // Clamp TCP MSS to the tunnel's MTU so clients with 1500-byte links work.
    let _ = writeln!(
        nft,
        "  chain forward {{ type filter hook forward priority mangle; policy accept;\n    oifname \"{iface}\" tcp flags syn tcp option maxseg size set rt mtu\n  }}"
    );
    Ok((dev, ops, nft))
}

/// The policy routing without the tunnel: the rules into the exit's table, the
/// kill switch, IPv6 refusal and sysctls. Alone (when an exit is configured but
/// cannot start) it blocks routed traffic instead of letting it out directly.
pub fn routing(cfg: &ExitConfig, dns: &[IpAddr]) -> anyhow::Result<Vec<NetOp>> {
    let any4: IpNet = "0.0.0.0/0".parse().expect("literal");
    let mut ops = Vec::new();
    if cfg.kill_switch {
        ops.push(NetOp::Blackhole {
            dest: any4,
            table: cfg.table,
        });
    }
    let rule = |v6: bool, prio: u32| Rule {
        v6,
        priority: prio,
        from: None,
        to: None,
        iif: None,
        fwmark: None,
        action: RuleAction::Lookup(cfg.table),
    };
    let prio = cfg.rule_priority;
    ops.push(NetOp::Rule(Rule {
        fwmark: Some(cfg.fwmark),
        action: RuleAction::Lookup(254),
        ..rule(false, prio)
    }));
    for name in &cfg.route_interfaces {
        ops.push(NetOp::Rule(Rule {
            iif: Some(name.clone()),
            ..rule(false, prio + 1)
        }));
        if cfg.block_ipv6 {
            ops.push(NetOp::Rule(Rule {
                iif: Some(name.clone()),
                action: RuleAction::Prohibit,
                ..rule(true, prio + 1)
            }));
        }
    }
    for s in &cfg.route_sources {
        let n = parse_cidr(s).map_err(anyhow::Error::msg)?.trunc();
        match n {
            IpNet::V4(_) => ops.push(NetOp::Rule(Rule {
                from: Some(n),
                ..rule(false, prio + 1)
            })),
            IpNet::V6(_) if cfg.block_ipv6 => ops.push(NetOp::Rule(Rule {
                from: Some(n),
                action: RuleAction::Prohibit,
                ..rule(true, prio + 1)
            })),
            IpNet::V6(_) => {}
        }
    }
    for d in dns {
        if let IpAddr::V4(_) = d {
            ops.push(NetOp::Rule(Rule {
                to: Some(IpNet::from(*d)),
                ..rule(false, prio + 1)
            }));
        }
    }
    ops.push(NetOp::Sysctl {
        key: "net.ipv4.conf.all.rp_filter".into(),
        value: "2".into(),
    });
    ops.push(NetOp::Sysctl {
        key: "net.ipv4.ip_forward".into(),
        value: "1".into(),
    });
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn the_plan_routes_marks_and_kills() {
        let conf = WgConf::parse(&format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.2.0.2/32\nDNS = 10.2.0.1\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = 127.0.0.1:51820\n",
            &*SecretKey::generate().expose_base64(),
            SecretKey::generate().public()
        ))
        .unwrap();
        let cfg = ExitConfig {
            route_sources: vec!["10.42.0.0/24".into()],
            ..Default::default()
        };
        let (dev, ops, nft) = plan(&conf, &cfg, 2).unwrap();
        assert_eq!(dev.fwmark, cfg.fwmark);
        assert_eq!(dev.peers[0].persistent_keepalive, Some(25));
        let text: Vec<String> = ops.iter().map(ToString::to_string).collect();
        let all = text.join("\n");
        for want in [
            "ip -4 route replace 0.0.0.0/0 dev secta-exit table 51820",
            "ip -4 route replace blackhole 0.0.0.0/0 table 51820",
            "ip -4 rule add priority 10000 fwmark 0x5ec7 lookup 254",
            "ip -4 rule add priority 10001 iif wlan0 lookup 51820",
            "ip -6 rule add priority 10001 iif wlan0 prohibit",
            "ip -4 rule add priority 10001 from 10.42.0.0/24 lookup 51820",
            "ip -4 rule add priority 10001 to 10.2.0.1/32 lookup 51820",
            "sysctl net.ipv4.conf.all.rp_filter=2",
            "sysctl net.ipv4.conf.secta-exit.rp_filter=2",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        // The fwmark rule comes before the routing rules.
        let mark = text.iter().position(|t| t.contains("fwmark")).unwrap();
        let iif = text.iter().position(|t| t.contains("iif wlan0")).unwrap();
        assert!(mark < iif);
        assert!(nft.contains("oifname \"secta-exit\" masquerade"));
        let off = ExitConfig {
            kill_switch: false,
            block_ipv6: false,
            ..Default::default()
        };
        let (_, ops, _) = plan(&conf, &off, 1).unwrap();
        assert!(!ops.iter().any(|o| matches!(o, NetOp::Blackhole { .. })));
        assert!(!ops.iter().any(|o| o.to_string().contains("prohibit")));
    }
}
