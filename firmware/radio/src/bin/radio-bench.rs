//! Listener load on loopback: N concurrent listeners of a 128 kbps stream
//! against Secta's radio (started here as a child process) and, with
//! `--icecast`, against Debian's icecast2 in the same run. Prints JSON:
//! delivered throughput per listener, stalls, server CPU and RSS per listener,
//! and the Secta/Icecast ratios.
//!
//! ```sh
//! radio-bench --listeners 5000 --secs 20 --icecast
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PASSWORD: &str = "bench-source-pw";
/// 128 kbps.
const BYTES_PER_SEC: usize = 16_000;
/// A gap this long between reads (after the first bytes) is a stall.
const STALL: Duration = Duration::from_millis(1500);

struct Args {
    listeners: usize,
    secs: u64,
    icecast: bool,
    icecast_bin: String,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut a = Args {
        listeners: 1000,
        secs: 20,
        icecast: false,
        icecast_bin: "/usr/bin/icecast2".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "serve" => return Ok(None),
            "--listeners" => a.listeners = val()?.parse().map_err(|_| "bad --listeners")?,
            "--secs" => a.secs = val()?.parse().map_err(|_| "bad --secs")?,
            "--icecast" => a.icecast = true,
            "--icecast-bin" => a.icecast_bin = val()?,
            "-h" | "--help" => {
                return Err(
                    "radio-bench [--listeners N] [--secs S] [--icecast] [--icecast-bin PATH]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(a))
}

fn main() {
    raise_fd_limit();
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return serve_child(),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(run(args));
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}

/// `radio-bench serve ADDR DIR`: Secta's radio alone, as the box runs it (two workers).
fn serve_child() {
    let argv: Vec<String> = std::env::args().collect();
    let addr = argv.get(2).expect("addr").clone();
    let dir = PathBuf::from(argv.get(3).expect("dir"));
    let cfg = secta_radio::RadioConfig {
        listen: addr,
        source_password: Some(PASSWORD.into()),
        max_listeners: 100_000,
        max_connections: 101_000,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_trigger, shutdown) = secta_runtime::Shutdown::new();
    rt.block_on(async move {
        secta_radio::serve(cfg, &dir, shutdown)
            .await
            .expect("radio serves");
    });
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

async fn run(a: Args) -> Value {
    let dir = std::env::temp_dir().join(format!("radio-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut results = Vec::new();
    let addr = free_port();
    let exe = std::env::current_exe().expect("own path");
    let child = Command::new(exe)
        .arg("serve")
        .arg(addr.to_string())
        .arg(&dir)
        .env("SECTA_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the radio");
    results.push(measure("secta", child, addr, "source", &a).await);
    if a.icecast {
        let addr = free_port();
        match start_icecast(&a.icecast_bin, addr, &dir, a.listeners) {
            Ok(child) => results.push(measure("icecast2", child, addr, "source", &a).await),
            Err(e) => results.push(json!({ "name": "icecast2", "error": e })),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ratio = |key: &str| -> Value {
        match (results.first(), results.get(1)) {
            (Some(s), Some(i)) => match (s[key].as_f64(), i[key].as_f64()) {
                (Some(x), Some(y)) if y > 0.0 => json!((x / y * 1000.0).round() / 1000.0),
                _ => Value::Null,
            },
            _ => Value::Null,
        }
    };
    json!({
        "listeners": a.listeners,
        "secs": a.secs,
        "stream_kbps": BYTES_PER_SEC * 8 / 1000,
        "servers": results,
        "ratios_secta_over_icecast": {
            "rss_per_listener": ratio("rss_kb_per_listener"),
            "cpu_per_listener": ratio("cpu_ms_per_listener_per_s"),
            "cpu_per_mb_delivered": ratio("cpu_ms_per_mb_delivered"),
        },
    })
}

fn start_icecast(bin: &str, addr: SocketAddr, dir: &Path, n: usize) -> Result<Child, String> {
    if !Path::new(bin).exists() {
        return Err(format!("{bin} not installed (apt-get install icecast2)"));
    }
    let idir = dir.join("icecast");
    std::fs::create_dir_all(idir.join("log")).map_err(|e| e.to_string())?;
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        // icecast2 refuses to run as root; it drops to nobody, who must write its logs.
        let _ = Command::new("chmod")
            .args(["-R", "a+rwx"])
            .arg(&idir)
            .status();
        let _ = Command::new("chmod").arg("a+rx").arg(dir).status();
    }
    let security = if as_root {
        "<security><chroot>0</chroot><changeowner><user>nobody</user><group>nogroup</group></changeowner></security>"
    } else {
        ""
    };
    let xml = format!(
        "<icecast><location>bench</location><admin>bench@localhost</admin>\
         <limits><clients>{}</clients><sources>4</sources><queue-size>524288</queue-size>\
         <client-timeout>30</client-timeout><header-timeout>15</header-timeout>\
         <source-timeout>10</source-timeout><burst-on-connect>1</burst-on-connect>\
         <burst-size>65535</burst-size></limits>\
         <authentication><source-password>{PASSWORD}</source-password>\
         <admin-user>admin</admin-user><admin-password>{PASSWORD}</admin-password></authentication>\
         <hostname>127.0.0.1</hostname>\
         <listen-socket><port>{}</port><bind-address>127.0.0.1</bind-address></listen-socket>\
         <paths><basedir>/usr/share/icecast2</basedir><logdir>{}</logdir>\
         <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot></paths>\
         <logging><accesslog>-</accesslog><errorlog>error.log</errorlog><loglevel>2</loglevel></logging>\
         {security}</icecast>",
        n + 100,
        addr.port(),
        idir.join("log").display()
    );
    let conf = idir.join("icecast.xml");
    std::fs::write(&conf, xml).map_err(|e| e.to_string())?;
    if as_root {
        let _ = Command::new("chmod").arg("a+r").arg(&conf).status();
    }
    Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {bin}: {e}"))
}

/// Server CPU seconds (user + system) and RSS in KiB, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks / hz, rss))
}

async fn wait_port(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The source: synthetic MP3 frames (128 kbps, 44.1 kHz) paced in real time.
async fn source(addr: SocketAddr, stop: Arc<AtomicU64>) -> Result<(), String> {
    use base64::Engine;
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("source:{PASSWORD}"));
    let req = format!(
        "PUT /bench HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Type: audio/mpeg\r\nice-name: bench\r\nice-bitrate: 128\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    if !(head.starts_with(b"HTTP/1.1 100") || head.starts_with(b"HTTP/1.0 200")) {
        return Err(format!(
            "source refused: {}",
            String::from_utf8_lossy(&head)
        ));
    }
    let mut frame = vec![0x55u8; 417];
    frame[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
    let begun = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while stop.load(Ordering::Relaxed) == 0 {
        tick.tick().await;
        let due = (begun.elapsed().as_secs_f64() * BYTES_PER_SEC as f64) as usize;
        while sent < due {
            s.write_all(&frame).await.map_err(|e| e.to_string())?;
            sent += 417;
        }
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    bytes: AtomicU64,
    stalls: AtomicU64,
    stalled_listeners: AtomicU64,
    failed: AtomicU64,
}

async fn listen(addr: SocketAddr, tally: Arc<Tally>, measuring: Arc<AtomicU64>, end: Instant) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if s.write_all(b"GET /bench HTTP/1.0\r\nUser-Agent: radio-bench\r\n\r\n")
        .await
        .is_err()
    {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = vec![0u8; 8192];
    let mut last: Option<Instant> = None;
    let mut stalled = false;
    let mut first = true;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(Ok(n)) => {
                if first {
                    first = false;
                    if !buf[..n].starts_with(b"HTTP/1.0 200")
                        && !buf[..n].starts_with(b"HTTP/1.1 200")
                    {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                let now = Instant::now();
                if measuring.load(Ordering::Relaxed) == 1 {
                    tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if last.is_some_and(|l| now - l > STALL) {
                        tally.stalls.fetch_add(1, Ordering::Relaxed);
                        stalled = true;
                    }
                }
                last = Some(now);
            }
        }
    }
    if stalled {
        tally.stalled_listeners.fetch_add(1, Ordering::Relaxed);
    }
}

async fn measure(name: &str, mut child: Child, addr: SocketAddr, _user: &str, a: &Args) -> Value {
    let pid = child.id();
    let result = async {
        if !wait_port(addr).await {
            return Err("server did not start".to_string());
        }
        let stop = Arc::new(AtomicU64::new(0));
        let src = tokio::spawn(source(addr, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        if src.is_finished() {
            return Err(format!("{:?}", src.await));
        }
        let (_, rss_base) = proc_usage(pid).ok_or("no /proc entry")?;
        let tally = Arc::new(Tally::default());
        let measuring = Arc::new(AtomicU64::new(0));
        let ramp = Duration::from_secs(2 + a.listeners as u64 / 1000);
        let warm = Duration::from_secs(3);
        let end = Instant::now() + ramp + warm + Duration::from_secs(a.secs);
        let mut tasks = Vec::with_capacity(a.listeners);
        for i in 0..a.listeners {
            tasks.push(tokio::spawn(listen(addr, tally.clone(), measuring.clone(), end)));
            if i % 250 == 249 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep_until((end - Duration::from_secs(a.secs)).into()).await;
        let (cpu0, _) = proc_usage(pid).ok_or("server died")?;
        let t0 = Instant::now();
        measuring.store(1, Ordering::Relaxed);
        tokio::time::sleep_until(end.into()).await;
        let (cpu1, rss) = proc_usage(pid).ok_or("server died")?;
        let window = t0.elapsed().as_secs_f64();
        measuring.store(0, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        stop.store(1, Ordering::Relaxed);
        let _ = src.await;
        let n = a.listeners as f64;
        let failed = tally.failed.load(Ordering::Relaxed);
        let bytes = tally.bytes.load(Ordering::Relaxed) as f64;
        let cpu = cpu1 - cpu0;
        Ok(json!({
            "name": name,
            "listeners_failed": failed,
            "throughput_bytes_per_s_per_listener": (bytes / window / n).round(),
            "expected_bytes_per_s": BYTES_PER_SEC,
            "stalls": tally.stalls.load(Ordering::Relaxed),
            "listeners_with_stalls": tally.stalled_listeners.load(Ordering::Relaxed),
            "server_cpu_percent": (cpu / window * 1000.0).round() / 10.0,
            "cpu_ms_per_listener_per_s": (cpu / window / n * 1e6).round() / 1000.0,
            "cpu_ms_per_mb_delivered": if bytes > 0.0 { (cpu / (bytes / 1e6) * 1e4).round() / 10.0 } else { 0.0 },
            "rss_kb_before_listeners": rss_base,
            "rss_kb": rss,
            "rss_kb_per_listener": ((rss as f64 - rss_base as f64) / n * 100.0).round() / 100.0,
        }))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap_or_else(|e| json!({ "name": name, "error": e }))
}
