//! The cross-platform WireGuard UAPI on a Unix socket
//! (`UAPI_DIR/IFACE.sock`), so `wg show` and `wg set`/`wg setconf` work
//! against the userspace engine as they do against the kernel.
//!
//! Changes made this way live until the box restarts (like the kernel's);
//! the box's own peers come from its database.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, UNIX_EPOCH},
};

use crate::{
    conf::parse_cidr,
    device::{Device, PeerConfig},
    keys::{PublicKey, SecretKey},
};

const EINVAL: i32 = 22;
const ENOENT: i32 = 2;
const EADDRINUSE: i32 = 98;
/// Requests are a few lines per peer; refuse anything much larger.
const MAX_REQUEST_LINES: usize = 200_000;

/// The `get=1` answer for a device.
pub fn get_text(dev: &Device) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", &*dev.private_key().expose_hex());
    let _ = writeln!(s, "listen_port={}", dev.listen_port());
    if dev.fwmark() != 0 {
        let _ = writeln!(s, "fwmark={}", dev.fwmark());
    }
    for p in dev.peers() {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        let psk = p
            .preshared_key
            .map(|k| k.expose_hex().to_string())
            .unwrap_or_else(|| "0".repeat(64));
        let _ = writeln!(s, "preshared_key={psk}");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s
}

enum PeerChange {
    Set {
        cfg: PeerConfig,
        replace_allowed: bool,
        update_only: bool,
    },
    Remove(PublicKey),
}

/// Applies a `set=1` request (its lines after `set=1`); returns errno.
/// Nothing is changed unless the whole request is valid.
pub fn apply_set(dev: &Device, lines: &[String]) -> i32 {
    let mut private_key = None;
    let mut fwmark = None;
    let mut replace_peers = false;
    let mut changes: Vec<PeerChange> = Vec::new();
    let bad = |why: String| {
        tracing::info!(iface = dev.name(), "UAPI set refused: {why}");
        EINVAL
    };
    for l in lines {
        let Some((k, v)) = l.split_once('=') else {
            return bad(format!("line {l:?} has no '='"));
        };
        if k == "public_key" {
            match PublicKey::parse_hex(v) {
                Ok(key) => changes.push(PeerChange::Set {
                    cfg: dev
                        .peer_config(&key)
                        .unwrap_or_else(|| PeerConfig::new(key)),
                    replace_allowed: false,
                    update_only: false,
                }),
                Err(e) => return bad(e.to_string()),
            }
            continue;
        }
        let Some(last) = changes.last_mut() else {
            match k {
                "private_key" => match SecretKey::parse_hex(v, "private_key") {
                    Ok(k) => private_key = Some(k),
                    Err(e) => return bad(e.to_string()),
                },
                "listen_port" => match v.parse::<u16>() {
                    Ok(p) if p == dev.listen_port() || p == 0 => {}
                    Ok(_) => {
                        tracing::info!(iface = dev.name(), "UAPI: changing listen_port of a running interface is not supported (restart it)");
                        return EADDRINUSE;
                    }
                    Err(_) => return bad(format!("bad listen_port {v:?}")),
                },
                "fwmark" => match v.parse::<u32>() {
                    Ok(m) => fwmark = Some(m),
                    Err(_) => return bad(format!("bad fwmark {v:?}")),
                },
                "replace_peers" => replace_peers = v == "true",
                "protocol_version" if v == "1" => {}
                _ => return bad(format!("unexpected {k}={v}")),
            }
            continue;
        };
        let PeerChange::Set {
            cfg,
            replace_allowed,
            update_only,
        } = last
        else {
            // The rest of a removed peer's lines do not matter.
            continue;
        };
        match k {
            "remove" if v == "true" => {
                let key = cfg.public_key;
                *last = PeerChange::Remove(key);
            }
            "update_only" => *update_only = v == "true",
            "preshared_key" => match SecretKey::parse_hex(v, "preshared_key") {
                Ok(k) => cfg.preshared_key = (!k.is_zero()).then_some(k),
                Err(e) => return bad(e.to_string()),
            },
            "endpoint" => match v.parse::<SocketAddr>() {
                Ok(a) => cfg.endpoint = Some(a),
                Err(_) => return bad(format!("bad endpoint {v:?}")),
            },
            "persistent_keepalive_interval" => match v.parse::<u16>() {
                Ok(k) => cfg.persistent_keepalive = (k > 0).then_some(k),
                Err(_) => return bad(format!("bad persistent_keepalive_interval {v:?}")),
            },
            "replace_allowed_ips" if v == "true" => {
                cfg.allowed_ips.clear();
                *replace_allowed = true;
            }
            "allowed_ip" => match parse_cidr(v) {
                Ok(n) => {
                    let n = n.trunc();
                    if !cfg.allowed_ips.contains(&n) {
                        cfg.allowed_ips.push(n);
                    }
                }
                Err(e) => return bad(e),
            },
            "protocol_version" if v == "1" => {}
            _ => return bad(format!("unexpected {k}={v}")),
        }
    }
    if let Some(k) = private_key {
        dev.set_private_key(k);
    }
    if let Some(m) = fwmark {
        if let Err(e) = dev.set_fwmark(m) {
            tracing::warn!(iface = dev.name(), error = %e, "setting fwmark failed");
            return EINVAL;
        }
    }
    if replace_peers {
        dev.clear_peers();
    }
    for c in changes {
        match c {
            PeerChange::Remove(k) => {
                dev.remove_peer(&k);
            }
            PeerChange::Set {
                cfg,
                replace_allowed: _,
                update_only,
            } => {
                if update_only && dev.peer_config(&cfg.public_key).is_none() {
                    continue;
                }
                if let Err(e) = dev.set_peer(cfg, false) {
                    tracing::info!(iface = dev.name(), error = %e, "UAPI set refused");
                    return EINVAL;
                }
            }
        }
    }
    0
}

