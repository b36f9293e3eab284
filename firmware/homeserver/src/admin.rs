//! Administration: what the `secta` CLI does on the box's database, and the
//! Synapse-compatible shared-secret registration endpoint used by admin tools.
//!
//! The CLI functions here touch only rows without stream positions (users,
//! tokens, invite codes), so they are safe while the server runs.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::extract::State;
use hmac::{Hmac, Mac};
use ruma::UserId;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    account::{hash_password, insert_user, new_session, valid_localpart},
    error::{MxError, MxResult},
    extract::{ClientAddr, Json},
    now_ms, random_string, Hs,
};

/// An invite (registration) token as the admin sees it.
#[derive(Debug, Serialize)]
pub struct Invite {
    pub token: String,
    pub uses_allowed: Option<i64>,
    pub completed: i64,
    pub expiry_ts: Option<i64>,
    pub revoked: bool,
}

/// A user as the admin sees it.
#[derive(Debug, Serialize)]
pub struct UserInfo {
    pub user_id: String,
    pub displayname: Option<String>,
    pub admin: bool,
    pub deactivated: bool,
    pub created_ts: i64,
}

impl Hs {
    /// A local user id from a username (lower-cased, checked).
    fn local_user(&self, localpart: &str) -> MxResult<(String, ruma::OwnedUserId)> {
        let l = localpart.to_lowercase();
        if !valid_localpart(&l) {
            return Err(MxError::invalid_username(
                "Username may contain only a-z, 0-9, and . _ = - / +",
            ));
        }
        let user_id = UserId::parse_with_server_name(l.as_str(), &self.server_name)
            .map_err(|_| MxError::invalid_username("Invalid username"))?;
        Ok((l, user_id))
    }

    /// Creates a user with a password. Returns the full user id.
    pub fn admin_create_user(
        &self,
        localpart: &str,
        password: &str,
        admin: bool,
    ) -> MxResult<String> {
        let (_, user_id) = self.local_user(localpart)?;
        let hash = hash_password(password)?;
        self.db
            .write(|w| insert_user(w, &user_id, Some(&hash), admin, None))?;
        Ok(user_id.to_string())
    }

    /// Issues an invite token valid for `uses` registrations (None: unlimited) until `expires_in`.
    pub fn admin_create_invite(
        &self,
        uses: Option<u32>,
        expires_in: Option<Duration>,
    ) -> MxResult<String> {
        let token = random_string(16);
        let expiry = expires_in.map(|d| now_ms() as i64 + d.as_millis() as i64);
        if !self.admin_add_invite(&token, uses.map(i64::from), expiry)? {
            return Err(MxError::unknown("generated invite token already exists"));
        }
        Ok(token)
    }

