//! `--scenario media`: large media upload and download.
//!
//! Uploads a file of random bytes (from a buffer in memory) with `POST /_matrix/media/v3/upload`,
//! downloads it with the authenticated `GET /_matrix/client/v1/media/download/…` while hashing
//! the stream, and checks the SHA-256. Throughput is in MiB/s, as a median of `--runs` (3).
//! A plain TCP copy of the same bytes over loopback inside the bench is the reference. The
//! server's RSS is sampled every 50 ms meanwhile, for a small and a large file: if the server
//! streams, its peak does not grow with the file size.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{enc, idle_and_register, median, read_rss_kb, round3, Ctx};

const MIB: f64 = 1024.0 * 1024.0;
const MEDIA_TIMEOUT: Duration = Duration::from_secs(300);

/// Random bytes from a xorshift64* generator (fast; incompressible enough for a store).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Copies `data` through a TCP connection over loopback (64 KiB writes and reads).
fn loopback_copy(data: &[u8]) -> std::io::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|s| {
        let t = Instant::now();
        let writer = s.spawn(move || -> std::io::Result<()> {
            let mut c = TcpStream::connect(addr)?;
            for chunk in data.chunks(64 * 1024) {
                c.write_all(chunk)?;
            }
            c.shutdown(Shutdown::Write)
        });
        let (mut r, _) = listener.accept()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        writer
            .join()
            .map_err(|_| std::io::Error::other("writer panicked"))??;
        if n != data.len() {
            return Err(std::io::Error::other(format!(
                "copied {n} of {} bytes",
                data.len()
            )));
        }
        Ok(t.elapsed())
    })
}

/// Samples the server's VmRSS every 50 ms into the peak of the current phase.
struct Sampler {
    stop: Arc<AtomicBool>,
    /// 0 idle, 1 upload, 2 download.
    phase: Arc<AtomicUsize>,
    peaks: Arc<[AtomicU64; 3]>,
    samples: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    pid: u32,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let peaks: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let samples = Arc::new(AtomicU64::new(0));
        let (s, p, k, n) = (stop.clone(), phase.clone(), peaks.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            // Bounded by `stop`, and by 1 hour in any case.
            let until = Instant::now() + Duration::from_secs(3600);
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                if let Some(kb) = read_rss_kb(pid, "VmRSS:") {
                    k[p.load(Ordering::Relaxed)].fetch_max(kb, Ordering::Relaxed);
                    n.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            phase,
            peaks,
            samples,
            thread: Some(thread),
            pid,
        }
    }

    /// Switches phase, with one sample at the switch so short phases are seen too.
    fn phase(&self, p: usize) {
        if let Some(kb) = read_rss_kb(self.pid, "VmRSS:") {
            self.peaks[self.phase.load(Ordering::Relaxed)].fetch_max(kb, Ordering::Relaxed);
            self.peaks[p].fetch_max(kb, Ordering::Relaxed);
        }
        self.phase.store(p, Ordering::Relaxed);
    }

