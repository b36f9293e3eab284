//! Media repository through matrix-sdk: uploads (`POST /_matrix/media/v3/upload`,
//! and `POST /_matrix/media/v1/create` + `PUT /_matrix/media/v3/upload/{server}/{id}`),
//! authenticated downloads and thumbnails (`/_matrix/client/v1/media/...`),
//! and images sent as `m.image` messages, plain and encrypted.

mod common;

use std::io::Cursor;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::{ImageFormat, RgbImage};
use matrix_sdk::attachment::{AttachmentConfig, AttachmentInfo, BaseImageInfo};
use matrix_sdk::media::{MediaFormat, MediaRequestParameters, MediaThumbnailSettings};
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::room::message::{MessageType, RoomMessageEventContent};
use matrix_sdk::ruma::events::room::MediaSource;
use matrix_sdk::ruma::media::Method;
use matrix_sdk::ruma::{MxcUri, OwnedMxcUri, UInt};
use matrix_sdk::Client;
use serde_json::Value;

use common::*;

const PHOTO_W: u32 = 1200;
const PHOTO_H: u32 = 800;

/// Deterministic noise (xorshift64*), so a failing byte offset can be
/// reproduced.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A photo-like picture: a colour gradient with a soft pattern and a little
/// grain, so JPEG has real work to do.
fn photo() -> RgbImage {
    let grain = noise((PHOTO_W * PHOTO_H) as usize, 7);
    RgbImage::from_fn(PHOTO_W, PHOTO_H, |x, y| {
        let g = grain[(y * PHOTO_W + x) as usize] as u32 % 24;
        let wave = (((x as f32) / 37.0).sin() * ((y as f32) / 23.0).cos() * 40.0 + 40.0) as u32;
        image::Rgb([
            ((x * 255 / PHOTO_W) + g).min(255) as u8,
            ((y * 255 / PHOTO_H) + g / 2).min(255) as u8,
            (wave + 100 + g).min(255) as u8,
        ])
    })
}

fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut buf = Cursor::new(Vec::new());
    match format {
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85).encode_image(img)?
        }
        other => img.write_to(&mut buf, other)?,
    }
    Ok(buf.into_inner())
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("lengths {} vs {}", a.len(), b.len()),
    }
}

async fn upload(
    client: &Client,
    mime: &mime::Mime,
    data: &[u8],
    what: &str,
) -> Result<OwnedMxcUri> {
    let started = Instant::now();
    let resp = client
        .media()
        .upload(mime, data.to_vec(), None)
        .await
        .at(&format!(
            "POST /_matrix/media/v3/upload ({what}, {mime}, {} bytes)",
            data.len()
        ))?;
    eprintln!(
        "uploaded {what} ({} bytes) in {:?}",
        data.len(),
        started.elapsed()
    );
    Ok(resp.content_uri)
}

async fn download(
    client: &Client,
    source: MediaSource,
    format: MediaFormat,
    what: &str,
) -> Result<Vec<u8>> {
    let req = MediaRequestParameters { source, format };
    client
        .media()
        .get_media_content(&req, false)
        .await
        .at(&format!(
            "GET /_matrix/client/v1/media/{{download,thumbnail}} ({what})"
        ))
}

async fn download_file(client: &Client, uri: &MxcUri, what: &str) -> Result<Vec<u8>> {
    download(
        client,
        MediaSource::Plain(uri.to_owned()),
        MediaFormat::File,
        what,
    )
    .await
}

fn mxc_parts(uri: &MxcUri) -> Result<(String, String)> {
    let (server, id) = uri
        .parts()
        .map_err(|e| anyhow!("{uri} is not a valid mxc URI: {e}"))?;
    Ok((server.to_string(), id.to_owned()))
}

