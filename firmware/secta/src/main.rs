//! `secta`: runs the box (every enabled service on one tokio runtime) and administers it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use secta_homeserver::{HomeserverConfig, Hs};
use secta_runtime::{BoxConfig, ConfigFile, Shutdown};

mod firstboot;
mod panel;
mod radio_bot;
mod vpn;
mod webadmin;

/// Settings changed on the admin pages, in the data directory, laid over the
/// config file at every start (the config file itself may be read-only).
pub(crate) const SETTINGS_FILE: &str = "settings.toml";

#[derive(Parser)]
#[command(name = "secta", version, about = "Secta community box")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the box with a config file.
    Run {
        #[arg(
            long,
            short,
            default_value = "/etc/secta/secta.toml",
            env = "SECTA_CONFIG"
        )]
        config: PathBuf,
    },
    /// Run the box on this computer: data in DIR, homeserver on HOST:PORT.
    Demo {
        #[arg(long, default_value = "demo-data")]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8008")]
        listen: SocketAddr,
        /// Matrix server name; defaults to the listen address.
        #[arg(long)]
        server_name: Option<String>,
        /// A federation peer reachable without DNS: `SERVER_NAME=URL` (repeatable),
        /// e.g. `127.0.0.1:8009=http://127.0.0.1:8009`.
        #[arg(long = "peer")]
        peers: Vec<String>,
        /// Also serve federation over TLS (self-signed certificate) on this address.
        #[arg(long)]
        federation_tls_listen: Option<SocketAddr>,
        /// The captive portal's address (its firewall is simulated in the demo).
        #[arg(long, default_value = "127.0.0.1:8080")]
        portal_listen: SocketAddr,
        /// The radio's address (Icecast sources and listeners).
        #[arg(long, default_value = "127.0.0.1:8000")]
        radio_listen: SocketAddr,
        /// The panel's HTTP endpoint (virtual strip and buttons; duress wipe).
        #[arg(long, default_value = "127.0.0.1:8090")]
        panel_listen: SocketAddr,
    },
    /// Administer the box (works while it runs).
    Admin {
        #[arg(long, short, conflicts_with = "data")]
        config: Option<PathBuf>,
        /// The data directory (reads DIR/secta.toml when present).
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Print a config file with every default.
    DefaultConfig,
    /// First boot: apply the pre-seed file from the boot partition once (run by
    /// the box's init before `run`); without a usable one the box starts in setup.
    Firstboot {
        /// Where the FAT boot partition is mounted (read-write).
        #[arg(long, default_value = "/boot")]
        boot: PathBuf,
        /// The config file to write (on the data partition).
        #[arg(long, default_value = "/data/secta.toml")]
        config: PathBuf,
        /// The image's default config the pre-seed is applied to.
        #[arg(long, default_value = "/etc/secta/secta.toml")]
        template: PathBuf,
    },
    /// Print the hostapd, dnsmasq or nftables configuration the box would apply.
    HotspotConfig {
        #[arg(
            long,
            short,
            default_value = "/etc/secta/secta.toml",
            env = "SECTA_CONFIG"
        )]
        config: PathBuf,
        /// hostapd, dnsmasq (offline) or nft.
        what: String,
    },
    /// Run a WireGuard tunnel from a .conf (the box's engine, like `wg-quick up`).
    Vpn {
        #[command(subcommand)]
        cmd: VpnTopCmd,
    },
}

