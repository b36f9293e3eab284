//! A live source: authenticate, claim the mount, then pass the audio into the
//! mount's stream until the source leaves, stalls or sends garbage.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    codec::{self, Codec, PageSplitter},
    http::{self, Chunked, Request},
    record::Recorder,
    same_secret,
    stream::{Stream, StreamInfo, CHUNK, HOLD},
    valid_mount, Inner, Mount, RadioEvent,
};

/// Bytes the first check of a source's audio may look at.
const SNIFF_LIMIT: usize = 16 * 1024;

pub(crate) async fn run(inner: Arc<Inner>, mut sock: TcpStream, req: Request) {
    let name = req.path.clone();
    if !valid_mount(&name) {
        http::error(&mut sock, 400, "Bad Mountpoint", "").await;
        return;
    }
    let mcfg = inner.cfg.mount(&name);
    let ok = req
        .basic_password(&["source"])
        .is_some_and(|p| same_secret(&p, inner.password_for(&mcfg)));
    if !ok {
        tracing::info!(mount = %name, "radio source refused: wrong or missing credentials");
        http::error(
            &mut sock,
            401,
            "Authentication Required",
            "WWW-Authenticate: Basic realm=\"Icecast2 Server\"\r\n",
        )
        .await;
        return;
    }
    let Some(codec) = Codec::from_content_type(req.header("content-type")) else {
        http::error(&mut sock, 415, "Content-type not supported", "").await;
        return;
    };
    let info = StreamInfo {
        name: req.header("ice-name").map(clean),
        description: req.header("ice-description").map(clean),
        genre: req.header("ice-genre").map(clean),
        url: req.header("ice-url").map(clean),
        bitrate: req.header("ice-bitrate").map(clean),
        audio_info: req.header("ice-audio-info").map(clean),
        public: req.header("ice-public") == Some("1"),
        title: String::new(),
    };
    let mount = inner.mount_entry(&name);
    let stream = Arc::new(Stream::new(codec, inner.cfg.queue_size, info, false));
    let refused = {
        let mut live = mount.live.lock().expect("mount lock");
        if live.is_some() {
            Some("Mountpoint in use")
        } else if inner
            .sources
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            >= inner.cfg.max_sources
        {
            inner
                .sources
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            Some("Too many sources connected")
        } else {
            *live = Some(stream.clone());
            None
        }
    };
    if let Some(reason) = refused {
        tracing::info!(mount = %name, "radio source refused: {reason}");
        http::error(&mut sock, 403, reason, "").await;
        return;
    }
    let mut guard = LiveGuard {
        inner: inner.clone(),
        mount: mount.clone(),
        announced: false,
    };
    let expect = req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let answer: &[u8] = if expect {
        b"HTTP/1.1 100 Continue\r\n\r\n"
    } else {
        b"HTTP/1.0 200 OK\r\n\r\n"
    };
    if sock.write_all(answer).await.is_err() {
        return;
    }
    tracing::info!(mount = %name, method = %req.method, content_type = codec.content_type(), "radio source connected");
    let recorder = mount
        .cfg
        .record
        .then(|| {
            // Encrypted from the first byte when the box has a data key (no
            // recording at all if that key was destroyed by a wipe).
            let cipher = inner.vault.as_ref().map(|v| v.file_cipher());
            match cipher {
                Some(Err(_)) => None,
                Some(Ok(c)) => Some(Recorder::start(&inner.data_dir, &name, codec, Some(c))),
                None => Some(Recorder::start(&inner.data_dir, &name, codec, None)),
            }
        })
        .flatten();
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = req
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut feed = Feed {
        inner: &inner,
        mount: &mount,
        stream: &stream,
        recorder,
        sniff: Some(Vec::new()),
        pages: PageSplitter::default(),
        in_headers: false,
        announced: false,
        pending: bytes::BytesMut::new(),
        pending_since: std::time::Instant::now(),
    };
    let why = body_loop(&inner, &mut sock, req.rest, chunked, length, &mut feed).await;
    feed.flush();
    match why {
        End::Eof => tracing::info!(mount = %name, "radio source disconnected"),
        End::Stalled => tracing::warn!(mount = %name, "radio source stalled; disconnected"),
        End::Bad(what) => tracing::warn!(mount = %name, "radio source dropped: {what}"),
        End::Shutdown => {}
    }
    guard.announced = feed.announced;
    if let Some(r) = feed.recorder.take() {
        r.finish();
    }
}

