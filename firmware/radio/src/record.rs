//! Recording live shows to `DATA/radio/recordings/`: the stream's bytes as
//! sent, and beside them a JSON file with the start time and the titles.

use std::{
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::{codec::Codec, status::iso8601, stream::Stream};

/// One recorded show, as listed for the archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recording {
    pub mount: String,
    /// File name of the audio, in the recordings folder.
    pub file: String,
    pub content_type: String,
    pub started: String,
    pub started_unix: u64,
    /// `None` while the show is still on air (or if the box stopped mid-show).
    pub ended_unix: Option<u64>,
    pub bytes: u64,
    /// Titles with the second of the show they began at.
    pub titles: Vec<(f64, String)>,
    /// Bytes not written because the disk could not keep up.
    pub dropped_bytes: u64,
}

enum Msg {
    Data(Bytes),
    Title(f64, String),
}

/// The source side of a recording; the writing happens on its own task.
pub(crate) struct Recorder {
    tx: mpsc::Sender<Msg>,
    begun: Instant,
    title_seen: u64,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

pub(crate) fn recordings_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("radio").join("recordings")
}

impl Recorder {
    pub fn start(
        data_dir: &Path,
        mount: &str,
        codec: Codec,
        cipher: Option<secta_vault::FileCipher>,
    ) -> Recorder {
        let now = SystemTime::now();
        let stamp: String = iso8601(now)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(15)
            .collect();
        let base = format!("{}-{stamp}", mount.trim_start_matches('/'));
        let rec = Recording {
            mount: mount.to_owned(),
            file: format!("{base}.{}", codec.extension()),
            content_type: codec.content_type().to_owned(),
            started: iso8601(now),
            started_unix: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            ended_unix: None,
            bytes: 0,
            titles: Vec::new(),
            dropped_bytes: 0,
        };
        let (tx, rx) = mpsc::channel(256);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dir = recordings_dir(data_dir);
        tokio::spawn(write(dir, base, rec, rx, dropped.clone(), cipher));
        Recorder {
            tx,
            begun: Instant::now(),
            title_seen: 0,
            dropped,
        }
    }

    /// Queues bytes; if the writer is behind they are dropped (and counted), never
    /// held up: the show goes on.
    pub fn data(&mut self, b: Bytes) {
        let n = b.len() as u64;
        if self.tx.try_send(Msg::Data(b)).is_err() {
            self.dropped
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Notes the stream's title if it changed since last time.
    pub fn sync_title(&mut self, stream: &Stream) {
        let v = stream.title_version();
        if v != self.title_seen {
            self.title_seen = v;
            let at = self.begun.elapsed().as_secs_f64();
            let _ = self.tx.try_send(Msg::Title(at, stream.title()));
        }
    }

    /// Ends the recording (the writer finishes what is queued).
    pub fn finish(self) {}
}

async fn write(
    dir: PathBuf,
    base: String,
    mut rec: Recording,
    mut rx: mpsc::Receiver<Msg>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cipher: Option<secta_vault::FileCipher>,
) {
    let meta = dir.join(format!("{base}.json"));
    let seal = |rec: &Recording| -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec_pretty(rec)?;
        Ok(match &cipher {
            Some(c) => c.seal(&json),
            None => json,
        })
    };
    let mut enc = cipher.as_ref().map(|c| c.encryptor());
    let mut sealed = Vec::new();
    let result: std::io::Result<()> = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&meta, seal(&rec)?).await?;
        let mut f = tokio::fs::File::create(dir.join(&rec.file)).await?;
        tracing::info!(file = %rec.file, "radio recording started");
        while let Some(m) = rx.recv().await {
            match m {
                Msg::Data(b) => {
                    match enc.as_mut() {
                        Some(e) => {
                            sealed.clear();
                            e.update(&b, &mut sealed);
                            f.write_all(&sealed).await?;
                        }
                        None => f.write_all(&b).await?,
                    }
                    rec.bytes += b.len() as u64;
                }
                Msg::Title(at, t) => {
                    rec.titles.push((at, t));
                    tokio::fs::write(&meta, seal(&rec)?).await?;
                }
            }
        }
        if let Some(e) = enc.take() {
            sealed.clear();
            e.finish(&mut sealed);
            f.write_all(&sealed).await?;
        }
        f.flush().await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, file = %rec.file, "radio recording failed");
    }
    rec.ended_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    rec.dropped_bytes = dropped.load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(v) = seal(&rec) {
        let _ = tokio::fs::write(&meta, v).await;
    }
    tracing::info!(file = %rec.file, bytes = rec.bytes, "radio recording ended");
}

/// Every recording in `DATA/radio/recordings/`, newest first (at most 1000).
pub fn list_recordings(data_dir: &Path) -> Vec<Recording> {
    list_recordings_with(data_dir, None)
}

/// Like [`list_recordings`], for recordings encrypted with `cipher`.
pub fn list_recordings_with(
    data_dir: &Path,
    cipher: Option<&secta_vault::FileCipher>,
) -> Vec<Recording> {
    let read = |p: &Path| -> Option<Vec<u8>> {
        let bytes = std::fs::read(p).ok()?;
        match cipher {
            Some(c) => c.open(&bytes).ok(),
            None => Some(bytes),
        }
    };
    let Ok(rd) = std::fs::read_dir(recordings_dir(data_dir)) else {
        return Vec::new();
    };
    let mut v: Vec<Recording> = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .take(1000)
        .filter_map(|e| serde_json::from_slice(&read(&e.path())?).ok())
        .collect();
    v.sort_by(|a, b| {
        b.started_unix
            .cmp(&a.started_unix)
            .then(b.file.cmp(&a.file))
    });
    v
}