#[derive(Subcommand)]
enum VpnTopCmd {
    /// Bring up one interface from a .conf file and keep it until SIGTERM/SIGINT.
    Up {
        conf: PathBuf,
        /// The TUN interface name.
        #[arg(long, default_value = "wg0")]
        interface: String,
        /// Where the `wg`-compatible UAPI socket goes.
        #[arg(long, default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage invite (registration) tokens.
    Invite {
        #[command(subcommand)]
        cmd: InviteCmd,
    },
    /// Federation peers: queue depth, last success, last error; block or unblock a server.
    Federation {
        #[command(subcommand)]
        cmd: Option<FedCmd>,
    },
    /// The WireGuard gateway: members' devices, the upstream exit, box links, status.
    Vpn {
        #[command(subcommand)]
        cmd: vpn::VpnCmd,
    },
    /// Print the radio's source password (user `source`), the one from the
    /// config or the generated one kept encrypted in DATA/radio/source_password.
    RadioPassword,
    /// PANIC WIPE: destroy the data key, then every data file; the box returns
    /// to its first-boot state. A running box stops its services and shows "wiped".
    Wipe {
        /// Required: there is no undo.
        #[arg(long)]
        yes: bool,
    },
    /// Data at rest: whether it is encrypted, where the key lives, what a wipe
    /// would destroy (never prints the key).
    Audit {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FedCmd {
    /// Show peers (the default).
    Status,
    /// Stop talking to a server: nothing is sent to it or accepted from it.
    Block { server: String },
    /// Talk to a blocked server again.
    Unblock { server: String },
    /// Replace the signing key (stop the box first; the old key stays published).
    RotateKey,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user (a random password is generated and printed if none is given).
    Create {
        username: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
    /// Set a new password (printed if generated) and log the user out everywhere.
    ResetPassword {
        username: String,
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Subcommand)]
enum InviteCmd {
    /// Create a token; prints it alone on the first line.
    Create {
        /// How many registrations it allows (default 1; 0 = unlimited).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime such as 30m, 12h, 7d (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List tokens.
    List,
    /// Revoke a token.
    Revoke { token: String },
}

/// The whole config of one box.
struct BoxSetup {
    boxcfg: BoxConfig,
    hs: HomeserverConfig,
    hotspot: secta_hotspot::HotspotConfig,
    radio: secta_radio::RadioConfig,
    wireguard: secta_wireguard::WireguardConfig,
    panel: secta_panel::PanelConfig,
    vault: secta_vault::VaultConfig,
    /// The panel's HTTP endpoint (demo: the web app's virtual panel).
    panel_listen: Option<SocketAddr>,
    /// Where the captive portal listens (demo: loopback, firewall simulated).
    portal: Option<(SocketAddr, bool)>,
    /// The built web app the portal serves.
    web_ui: Option<PathBuf>,
}

fn load_setup(file: &ConfigFile) -> anyhow::Result<BoxSetup> {
    let boxcfg: BoxConfig = file.section("box")?;
    let path = boxcfg.data_dir.join(SETTINGS_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut merged = file.clone();
        match ConfigFile::parse(&text).map(|o| merged.overlay(&o)) {
            Ok(()) => match load_setup_from(&merged) {
                Ok(s) => return Ok(s),
                Err(e) => eprintln!(
                    "warning: ignoring {} (the admin pages' settings): {e:#}",
                    path.display()
                ),
            },
            Err(e) => eprintln!("warning: ignoring {}: {e:#}", path.display()),
        }
    }
    load_setup_from(file)
}

fn load_setup_from(file: &ConfigFile) -> anyhow::Result<BoxSetup> {
    let hotspot: secta_hotspot::HotspotConfig = file.section("hotspot")?;
    let problems = hotspot.problems();
    if !problems.is_empty() {
        bail!("invalid [hotspot] settings: {}", problems.join("; "));
    }
    let portal = hotspot
        .enabled
        .then(|| (SocketAddr::from(([0, 0, 0, 0], hotspot.portal_port)), false));
    let radio: secta_radio::RadioConfig = file.section("radio")?;
    let problems = radio.problems();
    if !problems.is_empty() {
        bail!("invalid [radio] settings: {}", problems.join("; "));
    }
    let wireguard: secta_wireguard::WireguardConfig = file.section("wireguard")?;
    let problems = wireguard.problems();
    if !problems.is_empty() {
        bail!("invalid [wireguard] settings: {}", problems.join("; "));
    }
    let mut hotspot = hotspot;
    if wireguard.enabled {
        // Accepted hotspot clients may be routed into the exit (when one is set).
        hotspot
            .tunnel_uplinks
            .push(wireguard.exit.interface.clone());
    }
    let panel: secta_panel::PanelConfig = file.section("panel")?;
    let problems = panel.problems();
    if !problems.is_empty() {
        bail!("invalid [panel] settings: {}", problems.join("; "));
    }
    let vault: secta_vault::VaultConfig = file.section("vault")?;
    let problems = vault.problems();
    if !problems.is_empty() {
        bail!("invalid [vault] settings: {}", problems.join("; "));
    }
    let panel_listen = panel
        .http_listen
        .as_deref()
        .map(|a| {
            a.parse()
                .with_context(|| format!("bad [panel] http_listen {a:?}"))
        })
        .transpose()?;
    let boxcfg: BoxConfig = file.section("box")?;
    let web_ui = Some(boxcfg.web_ui_dir.clone()).filter(|d| d.join("index.html").exists());
    Ok(BoxSetup {
        boxcfg,
        hs: file.section("homeserver")?,
        hotspot,
        radio,
        wireguard,
        panel,
        vault,
        panel_listen,
        portal,
        web_ui,
    })
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => {
            let file = ConfigFile::load(&config)?;
            let setup = load_setup(&file)?;
            secta_runtime::init_logging(&setup.boxcfg.log, setup.boxcfg.log_json);
            run_box(setup, None)
        }
        Cmd::Demo {
            data,
            listen,
            server_name,
            peers,
            federation_tls_listen,
            portal_listen,
            radio_listen,
            panel_listen,
        } => demo(
            &data,
            listen,
            server_name,
            &peers,
            federation_tls_listen,
            (portal_listen, radio_listen, panel_listen),
        ),
        Cmd::Admin { config, data, cmd } => {
            secta_runtime::init_logging("warn", false);
            let setup = match (config, data) {
                (Some(c), _) => load_setup(&ConfigFile::load(&c)?)?,
                (None, Some(d)) => {
                    let f = d.join("secta.toml");
                    let mut s = if f.exists() {
                        load_setup(&ConfigFile::load(&f)?)?
                    } else {
                        load_setup(&ConfigFile::default())?
                    };
                    s.boxcfg.data_dir = d;
                    s
                }
                (None, None) => load_setup(&ConfigFile::load(Path::new("/etc/secta/secta.toml"))?)?,
            };
            let dir = setup.boxcfg.data_dir.clone();
            match cmd {
                AdminCmd::Wipe { yes } => return admin_wipe(&setup.vault, &dir, yes),
                AdminCmd::Audit { json } => return admin_audit(&setup.vault, &dir, json),
                _ => {}
            }
            if dir.join(secta_vault::wipe::WIPE_MARKER).exists() {
                bail!("{} is being wiped; start the box (or `secta admin wipe --yes` again) to finish", dir.display());
            }
            let vault = secta_vault::Vault::open(&setup.vault, &dir)?;
            if let AdminCmd::Vpn { cmd } = cmd {
                return vpn::admin(
                    &vpn::Ctx {
                        cfg: &setup.wireguard,
                        data: &setup.boxcfg.data_dir,
                        vault: vault.as_deref(),
                        server_name: &setup.hs.server_name,
                        parse_duration,
                    },
                    cmd,
                );
            }
            if let AdminCmd::RadioPassword = cmd {
                let radio = secta_radio::Radio::new_with_vault(setup.radio, &dir, vault)?;
                println!("{}", radio.source_password());
                return Ok(());
            }
            if let AdminCmd::Federation {
                cmd: Some(FedCmd::RotateKey),
            } = cmd
            {
                let id = secta_homeserver::rotate_signing_key(&dir, vault.as_deref())?;
                println!("new signing key {id}; start the box to use it");
                return Ok(());
            }
            let hs = Hs::open_with_vault(setup.hs, &dir, vault)?;
            admin(&hs, cmd)
        }
        Cmd::HotspotConfig { config, what } => {
            let setup = load_setup(&ConfigFile::load(&config)?)?;
            let text = match what.as_str() {
                "hostapd" => secta_hotspot::gen::hostapd_conf(&setup.hotspot),
                "dnsmasq" => secta_hotspot::gen::dnsmasq_conf(
                    &setup.hotspot,
                    false,
                    &[],
                    &setup.boxcfg.data_dir.join("dnsmasq.leases"),
                ),
                "nft" => secta_hotspot::gen::nft_ruleset(&setup.hotspot, &[]),
                _ => bail!("say hostapd, dnsmasq or nft"),
            };
            print!("{text}");
            Ok(())
        }
        Cmd::DefaultConfig => {
            print!("{}", default_config_text());
            Ok(())
        }
        Cmd::Firstboot {
            boot,
            config,
            template,
        } => {
            secta_runtime::init_logging("info", false);
            match firstboot::run(&boot, &config, Some(&template), &default_config_text())? {
                firstboot::Outcome::Applied { admin } => {
                    println!("secta firstboot: settings applied, admin {admin}")
                }
                firstboot::Outcome::AlreadyDone { removed_preseed } => println!(
                    "secta firstboot: already set up{}",
                    if removed_preseed {
                        " (a new pre-seed file was removed unapplied)"
                    } else {
                        ""
                    }
                ),
                firstboot::Outcome::NeedsSetup { reasons } => println!(
                    "secta firstboot: NOT SET UP, starting in first-boot setup: {}",
                    reasons.join("; ")
                ),
            }
            Ok(())
        }
        Cmd::Vpn {
            cmd:
                VpnTopCmd::Up {
                    conf,
                    interface,
                    uapi_dir,
                    workers,
                },
        } => {
            secta_runtime::init_logging("info", false);
            vpn::up(&conf, &interface, Some(&uapi_dir), workers)
        }
    }
}

fn default_config_text() -> String {
    let hs = HomeserverConfig::default();
    let b = BoxConfig::default();
    let mut text = format!(
        "# Secta box configuration. Every key is optional; these are the defaults.\n\
         [box]\ndata_dir = {:?}\nname = {:?}\nlog = {:?}\nlog_json = {}\n\n\
         [homeserver]\nserver_name = {:?}\nlisten = {:?}\n# public_base_url = \"https://box.example\"\n\
         open_registration = {}\n# refuse weak passwords at /register and password changes (M_WEAK_PASSWORD)\npassword_policy = {}\n# registration_shared_secret = \"...\"  (default: generated in DATA/registration_shared_secret)\n\
         default_room_version = {:?}\nmax_request_bytes = {}\nmedia_max_bytes = 104857600\nencrypt_private_rooms = true\npresence = {}\ndurability = \"normal\"\n\
         auth_rate_burst = {}\nauth_rate_per_second = {}\nmax_sync_timeout_ms = {}\nsync_coalesce_ms = 10\n\n\
         [homeserver.federation]\nenabled = true\n# tls_listen = \"0.0.0.0:8448\"\n\
         # tls_cert = \"/etc/secta/fed.crt\"  (with tls_key; default: self-signed, made in DATA on first start)\n\
         blocked_servers = []\n# dns_servers = [\"192.168.1.1:53\"]  (for discovery; default: /etc/resolv.conf)\n\
         # ca_certificates = [\"/etc/secta/community-ca.pem\"]  (trusted besides the web PKI)\n\
         # well_known_server = \"matrix.example.org:8448\"  (answered at /.well-known/matrix/server)\n\
         # [[homeserver.federation.peers]]\n# server_name = \"other.box\"\n# url = \"https://10.77.1.2:8448\"\n# accept_self_signed = true\n",
        b.data_dir, b.name, b.log, b.log_json, hs.server_name, hs.listen, hs.open_registration,
        hs.password_policy, hs.default_room_version, hs.max_request_bytes, hs.presence, hs.auth_rate_burst, hs.auth_rate_per_second,
        hs.max_sync_timeout_ms,
    );
    text.push_str(&secta_hotspot::HotspotConfig::default_text());
    text.push_str(&radio_config_text());
    text.push_str(&secta_wireguard::WireguardConfig::default_text());
    text.push_str(&panel_config_text());
    text
}

fn panel_config_text() -> String {
    let p = secta_panel::PanelConfig::default();
    let v = secta_vault::VaultConfig::default();
    let ser = |x: &dyn std::fmt::Debug| format!("{x:?}").to_lowercase();
    format!(
        "\n[panel]\n# none (no hardware), sim, rppal (Raspberry Pi) or linux (/dev/gpiochipN + spidev)\n\
         backend = \"{}\"\ngpiochip = {:?}\nspi_device = {:?}\nspi_hz = {}\n\
         # ws2812, apa102 or sk9822\nled_type = \"{}\"\nleds = {}\nbrightness = {}\nframe_rate = {}\n\
         sample_ms = {}\ndebounce_ms = {}\nlong_press_ms = {}\n\
         # holding the first (panic) button this long wipes the box; the strip counts down\n\
         wipe_hold_ms = {}\nchord_wipe = {}\nchord_ms = {}\n# http_listen = \"127.0.0.1:8090\"\n\
         [[panel.buttons]]\nname = \"panic\"\npin = 17\nactive_low = true\n\
         [[panel.buttons]]\nname = \"aux\"\npin = 27\nactive_low = true\n\
         \n[vault]\n# encrypt everything under one data key (see ARCHITECTURE.md: data at rest)\nencrypt = {}\n\
         # key_file = \"/data/secta/data.key\"  (default: DATA/data.key)\n\
         # secret_file = \"/media/usb/secta.secret\"  (wrap the key with a file kept elsewhere)\n\
         passphrase = {}\n# deadman_path = \"/media/usb/secta.secret\"  (wipe when it disappears)\n\
         deadman_grace_ms = {}\n",
        ser(&p.backend), p.gpiochip, p.spi_device, p.spi_hz, ser(&p.led_type), p.leds, p.brightness,
        p.frame_rate, p.sample_ms, p.debounce_ms, p.long_press_ms, p.wipe_hold_ms, p.chord_wipe,
        p.chord_ms, v.encrypt, v.passphrase, v.deadman_grace_ms,
    )
}

/// Whether a box process holds the data directory (its lock file).
fn box_running(dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .open(dir.join(secta_vault::wipe::LOCK_FILE))
    else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Takes the data directory's lock for the life of the box process.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(dir.join(secta_vault::wipe::LOCK_FILE))?;
    // SAFETY: as above.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another secta process is running on {}", dir.display());
    }
    Ok(f)
}

fn admin_wipe(cfg: &secta_vault::VaultConfig, dir: &Path, yes: bool) -> anyhow::Result<()> {
    if !yes {
        bail!(
            "this destroys the data key and every data file of the box in {}, for good; add --yes",
            dir.display()
        );
    }
    let running = box_running(dir);
    let report = secta_vault::wipe::run(cfg, dir, None, std::time::Instant::now(), || {});
    println!(
        "key destroyed in {:.1} ms ({} key file(s)); {} entries deleted in {:.1} ms",
        report.key_destroyed_ms, report.keys, report.entries, report.files_deleted_ms
    );
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if running {
        // The running box sees the wipe, stops its services, sweeps, and
        // removes the marker; wait for it a little.
        let t = std::time::Instant::now();
        while dir.join(secta_vault::wipe::WIPE_MARKER).exists()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("the running box stopped its services and shows \"wiped\"");
    } else {
        secta_vault::wipe::finish(cfg, dir)?;
    }
    println!("the box is in its first-boot state");
    if report.errors.is_empty() {
        Ok(())
    } else {
        bail!("some files could not be deleted (see above); the key is gone regardless")
    }
}

fn admin_audit(cfg: &secta_vault::VaultConfig, dir: &Path, json: bool) -> anyhow::Result<()> {
    let a = secta_vault::audit(cfg, dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&a)?);
        return Ok(());
    }
    println!("data directory:   {}", dir.display());
    match &a.key_id {
        Some(id) => println!("encrypted:        yes, under data key {id} (SQLCipher database, XChaCha20-Poly1305 files)"),
        None if cfg.encrypt => println!("encrypted:        no data yet (a key is made on first start)"),
        None => println!("encrypted:        NO ([vault] encrypt = false)"),
    }
    println!(
        "key file:         {} ({})",
        a.key_file.display(),
        if a.key_file_present {
            "present"
        } else {
            "MISSING"
        }
    );
    if let Some(w) = &a.key_wrapped_by {
        println!("key wrapped by:   {w}");
    }
    if a.wipe_in_progress {
        println!("WIPE IN PROGRESS: the next start finishes it before anything else");
    }
    println!("a wipe destroys ({} bytes), key material first:", a.bytes);
    for p in &a.would_destroy {
        println!("  {}", p.display());
    }
    println!("encrypted under the data key (crypto-erased by a wipe):");
    for e in &a.encrypted_files {
        let s = if e.files == 1 { "" } else { "s" };
        println!("  {} ({} file{s})", e.path.display(), e.files);
    }
    println!("in the clear (deleted by a wipe, not crypto-erased):");
    for p in &a.clear_files {
        println!("  {}", p.display());
    }
    println!("kept: the config file secta.toml (if it is in the data directory)");
    Ok(())
}

fn radio_config_text() -> String {
    let r = secta_radio::RadioConfig::default();
    format!(
        "\n[radio]\nenabled = {}\nlisten = {:?}\n# public_url = \"http://secta.box:8000\"\n\
         # source_password = \"...\"  (default: generated in DATA/radio/source_password)\n\
         max_listeners = {}\nmax_sources = {}\nburst_size = {}\nqueue_size = {}\n\
         source_timeout_secs = {}\nheader_timeout_secs = {}\nsend_timeout_secs = {}\n\
         max_header_bytes = {}\nmetaint = {}\nmax_connections = {}\n\
         # [[radio.mounts]]\n# name = \"/live\"\n# fallback = \"/autodj\"\n# fallback_override = true\n\
         # record = true\n# room = \"radio\"\n# password = \"...\"\n# max_listeners = 500\n\
         # [[radio.mounts]]\n# name = \"/autodj\"\n# playlist = \"/data/secta/radio/playlist\"\n",
        r.enabled, r.listen, r.max_listeners, r.max_sources, r.burst_size, r.queue_size,
        r.source_timeout_secs, r.header_timeout_secs, r.send_timeout_secs, r.max_header_bytes,
        r.metaint, r.max_connections,
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Two workers are plenty on a Pi and keep RAM low; few blocking threads too
    // (each may get its own malloc arena).
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()?)
}

/// glibc raises its mmap threshold after large buffers are freed, after which
/// such buffers come from heap arenas and are kept: pin it so big, short-lived
/// buffers (password hashing, thumbnails) go back to the system.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        // Few arenas keep memory low; with two, request threads queued on the
        // arena locks under load (secta-bench: 4 arenas ≈ +10% throughput, +9 MB).
        libc::mallopt(libc::M_ARENA_MAX, 4);
        // Setting the mmap threshold freezes the trim threshold at 128 KiB, and
        // the heap was then shrunk and regrown (brk) all the time under load.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * 1024 * 1024);
    }
}

