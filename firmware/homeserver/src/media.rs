//! Media repository: uploads streamed to disk under the data directory (addressed
//! by server-chosen ids, never by client paths), downloads streamed back, and
//! thumbnails generated once and cached.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use rusqlite::{params, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::{MxError, MxResult},
    extract::{Auth, PathArgs, QueryArgs},
    now_ms, random_string, Hs,
};

/// How long a `create`d media id waits for its content.
const UNUSED_EXPIRY_MS: u64 = 24 * 3600 * 1000;
/// Pending (created, not uploaded) media ids per user.
const MAX_PENDING: i64 = 50;
/// Thumbnail sizes the box generates: (width, height, method).
const THUMB_SIZES: &[(u32, u32, &str)] = &[
    (32, 32, "crop"),
    (96, 96, "crop"),
    (320, 240, "scale"),
    (640, 480, "scale"),
    (800, 600, "scale"),
];
/// Largest image the thumbnailer decodes, in pixels per side and bytes of memory.
const MAX_DECODE_SIDE: u32 = 12_000;
const MAX_DECODE_ALLOC: u64 = 128 * 1024 * 1024;
static THUMBNAILING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Hs {
    fn media_dir(&self) -> PathBuf {
        self.data_dir.join("media")
    }

    fn media_path(&self, id: &str) -> PathBuf {
        // `id` is validated: [A-Za-z0-9_-] only, so it cannot leave the folder.
        self.media_dir().join(&id[..2.min(id.len())]).join(id)
    }

    fn thumb_path(&self, id: &str, w: u32, h: u32, method: &str) -> PathBuf {
        self.media_dir()
            .join("thumbnails")
            .join(format!("{id}-{w}x{h}-{method}"))
    }

    /// Checks a `server/media_id` pair from a path and returns the id.
    fn local_media_id(&self, server: &str, id: &str) -> MxResult<String> {
        if !valid_media_id(id) {
            return Err(MxError::invalid_param("Invalid media id"));
        }
        if server != self.server_name.as_str() {
            return Err(MxError::not_found(
                "Media from other servers is not available yet",
            ));
        }
        Ok(id.to_owned())
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct UploadQuery {
    filename: Option<String>,
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.len() < 256)
}

/// An image type claimed by the uploader must match the content's magic bytes.
fn check_declared_type(declared: Option<&str>, head: &[u8]) -> MxResult<()> {
    let Some(declared) = declared else {
        return Ok(());
    };
    let mime = declared
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let expect = match mime.as_str() {
        "image/png" => image::ImageFormat::Png,
        "image/jpeg" | "image/jpg" => image::ImageFormat::Jpeg,
        "image/gif" => image::ImageFormat::Gif,
        "image/webp" => image::ImageFormat::WebP,
        _ => return Ok(()),
    };
    match image::guess_format(head) {
        Ok(f) if f == expect => Ok(()),
        _ => Err(MxError::invalid_param(format!(
            "The content is not {mime} as declared"
        ))),
    }
}

/// Streams a request body into the media file for `id`, enforcing the size limit.
async fn store_body(hs: &Hs, id: &str, body: Body, declared: Option<&str>) -> MxResult<u64> {
    let limit = hs.config.media_max_bytes;
    let final_path = hs.media_path(id);
    let dir = final_path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| hs.media_dir());
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| MxError::unknown(format!("media dir: {e}")))?;
    let tmp = dir.join(format!(".{id}.{}.part", random_string(6)));
    let file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| MxError::unknown(format!("media file: {e}")))?;
    // Few large writes: each tokio file write is a trip to the blocking pool.
    let mut file = tokio::io::BufWriter::with_capacity(512 * 1024, file);
    let mut stream = body.into_data_stream();
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::new();
    // Encrypted from the first byte written when the box has a data key.
    let mut enc = hs.file_cipher()?.map(|c| c.encryptor());
    let mut sealed = Vec::new();
    let result: MxResult<()> = async {
        use tokio::io::AsyncWriteExt;
        let io = |e: std::io::Error| MxError::unknown(format!("writing media: {e}"));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| MxError::unknown(format!("upload interrupted: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(MxError::too_large(format!(
                    "Media is larger than the limit of {limit} bytes"
                )));
            }
            if head.len() < 64 {
                head.extend_from_slice(&chunk[..chunk.len().min(64 - head.len())]);
            }
            match enc.as_mut() {
                Some(e) => {
                    sealed.clear();
                    e.update(&chunk, &mut sealed);
                    file.write_all(&sealed).await.map_err(io)?;
                }
                None => file.write_all(&chunk).await.map_err(io)?,
            }
        }
        check_declared_type(declared, &head)?;
        if let Some(e) = enc.take() {
            sealed.clear();
            e.finish(&mut sealed);
            file.write_all(&sealed).await.map_err(io)?;
        }
        file.flush()
            .await
            .map_err(|e| MxError::unknown(format!("writing media: {e}")))?;
        file.get_ref()
            .sync_all()
            .await
            .map_err(|e| MxError::unknown(format!("writing media: {e}")))?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, &final_path)
        .await
        .map_err(|e| MxError::unknown(format!("storing media: {e}")))?;
    Ok(size)
}

