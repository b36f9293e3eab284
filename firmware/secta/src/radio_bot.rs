//! The radio's voice in Matrix: a bot user (`@radio`, made with the
//! homeserver's admin functions) that talks to the homeserver over the
//! Client-Server API like any client. It announces in each mount's room when a
//! show goes on air and off (with the listen URL), posts title changes at most
//! once a minute, and answers `!эфир` / `!np` with what plays and how many listen.
//! The radio and the homeserver know nothing of each other; this module joins them.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use secta_radio::{MountConfig, Radio, RadioEvent};
use secta_runtime::Shutdown;
use serde_json::{json, Value};

/// Least time between two title posts in one room.
const TITLE_EVERY: Duration = Duration::from_secs(60);

/// Makes sure the bot user exists with the password kept in
/// `DATA/radio/bot_password` (sealed under the data key when there is one).
pub fn ensure_user(
    hs: &secta_homeserver::Hs,
    data: &Path,
    vault: Option<&secta_vault::Vault>,
) -> anyhow::Result<String> {
    let f = data.join("radio").join("bot_password");
    std::fs::create_dir_all(data.join("radio"))?;
    let cipher = vault.map(|v| v.file_cipher()).transpose()?;
    let password =
        secta_vault::secret::password(cipher.as_ref(), &f, || secta_homeserver::random_string(24))?;
    if hs.admin_create_user("radio", &password, false).is_err() {
        // It exists: make sure it has the password we keep.
        hs.admin_reset_password("radio", &password)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.errcode, e.message))?;
    }
    Ok(password)
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    txn: u64,
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method, format!("{}/_matrix/client/v3{path}", self.base))
            .timeout(Duration::from_secs(60));
        if !self.token.is_empty() {
            r = r.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{status}: {}", v["errcode"].as_str().unwrap_or("?"));
        }
        Ok(v)
    }

    async fn notice(&mut self, room: &str, text: &str) {
        self.txn += 1;
        let path = format!(
            "/rooms/{}/send/m.room.message/radio{}-{}",
            enc(room),
            std::process::id(),
            self.txn
        );
        let body = json!({ "msgtype": "m.notice", "body": text });
        if let Err(e) = self.call(reqwest::Method::PUT, &path, Some(body)).await {
            tracing::warn!(error = %e, "radio bot could not post");
        }
    }

    /// The room of alias `#local:server`, created (public) if missing, joined.
    async fn room(&self, local: &str, server: &str) -> anyhow::Result<String> {
        let alias = format!("#{local}:{server}");
        let created = self
            .call(
                reqwest::Method::POST,
                "/createRoom",
                Some(json!({
                    "room_alias_name": local,
                    "name": "Радио · Radio",
                    "topic": "Эфиры радио бокса: !эфир — что сейчас играет. Box radio shows: !np — now playing.",
                    "preset": "public_chat",
                    "visibility": "public",
                })),
            )
            .await;
        if let Ok(v) = created {
            if let Some(id) = v["room_id"].as_str() {
                return Ok(id.to_owned());
            }
        }
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/join/{}", enc(&alias)),
                Some(json!({})),
            )
            .await
            .with_context(|| format!("joining {alias}"))?;
        Ok(v["room_id"].as_str().context("no room id")?.to_owned())
    }
}

/// Runs the bot until shutdown. `base` is the homeserver's local URL.
pub async fn run(
    radio: Radio,
    mounts: Vec<MountConfig>,
    base: String,
    server_name: String,
    password: String,
    shutdown: Shutdown,
) {
    let mut events = radio.subscribe();
    let sd = shutdown.clone();
    tokio::select! {
        _ = sd.wait() => {}
        r = run_inner(&radio, &mounts, base, &server_name, password, &mut events) => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "radio bot stopped");
            }
        }
    }
}