/// Fetch a thumbnail through the SDK and check it is an image within the box
/// (scale keeps the aspect ratio; crop has the box's aspect ratio).
async fn check_thumbnail(
    client: &Client,
    uri: &MxcUri,
    method: Method,
    (w, h): (u32, u32),
    source_aspect: f64,
    what: &str,
) -> Result<(u32, u32)> {
    let settings =
        MediaThumbnailSettings::with_method(method.clone(), UInt::from(w), UInt::from(h));
    let what = format!("{what} thumbnail {w}x{h} {method}");
    let bytes = download(
        client,
        MediaSource::Plain(uri.to_owned()),
        MediaFormat::Thumbnail(settings),
        &what,
    )
    .await?;
    let format = image::guess_format(&bytes)
        .map_err(|e| anyhow!("{what}: {} bytes that are not an image: {e}", bytes.len()))?;
    let img =
        image::load_from_memory(&bytes).with_context(|| format!("{what}: decoding {format:?}"))?;
    let (tw, th) = (img.width(), img.height());
    eprintln!("{what}: {format:?} {tw}x{th}, {} bytes", bytes.len());
    ensure!(
        tw <= w && th <= h,
        "{what}: got {tw}x{th}, larger than the requested {w}x{h}"
    );
    let aspect = tw as f64 / th as f64;
    let want = if method == Method::Crop {
        w as f64 / h as f64
    } else {
        source_aspect
    };
    ensure!(
        (aspect / want - 1.0).abs() < 0.03,
        "{what}: got {tw}x{th} (aspect {aspect:.3}), expected aspect {want:.3}"
    );
    ensure!(
        tw * 2 >= w || th * 2 >= h,
        "{what}: got {tw}x{th}, far smaller than the requested {w}x{h}"
    );
    Ok((tw, th))
}

