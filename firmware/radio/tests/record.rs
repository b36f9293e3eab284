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
