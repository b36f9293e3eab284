//! Federation (Server-Server API): server keys and the notary, X-Matrix request
//! signing and checking, discovery of other servers, the persistent outbound
//! queue (store-and-forward with back-off), inbound transactions, joins and
//! invites across servers.
//!
//! Known limits of this first version: the state before an incoming event is
//! taken to be the room's current state (no state resolution of forks yet);
//! missing prev/auth events are not fetched; no backfill; no SRV lookup; EDUs
//! other than typing and receipts are ignored.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRequest, Request, State},
    http::StatusCode,
};
use ruma::{
    api::federation::authentication::{XMatrix, XMatrixSigningInput},
    canonical_json::{redact, CanonicalJsonObject},
    serde::Base64,
    signatures::{
        hash_and_sign_event, reference_hash, required_server_signatures_to_verify_event, sign_json,
        verify_event, verify_json, PublicKeyMap, PublicKeySet, Verified,
    },
    EventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    config::Peer,
    db::WriteTxn,
    error::{MxError, MxResult},
    extract::{PathArgs, QueryArgs},
    now_ms,
    pdu::{self, to_canonical, Pdu, Placement},
    random_string, state, Hs,
};

type J = axum::Json<Value>;

/// PDUs and EDUs per outbound transaction (the spec's limits).
const MAX_PDUS: i64 = 50;
const MAX_EDUS: i64 = 100;
/// Longest wait before retrying a destination that failed.
const MAX_BACKOFF_MS: i64 = 3600 * 1000;
/// How long our published keys are valid.
const KEY_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Outbound HTTP and caches of the federation side.
pub struct Fed {
    /// Server discovery and the HTTPS clients that follow it.
    pub(crate) discovery: crate::discovery::Discovery,
    key_failures: Mutex<HashMap<String, Instant>>,
    pub(crate) wakeup: tokio::sync::Notify,
}

impl Fed {
    pub fn new(cfg: &crate::config::FederationConfig) -> anyhow::Result<Self> {
        Ok(Self {
            discovery: crate::discovery::Discovery::new(cfg)?,
            key_failures: Mutex::new(HashMap::new()),
            wakeup: tokio::sync::Notify::new(),
        })
    }
}

fn fed_error(code: &'static str, msg: impl Into<String>) -> MxError {
    MxError::new(StatusCode::BAD_GATEWAY, code, msg)
}

impl Hs {
    fn peer(&self, server: &str) -> Option<&Peer> {
        self.config
            .federation
            .peers
            .iter()
            .find(|p| p.server_name == server)
    }

    fn is_blocked(&self, server: &str) -> bool {
        self.config
            .federation
            .blocked_servers
            .iter()
            .any(|b| b == server)
            || self
                .db
                .read(|c| {
                    c.prepare_cached("SELECT 1 FROM blocked_servers WHERE server_name=?1")?
                        .query_row([server], |_| Ok(()))
                        .optional()
                })
                .ok()
                .flatten()
                .is_some()
    }

