//! Reading one request head with bounds (size, header count, time), and
//! writing the few plain responses the radio needs.

use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A parsed request head; `rest` holds body bytes that came with it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub rest: BytesMut,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The password of HTTP Basic auth, if the user is one of `users`.
    pub fn basic_password(&self, users: &[&str]) -> Option<String> {
        use base64::Engine;
        let v = self.header("authorization")?;
        let (scheme, b64) = v.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (user, pass) = s.split_once(':')?;
        users.contains(&user).then(|| pass.to_owned())
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or timed out before sending anything useful: just close.
    Gone,
    /// Answer with this status and close.
    Status(u16, &'static str),
}

const MAX_HEADERS: usize = 64;

/// Reads a request head within `limit` bytes and `timeout`.
pub async fn read_head(
    sock: &mut TcpStream,
    limit: usize,
    timeout: Duration,
) -> Result<Request, HeadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let method = req.method.unwrap_or("").to_owned();
                    let target = req.path.unwrap_or("/");
                    let (path, query) = target.split_once('?').unwrap_or((target, ""));
                    let (path, query) = (path.to_owned(), query.to_owned());
                    let headers = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let _ = buf.split_to(n);
                    return Ok(Request {
                        method,
                        path,
                        query,
                        headers,
                        rest: buf,
                    });
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(HeadError::Status(431, "Request Header Fields Too Large"))
                }
                Err(_) => return Err(HeadError::Status(400, "Bad Request")),
            }
        }
        if buf.len() >= limit {
            return Err(HeadError::Status(431, "Request Header Fields Too Large"));
        }
        buf.reserve(1024.min(limit - buf.len()));
        let read = tokio::time::timeout_at(deadline, sock.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HeadError::Gone),
            Ok(Ok(_)) => {}
            Err(_) if buf.is_empty() => return Err(HeadError::Gone),
            Err(_) => return Err(HeadError::Status(408, "Request Timeout")),
        }
        if buf.len() > limit {
            return Err(HeadError::Status(431, "Request Header Fields Too Large"));
        }
    }
}

/// Writes a complete small response and flushes (errors ignored: the peer may be gone).
pub async fn respond(
    sock: &mut TcpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    extra: &str,
    body: &[u8],
) {
    let head = format!(
        "HTTP/1.0 {status} {reason}\r\nServer: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\nConnection: close\r\n{extra}\r\n",
        crate::SERVER_ID,
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(body).await?;
        sock.flush().await
    })
    .await;
}

/// A plain-text error response.
pub async fn error(sock: &mut TcpStream, status: u16, reason: &str, extra: &str) {
    respond(
        sock,
        status,
        reason,
        "text/plain; charset=utf-8",
        extra,
        format!("{status} {reason}\n").as_bytes(),
    )
    .await;
}

/// Decodes a chunked body incrementally.
#[derive(Default)]
pub struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Default, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

impl Chunked {
    /// Takes raw bytes, appends decoded data to `out`; `Err` on a broken encoding.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > 1024 {
                            return Err("chunk line too long");
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim();
                    self.state = match self.state {
                        ChunkState::Size => {
                            let hex = line.split(';').next().unwrap_or("").trim();
                            let n = usize::from_str_radix(hex, 16).map_err(|_| "bad chunk size")?;
                            if n == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(n)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => return Err("missing CRLF after chunk"),
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer,
                    };
                }
                ChunkState::Data(n) => {
                    let take = n.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if take == n {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(n - take)
                    };
                }
                ChunkState::Done => return Ok(()),
            }
        }
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let enc = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..enc.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            c.feed(&enc[..split], &mut out).unwrap();
            c.feed(&enc[split..], &mut out).unwrap();
            assert_eq!(out, b"hello, world");
            assert!(c.done());
        }
        let mut out = Vec::new();
        assert!(Chunked::default().feed(b"zz\r\n", &mut out).is_err());
        assert!(Chunked::default().feed(b"2\r\nabX\r\n", &mut out).is_err());
    }
}