enum End {
    Eof,
    Stalled,
    Bad(&'static str),
    Shutdown,
}

async fn body_loop(
    inner: &Inner,
    sock: &mut TcpStream,
    first: bytes::BytesMut,
    chunked: bool,
    mut length: Option<u64>,
    feed: &mut Feed<'_>,
) -> End {
    let timeout = Duration::from_secs(inner.cfg.source_timeout_secs);
    let mut dechunk = chunked.then(Chunked::default);
    let mut buf = first;
    let mut decoded = Vec::new();
    loop {
        if !buf.is_empty() {
            let raw = buf.split().freeze();
            let data = match &mut dechunk {
                Some(c) => {
                    decoded.clear();
                    if let Err(e) = c.feed(&raw, &mut decoded) {
                        return End::Bad(e);
                    }
                    Bytes::copy_from_slice(&decoded)
                }
                None => match length {
                    Some(left) => {
                        let take = (raw.len() as u64).min(left) as usize;
                        length = Some(left - take as u64);
                        raw.slice(..take)
                    }
                    None => raw,
                },
            };
            if let Err(e) = feed.data(data) {
                return End::Bad(e);
            }
            if dechunk.as_ref().is_some_and(|c| c.done()) || length == Some(0) {
                return End::Eof;
            }
        }
        buf.reserve(16 * 1024);
        let wait = if feed.pending.is_empty() {
            timeout
        } else {
            HOLD
        };
        let read = tokio::select! {
            _ = inner.cancel.cancelled() => return End::Shutdown,
            r = tokio::time::timeout(wait, sock.read_buf(&mut buf)) => r,
        };
        match read {
            Err(_) if !feed.pending.is_empty() => feed.flush(),
            Err(_) => return End::Stalled,
            Ok(Ok(0)) | Ok(Err(_)) => return End::Eof,
            Ok(Ok(_)) => {}
        }
    }
}

/// Takes decoded body bytes into the stream.
struct Feed<'a> {
    inner: &'a Inner,
    mount: &'a Arc<Mount>,
    stream: &'a Arc<Stream>,
    recorder: Option<Recorder>,
    /// First bytes kept until they are known to be audio.
    sniff: Option<Vec<u8>>,
    pages: PageSplitter,
    in_headers: bool,
    announced: bool,
    /// MP3/AAC bytes not yet pushed: sources write small pieces, and every push
    /// wakes every listener, so pieces are gathered into chunks of about
    /// [`CHUNK`] bytes (held at most [`HOLD`]).
    pending: bytes::BytesMut,
    pending_since: std::time::Instant,
}

impl Feed<'_> {
    fn data(&mut self, data: Bytes) -> Result<(), &'static str> {
        if data.is_empty() {
            return Ok(());
        }
        let data = match self.sniff.take() {
            None => data,
            Some(mut seen) => {
                seen.extend_from_slice(&data);
                match codec::looks_like(self.stream.codec, &seen) {
                    Some(true) => Bytes::from(seen),
                    Some(false) => return Err("not audio of the declared type"),
                    None if seen.len() >= SNIFF_LIMIT => {
                        return Err("not audio of the declared type")
                    }
                    None => {
                        self.sniff = Some(seen);
                        return Ok(());
                    }
                }
            }
        };
        if !self.announced {
            self.announced = true;
            self.inner.changed();
            let info = self.stream.info();
            self.inner.emit(RadioEvent::OnAir {
                mount: self.mount.name.clone(),
                name: info
                    .name
                    .or_else(|| self.mount.cfg.stream_name.clone())
                    .unwrap_or_else(|| self.mount.name.clone()),
                listen_url: self.inner.listen_url(&self.mount.name),
            });
        }
        if let Some(r) = &mut self.recorder {
            r.sync_title(self.stream);
            r.data(data.clone());
        }
        if self.stream.codec != Codec::Ogg {
            if self.pending.is_empty() {
                self.pending_since = std::time::Instant::now();
            }
            self.pending.extend_from_slice(&data);
            if self.pending.len() >= CHUNK || self.pending_since.elapsed() >= HOLD {
                self.flush();
            }
            return Ok(());
        }
        for page in self.pages.push(&data)? {
            if page.bos() && !self.in_headers {
                self.stream.begin_headers();
                self.in_headers = true;
            }
            let g = page.granule();
            if self.in_headers && (g == 0 || g == u64::MAX) {
                if let Some(title) = codec::comment_title(page.body()) {
                    self.set_title(&title);
                }
                self.stream.push_header(page.bytes);
            } else {
                if self.in_headers {
                    self.stream.end_headers();
                    self.in_headers = false;
                }
                self.stream.push(page.bytes);
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.stream.push(self.pending.split().freeze());
        }
    }

    fn set_title(&mut self, title: &str) {
        if self.stream.set_title(title) {
            self.inner.emit(RadioEvent::Title {
                mount: self.mount.name.clone(),
                title: title.to_owned(),
                automatic: false,
            });
        }
    }
}

/// Frees the mount when the source task ends, however it ends.
struct LiveGuard {
    inner: Arc<Inner>,
    mount: Arc<Mount>,
    announced: bool,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Some(s) = self.mount.live.lock().expect("mount lock").take() {
            s.close();
        }
        self.inner
            .sources
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.inner.changed();
        if self.announced {
            self.inner.emit(RadioEvent::OffAir {
                mount: self.mount.name.clone(),
            });
        }
    }
}

/// A header value fit to repeat in our own headers and JSON.
pub(crate) fn clean(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).take(256).collect()
}

/// Records a title set through the admin endpoint on a live mount.
pub(crate) fn admin_title(inner: &Inner, mount: &Mount, title: &str) -> bool {
    let Some(stream) = mount.live.lock().expect("mount lock").clone() else {
        return false;
    };
    if stream.set_title(title) {
        inner.emit(RadioEvent::Title {
            mount: mount.name.clone(),
            title: title.to_owned(),
            automatic: false,
        });
    }
    true
}
