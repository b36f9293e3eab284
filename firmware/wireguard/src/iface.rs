//! A running interface: the engine, its UAPI socket, and the network changes
//! made for it, undone (in reverse) when it is dropped.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{bail, Context};
use ipnet::IpNet;

use crate::{
    conf::WgConf,
    device::{Device, DeviceConfig, PeerConfig},
    net::{Net, NetOp},
    uapi::UapiServer,
};

/// Network changes that are undone (in reverse) when dropped.
pub struct Applied {
    net: Arc<dyn Net>,
    ops: Vec<NetOp>,
    nft: Option<String>,
}

impl Applied {
    pub fn new(net: Arc<dyn Net>) -> Self {
        Self {
            net,
            ops: Vec::new(),
            nft: None,
        }
    }

    pub fn apply(&mut self, op: NetOp) -> anyhow::Result<()> {
        self.net.apply(&op)?;
        self.ops.push(op);
        Ok(())
    }

    pub fn nft(&mut self, table: &str, body: &str) -> anyhow::Result<()> {
        self.net.nft_table(table, Some(body))?;
        self.nft = Some(table.to_owned());
        Ok(())
    }

    /// Takes over an nftables table made elsewhere: it is deleted when this drops.
    pub fn own_nft(&mut self, table: &str) {
        self.nft = Some(table.to_owned());
    }

    /// Leaves the changes in place (another owner took them over).
    pub fn forget(mut self) {
        self.ops.clear();
        self.nft = None;
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        if let Some(t) = self.nft.take() {
            if let Err(e) = self.net.nft_table(&t, None) {
                tracing::warn!(error = %e, "removing firewall table {t}");
            }
        }
        for op in self.ops.drain(..).rev() {
            self.net.undo(&op);
        }
    }
}

pub struct Running {
    pub dev: Arc<Device>,
    uapi: Option<UapiServer>,
    applied: Applied,
}

impl Running {
    /// Starts the engine, then applies `ops` (addresses, routes, rules) and,
    /// when given, the nftables table. Anything applied is undone on failure.
    pub fn start(
        cfg: DeviceConfig,
        ops: Vec<NetOp>,
        nft: Option<(String, String)>,
        net: Arc<dyn Net>,
        uapi_dir: Option<&Path>,
    ) -> anyhow::Result<Running> {
        let name = cfg.name.clone();
        let dev =
            Device::start(cfg).with_context(|| format!("starting WireGuard interface {name}"))?;
        let mut r = Running {
            dev: dev.clone(),
            uapi: None,
            applied: Applied::new(net),
        };
        for op in ops {
            r.applied
                .apply(op)
                .with_context(|| format!("configuring {name}"))?;
        }
        if let Some((table, body)) = nft {
            r.applied
                .nft(&table, &body)
                .with_context(|| format!("firewall rules for {name}"))?;
        }
        if let Some(dir) = uapi_dir {
            match UapiServer::start(dir, dev) {
                Ok(u) => r.uapi = Some(u),
                Err(e) => {
                    tracing::warn!(iface = %name, error = %e, "no UAPI socket (wg show will not see this interface)")
                }
            }
        }
        Ok(r)
    }

    /// Stops the engine but leaves the network changes in place (for a new
    /// owner to take over, so routed traffic is never briefly unblocked).
    pub fn stop_keeping_network(self) {
        let mut me = self;
        let net = me.applied.net.clone();
        std::mem::replace(&mut me.applied, Applied::new(net)).forget();
    }

    pub fn uapi_path(&self) -> Option<&Path> {
        self.uapi.as_ref().map(UapiServer::path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.uapi = None;
        // Network changes go first (the Applied field drops after this), then the
        // engine stops; the TUN device disappears with the last reference.
        self.dev.stop();
    }
}

/// An interface from a `.conf` file alone, as `wg-quick up` would make it:
/// its addresses, and a route for every peer's AllowedIPs.
pub fn from_conf(
    conf: &WgConf,
    name: &str,
    workers: usize,
    net: Arc<dyn Net>,
    uapi_dir: Option<&Path>,
) -> anyhow::Result<Running> {
    let i = &conf.interface;
    let mut cfg = DeviceConfig::new(name, i.private_key.clone());
    cfg.listen_port = i.listen_port.unwrap_or(0);
    cfg.fwmark = i.fwmark.unwrap_or(0);
    cfg.obfuscation = i.obfuscation;
    cfg.workers = workers;
    let mut ops = vec![NetOp::LinkUp {
        iface: name.to_owned(),
        mtu: i.mtu.unwrap_or(1420),
    }];
    for a in &i.addresses {
        ops.push(NetOp::AddrAdd {
            iface: name.to_owned(),
            addr: *a,
        });
    }
    for p in &conf.peers {
        let endpoint: Option<SocketAddr> = p
            .endpoint
            .as_ref()
            .map(|e| {
                e.resolve()
                    .with_context(|| format!("resolving endpoint {e}"))
            })
            .transpose()?;
        for a in &p.allowed_ips {
            if a.prefix_len() == 0 {
                bail!("AllowedIPs {a} (everything) is not supported here; use the .conf as the box's exit (vpn exit set)");
            }
            let covered = i.addresses.iter().any(|own| {
                own.trunc() == *a
                    || (own.prefix_len() < a.prefix_len() && own.contains(&a.network()))
            });
            if !covered {
                ops.push(NetOp::Route {
                    dest: *a,
                    iface: name.to_owned(),
                    table: None,
                });
            }
        }
        cfg.peers.push(PeerConfig {
            public_key: p.public_key,
            preshared_key: p.preshared_key.clone(),
            allowed_ips: p.allowed_ips.clone(),
            endpoint,
            persistent_keepalive: p.persistent_keepalive,
        });
    }
    Running::start(cfg, ops, None, net, uapi_dir)
}

/// `IP/prefix` of an address inside its subnet.
pub fn with_prefix(addr: std::net::Ipv4Addr, prefix: u8) -> IpNet {
    IpNet::new(addr.into(), prefix).expect("prefix ≤ 32")
}
