//! `/status-json.xsl` in Icecast's format and the `/admin/metadata` endpoint.

use std::{
    sync::atomic::Ordering,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::{
    http::{self, Request},
    same_secret, Inner,
};

/// `Mon, 13 Jan 2025 12:00:00 +0000` (Icecast's `stream_start`).
pub(crate) fn rfc822(t: SystemTime) -> String {
    httpdate::fmt_http_date(t).replace("GMT", "+0000")
}

/// `2025-01-13T12:00:00+0000` (Icecast's `*_iso8601`).
pub(crate) fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The status document. Like Icecast: `source` is absent with no streams, an
/// object with one, an array with several.
pub(crate) fn json(inner: &Inner) -> String {
    let mut sources: Vec<Value> = Vec::new();
    for m in inner.all_mounts() {
        let Some(s) = m.active() else { continue };
        let info = s.info();
        let name = info
            .name
            .clone()
            .or_else(|| m.cfg.stream_name.clone())
            .unwrap_or_else(|| m.name.clone());
        let bitrate: Value = match info.bitrate.as_deref().map(str::parse::<u64>) {
            Some(Ok(n)) => json!(n),
            Some(Err(_)) => json!(info.bitrate),
            None => Value::Null,
        };
        let mut o = json!({
            "audio_info": info.audio_info,
            "bitrate": bitrate,
            "genre": info.genre.unwrap_or_else(|| "various".into()),
            "listener_peak": m.peak.load(Ordering::Relaxed),
            "listeners": m.listeners.load(Ordering::Relaxed),
            "listenurl": inner.listen_url(&m.name),
            "server_description": info.description.unwrap_or_else(|| "Unspecified description".into()),
            "server_name": name,
            "server_type": s.codec.content_type(),
            "server_url": info.url,
            "stream_start": rfc822(s.started),
            "stream_start_iso8601": iso8601(s.started),
            "title": info.title,
            "dummy": null,
        });
        // Icecast leaves out keys it has no value for.
        if let Some(obj) = o.as_object_mut() {
            obj.retain(|k, v| k == "dummy" || !v.is_null());
        }
        sources.push(o);
    }
    let host = inner
        .cfg
        .base_url()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .split(':')
        .next()
        .unwrap_or("localhost")
        .to_owned();
    let mut stats = json!({
        "admin": "icemaster@localhost",
        "host": host,
        "location": "Secta box",
        "server_id": crate::SERVER_ID,
        "server_start": rfc822(inner.started),
        "server_start_iso8601": iso8601(inner.started),
    });
    match sources.len() {
        0 => {}
        1 => stats["source"] = sources.pop().expect("one"),
        _ => stats["source"] = Value::Array(sources),
    }
    json!({ "icestats": stats }).to_string()
}

fn ice_response(ok: bool, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<iceresponse><message>{message}</message><return>{}</return></iceresponse>\n",
        u8::from(ok)
    )
}

/// `GET /admin/metadata?mount=/live&mode=updinfo&song=…` with the mount's
/// source credentials (user `source` or `admin`).
pub(crate) async fn admin_metadata(inner: &Inner, sock: &mut TcpStream, req: &Request) {
    let xml = "text/xml; charset=utf-8";
    let mount_name = req.query_param("mount").unwrap_or_default();
    let cfg = inner.cfg.mount(&mount_name);
    let ok = req
        .basic_password(&["source", "admin"])
        .is_some_and(|p| same_secret(&p, inner.password_for(&cfg)));
    if !ok {
        http::error(
            sock,
            401,
            "Authentication Required",
            "WWW-Authenticate: Basic realm=\"Icecast2 Server\"\r\n",
        )
        .await;
        return;
    }
    if req.query_param("mode").as_deref() != Some("updinfo") {
        let body = ice_response(false, "No such mode");
        http::respond(sock, 400, "Bad Request", xml, "", body.as_bytes()).await;
        return;
    }
    let song = req.query_param("song").unwrap_or_default();
    let song = crate::source::clean(&song);
    let found = inner
        .find_mount(&mount_name)
        .is_some_and(|m| crate::source::admin_title(inner, &m, &song));
    if !found {
        let body = ice_response(false, "Source does not exist");
        http::respond(sock, 400, "Bad Request", xml, "", body.as_bytes()).await;
        return;
    }
    tracing::info!(mount = %mount_name, "radio title updated");
    let body = ice_response(true, "Metadata update successful");
    http::respond(sock, 200, "OK", xml, "", body.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_format_like_icecast() {
        let t = UNIX_EPOCH + Duration::from_secs(1_736_769_600); // 2025-01-13 12:00:00
        assert_eq!(iso8601(t), "2025-01-13T12:00:00+0000");
        assert_eq!(rfc822(t), "Mon, 13 Jan 2025 12:00:00 +0000");
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00+0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&iso8601(leap)[..10], "2000-02-29");
    }
}