/// Runs every enabled service until SIGTERM/SIGINT.
///
/// Order: finish an interrupted wipe; lock the data directory; start the
/// wiper thread and the panel (the strip shows "booting"); open the data key
/// — if that fails, the services that need it (homeserver, radio, WireGuard
/// gateway) are not started and the strip shows a problem, but the panel and
/// the wipe still work; start the services; "ready". A wipe stops the services and the box
/// then shows "wiped" until it is stopped.
fn run_box(mut setup: BoxSetup, listener: Option<std::net::TcpListener>) -> anyhow::Result<()> {
    if let Some(why) = firstboot::setup_needed(&setup.boxcfg.data_dir) {
        tracing::warn!(
            reasons = %why.replace('\n', "; "),
            "the box is not set up: no usable first-boot settings; running with defaults"
        );
    }
    let data = setup.boxcfg.data_dir.clone();
    secta_runtime::ensure_data_dir(&data)?;
    if let Some(r) = secta_vault::wipe::resume_if_needed(&setup.vault, &data)? {
        tracing::warn!(
            entries = r.entries,
            key_files = r.keys,
            "finished the interrupted wipe; starting as a new box"
        );
    }
    let _lock = lock_data_dir(&data)?;
    let status = secta_runtime::Status::new();
    let (svc_trigger, svc_shutdown) = Shutdown::new();
    let svc_trigger = Arc::new(svc_trigger);
    let hs_running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vault = secta_vault::Vault::open(&setup.vault, &data);
    let wiper = {
        let (stop, running) = (svc_trigger.clone(), hs_running.clone());
        panel::Wiper::start(panel::WipeCtx {
            cfg: setup.vault.clone(),
            data_dir: data.clone(),
            vault: vault.as_ref().ok().cloned().flatten(),
            status: status.clone(),
            stop_services: Box::new(move || stop.trigger()),
            services_stopped: Box::new(move || !running.load(std::sync::atomic::Ordering::SeqCst)),
        })?
    };
    panel::watch(setup.vault.clone(), data.clone(), wiper.clone())?;
    let panel = match panel::start_panel(&setup.panel, &status, &wiper) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "the panel could not start");
            status.report(secta_runtime::Report::Problem {
                service: "panel".into(),
                message: e.to_string(),
            });
            None
        }
    };
    let sim = panel.as_ref().and_then(|(_, s)| s.clone());
    let vault = match vault {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!("{e}");
            tracing::error!("not starting the homeserver, the radio and the WireGuard gateway: they need the data key");
            status.report(secta_runtime::Report::Problem {
                service: "vault".into(),
                message: e.to_string(),
            });
            None
        }
    };
    if let Some(Some(v)) = &vault {
        encrypt_old_plaintext(&data, v);
    }
    // Boxes linked over WireGuard are federation peers at their link address.
    let links = match &vault {
        Some(v) => vpn::link_peers(&setup.wireguard, &data, v.as_deref()).unwrap_or_else(|e| {
            tracing::error!(error = %format!("{e:#}"), "the WireGuard links cannot be read; no federation over them");
            Vec::new()
        }),
        None => Vec::new(),
    };
    for (server_name, url) in links {
        if !setup
            .hs
            .federation
            .peers
            .iter()
            .any(|p| p.server_name == server_name)
        {
            setup.hs.federation.peers.push(secta_homeserver::Peer {
                server_name,
                url,
                pinned_key: None,
                // The link authenticates the box (its WireGuard key owns the
                // address); its identity is its signing key.
                accept_self_signed: true,
            });
        }
    }
    // The WireGuard gateway starts before the hotspot forwards anything, so an
    // exit's routing (and kill switch) is in place first. A set exit whose
    // gateway cannot start (no data key, an unreadable store) still gets its
    // kill switch, held until the box stops.
    let mut wireguard_blocked = None;
    let wireguard = if setup.wireguard.enabled {
        let net: Arc<dyn secta_wireguard::net::Net> = Arc::new(secta_wireguard::net::SystemNet);
        let started = match &vault {
            Some(v) => secta_wireguard::Gateway::start(
                setup.wireguard.clone(),
                &data,
                v.clone(),
                net.clone(),
            ),
            None => Err(anyhow::anyhow!("the data key is not open")),
        };
        match started {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the WireGuard gateway could not start");
                wireguard_blocked =
                    secta_wireguard::Gateway::kill_switch_only(setup.wireguard.clone(), &data, net)
                        .inspect_err(|e| tracing::error!(error = %format!("{e:#}"), "kill switch"))
                        .ok()
                        .flatten();
                None
            }
        }
    } else {
        None
    };
    let hs = match &vault {
        Some(v) => Some(Hs::open_with_vault(setup.hs.clone(), &data, v.clone())?),
        None => None,
    };
    let radio_bot = match &hs {
        Some(hs) if setup.radio.enabled && setup.radio.mounts.iter().any(|m| m.room.is_some()) => {
            radio_bot::ensure_user(hs, &data, vault.clone().flatten().as_deref())
                .inspect_err(
                    |e| tracing::error!(error = %format!("{e:#}"), "the radio bot cannot start"),
                )
                .ok()
        }
        _ => None,
    };
    let result = runtime()?.block_on(async move {
        let shutdown = svc_shutdown;
        let (proc_trigger, proc_shutdown) = Shutdown::new();
        {
            let svc = svc_trigger.clone();
            tokio::spawn(async move {
                let (t, s) = Shutdown::new();
                tokio::spawn(t.on_signals());
                s.wait().await;
                svc.trigger();
                proc_trigger.trigger();
            });
        }
        let mut portal_handle = None;
        if let Some((addr, simulated)) = setup.portal {
            let firewall: Arc<dyn secta_hotspot::Firewall> = if simulated {
                Arc::new(secta_hotspot::SimFirewall::default())
            } else {
                Arc::new(secta_hotspot::NftFirewall)
            };
            let portal = if simulated {
                secta_hotspot::Portal::at_url(
                    setup.hotspot.clone(),
                    setup.boxcfg.name.clone(),
                    firewall,
                    format!("http://{addr}/"),
                )
            } else {
                secta_hotspot::Portal::new(
                    setup.hotspot.clone(),
                    setup.boxcfg.name.clone(),
                    firewall,
                )
            };
            // The demo writes the files too (so what a box would run can be
            // read in DATA/hotspot/), but runs nothing and touches no firewall.
            let hotspot = secta_hotspot::Hotspot::start(
                portal.clone(),
                &data.join("hotspot"),
                !simulated,
                &shutdown,
            )
            .context("starting the hotspot (firewall rules, hostapd, dnsmasq)")?;
            let radio_web = setup.radio.enabled.then(|| web_radio_url(&setup.radio));
            if let Some(dir) = setup.web_ui.clone() {
                portal.set_web_ui(secta_hotspot::WebUi {
                    dir,
                    homeserver: setup.hs.base_url(),
                    server_name: setup.hs.server_name.clone(),
                    radio: radio_web,
                    panel: setup.panel_listen.map(web_panel_url),
                    setup_needed: firstboot::setup_needed(&setup.boxcfg.data_dir),
                });
            }
            portal_handle = Some(portal.clone());
            // The box's own API (sign-up, admin pages) needs the homeserver.
            let web = match &hs {
                Some(hs) => Some(webadmin::Web::new(
                    hs.clone(),
                    hotspot,
                    &data,
                    setup.boxcfg.name.clone(),
                    setup.hs.base_url(),
                    setup.radio.enabled.then(|| setup.radio.listen.clone()),
                    setup.wireguard.clone(),
                    vault.clone().flatten(),
                    wiper.clone(),
                )?),
                None => None,
            };
            let sd = shutdown.clone();
            tokio::spawn(async move {
                let extra = web.map(|w| w.router()).unwrap_or_default();
                if let Err(e) = portal.serve_with(addr, extra, sd).await {
                    tracing::error!(error = %e, "captive portal failed");
                }
            });
        }
        let wireguard = wireguard.map(|g| tokio::spawn(secta_wireguard::run(g, shutdown.clone())));
        let mut radio_handle = None;
        let radio = match (setup.radio.enabled && hs.is_some(), &vault) {
            (true, Some(v)) => {
                secta_radio::Radio::new_with_vault(setup.radio.clone(), &data, v.clone())
                    .inspect_err(
                        |e| tracing::error!(error = %format!("{e:#}"), "the radio cannot start"),
                    )
                    .ok()
            }
            _ => None,
        };
        if let Some(radio) = radio {
            radio_handle = Some(radio.clone());
            if let Some(password) = radio_bot {
                let local = setup.hs.listen.replace("0.0.0.0", "127.0.0.1");
                tokio::spawn(radio_bot::run(
                    radio.clone(),
                    setup.radio.mounts.clone(),
                    format!("http://{local}"),
                    setup.hs.server_name.clone(),
                    password,
                    shutdown.clone(),
                ));
            }
            let sd = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = radio.serve(sd).await {
                    tracing::error!(error = %e, "radio failed");
                }
            });
        }
        if let Some(addr) = setup.panel_listen {
            let api = Arc::new(panel::PanelApi {
                cfg: setup.panel.clone(),
                status: status.clone(),
                sim: sim.clone(),
                wiper: wiper.clone(),
                hs: std::sync::Mutex::new(hs.clone()),
            });
            let sd = proc_shutdown.clone();
            tokio::spawn(async move {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => {
                        tracing::info!(%addr, "panel endpoint listening");
                        let _ = axum::serve(l, panel::router(api))
                            .with_graceful_shutdown(sd.wait())
                            .await;
                    }
                    Err(e) => tracing::error!(error = %e, %addr, "panel endpoint could not bind"),
                }
            });
        }
        tokio::spawn(panel::feed(
            status.clone(),
            hs.clone(),
            portal_handle,
            radio_handle,
            shutdown.clone(),
        ));
        let homeserver = hs.map(|hs| {
            hs_running.store(true, std::sync::atomic::Ordering::SeqCst);
            let running = hs_running.clone();
            let sd = shutdown.clone();
            let listen = setup.hs.listen.clone();
            tokio::spawn(async move {
                let r = match listener {
                    Some(l) => match l
                        .set_nonblocking(true)
                        .and_then(|_| tokio::net::TcpListener::from_std(l))
                    {
                        Ok(l) => secta_homeserver::serve_on(hs, l, sd).await,
                        Err(e) => Err(e.into()),
                    },
                    None => match listen.parse::<SocketAddr>() {
                        Ok(addr) => secta_homeserver::serve(hs, addr, sd).await,
                        Err(_) => Err(anyhow::anyhow!("bad listen address {listen:?}")),
                    },
                };
                running.store(false, std::sync::atomic::Ordering::SeqCst);
                r
            })
        });
        status.report(secta_runtime::Report::Ready);
        let result = match homeserver {
            Some(h) => {
                let mut h = h;
                tokio::select! {
                    r = &mut h => {
                        let r = r.unwrap_or_else(|e| Err(e.into()));
                        if r.is_err() || !wiper.started() {
                            // The homeserver ended on its own: stop the box.
                            svc_trigger.trigger();
                            r
                        } else {
                            proc_shutdown.clone().wait().await;
                            Ok(())
                        }
                    }
                    _ = proc_shutdown.clone().wait() => {
                        tokio::time::timeout(Duration::from_secs(10), h).await
                            .map(|r| r.unwrap_or_else(|e| Err(e.into())))
                            .unwrap_or(Ok(()))
                    }
                }
            }
            None => {
                proc_shutdown.clone().wait().await;
                Ok(())
            }
        };
        if setup.portal.is_some_and(|(_, simulated)| !simulated) {
            if let Err(e) = secta_hotspot::NftFirewall::teardown() {
                tracing::warn!(error = %e, "removing the hotspot firewall rules failed");
            }
        }
        if let Some(w) = wireguard {
            match w.await {
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "WireGuard gateway failed")
                }
                Err(e) => tracing::error!(error = %e, "WireGuard gateway panicked"),
                Ok(Ok(())) => {}
            }
        }
        result
    });
    drop(panel);
    drop(wireguard_blocked);
    result
}

