//! `secta admin vpn …` and `secta vpn up`: the WireGuard gateway from the CLI.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};
use clap::Subcommand;
use secta_wireguard::{
    alloc,
    link::PairingCode,
    profile, qr,
    store::{now_ms, Role, Store},
    uapi, WgConf, WireguardConfig,
};

#[derive(Subcommand)]
pub enum VpnCmd {
    /// Members' devices (road warriors).
    Peers {
        #[command(subcommand)]
        cmd: PeersCmd,
    },
    /// The upstream exit for hotspot traffic.
    Exit {
        #[command(subcommand)]
        cmd: ExitCmd,
    },
    /// Links to other boxes.
    Link {
        #[command(subcommand)]
        cmd: LinkCmd,
    },
    /// Interfaces, peers, last handshakes and traffic.
    Status,
    /// Print fresh random obfuscation settings for [wireguard.members] or
    /// [wireguard.links] (both ends must use the same).
    Obfuscation,
}

#[derive(Subcommand)]
pub enum PeersCmd {
    /// Add a device: makes its keys and address, prints its .conf (and QR with --qr).
    Add {
        name: String,
        /// Lifetime such as 12h, 30d (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        qr: bool,
    },
    /// List devices.
    List,
    /// Stop a device from connecting (its traffic stops within seconds).
    Disable {
        name: String,
    },
    /// Let a disabled device connect again.
    Enable {
        name: String,
    },
    /// Set or clear when a device stops working.
    Expire {
        name: String,
        /// Lifetime from now such as 12h, 30d; `never` clears it.
        when: String,
    },
    Rename {
        name: String,
        new_name: String,
    },
    /// Delete a device (its address is freed).
    Remove {
        name: String,
    },
    /// Print a device's .conf again.
    ShowConf {
        name: String,
    },
    /// A device's .conf as a QR code: in the terminal, or as --png/--svg file.
    Qr {
        name: String,
        #[arg(long)]
        png: Option<PathBuf>,
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ExitCmd {
    /// Use this .conf (from a VPS or provider; `-` reads stdin) as the exit.
    Set { file: PathBuf },
    /// Stop using the exit (routed traffic goes out the plain uplink again).
    Clear,
    /// Show the exit (without its key).
    Show,
}

#[derive(Subcommand)]
pub enum LinkCmd {
    /// Print this box's pairing code (and QR with --qr) to enter on the other box.
    Code {
        #[arg(long)]
        qr: bool,
    },
    /// Link to the box whose pairing code this is; prints this box's code for the other side.
    Pair {
        code: String,
        /// A local name for the other box.
        #[arg(long)]
        name: String,
    },
    List,
    Remove {
        name: String,
    },
}

pub struct Ctx<'a> {
    pub cfg: &'a WireguardConfig,
    pub data: &'a Path,
    /// The data key (the store is encrypted under it), None when `[vault] encrypt = false`.
    pub vault: Option<&'a secta_vault::Vault>,
    pub server_name: &'a str,
    pub parse_duration: fn(&str) -> anyhow::Result<Duration>,
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", n as f64 / 1_073_741_824.0),
    }
}

fn ago(t: Option<SystemTime>) -> String {
    match t.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        None => "never".into(),
        Some(d) if d.as_secs() < 120 => format!("{} s ago", d.as_secs()),
        Some(d) if d.as_secs() < 7200 => format!("{} min ago", d.as_secs() / 60),
        Some(d) => format!("{} h ago", d.as_secs() / 3600),
    }
}

/// What a running interface says about its peers, by public key (base64):
/// (key, last handshake, rx bytes, tx bytes, endpoint).
pub(crate) struct Live {
    pub(crate) peers: Vec<(String, Option<SystemTime>, u64, u64, Option<String>)>,
}

