//! The gateway service: the box's interfaces built from its config and data,
//! kept in step with the database (the CLI and admin page change it while the
//! box runs; changes apply within [`SYNC_EVERY`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use ipnet::IpNet;
use secta_runtime::Shutdown;
use secta_vault::Vault;

use crate::{
    alloc,
    config::WireguardConfig,
    device::{DeviceConfig, PeerConfig},
    exit,
    iface::{with_prefix, Applied, Running},
    keys::PublicKey,
    net::{Net, NetOp},
    profile,
    store::{now_ms, Role, Store},
};

/// How often the running box re-reads members, links and the exit.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

pub struct Gateway {
    cfg: WireguardConfig,
    data: PathBuf,
    /// The box's data key: the store is encrypted under it when present.
    vault: Option<Arc<Vault>>,
    net: Arc<dyn Net>,
    members: Option<Running>,
    links: Option<Running>,
    exit: Option<(Running, String)>,
    /// The kill switch alone, while an exit is configured but not running.
    block: Option<Applied>,
    resolved: HashMap<PublicKey, (Option<SocketAddr>, Instant)>,
}

fn peer_set(dev: &crate::device::Device, want: Vec<PeerConfig>, keep_endpoints: bool) {
    let wanted: HashMap<PublicKey, PeerConfig> =
        want.into_iter().map(|p| (p.public_key, p)).collect();
    for k in dev.peer_keys() {
        if !wanted.contains_key(&k) {
            dev.remove_peer(&k);
            tracing::info!(iface = dev.name(), peer = %k.short(), "peer removed");
        }
    }
    for (k, mut p) in wanted {
        match dev.peer_config(&k) {
            Some(cur) => {
                if keep_endpoints && p.endpoint.is_none() {
                    p.endpoint = cur.endpoint;
                }
                let same = cur.allowed_ips == p.allowed_ips
                    && cur.preshared_key == p.preshared_key
                    && cur.persistent_keepalive == p.persistent_keepalive
                    && (p.endpoint.is_none() || cur.endpoint == p.endpoint);
                if !same {
                    let _ = dev.set_peer(p, false);
                }
            }
            None => {
                tracing::info!(iface = dev.name(), peer = %k.short(), "peer added");
                let _ = dev.set_peer(p, false);
            }
        }
    }
}

