//! Shared helpers for the radio's integration tests: a radio on loopback, raw
//! HTTP clients, ffmpeg-made audio.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use secta_radio::{Radio, RadioConfig};
use secta_runtime::{Shutdown, ShutdownTrigger};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const PASSWORD: &str = "test-source-pw";

pub struct TestRadio {
    pub radio: Radio,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    trigger: ShutdownTrigger,
}

impl Drop for TestRadio {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// Starts a radio on loopback with `cfg` (listen and password are filled in).
pub async fn start(mut cfg: RadioConfig) -> TestRadio {
    let dir = tempfile::tempdir().unwrap();
    start_in(&mut cfg, dir).await
}

pub async fn start_in(cfg: &mut RadioConfig, dir: tempfile::TempDir) -> TestRadio {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    cfg.listen = addr.to_string();
    if cfg.source_password.is_none() {
        cfg.source_password = Some(PASSWORD.into());
    }
    let radio = Radio::new(cfg.clone(), dir.path()).unwrap();
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(radio.clone().serve_on(l, shutdown));
    TestRadio {
        radio,
        addr,
        dir,
        trigger,
    }
}

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `true` (and prints SKIPPED) if ffmpeg is missing.
pub fn skip_without_ffmpeg(test: &str) -> bool {
    if have("ffmpeg") && have("ffprobe") {
        return false;
    }
    println!("SKIPPED: {test} (ffmpeg not installed)");
    true
}

/// A CBR 128 kbps 44.1 kHz MP3 of `secs` seconds made by ffmpeg: bare frames,
/// no ID3 tag or Xing frame (so a copy of it is byte-identical), unless `title`
/// is given (then an ID3v2 tag with it comes first).
pub fn make_mp3(dir: &Path, name: &str, secs: u32, freq: u32, title: Option<&str>) -> PathBuf {
    let out = dir.join(name);
    let mut c = Command::new("ffmpeg");
    c.args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!(
            "sine=frequency={freq}:sample_rate=44100:duration={secs}"
        ))
        .args([
            "-ac",
            "2",
            "-c:a",
            "libmp3lame",
            "-b:a",
            "128k",
            "-write_xing",
            "0",
        ]);
    match title {
        Some(t) => c.args(["-metadata", &format!("title={t}"), "-id3v2_version", "3"]),
        None => c.args(["-id3v2_version", "0"]),
    };
    let st = c.arg(&out).status().unwrap();
    assert!(st.success(), "ffmpeg could not make {name}");
    out
}

/// Sends a raw request and returns the status code and everything read until
/// the server closes (or 5 s pass).
pub async fn raw(addr: std::net::SocketAddr, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// A legacy `SOURCE` client: returns the connected socket after the server's 200.
pub async fn source_client(addr: std::net::SocketAddr, mount: &str, pass: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "SOURCE {mount} HTTP/1.0\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nice-name: Test show\r\nice-bitrate: 128\r\n\r\n",
        basic("source", pass)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 19];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.0 200 OK\r\n\r\n");
    s
}

/// The status document.
pub async fn status(addr: std::net::SocketAddr) -> serde_json::Value {
    let (code, text) = raw(addr, b"GET /status-json.xsl HTTP/1.0\r\n\r\n").await;
    assert_eq!(code, 200, "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap()
}

/// The status entries of all sources (Icecast gives an object for one).
pub fn sources(status: &serde_json::Value) -> Vec<serde_json::Value> {
    match &status["icestats"]["source"] {
        serde_json::Value::Null => vec![],
        serde_json::Value::Array(a) => a.clone(),
        o => vec![o.clone()],
    }
}

/// Waits (≤ 10 s) until `f` holds for the status document.
pub async fn wait_status(addr: std::net::SocketAddr, f: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..100 {
        if f(&status(addr).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("status never matched: {}", status(addr).await);
}

pub fn mount_listeners(st: &serde_json::Value, mount: &str) -> Option<u64> {
    sources(st)
        .iter()
        .find(|s| s["listenurl"].as_str().is_some_and(|u| u.ends_with(mount)))
        .and_then(|s| s["listeners"].as_u64())
}

/// A listener; with `icy`, asks for metadata and returns the metaint.
pub async fn listener(
    addr: std::net::SocketAddr,
    mount: &str,
    icy: bool,
) -> (TcpStream, String, Option<usize>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {mount} HTTP/1.0\r\n{}\r\n",
        if icy { "Icy-MetaData: 1\r\n" } else { "" }
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
        assert!(head.len() < 8192);
    }
    let head = String::from_utf8(head).unwrap();
    let metaint = head
        .lines()
        .find_map(|l| l.strip_prefix("icy-metaint: "))
        .map(|v| v.trim().parse().unwrap());
    (s, head, metaint)
}

/// Splits an ICY stream into audio bytes and metadata texts; panics on a
/// malformed block.
pub fn split_icy(data: &[u8], metaint: usize) -> (Vec<u8>, Vec<String>) {
    let (mut audio, mut metas) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < data.len() {
        let n = metaint.min(data.len() - i);
        audio.extend_from_slice(&data[i..i + n]);
        i += n;
        if n < metaint || i >= data.len() {
            break;
        }
        let l = data[i] as usize * 16;
        i += 1;
        if i + l > data.len() {
            break;
        }
        if l > 0 {
            let block = &data[i..i + l];
            let text_len = block.iter().position(|&b| b == 0).unwrap_or(l);
            assert!(
                block[text_len..].iter().all(|&b| b == 0),
                "padding must be zeros"
            );
            assert!(l - text_len < 16, "a block has at most 15 bytes of padding");
            let text = String::from_utf8(block[..text_len].to_vec()).expect("UTF-8 metadata");
            assert!(
                text.starts_with("StreamTitle='") && text.ends_with("';"),
                "{text}"
            );
            metas.push(text["StreamTitle='".len()..text.len() - 2].to_owned());
        }
        i += l;
    }
    (audio, metas)
}

/// Reads from `s` for `d` (or until it closes).
pub async fn read_for(s: &mut TcpStream, d: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let end = tokio::time::Instant::now() + d;
    let mut chunk = vec![0u8; 16384];
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Sets a title through the admin endpoint; returns the HTTP status.
pub async fn set_title(addr: std::net::SocketAddr, mount: &str, pass: &str, song: &str) -> u16 {
    let q: String = form_urlencoded_encode(song);
    let req = format!(
        "GET /admin/metadata?mount={mount}&mode=updinfo&song={q} HTTP/1.0\r\nAuthorization: Basic {}\r\n\r\n",
        basic("source", pass)
    );
    raw(addr, req.as_bytes()).await.0
}

fn form_urlencoded_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `n` valid MP3 frame headers with filler (128 kbps, 44.1 kHz, 417 bytes each):
/// audio to the server's sniffer, cheap to make.
pub fn frames(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 417);
    for i in 0..n {
        let mut f = vec![(i % 251) as u8; 417];
        f[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
        v.extend(f);
    }
    v
}