pub(crate) fn live(cfg: &WireguardConfig, iface: &str) -> Option<Live> {
    let lines = uapi::request(&cfg.uapi_dir, iface, "get=1\n\n").ok()?;
    let mut peers = Vec::new();
    for (k, v) in lines {
        match k.as_str() {
            "public_key" => {
                let key = secta_wireguard::PublicKey::parse_hex(&v)
                    .map(|k| k.to_base64())
                    .unwrap_or(v);
                peers.push((key, None, 0, 0, None));
            }
            "last_handshake_time_sec" => {
                if let (Some(p), Ok(s)) = (peers.last_mut(), v.parse::<u64>()) {
                    p.1 = (s > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                }
            }
            "rx_bytes" => {
                if let Some(p) = peers.last_mut() {
                    p.2 = v.parse().unwrap_or(0);
                }
            }
            "tx_bytes" => {
                if let Some(p) = peers.last_mut() {
                    p.3 = v.parse().unwrap_or(0);
                }
            }
            "endpoint" => {
                if let Some(p) = peers.last_mut() {
                    p.4 = Some(v);
                }
            }
            _ => {}
        }
    }
    Some(Live { peers })
}

fn print_conf(conf: &WgConf, with_qr: bool) -> anyhow::Result<()> {
    let text = conf.to_text();
    print!("{text}");
    if with_qr {
        println!("\n{}", qr::terminal(&text)?);
    }
    Ok(())
}

pub fn admin(ctx: &Ctx, cmd: VpnCmd) -> anyhow::Result<()> {
    let cfg = ctx.cfg;
    let problems = cfg.problems();
    if !problems.is_empty() {
        bail!("invalid [wireguard] settings: {}", problems.join("; "));
    }
    let mut store = Store::open(ctx.data, ctx.vault)?;
    let member_conf = |store: &Store, name: &str| -> anyhow::Result<WgConf> {
        let m = store.member(name)?;
        profile::member_conf(&m, &store.key(Role::Members)?.public(), cfg)
    };
    match cmd {
        VpnCmd::Peers { cmd } => match cmd {
            PeersCmd::Add {
                name,
                expires_in,
                qr,
            } => {
                if cfg.members.endpoint.is_none() {
                    bail!("set [wireguard.members] endpoint = \"HOST:PORT\" (the address members' devices dial) in the config first");
                }
                let expires = expires_in
                    .as_deref()
                    .map(ctx.parse_duration)
                    .transpose()?
                    .map(|d| now_ms() + d.as_millis() as i64);
                store.add_member(&name, cfg.members_subnet()?, expires)?;
                print_conf(&member_conf(&store, &name)?, qr)?;
                if !cfg.enabled {
                    eprintln!("note: [wireguard] enabled = false in the config; the device cannot connect until it is turned on");
                }
            }
            PeersCmd::List => {
                let now = now_ms();
                let l = live(cfg, &cfg.members.interface);
                for m in store.members()? {
                    let state = if !m.enabled {
                        "disabled".to_owned()
                    } else if m.expires_ms.is_some_and(|e| e <= now) {
                        "expired".to_owned()
                    } else if let Some(e) = m.expires_ms {
                        format!("enabled, expires in {} h", (e - now) / 3_600_000)
                    } else {
                        "enabled".to_owned()
                    };
                    let seen = l
                        .as_ref()
                        .and_then(|l| l.peers.iter().find(|p| p.0 == m.public_key.to_base64()));
                    let traffic = match seen {
                        Some(p) => format!(
                            "handshake {}\trx {}\ttx {}",
                            ago(p.1),
                            human_bytes(p.2),
                            human_bytes(p.3)
                        ),
                        None => "not connected".into(),
                    };
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        m.name, m.address, state, traffic, m.public_key
                    );
                }
            }
            PeersCmd::Disable { name } => {
                store.set_enabled(&name, false)?;
                println!("{name} disabled");
            }
            PeersCmd::Enable { name } => {
                store.set_enabled(&name, true)?;
                println!("{name} enabled");
            }
            PeersCmd::Expire { name, when } => {
                let at = if when == "never" {
                    None
                } else {
                    Some(now_ms() + (ctx.parse_duration)(&when)?.as_millis() as i64)
                };
                store.set_expiry(&name, at)?;
            }
            PeersCmd::Rename { name, new_name } => {
                store.rename(&name, &new_name)?;
            }
            PeersCmd::Remove { name } => {
                let m = store.remove(&name)?;
                println!("{name} removed ({} is free)", m.address);
            }
            PeersCmd::ShowConf { name } => print_conf(&member_conf(&store, &name)?, false)?,
            PeersCmd::Qr { name, png, svg } => {
                let text = member_conf(&store, &name)?.to_text();
                match (png, svg) {
                    (None, None) => println!("{}", qr::terminal(&text)?),
                    (p, s) => {
                        if let Some(p) = p {
                            secta_runtime::write_secret_file(&p, &qr::png(&text)?)?;
                            println!("wrote {}", p.display());
                        }
                        if let Some(s) = s {
                            secta_runtime::write_secret_file(&s, qr::svg(&text)?.as_bytes())?;
                            println!("wrote {}", s.display());
                        }
                    }
                }
            }
        },
        VpnCmd::Exit { cmd } => match cmd {
            ExitCmd::Set { file } => {
                let mut text = String::new();
                if file.as_os_str() == "-" {
                    std::io::stdin().read_to_string(&mut text)?;
                } else {
                    text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                }
                let c = store.set_exit(&text)?;
                println!(
                    "exit set: {} via {} (applies within seconds on a running box)",
                    c.interface
                        .addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.peers[0].endpoint.as_ref().expect("checked")
                );
            }
            ExitCmd::Clear => {
                if store.clear_exit()? {
                    println!("exit cleared");
                } else {
                    println!("no exit was set");
                }
            }
            ExitCmd::Show => match store.exit()? {
                None => println!("no exit set"),
                Some(c) => {
                    let p = &c.peers[0];
                    println!(
                        "exit server {} (key {})\naddress {}\ndns {}\nroutes traffic from interfaces {:?} and sources {:?}, kill switch {}",
                        p.endpoint.as_ref().expect("checked"),
                        p.public_key,
                        c.interface.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        c.interface.dns.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        cfg.exit.route_interfaces,
                        cfg.exit.route_sources,
                        if cfg.exit.kill_switch { "on" } else { "off" }
                    );
                }
            },
        },
        VpnCmd::Link { cmd } => match cmd {
            LinkCmd::Code { qr } => {
                let code = own_code(ctx, &store)?.encode();
                println!("{code}");
                if qr {
                    println!("\n{}", qr::terminal(&code)?);
                }
            }
            LinkCmd::Pair { code, name } => {
                let theirs = PairingCode::decode(&code)?;
                let own = own_code(ctx, &store)?;
                let subnet = cfg.links_subnet()?;
                if theirs.public_key == own.public_key {
                    bail!("that is this box's own pairing code");
                }
                if !subnet.contains(&theirs.address) {
                    bail!(
                        "the other box's link address {} is outside links.subnet {subnet}; both boxes need the same links.subnet",
                        theirs.address
                    );
                }
                if theirs.address == own.address {
                    bail!("both boxes drew link address {} (a rare clash): remove DATA/wireguard/links.key on one box and pair again", own.address);
                }
                if theirs.endpoint.is_none() && own.endpoint.is_none() {
                    bail!("neither box has [wireguard.links] endpoint set, so neither can reach the other; set it on the box that can be reached");
                }
                store.add_link(&theirs.to_link(&name))?;
                println!(
                    "linked to {} ({} at {}); federation goes to https://{}:{}",
                    name,
                    theirs.server_name,
                    theirs.address,
                    theirs.address,
                    theirs.federation_port
                );
                println!("enter this box's code on the other box:\n{}", own.encode());
            }
            LinkCmd::List => {
                let l = live(cfg, &cfg.links.interface);
                for k in store.links()? {
                    let seen = l
                        .as_ref()
                        .and_then(|l| l.peers.iter().find(|p| p.0 == k.public_key.to_base64()));
                    println!(
                        "{}\t{}\t{}\t{}\thandshake {}",
                        k.name,
                        k.server_name,
                        k.address,
                        k.endpoint.map_or("(dials us)".into(), |e| e.to_string()),
                        ago(seen.and_then(|p| p.1))
                    );
                }
            }
            LinkCmd::Remove { name } => {
                let l = store.remove_link(&name)?;
                println!("link to {} removed", l.server_name);
            }
        },
        VpnCmd::Status => status(ctx, &store)?,
        VpnCmd::Obfuscation => {
            let o = secta_wireguard::obfs::Obfuscation::random();
            println!(
                "obfuscation = {{ jc = {}, jmin = {}, jmax = {}, s1 = {}, s2 = {}, h1 = {}, h2 = {}, h3 = {}, h4 = {} }}",
                o.jc, o.jmin, o.jmax, o.s1, o.s2, o.h1, o.h2, o.h3, o.h4
            );
        }
    }
    Ok(())
}