    /// Blocks (or unblocks) a server by name: nothing is sent to it or taken from it.
    pub fn set_server_blocked(&self, server: &str, blocked: bool) -> MxResult<()> {
        ServerName::parse(server).map_err(|_| MxError::invalid_param("not a server name"))?;
        self.db.write(|w| -> rusqlite::Result<()> {
            if blocked {
                w.tx.execute(
                    "INSERT OR IGNORE INTO blocked_servers(server_name, ts) VALUES(?1,?2)",
                    params![server, now_ms() as i64],
                )?;
                w.tx.execute("DELETE FROM fed_queue WHERE destination=?1", [server])?;
            } else {
                w.tx.execute("DELETE FROM blocked_servers WHERE server_name=?1", [server])?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn check_federation(&self, server: &str) -> MxResult<()> {
        if !self.config.federation.enabled {
            return Err(MxError::forbidden("Federation is disabled on this box"));
        }
        if self.is_blocked(server) {
            return Err(MxError::forbidden("This server is blocked"));
        }
        Ok(())
    }

    /// Our key response, signed by ourselves.
    pub fn signed_server_keys(&self) -> Value {
        let (key_id, key) = self.verify_key();
        let old: Map<String, Value> = self
            .old_keys
            .iter()
            .map(|(id, k, at)| (id.clone(), json!({ "key": k, "expired_ts": at })))
            .collect();
        let mut obj = to_canonical(json!({
            "server_name": self.server_name,
            "verify_keys": { key_id: { "key": key } },
            "old_verify_keys": old,
            "valid_until_ts": now_ms() + KEY_VALIDITY_MS,
        }))
        .expect("key response is canonical JSON");
        sign_json(self.server_name.as_str(), &self.keypair, &mut obj)
            .expect("signing our key response");
        serde_json::to_value(obj).unwrap_or_default()
    }

    /// Where a server's federation API is: a configured peer, or found by the
    /// spec's discovery. Returns the base URL, the `Host` header to send (when
    /// the URL's is not it) and whether a self-signed certificate is fine.
    async fn base_url(&self, server: &ServerName) -> MxResult<(String, Option<String>, bool)> {
        if let Some(p) = self.peer(server.as_str()) {
            return Ok((
                p.url.trim_end_matches('/').to_owned(),
                None,
                p.accept_self_signed,
            ));
        }
        let t = self
            .fed
            .discovery
            .resolve(server)
            .await
            .map_err(|e| fed_error("M_UNKNOWN", format!("{server} not found: {e}")))?;
        let host = (t.base.trim_start_matches("https://") != t.host).then_some(t.host);
        Ok((t.base, host, false))
    }

    /// Sends a signed federation request and returns the JSON answer.
    pub(crate) async fn fed_request(
        &self,
        method: &str,
        dest: &ServerName,
        path: &str,
        body: Option<&Value>,
    ) -> MxResult<Value> {
        self.check_federation(dest.as_str())?;
        let (base, host, self_signed) = self.base_url(dest).await?;
        let body_bytes = body
            .map(|b| serde_json::to_vec(b))
            .transpose()?
            .unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(body_bytes.clone())
            .map_err(|e| MxError::unknown(e.to_string()))?;
        let x = XMatrix::sign_http_request(
            &req,
            XMatrixSigningInput::new(self.server_name.clone(), dest.to_owned(), &self.keypair),
        )
        .map_err(|e| MxError::unknown(format!("signing request: {e}")))?;
        let client = self.fed.discovery.client(self_signed);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| MxError::unknown(e.to_string()))?;
        let mut rb = client
            .request(method, format!("{base}{path}"))
            .header(http::header::AUTHORIZATION, http::HeaderValue::from(&x));
        if let Some(h) = host {
            rb = rb.header(http::header::HOST, h);
        }
        if body.is_some() {
            rb = rb
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body_bytes);
        }
        let resp = rb.send().await.map_err(|e| {
            fed_error(
                "M_UNKNOWN",
                format!("{dest} unreachable: {}", short_reason(&e)),
            )
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = v["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned();
            return Err(MxError::new(
                StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
                leak_code(&code),
                format!(
                    "{dest}: {}",
                    v["error"].as_str().unwrap_or("request failed")
                ),
            ));
        }
        Ok(v)
    }

    /// Verify keys of a server: ours, pinned, cached, or fetched (and cached).
    pub(crate) async fn server_keys(&self, server: &ServerName) -> MxResult<PublicKeySet> {
        let mut set = PublicKeySet::new();
        if server == self.server_name {
            let (id, key) = self.verify_key();
            set.insert(
                id,
                Base64::parse(&key).map_err(|e| MxError::unknown(e.to_string()))?,
            );
            for (id, key, _) in &self.old_keys {
                if let Ok(k) = Base64::parse(key) {
                    set.insert(id.clone(), k);
                }
            }
            return Ok(set);
        }
        if let Some((id, key)) = self
            .peer(server.as_str())
            .and_then(|p| p.pinned_key.clone())
        {
            set.insert(
                id,
                Base64::parse(&key).map_err(|_| MxError::unknown("bad pinned key in config"))?,
            );
            return Ok(set);
        }
        let now = now_ms() as i64;
        let cached: Vec<(String, String)> = self.db.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT key_id, key FROM server_keys WHERE server_name=?1 AND valid_until>?2",
            )?;
            let r = st
                .query_map(params![server.as_str(), now], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<Vec<_>, _>>();
            r
        })?;
        if !cached.is_empty() {
            for (id, key) in cached {
                if let Ok(k) = Base64::parse(&key) {
                    set.insert(id, k);
                }
            }
            return Ok(set);
        }
        // A server that just failed to give its keys is not asked again for a minute
        // (requests naming any origin must not turn us into a hammer).
        if let Some(at) = self
            .fed
            .key_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(server.as_str())
        {
            if at.elapsed() < Duration::from_secs(60) {
                return Err(fed_error(
                    "M_UNKNOWN",
                    format!("{server}'s keys are unavailable (recently failed)"),
                ));
            }
        }
        let v = match self
            .fed_get_unsigned(server, "/_matrix/key/v2/server")
            .await
        {
            Ok(v) => v,
            Err(e) => {
                let mut f = self
                    .fed
                    .key_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if f.len() > 10_000 {
                    f.clear();
                }
                f.insert(server.to_string(), Instant::now());
                return Err(e);
            }
        };
        if v["server_name"] != server.as_str() {
            return Err(fed_error(
                "M_UNKNOWN",
                format!("{server} answered with keys of another server"),
            ));
        }
        let mut fetched = PublicKeySet::new();
        for (id, k) in v["verify_keys"].as_object().into_iter().flatten() {
            if let Some(key) = k["key"].as_str().and_then(|s| Base64::parse(s).ok()) {
                fetched.insert(id.clone(), key);
            }
        }
        let obj: CanonicalJsonObject = serde_json::from_value(v.clone())?;
        let mut map = PublicKeyMap::new();
        map.insert(server.to_string(), fetched.clone());
        verify_json(&map, &obj).map_err(|_| {
            fed_error(
                "M_UNKNOWN",
                format!("{server}'s key response is not self-signed"),
            )
        })?;
        let valid_until = v["valid_until_ts"]
            .as_i64()
            .unwrap_or(now + 3600 * 1000)
            .min(now + KEY_VALIDITY_MS as i64);
        let mut all = fetched.clone();
        for (id, k) in v["old_verify_keys"].as_object().into_iter().flatten() {
            if let Some(key) = k["key"].as_str().and_then(|s| Base64::parse(s).ok()) {
                all.entry(id.clone()).or_insert(key);
            }
        }
        self.db.write(|w| -> rusqlite::Result<()> {
            for (id, key) in &all {
                w.tx.execute(
                    "INSERT INTO server_keys(server_name, key_id, key, valid_until) VALUES(?1,?2,?3,?4)
                     ON CONFLICT(server_name, key_id) DO UPDATE SET key=?3, valid_until=?4",
                    params![server.as_str(), id, key.encode(), valid_until],
                )?;
            }
            Ok(())
        })?;
        Ok(all)
    }

    async fn fed_get_unsigned(&self, server: &ServerName, path: &str) -> MxResult<Value> {
        self.check_federation(server.as_str())?;
        let (base, host, self_signed) = self.base_url(server).await?;
        let mut rb = self
            .fed
            .discovery
            .client(self_signed)
            .get(format!("{base}{path}"));
        if let Some(h) = host {
            rb = rb.header(http::header::HOST, h);
        }
        let resp = rb.send().await.map_err(|e| {
            fed_error(
                "M_UNKNOWN",
                format!("{server} unreachable: {}", short_reason(&e)),
            )
        })?;
        if !resp.status().is_success() {
            return Err(fed_error(
                "M_UNKNOWN",
                format!("{server} answered {}", resp.status()),
            ));
        }
        resp.json()
            .await
            .map_err(|_| fed_error("M_UNKNOWN", format!("{server} sent bad JSON")))
    }

    /// Checks signatures and hashes of a PDU; a PDU whose content hash does not
    /// match is redacted (as the spec says). Returns the event id and the PDU to store.
    async fn verify_pdu(
        &self,
        version: &RoomVersionId,
        value: Value,
    ) -> MxResult<(String, CanonicalJsonObject)> {
        let rules = pdu::rules_for(version)?;
        let obj = to_canonical(value)?;
        let servers = required_server_signatures_to_verify_event(&obj, &rules.signatures)
            .map_err(|e| MxError::bad_json(format!("PDU: {e}")))?;
        let mut map = PublicKeyMap::new();
        for s in servers {
            map.insert(s.to_string(), self.server_keys(&s).await?);
        }
        let hash =
            reference_hash(&obj, &rules).map_err(|e| MxError::bad_json(format!("PDU: {e}")))?;
        let event_id = format!("${hash}");
        let obj = match verify_event(&map, &obj, &rules) {
            Ok(Verified::All) => obj,
            Ok(Verified::Signatures) => {
                redact(obj, &rules.redaction, None).map_err(|e| MxError::bad_json(e.to_string()))?
            }
            Err(e) => {
                return Err(MxError::forbidden(format!(
                    "PDU signature check failed: {e}"
                )))
            }
        };
        Ok((event_id, obj))
    }

    /// Takes in a PDU for a room we are in: checks, authorises against the current
    /// state, stores it in the timeline and tells local members.
    async fn receive_pdu(&self, origin: &ServerName, value: Value) -> MxResult<String> {
        let room_id = value["room_id"]
            .as_str()
            .ok_or_else(|| MxError::bad_json("PDU without room_id"))?
            .to_owned();
        let room = RoomId::parse(&room_id).map_err(|_| MxError::bad_json("bad room_id"))?;
        let Some(version) = self.db.read(|c| pdu::room_version(c, &room_id))? else {
            return self.receive_out_of_band(&room, value).await;
        };
        let sender_server = value["sender"]
            .as_str()
            .and_then(|s| UserId::parse(s).ok())
            .map(|u| u.server_name().to_owned())
            .ok_or_else(|| MxError::bad_json("PDU without a valid sender"))?;
        if self.is_blocked(sender_server.as_str()) {
            return Err(MxError::forbidden("sender's server is blocked"));
        }
        if !self
            .db
            .read(|c| acl_allows(c, &room_id, sender_server.as_str()))?
            || !self.db.read(|c| acl_allows(c, &room_id, origin.as_str()))?
        {
            return Err(MxError::forbidden(
                "server is denied by the room's server ACL",
            ));
        }
        let (event_id, obj) = self.verify_pdu(&version, value).await?;
        let known = self.db.read(|c| -> rusqlite::Result<Option<bool>> {
            match pdu::get_event(c, &event_id)? {
                Some(_) => state::is_rejected(c, &event_id).map(Some),
                None => Ok(None),
            }
        })?;
        match known {
            Some(true) => return Err(MxError::forbidden("PDU rejected earlier")),
            Some(false) => return Ok(event_id),
            None => {}
        }
        let json = serde_json::to_string(&obj)?;
        let parsed = Pdu::parse(
            EventId::parse(&event_id).map_err(|e| MxError::bad_json(e.to_string()))?,
            &json,
        )
        .map_err(|e| MxError::bad_json(e.to_string()))?;
        if !in_room(&parsed, &room) {
            return Err(MxError::bad_json("PDU of another room"));
        }
        let rules = pdu::rules_for(&version)?;
        self.fetch_missing_auth(origin, &room, &version, &parsed)
            .await?;
        // Prev events not in the graph here (a gap get_missing_events could not
        // fill): the state after each is asked of the sender (/state_ids).
        let unknown: Vec<String> = self.db.read(|c| -> rusqlite::Result<Vec<String>> {
            let mut out = Vec::new();
            for p in &parsed.prev_events {
                // Rejected prev events stay out of the state (they have none).
                if state::event_groups(c, p.as_str())?.is_none()
                    && !state::is_rejected(c, p.as_str())?
                {
                    out.push(p.to_string());
                }
            }
            Ok(out)
        })?;
        for prev in unknown.iter().take(10) {
            // The sender first; then (it may not know yet that we are in the
            // room, or be gone) a few other servers in the room.
            let mut asked = vec![origin.to_owned()];
            if let Err(first) = self.state_after_remote(origin, &room, &version, prev).await {
                let others = self.db.read(|c| joined_servers(c, room.as_str()))?;
                let mut last = first;
                let mut found = false;
                for s in others
                    .iter()
                    .filter(|s| {
                        s.as_str() != self.server_name.as_str() && s.as_str() != origin.as_str()
                    })
                    .filter_map(|s| ServerName::parse(s).ok())
                    .take(3)
                {
                    asked.push(s.clone());
                    match self.state_after_remote(&s, &room, &version, prev).await {
                        Ok(()) => {
                            found = true;
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                if !found {
                    return Err(MxError::forbidden(format!(
                        "state at prev event {prev} unavailable (asked {}): {}",
                        asked
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        last.message
                    )));
                }
            }
        }
        // The spec's checks on receipt: against the event's own auth events, then
        // the state before it (from its prev events), then the current state;
        // failing the last only soft-fails it (kept in the graph, not shown).
        let outcome = self.db.write(|w| -> MxResult<Result<(), String>> {
            let reject = |w: &mut WriteTxn<'_>, why: String| -> MxResult<Result<(), String>> {
                self.store_pdu_as(w, &room_id, &parsed, &json, None, Placement::Outlier)?;
                state::mark_rejected(w, &event_id, &why)?;
                Ok(Err(format!("PDU rejected: {why}")))
            };
            if let Err(e) = auth_by_auth_events(w, &rules, &parsed, &HashMap::new()) {
                return reject(w, e);
            }
            let current = state::ensure_current_group(w, &room_id)?;
            let before =
                state::state_before(w, &room_id, &rules, &parsed.prev_events)?.unwrap_or(current);
            if before != current {
                let at = state::load_group(w, before)?;
                if let Err(e) = auth_against_state(w, &rules, &parsed, &at) {
                    return reject(w, e);
                }
            }
            if let Err(e) = auth_against_current_state(w, &rules, &room_id, &parsed) {
                if before == current {
                    return reject(w, e);
                }
                self.store_pdu_as(
                    w,
                    &room_id,
                    &parsed,
                    &json,
                    None,
                    Placement::SoftFailed(before),
                )?;
                state::mark_soft_failed(w, &event_id, &e)?;
                return Ok(Err(format!("PDU soft-failed: {e}")));
            }
            let stream = self.store_pdu_as(
                w,
                &room_id,
                &parsed,
                &json,
                None,
                Placement::TimelineAfter(before),
            )?;
            self.refresh_current_state(w, &room_id, &rules)?;
            self.after_store(w, &room, &parsed, &json, stream, &rules, None)?;
            Ok(Ok(()))
        })?;
        if let Err(why) = outcome {
            return Err(MxError::forbidden(why));
        }
        self.notify_room(&room_id);
        if let Some(k) = &parsed.state_key {
            self.notify_users([k.as_str()]);
        }
        Ok(event_id)
    }
}

impl Hs {
    /// A membership event of a room this box does not hold, about a local user
    /// with an invite from that room or a knock on it pending: a leave (a knock
    /// refused, an invite withdrawn) or a ban ends it, and the user's clients
    /// see them leave. Its signatures are checked; the room's auth rules cannot
    /// be (the state is not here).
    async fn receive_out_of_band(&self, room: &RoomId, value: Value) -> MxResult<String> {
        let unknown = || MxError::not_found("Room unknown here");
        let Some(user) = value["state_key"]
            .as_str()
            .filter(|_| value["type"] == "m.room.member")
            .and_then(|k| UserId::parse(k).ok())
            .filter(|u| u.server_name() == self.server_name)
        else {
            return Err(unknown());
        };
        if !matches!(
            value["content"]["membership"].as_str(),
            Some("leave" | "ban")
        ) {
            return Err(unknown());
        }
        let pending: Option<String> = self.db.read(|c| {
            c.query_row(
                "SELECT room_version FROM remote_invites WHERE room_id=?1 AND user_id=?2 AND declined=0",
                params![room.as_str(), user.as_str()],
                |r| r.get(0),
            )
            .optional()
        })?;
        let version = pending
            .and_then(|v| RoomVersionId::try_from(v.as_str()).ok())
            .ok_or_else(unknown)?;
        let (event_id, obj) = self.verify_pdu(&version, value).await?;
        let mut ev = serde_json::to_value(&obj)?;
        ev["event_id"] = json!(event_id);
        self.db.write(|w| -> rusqlite::Result<()> {
            let stream = w.next_stream();
            w.tx.execute(
                "UPDATE remote_invites SET declined=1, event_json=?1, stream=?2 WHERE room_id=?3 AND user_id=?4",
                params![ev.to_string(), stream, room.as_str(), user.as_str()],
            )?;
            w.note(crate::db::UserRows::RemoteInvites, user.as_str(), stream);
            w.persist_stream()
        })?;
        self.notify_users([user.as_str()]);
        tracing::info!(%room, "a pending invite or knock was answered by the room");
        Ok(event_id)
    }
}

/// What clients are shown of an invite from (or our knock on) a room this box
/// does not hold: the stripped state that came with it and the member event.
pub(crate) fn remote_stripped_state(member_event: &Value, stripped: &str) -> Vec<Value> {
    let mut events: Vec<Value> = serde_json::from_str(stripped).unwrap_or_default();
    events.retain(|e| e.is_object());
    let ev = member_event;
    events.push(json!({ "type": ev["type"], "state_key": ev["state_key"], "sender": ev["sender"], "content": ev["content"] }));
    events
}

/// Whether the room's `m.room.server_acl` lets `server` take part.
pub(crate) fn acl_allows(c: &Connection, room: &str, server: &str) -> MxResult<bool> {
    let Some(acl) = pdu::state_content(c, room, "m.room.server_acl", "")? else {
        return Ok(true);
    };
    let name = ServerName::parse(server).ok();
    let host = name.as_ref().map_or(server, |s| s.host());
    if acl["allow_ip_literals"] == false && name.as_ref().is_some_and(|s| s.is_ip_literal()) {
        return Ok(false);
    }
    let matches = |p: &str| glob_match(p.as_bytes(), host.as_bytes());
    if acl["deny"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(matches)
    {
        return Ok(false);
    }
    Ok(acl["allow"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(matches))
}

/// Server ACL globs: `*` any run, `?` one character, case-insensitive.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    match (p.first(), t.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&p[1..], t) || (!t.is_empty() && glob_match(p, &t[1..])),
        (Some(b'?'), Some(_)) => glob_match(&p[1..], &t[1..]),
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => glob_match(&p[1..], &t[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn acl_globs() {
        assert!(glob_match(b"*", b"box.example"));
        assert!(glob_match(b"*.example", b"a.box.example"));
        assert!(!glob_match(b"*.example", b"example"));
        assert!(glob_match(b"bo?.EXAMPLE", b"box.example"));
        assert!(!glob_match(b"evil.org", b"good.org"));
    }
}

fn short_reason(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}

/// Errcodes from other servers, kept to a known set (we need `&'static str`).
fn leak_code(code: &str) -> &'static str {
    match code {
        "M_FORBIDDEN" => "M_FORBIDDEN",
        "M_NOT_FOUND" => "M_NOT_FOUND",
        "M_INCOMPATIBLE_ROOM_VERSION" => "M_INCOMPATIBLE_ROOM_VERSION",
        "M_UNSUPPORTED_ROOM_VERSION" => "M_UNSUPPORTED_ROOM_VERSION",
        "M_BAD_JSON" => "M_BAD_JSON",
        "M_LIMIT_EXCEEDED" => "M_LIMIT_EXCEEDED",
        "M_UNAUTHORIZED" => "M_UNAUTHORIZED",
        _ => "M_UNKNOWN",
    }
}

/// A request from another server, its X-Matrix signature checked.
pub struct FedRequest {
    pub origin: OwnedServerName,
    pub body: Value,
}

impl FromRequest<Arc<Hs>> for FedRequest {
    type Rejection = MxError;

    async fn from_request(req: Request, hs: &Arc<Hs>) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let x = XMatrix::extract_from_http_headers(&parts.headers).map_err(|_| {
            MxError::new(
                StatusCode::UNAUTHORIZED,
                "M_UNAUTHORIZED",
                "Missing or malformed X-Matrix authorization",
            )
        })?;
        hs.check_federation(x.origin.as_str())?;
        let bytes = axum::body::to_bytes(body, hs.config.max_request_bytes)
            .await
            .map_err(|_| MxError::too_large("Request body too large"))?;
        // Malformed JSON is refused before any key is fetched or signature checked.
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| MxError::not_json("Body is not JSON"))?
        };
        let keys = hs.server_keys(&x.origin).await?;
        let mut map = PublicKeyMap::new();
        map.insert(x.origin.to_string(), keys);
        // Nested routers strip their prefix from `uri`; the signature covers the full path.
        let uri = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map(|u| u.0.clone())
            .unwrap_or_else(|| parts.uri.clone());
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let check = http::Request::builder()
            .method(parts.method.clone())
            .uri(path)
            .body(bytes.to_vec())
            .map_err(|e| MxError::unknown(e.to_string()))?;
        x.verify_http_request(&check, &hs.server_name, &map)
            .map_err(|_| {
                MxError::new(
                    StatusCode::UNAUTHORIZED,
                    "M_UNAUTHORIZED",
                    "X-Matrix signature does not verify",
                )
            })?;
        // A server that talks to us is up: retry its queue now, not at the end of its back-off.
        let origin = x.origin.clone();
        let _ = hs.db.write(|w| {
            w.tx.execute(
                "UPDATE fed_destinations SET retry_at=0 WHERE server_name=?1 AND failures>0",
                [origin.as_str()],
            )
        });
        hs.fed.wakeup.notify_one();
        Ok(FedRequest {
            origin: x.origin,
            body,
        })
    }
}

// ---- Endpoints ----

pub async fn version() -> J {
    axum::Json(json!({ "server": { "name": "Secta", "version": env!("CARGO_PKG_VERSION") } }))
}

pub async fn server_keys_endpoint(State(hs): State<Arc<Hs>>) -> J {
    axum::Json(hs.signed_server_keys())
}

/// Notary: our own keys and keys we hold for others, countersigned by us.
async fn notary_response(hs: &Hs, servers: Vec<String>) -> MxResult<J> {
    let mut out = Vec::new();
    for s in servers {
        let Ok(name) = ServerName::parse(&s) else {
            continue;
        };
        if name == hs.server_name {
            out.push(hs.signed_server_keys());
            continue;
        }
        let Ok(keys) = hs.server_keys(&name).await else {
            continue;
        };
        let mut verify = Map::new();
        for (id, k) in keys {
            verify.insert(id, json!({ "key": k.encode() }));
        }
        let mut obj = to_canonical(json!({
            "server_name": s, "verify_keys": verify, "old_verify_keys": {}, "valid_until_ts": now_ms() + 3600 * 1000,
        }))?;
        sign_json(hs.server_name.as_str(), &hs.keypair, &mut obj)
            .map_err(|e| MxError::unknown(e.to_string()))?;
        out.push(serde_json::to_value(obj)?);
    }
    Ok(axum::Json(json!({ "server_keys": out })))
}

#[derive(Deserialize)]
pub struct KeyQueryBody {
    server_keys: BTreeMap<String, Value>,
}

pub async fn key_query(
    State(hs): State<Arc<Hs>>,
    crate::extract::Json(body): crate::extract::Json<KeyQueryBody>,
) -> MxResult<J> {
    notary_response(&hs, body.server_keys.into_keys().take(10).collect()).await
}

pub async fn key_query_one(
    State(hs): State<Arc<Hs>>,
    PathArgs(server): PathArgs<String>,
) -> MxResult<J> {
    notary_response(&hs, vec![server]).await
}

pub async fn send_transaction(
    State(hs): State<Arc<Hs>>,
    PathArgs(txn_id): PathArgs<String>,
    req: FedRequest,
) -> MxResult<J> {
    let origin = req.origin.clone();
    if req.body["origin"]
        .as_str()
        .is_some_and(|o| o != origin.as_str())
    {
        return Err(MxError::forbidden(
            "origin in body does not match the request signature",
        ));
    }
    let pdus = req.body["pdus"].as_array().cloned().unwrap_or_default();
    let edus = req.body["edus"].as_array().cloned().unwrap_or_default();
    if pdus.len() > MAX_PDUS as usize || edus.len() > MAX_EDUS as usize {
        return Err(MxError::bad_json(
            "too many PDUs or EDUs in one transaction",
        ));
    }
    // Claimed before processing, so a retry of a slow transaction is not taken in twice.
    let fresh = hs.db.write(|w| {
        w.tx.execute(
            "INSERT OR IGNORE INTO fed_txns(origin, txn_id, ts) VALUES(?1,?2,?3)",
            params![origin.as_str(), txn_id, now_ms() as i64],
        )
    })?;
    if fresh == 0 {
        return Ok(axum::Json(json!({ "pdus": {} })));
    }
    let mut results = Map::new();
    for p in pdus {
        hs.fill_gap(&origin, &p).await;
        // The spec keys results by event id, which rooms v3+ do not carry: compute it.
        let id_hint = p["event_id"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| computed_event_id(&hs, &p));
        match hs.receive_pdu(&origin, p).await {
            Ok(id) => {
                results.insert(id, json!({}));
            }
            Err(e) => {
                tracing::info!(%origin, errcode = e.errcode, reason = %e.message, "PDU not accepted");
                results.insert(
                    id_hint.unwrap_or_else(|| "unknown".into()),
                    json!({ "error": e.message }),
                );
            }
        }
    }
    for e in edus {
        receive_edu(&hs, &origin, &e);
    }
    Ok(axum::Json(json!({ "pdus": results })))
}

/// The id of a PDU of a room known here (its reference hash), if it can be worked out.
fn computed_event_id(hs: &Hs, p: &Value) -> Option<String> {
    let room = p["room_id"].as_str()?;
    let version = hs.db.read(|c| pdu::room_version(c, room)).ok()??;
    let rules = pdu::rules_for(&version).ok()?;
    let obj = to_canonical(p.clone()).ok()?;
    Some(format!("${}", reference_hash(&obj, &rules).ok()?))
}

fn receive_edu(hs: &Hs, origin: &ServerName, edu: &Value) {
    let content = &edu["content"];
    match edu["edu_type"].as_str() {
        Some("m.typing") => {
            let (Some(room), Some(user)) =
                (content["room_id"].as_str(), content["user_id"].as_str())
            else {
                return;
            };
            if !UserId::parse(user).is_ok_and(|u| u.server_name() == origin) {
                return;
            }
            if hs
                .db
                .read(|c| pdu::membership(c, room, user))
                .ok()
                .flatten()
                .as_deref()
                != Some("join")
                || !hs
                    .db
                    .read(|c| acl_allows(c, room, origin.as_str()))
                    .unwrap_or(false)
            {
                return;
            }
            let until = content["typing"]
                .as_bool()
                .unwrap_or(false)
                .then(|| Instant::now() + Duration::from_secs(30));
            hs.typing.set_remote(room, user, until);
            hs.notify_room(room);
        }
        Some("m.receipt") => {
            for (room, kinds) in content.as_object().into_iter().flatten() {
                for (kind, users) in kinds.as_object().into_iter().flatten() {
                    if kind != "m.read" {
                        continue;
                    }
                    for (user, data) in users.as_object().into_iter().flatten() {
                        if !UserId::parse(user).is_ok_and(|u| u.server_name() == origin) {
                            continue;
                        }
                        let Some(event_id) = data["event_ids"]
                            .as_array()
                            .and_then(|a| a.first())
                            .and_then(Value::as_str)
                        else {
                            continue;
                        };
                        let thread = data["data"]["thread_id"].as_str().unwrap_or("");
                        let ts = data["data"]["ts"].as_i64().unwrap_or(now_ms() as i64);
                        let stored = hs.db.write(|w| -> rusqlite::Result<bool> {
                            let in_this_room = pdu::get_event(w, event_id)?.is_some_and(|e| e.room_id == *room);
                            if pdu::membership(w, room, user)?.as_deref() != Some("join") || !in_this_room {
                                return Ok(false);
                            }
                            if !acl_allows(w, room, origin.as_str()).unwrap_or(false) {
                                return Ok(false);
                            }
                            let stream = w.next_stream();
                            w.tx.execute(
                                "INSERT INTO receipts(room_id, user_id, receipt_type, thread_id, event_id, ts, stream) VALUES(?1,?2,'m.read',?3,?4,?5,?6)
                                 ON CONFLICT(room_id, user_id, receipt_type, thread_id) DO UPDATE SET event_id=?4, ts=?5, stream=?6",
                                params![room, user, thread, event_id, ts, stream],
                            )?;
                            w.note(crate::db::UserRows::Room, room, stream);
                            w.note(crate::db::UserRows::Receipts, room, stream);
                            w.persist_stream()?;
                            Ok(true)
                        });
                        if matches!(stored, Ok(true)) {
                            hs.notify_room(room);
                        }
                    }
                }
            }
        }
        Some("m.direct_to_device") => {
            let Some(sender) = content["sender"]
                .as_str()
                .filter(|s| UserId::parse(s).is_ok_and(|u| u.server_name() == origin))
            else {
                return;
            };
            let kind = content["type"].as_str().unwrap_or_default();
            let mut woken = Vec::new();
            let r = hs.db.write(|w| -> rusqlite::Result<()> {
                for (user, devices) in content["messages"].as_object().into_iter().flatten() {
                    if !UserId::parse(user).is_ok_and(|u| u.server_name() == hs.server_name) {
                        continue;
                    }
                    for (device, msg) in devices.as_object().into_iter().flatten() {
                        let targets: Vec<String> = if device == "*" {
                            let mut st =
                                w.prepare_cached("SELECT device_id FROM devices WHERE user_id=?1")?;
                            let r = st
                                .query_map([user], |r| r.get(0))?
                                .collect::<Result<Vec<_>, _>>()?;
                            r
                        } else {
                            w.query_row(
                                "SELECT device_id FROM devices WHERE user_id=?1 AND device_id=?2",
                                params![user, device],
                                |r| r.get(0),
                            )
                            .optional()?
                            .into_iter()
                            .collect()
                        };
                        for t in targets {
                            crate::keys::queue_to_device(
                                hs,
                                w,
                                (user.as_str(), t.as_str()),
                                sender,
                                kind,
                                &msg.to_string(),
                            )?;
                        }
                    }
                    woken.push(user.clone());
                }
                Ok(())
            });
            if r.is_ok() {
                hs.notify_users(woken.iter().map(String::as_str));
            }
        }
        Some("m.presence") if hs.config.presence => {
            for p in content["push"].as_array().into_iter().flatten().take(100) {
                let Some(user) = p["user_id"]
                    .as_str()
                    .filter(|u| UserId::parse(u).is_ok_and(|u| u.server_name() == origin))
                else {
                    continue;
                };
                let presence = p["presence"].as_str().unwrap_or("offline");
                if !matches!(presence, "online" | "offline" | "unavailable") {
                    continue;
                }
                let status = p.get("status_msg").map(|s| s.as_str().map(str::to_owned));
                let _ = crate::ephemeral::update_presence(hs, user, presence, status);
            }
        }
        Some("m.device_list_update") | Some("m.signing_key_update") => {
            let Some(user) = content["user_id"]
                .as_str()
                .filter(|s| UserId::parse(s).is_ok_and(|u| u.server_name() == origin))
            else {
                return;
            };
            let r = hs.db.write(|w| -> rusqlite::Result<()> {
                crate::keys::mark_device_list_change(w, user)?;
                w.persist_stream()
            });
            if r.is_ok() {
                if let Ok(users) = hs.db.read(|c| crate::keys::users_sharing_rooms(c, user)) {
                    hs.notify_users(users.iter().map(String::as_str));
                }
            }
        }
        _ => {}
    }
}

fn origin_owns(user: &str, origin: &ServerName) -> MxResult<()> {
    match UserId::parse(user) {
        Ok(u) if u.server_name() == origin => Ok(()),
        _ => Err(MxError::forbidden(
            "The user does not belong to the requesting server",
        )),
    }
}

pub async fn make_join(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, user)): PathArgs<(String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    req: FedRequest,
) -> MxResult<J> {
    origin_owns(&user, &req.origin)?;
    let vers: Vec<String> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(q.as_deref().unwrap_or(""))
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k == "ver")
            .map(|(_, v)| v)
            .collect();
    let room_id = RoomId::parse(&room).map_err(|_| MxError::invalid_param("bad room id"))?;
    let version = hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Unknown room"))?;
    if !hs
        .db
        .read(|c| acl_allows(c, room_id.as_str(), req.origin.as_str()))?
    {
        return Err(MxError::forbidden(
            "Your server is denied by the room's server ACL",
        ));
    }
    if !vers.is_empty() && !vers.iter().any(|v| v == version.as_str()) {
        return Err(MxError::new(
            StatusCode::BAD_REQUEST,
            "M_INCOMPATIBLE_ROOM_VERSION",
            "Your server does not support this room's version",
        )
        .with_extra("room_version", json!(version.as_str())));
    }
    let template = membership_template(&hs, &room_id, &user, "join")?;
    Ok(axum::Json(
        json!({ "event": template, "room_version": version.as_str() }),
    ))
}

/// A membership event for a user of another server, built (and so checked
/// against the auth rules) here, without our hashes and signatures.
fn membership_template(hs: &Hs, room_id: &RoomId, user: &str, membership: &str) -> MxResult<Value> {
    let user_id = UserId::parse(user).map_err(|_| MxError::invalid_param("bad user id"))?;
    let mut content = json!({ "membership": membership });
    if membership == "join"
        && hs
            .db
            .read(|c| pdu::membership(c, room_id.as_str(), user))?
            .as_deref()
            != Some("invite")
    {
        // Restricted rooms: we authorise joins of members of the allowed rooms.
        if let Some(Value::Object(extra)) = hs.restricted_join_extra(room_id, &user_id)? {
            for (k, v) in extra {
                content[k] = v;
            }
        }
    }
    let ev = pdu::NewEvent {
        kind: "m.room.member",
        state_key: Some(user_id.as_str()),
        content,
        txn: None,
    };
    let built = hs
        .db
        .read(|c| hs.build_pdu_for(c, room_id, &user_id, &ev))?;
    let mut template: Value = serde_json::from_str(&built.json)?;
    if let Some(o) = template.as_object_mut() {
        o.remove("hashes");
        o.remove("signatures");
    }
    Ok(template)
}

/// make_leave / make_knock: a template for another server's user.
fn make_membership(
    hs: &Hs,
    room: &str,
    user: &str,
    req: &FedRequest,
    membership: &str,
) -> MxResult<J> {
    origin_owns(user, &req.origin)?;
    let room_id = RoomId::parse(room).map_err(|_| MxError::invalid_param("bad room id"))?;
    let version = hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Unknown room"))?;
    if !hs
        .db
        .read(|c| acl_allows(c, room_id.as_str(), req.origin.as_str()))?
    {
        return Err(MxError::forbidden(
            "Your server is denied by the room's server ACL",
        ));
    }
    let template = membership_template(hs, &room_id, user, membership)?;
    Ok(axum::Json(
        json!({ "event": template, "room_version": version.as_str() }),
    ))
}

pub async fn make_leave(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, user)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    make_membership(&hs, &room, &user, &req, "leave")
}