impl Hs {
    /// The cipher for stored files, when the box encrypts its data (an error
    /// once the data key was destroyed by a wipe).
    pub(crate) fn file_cipher(&self) -> MxResult<Option<secta_vault::FileCipher>> {
        self.vault
            .as_ref()
            .map(|v| v.file_cipher())
            .transpose()
            .map_err(|e| MxError::unknown(e.to_string()))
    }
}

fn mxc(hs: &Hs, id: &str) -> String {
    format!("mxc://{}/{id}", hs.server_name)
}

pub async fn upload(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    QueryArgs(q): QueryArgs<UploadQuery>,
    req: Request,
) -> MxResult<Response> {
    let ctype = content_type(req.headers());
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > hs.config.media_max_bytes {
            return Err(MxError::too_large(format!(
                "Media is larger than the limit of {} bytes",
                hs.config.media_max_bytes
            )));
        }
    }
    let id = random_string(24);
    let size = store_body(&hs, &id, req.into_body(), ctype.as_deref()).await?;
    hs.db.write(|w| {
        w.tx.execute(
            "INSERT INTO media(media_id, user_id, content_type, filename, size, created_ts, uploaded) VALUES(?1,?2,?3,?4,?5,?6,1)",
            params![id, auth.user_id.as_str(), ctype, q.filename, size as i64, now_ms() as i64],
        )
    })?;
    Ok(axum::Json(json!({ "content_uri": mxc(&hs, &id) })).into_response())
}

