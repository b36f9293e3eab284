//! `secta-wipe-bench`: the panic wipe's timing under load, and the cost of
//! encryption at rest, in one run. Prints one JSON object.
//!
//! 1. Encryption cost: the same `secta-bench` chat workload (tests/bench)
//!    against a box with `[vault] encrypt = false` and one with encryption,
//!    alternating, `--rounds` times each; throughput and latency of each.
//! 2. Wipe: an encrypted box filled with `--data-mb` MiB of media (uploaded
//!    through the API, so encrypted as in use), `secta-bench` sending
//!    meanwhile, then the duress wipe (`POST /admin/wipe`). Reported from the
//!    box's own log line (from the decision: key destroyed, files deleted,
//!    services stopped, finished) and as seen from outside (key file gone,
//!    data directory back to its first-boot state).
//!
//! Usage: secta-wipe-bench --load PATH/secta-bench [--secta PATH/secta]
//!        [--data-mb 1024] [--messages 5000] [--rounds 2]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::{json, Value};

struct Opts {
    secta: PathBuf,
    load: PathBuf,
    data_mb: u64,
    messages: u64,
    rounds: usize,
}

fn opts() -> anyhow::Result<Opts> {
    let mut args = std::env::args().skip(1);
    let here = std::env::current_exe()?;
    let mut o = Opts {
        secta: here.with_file_name("secta"),
        load: PathBuf::new(),
        data_mb: 1024,
        messages: 5000,
        rounds: 2,
    };
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--secta" => o.secta = v()?.into(),
            "--load" => o.load = v()?.into(),
            "--data-mb" => o.data_mb = v()?.parse()?,
            "--messages" => o.messages = v()?.parse()?,
            "--rounds" => o.rounds = v()?.parse()?,
            _ => bail!("usage: secta-wipe-bench --load SECTA_BENCH [--secta SECTA] [--data-mb N] [--messages N] [--rounds N]"),
        }
    }
    if !o.load.exists() {
        bail!("--load must name the secta-bench binary (cargo build --release --manifest-path tests/bench/Cargo.toml)");
    }
    Ok(o)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Box_ {
    child: Child,
    dir: PathBuf,
    base: String,
    panel: String,
}