pub async fn send_leave(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    send_membership(&hs, &room, &event_id, &req, "leave").await?;
    Ok(axum::Json(json!({})))
}

pub async fn make_knock(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, user)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    make_membership(&hs, &room, &user, &req, "knock")
}

pub async fn send_knock(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    send_membership(&hs, &room, &event_id, &req, "knock").await?;
    let state = hs.db.read(|c| pdu::stripped_state(c, &room))?;
    Ok(axum::Json(json!({ "knock_room_state": state })))
}

/// Takes in a leave or knock another server built from our template: checked,
/// authorised against current state, stored and sent to the room's other servers.
async fn send_membership(
    hs: &Hs,
    room: &str,
    event_id: &str,
    req: &FedRequest,
    membership: &str,
) -> MxResult<()> {
    let room_id = RoomId::parse(room).map_err(|_| MxError::invalid_param("bad room id"))?;
    let version = hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Unknown room"))?;
    if !hs
        .db
        .read(|c| acl_allows(c, room_id.as_str(), req.origin.as_str()))?
    {
        return Err(MxError::forbidden(
            "Your server is denied by the room's server ACL",
        ));
    }
    let ev = &req.body;
    if ev["type"] != "m.room.member"
        || ev["content"]["membership"] != membership
        || ev["room_id"] != room_id.as_str()
    {
        return Err(MxError::bad_json(format!(
            "not a {membership} event for this room"
        )));
    }
    let user = ev["state_key"].as_str().unwrap_or_default().to_owned();
    origin_owns(&user, &req.origin)?;
    if ev["sender"] != user.as_str() {
        return Err(MxError::bad_json("sender and state_key differ"));
    }
    let (id, obj) = hs.verify_pdu(&version, ev.clone()).await?;
    if id != event_id {
        return Err(MxError::bad_json("event id does not match the event"));
    }
    let rules = pdu::rules_for(&version)?;
    let json = serde_json::to_string(&obj)?;
    let parsed = Pdu::parse(
        EventId::parse(&id).map_err(|e| MxError::bad_json(e.to_string()))?,
        &json,
    )
    .map_err(|e| MxError::bad_json(e.to_string()))?;
    hs.db.write(|w| -> MxResult<()> {
        if pdu::get_event(w, &id)?.is_some() {
            return Ok(());
        }
        auth_against_current_state(w, &rules, room_id.as_str(), &parsed)
            .map_err(|e| MxError::forbidden(format!("{membership} not allowed: {e}")))?;
        hs.commit_built(
            w,
            &room_id,
            pdu::Built {
                pdu: parsed.clone(),
                json: json.clone(),
                rules: rules.clone(),
                cited_groups: Vec::new(),
            },
            None,
            None,
            Some(req.origin.as_str()),
        )?;
        Ok(())
    })?;
    hs.notify_room(room_id.as_str());
    Ok(())
}