    /// Adds the invite token `token` (chosen by the caller, e.g. pre-seeded at
    /// first boot) for `uses` registrations (None: unlimited) until `expiry_ts`
    /// (ms). False when the token already exists (it is left as it was).
    pub fn admin_add_invite(
        &self,
        token: &str,
        uses: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> MxResult<bool> {
        Ok(self.db.write(|w| {
            w.tx.execute(
                "INSERT OR IGNORE INTO registration_tokens(token, uses_allowed, expiry_ts, created_ts) VALUES(?1,?2,?3,?4)",
                params![token, uses, expiry_ts, now_ms() as i64],
            )
        })? > 0)
    }

    pub fn admin_list_invites(&self) -> MxResult<Vec<Invite>> {
        Ok(self.db.read(|c| {
            let mut st = c.prepare(
                "SELECT token, uses_allowed, completed, expiry_ts, revoked FROM registration_tokens ORDER BY created_ts",
            )?;
            let r = st
                .query_map([], |r| {
                    Ok(Invite {
                        token: r.get(0)?,
                        uses_allowed: r.get(1)?,
                        completed: r.get(2)?,
                        expiry_ts: r.get(3)?,
                        revoked: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>();
            r
        })?)
    }

    /// Revokes a token; false if there was no such token.
    pub fn admin_revoke_invite(&self, token: &str) -> MxResult<bool> {
        Ok(self.db.write(|w| {
            w.tx.execute(
                "UPDATE registration_tokens SET revoked=1 WHERE token=?1",
                [token],
            )
        })? > 0)
    }

    pub fn admin_list_users(&self) -> MxResult<Vec<UserInfo>> {
        Ok(self.db.read(|c| {
            let mut st = c.prepare(
                "SELECT user_id, displayname, is_admin, deactivated, created_ts FROM users ORDER BY created_ts",
            )?;
            let r = st
                .query_map([], |r| {
                    Ok(UserInfo {
                        user_id: r.get(0)?,
                        displayname: r.get(1)?,
                        admin: r.get(2)?,
                        deactivated: r.get(3)?,
                        created_ts: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>();
            r
        })?)
    }

    /// Sets a new password and logs the user out everywhere. False if no such user.
    pub fn admin_reset_password(&self, user: &str, password: &str) -> MxResult<bool> {
        let user_id = if user.starts_with('@') {
            user.to_owned()
        } else {
            format!("@{}:{}", user.to_lowercase(), self.server_name)
        };
        let hash = hash_password(password)?;
        Ok(self.db.write(|w| -> rusqlite::Result<usize> {
            let n = w.tx.execute(
                "UPDATE users SET password_hash=?1 WHERE user_id=?2",
                params![hash, user_id],
            )?;
            w.tx.execute("DELETE FROM access_tokens WHERE user_id=?1", [&user_id])?;
            Ok(n)
        })? > 0)
    }

    /// Whether people may register without an invite.
    pub fn open_registration(&self) -> bool {
        self.open_registration
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens or closes registration without an invite (until restart; the
    /// caller persists it in the settings).
    pub fn set_open_registration(&self, open: bool) {
        self.open_registration
            .store(open, std::sync::atomic::Ordering::Relaxed);
    }

    /// The user behind an access token and whether they are an admin (`None`:
    /// unknown token or deactivated user).
    pub fn whoami(&self, token: &str) -> MxResult<Option<(String, bool)>> {
        Ok(self
            .lookup_token(token)?
            .map(|a| (a.user_id.to_string(), a.is_admin)))
    }

    /// Registers a member as the box's own sign-up page does: with an invite
    /// token (consumed in the same transaction, never beyond its uses), or
    /// without one when registration is open. Returns the full user id.
    pub fn register_member(
        &self,
        localpart: &str,
        password: &str,
        invite: Option<&str>,
    ) -> MxResult<String> {
        let (l, user_id) = self.local_user(localpart)?;
        if invite.is_none() && !self.open_registration() {
            return Err(MxError::forbidden("An invite code is needed to register"));
        }
        let taken = self.db.read(|c| {
            c.query_row("SELECT 1 FROM users WHERE localpart=?1", [&l], |_| Ok(()))
                .optional()
        })?;
        if taken.is_some() {
            return Err(MxError::user_in_use("User ID already taken"));
        }
        let hash = hash_password(password)?;
        self.db.write(|w| -> MxResult<()> {
            if let Some(t) = invite {
                crate::account::consume_token(w.tx, t)?;
            }
            insert_user(w, &user_id, Some(&hash), false, None)?;
            Ok(())
        })?;
        tracing::info!(user = %user_id, "registered new user through the box's page");
        Ok(user_id.to_string())
    }

    /// When the earliest of the user's current devices logged in (Unix ms;
    /// `None`: no device, e.g. never logged in).
    pub fn earliest_device_login(&self, user_id: &str) -> MxResult<Option<i64>> {
        Ok(self.db.read(|c| {
            c.query_row(
                "SELECT MIN(last_seen_ts) FROM devices WHERE user_id=?1",
                [user_id],
                |r| r.get::<_, Option<i64>>(0),
            )
        })?)
    }

    /// Whether any admin exists yet.
    pub fn has_admin(&self) -> MxResult<bool> {
        Ok(self
            .db
            .read(|c| {
                c.query_row("SELECT 1 FROM users WHERE is_admin=1 LIMIT 1", [], |_| {
                    Ok(())
                })
                .optional()
            })?
            .is_some())
    }
}

/// Deactivates a user: leaves every room, removes every device and token.
pub fn deactivate_user(hs: &Hs, user_id: &UserId) -> MxResult<()> {
    let rooms: Vec<String> = hs.db.read(|c| {
        let mut st = c.prepare(
            "SELECT room_id FROM room_state WHERE type='m.room.member' AND state_key=?1 AND membership IN ('join','invite','knock')",
        )?;
        let r = st.query_map([user_id.as_str()], |r| r.get(0))?.collect::<Result<Vec<String>, _>>();
        r
    })?;
    for room in rooms {
        let room_id = ruma::RoomId::parse(&room).map_err(|e| MxError::unknown(e.to_string()))?;
        if let Err(e) = hs.set_membership(&room_id, user_id, user_id, "leave", None, None) {
            tracing::warn!(room = %room, errcode = e.errcode, "could not leave room while deactivating");
        }
    }
    hs.db.write(|w| {
        crate::account::delete_other_devices(w, user_id.as_str(), None)?;
        w.tx.execute(
            "UPDATE users SET deactivated=1, password_hash=NULL WHERE user_id=?1",
            [user_id.as_str()],
        )
    })?;
    tracing::info!(user = %user_id, "user deactivated");
    Ok(())
}

pub async fn register_nonce(State(hs): State<Arc<Hs>>) -> axum::Json<Value> {
    let nonce = random_string(32);
    let mut map = hs.admin_nonces.lock().unwrap_or_else(|p| p.into_inner());
    map.retain(|_, t| t.elapsed() < Duration::from_secs(60));
    map.insert(nonce.clone(), Instant::now());
    axum::Json(json!({ "nonce": nonce }))
}

#[derive(Deserialize)]
pub struct SharedSecretRegister {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    displayname: Option<String>,
    mac: String,
}

/// `POST /_synapse/admin/v1/register`: HMAC-SHA1 over `nonce\0username\0password\0admin|notadmin`.
pub async fn register_with_secret(
    State(hs): State<Arc<Hs>>,
    ClientAddr(addr): ClientAddr,
    Json(body): Json<SharedSecretRegister>,
) -> MxResult<axum::Json<Value>> {
    let fresh = hs
        .admin_nonces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&body.nonce);
    if fresh.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        hs.check_rate(&format!("admin-register:{addr}"))?;
        return Err(MxError::invalid_param("Unrecognised nonce"));
    }
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(hs.shared_secret.as_bytes())
        .map_err(|e| MxError::unknown(e.to_string()))?;
    mac.update(body.nonce.as_bytes());
    mac.update(b"\0");
    mac.update(body.username.as_bytes());
    mac.update(b"\0");
    mac.update(body.password.as_bytes());
    mac.update(b"\0");
    mac.update(if body.admin {
        b"admin" as &[u8]
    } else {
        b"notadmin"
    });
    let want = hex::decode(body.mac.trim()).map_err(|_| MxError::forbidden("HMAC incorrect"))?;
    if mac.verify_slice(&want).is_err() {
        hs.check_rate(&format!("admin-register:{addr}"))?;
        return Err(MxError::forbidden("HMAC incorrect"));
    }
    let l = body.username.to_lowercase();
    if !valid_localpart(&l) {
        return Err(MxError::invalid_username("Invalid username"));
    }
    let user_id = UserId::parse_with_server_name(l.as_str(), &hs.server_name)
        .map_err(|_| MxError::invalid_username("Invalid username"))?;
    let hash = crate::account::hash_password_async(body.password.clone()).await?;
    let (device, token) = hs.db.write(|w| -> MxResult<_> {
        insert_user(
            w,
            &user_id,
            Some(&hash),
            body.admin,
            body.displayname.as_deref(),
        )?;
        new_session(w, user_id.as_str(), None, None)
    })?;
    Ok(axum::Json(json!({
        "user_id": user_id,
        "access_token": token,
        "device_id": device,
        "home_server": hs.server_name,
    })))
}

// ---- Synapse-compatible admin API for registration tokens (what admin tools use) ----

fn require_admin(auth: &crate::extract::Auth) -> MxResult<()> {
    if auth.is_admin {
        Ok(())
    } else {
        Err(MxError::forbidden("You are not a server admin"))
    }
}

fn token_json(i: &Invite) -> Value {
    json!({
        "token": i.token,
        "uses_allowed": i.uses_allowed,
        "pending": 0,
        "completed": i.completed,
        "expiry_time": i.expiry_ts,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct TokenListQuery {
    valid: Option<bool>,
}

fn invite_valid(i: &Invite) -> bool {
    !i.revoked
        && i.uses_allowed.is_none_or(|u| i.completed < u)
        && i.expiry_ts.is_none_or(|e| (now_ms() as i64) < e)
}

pub async fn list_tokens(
    State(hs): State<Arc<Hs>>,
    auth: crate::extract::Auth,
    crate::extract::QueryArgs(q): crate::extract::QueryArgs<TokenListQuery>,
) -> MxResult<axum::Json<Value>> {
    require_admin(&auth)?;
    let tokens: Vec<Value> = hs
        .admin_list_invites()?
        .iter()
        .filter(|i| !i.revoked && q.valid.is_none_or(|v| invite_valid(i) == v))
        .map(token_json)
        .collect();
    Ok(axum::Json(json!({ "registration_tokens": tokens })))
}

fn find_token(hs: &Hs, token: &str) -> MxResult<Invite> {
    hs.admin_list_invites()?
        .into_iter()
        .find(|i| i.token == token && !i.revoked)
        .ok_or_else(|| MxError::not_found("No such registration token"))
}

pub async fn get_token(
    State(hs): State<Arc<Hs>>,
    auth: crate::extract::Auth,
    crate::extract::PathArgs(token): crate::extract::PathArgs<String>,
) -> MxResult<axum::Json<Value>> {
    require_admin(&auth)?;
    Ok(axum::Json(token_json(&find_token(&hs, &token)?)))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NewToken {
    token: Option<String>,
    uses_allowed: Option<i64>,
    expiry_time: Option<i64>,
    length: Option<usize>,
}

pub async fn new_token(
    State(hs): State<Arc<Hs>>,
    auth: crate::extract::Auth,
    Json(body): Json<NewToken>,
) -> MxResult<axum::Json<Value>> {
    require_admin(&auth)?;
    if body.uses_allowed.is_some_and(|u| u < 0) {
        return Err(MxError::invalid_param(
            "uses_allowed must be a non-negative integer or null",
        ));
    }
    if body.expiry_time.is_some_and(|e| e < now_ms() as i64) {
        return Err(MxError::invalid_param(
            "expiry_time must not be in the past",
        ));
    }
    let token = match body.token {
        Some(t) => {
            if t.is_empty()
                || t.len() > 64
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
            {
                return Err(MxError::invalid_param(
                    "token must be 1-64 characters of A-Z a-z 0-9 . _ ~ -",
                ));
            }
            t
        }
        None => random_string(body.length.unwrap_or(16).clamp(1, 64)),
    };
    if !hs.admin_add_invite(&token, body.uses_allowed, body.expiry_time)? {
        return Err(MxError::invalid_param("This token already exists"));
    }
    Ok(axum::Json(token_json(&find_token(&hs, &token)?)))
}

pub async fn update_token(
    State(hs): State<Arc<Hs>>,
    auth: crate::extract::Auth,
    crate::extract::PathArgs(token): crate::extract::PathArgs<String>,
    Json(body): Json<Value>,
) -> MxResult<axum::Json<Value>> {
    require_admin(&auth)?;
    find_token(&hs, &token)?;
    // A field that is absent stays; `null` clears it.
    let uses = body.get("uses_allowed").map(Value::as_i64);
    let expiry = body.get("expiry_time").map(Value::as_i64);
    hs.db.write(|w| -> rusqlite::Result<()> {
        if let Some(u) = uses {
            w.tx.execute(
                "UPDATE registration_tokens SET uses_allowed=?1 WHERE token=?2",
                params![u, token],
            )?;
        }
        if let Some(e) = expiry {
            w.tx.execute(
                "UPDATE registration_tokens SET expiry_ts=?1 WHERE token=?2",
                params![e, token],
            )?;
        }
        Ok(())
    })?;
    Ok(axum::Json(token_json(&find_token(&hs, &token)?)))
}

pub async fn delete_token(
    State(hs): State<Arc<Hs>>,
    auth: crate::extract::Auth,
    crate::extract::PathArgs(token): crate::extract::PathArgs<String>,
) -> MxResult<axum::Json<Value>> {
    require_admin(&auth)?;
    if !hs.admin_revoke_invite(&token)? {
        return Err(MxError::not_found("No such registration token"));
    }
    Ok(axum::Json(json!({})))
}