/// What boxes kept in the clear before it was encrypted (the WireGuard store,
/// the radio's passwords) is encrypted once, at start, whether or not those
/// services are on. What fails is logged; the services that need it say so
/// again when they start.
fn encrypt_old_plaintext(data: &Path, vault: &secta_vault::Vault) {
    if data.join("wireguard").exists() {
        if let Err(e) = secta_wireguard::Store::open(data, Some(vault)) {
            tracing::error!(error = %format!("{e:#}"), "the WireGuard store cannot be opened");
        }
    }
    let files = [
        data.join("radio").join("source_password"),
        data.join("radio").join("bot_password"),
    ];
    let mut done = Vec::new();
    for f in &files {
        match vault
            .file_cipher()
            .map_err(anyhow::Error::from)
            .and_then(|c| secta_vault::secret::convert(&c, f))
        {
            Ok(true) => done.push(f.as_path()),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "encrypting an old plaintext file")
            }
        }
    }
    secta_vault::secret::warn_converted(&done);
}

fn parse_peer(s: &str) -> anyhow::Result<secta_homeserver::Peer> {
    let (name, url) = s
        .split_once('=')
        .with_context(|| format!("--peer wants SERVER_NAME=URL, got {s:?}"))?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("--peer URL must start with http:// or https://: {url:?}");
    }
    // Demo boxes make self-signed certificates; their identity is their signing key.
    let accept_self_signed = url.starts_with("https://");
    Ok(secta_homeserver::Peer {
        server_name: name.to_owned(),
        url: url.to_owned(),
        pinned_key: None,
        accept_self_signed,
    })
}

