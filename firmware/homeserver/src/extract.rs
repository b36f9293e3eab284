//! Request extractors that answer bad input with the spec's errcodes.

use std::sync::Arc;

use axum::{
    extract::{FromRequest, FromRequestParts, Request},
    http::{request::Parts, StatusCode},
};
use ruma::{OwnedDeviceId, OwnedUserId};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::{error::MxError, Hs};

/// A JSON body. Not JSON → `M_NOT_JSON`; wrong shape → `M_BAD_JSON`; too big → `M_TOO_LARGE`.
/// An empty body is read as `{}` (several endpoints allow it).
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = MxError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = match bytes::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rej) => {
                return Err(if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    MxError::too_large("Request body too large")
                } else {
                    MxError::bad_json(rej.body_text())
                })
            }
        };
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| MxError::not_json(format!("Content not JSON: {e}")))?;
        if !value.is_object() {
            return Err(MxError::bad_json("Request body must be a JSON object"));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| MxError::bad_json(format!("Invalid request body: {e}")))
    }
}

/// Path parameters; failures are `M_INVALID_PARAM`.
pub struct PathArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathArgs<T> {
    type Rejection = MxError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathArgs(p.0))
            .map_err(|e| MxError::invalid_param(e.body_text()))
    }
}

/// Query parameters; failures are `M_INVALID_PARAM`.
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = MxError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_html_form_like(q).map(QueryArgs)
    }
}

fn serde_html_form_like<T: DeserializeOwned>(q: &str) -> Result<T, MxError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{q}")
            .parse()
            .map_err(|_| MxError::invalid_param("bad query"))?,
    )
    .map(|q| q.0)
    .map_err(|e| MxError::invalid_param(e.body_text()))
}

/// An authenticated user, from `Authorization: Bearer` or `?access_token=`.
#[derive(Clone, Debug)]
pub struct Auth {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub is_admin: bool,
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn access_token(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(http::header::AUTHORIZATION) {
        let s = h.to_str().ok()?;
        return s.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let q = parts.uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

impl FromRequestParts<Arc<Hs>> for Auth {
    type Rejection = MxError;
    async fn from_request_parts(parts: &mut Parts, hs: &Arc<Hs>) -> Result<Self, Self::Rejection> {
        let token =
            access_token(parts).ok_or_else(|| MxError::missing_token("Missing access token"))?;
        hs.lookup_token(&token)?.ok_or_else(|| {
            MxError::unknown_token("Unknown access token").with_extra("soft_logout", false.into())
        })
    }
}

/// The client's network address (for rate limits); "local" when unknown (tests).
pub struct ClientAddr(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = MxError;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_else(|| "local".to_owned()),
        ))
    }
}