    fn peak(&self, p: usize) -> u64 {
        self.peaks[p].load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Uploads `data`; returns (seconds, content URI).
async fn upload(ctx: &Ctx, token: &str, data: &Bytes, filename: &str) -> Option<(f64, String)> {
    let url = format!(
        "{}/_matrix/media/v3/upload?filename={}",
        ctx.http.base,
        enc(filename)
    );
    let t = Instant::now();
    let res = ctx
        .http
        .client
        .post(&url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(data.clone())
        .timeout(MEDIA_TIMEOUT)
        .send()
        .await;
    let resp = match res {
        Ok(r) => r,
        Err(e) => {
            ctx.http.count_with_sample(
                "media_upload",
                if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                },
                &e.to_string(),
            );
            return None;
        }
    };
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let secs = t.elapsed().as_secs_f64();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let errcode = v.get("errcode").and_then(Value::as_str).unwrap_or("-");
        ctx.http.count_with_sample(
            "media_upload",
            &format!("{status} {errcode}"),
            &String::from_utf8_lossy(&body),
        );
        return None;
    }
    match v.get("content_uri").and_then(Value::as_str) {
        Some(u) => Some((secs, u.to_owned())),
        None => {
            ctx.http.count_with_sample(
                "media_upload",
                &format!("{status} no content_uri"),
                &String::from_utf8_lossy(&body),
            );
            None
        }
    }
}

/// Downloads `mxc` while hashing it; returns (seconds, bytes, SHA-256).
async fn download(ctx: &Ctx, token: &str, mxc: &str) -> Option<(f64, usize, [u8; 32])> {
    let Some((server, id)) = mxc.strip_prefix("mxc://").and_then(|r| r.split_once('/')) else {
        ctx.http
            .count_with_sample("media_download", "bad content_uri", mxc);
        return None;
    };
    let url = format!(
        "{}/_matrix/client/v1/media/download/{}/{}",
        ctx.http.base,
        enc(server),
        enc(id)
    );
    let t = Instant::now();
    let res = ctx
        .http
        .client
        .get(&url)
        .bearer_auth(token)
        .timeout(MEDIA_TIMEOUT)
        .send()
        .await;
    let mut resp = match res {
        Ok(r) => r,
        Err(e) => {
            ctx.http.count_with_sample(
                "media_download",
                if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                },
                &e.to_string(),
            );
            return None;
        }
    };
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let body = resp.bytes().await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let errcode = v.get("errcode").and_then(Value::as_str).unwrap_or("-");
        ctx.http.count_with_sample(
            "media_download",
            &format!("{status} {errcode}"),
            &String::from_utf8_lossy(&body),
        );
        return None;
    }
    let mut h = Sha256::new();
    let mut n = 0usize;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                n += c.len();
                h.update(&c);
            }
            Ok(None) => break,
            Err(e) => {
                ctx.http.count_with_sample(
                    "media_download",
                    if e.is_timeout() {
                        "timeout (body)"
                    } else {
                        "transport (body)"
                    },
                    &e.to_string(),
                );
                return None;
            }
        }
    }
    Some((t.elapsed().as_secs_f64(), n, h.finalize().into()))
}

/// Upload and download runs of one file size; returns its figures.
async fn one_size(ctx: &Arc<Ctx>, token: &str, mib: usize, runs: usize, seed: u64) -> Value {
    let len = mib * 1024 * 1024;
    let data = Bytes::from(random_bytes(len, seed));
    let want: [u8; 32] = Sha256::digest(&data).into();
    let filename = format!(
        "{}.bin",
        if mib == ctx.args.media_mb {
            "big"
        } else {
            "small"
        }
    );
    // Let the server settle after the previous size.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = ctx.rss_kb();
    // Exact peak as well: reset the server's VmHWM to its current RSS (`5` > /proc/PID/clear_refs,
    // Linux ≥ 4.0, needs the right to write there), read VmHWM after the runs.
    let hwm_reset = ctx
        .pid
        .is_some_and(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok());
    let sampler = ctx.pid.map(Sampler::start);
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let (mut sha_ok, mut sha_bad, mut size_bad) = (0usize, 0usize, 0usize);
    for k in 0..runs {
        if ctx.past_deadline() {
            break;
        }
        if let Some(s) = &sampler {
            s.phase(1);
        }
        let res = upload(ctx, token, &data, &filename).await;
        if let Some(s) = &sampler {
            s.phase(0);
        }
        let Some((secs, mxc)) = res else { continue };
        up.push(mib as f64 / secs);
        if let Some(s) = &sampler {
            s.phase(2);
        }
        let res = download(ctx, token, &mxc).await;
        if let Some(s) = &sampler {
            s.phase(0);
        }
        if let Some((secs, n, sha)) = res {
            down.push(n as f64 / MIB / secs);
            if n != len {
                size_bad += 1;
            }
            if sha == want {
                sha_ok += 1;
            } else {
                sha_bad += 1;
            }
        }
        ctx.progress(format!(
            "{mib} MiB run {}: upload {:.1} MiB/s, download {:.1} MiB/s",
            k + 1,
            up.last().copied().unwrap_or(0.0),
            down.last().copied().unwrap_or(0.0)
        ));
    }
    let peaks = sampler
        .as_ref()
        .map(|s| (s.peak(1), s.peak(2), s.samples.load(Ordering::Relaxed)));
    drop(sampler);
    let hwm = if hwm_reset {
        ctx.pid.and_then(|p| read_rss_kb(p, "VmHWM:"))
    } else {
        None
    };
    let r3 = |v: &[f64]| v.iter().map(|x| round3(*x)).collect::<Vec<_>>();
    json!({
        "file_mib": mib,
        "file_bytes": len,
        "runs": runs,
        "upload_mb_s": median(&up),
        "upload_mb_s_runs": r3(&up),
        "download_mb_s": median(&down),
        "download_mb_s_runs": r3(&down),
        "sha256_ok": sha_ok,
        "sha256_mismatch": sha_bad,
        "size_mismatch": size_bad,
        "rss_before_kb": rss_before,
        "rss_peak_upload_kb": peaks.map(|p| p.0),
        "rss_peak_download_kb": peaks.map(|p| p.1),
        "rss_peak_during_kb": peaks.map(|p| p.0.max(p.1)),
        "rss_peak_growth_kb": peaks.zip(rss_before).map(|(p, b)| p.0.max(p.1) as i64 - b as i64),
        "rss_samples": peaks.map(|p| p.2),
        "rss_hwm_during_kb": hwm,
        "rss_hwm_growth_kb": hwm.zip(rss_before).map(|(h, b)| h as i64 - b as i64),
        "rss_after_kb": ctx.rss_kb(),
    })
}