fn demo(
    data: &Path,
    listen: SocketAddr,
    server_name: Option<String>,
    peers: &[String],
    federation_tls_listen: Option<SocketAddr>,
    (portal_listen, radio_listen, panel_listen): (SocketAddr, SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    secta_runtime::init_logging("info,tower_http=warn,ruma_state_res=warn", false);
    secta_runtime::ensure_data_dir(data)?;
    let cfg_path = data.join("secta.toml");
    let setup = if cfg_path.exists() {
        let mut s = load_setup(&ConfigFile::load(&cfg_path)?)?;
        s.hs.listen = listen.to_string();
        if let Some(n) = server_name {
            s.hs.server_name = n;
        }
        s
    } else {
        let name = server_name.unwrap_or_else(|| listen.to_string());
        let text = format!(
            "# Written by `secta demo` on first start.\n[box]\ndata_dir = {:?}\nname = \"Secta demo\"\n\n[homeserver]\nserver_name = {:?}\nlisten = {:?}\n",
            data.to_string_lossy(),
            name,
            listen.to_string()
        );
        std::fs::write(&cfg_path, &text)?;
        load_setup(&ConfigFile::parse(&text)?)?
    };
    let mut setup = setup;
    setup.boxcfg.data_dir = data.to_owned();
    // An interrupted wipe is finished before anything else.
    if let Some(r) = secta_vault::wipe::resume_if_needed(&setup.vault, data)? {
        tracing::warn!(
            entries = r.entries,
            "finished the interrupted wipe; starting as a new box"
        );
    }
    for p in peers {
        setup.hs.federation.peers.push(parse_peer(p)?);
    }
    if let Some(a) = federation_tls_listen {
        setup.hs.federation.tls_listen = Some(a.to_string());
    }
    setup.portal = Some((portal_listen, true));
    setup.radio.listen = radio_listen.to_string();
    // The demo's panel is simulated and shown by the web app.
    if setup.panel.backend == secta_panel::Backend::None {
        setup.panel.backend = secta_panel::Backend::Sim;
    }
    setup.panel_listen = Some(panel_listen);
    if setup.radio.mounts.is_empty() {
        setup.radio.mounts = demo_radio_mounts(data);
    }
    if setup.web_ui.is_none() && Path::new("web-ui/dist/index.html").exists() {
        setup.web_ui = Some(PathBuf::from("web-ui/dist"));
    }
    // Bind first so the printed URLs are live when the user reads them.
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let vault = secta_vault::Vault::open(&setup.vault, data)?;
    let hs = Hs::open_with_vault(setup.hs.clone(), data, vault.clone())?;
    // For the source password it prints (kept encrypted like the box keeps it).
    let radio = secta_radio::Radio::new_with_vault(setup.radio.clone(), data, vault.clone())?;
    let creds_path = data.join("demo-credentials.txt");
    let creds = if creds_path.exists() {
        let bytes = std::fs::read(&creds_path)?;
        let bytes = match &vault {
            Some(v) => v.file_cipher()?.open(&bytes)?,
            None => bytes,
        };
        String::from_utf8(bytes)?
    } else {
        let password = secta_homeserver::random_string(16);
        let admin = hs
            .admin_create_user("admin", &password, true)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.errcode, e.message))?;
        let token = hs
            .admin_create_invite(Some(20), None)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.errcode, e.message))?;
        let text = format!("admin user:     {admin}\nadmin password: {password}\ninvite token:   {token} (20 registrations)\n");
        match &vault {
            Some(v) => v.file_cipher()?.write_file(&creds_path, text.as_bytes())?,
            None => secta_runtime::write_secret_file(&creds_path, text.as_bytes())?,
        }
        text
    };
    drop(hs);
    drop(vault);
    let base = setup.hs.base_url();
    println!(
        "\nSecta demo box is running.\n\
         \n  Homeserver (give this to Element, Element X or any Matrix client): {base}\
         \n  Server name:      {}\
         \n  Versions:         {base}/_matrix/client/versions\
         \n  Client discovery: {base}/.well-known/matrix/client\
         \n  Captive portal:   http://{}/ (firewall simulated)\
         \n  Panel:            http://{}/panel (simulated strip and buttons)\
         \n{}\
         \n  Data folder:      {}\
         \n\n{}\
         \n  Create more invites: {} admin --data {} invite create --uses 5\
         \n  Stop with Ctrl-C.\n",
        setup.hs.server_name,
        portal_listen,
        panel_listen,
        demo_radio_text(&radio, data),
        data.display(),
        creds
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "secta".into()),
        data.display(),
    );
    run_box(setup, Some(listener))
}

