//! Bad input: refused with the right status, cleaned up, and the server keeps
//! serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use secta_radio::{MountConfig, RadioConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_refused_with_icecast_statuses() {
    let r = start(RadioConfig {
        mounts: vec![MountConfig {
            name: "/own".into(),
            password: Some("own-pw".into()),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let put = |auth: String, mount: &str| {
        format!("PUT {mount} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: audio/mpeg\r\n\r\n")
    };
    let (c, t) = raw(r.addr, put(basic("source", "wrong"), "/live").as_bytes()).await;
    assert_eq!(c, 401, "{t}");
    assert!(t.contains("WWW-Authenticate: Basic"));
    let (c, _) = raw(
        r.addr,
        b"PUT /live HTTP/1.1\r\nContent-Type: audio/mpeg\r\n\r\n",
    )
    .await;
    assert_eq!(c, 401, "no credentials");
    let (c, _) = raw(r.addr, put(basic("admin", PASSWORD), "/live").as_bytes()).await;
    assert_eq!(c, 401, "user must be source");
    // A mount with its own password does not take the global one.
    let (c, _) = raw(r.addr, put(basic("source", PASSWORD), "/own").as_bytes()).await;
    assert_eq!(c, 401);
    let unsupported = format!(
        "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: text/html\r\n\r\n",
        basic("source", PASSWORD)
    );
    assert_eq!(raw(r.addr, unsupported.as_bytes()).await.0, 415);

    // Busy mount: the second source gets 403 and the first keeps streaming.
    let mut first = source_client(r.addr, "/live", PASSWORD).await;
    first.write_all(&frames(20)).await.unwrap();
    wait_status(r.addr, |s| mount_listeners(s, "/live").is_some()).await;
    let (c, t) = raw(r.addr, put(basic("source", PASSWORD), "/live").as_bytes()).await;
    assert_eq!(c, 403, "{t}");
    assert!(t.contains("Mountpoint in use"));
    let (mut l, _, _) = listener(r.addr, "/live", false).await;
    first.write_all(&frames(5)).await.unwrap();
    assert!(!read_for(&mut l, Duration::from_millis(800))
        .await
        .is_empty());

    // The right password on its own mount, with 100-continue and a chunked body.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let req = format!(
        "PUT /own HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        basic("source", "own-pw")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).await.unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    let body = frames(10);
    for piece in body.chunks(1000) {
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(piece).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    wait_status(r.addr, |st| mount_listeners(st, "/own").is_some()).await;
    let (mut l2, _, _) = listener(r.addr, "/own", false).await;
    let got = read_for(&mut l2, Duration::from_millis(800)).await;
    assert_eq!(got, body, "the burst is the de-chunked body");
    s.write_all(b"0\r\n\r\n").await.unwrap();
    wait_status(r.addr, |st| mount_listeners(st, "/own").is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_methods_and_header_floods() {
    let r = start(RadioConfig::default()).await;
    assert_eq!(raw(r.addr, b"DELETE /live HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(raw(r.addr, b"BREW /pot HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(
        raw(r.addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await.0,
        400
    );
    assert_eq!(
        raw(r.addr, b"GET /nothing-here HTTP/1.0\r\n\r\n").await.0,
        404
    );
    assert_eq!(
        raw(r.addr, b"GET /../etc/passwd HTTP/1.0\r\n\r\n").await.0,
        404
    );
    // 100 headers, or 20 KB of one header.
    let mut many = b"GET /live HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        many.extend(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    assert_eq!(raw(r.addr, &many).await.0, 431);
    let mut long = b"GET /live HTTP/1.1\r\nX-Long: ".to_vec();
    long.extend(vec![b'a'; 20_000]);
    long.extend(b"\r\n\r\n");
    assert_eq!(raw(r.addr, &long).await.0, 431);

    // A source that sends garbage instead of audio is dropped.
    let mut g = source_client(r.addr, "/junk", PASSWORD).await;
    let _ = g.write_all(&vec![b'x'; 20_000]).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), g.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "garbage source closed"
    );
    assert!(sources(&status(r.addr).await).is_empty());
    // A source with the wrong content for its type (not Ogg) is dropped too.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let req = format!(
        "SOURCE /o HTTP/1.0\r\nAuthorization: Basic {}\r\nContent-Type: application/ogg\r\n\r\n",
        basic("source", PASSWORD)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let _ = s.write_all(&frames(40)).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok());
    assert!(sources(&status(r.addr).await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_open_and_close_and_limits_hold() {
    let r = start(RadioConfig {
        max_listeners: 3,
        max_connections: 400,
        source_timeout_secs: 300,
        mounts: vec![MountConfig {
            name: "/small".into(),
            max_listeners: Some(1),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let mut src = source_client(r.addr, "/live", PASSWORD).await;
    src.write_all(&frames(30)).await.unwrap();
    let mut small = source_client(r.addr, "/small", PASSWORD).await;
    small.write_all(&frames(30)).await.unwrap();
    wait_status(r.addr, |s| sources(s).len() == 2).await;
    // 10,000 connections that open and close, 200 at a time, some sending half a request.
    for batch in 0..50 {
        let mut tasks = Vec::new();
        for i in 0..200 {
            let addr = r.addr;
            tasks.push(tokio::spawn(async move {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    match (batch + i) % 3 {
                        0 => {}
                        1 => {
                            let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost").await;
                        }
                        _ => {
                            let _ = s.write_all(b"GET /live HTTP/1.0\r\n\r\n").await;
                            let mut b = [0u8; 64];
                            let _ = s.read(&mut b).await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Every one of them is cleaned up: no listener is left counted.
    wait_status(r.addr, |s| mount_listeners(s, "/live") == Some(0)).await;
    // Per-mount and global limits.
    let (_a, head, _) = listener(r.addr, "/small", false).await;
    assert!(head.starts_with("HTTP/1.0 200"));
    assert_eq!(raw(r.addr, b"GET /small HTTP/1.0\r\n\r\n").await.0, 403);
    let (_b, _, _) = listener(r.addr, "/live", false).await;
    let (_c, _, _) = listener(r.addr, "/live", false).await;
    let (c, t) = raw(r.addr, b"GET /live HTTP/1.0\r\n\r\n").await;
    assert_eq!(c, 403, "global limit: {t}");
    // And the server still serves the listeners it has.
    src.write_all(&frames(3)).await.unwrap();
    small.write_all(&frames(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_reads_is_dropped_not_buffered() {
    let r = start(RadioConfig {
        burst_size: 8192,
        queue_size: 512 * 1024,
        send_timeout_secs: 2,
        source_timeout_secs: 60,
        ..Default::default()
    })
    .await;
    let mut src = source_client(r.addr, "/live", PASSWORD).await;
    src.write_all(&frames(10)).await.unwrap();
    wait_status(r.addr, |s| mount_listeners(s, "/live").is_some()).await;
    // A small receive window, set before connecting so it sticks.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stuck = sock.connect(r.addr).await.unwrap();
    stuck.writable().await.unwrap();
    stuck.try_write(b"GET /live HTTP/1.0\r\n\r\n").unwrap();
    let (mut good, _, _) = listener(r.addr, "/live", false).await;
    wait_status(r.addr, |s| mount_listeners(s, "/live") == Some(2)).await;
    // Push 8 MB fast; the good listener reads it all, the stuck one never reads.
    let data = frames(20_000);
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        let mut buf = vec![0u8; 65536];
        while n < 8_000_000 {
            match tokio::time::timeout(Duration::from_secs(10), good.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(k)) => n += k,
            }
        }
        (n, good)
    });
    // Paced (~1.6 MB/s) so a reading listener keeps up; the stuck one cannot
    // (8 MB is more than its socket buffers and the 512 KB queue hold).
    for piece in data.chunks(32 * 1024) {
        src.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (got, _good) = reader.await.unwrap();
    assert!(got >= 8_000_000, "the reading listener got {got} bytes");
    wait_status(r.addr, |s| mount_listeners(s, "/live") == Some(1)).await;
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_source_times_out_and_listeners_move_to_the_fallback() {
    let r = start(RadioConfig {
        source_timeout_secs: 2,
        metaint: 1000,
        mounts: vec![
            MountConfig {
                name: "/live".into(),
                fallback: Some("/backup".into()),
                fallback_override: true,
                ..Default::default()
            },
            MountConfig {
                name: "/backup".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    })
    .await;
    let mut backup = source_client(r.addr, "/backup", PASSWORD).await;
    backup.write_all(&frames(10)).await.unwrap();
    assert_eq!(set_title(r.addr, "/backup", PASSWORD, "backup").await, 200);
    let mut live = source_client(r.addr, "/live", PASSWORD).await;
    live.write_all(&frames(10)).await.unwrap();
    wait_status(r.addr, |s| sources(s).len() == 2).await;
    assert_eq!(set_title(r.addr, "/live", PASSWORD, "live").await, 200);
    let (mut l, _, metaint) = listener(r.addr, "/live", true).await;
    let metaint = metaint.unwrap();
    // The live source now stalls (sends nothing, stays connected); the backup goes on.
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            if backup.write_all(&frames(3)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        backup
    });
    let got = read_for(&mut l, Duration::from_secs(3500 / 1000 + 1)).await;
    let (_, metas) = split_icy(&got, metaint);
    assert_eq!(metas.first().map(String::as_str), Some("live"));
    assert_eq!(
        metas.last().map(String::as_str),
        Some("backup"),
        "{metas:?}"
    );
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(2), live.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "stalled source closed"
    );
    // The stalled source's mount is free again for a new source.
    let _back = source_client(r.addr, "/live", PASSWORD).await;
    drop(feeder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_times_out_with_408() {
    let r = start(RadioConfig {
        header_timeout_secs: 1,
        ..Default::default()
    })
    .await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let begun = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.0 408"),
        "{buf:?}"
    );
    assert!(begun.elapsed() < Duration::from_secs(4));
    // A connection that sends nothing at all is just closed.
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    let mut b = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))));
}
