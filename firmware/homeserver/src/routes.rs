//! URL → handler map of the Client-Server API.

use std::sync::Arc;

use axum::{
    extract::DefaultBodyLimit,
    http::{header, Method},
    response::IntoResponse,
    routing::{get, post, put},
    Json, Router,
};
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};

use crate::{
    account, admin, backup, ephemeral, error::MxError, federation, keys, media, push, rooms,
    search, ssync, sync, Hs,
};

/// Spec versions this server implements (newest is the current stable spec).
pub const SPEC_VERSIONS: &[&str] = &[
    "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16", "v1.17", "v1.18", "v1.19",
];

fn client_v3() -> Router<Arc<Hs>> {
    Router::new()
        .route("/login", get(account::login_flows).post(account::login))
        .route("/logout", post(account::logout))
        .route("/logout/all", post(account::logout_all))
        .route("/register", post(account::register))
        .route("/register/available", get(account::username_available))
        .route("/account/whoami", get(account::whoami))
        .route("/account/password", post(account::change_password))
        .route("/account/deactivate", post(account::deactivate))
        .route("/capabilities", get(account::capabilities))
        .route("/devices", get(account::list_devices))
        .route(
            "/devices/{device_id}",
            get(account::get_device)
                .put(account::update_device)
                .delete(account::delete_device),
        )
        .route("/delete_devices", post(account::delete_devices))
        .route("/profile/{user_id}", get(account::get_profile))
        .route(
            "/profile/{user_id}/{field}",
            get(account::get_profile_field).put(account::set_profile_field),
        )
        .route(
            "/user_directory/search",
            post(account::user_directory_search),
        )
        .route("/user/{user_id}/filter", post(ephemeral::create_filter))
        .route(
            "/user/{user_id}/filter/{filter_id}",
            get(ephemeral::get_filter),
        )
        .route(
            "/user/{user_id}/account_data/{kind}",
            get(ephemeral::get_account_data).put(ephemeral::set_account_data),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/account_data/{kind}",
            get(ephemeral::get_room_account_data).put(ephemeral::set_room_account_data),
        )
        .route("/pushrules/", get(ephemeral::get_push_rules))
        .route("/pushrules/global/", get(ephemeral::get_push_rules_global))
        .route(
            "/pushrules/global/{kind}/{rule_id}",
            get(ephemeral::get_push_rule)
                .put(ephemeral::put_push_rule)
                .delete(ephemeral::delete_push_rule),
        )
        .route(
            "/pushrules/global/{kind}/{rule_id}/{attr}",
            get(ephemeral::get_push_rule_attr).put(ephemeral::put_push_rule_attr),
        )
        .route(
            "/presence/{user_id}/status",
            get(ephemeral::get_presence).put(ephemeral::set_presence),
        )
        .route("/sync", get(sync::sync))
        .route("/createRoom", post(rooms::create_room))
        .route("/joined_rooms", get(rooms::joined_rooms))
        .route("/join/{room}", post(rooms::join_by_id_or_alias))
        .route("/knock/{room}", post(rooms::knock))
        .route("/rooms/{room_id}/join", post(rooms::join_room))
        .route("/rooms/{room_id}/invite", post(rooms::invite))
        .route("/rooms/{room_id}/leave", post(rooms::leave))
        .route("/rooms/{room_id}/forget", post(rooms::forget))
        .route("/rooms/{room_id}/kick", post(rooms::kick))
        .route("/rooms/{room_id}/ban", post(rooms::ban))
        .route("/rooms/{room_id}/unban", post(rooms::unban))
        .route(
            "/rooms/{room_id}/send/{kind}/{txn_id}",
            put(rooms::send_message),
        )
        .route(
            "/rooms/{room_id}/redact/{event_id}/{txn_id}",
            put(rooms::redact),
        )
        .route("/rooms/{room_id}/state", get(rooms::get_state))
        .route(
            "/rooms/{room_id}/state/{kind}",
            get(rooms::get_state_event_empty_key).put(rooms::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{kind}/",
            get(rooms::get_state_event_empty_key).put(rooms::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{kind}/{state_key}",
            get(rooms::get_state_event).put(rooms::put_state),
        )
        .route("/rooms/{room_id}/members", get(rooms::members))
        .route(
            "/rooms/{room_id}/joined_members",
            get(rooms::joined_members),
        )
        .route("/rooms/{room_id}/messages", get(rooms::messages))
        .route("/rooms/{room_id}/event/{event_id}", get(rooms::get_event))
        .route("/rooms/{room_id}/context/{event_id}", get(rooms::context))
        .route("/rooms/{room_id}/aliases", get(rooms::room_aliases))
        .route("/rooms/{room_id}/typing/{user_id}", put(ephemeral::typing))
        .route(
            "/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
            post(ephemeral::receipt),
        )
        .route(
            "/rooms/{room_id}/read_markers",
            post(ephemeral::read_markers),
        )
        .route(
            "/directory/room/{alias}",
            get(rooms::get_alias)
                .put(rooms::put_alias)
                .delete(rooms::delete_alias),
        )
        .route(
            "/directory/list/room/{room_id}",
            get(rooms::get_visibility).put(rooms::set_visibility),
        )
        .route(
            "/publicRooms",
            get(rooms::public_rooms_get).post(rooms::public_rooms_post),
        )
        .route("/search", post(search::search))
        .route("/voip/turnServer", get(turn_server))
        .route("/keys/upload", post(keys::upload))
        .route("/keys/query", post(keys::query))
        .route("/keys/claim", post(keys::claim))
        .route("/keys/changes", get(keys::changes))
        .route(
            "/keys/device_signing/upload",
            post(keys::upload_signing_keys),
        )
        .route("/keys/signatures/upload", post(keys::upload_signatures))
        .route("/sendToDevice/{kind}/{txn_id}", put(keys::send_to_device))
        .route(
            "/room_keys/version",
            get(backup::get_current_version).post(backup::create_version),
        )
        .route(
            "/room_keys/version/{version}",
            get(backup::get_version)
                .put(backup::update_version)
                .delete(backup::delete_version),
        )
        .route(
            "/room_keys/keys",
            get(backup::get_all)
                .put(backup::put_all)
                .delete(backup::delete_all),
        )
        .route(
            "/room_keys/keys/{room_id}",
            get(backup::get_room)
                .put(backup::put_room)
                .delete(backup::delete_room),
        )
        .route(
            "/room_keys/keys/{room_id}/{session_id}",
            get(backup::get_session)
                .put(backup::put_session)
                .delete(backup::delete_session),
        )
        .route("/notifications", get(push::notifications))
        .route("/pushers", get(ephemeral::get_pushers))
        .route("/pushers/set", post(ephemeral::set_pusher))
        .route("/account/3pid", get(no_threepids))
        .route("/thirdparty/protocols", get(no_protocols))
}

fn federation_routes() -> Router<Arc<Hs>> {
    Router::new()
        .route("/v1/version", get(federation::version))
        .route("/v1/send/{txn_id}", put(federation::send_transaction))
        .route(
            "/v1/make_join/{room_id}/{user_id}",
            get(federation::make_join),
        )
        .route(
            "/v2/send_join/{room_id}/{event_id}",
            put(federation::send_join),
        )
        .route("/v2/invite/{room_id}/{event_id}", put(federation::invite))
        .route(
            "/v1/make_leave/{room_id}/{user_id}",
            get(federation::make_leave),
        )
        .route(
            "/v2/send_leave/{room_id}/{event_id}",
            put(federation::send_leave),
        )
        .route(
            "/v1/make_knock/{room_id}/{user_id}",
            get(federation::make_knock),
        )
        .route(
            "/v1/send_knock/{room_id}/{event_id}",
            put(federation::send_knock),
        )
        .route("/v1/event/{event_id}", get(federation::get_event))
        .route("/v1/state_ids/{room_id}", get(federation::state_ids))
        .route("/v1/backfill/{room_id}", get(federation::backfill_endpoint))
        .route("/v1/state/{room_id}", get(federation::state_endpoint))
        .route(
            "/v1/event_auth/{room_id}/{event_id}",
            get(federation::event_auth),
        )
        .route(
            "/v1/get_missing_events/{room_id}",
            post(federation::get_missing_events),
        )
        .route("/v1/publicRooms", post(rooms::federation_public_rooms))
        .route("/v1/query/profile", get(federation::query_profile))
        .route("/v1/query/directory", get(federation::query_directory))
        .route("/v1/user/keys/query", post(federation::user_keys_query))
        .route("/v1/user/keys/claim", post(federation::user_keys_claim))
        .route("/v1/user/devices/{user_id}", get(federation::user_devices))
}

fn media_legacy() -> Router<Arc<Hs>> {
    Router::new()
        .route("/config", get(media::config))
        .route("/upload", post(media::upload))
        .route("/upload/{server}/{media_id}", put(media::upload_to))
        .route("/download/{server}/{media_id}", get(media::legacy_download))
        .route(
            "/download/{server}/{media_id}/{filename}",
            get(media::legacy_download_named),
        )
        .route(
            "/thumbnail/{server}/{media_id}",
            get(media::legacy_thumbnail),
        )
        .route("/preview_url", get(media::preview_url))
}

fn client_v1() -> Router<Arc<Hs>> {
    Router::new()
        .route("/media/config", get(media::config))
        .route("/media/download/{server}/{media_id}", get(media::download))
        .route(
            "/media/download/{server}/{media_id}/{filename}",
            get(media::download_named),
        )
        .route(
            "/media/thumbnail/{server}/{media_id}",
            get(media::thumbnail),
        )
        .route("/media/preview_url", get(media::preview_url))
        .route(
            "/register/m.login.registration_token/validity",
            get(account::registration_token_validity),
        )
        .route(
            "/rooms/{room_id}/relations/{event_id}",
            get(rooms::relations),
        )
        .route(
            "/rooms/{room_id}/relations/{event_id}/{rel_type}",
            get(rooms::relations_typed),
        )
        .route(
            "/rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
            get(rooms::relations_typed2),
        )
        .route("/rooms/{room_id}/threads", get(rooms::threads))
}

async fn versions() -> impl IntoResponse {
    Json(json!({
        "versions": SPEC_VERSIONS,
        "unstable_features": {
            "org.matrix.msc3440.stable": true,
            "org.matrix.msc2285.stable": true,
            "org.matrix.msc3827.stable": true,
            "org.matrix.simplified_msc3575": true,
        }
    }))
}

async fn turn_server() -> MxError {
    MxError::not_found("This box has no TURN server")
}

/// The box keeps no e-mail addresses or phone numbers.
async fn no_threepids(_auth: crate::extract::Auth) -> impl IntoResponse {
    Json(json!({ "threepids": [] }))
}

/// No third-party networks are bridged (yet).
async fn no_protocols(_auth: crate::extract::Auth) -> impl IntoResponse {
    Json(json!({}))
}

async fn well_known_client(
    axum::extract::State(hs): axum::extract::State<Arc<Hs>>,
) -> impl IntoResponse {
    Json(json!({ "m.homeserver": { "base_url": hs.config.base_url() } }))
}

async fn well_known_server(
    axum::extract::State(hs): axum::extract::State<Arc<Hs>>,
) -> impl IntoResponse {
    let name = hs.server_name.as_str();
    // Configured, else the server name itself when it has a port, else its
    // host on the federation TLS port (443: behind a reverse proxy).
    let tls_port = hs
        .config
        .federation
        .tls_listen
        .as_deref()
        .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
        .map_or(443, |a| a.port());
    let server = if let Some(s) = &hs.config.federation.well_known_server {
        s.clone()
    } else if hs.server_name.port().is_some() {
        name.to_owned()
    } else {
        format!("{name}:{tls_port}")
    };
    Json(json!({ "m.server": server }))
}

/// Logs method, route template, status and time: never the concrete path or
/// query (they hold user ids, room ids and sometimes access tokens).
async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(%method, %route, status, ms, "request failed");
    } else {
        tracing::debug!(%method, %route, status, ms, "request");
    }
    resp
}

