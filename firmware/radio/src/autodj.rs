//! The auto-DJ: while no live source is on its mount, plays the files of the
//! mount's playlist folder in name order, demuxed with symphonia and paced in
//! real time by packet timestamps. Packets are passed through as they are in
//! the file (MP3 frames for an MP3 mount); files in another codec are skipped
//! with a log line — the auto-DJ does not transcode.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use symphonia::core::{
    codecs::CODEC_TYPE_MP3,
    formats::FormatOptions,
    io::MediaSourceStream,
    meta::{MetadataOptions, StandardTagKey},
    probe::Hint,
};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    codec::Codec,
    stream::{Stream, StreamInfo, CHUNK, HOLD},
    Inner, Mount, RadioEvent,
};

/// Extensions the auto-DJ looks at (others in the folder are ignored).
const AUDIO_EXT: [&str; 6] = ["mp3", "ogg", "oga", "flac", "wav", "opus"];
/// Most files read from one playlist folder.
const MAX_FILES: usize = 10_000;

/// Packets (one or more, back to back) to send at `at` seconds into their
/// track and lasting until `end`, or the track's title.
enum Item {
    Title(String),
    Packet { at: f64, end: f64, data: Bytes },
}

pub(crate) async fn run(inner: Arc<Inner>, mount: Arc<Mount>) {
    let Some(dir) = mount.cfg.playlist.clone() else {
        return;
    };
    let name = mount
        .cfg
        .stream_name
        .clone()
        .unwrap_or_else(|| format!("{} (auto-DJ)", mount.name));
    let info = StreamInfo {
        name: Some(name),
        ..Default::default()
    };
    let stream = Arc::new(Stream::new(Codec::Mp3, inner.cfg.queue_size, info, true));
    // On the mount only while the playlist has files, so an empty one is no source.
    let set = |on: bool| {
        let mut auto = mount.auto.lock().expect("mount lock");
        if auto.is_some() != on {
            *auto = on.then(|| stream.clone());
            drop(auto);
            inner.changed();
        }
    };
    let mut warned_empty = false;
    let mut clock = Clock::new();
    while !inner.cancel.is_cancelled() {
        let files = playlist(&dir);
        set(!files.is_empty());
        if files.is_empty() {
            if !warned_empty {
                tracing::warn!(mount = %mount.name, dir = %dir.display(), "auto-DJ playlist folder has no audio files");
                warned_empty = true;
            }
            if pause(&inner, Duration::from_secs(10)).await {
                break;
            }
            continue;
        }
        warned_empty = false;
        let mut played = 0;
        for f in files {
            if wait_while_live(&inner, &mount).await {
                clock = Clock::new();
            }
            if inner.cancel.is_cancelled() {
                break;
            }
            if play(&inner, &mount, &stream, &f, &mut clock).await {
                played += 1;
            }
        }
        if played == 0 && pause(&inner, Duration::from_secs(10)).await {
            break;
        }
    }
    set(false);
    stream.close();
}

/// Sleeps; `true` if shutdown came first.
async fn pause(inner: &Inner, d: Duration) -> bool {
    tokio::select! {
        _ = inner.cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Waits while a live source is on the mount; `true` if it waited.
async fn wait_while_live(inner: &Inner, mount: &Mount) -> bool {
    let mut topo = inner.topology.subscribe();
    let mut waited = false;
    while mount.is_live() && !inner.cancel.is_cancelled() {
        waited = true;
        tokio::select! {
            _ = inner.cancel.cancelled() => {}
            _ = topo.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    waited
}

/// Real-time pacing across tracks: media time since `base`.
struct Clock {
    base: Instant,
    offset: f64,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            offset: 0.0,
        }
    }
}

/// The audio files of `dir`, in name order.
fn playlist(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| AUDIO_EXT.contains(&e.to_ascii_lowercase().as_str()))
        })
        .take(MAX_FILES)
        .collect();
    v.sort();
    v
}