/// Where the web app finds the radio: its public URL, or `:PORT` (the page's own
/// host) when it listens on every address.
fn web_radio_url(r: &secta_radio::RadioConfig) -> String {
    match (&r.public_url, r.listen.parse::<SocketAddr>()) {
        (Some(u), _) => u.trim_end_matches('/').to_owned(),
        (None, Ok(a)) if a.ip().is_unspecified() => format!(":{}", a.port()),
        _ => r.base_url(),
    }
}

/// Where the web app finds the panel's endpoint: `:PORT` (the page's own host)
/// when it listens on every address.
fn web_panel_url(a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        format!(":{}", a.port())
    } else {
        format!("http://{a}")
    }
}

/// The demo's radio: a live mount that falls back to the auto-DJ and back.
fn demo_radio_mounts(data: &Path) -> Vec<secta_radio::MountConfig> {
    let playlist = data.join("radio").join("playlist");
    let _ = std::fs::create_dir_all(&playlist);
    vec![
        secta_radio::MountConfig {
            name: "/live".into(),
            fallback: Some("/autodj".into()),
            fallback_override: true,
            record: true,
            room: Some("radio".into()),
            stream_name: Some("Secta radio".into()),
            ..Default::default()
        },
        secta_radio::MountConfig {
            name: "/autodj".into(),
            playlist: Some(playlist),
            stream_name: Some("Secta auto-DJ".into()),
            ..Default::default()
        },
    ]
}