fn own_code(ctx: &Ctx, store: &Store) -> anyhow::Result<PairingCode> {
    let key = store.key(Role::Links)?.public();
    Ok(PairingCode {
        public_key: key,
        address: alloc::link_address(ctx.cfg.links_subnet()?, &key),
        federation_port: ctx.cfg.links.federation_port,
        endpoint: ctx
            .cfg
            .links
            .endpoint
            .as_deref()
            .map(|e| e.parse().map_err(anyhow::Error::msg))
            .transpose()?,
        server_name: ctx.server_name.to_owned(),
    })
}

fn status(ctx: &Ctx, store: &Store) -> anyhow::Result<()> {
    let cfg = ctx.cfg;
    println!(
        "WireGuard gateway: {}",
        if cfg.enabled {
            "enabled"
        } else {
            "disabled in the config"
        }
    );
    let names: std::collections::HashMap<String, String> = store
        .members()?
        .into_iter()
        .map(|m| (m.public_key.to_base64(), m.name))
        .chain(
            store
                .links()?
                .into_iter()
                .map(|l| (l.public_key.to_base64(), format!("box {}", l.name))),
        )
        .collect();
    let mut ifaces = Vec::new();
    if cfg.members.enabled {
        ifaces.push((
            "members",
            cfg.members.interface.clone(),
            Some(store.key(Role::Members)?.public()),
        ));
    }
    if cfg.links.enabled {
        ifaces.push((
            "links",
            cfg.links.interface.clone(),
            Some(store.key(Role::Links)?.public()),
        ));
    }
    if store.exit()?.is_some() {
        ifaces.push(("exit", cfg.exit.interface.clone(), None));
    }
    for (role, iface, key) in ifaces {
        let l = live(cfg, &iface);
        println!(
            "\n{role}: {iface} {}{}",
            if l.is_some() {
                "running"
            } else {
                "not running"
            },
            key.map(|k| format!(", public key {k}")).unwrap_or_default()
        );
        for p in l.map(|l| l.peers).unwrap_or_default() {
            println!(
                "  {}\thandshake {}\trx {}\ttx {}\t{}",
                names.get(&p.0).cloned().unwrap_or_else(|| p.0.clone()),
                ago(p.1),
                human_bytes(p.2),
                human_bytes(p.3),
                p.4.unwrap_or_else(|| "(no endpoint)".into())
            );
        }
    }
    Ok(())
}