async fn unrecognized() -> MxError {
    MxError::unrecognized("Unrecognized request")
}

pub fn router(hs: Arc<Hs>) -> Router {
    let limit = hs.config.max_request_bytes;
    let v3 = client_v3();
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ]);
    Router::new()
        .route("/_matrix/client/versions", get(versions))
        .route("/.well-known/matrix/client", get(well_known_client))
        .route("/.well-known/matrix/server", get(well_known_server))
        .route(
            "/_matrix/key/v2/server",
            get(federation::server_keys_endpoint),
        )
        .nest("/_matrix/client/v3", v3.clone())
        .nest("/_matrix/client/r0", v3)
        .nest("/_matrix/client/v1", client_v1())
        .nest("/_matrix/media/v3", media_legacy())
        .nest("/_matrix/media/r0", media_legacy())
        .route("/_matrix/media/v1/create", post(media::create))
        .route(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            post(ssync::sliding_sync),
        )
        .route("/_matrix/client/v5/sync", post(ssync::sliding_sync))
        .route(
            "/_synapse/admin/v1/register",
            get(admin::register_nonce).post(admin::register_with_secret),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens",
            get(admin::list_tokens),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens/new",
            post(admin::new_token),
        )
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(admin::get_token)
                .put(admin::update_token)
                .delete(admin::delete_token),
        )
        .route("/_matrix/key/v2/query", post(federation::key_query))
        .route(
            "/_matrix/key/v2/query/{server}",
            get(federation::key_query_one),
        )
        .nest("/_matrix/federation", federation_routes())
        .route_layer(axum::middleware::from_fn(log_request))
        .fallback(unrecognized)
        .method_not_allowed_fallback(|| async { MxError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(cors)
        .with_state(hs)
}