fn demo_radio_text(radio: &secta_radio::Radio, data: &Path) -> String {
    let base = radio.base_url();
    let host = base.trim_start_matches("http://");
    format!(
        "  Radio listen:     {base}/live  (falls back to {base}/autodj)\
         \n  Radio status:     {base}/status-json.xsl\
         \n  Radio source:     icecast://source:{}@{host}/live  (e.g. ffmpeg -re -i show.mp3 -c copy -content_type audio/mpeg -f mp3 URL)\
         \n  Auto-DJ playlist: put MP3 files in {}",
        radio.source_password(),
        data.join("radio").join("playlist").display(),
    )
}

fn mx(e: secta_homeserver::MxError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.errcode, e.message)
}

fn admin(hs: &Arc<Hs>, cmd: AdminCmd) -> anyhow::Result<()> {
    match cmd {
        AdminCmd::User { cmd } => match cmd {
            UserCmd::Create {
                username,
                password,
                admin,
            } => {
                let generated = password.is_none();
                let password = password.unwrap_or_else(|| secta_homeserver::random_string(16));
                let id = hs
                    .admin_create_user(&username, &password, admin)
                    .map_err(mx)?;
                println!("{id}");
                if generated {
                    println!("password: {password}");
                }
            }
            UserCmd::List => {
                for u in hs.admin_list_users().map_err(mx)? {
                    println!(
                        "{}\t{}\t{}{}",
                        u.user_id,
                        u.displayname.unwrap_or_default(),
                        if u.admin { "admin" } else { "member" },
                        if u.deactivated { "\tdeactivated" } else { "" }
                    );
                }
            }
            UserCmd::ResetPassword { username, password } => {
                let generated = password.is_none();
                let password = password.unwrap_or_else(|| secta_homeserver::random_string(16));
                if !hs.admin_reset_password(&username, &password).map_err(mx)? {
                    bail!("no such user: {username}");
                }
                if generated {
                    println!("password: {password}");
                }
            }
        },
        AdminCmd::Federation {
            cmd: Some(FedCmd::Block { server }),
        } => {
            hs.set_server_blocked(&server, true).map_err(mx)?;
            println!("blocked {server}");
        }
        AdminCmd::Federation {
            cmd: Some(FedCmd::Unblock { server }),
        } => {
            hs.set_server_blocked(&server, false).map_err(mx)?;
            println!("unblocked {server}");
        }
        AdminCmd::Federation {
            cmd: Some(FedCmd::RotateKey),
        }
        | AdminCmd::Vpn { .. }
        | AdminCmd::RadioPassword
        | AdminCmd::Wipe { .. }
        | AdminCmd::Audit { .. } => unreachable!("handled before opening the database"),
        AdminCmd::Federation {
            cmd: None | Some(FedCmd::Status),
        } => {
            let peers = hs.federation_status().map_err(mx)?;
            if peers.is_empty() {
                println!("no federation peers yet");
            }
            for p in peers {
                println!(
                    "{}\tqueued {}\tfailures {}\tlast success {}\t{}",
                    p.server_name,
                    p.queued,
                    p.failures,
                    p.last_success
                        .map_or("never".to_owned(), |t| format!("{t} ms")),
                    p.last_error.unwrap_or_default()
                );
            }
        }
        AdminCmd::Invite { cmd } => match cmd {
            InviteCmd::Create { uses, expires_in } => {
                let expiry = expires_in.as_deref().map(parse_duration).transpose()?;
                let token = hs
                    .admin_create_invite((uses > 0).then_some(uses), expiry)
                    .map_err(mx)?;
                println!("{token}");
            }
            InviteCmd::List => {
                for i in hs.admin_list_invites().map_err(mx)? {
                    println!(
                        "{}\tused {}/{}\t{}{}",
                        i.token,
                        i.completed,
                        i.uses_allowed.map_or("∞".to_owned(), |u| u.to_string()),
                        i.expiry_ts
                            .map_or("no expiry".to_owned(), |e| format!("expires at {e} ms")),
                        if i.revoked { "\trevoked" } else { "" }
                    );
                }
            }
            InviteCmd::Revoke { token } => {
                if !hs.admin_revoke_invite(&token).map_err(mx)? {
                    bail!("no such invite token");
                }
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn default_config_parses_back() {
        let f = ConfigFile::parse(&default_config_text()).unwrap();
        let s = load_setup(&f).unwrap();
        assert_eq!(s.hs.server_name, HomeserverConfig::default().server_name);
    }
}
