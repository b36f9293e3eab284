//! The auto-DJ: playlists of files made by ffmpeg, fallback from a live mount
//! and back without reconnecting, and real-time pacing over 30 s.

mod common;

use std::time::{Duration, Instant};

use common::*;
use secta_radio::{codec::mp3_frame_len, MountConfig, RadioConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn playlist_config(dir: &std::path::Path) -> RadioConfig {
    RadioConfig {
        metaint: 4000,
        mounts: vec![
            MountConfig {
                name: "/live".into(),
                fallback: Some("/auto".into()),
                fallback_override: true,
                ..Default::default()
            },
            MountConfig {
                name: "/auto".into(),
                playlist: Some(dir.to_owned()),
                stream_name: Some("Авто".into()),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_fall_back_to_the_auto_dj_and_return_to_the_live_show() {
    if skip_without_ffmpeg("listeners_fall_back_to_the_auto_dj_and_return_to_the_live_show") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let songs = dir.path().join("songs");
    std::fs::create_dir(&songs).unwrap();
    make_mp3(&songs, "1.mp3", 6, 440, Some("Первая песня"));
    make_mp3(&songs, "2.mp3", 6, 660, Some("Вторая"));
    // A WAV file: not MP3, so the auto-DJ skips it (it does not transcode).
    let st = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg("sine=duration=2")
        .arg(songs.join("0.wav"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut cfg = playlist_config(&songs);
    let r = start_in(&mut cfg, dir).await;
    wait_status(r.addr, |s| mount_listeners(s, "/auto").is_some()).await;
    let live_file = make_mp3(r.dir.path(), "live.mp3", 20, 880, None);
    let live_bytes = std::fs::read(&live_file).unwrap();

    let mut live = source_client(r.addr, "/live", PASSWORD).await;
    live.write_all(&live_bytes[..32_000]).await.unwrap();
    wait_status(r.addr, |s| mount_listeners(s, "/live").is_some()).await;
    assert_eq!(
        set_title(r.addr, "/live", PASSWORD, "Прямой эфир").await,
        200
    );
    let (mut l, _, metaint) = listener(r.addr, "/live", true).await;
    let metaint = metaint.unwrap();
    // ICY blocks run across reads: keep everything and split prefixes.
    let mut all = read_for(&mut l, Duration::from_millis(800)).await;
    let (audio, metas) = split_icy(&all, metaint);
    assert_eq!(metas, vec!["Прямой эфир".to_string()]);
    assert!(contains(&live_bytes, &audio));
    let (seen_audio, seen_metas) = (audio.len(), metas.len());

    // The live source leaves: the same connection goes on with the auto-DJ.
    drop(live);
    all.extend(read_for(&mut l, Duration::from_secs(3)).await);
    let (audio, metas) = split_icy(&all, metaint);
    assert!(
        audio.len() - seen_audio > 16_000,
        "auto-DJ audio: {} bytes",
        audio.len() - seen_audio
    );
    assert!(
        metas[seen_metas..]
            .iter()
            .any(|m| m == "Первая песня" || m == "Вторая"),
        "auto-DJ title: {metas:?}"
    );
    assert!(mount_listeners(&status(r.addr).await, "/live").is_none());

    // The live source returns: fallback-override moves the listener back.
    let mut live = source_client(r.addr, "/live", PASSWORD).await;
    live.write_all(&live_bytes[32_000..96_000]).await.unwrap();
    wait_status(r.addr, |s| mount_listeners(s, "/live") == Some(1)).await;
    assert_eq!(
        set_title(r.addr, "/live", PASSWORD, "Снова в эфире").await,
        200
    );
    all.extend(read_for(&mut l, Duration::from_millis(800)).await);
    live.write_all(&live_bytes[96_000..128_000]).await.unwrap();
    all.extend(read_for(&mut l, Duration::from_millis(800)).await);
    let (_, metas) = split_icy(&all, metaint);
    assert_eq!(metas.last().map(String::as_str), Some("Снова в эфире"));
    assert!(!metas.iter().any(|m| m == "0"), "the WAV file was skipped");

    // The auto-DJ's own mount plays a stream ffmpeg decodes as MP3.
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-i"])
        .arg(format!("http://{}/auto", r.addr))
        .args(["-t", "2", "-f", "null", "-"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("Audio: mp3"), "{err}");
    let st = status(r.addr).await;
    assert!(sources(&st).iter().any(|s| s["server_name"] == "Авто"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_dj_media_time_stays_within_a_second_of_wall_clock_over_30_s() {
    if skip_without_ffmpeg("auto_dj_media_time_stays_within_a_second_of_wall_clock_over_30_s") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let songs = dir.path().join("songs");
    std::fs::create_dir(&songs).unwrap();
    // Two tracks so the 30 s span a track change.
    make_mp3(&songs, "a.mp3", 14, 440, Some("A"));
    make_mp3(&songs, "b.mp3", 30, 550, Some("B"));
    let mut cfg = playlist_config(&songs);
    cfg.burst_size = 0;
    let r = start_in(&mut cfg, dir).await;
    wait_status(r.addr, |s| mount_listeners(s, "/auto").is_some()).await;
    let (mut l, _, _) = listener(r.addr, "/auto", false).await;
    // Count MP3 frames (1152 samples at 44.1 kHz each) as they arrive.
    let mut pending = Vec::new();
    let mut frames = 0u64;
    let mut buf = vec![0u8; 16384];
    let mut first: Option<(Instant, u64)> = None;
    let mut worst = 0f64;
    let end = Instant::now() + Duration::from_secs(31);
    while Instant::now() < end {
        let n = tokio::time::timeout(Duration::from_secs(3), l.read(&mut buf))
            .await
            .expect("the auto-DJ never goes silent")
            .unwrap();
        assert!(n > 0);
        pending.extend_from_slice(&buf[..n]);
        let mut i = 0;
        while let Some(len) = mp3_frame_len(&pending[i..]) {
            if pending.len() < i + len {
                break;
            }
            i += len;
            frames += 1;
        }
        assert!(i > 0 || pending.len() < 2000, "stream lost MP3 frame sync");
        pending.drain(..i);
        let now = Instant::now();
        let (t0, f0) = *first.get_or_insert((now, frames));
        let wall = (now - t0).as_secs_f64();
        let media = (frames - f0) as f64 * 1152.0 / 44100.0;
        if wall > 0.0 {
            worst = worst.max((media - wall).abs());
        }
    }
    let (t0, f0) = first.unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let media = (frames - f0) as f64 * 1152.0 / 44100.0;
    println!("auto-DJ pacing: {media:.2} s of audio in {wall:.2} s, worst drift {worst:.3} s");
    assert!(wall >= 29.0);
    assert!(
        worst < 1.0,
        "media time drifted {worst:.3} s from wall-clock time"
    );
}