/// `secta vpn up FILE`: one interface from a .conf, until SIGTERM/SIGINT.
pub fn up(
    conf: &Path,
    interface: &str,
    uapi_dir: Option<&Path>,
    workers: usize,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
    let c = WgConf::parse(&text).with_context(|| format!("{} is refused", conf.display()))?;
    let running = secta_wireguard::iface::from_conf(
        &c,
        interface,
        workers,
        Arc::new(secta_wireguard::net::SystemNet),
        uapi_dir,
    )?;
    eprintln!(
        "{interface} up: public key {}, UDP port {}",
        running.dev.public_key(),
        running.dev.listen_port()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let (trigger, shutdown) = secta_runtime::Shutdown::new();
            tokio::spawn(trigger.on_signals());
            shutdown.wait().await;
        });
    drop(running);
    Ok(())
}

/// Federation peers reached over box links: `https://LINK-ADDRESS:PORT`.
pub fn link_peers(
    cfg: &WireguardConfig,
    data: &Path,
    vault: Option<&secta_vault::Vault>,
) -> anyhow::Result<Vec<(String, String)>> {
    if !cfg.enabled || !cfg.links.enabled {
        return Ok(Vec::new());
    }
    Ok(Store::open(data, vault)?
        .links()?
        .into_iter()
        .map(|l| {
            (
                l.server_name,
                format!("https://{}:{}", l.address, l.federation_port),
            )
        })
        .collect())
}