fn serve_conn(dev: &Device, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let mut op = String::new();
        if r.read_line(&mut op)? == 0 {
            return Ok(());
        }
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                break;
            }
            let l = l.trim_end_matches('\n').to_owned();
            if l.is_empty() {
                break;
            }
            if lines.len() >= MAX_REQUEST_LINES {
                w.write_all(format!("errno={EINVAL}\n\n").as_bytes())?;
                return Ok(());
            }
            lines.push(l);
        }
        match op.trim_end() {
            "get=1" => {
                let mut text = get_text(dev);
                text.push_str("errno=0\n\n");
                w.write_all(text.as_bytes())?;
            }
            "set=1" => {
                let errno = apply_set(dev, &lines);
                w.write_all(format!("errno={errno}\n\n").as_bytes())?;
            }
            _ => {
                w.write_all(format!("errno={ENOENT}\n\n").as_bytes())?;
                return Ok(());
            }
        }
    }
}

/// A listening UAPI socket; removed when dropped.
pub struct UapiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// Listens on `dir/NAME.sock` (the directory is made owner-only).
    pub fn start(dir: &Path, dev: Arc<Device>) -> io::Result<UapiServer> {
        std::fs::create_dir_all(dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let path = dir.join(format!("{}.sock", dev.name()));
        if path.exists() {
            // A live socket means another process runs this interface.
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wg-{}-uapi", dev.name()))
            .spawn(move || {
                use std::os::fd::AsRawFd;
                while !st.load(Ordering::Relaxed) {
                    let [ready] = crate::tun::poll_readable([listener.as_raw_fd()], 200);
                    if !ready {
                        continue;
                    }
                    if let Ok((s, _)) = listener.accept() {
                        let _ = s.set_nonblocking(false);
                        if let Err(e) = serve_conn(&dev, s) {
                            tracing::debug!(error = %e, "UAPI connection ended");
                        }
                    }
                }
            })?;
        Ok(UapiServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one UAPI request to a running interface and returns the answer's
/// lines (without the final `errno=`), or the errno as an error.
pub fn request(dir: &Path, iface: &str, req: &str) -> anyhow::Result<Vec<(String, String)>> {
    let path = dir.join(format!("{iface}.sock"));
    let mut s = UnixStream::connect(&path)
        .map_err(|e| anyhow::anyhow!("{iface} is not running ({}: {e})", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    for l in BufReader::new(s).lines() {
        let l = l?;
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once('=') {
            if k == "errno" {
                if v != "0" {
                    anyhow::bail!("{iface} refused the request (errno {v})");
                }
                return Ok(out);
            }
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    anyhow::bail!("{iface} closed the UAPI connection early")
}
