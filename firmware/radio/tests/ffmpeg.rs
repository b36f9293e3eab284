//! Real source clients and listeners: ffmpeg sends MP3 and Ogg/Opus with the
//! Icecast protocol (PUT), a legacy SOURCE client sends known bytes; raw ICY
//! listeners check the bytes and metadata; ffmpeg/ffprobe decode what they get.

mod common;

use std::{process::Stdio, time::Duration};

use common::*;
use secta_radio::RadioConfig;
use tokio::{io::AsyncWriteExt, process::Command};

/// ffmpeg as an Icecast source (PUT, `Expect: 100-continue`), in real time.
fn ffmpeg_source(
    addr: std::net::SocketAddr,
    mount: &str,
    args: &[&str],
    content_type: &str,
) -> tokio::process::Child {
    Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-re"])
        .args(args)
        .args(["-content_type", content_type, "-ice_name", "ffmpeg show"])
        .arg(format!("icecast://source:{PASSWORD}@{addr}{mount}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// ffmpeg as a listener: decodes `secs` seconds; returns (ok, stderr).
async fn ffmpeg_listen(addr: std::net::SocketAddr, mount: &str, secs: u32) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-i"])
            .arg(format!("http://{addr}{mount}"))
            .args(["-t", &secs.to_string(), "-f", "null", "-"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ffmpeg listener finished")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_put_mp3_reaches_icy_listeners_byte_for_byte() {
    if skip_without_ffmpeg("ffmpeg_put_mp3_reaches_icy_listeners_byte_for_byte") {
        return;
    }
    let r = start(RadioConfig {
        metaint: 8192,
        ..Default::default()
    })
    .await;
    let file = make_mp3(r.dir.path(), "show.mp3", 20, 440, None);
    let sent = std::fs::read(&file).unwrap();
    let file_s = file.to_str().unwrap();
    let mut src = ffmpeg_source(
        r.addr,
        "/live",
        &[
            "-i",
            file_s,
            "-c:a",
            "copy",
            "-f",
            "mp3",
            "-id3v2_version",
            "0",
            "-write_xing",
            "0",
        ],
        "audio/mpeg",
    );
    wait_status(r.addr, |s| mount_listeners(s, "/live").is_some()).await;
    let st = status(r.addr).await;
    let live = &sources(&st)[0];
    assert_eq!(live["server_type"], "audio/mpeg");
    assert_eq!(live["server_name"], "ffmpeg show");
    assert!(st["icestats"]["server_start_iso8601"].is_string());

    let (mut icy, head, metaint) = listener(r.addr, "/live", true).await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: audio/mpeg"), "{head}");
    let metaint = metaint.expect("icy-metaint");
    assert_eq!(metaint, 8192);
    let (mut plain, head2, none) = listener(r.addr, "/live", false).await;
    assert!(none.is_none() && !head2.contains("icy-metaint"));
    assert_eq!(
        set_title(r.addr, "/live", PASSWORD, "Эфир: утро").await,
        200
    );
    let got = read_for(&mut icy, Duration::from_secs(4)).await;
    let got_plain = read_for(&mut plain, Duration::from_millis(500)).await;
    let (audio, metas) = split_icy(&got, metaint);
    assert!(audio.len() > 3 * metaint, "got {} audio bytes", audio.len());
    assert!(
        metas.iter().any(|m| m == "Эфир: утро"),
        "title in the metadata: {metas:?}"
    );
    // Everything between metadata blocks is exactly what the source sent.
    assert!(
        contains(&sent, &audio),
        "listener audio is a run of the sent bytes"
    );
    assert!(contains(&sent, &got_plain[..got_plain.len().min(60_000)]));
    assert!(!got_plain.windows(12).any(|w| w == b"StreamTitle="));
    assert_eq!(
        status(r.addr).await["icestats"]["source"]["title"],
        "Эфир: утро"
    );

    // ffmpeg as a listener decodes the stream.
    let (ok, err) = ffmpeg_listen(r.addr, "/live", 3).await;
    assert!(ok && err.contains("Audio: mp3"), "{err}");
    let _ = src.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_put_ogg_opus_decodes_for_late_listeners() {
    if skip_without_ffmpeg("ffmpeg_put_ogg_opus_decodes_for_late_listeners") {
        return;
    }
    let r = start(RadioConfig::default()).await;
    let mut src = ffmpeg_source(
        r.addr,
        "/opus",
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=330:sample_rate=48000:duration=30",
            "-c:a",
            "libopus",
            "-b:a",
            "64k",
            "-metadata",
            "title=Вечерний эфир",
            "-f",
            "ogg",
        ],
        "application/ogg",
    );
    wait_status(r.addr, |s| mount_listeners(s, "/opus").is_some()).await;
    // Join well after the Ogg headers went by: the server must send them first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = status(r.addr).await;
    assert_eq!(st["icestats"]["source"]["server_type"], "application/ogg");
    assert_eq!(
        st["icestats"]["source"]["title"], "Вечерний эфир",
        "title from the in-band Opus comments"
    );
    // Ogg titles are in-band: no ICY blocks even when asked (like Icecast).
    let (_l, head, metaint) = listener(r.addr, "/opus", true).await;
    assert!(metaint.is_none(), "{head}");
    let (ok, err) = ffmpeg_listen(r.addr, "/opus", 3).await;
    assert!(ok, "{err}");
    assert!(err.contains("Audio: opus"), "{err}");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
        ])
        .arg(format!("http://{}/opus", r.addr))
        .kill_on_drop(true)
        .output();
    let probe = tokio::time::timeout(Duration::from_secs(20), probe)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "opus");
    let _ = src.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_source_client_with_burst_on_connect() {
    if skip_without_ffmpeg("legacy_source_client_with_burst_on_connect") {
        return;
    }
    let r = start(RadioConfig {
        burst_size: 32 * 1024,
        ..Default::default()
    })
    .await;
    let file = make_mp3(r.dir.path(), "a.mp3", 10, 523, None);
    let bytes = std::fs::read(&file).unwrap();
    let mut s = source_client(r.addr, "/legacy", PASSWORD).await;
    // Send 100 KB at once, then nothing: a new listener gets the last ≤ 32 KB burst.
    s.write_all(&bytes[..100_000]).await.unwrap();
    wait_status(r.addr, |st| mount_listeners(st, "/legacy").is_some()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut l, _, _) = listener(r.addr, "/legacy", false).await;
    let burst = read_for(&mut l, Duration::from_millis(700)).await;
    assert!(
        burst.len() > 16 * 1024 && burst.len() <= 32 * 1024,
        "burst of {} bytes",
        burst.len()
    );
    assert!(
        bytes[..100_000].ends_with(&burst),
        "the burst is the newest audio"
    );
    s.write_all(&bytes[100_000..]).await.unwrap();
    let rest = read_for(&mut l, Duration::from_millis(700)).await;
    assert_eq!(rest, &bytes[100_000..], "then everything sent, in order");
    let (ok, err) = ffmpeg_listen_after(r.addr, &mut s, &bytes).await;
    assert!(ok, "{err}");
}

/// ffmpeg listens while the test source keeps sending.
async fn ffmpeg_listen_after(
    addr: std::net::SocketAddr,
    s: &mut tokio::net::TcpStream,
    bytes: &[u8],
) -> (bool, String) {
    let listen = tokio::spawn(ffmpeg_listen(addr, "/legacy", 2));
    // The file again from its start (a frame boundary), in pieces, ~4× real time.
    for piece in bytes.chunks(16_000).cycle().take(200) {
        if listen.is_finished() {
            break;
        }
        let _ = s.write_all(piece).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    listen.await.unwrap()
}
