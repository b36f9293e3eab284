//! Accounts: registration (with invite tokens), login, devices, passwords, profiles.

use std::{sync::Arc, time::Instant};

use axum::{extract::State, http::StatusCode};
use ruma::{OwnedUserId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    db::WriteTxn,
    error::{MxError, MxResult},
    extract::{token_hash, Auth, ClientAddr, Json, PathArgs, QueryArgs},
    now_ms,
    pdu::NewEvent,
    random_string, Hs,
};

type J = axum::Json<Value>;

/// A user-interactive-auth session.
pub struct UiaSession {
    pub created: Instant,
}

const UIA_TTL_SECS: u64 = 15 * 60;

/// Valid localpart characters for new users (the spec's historical-free grammar).
pub fn valid_localpart(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 200
        && l.bytes().all(
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'),
        )
}

/// Argon2id with OWASP's lower-memory setting of equal strength (7 MiB, 5 passes)
/// instead of the crate default (19 MiB, 2 passes): boxes have little RAM.
fn argon2() -> argon2::Argon2<'static> {
    use argon2::{Algorithm, Argon2, Params, Version};
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(7 * 1024, 5, 1, None).expect("valid argon2 params"),
    )
}

pub fn hash_password(password: &str) -> MxResult<String> {
    use argon2::{password_hash::SaltString, PasswordHasher};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| MxError::unknown(format!("password hashing failed: {e}")))
}

/// Checks a password against a stored PHC hash (its own parameters are used).
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
}

/// At most two password hashes are computed at once, so a burst of logins or
/// registrations cannot take the box's memory (each needs 7 MiB) or both cores.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

pub async fn hash_password_async(password: String) -> MxResult<String> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|e| MxError::unknown(e.to_string()))?;
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| MxError::unknown(e.to_string()))?
}

pub async fn verify_password_async(hash: String, password: String) -> bool {
    let Ok(_permit) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .unwrap_or(false)
}

/// Creates a user row. Fails with `M_USER_IN_USE` when taken.
pub fn insert_user(
    conn: &Connection,
    user_id: &UserId,
    password_hash: Option<&str>,
    admin: bool,
    displayname: Option<&str>,
) -> MxResult<()> {
    let exists: bool = conn
        .query_row(
            "SELECT 1 FROM users WHERE user_id=?1",
            [user_id.as_str()],
            |_| Ok(true),
        )
        .optional()?
        .is_some();
    if exists {
        return Err(MxError::user_in_use("User ID already taken"));
    }
    conn.execute(
        "INSERT INTO users(user_id, localpart, password_hash, displayname, is_admin, created_ts) VALUES(?1,?2,?3,?4,?5,?6)",
        params![
            user_id.as_str(),
            user_id.localpart(),
            password_hash,
            displayname.unwrap_or(user_id.localpart()),
            admin,
            now_ms() as i64
        ],
    )?;
    Ok(())
}

/// Creates (or reuses) a device and issues a fresh access token for it.
pub fn new_session(
    conn: &Connection,
    user_id: &str,
    device_id: Option<&str>,
    display_name: Option<&str>,
) -> MxResult<(String, String)> {
    let device_id = device_id
        .map(str::to_owned)
        .unwrap_or_else(|| random_string(10).to_uppercase());
    conn.execute(
        "INSERT INTO devices(user_id, device_id, display_name, last_seen_ts) VALUES(?1,?2,?3,?4)
         ON CONFLICT(user_id, device_id) DO UPDATE SET last_seen_ts=?4, display_name=COALESCE(?3, display_name)",
        params![user_id, device_id, display_name, now_ms() as i64],
    )?;
    conn.execute(
        "DELETE FROM access_tokens WHERE user_id=?1 AND device_id=?2",
        params![user_id, device_id],
    )?;
    let token = format!("syt_{}", random_string(40));
    conn.execute(
        "INSERT INTO access_tokens(token_hash, user_id, device_id) VALUES(?1,?2,?3)",
        params![token_hash(&token), user_id, device_id],
    )?;
    Ok((device_id, token))
}

/// Removes a device with its tokens, keys and pending to-device messages.
pub fn delete_device_rows(
    w: &mut WriteTxn<'_>,
    user_id: &str,
    device_id: &str,
) -> rusqlite::Result<()> {
    w.tx.execute(
        "DELETE FROM access_tokens WHERE user_id=?1 AND device_id=?2",
        params![user_id, device_id],
    )?;
    w.tx.execute(
        "DELETE FROM devices WHERE user_id=?1 AND device_id=?2",
        params![user_id, device_id],
    )?;
    crate::keys::delete_device_keys(w, user_id, device_id)?;
    w.persist_stream()
}