impl Drop for Box_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_box(o: &Opts, encrypt: bool, tag: &str) -> anyhow::Result<Box_> {
    let dir = std::env::temp_dir().join(format!("secta-wipe-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let (port, panel_port) = (free_port(), free_port());
    std::fs::write(
        data.join("secta.toml"),
        format!(
            "[box]\ndata_dir = {data:?}\n[homeserver]\nserver_name = \"127.0.0.1:{port}\"\nlisten = \"127.0.0.1:{port}\"\n[vault]\nencrypt = {encrypt}\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let child = Command::new(&o.secta)
        .args(["demo", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--portal-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--radio-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--panel-listen", &format!("127.0.0.1:{panel_port}")])
        .env("SECTA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", o.secta.display()))?;
    let b = Box_ {
        child,
        dir,
        base: format!("http://127.0.0.1:{port}"),
        panel: format!("http://127.0.0.1:{panel_port}"),
    };
    let http = reqwest::Client::new();
    let t = Instant::now();
    while http
        .get(format!("{}/_matrix/client/versions", b.base))
        .send()
        .await
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the box did not start (log in {})", b.dir.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(b)
}

/// Runs secta-bench's chat workload against `b`; its JSON.
fn load(o: &Opts, b: &Box_, label: &str, messages: u64) -> Command {
    let mut c = Command::new(&o.load);
    c.args(["--url", &b.base])
        .arg("--shared-secret-file")
        .arg(b.dir.join("data").join("registration_shared_secret"))
        .args(["--pid", &b.child.id().to_string()])
        .args([
            "--users",
            "40",
            "--rooms",
            "10",
            "--senders",
            "20",
            "--listeners",
            "40",
        ])
        .args(["--messages", &messages.to_string(), "--label", label])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

fn pick(v: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(m) = v.as_object() {
        for (k, x) in m {
            if k.contains("throughput")
                || k.contains("latency")
                || k.contains("p50")
                || k.contains("p99")
                || k.contains("rss")
                || k.contains("errors")
            {
                out.insert(k.clone(), x.clone());
            }
        }
    }
    Value::Object(out)
}

async fn encryption_cost(o: &Opts) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    let (mut plain, mut enc) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        for encrypt in [false, true] {
            let label = if encrypt { "encrypted" } else { "plain" };
            let b = start_box(o, encrypt, &format!("{label}{round}")).await?;
            let out = load(o, &b, label, o.messages).output()?;
            let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "secta-bench output: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
            let tput = v["throughput_msgs_per_s"].as_f64().unwrap_or(0.0);
            if encrypt {
                enc.push(tput)
            } else {
                plain.push(tput)
            }
            runs.push(json!({"label": label, "round": round, "figures": pick(&v)}));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    // Each round runs plain then encrypted back to back: the median of the
    // rounds' own differences is less swayed by a machine that speeds up or
    // slows down between rounds than the difference of the two medians.
    let mut paired: Vec<f64> = plain
        .iter()
        .zip(&enc)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, e)| (p - e) / p * 100.0)
        .collect();
    let paired_median = median(&mut paired);
    let (p, e) = (median(&mut plain), median(&mut enc));
    Ok(json!({
        "workload": format!("secta-bench chat: 40 users, 10 rooms, 20 senders, 40 /sync listeners, {} messages", o.messages),
        "plain_msgs_per_s_median": p,
        "encrypted_msgs_per_s_median": e,
        "encrypted_slower_percent": if p > 0.0 { ((p - e) / p * 1000.0).round() / 10.0 } else { 0.0 },
        "encrypted_slower_percent_paired_median": (paired_median * 10.0).round() / 10.0,
        "target_slower_percent_max": 15,
        "runs": runs,
    }))
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_size(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn wipe_timing(o: &Opts) -> anyhow::Result<Value> {
    let b = start_box(o, true, "wipe").await?;
    let data = b.dir.join("data");
    let st = Command::new(&o.secta)
        .args(["admin", "--data"])
        .arg(&data)
        .args([
            "user",
            "create",
            "benchadmin",
            "--password",
            "bench-password",
            "--admin",
        ])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("creating the admin user failed");
    }
    let http = reqwest::Client::new();
    let login: Value = http
        .post(format!("{}/_matrix/client/v3/login", b.base))
        .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "benchadmin"}, "password": "bench-password"}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"].as_str().context("login")?.to_owned();
    // Fill: 32 MiB uploads of varied bytes.
    let piece: Vec<u8> = (0..32u64 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let fill_t = Instant::now();
    let mut uploaded = 0u64;
    while uploaded < o.data_mb << 20 {
        let r = http
            .post(format!("{}/_matrix/media/v3/upload", b.base))
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .body(piece.clone())
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("upload failed: {}", r.status());
        }
        uploaded += piece.len() as u64;
    }
    let fill_s = fill_t.elapsed().as_secs_f64();
    let bytes_on_disk = dir_size(&data);
    // Load: secta-bench sending while the wipe comes.
    let mut loader = load(o, &b, "under-wipe", 1_000_000).spawn()?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let key_file = data.join("data.key");
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/admin/wipe", b.panel))
        .bearer_auth(&token)
        .json(&json!({"confirm": "wipe"}))
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!("wipe request: {}", r.status());
    }
    let mut key_gone_ms = None;
    let mut first_boot_ms = None;
    while t0.elapsed() < Duration::from_secs(30) {
        if key_gone_ms.is_none() && !key_file.exists() {
            key_gone_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        let left: Vec<String> = std::fs::read_dir(&data)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "secta.toml" && n != ".lock")
            .collect();
        if left.is_empty() {
            first_boot_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = loader.kill();
    let _ = loader.wait();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(b.dir.join("server.log")).unwrap_or_default();
    let inside: Value = log
        .lines()
        .find_map(|l| l.split_once("WIPE ").map(|(_, j)| j.to_owned()))
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or(Value::Null);
    Ok(json!({
        "data_mb": o.data_mb,
        "bytes_on_disk_before": bytes_on_disk,
        "fill_seconds": fill_s,
        "under_load": "secta-bench chat workload sending (20 senders, 40 /sync listeners)",
        "in_box": inside,
        "seen_outside": {
            "key_file_gone_ms": key_gone_ms,
            "data_dir_first_boot_ms": first_boot_ms,
        },
        "targets": {"key_destroyed_ms_max": 200, "services_stopped_and_files_gone_ms_max": 2000},
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let cost = encryption_cost(&o).await?;
    let wipe = wipe_timing(&o).await?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "bench": "secta-wipe-bench",
            "cpus": cpus,
            "encryption_at_rest": cost,
            "wipe": wipe,
        }))?
    );
    Ok(())
}