impl Gateway {
    /// Starts every enabled interface; its keys and peers come from the store
    /// in `data` (encrypted under `vault` when given).
    pub fn start(
        cfg: WireguardConfig,
        data: &Path,
        vault: Option<Arc<Vault>>,
        net: Arc<dyn Net>,
    ) -> anyhow::Result<Gateway> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            anyhow::bail!("invalid [wireguard] settings: {}", problems.join("; "));
        }
        let store = Store::open(data, vault.as_deref())?;
        let mut g = Gateway::idle(cfg.clone(), data, vault, net.clone());
        let uapi = Some(cfg.uapi_dir.as_path());
        // One interface of the box: its key, port, obfuscation, MTU and address.
        let iface = |name: &str, key, port, obfuscation, mtu, addr| -> anyhow::Result<Running> {
            let mut d = DeviceConfig::new(name, key);
            d.listen_port = port;
            d.obfuscation = obfuscation;
            d.workers = cfg.workers;
            d.handshake_rate_limit = cfg.handshake_rate_limit;
            let ops = vec![
                NetOp::LinkUp {
                    iface: name.to_owned(),
                    mtu,
                },
                NetOp::AddrAdd {
                    iface: name.to_owned(),
                    addr,
                },
            ];
            Running::start(d, ops, None, net.clone(), uapi)
        };
        if cfg.members.enabled {
            let m = &cfg.members;
            g.members = Some(iface(
                &m.interface,
                store.key(Role::Members)?,
                m.listen_port,
                m.obfuscation,
                m.mtu,
                profile::box_member_address(&cfg)?,
            )?);
        }
        if cfg.links.enabled {
            let l = &cfg.links;
            let key = store.key(Role::Links)?;
            let subnet = cfg.links_subnet()?;
            let own = alloc::link_address(subnet, &key.public());
            g.links = Some(iface(
                &l.interface,
                key,
                l.listen_port,
                l.obfuscation,
                l.mtu,
                with_prefix(own, subnet.prefix_len()),
            )?);
        }
        // A failing exit keeps the kill switch; it must not stop the members' VPN.
        if let Err(e) = g.sync(&store) {
            tracing::error!(error = %format!("{e:#}"), "WireGuard sync failed");
        }
        Ok(g)
    }

    /// No interfaces, nothing applied yet.
    fn idle(
        cfg: WireguardConfig,
        data: &Path,
        vault: Option<Arc<Vault>>,
        net: Arc<dyn Net>,
    ) -> Gateway {
        Gateway {
            cfg,
            data: data.to_owned(),
            vault,
            net,
            members: None,
            links: None,
            exit: None,
            block: None,
            resolved: HashMap::new(),
        }
    }

    /// For a box that cannot read its store (its data key is missing) while an
    /// exit is set: the kill switch alone, so routed traffic is dropped rather
    /// than sent out the plain uplink. None when no exit is set or the kill
    /// switch is off. Dropping it removes the kill switch.
    pub fn kill_switch_only(
        cfg: WireguardConfig,
        data: &Path,
        net: Arc<dyn Net>,
    ) -> anyhow::Result<Option<Gateway>> {
        if !Store::exit_is_set(data) || !cfg.exit.kill_switch {
            return Ok(None);
        }
        let mut g = Gateway::idle(cfg, data, None, net);
        g.block_with(&[])?;
        Ok(Some(g))
    }

    /// Brings the interfaces in line with the database and the exit file.
    pub fn sync(&mut self, store: &Store) -> anyhow::Result<()> {
        if let Some(m) = &self.members {
            let now = now_ms();
            let want = store
                .members()?
                .into_iter()
                .filter(|m| m.active(now))
                .map(|m| PeerConfig {
                    public_key: m.public_key,
                    preshared_key: Some(m.preshared_key),
                    allowed_ips: vec![IpNet::from(std::net::IpAddr::V4(m.address))],
                    endpoint: None,
                    persistent_keepalive: None,
                })
                .collect();
            peer_set(&m.dev, want, true);
        }
        if let Some(l) = &self.links {
            let mut want = Vec::new();
            for link in store.links()? {
                // Resolve names when first seen, and again each minute while the
                // link has had no handshake for three minutes.
                let stale = l.dev.peers().iter().any(|p| {
                    p.public_key == link.public_key
                        && p.last_handshake.is_none_or(|t| {
                            SystemTime::now().duration_since(t).unwrap_or_default()
                                > Duration::from_secs(180)
                        })
                });
                let entry = self.resolved.get(&link.public_key).copied();
                let endpoint = match (entry, &link.endpoint) {
                    (_, None) => None,
                    (Some((a, at)), Some(_))
                        if !stale || at.elapsed() < Duration::from_secs(60) =>
                    {
                        a
                    }
                    (_, Some(e)) => {
                        let a = e.resolve().ok();
                        if a.is_none() {
                            tracing::warn!(link = %link.name, endpoint = %e, "cannot resolve the link's endpoint");
                        }
                        self.resolved.insert(link.public_key, (a, Instant::now()));
                        a
                    }
                };
                want.push(PeerConfig {
                    public_key: link.public_key,
                    preshared_key: None,
                    allowed_ips: vec![IpNet::from(std::net::IpAddr::V4(link.address))],
                    endpoint,
                    persistent_keepalive: Some(self.cfg.links.keepalive).filter(|k| *k > 0),
                });
            }
            peer_set(&l.dev, want, true);
        }
        let text = match store.exit_text() {
            Ok(t) => t.map(|t| t.to_string()),
            Err(e) => {
                // Unreadable (e.g. it does not decrypt): keep what runs, and
                // block routed traffic if no exit does.
                if self.exit.is_none() {
                    if let Err(b) = self.block_routed(store) {
                        tracing::warn!(error = %format!("{b:#}"), "kill switch");
                    }
                }
                return Err(e.context("the upstream exit's .conf cannot be read"));
            }
        };
        let current = self.exit.as_ref().map(|(_, t)| t.clone());
        if text != current {
            if let Some((old, _)) = self.exit.take() {
                // The rules and the blackhole stay; the kill switch takes them over.
                old.stop_keeping_network();
                if let Err(e) = self.block_routed(store) {
                    tracing::warn!(error = %format!("{e:#}"), "kill switch");
                }
                tracing::info!("upstream exit stopped");
            }
            match text {
                None => {
                    if self.block.take().is_some() {
                        tracing::info!(
                            "upstream exit cleared: routed traffic uses the plain uplink again"
                        );
                    }
                }
                Some(t) => match self.start_exit(store) {
                    Ok(r) => {
                        tracing::info!(iface = %self.cfg.exit.interface, "upstream exit up");
                        if let Some(b) = self.block.take() {
                            b.forget();
                        }
                        self.exit = Some((r, t));
                    }
                    Err(e) => {
                        if let Err(b) = self.block_routed(store) {
                            tracing::warn!(error = %format!("{b:#}"), "kill switch");
                        }
                        return Err(e.context(
                            "the upstream exit could not start (routed traffic is blocked while the kill switch is on)",
                        ));
                    }
                },
            }
        }
        Ok(())
    }

    /// Installs the kill switch alone (once).
    fn block_routed(&mut self, store: &Store) -> anyhow::Result<()> {
        if self.block.is_some() || !self.cfg.exit.kill_switch {
            return Ok(());
        }
        let dns = store
            .exit()
            .ok()
            .flatten()
            .map(|c| c.interface.dns)
            .unwrap_or_default();
        self.block_with(&dns)
    }

    fn block_with(&mut self, dns: &[std::net::IpAddr]) -> anyhow::Result<()> {
        let mut a = Applied::new(self.net.clone());
        a.own_nft(exit::NFT_TABLE);
        for op in exit::routing(&self.cfg.exit, dns)? {
            a.apply(op)?;
        }
        self.block = Some(a);
        Ok(())
    }

    fn start_exit(&self, store: &Store) -> anyhow::Result<Running> {
        let conf = store.exit()?.context("exit.conf vanished")?;
        let (dev, ops, nft) = exit::plan(&conf, &self.cfg.exit, self.cfg.workers)?;
        Running::start(
            dev,
            ops,
            Some((exit::NFT_TABLE.to_owned(), nft)),
            self.net.clone(),
            Some(&self.cfg.uapi_dir),
        )
    }

    pub fn members(&self) -> Option<&Running> {
        self.members.as_ref()
    }
    pub fn links(&self) -> Option<&Running> {
        self.links.as_ref()
    }
    pub fn exit(&self) -> Option<&Running> {
        self.exit.as_ref().map(|(r, _)| r)
    }
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