/// The auth chain of a set of events (ids), breadth first, bounded.
fn auth_chain(c: &Connection, start: &[String]) -> rusqlite::Result<Vec<String>> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: Vec<String> = start.to_vec();
    let mut out = Vec::new();
    while let Some(id) = queue.pop() {
        if out.len() > 50_000 {
            break;
        }
        let Some(p) = pdu::load_pdu(c, &id) else {
            continue;
        };
        for a in p.auth_events {
            if seen.insert(a.to_string()) {
                out.push(a.to_string());
                queue.push(a.to_string());
            }
        }
    }
    Ok(out)
}

fn pdu_value(c: &Connection, id: &str) -> rusqlite::Result<Option<Value>> {
    Ok(pdu::get_event(c, id)?.and_then(|e| serde_json::from_str(&e.json).ok()))
}

pub async fn send_join(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    let room_id = RoomId::parse(&room).map_err(|_| MxError::invalid_param("bad room id"))?;
    let version = hs
        .db
        .read(|c| pdu::room_version(c, room_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Unknown room"))?;
    if !hs
        .db
        .read(|c| acl_allows(c, room_id.as_str(), req.origin.as_str()))?
    {
        return Err(MxError::forbidden(
            "Your server is denied by the room's server ACL",
        ));
    }
    let ev = &req.body;
    if ev["type"] != "m.room.member"
        || ev["content"]["membership"] != "join"
        || ev["room_id"] != room_id.as_str()
    {
        return Err(MxError::bad_json("not a join event for this room"));
    }
    let user = ev["state_key"].as_str().unwrap_or_default().to_owned();
    origin_owns(&user, &req.origin)?;
    if ev["sender"] != user.as_str() {
        return Err(MxError::bad_json("join sender and state_key differ"));
    }
    let rules = pdu::rules_for(&version)?;
    // Countersigned (as an event: over its redacted form) before checking: a
    // restricted join needs the authorising server's signature, which is ours.
    let mut signed = to_canonical(ev.clone())?;
    ruma::signatures::sign_event(
        hs.server_name.as_str(),
        &hs.keypair,
        &mut signed,
        &rules.redaction,
    )
    .map_err(|e| MxError::unknown(e.to_string()))?;
    let (id, obj) = hs
        .verify_pdu(&version, serde_json::to_value(&signed)?)
        .await?;
    if id != event_id {
        return Err(MxError::bad_json("event id does not match the event"));
    }
    let json = serde_json::to_string(&obj)?;
    let parsed = Pdu::parse(
        EventId::parse(&id).map_err(|e| MxError::bad_json(e.to_string()))?,
        &json,
    )
    .map_err(|e| MxError::bad_json(e.to_string()))?;
    let state_ids: Vec<String> = hs.db.write(|w| -> MxResult<Vec<String>> {
        if pdu::get_event(w, &id)?.is_none() {
            auth_against_current_state(w, &rules, room_id.as_str(), &parsed)
                .map_err(|e| MxError::forbidden(format!("Join not allowed: {e}")))?;
            let built = pdu::Built {
                pdu: parsed.clone(),
                json: json.clone(),
                rules: rules.clone(),
                cited_groups: Vec::new(),
            };
            hs.commit_built(w, &room_id, built, None, None, Some(req.origin.as_str()))?;
        }
        let mut st = w.prepare("SELECT event_id FROM room_state WHERE room_id=?1")?;
        let r = st
            .query_map([room_id.as_str()], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(r)
    })?;
    hs.notify_room(room_id.as_str());
    hs.fed.wakeup.notify_one();
    let out = hs.db.read(|c| -> MxResult<Value> {
        let chain = auth_chain(c, &state_ids)?;
        let state: Vec<Value> = state_ids
            .iter()
            .filter_map(|i| pdu_value(c, i).ok().flatten())
            .collect();
        let chain: Vec<Value> = chain
            .iter()
            .filter_map(|i| pdu_value(c, i).ok().flatten())
            .collect();
        Ok(json!({
            "origin": hs.server_name,
            "state": state,
            "auth_chain": chain,
            "event": serde_json::from_str::<Value>(&json)?,
            "members_omitted": false,
        }))
    })?;
    Ok(axum::Json(out))
}

pub async fn invite(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    let version = supported_version(&req.body["room_version"])?;
    let ev = req.body["event"].clone();
    if ev["type"] != "m.room.member"
        || ev["content"]["membership"] != "invite"
        || ev["room_id"] != room.as_str()
    {
        return Err(MxError::bad_json("not an invite for this room"));
    }
    let target = ev["state_key"]
        .as_str()
        .and_then(|s| UserId::parse(s).ok())
        .ok_or_else(|| MxError::bad_json("bad state_key"))?;
    if target.server_name() != hs.server_name {
        return Err(MxError::forbidden("The invited user is not on this server"));
    }
    let exists = hs.db.read(|c| {
        c.query_row(
            "SELECT 1 FROM users WHERE user_id=?1 AND deactivated=0",
            [target.as_str()],
            |_| Ok(()),
        )
        .optional()
    })?;
    if exists.is_none() {
        return Err(MxError::not_found("No such user"));
    }
    origin_owns(ev["sender"].as_str().unwrap_or_default(), &req.origin)?;
    let (id, mut obj) = hs.verify_pdu(&version, ev).await?;
    if id != event_id {
        return Err(MxError::bad_json("event id does not match the event"));
    }
    let rules = pdu::rules_for(&version)?;
    ruma::signatures::sign_event(
        hs.server_name.as_str(),
        &hs.keypair,
        &mut obj,
        &rules.redaction,
    )
    .map_err(|e| MxError::unknown(e.to_string()))?;
    let signed = serde_json::to_value(&obj)?;
    let stripped = req.body["invite_room_state"].clone();
    hs.db.write(|w| -> rusqlite::Result<()> {
        let stream = w.next_stream();
        w.tx.execute(
            "INSERT INTO remote_invites(room_id, user_id, room_version, event_json, invite_state, stream, inviter_server, membership)
             VALUES(?1,?2,?3,?4,?5,?6,?7,'invite')
             ON CONFLICT(room_id, user_id) DO UPDATE SET event_json=?4, invite_state=?5, stream=?6, inviter_server=?7, declined=0, membership='invite'",
            params![room, target.as_str(), version.as_str(), signed.to_string(), stripped.to_string(), stream, req.origin.as_str()],
        )?;
        w.note(crate::db::UserRows::RemoteInvites, target.as_str(), stream);
        w.persist_stream()
    })?;
    hs.notify_users([target.as_str()]);
    Ok(axum::Json(json!({ "event": signed })))
}

fn require_in_room(c: &Connection, room: &str, server: &str) -> MxResult<()> {
    if !server_in_room(c, room, server)? {
        return Err(MxError::forbidden("Your server is not in this room"));
    }
    if !acl_allows(c, room, server)? {
        return Err(MxError::forbidden(
            "Your server is denied by the room's server ACL",
        ));
    }
    Ok(())
}

/// State ids of a room and their auth chain: the state before `at` (an event
/// of the room in the graph here), or the current state.
fn state_and_chain(
    c: &Connection,
    room: &str,
    at: Option<&str>,
) -> MxResult<(Vec<String>, Vec<String>)> {
    let ids: Vec<String> = match at {
        Some(ev) => {
            let known = pdu::get_event(c, ev)?.filter(|e| e.room_id == room);
            let groups = state::event_groups(c, ev)?;
            match (known, groups) {
                (Some(_), Some((before, _))) => {
                    state::load_group(c, before)?.into_values().collect()
                }
                _ => return Err(MxError::not_found("Event not found in this room's graph")),
            }
        }
        None => {
            let mut st = c.prepare_cached("SELECT event_id FROM room_state WHERE room_id=?1")?;
            let r = st
                .query_map([room], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            r
        }
    };
    let chain = auth_chain(c, &ids)?;
    Ok((ids, chain))
}

/// The servers with a user joined to the room (as this box knows it).
fn joined_servers(c: &Connection, room: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT substr(state_key, instr(state_key, ':')+1) FROM room_state
         WHERE room_id=?1 AND type='m.room.member' AND membership='join'",
    )?;
    let r = st.query_map([room], |r| r.get(0))?.collect();
    r
}

/// Whether a user of `server` is joined to the room now (so it may read its events
/// and state; a server whose users all left reads nothing new).
fn server_in_room(c: &Connection, room: &str, server: &str) -> rusqlite::Result<bool> {
    let pattern = format!("%:{server}");
    c.query_row(
        "SELECT 1 FROM room_state WHERE room_id=?1 AND type='m.room.member' AND state_key LIKE ?2 AND membership='join' LIMIT 1",
        params![room, pattern],
        |_| Ok(true),
    )
    .optional()
    .map(|o| o.unwrap_or(false))
}

pub async fn get_event(
    State(hs): State<Arc<Hs>>,
    PathArgs(event_id): PathArgs<String>,
    req: FedRequest,
) -> MxResult<J> {
    let out = hs.db.read(|c| -> MxResult<Value> {
        let ev = pdu::get_event(c, &event_id)?
            .filter(|_| !state::is_rejected(c, &event_id).unwrap_or(true))
            .ok_or_else(|| MxError::not_found("Event not found"))?;
        require_in_room(c, &ev.room_id, req.origin.as_str())?;
        Ok(json!({ "origin": hs.server_name, "origin_server_ts": now_ms(), "pdus": [serde_json::from_str::<Value>(&ev.json)?] }))
    })?;
    Ok(axum::Json(out))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct StateIdsQuery {
    event_id: Option<String>,
}

pub async fn state_ids(
    State(hs): State<Arc<Hs>>,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<StateIdsQuery>,
    req: FedRequest,
) -> MxResult<J> {
    let out = hs.db.read(|c| -> MxResult<Value> {
        require_in_room(c, &room, req.origin.as_str())?;
        let (ids, chain) = state_and_chain(c, &room, q.event_id.as_deref())?;
        Ok(json!({ "pdu_ids": ids, "auth_chain_ids": chain }))
    })?;
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct ProfileQuery {
    user_id: String,
    field: Option<String>,
}

pub async fn query_profile(
    State(hs): State<Arc<Hs>>,
    QueryArgs(q): QueryArgs<ProfileQuery>,
    _req: FedRequest,
) -> MxResult<J> {
    let row: Option<(Option<String>, Option<String>)> = hs.db.read(|c| {
        c.query_row(
            "SELECT displayname, avatar_url FROM users WHERE user_id=?1 AND deactivated=0",
            [&q.user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    })?;
    let (name, avatar) = row.ok_or_else(|| MxError::not_found("No such user"))?;
    let mut out = json!({});
    if q.field.as_deref() != Some("avatar_url") {
        if let Some(n) = name {
            out["displayname"] = json!(n);
        }
    }
    if q.field.as_deref() != Some("displayname") {
        if let Some(a) = avatar {
            out["avatar_url"] = json!(a);
        }
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct DirectoryQuery {
    room_alias: String,
}

pub async fn query_directory(
    State(hs): State<Arc<Hs>>,
    QueryArgs(q): QueryArgs<DirectoryQuery>,
    _req: FedRequest,
) -> MxResult<J> {
    let room: Option<String> = hs.db.read(|c| {
        c.query_row(
            "SELECT room_id FROM room_aliases WHERE alias=?1",
            [&q.room_alias],
            |r| r.get(0),
        )
        .optional()
    })?;
    let room = room.ok_or_else(|| MxError::not_found("Room alias not found"))?;
    Ok(axum::Json(
        json!({ "room_id": room, "servers": [hs.server_name] }),
    ))
}

// ---- Outbound queue ----

/// Servers (other than ours) that must receive an event of this room.
fn destinations(
    hs: &Hs,
    c: &Connection,
    room_id: &str,
    pdu: &Pdu,
) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT substr(state_key, instr(state_key, ':')+1) FROM room_state
         WHERE room_id=?1 AND type='m.room.member' AND membership IN ('join','invite','knock')",
    )?;
    let mut out: HashSet<String> = st
        .query_map([room_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if pdu.kind.to_string() == "m.room.member" {
        if let Some(u) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok()) {
            out.insert(u.server_name().to_string());
        }
    }
    out.remove(hs.server_name.as_str());
    Ok(out.into_iter().filter(|s| !hs.is_blocked(s)).collect())
}

/// Queues a local event for every other server in the room (same transaction as the event).
pub fn enqueue_pdu(
    hs: &Hs,
    w: &mut WriteTxn<'_>,
    room_id: &RoomId,
    pdu: &Pdu,
    json: &str,
    skip: Option<&str>,
) -> MxResult<()> {
    if !hs.config.federation.enabled {
        return Ok(());
    }
    let mut dests = destinations(hs, w, room_id.as_str(), pdu)?;
    dests.retain(|d| Some(d.as_str()) != skip);
    for d in &dests {
        w.tx.execute(
            "INSERT INTO fed_queue(destination, kind, json) VALUES(?1,'pdu',?2)",
            params![d, json],
        )?;
        w.tx.execute(
            "INSERT OR IGNORE INTO fed_destinations(server_name) VALUES(?1)",
            [d],
        )?;
    }
    if !dests.is_empty() {
        hs.fed.wakeup.notify_one();
    }
    Ok(())
}

/// Queues an EDU for the servers of a room's remote members.
pub fn enqueue_room_edu(hs: &Hs, room_id: &str, edu: Value) -> MxResult<()> {
    if !hs.config.federation.enabled {
        return Ok(());
    }
    hs.db.write(|w| -> MxResult<()> {
        let servers = joined_servers(w, room_id)?;
        for s in servers
            .iter()
            .filter(|s| s.as_str() != hs.server_name.as_str() && !hs.is_blocked(s))
        {
            w.tx.execute(
                "INSERT INTO fed_queue(destination, kind, json) VALUES(?1,'edu',?2)",
                params![s, edu.to_string()],
            )?;
            w.tx.execute(
                "INSERT OR IGNORE INTO fed_destinations(server_name) VALUES(?1)",
                [s],
            )?;
        }
        Ok(())
    })?;
    hs.fed.wakeup.notify_one();
    Ok(())
}

/// Sends queued PDUs and EDUs until shutdown, one transaction per destination at a
/// time, retrying failed destinations with back-off (capped at an hour) for as
/// long as items wait; the queue survives restarts.
pub async fn sender(hs: Arc<Hs>, shutdown: secta_runtime::Shutdown) {
    loop {
        tokio::select! {
            _ = hs.fed.wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.clone().wait() => return,
        }
        let now = now_ms() as i64;
        let due: Vec<(String, i64)> = match hs.db.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT d.server_name, d.failures FROM fed_destinations d
                 WHERE d.retry_at<=?1 AND EXISTS (SELECT 1 FROM fed_queue q WHERE q.destination=d.server_name) LIMIT 20",
            )?;
            let r = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>();
            r
        }) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the federation queue failed");
                continue;
            }
        };
        let mut tasks = Vec::new();
        for (dest, failures) in due {
            let hs = hs.clone();
            tasks.push(tokio::spawn(
                async move { send_one(&hs, &dest, failures).await },
            ));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn send_one(hs: &Hs, dest: &str, failures: i64) {
    let Ok(server) = ServerName::parse(dest) else {
        return;
    };
    let items: Vec<(i64, String, String)> = match hs.db.read(|c| {
        let mut st = c.prepare_cached(
            "SELECT id, kind, json FROM (SELECT id, kind, json FROM fed_queue WHERE destination=?1 AND kind='pdu' ORDER BY id LIMIT ?2)
             UNION ALL SELECT id, kind, json FROM (SELECT id, kind, json FROM fed_queue WHERE destination=?1 AND kind='edu' ORDER BY id LIMIT ?3)",
        )?;
        let r = st.query_map(params![dest, MAX_PDUS, MAX_EDUS], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<Vec<_>, _>>();
        r
    }) {
        Ok(i) => i,
        Err(_) => return,
    };
    if items.is_empty() {
        return;
    }
    let pdus: Vec<Value> = items
        .iter()
        .filter(|i| i.1 == "pdu")
        .filter_map(|i| serde_json::from_str(&i.2).ok())
        .collect();
    let edus: Vec<Value> = items
        .iter()
        .filter(|i| i.1 == "edu")
        .filter_map(|i| serde_json::from_str(&i.2).ok())
        .collect();
    let txn = format!("{}-{}", now_ms(), random_string(6));
    let body = json!({ "origin": hs.server_name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": edus });
    let result = hs
        .fed_request(
            "PUT",
            &server,
            &format!("/_matrix/federation/v1/send/{txn}"),
            Some(&body),
        )
        .await;
    let now = now_ms() as i64;
    let ids: Vec<i64> = items.iter().map(|i| i.0).collect();
    let _ = hs.db.write(|w| -> rusqlite::Result<()> {
        match &result {
            Ok(_) => {
                for id in &ids {
                    w.tx.execute("DELETE FROM fed_queue WHERE id=?1", [id])?;
                }
                w.tx.execute(
                    "UPDATE fed_destinations SET failures=0, retry_at=0, last_success=?1, last_error=NULL WHERE server_name=?2",
                    params![now, dest],
                )?;
            }
            Err(e) => {
                let backoff = (1000i64 << failures.min(22)).min(MAX_BACKOFF_MS);
                w.tx.execute(
                    "UPDATE fed_destinations SET failures=failures+1, retry_at=?1, last_error=?2 WHERE server_name=?3",
                    params![now + backoff, format!("{}: {}", e.errcode, e.message), dest],
                )?;
            }
        }
        Ok(())
    });
    match result {
        Ok(_) => hs.fed.wakeup.notify_one(),
        Err(e) => tracing::info!(
            destination = dest,
            failures = failures + 1,
            errcode = e.errcode,
            "federation send failed; will retry"
        ),
    }
}

// ---- Joining and inviting across servers ----

impl Hs {
    /// `build_pdu` for events we only template (make_join).
    pub(crate) fn build_pdu_for(
        &self,
        c: &Connection,
        room: &RoomId,
        sender: &UserId,
        ev: &pdu::NewEvent<'_>,
    ) -> MxResult<pdu::Built> {
        self.build_pdu(c, room, sender, ev)
    }

    /// Joins a room that lives on other servers: make_join, sign, send_join, then
    /// store the room's state and our join.
    pub(crate) async fn remote_join(
        &self,
        room_id: &RoomId,
        user: &UserId,
        via: &[OwnedServerName],
    ) -> MxResult<()> {
        let mut last_err = MxError::not_found("No server to join the room through");
        for server in via.iter().filter(|s| **s != self.server_name) {
            match self.remote_join_via(room_id, user, server).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(%server, errcode = e.errcode, reason = %e.message, "join through server failed");
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    async fn remote_join_via(
        &self,
        room_id: &RoomId,
        user: &UserId,
        server: &ServerName,
    ) -> MxResult<()> {
        let Handshake {
            version,
            rules,
            event_id,
            obj,
            answer: joined,
            ..
        } = self
            .membership_handshake("join", "v2", room_id, user, server, |template| {
                let mut content = self.db.read(|c| self.member_content(c, user, "join"))?;
                if let Some(a) = template["content"]["join_authorised_via_users_server"].as_str() {
                    content["join_authorised_via_users_server"] = json!(a);
                }
                template["content"] = content;
                Ok(())
            })
            .await?;
        // Check everything we were given before storing any of it.
        let mut verified: Vec<(String, CanonicalJsonObject, bool)> = Vec::new();
        for (list, is_state) in [("auth_chain", false), ("state", true)] {
            for v in joined[list].as_array().into_iter().flatten() {
                let (id, o) = self.verify_pdu(&version, v.clone()).await?;
                verified.push((id, o, is_state));
            }
        }
        let join_json = match joined.get("event").filter(|e| e.is_object()) {
            Some(e) => {
                let (id, o) = self.verify_pdu(&version, e.clone()).await?;
                if id != event_id {
                    return Err(fed_error(
                        "M_UNKNOWN",
                        "resident server returned another join event",
                    ));
                }
                serde_json::to_string(&o)?
            }
            None => serde_json::to_string(&obj)?,
        };
        let join_pdu = Pdu::parse(
            EventId::parse(&event_id).map_err(|e| MxError::bad_json(e.to_string()))?,
            &join_json,
        )
        .map_err(|e| MxError::bad_json(e.to_string()))?;
        // Everything must belong to this room and pass the auth rules against its own
        // auth events, oldest first: a resident server cannot hand us a made-up room.
        let mut parsed: Vec<Pdu> = Vec::new();
        for (id, o, _) in &verified {
            let p = Pdu::parse(
                EventId::parse(id).map_err(|e| MxError::bad_json(e.to_string()))?,
                &serde_json::to_string(o)?,
            )
            .map_err(|e| MxError::bad_json(e.to_string()))?;
            if !in_room(&p, room_id) {
                return Err(fed_error(
                    "M_UNKNOWN",
                    "the resident server sent events of another room",
                ));
            }
            parsed.push(p);
        }
        parsed.sort_by_key(|p| p.depth);
        let mut known: HashMap<String, Pdu> = HashMap::new();
        self.db.read(|c| -> MxResult<()> {
            for p in &parsed {
                auth_by_auth_events(c, &rules, p, &known).map_err(|e| {
                    fed_error(
                        "M_UNKNOWN",
                        format!("room state does not pass the auth rules: {e}"),
                    )
                })?;
                known.insert(p.event_id.to_string(), p.clone());
            }
            auth_by_auth_events(c, &rules, &join_pdu, &known).map_err(|e| {
                fed_error(
                    "M_UNKNOWN",
                    format!("our join does not pass the auth rules: {e}"),
                )
            })?;
            Ok(())
        })?;
        self.db.write(|w| -> MxResult<()> {
            w.tx.execute(
                "INSERT OR IGNORE INTO rooms(room_id, room_version, created_ts) VALUES(?1,?2,?3)",
                params![room_id.as_str(), version.as_str(), now_ms() as i64],
            )?;
            // Our own join is among the state we get back: it goes in the timeline below.
            for (id, o, is_state) in verified.iter().filter(|(id, _, _)| *id != event_id) {
                if pdu::get_event(w, id)?.is_some() {
                    if *is_state {
                        // Already known (e.g. as part of the auth chain): make it current state.
                        let json = serde_json::to_string(o)?;
                        let p = Pdu::parse(EventId::parse(id).map_err(|e| MxError::bad_json(e.to_string()))?, &json)
                            .map_err(|e| MxError::bad_json(e.to_string()))?;
                        if let Some(k) = &p.state_key {
                            let membership = serde_json::from_str::<Value>(p.content.get()).ok().and_then(|c| c["membership"].as_str().map(str::to_owned));
                            let stream = w.next_stream();
                            w.tx.execute(
                                "INSERT INTO room_state(room_id, type, state_key, event_id, stream, membership) VALUES(?1,?2,?3,?4,?5,?6)
                                 ON CONFLICT(room_id, type, state_key) DO UPDATE SET event_id=?4, stream=?5, membership=?6",
                                params![room_id.as_str(), p.kind.to_string(), k, id, stream, if p.kind.to_string() == "m.room.member" { membership } else { None }],
                            )?;
                            self.room_info.state_changed(room_id.as_str(), stream);
                            w.note(crate::db::UserRows::Room, room_id.as_str(), stream);
                            w.note(crate::db::UserRows::StateRewritten, room_id.as_str(), stream);
                            state::forget_current(w, room_id.as_str())?;
                        }
                    }
                    continue;
                }
                let json = serde_json::to_string(o)?;
                let p = Pdu::parse(EventId::parse(id).map_err(|e| MxError::bad_json(e.to_string()))?, &json)
                    .map_err(|e| MxError::bad_json(e.to_string()))?;
                let placement = if *is_state && p.state_key.is_some() { Placement::OutlierState } else { Placement::Outlier };
                self.store_pdu_as(w, room_id.as_str(), &p, &json, None, placement)?;
            }
            // The current extremities are those of the resident server when it made the template.
            for prev in &join_pdu.prev_events {
                w.tx.execute("INSERT OR IGNORE INTO forward_extremities(room_id, event_id) VALUES(?1,?2)", params![room_id.as_str(), prev.as_str()])?;
            }
            if pdu::get_event(w, &event_id)?.is_none() {
                let stream = self.store_pdu(w, room_id.as_str(), &join_pdu, &join_json, None)?;
                self.after_store(w, room_id, &join_pdu, &join_json, stream, &rules, None)?;
            }
            w.tx.execute("DELETE FROM remote_invites WHERE room_id=?1 AND user_id=?2", params![room_id.as_str(), user.as_str()])?;
            w.persist_stream()?;
            Ok(())
        })?;
        self.notify_room(room_id.as_str());
        self.notify_users([user.as_str()]);
        tracing::info!(room = %room_id, %server, "joined a room on another server");
        Ok(())
    }

    /// Timestamps, hashes and signs a membership template from another server.
    fn sign_template(
        &self,
        mut template: Value,
        rules: &ruma::room_version_rules::RoomVersionRules,
    ) -> MxResult<(String, CanonicalJsonObject)> {
        template["origin_server_ts"] = json!(now_ms());
        if let Some(o) = template.as_object_mut() {
            o.remove("hashes");
            o.remove("signatures");
            o.remove("event_id");
        }
        let mut obj = to_canonical(template)?;
        hash_and_sign_event(
            self.server_name.as_str(),
            &self.keypair,
            &mut obj,
            &rules.redaction,
        )
        .map_err(|e| MxError::bad_json(e.to_string()))?;
        let event_id = format!(
            "${}",
            reference_hash(&obj, rules).map_err(|e| MxError::bad_json(e.to_string()))?
        );
        Ok((event_id, obj))
    }

    /// A member event made with another server: `make_{kind}` gives the
    /// template (checked for this user, room and membership), `fill` sets our
    /// content, we sign it and `send_{kind}` (API `send_api`) takes it.
    async fn membership_handshake(
        &self,
        kind: &str,
        send_api: &str,
        room_id: &RoomId,
        user: &UserId,
        server: &ServerName,
        fill: impl FnOnce(&mut Value) -> MxResult<()>,
    ) -> MxResult<Handshake> {
        // make_leave takes no versions; knocking needs version 7 or later and
        // joins restricted rooms 8: this server takes part in 10-12.
        let versions = if kind == "leave" {
            ""
        } else {
            "?ver=10&ver=11&ver=12"
        };
        let path = format!(
            "/_matrix/federation/v1/make_{kind}/{}/{}{versions}",
            urlenc(room_id.as_str()),
            urlenc(user.as_str())
        );
        let made = self.fed_request("GET", server, &path, None).await?;
        let (version, rules, mut template) = check_template(&made, room_id, user, kind)?;
        fill(&mut template)?;
        let (event_id, obj) = self.sign_template(template, &rules)?;
        let body = serde_json::to_value(&obj)?;
        let path = format!(
            "/_matrix/federation/{send_api}/send_{kind}/{}/{}",
            urlenc(room_id.as_str()),
            urlenc(&event_id)
        );
        let answer = self.fed_request("PUT", server, &path, Some(&body)).await?;
        Ok(Handshake {
            version,
            rules,
            event_id,
            obj,
            body,
            answer,
        })
    }

    /// Leaves (declines an invite to) a room that lives on another server.
    pub(crate) async fn remote_leave(
        &self,
        room_id: &RoomId,
        user: &UserId,
        server: &ServerName,
    ) -> MxResult<Value> {
        let Handshake { event_id, body, .. } = self
            .membership_handshake("leave", "v2", room_id, user, server, |_| Ok(()))
            .await?;
        let mut ev = body;
        ev["event_id"] = json!(event_id);
        Ok(ev)
    }

    /// Knocks on a room that lives on other servers (make_knock, sign,
    /// send_knock through the first of `via` that answers). The knock is kept
    /// with the room's stripped state, so the user's clients show it until an
    /// invite (or a refusal) comes.
    pub(crate) async fn remote_knock(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
        via: &[OwnedServerName],
    ) -> MxResult<()> {
        let mut last_err = MxError::not_found("No server to knock through");
        for server in via.iter().filter(|s| **s != self.server_name) {
            match self.remote_knock_via(room_id, user, reason, server).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(%server, errcode = e.errcode, reason = %e.message, "knock through server failed");
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    async fn remote_knock_via(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
        server: &ServerName,
    ) -> MxResult<()> {
        let Handshake {
            version,
            event_id,
            body,
            answer,
            ..
        } = self
            .membership_handshake("knock", "v1", room_id, user, server, |template| {
                let mut content = self.db.read(|c| self.member_content(c, user, "knock"))?;
                if let Some(r) = reason {
                    content["reason"] = json!(r);
                }
                template["content"] = content;
                Ok(())
            })
            .await?;
        // Stripped state events only (type, state_key, sender, content), bounded.
        let stripped: Vec<Value> = answer["knock_room_state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"].is_string() && e["state_key"].is_string() && e["content"].is_object())
            .take(100)
            .map(|e| json!({ "type": e["type"], "state_key": e["state_key"], "sender": e["sender"], "content": e["content"] }))
            .collect();
        let mut ev = body;
        ev["event_id"] = json!(event_id);
        self.db.write(|w| -> rusqlite::Result<()> {
            let stream = w.next_stream();
            w.tx.execute(
                "INSERT INTO remote_invites(room_id, user_id, room_version, event_json, invite_state, stream, inviter_server, membership)
                 VALUES(?1,?2,?3,?4,?5,?6,?7,'knock')
                 ON CONFLICT(room_id, user_id) DO UPDATE SET room_version=?3, event_json=?4, invite_state=?5, stream=?6,
                     inviter_server=?7, declined=0, membership='knock'",
                params![room_id.as_str(), user.as_str(), version.as_str(), ev.to_string(), json!(stripped).to_string(), stream, server.as_str()],
            )?;
            w.note(crate::db::UserRows::RemoteInvites, user.as_str(), stream);
            w.persist_stream()
        })?;
        self.notify_users([user.as_str()]);
        tracing::info!(room = %room_id, %server, "knocked on a room on another server");
        Ok(())
    }

    /// Invites a user of another server: their server countersigns the invite first.
    pub(crate) async fn remote_invite(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> MxResult<String> {
        let mut content = json!({ "membership": "invite" });
        if let Some(r) = reason {
            content["reason"] = json!(r);
        }
        let ev = pdu::NewEvent {
            kind: "m.room.member",
            state_key: Some(target.as_str()),
            content,
            txn: None,
        };
        let built = self.db.read(|c| self.build_pdu(c, room_id, sender, &ev))?;
        let version = self
            .db
            .read(|c| pdu::room_version(c, room_id.as_str()))?
            .ok_or_else(|| MxError::not_found("Unknown room"))?;
        let stripped = self.db.read(|c| pdu::stripped_state(c, room_id.as_str()))?;
        let body = json!({
            "room_version": version.as_str(),
            "event": serde_json::from_str::<Value>(&built.json)?,
            "invite_room_state": stripped,
        });
        let event_id = built.pdu.event_id.to_string();
        let answer = self
            .fed_request(
                "PUT",
                target.server_name(),
                &format!(
                    "/_matrix/federation/v2/invite/{}/{}",
                    urlenc(room_id.as_str()),
                    urlenc(&event_id)
                ),
                Some(&body),
            )
            .await?;
        let (id, signed) = self.verify_pdu(&version, answer["event"].clone()).await?;
        if id != event_id {
            return Err(fed_error(
                "M_UNKNOWN",
                "the invited user's server changed the event",
            ));
        }
        let json = serde_json::to_string(&signed)?;
        let pdu = Pdu::parse(built.pdu.event_id.clone(), &json)
            .map_err(|e| MxError::bad_json(e.to_string()))?;
        // The invited user's server already has the invite.
        let target_server = target.server_name().to_string();
        self.db.write(|w| {
            self.commit_built(
                w,
                room_id,
                pdu::Built {
                    pdu,
                    json,
                    rules: built.rules,
                    cited_groups: built.cited_groups,
                },
                None,
                None,
                Some(&target_server),
            )
        })?;
        self.notify_room(room_id.as_str());
        Ok(event_id)
    }
}

/// Authorises an event from another server: its auth events are the right ones,
/// and it is allowed by the room's current state.
fn auth_against_current_state(
    c: &Connection,
    rules: &ruma::room_version_rules::RoomVersionRules,
    room_id: &str,
    pdu: &Pdu,
) -> Result<(), String> {
    ruma::state_res::check_state_independent_auth_rules(
        &rules.authorization,
        pdu,
        |e: &EventId| pdu::load_pdu(c, e.as_str()),
    )?;
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |ty, key| {
        pdu::state_event_id(c, room_id, &ty.to_string(), key)
            .ok()
            .flatten()
            .and_then(|e| pdu::load_pdu(c, &e))
    })
}

/// Authorises an event against a given room state (the state before it).
fn auth_against_state(
    c: &Connection,
    rules: &ruma::room_version_rules::RoomVersionRules,
    pdu: &Pdu,
    state: &state::StateIds,
) -> Result<(), String> {
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |ty, key| {
        state
            .get(&(ty.to_string(), key.to_owned()))
            .and_then(|e| pdu::load_pdu(c, e))
    })
}

/// Authorises an event against its own auth events (the spec's first check on
/// receipt), looking them up among `known` and then in the database.
fn auth_by_auth_events(
    c: &Connection,
    rules: &ruma::room_version_rules::RoomVersionRules,
    pdu: &Pdu,
    known: &HashMap<String, Pdu>,
) -> Result<(), String> {
    let fetch = |id: &str| known.get(id).cloned().or_else(|| pdu::load_pdu(c, id));
    ruma::state_res::check_state_independent_auth_rules(
        &rules.authorization,
        pdu,
        |id: &EventId| fetch(id.as_str()),
    )?;
    let auth: Vec<Pdu> = pdu
        .auth_events
        .iter()
        .filter_map(|id| fetch(id.as_str()))
        .collect();
    // v12 rooms leave the create event out of auth_events: it is the room id.
    let create = pdu
        .room_id
        .as_ref()
        .and_then(|r| fetch(&format!("${}", &r.as_str()[1..])))
        .filter(|_| rules.authorization.room_create_event_id_as_room_id);
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |ty, key| {
        if *ty == ruma::events::StateEventType::RoomCreate {
            if let Some(c) = &create {
                return Some(c.clone());
            }
        }
        auth.iter()
            .find(|a| a.kind.to_string() == ty.to_string() && a.state_key.as_deref() == Some(key))
            .cloned()
    })
}

/// Whether an event belongs to `room` (v12 create events carry no room id: their
/// id is the room's).
fn in_room(p: &Pdu, room: &RoomId) -> bool {
    match &p.room_id {
        Some(r) => r == room,
        None => format!("!{}", &p.event_id.as_str()[1..]) == room.as_str(),
    }
}

/// A room version this server can take part in, or `M_INCOMPATIBLE_ROOM_VERSION`.
fn supported_version(v: &Value) -> MxResult<RoomVersionId> {
    v.as_str()
        .and_then(|v| RoomVersionId::try_from(v).ok())
        .filter(|v| v.rules().is_some())
        .ok_or_else(|| {
            MxError::new(
                StatusCode::BAD_REQUEST,
                "M_INCOMPATIBLE_ROOM_VERSION",
                "Unsupported room version",
            )
        })
}

/// What [`Hs::membership_handshake`] made and was answered.
struct Handshake {
    version: RoomVersionId,
    rules: ruma::room_version_rules::RoomVersionRules,
    event_id: String,
    obj: CanonicalJsonObject,
    body: Value,
    answer: Value,
}

/// Checks a make_join/make_leave/make_knock answer: a supported room version
/// and a member event template of that membership for `user`.
fn check_template(
    made: &Value,
    room_id: &RoomId,
    user: &UserId,
    what: &str,
) -> MxResult<(
    RoomVersionId,
    ruma::room_version_rules::RoomVersionRules,
    Value,
)> {
    let version = supported_version(&made["room_version"])?;
    let rules = pdu::rules_for(&version)?;
    let template = made["event"].clone();
    if template["type"] != "m.room.member"
        || template["state_key"] != user.as_str()
        || template["sender"] != user.as_str()
    {
        return Err(fed_error(
            "M_UNKNOWN",
            format!("the {what} template is not for this user"),
        ));
    }
    if template["room_id"] != room_id.as_str() {
        return Err(fed_error(
            "M_UNKNOWN",
            format!("the {what} template is for another room"),
        ));
    }
    if template["content"]["membership"] != what {
        return Err(fed_error(
            "M_UNKNOWN",
            format!("the {what} template is not a {what}"),
        ));
    }
    Ok((version, rules, template))
}

pub(crate) fn urlenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Federation status per destination, for the admin CLI.
#[derive(Debug, serde::Serialize)]
pub struct PeerStatus {
    pub server_name: String,
    pub queued: i64,
    pub failures: i64,
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
}

impl Hs {
    pub fn federation_status(&self) -> MxResult<Vec<PeerStatus>> {
        Ok(self.db.read(|c| {
            let mut st = c.prepare(
                "SELECT d.server_name, (SELECT COUNT(*) FROM fed_queue q WHERE q.destination=d.server_name), d.failures, d.last_success, d.last_error
                 FROM fed_destinations d ORDER BY d.server_name",
            )?;
            let r = st
                .query_map([], |r| {
                    Ok(PeerStatus { server_name: r.get(0)?, queued: r.get(1)?, failures: r.get(2)?, last_success: r.get(3)?, last_error: r.get(4)? })
                })?
                .collect::<Result<Vec<_>, _>>();
            r
        })?)
    }
}

// ---- TLS listener ----

/// Loads the configured certificate, or makes (once) a self-signed one for the
/// server name, its key stored like the signing key (under the data key when
/// the box encrypts; one from before encryption is replaced).
fn tls_config(hs: &Hs) -> anyhow::Result<rustls::ServerConfig> {
    use anyhow::Context;
    let fed = &hs.config.federation;
    let (cert_pem, key_pem, key_path) = match (&fed.tls_cert, &fed.tls_key) {
        (Some(c), Some(k)) => (
            std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
            k.clone(),
        ),
        _ => {
            let c = hs.data_dir.join("federation-tls.crt");
            let k = hs.data_dir.join("federation-tls.key");
            let secrets = crate::Secrets(hs.vault.as_deref());
            let existing = match (std::fs::read(&c), secrets.read(&k)) {
                (Ok(cert), Ok(Some(key))) => Some((cert, key.into_bytes())),
                _ => None,
            };
            match existing {
                Some((cert, key)) => (cert, key, k),
                None => {
                    let host = hs
                        .server_name
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let cert = rcgen::generate_simple_self_signed(vec![host])
                        .context("making a self-signed certificate")?;
                    let key = cert.signing_key.serialize_pem();
                    secrets.write(&k, &key)?;
                    std::fs::write(&c, cert.cert.pem())?;
                    (cert.cert.pem().into_bytes(), key.into_bytes(), k)
                }
            }
        }
    };
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the federation TLS certificate")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the API over TLS on the federation port until shutdown.
pub async fn serve_tls(
    hs: Arc<Hs>,
    addr: std::net::SocketAddr,
    shutdown: secta_runtime::Shutdown,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&hs)?));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "federation TLS listening");
    let app = hs.router();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.clone().wait() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(
                app.layer(axum::Extension(axum::extract::ConnectInfo(peer))),
            );
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

/// Queues an EDU for one server.
pub fn enqueue_server_edu(hs: &Hs, server: &str, edu: Value) -> MxResult<()> {
    if !hs.config.federation.enabled || hs.is_blocked(server) || server == hs.server_name.as_str() {
        return Ok(());
    }
    hs.db.write(|w| -> rusqlite::Result<()> {
        w.tx.execute(
            "INSERT INTO fed_queue(destination, kind, json) VALUES(?1,'edu',?2)",
            params![server, edu.to_string()],
        )?;
        w.tx.execute(
            "INSERT OR IGNORE INTO fed_destinations(server_name) VALUES(?1)",
            [server],
        )?;
        Ok(())
    })?;
    hs.fed.wakeup.notify_one();
    Ok(())
}

// ---- End-to-end encryption across servers ----

#[derive(Deserialize)]
pub struct UserKeysQuery {
    device_keys: BTreeMap<String, Vec<String>>,
}

pub async fn user_keys_query(State(hs): State<Arc<Hs>>, req: FedRequest) -> MxResult<J> {
    let body: UserKeysQuery =
        serde_json::from_value(req.body).map_err(|e| MxError::bad_json(e.to_string()))?;
    let local: BTreeMap<String, Vec<String>> = body
        .device_keys
        .into_iter()
        .filter(|(u, _)| UserId::parse(u).is_ok_and(|u| u.server_name() == hs.server_name))
        .collect();
    let mut v = hs
        .db
        .read(|c| crate::keys::local_query(&hs, c, "", &local))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("user_signing_keys");
        o.remove("failures");
    }
    Ok(axum::Json(v))
}

#[derive(Deserialize)]
pub struct UserKeysClaim {
    one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

pub async fn user_keys_claim(State(hs): State<Arc<Hs>>, req: FedRequest) -> MxResult<J> {
    let body: UserKeysClaim =
        serde_json::from_value(req.body).map_err(|e| MxError::bad_json(e.to_string()))?;
    let local: BTreeMap<String, BTreeMap<String, String>> = body
        .one_time_keys
        .into_iter()
        .filter(|(u, _)| UserId::parse(u).is_ok_and(|u| u.server_name() == hs.server_name))
        .collect();
    let mut v = crate::keys::local_claim(&hs, &local)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("failures");
    }
    Ok(axum::Json(v))
}

pub async fn user_devices(
    State(hs): State<Arc<Hs>>,
    PathArgs(user): PathArgs<String>,
    _req: FedRequest,
) -> MxResult<J> {
    let u = UserId::parse(&user).map_err(|_| MxError::invalid_param("bad user id"))?;
    if u.server_name() != hs.server_name {
        return Err(MxError::invalid_param("not a user of this server"));
    }
    let q = BTreeMap::from([(user.clone(), Vec::new())]);
    let v = hs.db.read(|c| crate::keys::local_query(&hs, c, "", &q))?;
    let devices: Vec<Value> = v["device_keys"][&user]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(d, k)| json!({ "device_id": d, "keys": k, "device_display_name": k["unsigned"]["device_display_name"] }))
        .collect();
    let mut out =
        json!({ "user_id": user, "stream_id": hs.db.current_stream(), "devices": devices });
    if let Some(m) = v["master_keys"].get(&user) {
        out["master_key"] = m.clone();
    }
    if let Some(s) = v["self_signing_keys"].get(&user) {
        out["self_signing_key"] = s.clone();
    }
    Ok(axum::Json(out))
}

// ---- History from other servers ----

pub async fn backfill_endpoint(
    State(hs): State<Arc<Hs>>,
    PathArgs(room): PathArgs<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    req: FedRequest,
) -> MxResult<J> {
    let pairs = serde_urlencoded::from_str::<Vec<(String, String)>>(q.as_deref().unwrap_or(""))
        .unwrap_or_default();
    let from: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "v")
        .map(|(_, v)| v.clone())
        .collect();
    let limit: i64 = pairs
        .iter()
        .find(|(k, _)| k == "limit")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(50)
        .clamp(1, 100);
    let out = hs.db.read(|c| -> MxResult<Value> {
        require_in_room(c, &room, req.origin.as_str())?;
        if !acl_allows(c, &room, req.origin.as_str())? {
            return Err(MxError::forbidden(
                "Your server is denied by the room's server ACL",
            ));
        }
        // Newest starting point among the given events, then everything before it.
        let mut start: Option<i64> = None;
        for id in &from {
            if let Some(e) = pdu::get_event(c, id)?.filter(|e| e.room_id == room) {
                start = Some(start.map_or(e.stream, |s: i64| s.max(e.stream)));
            }
        }
        let start =
            start.ok_or_else(|| MxError::not_found("None of the given events is known here"))?;
        let mut st = c.prepare_cached(
            "SELECT json FROM events e WHERE room_id=?1 AND outlier=0 AND stream<=?2
             AND NOT EXISTS (SELECT 1 FROM rejected_events r WHERE r.event_id=e.event_id)
             ORDER BY stream DESC LIMIT ?3",
        )?;
        let pdus: Vec<Value> = st
            .query_map(params![room, start, limit], |r| r.get::<_, String>(0))?
            .filter_map(|j| j.ok().and_then(|j| serde_json::from_str(&j).ok()))
            .collect();
        Ok(json!({ "origin": hs.server_name, "origin_server_ts": now_ms(), "pdus": pdus }))
    })?;
    Ok(axum::Json(out))
}

impl Hs {
    /// Before taking in a PDU whose prev_events this box does not have, asks the
    /// sending server for the events in between (bounded) and takes those in first.
    async fn fill_gap(&self, origin: &ServerName, pdu: &Value) {
        let Some(room) = pdu["room_id"].as_str() else {
            return;
        };
        let prevs: Vec<String> = pdu["prev_events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        let Ok(Some(version)) = self.db.read(|c| pdu::room_version(c, room)) else {
            return;
        };
        let missing = self.db.read(|c| -> rusqlite::Result<bool> {
            for p in &prevs {
                if pdu::get_event(c, p)?.is_none() {
                    return Ok(true);
                }
            }
            Ok(false)
        });
        if !matches!(missing, Ok(true)) {
            return;
        }
        let Ok(rules) = pdu::rules_for(&version) else {
            return;
        };
        let Ok(obj) = to_canonical(pdu.clone()) else {
            return;
        };
        let Ok(hash) = reference_hash(&obj, &rules) else {
            return;
        };
        let earliest: Vec<String> = self
            .db
            .read(|c| -> rusqlite::Result<Vec<String>> {
                let mut st =
                    c.prepare_cached("SELECT event_id FROM forward_extremities WHERE room_id=?1")?;
                let r = st.query_map([room], |r| r.get(0))?.collect();
                r
            })
            .unwrap_or_default();
        let body = json!({ "earliest_events": earliest, "latest_events": [format!("${hash}")], "limit": 20 });
        let path = format!("/_matrix/federation/v1/get_missing_events/{}", urlenc(room));
        let Ok(v) = self.fed_request("POST", origin, &path, Some(&body)).await else {
            return;
        };
        let mut events: Vec<Value> = v["events"]
            .as_array()
            .into_iter()
            .flatten()
            .take(20)
            .cloned()
            .collect();
        events.sort_by_key(|e| e["depth"].as_u64().unwrap_or(0));
        for e in events {
            if let Err(err) = self.receive_pdu(origin, e).await {
                tracing::debug!(errcode = err.errcode, "missing event not accepted");
            }
        }
    }

    /// Events fetched from another server whose signatures and hashes check out
    /// and that belong to `room` (and to `only`, if given), oldest first.
    async fn verified_in_room(
        &self,
        version: &RoomVersionId,
        room: &RoomId,
        fetched: impl IntoIterator<Item = Value>,
        only: Option<&HashSet<String>>,
    ) -> MxResult<Vec<(Pdu, String)>> {
        let mut out: Vec<(Pdu, String)> = Vec::new();
        for e in fetched {
            let Ok((id, obj)) = self.verify_pdu(version, e).await else {
                continue;
            };
            if only.is_some_and(|o| !o.contains(&id)) {
                continue;
            }
            let json = serde_json::to_string(&obj)?;
            let Ok(p) = Pdu::parse(
                EventId::parse(&id).map_err(|e| MxError::bad_json(e.to_string()))?,
                &json,
            ) else {
                continue;
            };
            if in_room(&p, room) {
                out.push((p, json));
            }
        }
        out.sort_by_key(|(p, _)| p.depth);
        Ok(out)
    }

    /// Stores events (oldest first) as outliers, each checked against its own
    /// auth events; those that fail are kept as rejected.
    fn store_outliers(
        &self,
        w: &mut WriteTxn<'_>,
        room: &RoomId,
        rules: &ruma::room_version_rules::RoomVersionRules,
        events: &[(Pdu, String)],
    ) -> MxResult<()> {
        for (e, json) in events {
            if pdu::get_event(w, e.event_id.as_str())?.is_some() {
                continue;
            }
            let verdict = auth_by_auth_events(w, rules, e, &HashMap::new());
            self.store_pdu_as(w, room.as_str(), e, json, None, Placement::Outlier)?;
            if let Err(why) = verdict {
                state::mark_rejected(w, e.event_id.as_str(), &why)?;
            }
        }
        Ok(())
    }

    /// The state after `prev`, an event of the room that is not in the graph
    /// here: asked of `origin` (`/state_ids` at `prev`, which is the state
    /// before it), the events it names that are unknown here fetched (`/event`
    /// for a few, `/state` for many) and checked against their own auth events
    /// (stored as outliers; failures as rejected), then recorded as `prev`'s
    /// state groups so the question is asked once.
    async fn state_after_remote(
        &self,
        origin: &ServerName,
        room: &RoomId,
        version: &RoomVersionId,
        prev: &str,
    ) -> MxResult<()> {
        const MAX_STATE: usize = 100_000;
        let q = format!("{}?event_id={}", urlenc(room.as_str()), urlenc(prev));
        let v = self
            .fed_request(
                "GET",
                origin,
                &format!("/_matrix/federation/v1/state_ids/{q}"),
                None,
            )
            .await?;
        let ids_of = |k: &str| -> Vec<String> {
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .take(MAX_STATE)
                .collect()
        };
        let (state_ids, chain_ids) = (ids_of("pdu_ids"), ids_of("auth_chain_ids"));
        let mut wanted: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for id in chain_ids
            .iter()
            .chain(&state_ids)
            .chain(std::iter::once(&prev.to_owned()))
        {
            if seen.insert(id.clone()) && self.db.read(|c| pdu::get_event(c, id))?.is_none() {
                wanted.push(id.clone());
            }
        }
        let mut fetched: Vec<Value> = Vec::new();
        if wanted.len() > 50 {
            let all = self
                .fed_request(
                    "GET",
                    origin,
                    &format!("/_matrix/federation/v1/state/{q}"),
                    None,
                )
                .await?;
            fetched.extend(
                ["auth_chain", "pdus"]
                    .iter()
                    .flat_map(|k| all[*k].as_array().cloned().unwrap_or_default())
                    .take(2 * MAX_STATE),
            );
            if wanted.iter().any(|w| w == prev) {
                let one = self
                    .fed_request(
                        "GET",
                        origin,
                        &format!("/_matrix/federation/v1/event/{}", urlenc(prev)),
                        None,
                    )
                    .await?;
                fetched.extend(
                    one["pdus"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .take(1),
                );
            }
        } else {
            for id in &wanted {
                let one = self
                    .fed_request(
                        "GET",
                        origin,
                        &format!("/_matrix/federation/v1/event/{}", urlenc(id)),
                        None,
                    )
                    .await?;
                fetched.extend(
                    one["pdus"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .take(1),
                );
            }
        }
        let rules = pdu::rules_for(version)?;
        let wanted: HashSet<String> = wanted.into_iter().collect();
        let events = self
            .verified_in_room(version, room, fetched, Some(&wanted))
            .await?;
        self.db.write(|w| -> MxResult<()> {
            self.store_outliers(w, room, &rules, &events)?;
            let prev_pdu = pdu::load_pdu(w, prev)
                .ok_or_else(|| fed_error("M_UNKNOWN", format!("{origin} did not give {prev}")))?;
            let mut before = state::StateIds::new();
            for id in &state_ids {
                if state::is_rejected(w, id)? {
                    continue;
                }
                let Some(p) = pdu::load_pdu(w, id) else {
                    return Err(fed_error(
                        "M_UNKNOWN",
                        format!("{origin} did not give state event {id}"),
                    ));
                };
                if let Some(k) = &p.state_key {
                    before.insert((p.kind.to_string(), k.clone()), id.clone());
                }
            }
            let group = state::snapshot_group(w, room.as_str(), &before)?;
            // The state after it: with itself, if it is an accepted state event.
            let mut after_pdu = prev_pdu;
            if state::is_rejected(w, prev)? {
                after_pdu.state_key = None;
            }
            state::record_event(w, room.as_str(), &after_pdu, group)?;
            Ok(())
        })?;
        tracing::info!(room = %room, %origin, events = events.len(), "state at an unknown prev event fetched");
        Ok(())
    }

    /// Fetches the auth chain of an incoming event from its sender when some of
    /// its auth events are unknown here, and stores it (as outliers, each
    /// checked against its own auth events; failures are kept as rejected).
    async fn fetch_missing_auth(
        &self,
        origin: &ServerName,
        room: &RoomId,
        version: &RoomVersionId,
        p: &Pdu,
    ) -> MxResult<()> {
        let missing = |c: &Connection| -> rusqlite::Result<Vec<String>> {
            let mut out = Vec::new();
            for a in &p.auth_events {
                if pdu::get_event(c, a.as_str())?.is_none() {
                    out.push(a.to_string());
                }
            }
            Ok(out)
        };
        if self.db.read(missing)?.is_empty() {
            return Ok(());
        }
        let path = format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            urlenc(room.as_str()),
            urlenc(p.event_id.as_str())
        );
        let v = self.fed_request("GET", origin, &path, None).await?;
        let rules = pdu::rules_for(version)?;
        let fetched = v["auth_chain"]
            .as_array()
            .into_iter()
            .flatten()
            .take(10_000)
            .cloned();
        let chain = self.verified_in_room(version, room, fetched, None).await?;
        self.db
            .write(|w| self.store_outliers(w, room, &rules, &chain))?;
        let still = self.db.read(missing)?;
        if !still.is_empty() {
            return Err(MxError::forbidden(format!(
                "auth events unavailable: {}",
                still.join(", ")
            )));
        }
        Ok(())
    }

    /// Fetches older history of a room from another server in it, once we reach
    /// the beginning of what this box holds. Returns how many events were added.
    pub(crate) async fn backfill(&self, room_id: &RoomId, limit: i64) -> MxResult<usize> {
        let (earliest, servers, version) = self.db.read(|c| -> MxResult<_> {
            let earliest: Option<(String, String)> = c
                .prepare_cached("SELECT event_id, type FROM events WHERE room_id=?1 AND outlier=0 ORDER BY stream ASC LIMIT 1")?
                .query_row([room_id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let servers = joined_servers(c, room_id.as_str())?;
            Ok((earliest, servers, pdu::room_version(c, room_id.as_str())?))
        })?;
        let (Some((earliest, kind)), Some(version)) = (earliest, version) else {
            return Ok(0);
        };
        let rules = pdu::rules_for(&version)?;
        if kind == "m.room.create" {
            return Ok(0); // the whole history is here
        }
        for server in servers
            .iter()
            .filter(|s| s.as_str() != self.server_name.as_str())
        {
            let Ok(name) = ServerName::parse(server) else {
                continue;
            };
            let path = format!(
                "/_matrix/federation/v1/backfill/{}?v={}&limit={limit}",
                urlenc(room_id.as_str()),
                urlenc(&earliest)
            );
            let Ok(v) = self.fed_request("GET", &name, &path, None).await else {
                continue;
            };
            let mut fetched = Vec::new();
            for p in v["pdus"]
                .as_array()
                .into_iter()
                .flatten()
                .take(limit as usize + 1)
            {
                if let Ok((id, obj)) = self.verify_pdu(&version, p.clone()).await {
                    fetched.push((id, obj));
                }
            }
            // Newest first, so each gets a stream position before the one stored earlier.
            fetched.sort_by_key(|(_, o)| {
                std::cmp::Reverse(
                    o.get("depth")
                        .and_then(|d| d.as_integer())
                        .map(i64::from)
                        .unwrap_or(0),
                )
            });
            let added = self.db.write(|w| -> MxResult<usize> {
                let mut n = 0;
                for (id, obj) in &fetched {
                    if pdu::get_event(w, id)?.is_some() {
                        continue;
                    }
                    let json = serde_json::to_string(obj)?;
                    let p = Pdu::parse(
                        EventId::parse(id).map_err(|e| MxError::bad_json(e.to_string()))?,
                        &json,
                    )
                    .map_err(|e| MxError::bad_json(e.to_string()))?;
                    if p.room_id.as_deref() != Some(room_id) {
                        continue;
                    }
                    if let Err(e) = auth_by_auth_events(w, &rules, &p, &HashMap::new()) {
                        tracing::info!(reason = %e, "backfilled event rejected");
                        continue;
                    }
                    self.store_pdu_as(w, room_id.as_str(), &p, &json, None, Placement::Backfill)?;
                    n += 1;
                }
                Ok(n)
            })?;
            return Ok(added);
        }
        Ok(0)
    }
}

pub async fn state_endpoint(
    State(hs): State<Arc<Hs>>,
    PathArgs(room): PathArgs<String>,
    QueryArgs(q): QueryArgs<StateIdsQuery>,
    req: FedRequest,
) -> MxResult<J> {
    let out = hs.db.read(|c| -> MxResult<Value> {
        require_in_room(c, &room, req.origin.as_str())?;
        let (ids, chain) = state_and_chain(c, &room, q.event_id.as_deref())?;
        let pdus: Vec<Value> = ids
            .iter()
            .filter_map(|i| pdu_value(c, i).ok().flatten())
            .collect();
        let chain: Vec<Value> = chain
            .iter()
            .filter_map(|i| pdu_value(c, i).ok().flatten())
            .collect();
        Ok(json!({ "pdus": pdus, "auth_chain": chain }))
    })?;
    Ok(axum::Json(out))
}

pub async fn event_auth(
    State(hs): State<Arc<Hs>>,
    PathArgs((room, event_id)): PathArgs<(String, String)>,
    req: FedRequest,
) -> MxResult<J> {
    let out = hs.db.read(|c| -> MxResult<Value> {
        require_in_room(c, &room, req.origin.as_str())?;
        pdu::get_event(c, &event_id)?
            .filter(|e| e.room_id == room)
            .ok_or_else(|| MxError::not_found("Event not found"))?;
        let chain = auth_chain(c, &[event_id.clone()])?;
        let chain: Vec<Value> = chain
            .iter()
            .filter_map(|i| pdu_value(c, i).ok().flatten())
            .collect();
        Ok(json!({ "auth_chain": chain }))
    })?;
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct MissingEventsBody {
    #[serde(default)]
    earliest_events: Vec<String>,
    latest_events: Vec<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    min_depth: Option<i64>,
}

/// `POST /get_missing_events`: walks back from `latest_events` along prev_events,
/// stopping at `earliest_events`, `min_depth` and `limit`.
pub async fn get_missing_events(
    State(hs): State<Arc<Hs>>,
    PathArgs(room): PathArgs<String>,
    req: FedRequest,
) -> MxResult<J> {
    let body: MissingEventsBody =
        serde_json::from_value(req.body.clone()).map_err(|e| MxError::bad_json(e.to_string()))?;
    let limit = body.limit.unwrap_or(10).clamp(1, 100);
    let min_depth = body.min_depth.unwrap_or(0);
    let out = hs.db.read(|c| -> MxResult<Value> {
        require_in_room(c, &room, req.origin.as_str())?;
        let stop: HashSet<&str> = body.earliest_events.iter().map(String::as_str).collect();
        let mut seen: HashSet<String> = body.latest_events.iter().cloned().collect();
        let mut queue: Vec<String> = Vec::new();
        for l in &body.latest_events {
            if let Some(p) = pdu::load_pdu(c, l) {
                queue.extend(p.prev_events.iter().map(|e| e.to_string()));
            }
        }
        let mut found: Vec<(i64, Value)> = Vec::new();
        while let Some(id) = queue.pop() {
            if found.len() >= limit || !seen.insert(id.clone()) || stop.contains(id.as_str()) {
                continue;
            }
            let Some(ev) = pdu::get_event(c, &id)?.filter(|e| e.room_id == room) else {
                continue;
            };
            let p = pdu::load_pdu(c, &id);
            let depth = p.as_ref().map_or(0, |p| p.depth as i64);
            if depth < min_depth {
                continue;
            }
            // Rejected events are never handed to other servers; the walk goes on past them.
            if !state::is_rejected(c, &id)? {
                found.push((depth, serde_json::from_str(&ev.json)?));
            }
            if let Some(p) = p {
                queue.extend(p.prev_events.iter().map(|e| e.to_string()));
            }
        }
        found.sort_by_key(|(d, _)| *d);
        Ok(json!({ "events": found.into_iter().map(|(_, v)| v).collect::<Vec<_>>() }))
    })?;
    Ok(axum::Json(out))
}
