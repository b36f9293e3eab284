//! A listener: follows its mount (and the mount's fallbacks) and writes the
//! shared chunks, with ICY metadata blocks every `metaint` bytes if asked.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{
    http::{self, Request},
    source::clean,
    stream::{Read, Stream},
    Inner, Mount,
};

/// Most bytes taken from the ring per write round.
const BATCH: usize = 64 * 1024;

/// Counts a listener on a mount and the server while it lives.
struct Counted {
    inner: Arc<Inner>,
    mount: Arc<Mount>,
}

impl Counted {
    fn count(mount: &Mount) {
        let n = mount.listeners.fetch_add(1, Ordering::AcqRel) + 1;
        mount.peak.fetch_max(n, Ordering::AcqRel);
    }

    fn move_to(&mut self, mount: Arc<Mount>) {
        self.mount.listeners.fetch_sub(1, Ordering::AcqRel);
        Self::count(&mount);
        self.mount = mount;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.mount.listeners.fetch_sub(1, Ordering::AcqRel);
        self.inner.listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

/// ICY metadata state of one listener.
struct Icy {
    metaint: usize,
    left: usize,
    /// The stream and title version last announced.
    sent: Option<(usize, u64)>,
}

pub(crate) async fn run(inner: Arc<Inner>, mut sock: TcpStream, req: Request) {
    let Some(home) = inner.find_mount(&req.path) else {
        http::error(&mut sock, 404, "Not Found", "").await;
        return;
    };
    let Some((serving, mut stream)) = inner.resolve(&home) else {
        http::error(&mut sock, 404, "Not Found", "").await;
        return;
    };
    if inner.listeners.fetch_add(1, Ordering::AcqRel) >= inner.cfg.max_listeners {
        inner.listeners.fetch_sub(1, Ordering::AcqRel);
        http::error(&mut sock, 403, "Too many clients connected", "").await;
        return;
    }
    // Listeners moved to a fallback without override now belong to it.
    let home = if serving.name != home.name && !home.cfg.fallback_override {
        serving.clone()
    } else {
        home
    };
    let limit = home.cfg.max_listeners.unwrap_or(usize::MAX);
    if home.listeners.load(Ordering::Acquire) >= limit {
        inner.listeners.fetch_sub(1, Ordering::AcqRel);
        http::error(&mut sock, 403, "Too many clients on this mountpoint", "").await;
        return;
    }
    Counted::count(&home);
    let mut counted = Counted {
        inner: inner.clone(),
        mount: home.clone(),
    };
    // Like Icecast: Ogg carries its titles in-band, so ICY blocks are for MP3/AAC.
    let icy = stream.codec != crate::codec::Codec::Ogg
        && req.header("icy-metadata").is_some_and(|v| v.trim() == "1");
    let mut icy = icy.then_some(Icy {
        metaint: inner.cfg.metaint,
        left: inner.cfg.metaint,
        sent: None,
    });
    let head = response_head(&home, &stream, icy.as_ref().map(|i| i.metaint));
    let send_timeout = Duration::from_secs(inner.cfg.send_timeout_secs);
    if tokio::time::timeout(send_timeout, sock.write_all(head.as_bytes()))
        .await
        .map_or(true, |r| r.is_err())
        || req.method == "HEAD"
    {
        return;
    }
    let mut topo = inner.topology.subscribe();
    let mut wake = stream.subscribe();
    let (mut pos, mut prefix) = stream.start(inner.cfg.burst_size);
    let mut out: Vec<Bytes> = Vec::new();
    loop {
        out.clear();
        out.append(&mut prefix);
        let read = stream.read(&mut pos, BATCH, &mut out);
        if matches!(read, Read::Lagged) {
            tracing::debug!(mount = %counted.mount.name, "radio listener fell behind; dropped");
            return;
        }
        let switch = matches!(read, Read::Closed)
            || (topo.has_changed().unwrap_or(false) && {
                topo.borrow_and_update();
                inner
                    .resolve(&counted.mount)
                    .is_none_or(|(_, s)| !Arc::ptr_eq(&s, &stream))
            });
        if !out.is_empty() {
            let w = write_chunks(&mut sock, &out, &mut icy, &stream);
            match tokio::time::timeout(send_timeout, w).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        if switch {
            // The stream ended or a better one appeared: follow the mount.
            let Some((serving, next)) = inner.resolve(&counted.mount) else {
                return;
            };
            if serving.name != counted.mount.name && !counted.mount.cfg.fallback_override {
                counted.move_to(serving);
            }
            stream = next;
            wake = stream.subscribe();
            (pos, prefix) = stream.start(0);
            continue;
        }
        if out.is_empty() {
            tokio::select! {
                _ = inner.cancel.cancelled() => return,
                r = wake.changed() => if r.is_err() { return },
                r = topo.changed() => {
                    if r.is_err() { return }
                    // Seen here; looked at again (marked changed) by the next round.
                    topo.mark_changed();
                }
                r = sock.readable() => {
                    // A listener sends nothing after its request: this is its
                    // close (or junk, which ends it too), seen even while the
                    // stream is silent.
                    let mut b = [0u8; 64];
                    match (r, sock.try_read(&mut b)) {
                        (Err(_), _) | (_, Ok(_)) => return,
                        (_, Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => return,
                        _ => {}
                    }
                }
            }
        }
    }
}

fn response_head(mount: &Mount, stream: &Stream, metaint: Option<usize>) -> String {
    let info = stream.info();
    let mut h = format!(
        "HTTP/1.0 200 OK\r\nServer: {}\r\nContent-Type: {}\r\nCache-Control: no-cache, no-store\r\nPragma: no-cache\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n",
        crate::SERVER_ID,
        stream.codec.content_type()
    );
    let name = info
        .name
        .clone()
        .or_else(|| mount.cfg.stream_name.clone())
        .unwrap_or_else(|| mount.name.clone());
    let fields = [
        ("icy-name", Some(name)),
        ("icy-description", info.description),
        ("icy-genre", info.genre),
        ("icy-url", info.url),
        ("icy-br", info.bitrate),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            h.push_str(&format!("{k}: {}\r\n", clean(&v)));
        }
    }
    h.push_str(&format!("icy-pub: {}\r\n", u8::from(info.public)));
    if let Some(m) = metaint {
        h.push_str(&format!("icy-metaint: {m}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// `StreamTitle='…';` as one ICY block: a length byte L and L×16 bytes.
pub(crate) fn meta_block(title: &str) -> Vec<u8> {
    let mut t = title;
    while t.len() > 4000 {
        let mut cut = 4000.min(t.len());
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        t = &t[..cut];
    }
    let text = format!("StreamTitle='{t}';");
    let blocks = text.len().div_ceil(16);
    let mut v = Vec::with_capacity(1 + blocks * 16);
    v.push(blocks as u8);
    v.extend_from_slice(text.as_bytes());
    v.resize(1 + blocks * 16, 0);
    v
}

/// Writes the chunks (with ICY blocks cut in where they fall) in as few
/// system calls as the socket takes: one vectored write per round, usually.
async fn write_chunks(
    sock: &mut TcpStream,
    chunks: &[Bytes],
    icy: &mut Option<Icy>,
    stream: &Arc<Stream>,
) -> std::io::Result<()> {
    let mut pieces: Vec<Bytes> = Vec::with_capacity(chunks.len() + 4);
    match icy.as_mut() {
        None => pieces.extend(chunks.iter().cloned()),
        Some(icy) => {
            for c in chunks {
                let mut c = c.clone();
                while !c.is_empty() {
                    let n = icy.left.min(c.len());
                    pieces.push(c.split_to(n));
                    icy.left -= n;
                    if icy.left == 0 {
                        icy.left = icy.metaint;
                        let now = (Arc::as_ptr(stream) as usize, stream.title_version());
                        if icy.sent == Some(now) {
                            pieces.push(Bytes::from_static(&[0]));
                        } else {
                            icy.sent = Some(now);
                            pieces.push(Bytes::from(meta_block(&stream.title())));
                        }
                    }
                }
            }
        }
    }
    write_all_vectored(sock, &mut pieces).await
}

/// `write_all` over several buffers; consumes `pieces`.
async fn write_all_vectored(sock: &mut TcpStream, pieces: &mut Vec<Bytes>) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    loop {
        while pieces.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == pieces.len() {
            break;
        }
        let slices: Vec<std::io::IoSlice<'_>> = pieces[first..]
            .iter()
            .take(64)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = sock.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let b = &mut pieces[first];
            let k = n.min(b.len());
            b.advance(k);
            n -= k;
            if b.is_empty() {
                first += 1;
            }
        }
    }
    pieces.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_blocks_are_padded_to_16() {
        let b = meta_block("Песня");
        assert_eq!(b.len(), 1 + b[0] as usize * 16);
        assert!(b[1..].starts_with("StreamTitle='Песня';".as_bytes()));
        assert!(b.ends_with(&[0]));
        let long = meta_block(&"я".repeat(5000));
        assert!(long[0] as usize * 16 <= 255 * 16);
        assert_eq!(long.len(), 1 + long[0] as usize * 16);
    }
}
