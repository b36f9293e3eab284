//! The `.conf` a member's device gets, and its QR code.

use std::net::IpAddr;

use anyhow::Context;
use ipnet::IpNet;

use crate::{
    alloc,
    conf::{Interface, Peer, WgConf},
    config::WireguardConfig,
    keys::PublicKey,
    store::Member,
};

/// The member device's `.conf`: its key and address, the box as its one peer.
pub fn member_conf(
    m: &Member,
    box_key: &PublicKey,
    cfg: &WireguardConfig,
) -> anyhow::Result<WgConf> {
    let subnet = cfg.members_subnet()?;
    let endpoint = cfg
        .members
        .endpoint
        .as_deref()
        .context(
            "set [wireguard.members] endpoint = \"HOST:PORT\" (the box's public address) first",
        )?
        .parse()
        .map_err(anyhow::Error::msg)?;
    let allowed_ips = if cfg.members.full_tunnel {
        vec!["0.0.0.0/0".parse().expect("literal")]
    } else {
        vec![IpNet::V4(subnet)]
    };
    Ok(WgConf {
        interface: Interface {
            private_key: m.private_key.clone(),
            addresses: vec![IpNet::new(IpAddr::V4(m.address), 32).expect("/32")],
            listen_port: None,
            dns: cfg.members.dns.map(IpAddr::V4).into_iter().collect(),
            dns_search: Vec::new(),
            mtu: Some(cfg.members.mtu),
            fwmark: None,
            obfuscation: cfg.members.obfuscation,
        },
        peers: vec![Peer {
            public_key: *box_key,
            preshared_key: Some(m.preshared_key.clone()),
            allowed_ips,
            endpoint: Some(endpoint),
            persistent_keepalive: Some(25),
        }],
    })
}

/// The box's address on the members' interface.
pub fn box_member_address(cfg: &WireguardConfig) -> anyhow::Result<IpNet> {
    let subnet = cfg.members_subnet()?;
    Ok(IpNet::new(IpAddr::V4(alloc::box_address(subnet)), subnet.prefix_len()).expect("prefix"))
}