/// Uploads through the SDK and downloads back through authenticated media:
/// 10 MB of random bytes and a 1200x800 photo as JPEG and PNG, byte for
/// byte, as the uploader and as another user; thumbnails; the async upload
/// (`create` then `PUT`); media config; headers and auth on the raw endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_download_and_thumbnails() {
    bounded("upload_download_and_thumbnails", 240, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let raw = server.raw_as(&alice)?;

        // Limits first: 10 MB has to fit.
        let config = raw.call_abs("GET", "/_matrix/client/v1/media/config", None).await?;
        ensure!(config.status == 200, "GET /_matrix/client/v1/media/config: HTTP {} {}", config.status, config.body);
        let limit = config.body["m.upload.size"].as_u64().unwrap_or(0);
        ensure!(
            limit >= 10 * 1024 * 1024,
            "GET /_matrix/client/v1/media/config: m.upload.size {} is below 10 MiB ({})",
            limit,
            config.body
        );

        // 10 MB of noise.
        let big = noise(10 * 1024 * 1024, 0x5ec7a);
        let big_uri = upload(&alice, &mime::APPLICATION_OCTET_STREAM, &big, "10 MB of random bytes").await?;
        let (srv, _) = mxc_parts(&big_uri)?;
        ensure!(srv == server.listen, "upload returned {big_uri}, whose server is not {}", server.listen);
        for (who, client) in [("alice", &alice), ("bob", &bob)] {
            let started = Instant::now();
            let got = download_file(client, &big_uri, &format!("10 MB file as {who}")).await?;
            ensure!(
                got == big,
                "10 MB file downloaded by {who} differs from the upload ({} bytes back, {})",
                got.len(),
                first_diff(&got, &big)
            );
            eprintln!("{who} downloaded 10 MB in {:?}", started.elapsed());
        }

        // The photo, as JPEG and as PNG.
        let img = photo();
        let aspect = PHOTO_W as f64 / PHOTO_H as f64;
        for (format, mime, name) in [
            (ImageFormat::Jpeg, mime::IMAGE_JPEG, "photo.jpg"),
            (ImageFormat::Png, mime::IMAGE_PNG, "photo.png"),
        ] {
            let bytes = encode(&img, format)?;
            let uri = upload(&alice, &mime, &bytes, name).await?;
            let got = download_file(&bob, &uri, name).await?;
            ensure!(got == bytes, "{name} downloaded by bob differs: {}", first_diff(&got, &bytes));
            check_thumbnail(&bob, &uri, Method::Scale, (320, 240), aspect, name).await?;
            check_thumbnail(&bob, &uri, Method::Crop, (96, 96), aspect, name).await?;
            // Again: the second request is served from the server's cache.
            check_thumbnail(&alice, &uri, Method::Scale, (320, 240), aspect, name).await?;

            // Raw: headers of the authenticated download, with a file name.
            let (srv, id) = mxc_parts(&uri)?;
            let path = format!("/_matrix/client/v1/media/download/{srv}/{id}/{name}");
            let r = server.raw_as(&bob)?.bytes_abs("GET", &path, None).await?;
            ensure!(r.status == 200, "GET {path}: HTTP {} {}", r.status, r.json());
            ensure!(r.bytes == bytes, "GET {path}: body differs: {}", first_diff(&r.bytes, &bytes));
            ensure!(
                r.header("content-type") == mime.essence_str(),
                "GET {path}: Content-Type {:?}, expected {mime}",
                r.header("content-type")
            );
            ensure!(
                r.header("content-disposition").contains(name),
                "GET {path}: Content-Disposition {:?} does not name {name}",
                r.header("content-disposition")
            );
            // No token, no media (authenticated media, spec v1.11).
            let anon = RawHttp::new(&server.base_url, "")?;
            let path = format!("/_matrix/client/v1/media/download/{srv}/{id}");
            let r = anon.bytes_abs("GET", &path, None).await?;
            ensure!(
                r.status == 401 && r.json()["errcode"] == "M_MISSING_TOKEN",
                "GET {path} without an access token: expected 401 M_MISSING_TOKEN, got HTTP {} {}",
                r.status,
                r.json()
            );
        }

        // Asynchronous upload: reserve an mxc URI, then PUT the content.
        let png = encode(&img, ImageFormat::Png)?;
        let pre = alice
            .media()
            .create_content_uri()
            .await
            .at("POST /_matrix/media/v1/create")?;
        let pre_uri = pre.uri.clone();
        alice
            .media()
            .upload_preallocated(pre, &mime::IMAGE_PNG, png.clone())
            .await
            .at("PUT /_matrix/media/v3/upload/{serverName}/{mediaId}")?;
        let got = download_file(&bob, &pre_uri, "async upload").await?;
        ensure!(got == png, "async-uploaded PNG differs: {}", first_diff(&got, &png));
        let (srv, id) = mxc_parts(&pre_uri)?;
        let path = format!("/_matrix/media/v3/upload/{srv}/{id}");
        let again = raw.bytes_abs("PUT", &path, Some(("image/png", png.clone()))).await?;
        ensure!(
            again.status == 409 && again.json()["errcode"] == "M_CANNOT_OVERWRITE_MEDIA",
            "PUT {path} a second time: expected 409 M_CANNOT_OVERWRITE_MEDIA, got HTTP {} {}",
            again.status,
            again.json()
        );
        let theirs = server.raw_as(&bob)?.bytes_abs("PUT", &path, Some(("image/png", png))).await?;
        ensure!(
            theirs.status == 403 || theirs.status == 409,
            "PUT {path} by a user who did not create the id: expected 403 M_FORBIDDEN (or 409), got HTTP {} {}",
            theirs.status,
            theirs.json()
        );
        Ok(())
    })
    .await;
}

/// The m.image content of event `event_id`, from the JSON the client holds.
fn image_content(
    ev: &Value,
) -> Result<matrix_sdk::ruma::events::room::message::ImageMessageEventContent> {
    let content: RoomMessageEventContent = serde_json::from_value(ev["content"].clone())
        .with_context(|| format!("not an m.room.message content: {ev}"))?;
    match content.msgtype {
        MessageType::Image(img) => Ok(img),
        other => bail!("expected msgtype m.image, got {}: {ev}", other.msgtype()),
    }
}

