//! One stream's audio: a shared ring of `Bytes` chunks that every listener of
//! the stream reads at its own position. Memory per stream is bounded by
//! `queue_size`; a listener costs a position, never a copy.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::SystemTime,
};

use bytes::Bytes;
use tokio::sync::watch;

use crate::codec::Codec;

/// Audio is handed to listeners in chunks of about this many bytes: every
/// push wakes every listener and costs each one a write, so small pieces
/// from sources and single frames from the auto-DJ are gathered first.
/// 8 KiB is half a second of a 128 kbps stream.
pub(crate) const CHUNK: usize = 8 * 1024;
/// The longest a gathered piece is held back before it is pushed anyway.
pub(crate) const HOLD: std::time::Duration = std::time::Duration::from_millis(500);

/// What the source said about itself (`ice-*` headers) and what is playing.
#[derive(Debug, Clone, Default)]
pub struct StreamInfo {
    pub name: Option<String>,
    pub description: Option<String>,
    pub genre: Option<String>,
    pub url: Option<String>,
    pub bitrate: Option<String>,
    pub audio_info: Option<String>,
    pub public: bool,
    pub title: String,
}

struct Ring {
    chunks: VecDeque<Bytes>,
    /// Sequence number of `chunks[0]`.
    first: u64,
    bytes: usize,
    /// Ogg: the header pages new listeners need first, and the first chunk after them.
    headers: Vec<Bytes>,
    audio_from: u64,
}

/// A live stream (from a source or the auto-DJ).
pub struct Stream {
    pub codec: Codec,
    pub started: SystemTime,
    /// `true` for the auto-DJ.
    pub automatic: bool,
    ring: Mutex<Ring>,
    cap: usize,
    /// Next sequence number; every push and the close wake listeners through it.
    head: watch::Sender<u64>,
    closed: AtomicBool,
    info: Mutex<StreamInfo>,
    title_version: AtomicU64,
}

/// What a listener gets when it reads.
pub enum Read {
    /// Chunks from the position on (possibly none yet).
    Data,
    /// The listener fell behind the ring: drop it.
    Lagged,
    /// The stream ended and the listener has everything.
    Closed,
}

impl Stream {
    pub fn new(codec: Codec, cap: usize, info: StreamInfo, automatic: bool) -> Self {
        Self {
            codec,
            started: SystemTime::now(),
            automatic,
            ring: Mutex::new(Ring {
                chunks: VecDeque::new(),
                first: 0,
                bytes: 0,
                headers: Vec::new(),
                audio_from: 0,
            }),
            cap: cap.max(1),
            head: watch::channel(0).0,
            closed: AtomicBool::new(false),
            info: Mutex::new(info),
            title_version: AtomicU64::new(0),
        }
    }

    /// Appends a chunk, evicting the oldest beyond the queue size.
    pub fn push(&self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let next = {
            let mut r = self.ring.lock().expect("ring lock");
            r.bytes += chunk.len();
            r.chunks.push_back(chunk);
            while r.bytes > self.cap && r.chunks.len() > 1 {
                let old = r.chunks.pop_front().expect("non-empty");
                r.bytes -= old.len();
                r.first += 1;
            }
            r.first + r.chunks.len() as u64
        };
        self.head.send_replace(next);
    }

    /// Ogg: a new set of header pages starts (a BOS page arrived); they are
    /// pushed as ordinary chunks too, so current listeners get them in order.
    pub fn begin_headers(&self) {
        let mut r = self.ring.lock().expect("ring lock");
        r.headers.clear();
        r.audio_from = u64::MAX;
    }

    /// Ogg: a header page, kept for listeners who join later.
    pub fn push_header(&self, page: Bytes) {
        {
            let mut r = self.ring.lock().expect("ring lock");
            if r.headers.iter().map(Bytes::len).sum::<usize>() + page.len() <= 256 * 1024 {
                r.headers.push(page.clone());
            }
        }
        self.push(page);
    }

    /// Ogg: the headers are complete; audio starts with the next chunk.
    pub fn end_headers(&self) {
        let mut r = self.ring.lock().expect("ring lock");
        r.audio_from = r.first + r.chunks.len() as u64;
    }

