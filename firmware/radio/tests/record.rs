//! Recording a live show: the bytes as sent, the start time and the titles,
//! listed for the archive.

mod common;

use std::time::Duration;

use common::*;
use secta_radio::{list_recordings, MountConfig, RadioConfig};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_show_is_recorded_with_its_titles() {
    let r = start(RadioConfig {
        mounts: vec![MountConfig {
            name: "/show".into(),
            record: true,
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let body = frames(200);
    let mut s = source_client(r.addr, "/show", PASSWORD).await;
    s.write_all(&body[..40_000]).await.unwrap();
    wait_status(r.addr, |st| mount_listeners(st, "/show").is_some()).await;
    assert_eq!(
        set_title(r.addr, "/show", PASSWORD, "Первая часть").await,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&body[40_000..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let mut recs = Vec::new();
    for _ in 0..50 {
        recs = list_recordings(r.dir.path());
        if recs.first().is_some_and(|x| x.ended_unix.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec.mount, "/show");
    assert_eq!(rec.content_type, "audio/mpeg");
    assert!(rec.ended_unix.unwrap() >= rec.started_unix);
    assert_eq!(rec.bytes, body.len() as u64);
    assert_eq!(rec.dropped_bytes, 0);
    assert_eq!(rec.titles.len(), 1);
    assert_eq!(rec.titles[0].1, "Первая часть");
    let audio = std::fs::read(r.dir.path().join("radio/recordings").join(&rec.file)).unwrap();
    assert_eq!(audio, body, "the recording is the bytes the source sent");
    // And over HTTP for the archive page.
    let (code, text) = raw(r.addr, b"GET /recordings.json HTTP/1.0\r\n\r\n").await;
    assert_eq!(code, 200);
    let list: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(list[0]["file"], rec.file.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_data_key_the_recording_and_its_titles_are_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let vault = secta_vault::Vault::open(&Default::default(), dir.path())
        .unwrap()
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = RadioConfig {
        listen: addr.to_string(),
        source_password: Some(PASSWORD.into()),
        mounts: vec![MountConfig {
            name: "/show".into(),
            record: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let radio = secta_radio::Radio::new_with_vault(cfg, dir.path(), Some(vault.clone())).unwrap();
    let (trigger, shutdown) = secta_runtime::Shutdown::new();
    tokio::spawn(radio.clone().serve_on(l, shutdown));
    let body = frames(200);
    let mut s = source_client(addr, "/show", PASSWORD).await;
    s.write_all(&body[..40_000]).await.unwrap();
    wait_status(addr, |st| mount_listeners(st, "/show").is_some()).await;
    assert_eq!(
        set_title(addr, "/show", PASSWORD, "Секретное название").await,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&body[40_000..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let cipher = vault.file_cipher().unwrap();
    let mut recs = Vec::new();
    for _ in 0..50 {
        recs = secta_radio::list_recordings_with(dir.path(), Some(&cipher));
        if recs.first().is_some_and(|x| x.ended_unix.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].titles[0].1, "Секретное название");
    let path = dir.path().join("radio/recordings").join(&recs[0].file);
    let raw_audio = std::fs::read(&path).unwrap();
    assert!(
        !contains(&raw_audio, &body[1000..1064]),
        "audio in the clear"
    );
    assert_eq!(
        cipher.read_file(&path).unwrap(),
        body,
        "decrypts to the bytes sent"
    );
    for e in std::fs::read_dir(dir.path().join("radio/recordings")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        assert!(
            !contains(&bytes, "Секретное".as_bytes()),
            "a title in the clear"
        );
    }
    // Without the key nothing is listed.
    assert!(list_recordings(dir.path()).is_empty());
    trigger.trigger();
}