async fn run_inner(
    radio: &Radio,
    mounts: &[MountConfig],
    base: String,
    server_name: &str,
    password: String,
    events: &mut tokio::sync::broadcast::Receiver<RadioEvent>,
) -> anyhow::Result<()> {
    let mut c = Client {
        http: reqwest::Client::new(),
        base,
        token: String::new(),
        txn: 0,
    };
    // The homeserver starts beside us: try for a minute.
    let mut login = None;
    for _ in 0..60 {
        let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "radio"}, "password": password, "initial_device_display_name": "radio"});
        match c.call(reqwest::Method::POST, "/login", Some(body)).await {
            Ok(v) => {
                login = v["access_token"].as_str().map(str::to_owned);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    c.token = login.context("radio bot could not log in")?;
    // mount → room id, for mounts with a room.
    let mut rooms: HashMap<String, String> = HashMap::new();
    let mut by_alias: HashMap<String, String> = HashMap::new();
    for m in mounts {
        let Some(local) = &m.room else { continue };
        let id = match by_alias.get(local) {
            Some(id) => id.clone(),
            None => {
                let id = c.room(local, server_name).await?;
                by_alias.insert(local.clone(), id.clone());
                id
            }
        };
        rooms.insert(m.name.clone(), id);
    }
    if rooms.is_empty() {
        return Ok(());
    }
    tracing::info!(rooms = rooms.len(), "radio bot announcing");
    let mut since = c
        .call(reqwest::Method::GET, "/sync?timeout=0", None)
        .await?["next_batch"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let me = format!("@radio:{server_name}");
    let mut titles = Titles::default();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let sync_client = Client {
        http: c.http.clone(),
        base: c.base.clone(),
        token: c.token.clone(),
        txn: 0,
    };
    let mut sync = Box::pin(next_sync(&sync_client, since.clone()));
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(RadioEvent::OnAir { mount, name, listen_url }) => {
                    if let Some(room) = rooms.get(&mount) {
                        c.notice(room, &format!("🔴 В эфире: {name}. Слушать: {listen_url}\nOn air: {name}. Listen: {listen_url}")).await;
                    }
                }
                Ok(RadioEvent::OffAir { mount }) => {
                    if let Some(room) = rooms.get(&mount) {
                        titles.pending.remove(room);
                        c.notice(room, &format!("Эфир окончен ({mount}).\nOff air ({mount}).")).await;
                    }
                }
                Ok(RadioEvent::Title { mount, title, .. }) => {
                    if let Some(room) = rooms.get(&mount) {
                        if !title.is_empty() {
                            titles.pending.insert(room.clone(), title);
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return Ok(()),
            },
            _ = tick.tick() => {}
            r = &mut sync => {
                match r {
                    Ok(v) => {
                        since = v["next_batch"].as_str().unwrap_or(&since).to_owned();
                        for (room_id, body) in commands(&v, &me) {
                            if rooms.values().any(|r| *r == room_id) {
                                let text = answer(radio, mounts, &rooms, &room_id, &body);
                                c.notice(&room_id, &text).await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "radio bot sync failed");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                sync = Box::pin(next_sync(&sync_client, since.clone()));
            }
        }
        // Post waiting titles whose room has been quiet for a minute.
        for (room, t) in titles.due(Instant::now()) {
            c.notice(&room, &format!("Сейчас звучит: {t}\nNow playing: {t}"))
                .await;
        }
    }
}

/// Title changes waiting to be posted: the newest per room, at most one post
/// per room every [`TITLE_EVERY`].
#[derive(Default)]
struct Titles {
    pending: HashMap<String, String>,
    last: HashMap<String, Instant>,
}

impl Titles {
    /// The posts due at `now` (and notes them as posted).
    fn due(&mut self, now: Instant) -> Vec<(String, String)> {
        let rooms: Vec<String> = self
            .pending
            .keys()
            .filter(|r| {
                self.last
                    .get(*r)
                    .is_none_or(|t| now.duration_since(*t) >= TITLE_EVERY)
            })
            .cloned()
            .collect();
        rooms
            .into_iter()
            .filter_map(|r| {
                let t = self.pending.remove(&r)?;
                self.last.insert(r.clone(), now);
                Some((r, t))
            })
            .collect()
    }
}

async fn next_sync(c: &Client, since: String) -> anyhow::Result<Value> {
    let filter = enc(
        r#"{"room":{"timeline":{"limit":20},"state":{"lazy_load_members":true}},"presence":{"types":[]}}"#,
    );
    c.call(
        reqwest::Method::GET,
        &format!("/sync?timeout=30000&since={}&filter={filter}", enc(&since)),
        None,
    )
    .await
}

/// `(room, body)` of every `!эфир` / `!np` command in a sync response.
fn commands(sync: &Value, me: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(join) = sync["rooms"]["join"].as_object() else {
        return out;
    };
    for (room, r) in join {
        for ev in r["timeline"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .take(100)
        {
            if ev["type"] != "m.room.message" || ev["sender"] == me {
                continue;
            }
            let body = ev["content"]["body"].as_str().unwrap_or("").trim();
            let cmd = body.split_whitespace().next().unwrap_or("").to_lowercase();
            if cmd == "!эфир" || cmd == "!np" {
                out.push((room.clone(), cmd));
            }
        }
    }
    out
}

/// What is playing on the room's mounts: Russian first, English for `!np`.
fn answer(
    radio: &Radio,
    mounts: &[MountConfig],
    rooms: &HashMap<String, String>,
    room: &str,
    cmd: &str,
) -> String {
    let status = radio.now_playing();
    let find = |m: &str| status.iter().find(|s| s.mount == m);
    let mut ru = Vec::new();
    let mut en = Vec::new();
    for m in mounts
        .iter()
        .filter(|m| rooms.get(&m.name).is_some_and(|r| r == room))
    {
        let Some(s) = find(&m.name) else { continue };
        let fallback = m.fallback.as_deref().and_then(find).filter(|f| f.on_air);
        // Who plays: the live show, else the fallback (auto-DJ), else the mount's own auto-DJ.
        let (who, kind) = match fallback {
            _ if s.live => (s, 0),
            Some(f) => (f, 1),
            None if s.on_air => (s, 2),
            None => {
                ru.push(format!("{}: сейчас тишина.", s.mount));
                en.push(format!("{}: silent now.", s.mount));
                continue;
            }
        };
        let title = if who.title.is_empty() {
            "—"
        } else {
            &who.title
        };
        let n = s.listeners + if kind == 1 { who.listeners } else { 0 };
        let (name, url) = (&who.name, &s.listen_url);
        ru.push(match kind {
            0 => format!("В эфире {name}: «{title}», слушают: {n}. {url}"),
            1 => format!("Прямого эфира нет, играет {name}: «{title}», слушают: {n}. {url}"),
            _ => format!("Играет {name}: «{title}», слушают: {n}. {url}"),
        });
        en.push(match kind {
            0 => format!("On air {name}: “{title}”, {n} listening. {url}"),
            1 => format!("No live show; {name} plays “{title}”, {n} listening. {url}"),
            _ => format!("{name} plays “{title}”, {n} listening. {url}"),
        });
    }
    if cmd == "!np" {
        format!("{}\n{}", en.join("\n"), ru.join("\n"))
    } else {
        format!("{}\n{}", ru.join("\n"), en.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_posted_at_most_once_a_minute_per_room() {
        let mut t = Titles::default();
        let t0 = Instant::now();
        t.pending.insert("!a".into(), "one".into());
        assert_eq!(t.due(t0), vec![("!a".into(), "one".into())]);
        t.pending.insert("!a".into(), "two".into());
        t.pending.insert("!a".into(), "three".into());
        t.pending.insert("!b".into(), "other room".into());
        assert_eq!(
            t.due(t0 + Duration::from_secs(30)),
            vec![("!b".into(), "other room".into())]
        );
        assert!(t.due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(
            t.due(t0 + Duration::from_secs(60)),
            vec![("!a".into(), "three".into())],
            "only the newest title, a minute after the last post"
        );
        assert!(t.due(t0 + Duration::from_secs(200)).is_empty());
    }
}