/// Runs the gateway until shutdown (the `serve` entry of this service).
pub async fn serve(
    cfg: WireguardConfig,
    data: PathBuf,
    vault: Option<Arc<Vault>>,
    net: Arc<dyn Net>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let d = data.clone();
    let gw = tokio::task::spawn_blocking(move || Gateway::start(cfg, &d, vault, net)).await??;
    run(gw, shutdown).await
}

/// Keeps a started gateway in step with the database until shutdown, then
/// takes it down. (Start it with [`Gateway::start`] before anything forwards
/// traffic, so the exit's rules are in place first.)
pub async fn run(gw: Gateway, shutdown: Shutdown) -> anyhow::Result<()> {
    let (data, vault) = (gw.data.clone(), gw.vault.clone());
    let gw = Arc::new(parking_lot::Mutex::new(gw));
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = shutdown.clone().wait() => break,
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        let g = gw.clone();
        let (d, v) = (data.clone(), vault.clone());
        let r = tokio::task::spawn_blocking(move || {
            let store = Store::open(&d, v.as_deref())?;
            g.lock().sync(&store)
        })
        .await?;
        match r {
            Ok(()) => last_error.clear(),
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::error!(error = %msg, "WireGuard sync failed");
                    last_error = msg;
                }
            }
        }
    }
    tokio::task::spawn_blocking(move || drop(gw)).await?;
    tracing::info!("WireGuard gateway stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::SimNet;

    #[test]
    fn an_exit_that_cannot_be_read_still_gets_its_kill_switch() {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(SimNet::default());
        let cfg = WireguardConfig::default();
        assert!(
            Gateway::kill_switch_only(cfg.clone(), dir.path(), net.clone())
                .unwrap()
                .is_none()
        );
        // Sealed under a key this box cannot open: its bytes are not read.
        std::fs::create_dir_all(dir.path().join("wireguard")).unwrap();
        std::fs::write(dir.path().join("wireguard/exit.conf"), b"SECTAF01...").unwrap();
        let g = Gateway::kill_switch_only(cfg, dir.path(), net.clone())
            .unwrap()
            .expect("an exit is set");
        let blackhole = |ops: &[NetOp]| ops.iter().any(|o| matches!(o, NetOp::Blackhole { .. }));
        assert!(blackhole(&net.ops.lock()));
        assert!(!blackhole(&net.undone.lock()));
        drop(g);
        assert!(blackhole(&net.undone.lock()), "removed when the box stops");
    }
}