/// Plays one file; `false` if it was skipped.
async fn play(
    inner: &Inner,
    mount: &Mount,
    stream: &Stream,
    file: &Path,
    clock: &mut Clock,
) -> bool {
    let (tx, mut rx) = mpsc::channel::<Item>(64);
    let path = file.to_owned();
    let demux = tokio::task::spawn_blocking(move || demux(&path, tx));
    let mut last_end = 0.0f64;
    let mut any = false;
    loop {
        let item = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            i = rx.recv() => i,
        };
        let Some(item) = item else { break };
        match item {
            Item::Title(t) => {
                if stream.set_title(&t) {
                    inner.emit(RadioEvent::Title {
                        mount: mount.name.clone(),
                        title: t,
                        automatic: true,
                    });
                }
            }
            Item::Packet { at, end, data } => {
                if mount.is_live() {
                    // A live show took over the mount: stop this track.
                    break;
                }
                any = true;
                let due = clock.base + Duration::from_secs_f64((clock.offset + at).max(0.0));
                if due > Instant::now() {
                    tokio::select! {
                        _ = inner.cancel.cancelled() => break,
                        _ = tokio::time::sleep_until(due) => {}
                    }
                } else if Instant::now() - due > Duration::from_secs(2) {
                    // Far behind (a stalled disk, a suspended box): start the clock over.
                    clock.base = Instant::now();
                    clock.offset = -at;
                }
                last_end = end;
                stream.push(data);
            }
        }
    }
    drop(rx);
    let skipped = match demux.await {
        Ok(Ok(())) => {
            clock.offset += last_end;
            false
        }
        Ok(Err(why)) => {
            tracing::warn!(mount = %mount.name, file = %file.display(), "auto-DJ skips the file: {why}");
            true
        }
        Err(_) => true,
    };
    if !any && !skipped {
        tracing::warn!(mount = %mount.name, file = %file.display(), "auto-DJ file had no audio");
    }
    any && !skipped
}

/// Demuxes `path` on a blocking thread, sending the title then the packets
/// in batches.
fn demux(path: &Path, tx: mpsc::Sender<Item>) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(e) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(e);
    }
    let mut probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| format!("not a readable audio file ({e})"))?;
    let track = probed
        .format
        .default_track()
        .ok_or("no audio track")?
        .clone();
    if track.codec_params.codec != CODEC_TYPE_MP3 {
        let name = symphonia::default::get_codecs()
            .get_codec(track.codec_params.codec)
            .map_or("unknown", |d| d.short_name);
        return Err(format!(
            "its codec is {name}, the mount plays MP3 and the auto-DJ does not transcode"
        ));
    }
    let tb = track
        .codec_params
        .time_base
        .ok_or("the track has no time base")?;
    // Title: the file's tags (ID3 or the container's), else its name.
    let mut title = None;
    let mut artist = None;
    let mut look = |rev: &symphonia::core::meta::MetadataRevision| {
        for t in rev.tags() {
            match t.std_key {
                Some(StandardTagKey::TrackTitle) => title = Some(t.value.to_string()),
                Some(StandardTagKey::Artist) => artist = Some(t.value.to_string()),
                _ => {}
            }
        }
    };
    if let Some(m) = probed.metadata.get() {
        if let Some(rev) = m.current() {
            look(rev);
        }
    }
    if let Some(rev) = probed.format.metadata().current() {
        look(rev);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let shown = match (artist, title) {
        (Some(a), Some(t)) => format!("{a} - {t}"),
        (None, Some(t)) => t,
        _ => stem,
    };
    if tx.blocking_send(Item::Title(shown)).is_err() {
        return Ok(());
    }
    // Frames are sent in batches of about CHUNK bytes or HOLD of audio,
    // stamped with the first frame's time (one listener wake-up per batch).
    let mut batch = BytesMut::new();
    let mut batch_at = 0.0;
    let mut batch_end = 0.0;
    let hold = HOLD.as_secs_f64();
    // A file is bounded; the count bounds a corrupt one that never ends.
    for _ in 0..50_000_000u64 {
        let packet = match probed.format.next_packet() {
            Ok(p) => p,
            Err(symphonia::core::errors::Error::IoError(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                break
            }
            Err(symphonia::core::errors::Error::ResetRequired) => break,
            Err(e) => return Err(format!("read error ({e})")),
        };
        if packet.track_id() != track.id {
            continue;
        }
        let t = tb.calc_time(packet.ts());
        let at = t.seconds as f64 + t.frac;
        let d = tb.calc_time(packet.dur());
        let end = at + d.seconds as f64 + d.frac;
        if batch.is_empty() {
            batch_at = at;
        }
        batch.extend_from_slice(&packet.data);
        if batch.len() >= CHUNK || end - batch_at >= hold {
            let data = batch.split().freeze();
            if tx
                .blocking_send(Item::Packet {
                    at: batch_at,
                    end,
                    data,
                })
                .is_err()
            {
                return Ok(());
            }
        }
        batch_end = end;
    }
    if !batch.is_empty() {
        let data = batch.freeze();
        let _ = tx.blocking_send(Item::Packet {
            at: batch_at,
            end: batch_end,
            data,
        });
    }
    Ok(())
}