pub async fn create(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<axum::Json<Value>> {
    let id = random_string(24);
    let now = now_ms() as i64;
    hs.db.write(|w| -> MxResult<()> {
        let pending: i64 = w.query_row(
            "SELECT COUNT(*) FROM media WHERE user_id=?1 AND uploaded=0 AND created_ts>?2",
            params![auth.user_id.as_str(), now - UNUSED_EXPIRY_MS as i64],
            |r| r.get(0),
        )?;
        if pending >= MAX_PENDING {
            return Err(MxError::limit_exceeded(60_000));
        }
        w.tx.execute(
            "INSERT INTO media(media_id, user_id, created_ts, uploaded) VALUES(?1,?2,?3,0)",
            params![id, auth.user_id.as_str(), now],
        )?;
        Ok(())
    })?;
    Ok(axum::Json(
        json!({ "content_uri": mxc(&hs, &id), "unused_expires_at": now as u64 + UNUSED_EXPIRY_MS }),
    ))
}

pub async fn upload_to(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((server, id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<UploadQuery>,
    req: Request,
) -> MxResult<Response> {
    // A refused upload still reads the body it was sent (up to the size limit),
    // so the client gets the answer rather than a connection reset mid-upload.
    let (parts, body) = req.into_parts();
    match check_upload_to(&hs, &auth, &server, &id) {
        Ok(id) => upload_claimed(hs, id, q, Request::from_parts(parts, body)).await,
        Err(e) => {
            let limit = hs.config.media_max_bytes;
            let mut stream = body.into_data_stream();
            let mut read: u64 = 0;
            let drain = async {
                while let Some(Ok(chunk)) = stream.next().await {
                    read += chunk.len() as u64;
                    if read > limit {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
            Err(e)
        }
    }
}

/// The local media id a `PUT /upload/{server}/{id}` may fill, claimed for it.
fn check_upload_to(hs: &Hs, auth: &Auth, server: &str, id: &str) -> MxResult<String> {
    let id = hs.local_media_id(server, id)?;
    let row: Option<(String, i64, i64)> = hs.db.read(|c| {
        c.query_row(
            "SELECT user_id, uploaded, created_ts FROM media WHERE media_id=?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
    })?;
    let Some((owner, uploaded, created)) = row else {
        return Err(MxError::not_found("Unknown media id"));
    };
    if owner != auth.user_id.as_str() {
        return Err(MxError::forbidden("This media id belongs to someone else"));
    }
    if uploaded != 0 {
        return Err(MxError::new(
            StatusCode::CONFLICT,
            "M_CANNOT_OVERWRITE_MEDIA",
            "Media already uploaded",
        ));
    }
    if (now_ms() as i64) - created > UNUSED_EXPIRY_MS as i64 {
        return Err(MxError::not_found("The media id has expired"));
    }
    // Claim the id first (uploaded=2: in progress), so two uploads cannot race.
    let claimed = hs.db.write(|w| {
        w.tx.execute(
            "UPDATE media SET uploaded=2 WHERE media_id=?1 AND uploaded=0",
            [&id],
        )
    })?;
    if claimed == 0 {
        return Err(MxError::new(
            StatusCode::CONFLICT,
            "M_CANNOT_OVERWRITE_MEDIA",
            "Media already uploaded",
        ));
    }
    Ok(id)
}

async fn upload_claimed(
    hs: Arc<Hs>,
    id: String,
    q: UploadQuery,
    req: Request,
) -> MxResult<Response> {
    let ctype = content_type(req.headers());
    let size = match store_body(&hs, &id, req.into_body(), ctype.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            hs.db.write(|w| {
                w.tx.execute(
                    "UPDATE media SET uploaded=0 WHERE media_id=?1 AND uploaded=2",
                    [&id],
                )
            })?;
            return Err(e);
        }
    };
    hs.db.write(|w| {
        w.tx.execute(
            "UPDATE media SET content_type=?1, filename=?2, size=?3, uploaded=1 WHERE media_id=?4 AND uploaded=2",
            params![ctype, q.filename, size as i64, id],
        )
    })?;
    Ok(axum::Json(json!({})).into_response())
}

pub async fn config(State(hs): State<Arc<Hs>>, _auth: Auth) -> axum::Json<Value> {
    axum::Json(json!({ "m.upload.size": hs.config.media_max_bytes }))
}

pub async fn preview_url(_auth: Auth) -> MxError {
    MxError::forbidden(
        "URL previews are disabled on this box: it fetches nothing from outside on anyone's behalf",
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DownloadQuery {
    timeout_ms: Option<u64>,
}

struct MediaRow {
    content_type: Option<String>,
    filename: Option<String>,
    size: i64,
}

/// Waits (bounded) for content of an async upload.
async fn media_row(hs: &Hs, id: &str, timeout_ms: Option<u64>) -> MxResult<MediaRow> {
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(timeout_ms.unwrap_or(20_000).min(60_000));
    loop {
        let row: Option<(Option<String>, Option<String>, Option<i64>, i64)> = hs.db.read(|c| {
            c.query_row(
                "SELECT content_type, filename, size, uploaded FROM media WHERE media_id=?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
        })?;
        match row {
            None => return Err(MxError::not_found("Media not found")),
            Some((content_type, filename, size, 1)) => {
                return Ok(MediaRow {
                    content_type,
                    filename,
                    size: size.unwrap_or(0),
                })
            }
            Some(_) if tokio::time::Instant::now() >= deadline => {
                return Err(MxError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "M_NOT_YET_UPLOADED",
                    "Media has not been uploaded yet",
                ))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Types a browser may show inline; everything else is served as an attachment.
fn inline_safe(ct: &str) -> bool {
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        ct.as_str(),
        "text/plain"
            | "image/jpeg"
            | "image/png"
            | "image/gif"
            | "image/webp"
            | "image/apng"
            | "image/avif"
            | "video/mp4"
            | "video/webm"
            | "video/ogg"
            | "video/quicktime"
            | "audio/mp4"
            | "audio/webm"
            | "audio/aac"
            | "audio/mpeg"
            | "audio/ogg"
            | "audio/wave"
            | "audio/wav"
            | "audio/x-wav"
            | "audio/x-pn-wav"
            | "audio/flac"
            | "audio/x-flac"
    )
}

/// RFC 6266 / RFC 8187 `filename*` value.
fn disposition(kind: &str, filename: Option<&str>) -> String {
    match filename {
        None => kind.to_owned(),
        Some(f) => {
            let mut enc = String::new();
            for b in f.bytes() {
                if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                    enc.push(b as char);
                } else {
                    enc.push_str(&format!("%{b:02X}"));
                }
            }
            format!("{kind}; filename*=utf-8''{enc}")
        }
    }
}

/// A single `Range: bytes=…` request against a body of `size` bytes:
/// `Ok(None)` for no (or an ignorable) range, `Err` for an unsatisfiable one.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: answer with the whole body
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (start, end)
    };
    if range.0 > range.1 || range.0 >= size {
        return Err(());
    }
    Ok(Some(range))
}

/// Streams `len` bytes from `start` of an encrypted file's plaintext,
/// decrypting a block at a time on the blocking pool.
fn decrypting_stream(
    reader: secta_vault::file::DecryptReader,
    start: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 256 * 1024;
    futures::stream::unfold(
        (Some(reader), start, len),
        |(reader, pos, left)| async move {
            let mut reader = reader?;
            if left == 0 {
                return None;
            }
            let n = left.min(BLOCK);
            let r = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                reader.seek(SeekFrom::Start(pos))?;
                reader.read_exact(&mut buf)?;
                Ok::<_, std::io::Error>((reader, buf))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            Some(match r {
                Ok((reader, buf)) => (
                    Ok(bytes::Bytes::from(buf)),
                    (Some(reader), pos + n, left - n),
                ),
                Err(e) => (Err(e), (None, pos, 0)),
            })
        },
    )
}

async fn serve_file(
    hs: &Hs,
    path: &Path,
    content_type: &str,
    filename: Option<&str>,
    size: u64,
    headers: &HeaderMap,
) -> MxResult<Response> {
    let missing = || MxError::not_found("Media content is missing");
    let range = match parse_range(headers, size) {
        Ok(r) => r,
        Err(()) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let (start, len) = range.map_or((0, size), |(a, b)| (a, b - a + 1));
    let body = match hs.file_cipher()? {
        Some(cipher) => {
            let path = path.to_owned();
            let reader = tokio::task::spawn_blocking(move || cipher.reader(&path))
                .await
                .map_err(|e| MxError::unknown(e.to_string()))?
                .map_err(|_| missing())?;
            if reader.plain_len() != size {
                return Err(MxError::unknown("Media content does not match its record"));
            }
            Body::from_stream(decrypting_stream(reader, start, len))
        }
        None => {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut file = tokio::fs::File::open(path).await.map_err(|_| missing())?;
            if start > 0 {
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| MxError::unknown(e.to_string()))?;
            }
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                file.take(len),
                256 * 1024,
            ))
        }
    };
    let kind = if inline_safe(content_type) {
        "inline"
    } else {
        "attachment"
    };
    let mut resp = Response::new(body);
    if let Some((a, b)) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&disposition(kind, filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    Ok(resp)
}

async fn download_inner(
    hs: &Hs,
    server: &str,
    id: &str,
    filename: Option<String>,
    q: DownloadQuery,
    headers: &HeaderMap,
) -> MxResult<Response> {
    let id = hs.local_media_id(server, id)?;
    let row = media_row(hs, &id, q.timeout_ms).await?;
    let ct = row
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    serve_file(
        hs,
        &hs.media_path(&id),
        &ct,
        filename.as_deref().or(row.filename.as_deref()),
        row.size as u64,
        headers,
    )
    .await
}

pub async fn download(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    PathArgs((server, id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<DownloadQuery>,
    headers: HeaderMap,
) -> MxResult<Response> {
    download_inner(&hs, &server, &id, None, q, &headers).await
}

pub async fn download_named(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    PathArgs((server, id, name)): PathArgs<(String, String, String)>,
    QueryArgs(q): QueryArgs<DownloadQuery>,
    headers: HeaderMap,
) -> MxResult<Response> {
    download_inner(&hs, &server, &id, Some(name), q, &headers).await
}

pub async fn legacy_download(
    State(hs): State<Arc<Hs>>,
    PathArgs((server, id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<DownloadQuery>,
    headers: HeaderMap,
) -> MxResult<Response> {
    download_inner(&hs, &server, &id, None, q, &headers).await
}

pub async fn legacy_download_named(
    State(hs): State<Arc<Hs>>,
    PathArgs((server, id, name)): PathArgs<(String, String, String)>,
    QueryArgs(q): QueryArgs<DownloadQuery>,
    headers: HeaderMap,
) -> MxResult<Response> {
    download_inner(&hs, &server, &id, Some(name), q, &headers).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ThumbQuery {
    width: Option<String>,
    height: Option<String>,
    method: Option<String>,
    timeout_ms: Option<u64>,
    #[allow(dead_code)]
    animated: Option<bool>,
}

/// The cached size that serves a request: the smallest at least as big.
fn pick_size(w: u32, h: u32, method: &str) -> (u32, u32, &'static str) {
    let same: Vec<_> = THUMB_SIZES.iter().filter(|s| s.2 == method).collect();
    same.iter()
        .find(|s| s.0 >= w && s.1 >= h)
        .or_else(|| same.last())
        .map(|s| (s.0, s.1, s.2))
        .unwrap_or((800, 600, "scale"))
}

/// What the image decoder reads from: a plain or a decrypting file.
trait BufReadSeek: std::io::BufRead + std::io::Seek + Send {}
impl<T: std::io::BufRead + std::io::Seek + Send> BufReadSeek for T {}

fn make_thumbnail(
    cipher: Option<secta_vault::FileCipher>,
    src: &Path,
    dst: &Path,
    w: u32,
    h: u32,
    method: &str,
) -> MxResult<(&'static str, u64)> {
    use image::{ImageFormat, ImageReader};
    let missing = || MxError::not_found("Media content is missing");
    let source: Box<dyn BufReadSeek> = match &cipher {
        Some(c) => Box::new(std::io::BufReader::new(
            c.reader(src).map_err(|_| missing())?,
        )),
        None => Box::new(std::io::BufReader::new(
            std::fs::File::open(src).map_err(|_| missing())?,
        )),
    };
    let mut reader = ImageReader::new(source)
        .with_guessed_format()
        .map_err(|_| {
            MxError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "Cannot read the media",
            )
        })?;
    let format = reader.format().ok_or_else(|| {
        MxError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "This media is not an image the box can thumbnail",
        )
    })?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP
    ) {
        return Err(MxError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "This media is not an image the box can thumbnail",
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => MxError::too_large("The image is too large to thumbnail"),
        _ => MxError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "The image cannot be decoded",
        ),
    })?;
    let thumb = if method == "crop" {
        if img.width() <= w && img.height() <= h {
            img
        } else {
            img.resize_to_fill(
                w.min(img.width()),
                h.min(img.height()),
                image::imageops::FilterType::Triangle,
            )
        }
    } else if img.width() <= w && img.height() <= h {
        img
    } else {
        img.resize(w, h, image::imageops::FilterType::Triangle)
    };
    let (out_format, ct) = if format == ImageFormat::Jpeg {
        (ImageFormat::Jpeg, "image/jpeg")
    } else {
        (ImageFormat::Png, "image/png")
    };
    let thumb = if out_format == ImageFormat::Jpeg {
        image::DynamicImage::ImageRgb8(thumb.to_rgb8())
    } else {
        thumb
    };
    let mut buf = std::io::Cursor::new(Vec::new());
    thumb
        .write_to(&mut buf, out_format)
        .map_err(|e| MxError::unknown(format!("encoding thumbnail: {e}")))?;
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| MxError::unknown(e.to_string()))?;
    }
    let tmp = dst.with_extension(format!("{}.part", random_string(8)));
    let mut f = std::fs::File::create(&tmp).map_err(|e| MxError::unknown(e.to_string()))?;
    let plain = buf.get_ref();
    match &cipher {
        Some(c) => f.write_all(&c.seal(plain)),
        None => f.write_all(plain),
    }
    .map_err(|e| MxError::unknown(e.to_string()))?;
    std::fs::rename(&tmp, dst).map_err(|e| MxError::unknown(e.to_string()))?;
    Ok((ct, plain.len() as u64))
}

async fn thumbnail_inner(hs: Arc<Hs>, server: &str, id: &str, q: ThumbQuery) -> MxResult<Response> {
    let id = hs.local_media_id(server, id)?;
    let parse = |v: &Option<String>, name: &str| -> MxResult<u32> {
        let v = v
            .as_deref()
            .ok_or_else(|| MxError::missing_param(format!("{name} is required")))?;
        let n: u64 = v
            .parse()
            .map_err(|_| MxError::invalid_param(format!("{name} must be a positive integer")))?;
        if n == 0 || n > 10_000 {
            return Err(MxError::invalid_param(format!(
                "{name} must be between 1 and 10000"
            )));
        }
        Ok(n as u32)
    };
    let (w, h) = (parse(&q.width, "width")?, parse(&q.height, "height")?);
    let method = match q.method.as_deref() {
        None | Some("scale") => "scale",
        Some("crop") => "crop",
        _ => return Err(MxError::invalid_param("method must be crop or scale")),
    };
    media_row(&hs, &id, q.timeout_ms).await?;
    let (tw, th, tm) = pick_size(w, h, method);
    let cached: Option<(String, i64)> = hs.db.read(|c| {
        c.query_row(
            "SELECT content_type, size FROM media_thumbnails WHERE media_id=?1 AND width=?2 AND height=?3 AND method=?4",
            params![id, tw, th, tm],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    })?;
    let dst = hs.thumb_path(&id, tw, th, tm);
    if let Some((ct, size)) = cached {
        return serve_file(&hs, &dst, &ct, None, size as u64, &HeaderMap::new()).await;
    }
    let src = hs.media_path(&id);
    let dst2 = dst.clone();
    // Decoding takes memory (up to MAX_DECODE_ALLOC): one at a time.
    let _permit = THUMBNAILING
        .acquire()
        .await
        .map_err(|e| MxError::unknown(e.to_string()))?;
    let cipher = hs.file_cipher()?;
    let (ct, size) =
        tokio::task::spawn_blocking(move || make_thumbnail(cipher, &src, &dst2, tw, th, tm))
            .await
            .map_err(|e| MxError::unknown(e.to_string()))??;
    hs.db.write(|w| {
        w.tx.execute(
            "INSERT OR REPLACE INTO media_thumbnails(media_id, width, height, method, content_type, size) VALUES(?1,?2,?3,?4,?5,?6)",
            params![id, tw, th, tm, ct, size as i64],
        )
    })?;
    serve_file(&hs, &dst, ct, None, size, &HeaderMap::new()).await
}

pub async fn thumbnail(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    PathArgs((server, id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<ThumbQuery>,
) -> MxResult<Response> {
    thumbnail_inner(hs, &server, &id, q).await
}

pub async fn legacy_thumbnail(
    State(hs): State<Arc<Hs>>,
    PathArgs((server, id)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<ThumbQuery>,
) -> MxResult<Response> {
    thumbnail_inner(hs, &server, &id, q).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_cannot_escape() {
        assert!(valid_media_id("abcDEF123_-"));
        for bad in ["", "../etc", "a/b", "a\\b", ".hidden", "a b", "é"] {
            assert!(!valid_media_id(bad), "{bad}");
        }
    }

    #[test]
    fn sizes_and_headers() {
        assert_eq!(pick_size(50, 50, "crop"), (96, 96, "crop"));
        assert_eq!(pick_size(5000, 5000, "scale"), (800, 600, "scale"));
        assert_eq!(
            disposition("inline", Some("отчёт 1.pdf")),
            "inline; filename*=utf-8''%D0%BE%D1%82%D1%87%D1%91%D1%82%201.pdf"
        );
        assert!(inline_safe("image/png"));
        assert!(!inline_safe("text/html"));
        assert!(check_declared_type(Some("image/png"), b"GIF89a....").is_err());
        assert!(check_declared_type(Some("image/gif"), b"GIF89a....").is_ok());
        assert!(check_declared_type(Some("application/pdf"), b"anything").is_ok());
    }
}
