//! `wg-bench`: the tunnel engine's speed and memory, printed as JSON.
//!
//! In two network namespaces it makes (joined by a veth pair), it measures TCP
//! throughput over the plain veth and then through the tunnel (two engine
//! processes configured from `.conf` files) in one run, with iperf3 when
//! installed or its own TCP sender otherwise; the engines' CPU per Gbit/s;
//! the handshake time (first ping through a fresh tunnel minus a steady one,
//! and the handshake's CPU cost in memory); and the RSS of an engine with 250
//! configured peers. Needs root, /dev/net/tun and `ip netns`.
//!
//! Usage: `wg-bench [--secs N] [--workers N] [--peers N]`

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use boringtun::noise::{Tunn, TunnResult};
use secta_wireguard::{iface, net::SystemNet, SecretKey, WgConf};
use serde_json::json;

const NS_A: &str = "secta-bench-a";
const NS_B: &str = "secta-bench-b";
const NS_C: &str = "secta-bench-c";

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["ip".to_owned(), "netns".into(), "exec".into(), ns.into()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn spawn(argv: &[String]) -> anyhow::Result<Child> {
    Ok(Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?)
}

/// Waits for a child's first stdout line ("ready …").
fn ready(c: &mut Child) -> anyhow::Result<String> {
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    if !line.starts_with("ready") {
        bail!("engine did not start: {line:?}");
    }
    Ok(line)
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Runs `f`, returning its value and the machine's busy fraction meanwhile.
fn busy<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let (b0, t0) = machine_jiffies();
    let v = f()?;
    let (b1, t1) = machine_jiffies();
    Ok((v, (b1 - b0) as f64 / (t1 - t0).max(1) as f64))
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bits per second from `from_ns` to `to` for `secs` seconds.
fn throughput(to_ns: &str, from_ns: &str, to: &str, secs: u64) -> anyhow::Result<f64> {
    if std::path::Path::new("/usr/bin/iperf3").exists() {
        let mut server = spawn(&in_ns(to_ns, &["iperf3", "-s", "-1", "-B", to]))?;
        std::thread::sleep(Duration::from_millis(500));
        let out = sh(&in_ns(
            from_ns,
            &["iperf3", "-c", to, "-t", &secs.to_string(), "-J"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
        let _ = server.wait();
        let v: serde_json::Value = serde_json::from_str(&out?)?;
        return v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 gave no result");
    }
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?;
    let mut sink = spawn(&in_ns(to_ns, &[me, "--sink", &format!("{to}:5201")]))?;
    ready(&mut sink)?;
    sh(&in_ns(
        from_ns,
        &[
            me,
            "--source",
            &format!("{to}:5201"),
            "--secs",
            &secs.to_string(),
        ],
    )
    .iter()
    .map(String::as_str)
    .collect::<Vec<_>>())?;
    let mut out = String::new();
    sink.stdout
        .as_mut()
        .context("stdout")?
        .read_to_string(&mut out)?;
    let _ = sink.wait();
    out.trim().parse::<f64>().context("sink result")
}

fn conf(
    private: &SecretKey,
    addr: &str,
    port: Option<u16>,
    peers: &[(String, String, Option<String>)],
) -> String {
    let mut s = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {addr}\n",
        &*private.expose_base64()
    );
    if let Some(p) = port {
        s.push_str(&format!("ListenPort = {p}\n"));
    }
    for (key, allowed, endpoint) in peers {
        s.push_str(&format!(
            "\n[Peer]\nPublicKey = {key}\nAllowedIPs = {allowed}\n"
        ));
        if let Some(e) = endpoint {
            s.push_str(&format!("Endpoint = {e}\n"));
        }
    }
    s
}

/// Microseconds of CPU for one full handshake (initiation, response, first keepalive), in memory.
fn handshake_cpu_us(rounds: u32) -> f64 {
    let (a, b) = (SecretKey::generate(), SecretKey::generate());
    let mut buf1 = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let start = Instant::now();
    for i in 0..rounds {
        let mut ta = Tunn::new(a.x25519(), b.public().x25519(), None, None, i, None).expect("tunn");
        let mut tb = Tunn::new(b.x25519(), a.public().x25519(), None, None, i, None).expect("tunn");
        let TunnResult::WriteToNetwork(init) = ta.format_handshake_initiation(&mut buf1, false)
        else {
            panic!("no initiation")
        };
        let TunnResult::WriteToNetwork(resp) = tb.decapsulate(None, init, &mut buf2) else {
            panic!("no response")
        };
        let TunnResult::WriteToNetwork(ka) = ta.decapsulate(None, resp, &mut buf1) else {
            panic!("no keepalive")
        };
        let _ = tb.decapsulate(None, ka, &mut buf2);
    }
    start.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

fn ping_ms(ns: &str, to: &str) -> Option<f64> {
    let out = sh(&in_ns(ns, &["ping", "-c", "1", "-W", "5", to])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .ok()?;
    out.split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Lab;

impl Drop for Lab {
    fn drop(&mut self) {
        for n in [NS_A, NS_B, NS_C] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn bench(args: &[String]) -> anyhow::Result<serde_json::Value> {
    let secs: u64 = arg(args, "--secs", 10);
    let workers: usize = arg(args, "--workers", 2);
    let npeers: usize = arg(args, "--peers", 250);
    let me = std::env::current_exe()?;
    let me = me.to_str().context("path")?.to_owned();
    let lab = Lab;
    for n in [NS_A, NS_B, NS_C] {
        let _ = Command::new("ip").args(["netns", "del", n]).output();
        sh(&["ip", "netns", "add", n])?;
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    sh(&[
        "ip", "link", "add", "swb-a", "netns", NS_A, "type", "veth", "peer", "name", "swb-b",
        "netns", NS_B,
    ])?;
    for (n, i, a) in [
        (NS_A, "swb-a", "192.0.2.1/24"),
        (NS_B, "swb-b", "192.0.2.2/24"),
    ] {
        sh(&["ip", "-n", n, "addr", "add", a, "dev", i])?;
        sh(&["ip", "-n", n, "link", "set", i, "up"])?;
    }
    let (plain, plain_busy) = busy(|| throughput(NS_B, NS_A, "192.0.2.2", secs))?;

    let (ka, kb) = (SecretKey::generate(), SecretKey::generate());
    let dir = std::env::temp_dir().join(format!("wg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("a.conf");
    let cb = dir.join("b.conf");
    std::fs::write(
        &ca,
        conf(
            &ka,
            "10.200.0.1/24",
            None,
            &[(
                kb.public().to_base64(),
                "10.200.0.2/32".into(),
                Some("192.0.2.2:51820".into()),
            )],
        ),
    )?;
    std::fs::write(
        &cb,
        conf(
            &kb,
            "10.200.0.2/24",
            Some(51820),
            &[(ka.public().to_base64(), "10.200.0.1/32".into(), None)],
        ),
    )?;
    let w = workers.to_string();
    let mut eb = spawn(&in_ns(
        NS_B,
        &[
            &me,
            "--engine",
            cb.to_str().unwrap(),
            "--interface",
            "swb-wg",
            "--workers",
            &w,
        ],
    ))?;
    ready(&mut eb)?;
    let mut ea = spawn(&in_ns(
        NS_A,
        &[
            &me,
            "--engine",
            ca.to_str().unwrap(),
            "--interface",
            "swb-wg",
            "--workers",
            &w,
        ],
    ))?;
    ready(&mut ea)?;
    // Handshake: the first ping includes it; later ones do not.
    let first = ping_ms(NS_A, "10.200.0.2").context("no ping through the tunnel")?;
    let mut steady = Vec::new();
    for _ in 0..5 {
        if let Some(t) = ping_ms(NS_A, "10.200.0.2") {
            steady.push(t);
        }
    }
    steady.sort_by(|a, b| a.total_cmp(b));
    let steady_ms = steady.get(steady.len() / 2).copied().unwrap_or(0.0);
    let cpu0 = cpu_seconds(ea.id()) + cpu_seconds(eb.id());
    let t0 = Instant::now();
    let (tunnel, tunnel_busy) = busy(|| throughput(NS_B, NS_A, "10.200.0.2", secs))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(ea.id()) + cpu_seconds(eb.id()) - cpu0;
    let rss_running = rss_kb(ea.id()).max(rss_kb(eb.id()));
    stop(ea);
    stop(eb);

    // Memory: an engine with N configured peers (no traffic) and one with a single peer.
    sh(&["ip", "-n", NS_C, "link", "set", "lo", "up"])?;
    let mut rss = Vec::new();
    for n in [1usize, npeers] {
        let peers: Vec<(String, String, Option<String>)> = (0..n)
            .map(|i| {
                (
                    SecretKey::generate().public().to_base64(),
                    format!("10.201.{}.{}/32", (i + 2) / 256, (i + 2) % 256),
                    None,
                )
            })
            .collect();
        let c = dir.join(format!("c{n}.conf"));
        std::fs::write(
            &c,
            conf(&SecretKey::generate(), "10.201.0.1/16", Some(51830), &peers),
        )?;
        let mut e = spawn(&in_ns(
            NS_C,
            &[
                &me,
                "--engine",
                c.to_str().unwrap(),
                "--interface",
                "swb-mem",
                "--workers",
                &w,
            ],
        ))?;
        ready(&mut e)?;
        std::thread::sleep(Duration::from_millis(1500));
        rss.push(rss_kb(e.id()));
        stop(e);
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
    let gbit = tunnel * wall / 1e9;
    Ok(json!({
        "tool": if std::path::Path::new("/usr/bin/iperf3").exists() { "iperf3" } else { "wg-bench tcp" },
        "secs": secs,
        "workers": workers,
        "plain_veth_mbit_s": (plain / 1e6).round(),
        "tunnel_mbit_s": (tunnel / 1e6).round(),
        "ratio": ((tunnel / plain) * 1000.0).round() / 1000.0,
        "engines_cpu_seconds_per_gbit": ((cpu / gbit) * 1000.0).round() / 1000.0,
        "engines_cpu_cores_busy": ((cpu / wall) * 100.0).round() / 100.0,
        "handshake_first_ping_ms": first,
        "steady_ping_ms": steady_ms,
        "handshake_ms": ((first - steady_ms) * 1000.0).round() / 1000.0,
        "handshake_cpu_us": handshake_cpu_us(200).round(),
        "engine_rss_kb_under_load": rss_running,
        "engine_rss_kb_1_peer": rss[0],
        format!("engine_rss_kb_{npeers}_peers"): rss[1],
        "rss_kb_per_peer": ((rss[1] as f64 - rss[0] as f64) / (npeers.max(2) - 1) as f64 * 100.0).round() / 100.0,
        "machine_cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "machine_busy_plain": (plain_busy * 100.0).round() / 100.0,
        "machine_busy_tunnel": (tunnel_busy * 100.0).round() / 100.0,
    }))
}

/// Engine mode: one interface from a .conf until SIGTERM.
fn engine(args: &[String]) -> anyhow::Result<()> {
    let path: String = arg(args, "--engine", String::new());
    let name: String = arg(args, "--interface", "wg0".to_owned());
    let workers: usize = arg(args, "--workers", 2);
    let c = WgConf::parse(&std::fs::read_to_string(&path)?)?;
    let _r = iface::from_conf(&c, &name, workers, Arc::new(SystemNet), None)?;
    println!("ready");
    std::io::stdout().flush()?;
    // SAFETY: sigwait on a set with SIGTERM and SIGINT blocked in this (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--engine") {
        return engine(&args);
    }
    if let Some(addr) = args
        .iter()
        .position(|a| a == "--sink")
        .and_then(|i| args.get(i + 1))
    {
        let l = TcpListener::bind(addr)?;
        println!("ready");
        std::io::stdout().flush()?;
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 17];
        let (mut n, start) = (0u64, Instant::now());
        loop {
            match s.read(&mut buf)? {
                0 => break,
                k => n += k as u64,
            }
        }
        println!("{}", n as f64 * 8.0 / start.elapsed().as_secs_f64());
        return Ok(());
    }
    if let Some(addr) = args
        .iter()
        .position(|a| a == "--source")
        .and_then(|i| args.get(i + 1))
    {
        let secs: u64 = arg(&args, "--secs", 10);
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 1 << 17];
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            s.write_all(&buf)?;
        }
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        bail!("wg-bench needs root and /dev/net/tun (it makes network namespaces and TUN devices)");
    }
    let v = bench(&args)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