    /// Where a new listener starts (about `burst` bytes back, after the current
    /// Ogg headers), and the header chunks it must get first.
    pub fn start(&self, burst: usize) -> (u64, Vec<Bytes>) {
        let r = self.ring.lock().expect("ring lock");
        let end = r.first + r.chunks.len() as u64;
        let mut pos = end;
        let mut bytes = 0;
        for c in r.chunks.iter().rev() {
            if bytes + c.len() > burst {
                break;
            }
            bytes += c.len();
            pos -= 1;
        }
        if self.codec == Codec::Ogg {
            if r.audio_from == u64::MAX {
                // Headers still arriving: start from the oldest kept chunk of them on.
                return (
                    end - (r.headers.len() as u64).min(end - r.first),
                    Vec::new(),
                );
            }
            return (pos.max(r.audio_from), r.headers.clone());
        }
        (pos, Vec::new())
    }

    /// Chunks from `*pos` on, at most `max_bytes` (at least one chunk), into `out`;
    /// advances `*pos`.
    pub fn read(&self, pos: &mut u64, max_bytes: usize, out: &mut Vec<Bytes>) -> Read {
        let r = self.ring.lock().expect("ring lock");
        if *pos < r.first {
            return Read::Lagged;
        }
        let end = r.first + r.chunks.len() as u64;
        let mut bytes = 0;
        while *pos < end && (out.is_empty() || bytes < max_bytes) {
            let c = &r.chunks[(*pos - r.first) as usize];
            bytes += c.len();
            out.push(c.clone());
            *pos += 1;
        }
        if out.is_empty() && self.closed.load(Ordering::Acquire) {
            return Read::Closed;
        }
        Read::Data
    }

    /// A receiver that changes whenever data arrives or the stream closes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.head.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn info(&self) -> StreamInfo {
        self.info.lock().expect("info lock").clone()
    }

    pub fn title(&self) -> String {
        self.info.lock().expect("info lock").title.clone()
    }

    /// Sets the title; returns `false` if it did not change.
    pub fn set_title(&self, title: &str) -> bool {
        let mut i = self.info.lock().expect("info lock");
        if i.title == title {
            return false;
        }
        i.title = title.to_owned();
        self.title_version.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Bumped on every title change (cheap to poll before each metadata block).
    pub fn title_version(&self) -> u64 {
        self.title_version.load(Ordering::Acquire)
    }

    /// Bytes currently kept.
    pub fn queued_bytes(&self) -> usize {
        self.ring.lock().expect("ring lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(cap: usize) -> Stream {
        Stream::new(Codec::Mp3, cap, StreamInfo::default(), false)
    }

    #[test]
    fn ring_is_bounded_and_slow_readers_lag() {
        let s = stream(1000);
        for i in 0..100u8 {
            s.push(Bytes::from(vec![i; 100]));
        }
        assert!(s.queued_bytes() <= 1000);
        let mut out = Vec::new();
        let mut pos = 0;
        assert!(matches!(s.read(&mut pos, 1 << 20, &mut out), Read::Lagged));
        let (mut pos, _) = s.start(350);
        assert_eq!(pos, 97, "three 100-byte chunks fit in a 350-byte burst");
        assert!(matches!(s.read(&mut pos, 150, &mut out), Read::Data));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0][0], 97);
        out.clear();
        s.close();
        assert!(matches!(s.read(&mut pos, 1 << 20, &mut out), Read::Data));
        out.clear();
        assert!(matches!(s.read(&mut pos, 1 << 20, &mut out), Read::Closed));
    }

    #[test]
    fn ogg_listeners_start_after_headers() {
        let s = Stream::new(Codec::Ogg, 10_000, StreamInfo::default(), false);
        s.begin_headers();
        s.push_header(Bytes::from_static(b"head1"));
        let (pos, h) = s.start(100);
        assert_eq!((pos, h.len()), (0, 0), "mid-headers: from the first header");
        s.push_header(Bytes::from_static(b"head2"));
        s.end_headers();
        s.push(Bytes::from_static(b"audio"));
        let (pos, h) = s.start(100);
        assert_eq!(pos, 2);
        assert_eq!(
            h,
            vec![Bytes::from_static(b"head1"), Bytes::from_static(b"head2")]
        );
        assert!(s.set_title("a"));
        assert!(!s.set_title("a"));
        assert_eq!(s.title_version(), 1);
    }
}