pub async fn run(ctx: Arc<Ctx>, secret: String) {
    let a = &ctx.args;
    let runs = a.runs.unwrap_or(3).max(1);
    let (big, small) = (a.media_mb.max(1), a.media_small_mb);
    ctx.set("file_mib", big);
    ctx.set("small_file_mib", small);
    ctx.set("runs", runs);
    ctx.set(
        "units",
        "MB = MiB = 2^20 bytes; mb_s = MiB per second; RSS in KiB",
    );
    let users = idle_and_register(&ctx, &secret, 1).await;
    let Some(Some(reg)) = users.into_iter().next() else {
        ctx.progress("no user: stopping");
        return;
    };
    let token = reg.user.token.clone();

    // Reference: the same number of bytes through a plain loopback TCP connection.
    let copy = tokio::task::spawn_blocking(move || {
        let data = random_bytes(big * 1024 * 1024, 7);
        (0..runs)
            .filter_map(|_| loopback_copy(&data).ok())
            .map(|d| big as f64 / d.as_secs_f64())
            .collect::<Vec<f64>>()
    })
    .await
    .unwrap_or_default();
    let copy_mb_s = median(&copy);
    ctx.set("loopback_copy_mb_s", copy_mb_s);
    ctx.set(
        "loopback_copy_mb_s_runs",
        copy.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
    );
    ctx.progress(format!(
        "loopback TCP copy of {big} MiB: {:.0} MiB/s",
        copy_mb_s.unwrap_or(0.0)
    ));

    // Small file first: a later, larger file cannot hide behind memory the small one left.
    let mut sizes = Vec::new();
    if small > 0 && small != big {
        ctx.progress(format!("{small} MiB file, {runs} runs"));
        sizes.push(one_size(&ctx, &token, small, runs, 1).await);
    }
    if ctx.past_deadline() {
        ctx.set("sizes", &sizes);
        return;
    }
    ctx.progress(format!("{big} MiB file, {runs} runs"));
    let large = one_size(&ctx, &token, big, runs, 2).await;
    let f = |k: &str| large.get(k).cloned().unwrap_or(Value::Null);
    for k in [
        "upload_mb_s",
        "download_mb_s",
        "rss_before_kb",
        "rss_peak_during_kb",
        "rss_peak_upload_kb",
        "rss_peak_download_kb",
        "rss_hwm_during_kb",
    ] {
        ctx.set(k, f(k));
    }
    let all_ok = |v: &Value| {
        v["sha256_mismatch"] == 0 && v["size_mismatch"] == 0 && v["sha256_ok"].as_u64() > Some(0)
    };
    ctx.set("sha256_ok", all_ok(&large) && sizes.iter().all(all_ok));
    let ratio = |k: &str| {
        f(k).as_f64()
            .zip(copy_mb_s)
            .map(|(x, c)| (x / c * 10000.0).round() / 10000.0)
    };
    ctx.set("upload_to_loopback_ratio", ratio("upload_mb_s"));
    ctx.set("download_to_loopback_ratio", ratio("download_mb_s"));
    if let Some(s) = sizes.first() {
        ctx.set("rss_before_small_kb", s.get("rss_before_kb"));
        ctx.set("rss_peak_during_small_kb", s.get("rss_peak_during_kb"));
        ctx.set("rss_hwm_during_small_kb", s.get("rss_hwm_during_kb"));
        let growth = |v: &Value| v.get("rss_peak_growth_kb").and_then(Value::as_i64);
        ctx.set(
            "rss_peak_growth_large_minus_small_kb",
            growth(&large).zip(growth(s)).map(|(l, s)| l - s),
        );
    }
    sizes.push(large);
    ctx.set("sizes", &sizes);
}