/// alice sends the photo as an `m.image` message, once in the encrypted
/// private chat (the SDK encrypts the file: `file` instead of `url`) and once
/// in an unencrypted room; bob downloads it from the event he received,
/// byte for byte, and in the clear room also gets a thumbnail of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_message_downloaded_by_the_other_user() {
    bounded("image_message_downloaded_by_the_other_user", 180, async {
        let p = Pair::setup().await?;
        let jpeg = encode(&photo(), ImageFormat::Jpeg)?;
        let info = || {
            AttachmentInfo::Image(BaseImageInfo {
                width: Some(UInt::from(PHOTO_W)),
                height: Some(UInt::from(PHOTO_H)),
                size: UInt::new(jpeg.len() as u64),
                ..Default::default()
            })
        };

        // An unencrypted room bob joins too.
        let mut req = create_room::v3::Request::new();
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        req.name = Some("photos".to_owned());
        let public = p
            .alice
            .create_room(req)
            .await
            .at("POST /createRoom (public_chat)")?;
        p.bob
            .join_room_by_id(public.room_id())
            .await
            .at("POST /join/{roomId} (bob joins the public room)")?;

        let encrypted_room = p.room(&p.alice)?;
        for (room, encrypted) in [(encrypted_room, true), (public.clone(), false)] {
            let label = if encrypted {
                "encrypted room"
            } else {
                "unencrypted room"
            };
            let sent = room
                .send_attachment(
                    "sunset.jpg",
                    &mime::IMAGE_JPEG,
                    jpeg.clone(),
                    AttachmentConfig::new().info(info()),
                )
                .await
                .at(&format!("upload + PUT /send/m.room.message ({label})"))?
                .event_id;
            let (rid, want) = (room.room_id().to_owned(), sent.to_string());
            let mut got = None;
            sync_until(
                &p.bob,
                &format!("alice's m.image in the {label}"),
                SEE_WITHIN,
                |r| {
                    if let Some(e) = timeline(r, &rid)
                        .into_iter()
                        .find(|e| e["event_id"] == want.as_str())
                    {
                        got = Some(e);
                    }
                    got.is_some()
                },
            )
            .await?;
            let ev = got.expect("found");
            ensure!(
                !is_utd(&ev),
                "{label}: bob could not decrypt the m.image event: {ev}"
            );
            let img = image_content(&ev)?;
            match (&img.source, encrypted) {
                (MediaSource::Encrypted(_), true) | (MediaSource::Plain(_), false) => {}
                (src, _) => bail!("{label}: unexpected media source {src:?}"),
            }
            let meta = img
                .info
                .as_deref()
                .ok_or_else(|| anyhow!("{label}: m.image without info: {ev}"))?;
            ensure!(
                meta.mimetype.as_deref() == Some("image/jpeg")
                    && meta.width == Some(UInt::from(PHOTO_W))
                    && meta.height == Some(UInt::from(PHOTO_H)),
                "{label}: m.image info {:?}",
                ev["content"]["info"]
            );
            let bytes = download(
                &p.bob,
                img.source.clone(),
                MediaFormat::File,
                &format!("m.image in the {label}"),
            )
            .await?;
            ensure!(
                bytes == jpeg,
                "{label}: the image bob downloaded differs: {}",
                first_diff(&bytes, &jpeg)
            );
            if let MediaSource::Plain(uri) = &img.source {
                check_thumbnail(
                    &p.bob,
                    uri,
                    Method::Scale,
                    (320, 240),
                    PHOTO_W as f64 / PHOTO_H as f64,
                    "m.image",
                )
                .await?;
            }
        }
        Ok(())
    })
    .await;
}