/// Removes every device of a user except `keep`.
pub fn delete_other_devices(
    w: &mut WriteTxn<'_>,
    user_id: &str,
    keep: Option<&str>,
) -> rusqlite::Result<()> {
    let devices: Vec<String> = {
        let mut st = w.prepare("SELECT device_id FROM devices WHERE user_id=?1")?;
        let r = st
            .query_map([user_id], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        r
    };
    for d in devices.iter().filter(|d| Some(d.as_str()) != keep) {
        delete_device_rows(w, user_id, d)?;
    }
    w.tx.execute(
        "DELETE FROM access_tokens WHERE user_id=?1 AND device_id IS NOT ?2",
        params![user_id, keep],
    )?;
    Ok(())
}

impl Hs {
    fn new_uia_session(&self) -> String {
        let id = random_string(24);
        let mut map = self.uia.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.created.elapsed().as_secs() < UIA_TTL_SECS);
        map.insert(
            id.clone(),
            UiaSession {
                created: Instant::now(),
            },
        );
        id
    }

    fn registration_flows(&self) -> Value {
        let mut flows = vec![json!({"stages": ["m.login.registration_token"]})];
        if self.open_registration() {
            flows.push(json!({"stages": ["m.login.dummy"]}));
        }
        json!(flows)
    }

    fn uia_challenge(
        &self,
        session: &str,
        flows: Value,
        completed: &[String],
        err: Option<MxError>,
    ) -> MxError {
        let mut e = err.unwrap_or_else(|| {
            MxError::new(
                StatusCode::UNAUTHORIZED,
                "M_FORBIDDEN",
                "Authentication required",
            )
        });
        let show_err = e.errcode != "M_FORBIDDEN" || e.message != "Authentication required";
        e.status = StatusCode::UNAUTHORIZED;
        let mut extra = serde_json::Map::new();
        extra.insert("flows".into(), flows);
        extra.insert("params".into(), json!({}));
        extra.insert("session".into(), json!(session));
        extra.insert("completed".into(), json!(completed));
        e.extra = Some(extra);
        if !show_err {
            // A bare challenge carries no errcode in the spec; keep one anyway for old clients.
            e.message = "User-interactive authentication required".into();
        }
        e
    }

    /// Password UIA for sensitive actions by `user`.
    pub(crate) async fn require_password(&self, user: &Auth, auth: Option<&Value>) -> MxResult<()> {
        let flows = json!([{"stages": ["m.login.password"]}]);
        let Some(auth) = auth else {
            let s = self.new_uia_session();
            return Err(self.uia_challenge(&s, flows, &[], None));
        };
        let session = auth["session"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| self.new_uia_session());
        if auth["type"].as_str() != Some("m.login.password") {
            return Err(self.uia_challenge(
                &session,
                flows,
                &[],
                Some(MxError::forbidden("Unsupported auth type")),
            ));
        }
        let who = auth["identifier"]["user"]
            .as_str()
            .or(auth["user"].as_str())
            .unwrap_or(user.user_id.as_str());
        let who = self.resolve_user(who);
        let password = auth["password"].as_str().unwrap_or_default().to_owned();
        let hash: Option<String> = self.db.read(|c| {
            c.query_row(
                "SELECT password_hash FROM users WHERE user_id=?1",
                [user.user_id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
        })?;
        let ok = who.as_deref() == Some(user.user_id.as_str())
            && match hash {
                Some(h) => verify_password_async(h, password).await,
                None => false,
            };
        if !ok {
            return Err(self.uia_challenge(
                &session,
                flows,
                &[],
                Some(MxError::forbidden("Invalid password")),
            ));
        }
        Ok(())
    }

    /// Full user id from a localpart or a user id of this server.
    fn resolve_user(&self, who: &str) -> Option<String> {
        if who.starts_with('@') {
            UserId::parse(who).ok().map(|u| u.to_string())
        } else {
            UserId::parse_with_server_name(who.to_lowercase(), &self.server_name)
                .ok()
                .map(|u| u.to_string())
        }
    }

    /// Updates the member events of every room the user is in (after a profile change).
    fn refresh_member_events(&self, user_id: &UserId) -> MxResult<()> {
        let rooms: Vec<String> = self.db.read(|c| {
            let mut st = c.prepare(
                "SELECT room_id FROM room_state WHERE type='m.room.member' AND state_key=?1 AND membership='join'",
            )?;
            let r = st.query_map([user_id.as_str()], |r| r.get(0))?.collect::<Result<Vec<String>, _>>();
            r
        })?;
        for room in rooms {
            let room_id =
                ruma::RoomId::parse(&room).map_err(|e| MxError::unknown(e.to_string()))?;
            let content = self.db.read(|c| self.member_content(c, user_id, "join"))?;
            self.db.write(|w| {
                self.append_event(
                    w,
                    &room_id,
                    user_id,
                    NewEvent {
                        kind: "m.room.member",
                        state_key: Some(user_id.as_str()),
                        content,
                        txn: None,
                    },
                )
            })?;
            self.notify_room(&room);
        }
        Ok(())
    }

    /// `m.room.member` content with the user's profile.
    pub(crate) fn member_content(
        &self,
        conn: &Connection,
        user_id: &UserId,
        membership: &str,
    ) -> rusqlite::Result<Value> {
        let (name, avatar): (Option<String>, Option<String>) = conn
            .query_row(
                "SELECT displayname, avatar_url FROM users WHERE user_id=?1",
                [user_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((None, None));
        let mut c = json!({ "membership": membership });
        if let Some(n) = name {
            c["displayname"] = json!(n);
        }
        if let Some(a) = avatar {
            c["avatar_url"] = json!(a);
        }
        Ok(c)
    }
}

#[derive(Deserialize, Default)]
pub struct RegisterQuery {
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct RegisterBody {
    auth: Option<Value>,
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
}

/// Uses one registration of a token, inside the write transaction (checked
/// again there, so a token's uses are never exceeded).
pub(crate) fn consume_token(tx: &Connection, token: &str) -> MxResult<()> {
    if !token_usable(tx, token)? {
        return Err(MxError::forbidden("Invalid registration token"));
    }
    tx.execute(
        "UPDATE registration_tokens SET completed=completed+1 WHERE token=?1",
        [token],
    )?;
    Ok(())
}

/// Checks a registration token for use now.
fn token_usable(conn: &Connection, token: &str) -> rusqlite::Result<bool> {
    let row: Option<(Option<i64>, i64, Option<i64>, bool)> = conn
        .query_row(
            "SELECT uses_allowed, completed, expiry_ts, revoked FROM registration_tokens WHERE token=?1",
            [token],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match row {
        None => false,
        Some((uses, completed, expiry, revoked)) => {
            !revoked
                && uses.is_none_or(|u| completed < u)
                && expiry.is_none_or(|e| (now_ms() as i64) < e)
        }
    })
}

pub async fn register(
    State(hs): State<Arc<Hs>>,
    ClientAddr(addr): ClientAddr,
    QueryArgs(q): QueryArgs<RegisterQuery>,
    Json(body): Json<RegisterBody>,
) -> MxResult<J> {
    if q.kind.as_deref() == Some("guest") {
        return Err(MxError::guest_forbidden(
            "Guest access is disabled on this box",
        ));
    }
    if let Some(k) = q.kind.as_deref() {
        if k != "user" {
            return Err(MxError::invalid_param("kind must be user or guest"));
        }
    }
    hs.check_rate(&format!("register:{addr}"))?;
    let localpart = match &body.username {
        Some(u) => {
            let l = u.to_lowercase();
            if !valid_localpart(&l) {
                return Err(MxError::invalid_username(
                    "Username may contain only a-z, 0-9, and . _ = - / +",
                ));
            }
            l
        }
        None => random_string(12).to_lowercase(),
    };
    let user_id = UserId::parse_with_server_name(localpart.as_str(), &hs.server_name)
        .map_err(|_| MxError::invalid_username("Invalid username"))?;
    let taken: bool = hs.db.read(|c| {
        c.query_row(
            "SELECT 1 FROM users WHERE localpart=?1",
            [&localpart],
            |_| Ok(true),
        )
        .optional()
        .map(|o| o.is_some())
    })?;
    if taken {
        return Err(MxError::user_in_use("User ID already taken"));
    }
    // Checked before any auth step, so a client hears of it at once.
    if hs.config.password_policy {
        if let Some((_, why)) = body
            .password
            .as_deref()
            .filter(|p| !p.is_empty())
            .and_then(|p| password_problem(&localpart, p))
        {
            return Err(MxError::new(
                StatusCode::BAD_REQUEST,
                "M_WEAK_PASSWORD",
                why,
            ));
        }
    }
    let flows = hs.registration_flows();
    let Some(auth) = &body.auth else {
        let s = hs.new_uia_session();
        return Err(hs.uia_challenge(&s, flows, &[], None));
    };
    let session = auth["session"].as_str().unwrap_or_default().to_owned();
    let known = hs
        .uia
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&session);
    if !known {
        let s = hs.new_uia_session();
        return Err(hs.uia_challenge(
            &s,
            flows,
            &[],
            Some(MxError::forbidden("Unknown or expired auth session")),
        ));
    }
    let mut used_token: Option<String> = None;
    match auth["type"].as_str() {
        Some("m.login.registration_token") => {
            let token = auth["token"].as_str().unwrap_or_default().to_owned();
            if !hs.db.read(|c| token_usable(c, &token))? {
                return Err(hs.uia_challenge(
                    &session,
                    flows,
                    &[],
                    Some(MxError::forbidden("Invalid registration token")),
                ));
            }
            used_token = Some(token);
        }
        Some("m.login.dummy") if hs.open_registration() => {}
        _ => {
            return Err(hs.uia_challenge(
                &session,
                flows,
                &[],
                Some(MxError::forbidden("Unsupported auth type")),
            ));
        }
    }
    let password = body
        .password
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| MxError::missing_param("password is required"))?;
    if password.len() > 512 {
        return Err(MxError::invalid_param("password too long"));
    }
    let hash = hash_password_async(password).await?;
    let (device, token) = hs.db.write(|w| -> MxResult<_> {
        if let Some(t) = &used_token {
            consume_token(w.tx, t)?;
        }
        insert_user(w, &user_id, Some(&hash), false, None)?;
        if body.inhibit_login {
            Ok((None, None))
        } else {
            let (d, t) = new_session(
                w,
                user_id.as_str(),
                body.device_id.as_deref(),
                body.initial_device_display_name.as_deref(),
            )?;
            Ok((Some(d), Some(t)))
        }
    })?;
    hs.uia
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&session);
    tracing::info!(user = %user_id, "registered new user");
    let mut out = json!({ "user_id": user_id, "home_server": hs.server_name });
    if let (Some(d), Some(t)) = (device, token) {
        out["device_id"] = json!(d);
        out["access_token"] = json!(t);
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: String,
}

pub async fn username_available(
    State(hs): State<Arc<Hs>>,
    ClientAddr(addr): ClientAddr,
    QueryArgs(q): QueryArgs<AvailableQuery>,
) -> MxResult<J> {
    hs.check_rate(&format!("available:{addr}"))?;
    let l = q.username.to_lowercase();
    if !valid_localpart(&l) {
        return Err(MxError::invalid_username("Invalid username"));
    }
    let taken: bool = hs.db.read(|c| {
        c.query_row("SELECT 1 FROM users WHERE localpart=?1", [&l], |_| Ok(true))
            .optional()
            .map(|o| o.is_some())
    })?;
    if taken {
        return Err(MxError::user_in_use("User ID already taken"));
    }
    Ok(axum::Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: String,
}

pub async fn registration_token_validity(
    State(hs): State<Arc<Hs>>,
    ClientAddr(addr): ClientAddr,
    QueryArgs(q): QueryArgs<TokenQuery>,
) -> MxResult<J> {
    hs.check_rate(&format!("token:{addr}"))?;
    let valid = hs.db.read(|c| token_usable(c, &q.token))?;
    Ok(axum::Json(json!({ "valid": valid })))
}

pub async fn login_flows() -> J {
    axum::Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

pub async fn login(
    State(hs): State<Arc<Hs>>,
    ClientAddr(addr): ClientAddr,
    Json(body): Json<LoginBody>,
) -> MxResult<J> {
    hs.check_rate(&format!("login:{addr}"))?;
    if body.kind != "m.login.password" {
        return Err(MxError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Unsupported login type",
        ));
    }
    let who = match &body.identifier {
        Some(id) if id["type"] == "m.id.user" => id["user"].as_str().map(str::to_owned),
        Some(_) => {
            return Err(MxError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "Unsupported identifier type",
            ))
        }
        None => body.user.clone(),
    }
    .ok_or_else(|| MxError::missing_param("identifier.user is required"))?;
    let password = body
        .password
        .clone()
        .ok_or_else(|| MxError::missing_param("password is required"))?;
    let forbidden = || MxError::forbidden("Invalid username or password");
    let user_id = hs.resolve_user(&who).ok_or_else(forbidden)?;
    let row: Option<(Option<String>, bool)> = hs.db.read(|c| {
        c.query_row(
            "SELECT password_hash, deactivated FROM users WHERE user_id=?1",
            [&user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    })?;
    let Some((Some(hash), deactivated)) = row else {
        return Err(forbidden());
    };
    let ok = verify_password_async(hash, password).await;
    if !ok {
        return Err(forbidden());
    }
    if deactivated {
        return Err(MxError::user_deactivated(
            "This account has been deactivated",
        ));
    }
    let (device_id, token) = hs.db.write(|w| {
        new_session(
            w,
            &user_id,
            body.device_id.as_deref(),
            body.initial_device_display_name.as_deref(),
        )
    })?;
    tracing::info!(user = %user_id, device = %device_id, "login");
    Ok(axum::Json(json!({
        "user_id": user_id,
        "access_token": token,
        "device_id": device_id,
        "home_server": hs.server_name,
        "well_known": { "m.homeserver": { "base_url": hs.config.base_url() } },
    })))
}

pub async fn logout(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    hs.db
        .write(|w| delete_device_rows(w, auth.user_id.as_str(), auth.device_id.as_str()))?;
    hs.notify_device_change(auth.user_id.as_str());
    Ok(axum::Json(json!({})))
}

pub async fn logout_all(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    hs.db
        .write(|w| delete_other_devices(w, auth.user_id.as_str(), None))?;
    hs.notify_device_change(auth.user_id.as_str());
    Ok(axum::Json(json!({})))
}

pub async fn whoami(auth: Auth) -> J {
    axum::Json(json!({ "user_id": auth.user_id, "device_id": auth.device_id, "is_guest": false }))
}

#[derive(Deserialize)]
pub struct PasswordBody {
    new_password: String,
    logout_devices: Option<bool>,
    auth: Option<Value>,
}

pub async fn change_password(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<PasswordBody>,
) -> MxResult<J> {
    hs.require_password(&auth, body.auth.as_ref()).await?;
    if body.new_password.is_empty() || body.new_password.len() > 512 {
        return Err(MxError::new(
            StatusCode::BAD_REQUEST,
            "M_WEAK_PASSWORD",
            "Password must be 1 to 512 characters",
        ));
    }
    if hs.config.password_policy {
        if let Some((_, why)) = password_problem(auth.user_id.localpart(), &body.new_password) {
            return Err(MxError::new(
                StatusCode::BAD_REQUEST,
                "M_WEAK_PASSWORD",
                why,
            ));
        }
    }
    let hash = hash_password_async(body.new_password).await?;
    hs.db.write(|w| {
        w.tx.execute(
            "UPDATE users SET password_hash=?1 WHERE user_id=?2",
            params![hash, auth.user_id.as_str()],
        )?;
        if body.logout_devices.unwrap_or(true) {
            delete_other_devices(w, auth.user_id.as_str(), Some(auth.device_id.as_str()))?;
        }
        Ok::<_, rusqlite::Error>(())
    })?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct AuthOnlyBody {
    auth: Option<Value>,
}

pub async fn deactivate(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<AuthOnlyBody>,
) -> MxResult<J> {
    hs.require_password(&auth, body.auth.as_ref()).await?;
    crate::admin::deactivate_user(&hs, &auth.user_id)?;
    Ok(axum::Json(
        json!({ "id_server_unbind_result": "no-support" }),
    ))
}

pub async fn capabilities(State(hs): State<Arc<Hs>>, _auth: Auth) -> J {
    axum::Json(json!({
        "capabilities": {
            "m.change_password": { "enabled": true },
            "m.room_versions": {
                "default": hs.config.default_room_version,
                "available": { "10": "stable", "11": "stable", "12": "stable" },
            },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
            "m.profile_fields": { "enabled": true, "allowed": ["displayname", "avatar_url"] },
        }
    }))
}

fn device_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<Value> {
    Ok(json!({
        "device_id": r.get::<_, String>(0)?,
        "display_name": r.get::<_, Option<String>>(1)?,
        "last_seen_ts": r.get::<_, Option<i64>>(2)?,
        "last_seen_ip": r.get::<_, Option<String>>(3)?,
    }))
}

pub async fn list_devices(State(hs): State<Arc<Hs>>, auth: Auth) -> MxResult<J> {
    let devices = hs.db.read(|c| {
        let mut st = c.prepare("SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id=?1")?;
        let r = st.query_map([auth.user_id.as_str()], device_json)?.collect::<Result<Vec<_>, _>>();
        r
    })?;
    Ok(axum::Json(json!({ "devices": devices })))
}

pub async fn get_device(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(device_id): PathArgs<String>,
) -> MxResult<J> {
    hs.db
        .read(|c| {
            c.query_row(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id=?1 AND device_id=?2",
                params![auth.user_id.as_str(), device_id],
                device_json,
            )
            .optional()
        })?
        .map(axum::Json)
        .ok_or_else(|| MxError::not_found("Unknown device"))
}

#[derive(Deserialize)]
pub struct DeviceUpdate {
    display_name: Option<String>,
}

pub async fn update_device(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(device_id): PathArgs<String>,
    Json(body): Json<DeviceUpdate>,
) -> MxResult<J> {
    let n = hs.db.write(|w| {
        w.tx.execute(
            "UPDATE devices SET display_name=?1 WHERE user_id=?2 AND device_id=?3",
            params![body.display_name, auth.user_id.as_str(), device_id],
        )
    })?;
    if n == 0 {
        return Err(MxError::not_found("Unknown device"));
    }
    Ok(axum::Json(json!({})))
}

pub async fn delete_device(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs(device_id): PathArgs<String>,
    Json(body): Json<AuthOnlyBody>,
) -> MxResult<J> {
    let exists = hs.db.read(|c| {
        c.query_row(
            "SELECT 1 FROM devices WHERE user_id=?1 AND device_id=?2",
            params![auth.user_id.as_str(), device_id],
            |_| Ok(()),
        )
        .optional()
    })?;
    if exists.is_none() {
        return Err(MxError::not_found("Unknown device"));
    }
    hs.require_password(&auth, body.auth.as_ref()).await?;
    hs.db
        .write(|w| delete_device_rows(w, auth.user_id.as_str(), &device_id))?;
    hs.notify_device_change(auth.user_id.as_str());
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteDevices {
    devices: Vec<String>,
    auth: Option<Value>,
}

pub async fn delete_devices(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    Json(body): Json<DeleteDevices>,
) -> MxResult<J> {
    hs.require_password(&auth, body.auth.as_ref()).await?;
    hs.db.write(|w| {
        for d in &body.devices {
            delete_device_rows(w, auth.user_id.as_str(), d)?;
        }
        Ok::<_, rusqlite::Error>(())
    })?;
    hs.notify_device_change(auth.user_id.as_str());
    Ok(axum::Json(json!({})))
}

fn parse_user(s: &str) -> MxResult<OwnedUserId> {
    UserId::parse(s).map_err(|_| MxError::invalid_param(format!("Invalid user id: {s}")))
}

fn profile_of(
    conn: &Connection,
    user_id: &str,
) -> rusqlite::Result<Option<(Option<String>, Option<String>)>> {
    conn.query_row(
        "SELECT displayname, avatar_url FROM users WHERE user_id=?1 AND deactivated=0",
        [user_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

pub async fn get_profile(
    State(hs): State<Arc<Hs>>,
    PathArgs(user_id): PathArgs<String>,
) -> MxResult<J> {
    let user_id = parse_user(&user_id)?;
    if user_id.server_name() != hs.server_name {
        let path = format!(
            "/_matrix/federation/v1/query/profile?user_id={}",
            crate::federation::urlenc(user_id.as_str())
        );
        return hs
            .fed_request("GET", user_id.server_name(), &path, None)
            .await
            .map(axum::Json);
    }
    let (name, avatar) = hs
        .db
        .read(|c| profile_of(c, user_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Profile not found"))?;
    let mut out = json!({});
    if let Some(n) = name {
        out["displayname"] = json!(n);
    }
    if let Some(a) = avatar {
        out["avatar_url"] = json!(a);
    }
    Ok(axum::Json(out))
}

pub async fn get_profile_field(
    State(hs): State<Arc<Hs>>,
    PathArgs((user_id, field)): PathArgs<(String, String)>,
) -> MxResult<J> {
    let user_id = parse_user(&user_id)?;
    let (name, avatar) = hs
        .db
        .read(|c| profile_of(c, user_id.as_str()))?
        .ok_or_else(|| MxError::not_found("Profile not found"))?;
    let value = match field.as_str() {
        "displayname" => name,
        "avatar_url" => avatar,
        _ => None,
    };
    match value {
        Some(v) => Ok(axum::Json(json!({ field: v }))),
        None => Err(MxError::not_found("Profile field not set")),
    }
}

pub async fn set_profile_field(
    State(hs): State<Arc<Hs>>,
    auth: Auth,
    PathArgs((user_id, field)): PathArgs<(String, String)>,
    Json(body): Json<Value>,
) -> MxResult<J> {
    let user_id = parse_user(&user_id)?;
    if user_id != auth.user_id {
        return Err(MxError::forbidden("Cannot change another user's profile"));
    }
    let column = match field.as_str() {
        "displayname" => "displayname",
        "avatar_url" => "avatar_url",
        _ => {
            return Err(MxError::forbidden(
                "This profile field cannot be set on this server",
            ))
        }
    };
    let value = match &body[&field] {
        Value::String(s) => {
            if s.len() > 256 * 4 {
                return Err(MxError::too_large("Profile value too long"));
            }
            Some(s.clone())
        }
        Value::Null => None,
        _ => return Err(MxError::bad_json(format!("{field} must be a string"))),
    };
    hs.db.write(|w| {
        w.tx.execute(
            &format!("UPDATE users SET {column}=?1 WHERE user_id=?2"),
            params![value, user_id.as_str()],
        )
    })?;
    hs.refresh_member_events(&user_id)?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct DirectorySearch {
    search_term: String,
    limit: Option<u32>,
}

pub async fn user_directory_search(
    State(hs): State<Arc<Hs>>,
    _auth: Auth,
    Json(body): Json<DirectorySearch>,
) -> MxResult<J> {
    let limit = body.limit.unwrap_or(10).clamp(1, 50) as i64;
    let term = format!(
        "%{}%",
        body.search_term
            .to_lowercase()
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let mut results = hs.db.read(|c| {
        let mut st = c.prepare(
            "SELECT user_id, displayname, avatar_url FROM users WHERE deactivated=0
             AND (lower(user_id) LIKE ?1 ESCAPE '\\' OR lower(COALESCE(displayname,'')) LIKE ?1 ESCAPE '\\')
             ORDER BY user_id LIMIT ?2",
        )?;
        let r = st
            .query_map(params![term, limit + 1], |r| {
                Ok(json!({
                    "user_id": r.get::<_, String>(0)?,
                    "display_name": r.get::<_, Option<String>>(1)?,
                    "avatar_url": r.get::<_, Option<String>>(2)?,
                }))
            })?
            .collect::<Result<Vec<_>, _>>();
        r
    })?;
    let limited = results.len() as i64 > limit;
    results.truncate(limit as usize);
    Ok(axum::Json(
        json!({ "results": results, "limited": limited }),
    ))
}

/// Why a password is too weak, as a short code the web app words in the
/// member's language, with an English sentence for other clients.
pub fn password_problem(username: &str, password: &str) -> Option<(&'static str, &'static str)> {
    const COMMON: &[&str] = &[
        "password",
        "password1",
        "passw0rd",
        "12345678",
        "123456789",
        "1234567890",
        "87654321",
        "11111111",
        "00000000",
        "qwertyui",
        "qwerty123",
        "qwertyuiop",
        "iloveyou",
        "abcdefgh",
        "1q2w3e4r",
        "йцукенгш",
        "пароль123",
        "парольпароль",
        "secta123",
    ];
    let lower = password.to_lowercase();
    let chars: Vec<char> = password.chars().collect();
    if chars.len() < 8 {
        Some(("short", "The password must have at least 8 characters"))
    } else if password.len() > 512 {
        Some(("long", "The password must be at most 512 bytes"))
    } else if username.chars().count() >= 3 && lower.contains(&username.to_lowercase()) {
        Some(("username", "The password must not contain the username"))
    } else if chars.iter().all(|c| *c == chars[0]) {
        Some((
            "repeated",
            "The password must not be one character repeated",
        ))
    } else if COMMON.contains(&lower.as_str()) {
        Some(("common", "This password is one of the most common ones"))
    } else {
        None
    }
}
