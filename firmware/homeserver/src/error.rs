//! Matrix errors: an HTTP status plus the spec's `errcode`.

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};

/// An error answered to a client as `{"errcode": ..., "error": ...}`.
#[derive(Debug)]
pub struct MxError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields (e.g. `retry_after_ms`, UIA flows).
    pub extra: Option<serde_json::Map<String, Value>>,
}

pub type MxResult<T> = Result<T, MxError>;

macro_rules! ctor {
    ($name:ident, $status:ident, $code:literal) => {
        pub fn $name(msg: impl Into<String>) -> Self {
            Self::new(StatusCode::$status, $code, msg)
        }
    };
}

impl MxError {
    pub fn new(status: StatusCode, errcode: &'static str, msg: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: msg.into(),
            extra: None,
        }
    }
    ctor!(forbidden, FORBIDDEN, "M_FORBIDDEN");
    ctor!(not_found, NOT_FOUND, "M_NOT_FOUND");
    ctor!(bad_json, BAD_REQUEST, "M_BAD_JSON");
    ctor!(not_json, BAD_REQUEST, "M_NOT_JSON");
    ctor!(missing_param, BAD_REQUEST, "M_MISSING_PARAM");
    ctor!(invalid_param, BAD_REQUEST, "M_INVALID_PARAM");
    ctor!(unknown_token, UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    ctor!(missing_token, UNAUTHORIZED, "M_MISSING_TOKEN");
    ctor!(too_large, PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    ctor!(user_in_use, BAD_REQUEST, "M_USER_IN_USE");
    ctor!(invalid_username, BAD_REQUEST, "M_INVALID_USERNAME");
    ctor!(room_in_use, BAD_REQUEST, "M_ROOM_IN_USE");
    ctor!(
        unsupported_room_version,
        BAD_REQUEST,
        "M_UNSUPPORTED_ROOM_VERSION"
    );
    ctor!(guest_forbidden, FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN");
    ctor!(user_deactivated, FORBIDDEN, "M_USER_DEACTIVATED");
    ctor!(unknown, INTERNAL_SERVER_ERROR, "M_UNKNOWN");

    pub fn unrecognized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", msg)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
            "Method not allowed for this endpoint",
        )
    }

    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "M_LIMIT_EXCEEDED",
            "Too many requests",
        );
        let mut extra = serde_json::Map::new();
        extra.insert("retry_after_ms".into(), json!(retry_after_ms));
        e.extra = Some(extra);
        e
    }

    pub fn with_extra(mut self, key: &str, value: Value) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value);
        self
    }
}

impl IntoResponse for MxError {
    fn into_response(self) -> Response {
        let mut body = self.extra.unwrap_or_default();
        body.insert("errcode".into(), json!(self.errcode));
        body.insert("error".into(), json!(self.message));
        let retry = body.get("retry_after_ms").and_then(Value::as_u64);
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(ms) = retry {
            if let Ok(v) = header::HeaderValue::from_str(&ms.div_ceil(1000).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<rusqlite::Error> for MxError {
    fn from(e: rusqlite::Error) -> Self {
        tracing::error!(error = %e, "database error");
        Self::unknown("Internal database error")
    }
}

impl From<anyhow::Error> for MxError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::unknown("Internal error")
    }
}
