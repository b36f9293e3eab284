//! HTTP-level tests of the Client-Server API: bad input gets the spec's errcode and
//! loses nothing; events are signed the way federation needs; search finds Russian
//! word forms.

use std::sync::Arc;

use axum::{body::Body, http::Request, Router};
use secta_homeserver::{HomeserverConfig, Hs};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Box_ {
    _dir: tempfile::TempDir,
    hs: Arc<Hs>,
    app: Router,
}

fn new_box() -> Box_ {
    new_box_with(HomeserverConfig {
        server_name: "test.box".into(),
        ..Default::default()
    })
}

/// A box on `dir` that leaves the folder alone when dropped (to reopen it).
fn box_at(dir: &std::path::Path) -> Box_ {
    let hs = Hs::open(
        HomeserverConfig {
            server_name: "test.box".into(),
            ..Default::default()
        },
        dir,
    )
    .unwrap();
    let app = hs.router();
    Box_ {
        _dir: tempfile::tempdir().unwrap(),
        hs,
        app,
    }
}

/// A password the default policy accepts.
const PW: &str = "tulip-quarry-anvil";

fn new_box_with(config: HomeserverConfig) -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let hs = Hs::open(config, dir.path()).unwrap();
    let app = hs.router();
    Box_ { _dir: dir, hs, app }
}

impl Box_ {
    async fn raw(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    /// Sends a request to the box's router: status and JSON answer (or null).
    async fn send(&self, req: Request<Body>) -> (u16, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        self.raw(method, uri, token, body.to_string().into_bytes())
            .await
    }

    async fn register(&self, name: &str) -> (String, String) {
        let token = self.hs.admin_create_invite(Some(1), None).unwrap();
        let (s, v) = self
            .call(
                "POST",
                "/_matrix/client/v3/register",
                None,
                json!({"username": name, "password": PW}),
            )
            .await;
        assert_eq!(s, 401, "{v}");
        let session = v["session"].as_str().unwrap().to_owned();
        let (s, v) = self
            .call(
                "POST",
                "/_matrix/client/v3/register",
                None,
                json!({"username": name, "password": PW,
                       "auth": {"type": "m.login.registration_token", "token": token, "session": session}}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        (
            v["user_id"].as_str().unwrap().to_owned(),
            v["access_token"].as_str().unwrap().to_owned(),
        )
    }

    async fn room(&self, token: &str) -> String {
        let (s, v) = self
            .call(
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(token),
                json!({"preset": "public_chat"}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["room_id"].as_str().unwrap().to_owned()
    }

    async fn login(&self, user: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": PW}),
        )
        .await
    }

    async fn redact(
        &self,
        token: &str,
        room: &str,
        event: &str,
        txn: &str,
        body: Value,
    ) -> (u16, Value) {
        let uri = format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/{txn}",
            enc(room),
            enc(event)
        );
        self.call("PUT", &uri, Some(token), body).await
    }

    async fn event_count(&self, token: &str, room: &str) -> usize {
        let (s, v) = self
            .call(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000",
                    enc(room)
                ),
                Some(token),
                json!({}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["chunk"].as_array().unwrap().len()
    }
}

fn enc(s: &str) -> String {
    s.replace('!', "%21")
        .replace(':', "%3A")
        .replace('$', "%24")
        .replace('#', "%23")
        .replace('@', "%40")
}

fn assert_err(got: &(u16, Value), status: u16, errcode: &str) {
    assert_eq!(got.0, status, "status for {}", got.1);
    assert_eq!(got.1["errcode"], errcode, "errcode for {}", got.1);
    assert!(got.1["error"].is_string());
}

#[tokio::test]
async fn malformed_bodies_and_unknown_endpoints() {
    let b = new_box();
    assert_err(
        &b.raw(
            "POST",
            "/_matrix/client/v3/login",
            None,
            b"{not json".to_vec(),
        )
        .await,
        400,
        "M_NOT_JSON",
    );
    assert_err(
        &b.call("POST", "/_matrix/client/v3/login", None, json!({"type": 5}))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &b.call("POST", "/_matrix/client/v3/login", None, json!([1, 2]))
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_err(
        &b.call("GET", "/_matrix/client/v3/no/such/thing", None, json!({}))
            .await,
        404,
        "M_UNRECOGNIZED",
    );
    assert_err(
        &b.call("DELETE", "/_matrix/client/v3/login", None, json!({}))
            .await,
        405,
        "M_UNRECOGNIZED",
    );
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_err(
        &b.raw("POST", "/_matrix/client/v3/login", None, big).await,
        413,
        "M_TOO_LARGE",
    );
}

#[tokio::test]
async fn tokens_are_checked() {
    let b = new_box();
    assert_err(
        &b.call("GET", "/_matrix/client/v3/account/whoami", None, json!({}))
            .await,
        401,
        "M_MISSING_TOKEN",
    );
    let got = b
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some("nope"),
            json!({}),
        )
        .await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let (user, token) = b.register("alice").await;
    let (s, v) = b
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!((s, v["user_id"].as_str()), (200, Some(user.as_str())));
    // Query-string tokens work too.
    let (s, _) = b
        .call(
            "GET",
            &format!("/_matrix/client/v3/account/whoami?access_token={token}"),
            None,
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = b
        .call("POST", "/_matrix/client/v3/logout", Some(&token), json!({}))
        .await;
    assert_eq!(s, 200);
    assert_err(
        &b.call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&token),
            json!({}),
        )
        .await,
        401,
        "M_UNKNOWN_TOKEN",
    );
}

#[tokio::test]
async fn a_used_token_stops_working_when_its_device_or_user_goes() {
    let b = new_box();
    let whoami = |token: &str| {
        let token = token.to_owned();
        let b = &b;
        async move {
            b.call(
                "GET",
                "/_matrix/client/v3/account/whoami",
                Some(&token),
                json!({}),
            )
            .await
            .0
        }
    };
    let (user, first) = b.register("alice").await;
    let login = || b.login(&user);
    let (s, v) = login().await;
    assert_eq!(s, 200, "{v}");
    let second = v["access_token"].as_str().unwrap().to_owned();
    // Both are used (and so remembered as valid) before they end.
    assert_eq!((whoami(&first).await, whoami(&second).await), (200, 200));
    let (s, _) = b
        .call(
            "POST",
            "/_matrix/client/v3/logout/all",
            Some(&first),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!((whoami(&first).await, whoami(&second).await), (401, 401));

    // Deactivation by the admin API ends the user's tokens too.
    let (s, v) = login().await;
    assert_eq!(s, 200, "{v}");
    let third = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(whoami(&third).await, 200);
    let user_id = ruma::UserId::parse(user.as_str()).unwrap();
    secta_homeserver::admin::deactivate_user(&b.hs, &user_id).unwrap();
    assert_eq!(whoami(&third).await, 401);
}

#[tokio::test]
async fn invalid_ids_in_paths() {
    let b = new_box();
    let (_, token) = b.register("alice").await;
    assert_err(
        &b.call(
            "GET",
            "/_matrix/client/v3/profile/not-a-user",
            None,
            json!({}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &b.call(
            "GET",
            "/_matrix/client/v3/rooms/not-a-room/messages?dir=b",
            Some(&token),
            json!({}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    let room = b.room(&token).await;
    assert_err(
        &b.call(
            "GET",
            &format!("/_matrix/client/v3/rooms/{}/messages?dir=x", enc(&room)),
            Some(&token),
            json!({}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &b.call(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            Some(&token),
            json!({"user_id": "bob"}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn oversized_event_and_txn_replay_lose_nothing() {
    let b = new_box();
    let (_, token) = b.register("alice").await;
    let room = b.room(&token).await;
    let before = b.event_count(&token, &room).await;
    let send = |txn: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(&room)
        )
    };
    let huge = json!({"msgtype": "m.text", "body": "x".repeat(70 * 1024)});
    assert_err(
        &b.call("PUT", &send("big"), Some(&token), huge).await,
        413,
        "M_TOO_LARGE",
    );
    assert_eq!(
        b.event_count(&token, &room).await,
        before,
        "a refused event must not be stored"
    );

    let (s, first) = b
        .call(
            "PUT",
            &send("t1"),
            Some(&token),
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, again) = b
        .call(
            "PUT",
            &send("t1"),
            Some(&token),
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_eq!(
        (s, &again["event_id"]),
        (200, &first["event_id"]),
        "replay returns the same event"
    );
    // The same id on another endpoint is another transaction (spec v1.7).
    let other = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
        enc(&room)
    )
    .replace("m.room.message", "m.custom");
    let (s, third) = b.call("PUT", &other, Some(&token), json!({"x": 1})).await;
    assert_eq!(s, 200);
    assert_ne!(third["event_id"], first["event_id"]);
    assert_eq!(b.event_count(&token, &room).await, before + 2);
    let redact = |txn: &str| {
        format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/{txn}",
            enc(&room),
            enc(third["event_id"].as_str().unwrap())
        )
    };
    let (s, redaction) = b.call("PUT", &redact("r1"), Some(&token), json!({})).await;
    assert_eq!(s, 200);

    // Retries after a restart still get the same events.
    let Box_ { _dir: dir, hs, app } = b;
    drop(app);
    drop(hs);
    let hs = Hs::open(
        HomeserverConfig {
            server_name: "test.box".into(),
            ..Default::default()
        },
        dir.path(),
    )
    .unwrap();
    let b = Box_ {
        app: hs.router(),
        hs,
        _dir: dir,
    };
    for (path, body, want) in [
        (
            send("t1"),
            json!({"msgtype": "m.text", "body": "hi"}),
            &first,
        ),
        (other.clone(), json!({"x": 1}), &third),
        (redact("r1"), json!({}), &redaction),
    ] {
        let (s, again) = b.call("PUT", &path, Some(&token), body).await;
        assert_eq!((s, &again["event_id"]), (200, &want["event_id"]), "{path}");
    }
    assert_eq!(b.event_count(&token, &room).await, before + 3);
    // A new transaction id is a new event.
    let (s, fresh) = b
        .call("PUT", &send("t2"), Some(&token), json!({"body": "new"}))
        .await;
    assert_eq!(s, 200);
    assert_ne!(fresh["event_id"], first["event_id"]);
}

#[tokio::test]
async fn membership_is_enforced() {
    let b = new_box();
    let (_, alice) = b.register("alice").await;
    let (bob_id, bob) = b.register("bob").await;
    let (s, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({"preset": "private_chat"}),
        )
        .await;
    assert_eq!(s, 200);
    let room = v["room_id"].as_str().unwrap().to_owned();
    let send = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/x",
        enc(&room)
    );
    assert_err(
        &b.call("PUT", &send, Some(&bob), json!({"body": "let me in"}))
            .await,
        403,
        "M_FORBIDDEN",
    );
    assert_err(
        &b.call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            json!({}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    let (s, _) = b
        .call(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            Some(&alice),
            json!({"user_id": bob_id}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = b
        .call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = b
        .call(
            "PUT",
            &send,
            Some(&bob),
            json!({"msgtype": "m.text", "body": "thanks"}),
        )
        .await;
    assert_eq!(s, 200);
    // Bob (power 0) may not kick Alice.
    let kick = format!("/_matrix/client/v3/rooms/{}/kick", enc(&room));
    let alice_id = format!("@alice:{}", b.hs.server_name);
    assert_err(
        &b.call("POST", &kick, Some(&bob), json!({"user_id": alice_id}))
            .await,
        403,
        "M_FORBIDDEN",
    );
}

#[tokio::test]
async fn registration_errors() {
    let b = new_box();
    let reg = |body: Value| b.call("POST", "/_matrix/client/v3/register", None, body);
    assert_err(
        &reg(json!({"username": "Bad Name!", "password": "x"})).await,
        400,
        "M_INVALID_USERNAME",
    );
    b.register("alice").await;
    assert_err(
        &reg(json!({"username": "alice", "password": "x"})).await,
        400,
        "M_USER_IN_USE",
    );
    assert_err(
        &b.call(
            "POST",
            "/_matrix/client/v3/register?kind=guest",
            None,
            json!({}),
        )
        .await,
        403,
        "M_GUEST_ACCESS_FORBIDDEN",
    );
    let (s, v) = reg(json!({"username": "carol", "password": PW})).await;
    assert_eq!(s, 401);
    let session = v["session"].as_str().unwrap();
    let (s, v) = reg(json!({"username": "carol", "password": PW,
        "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}))
    .await;
    assert_eq!(s, 401);
    assert_eq!(v["errcode"], "M_FORBIDDEN");
    // A used-up token no longer works, and says so through the validity endpoint.
    let token = b.hs.admin_create_invite(Some(1), None).unwrap();
    let valid =
        format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={token}");
    assert_eq!(
        b.call("GET", &valid, None, json!({})).await.1["valid"],
        true
    );
    let (s, v) = reg(json!({"username": "dave", "password": PW})).await;
    assert_eq!(s, 401);
    let (s, _) = reg(json!({"username": "dave", "password": PW,
        "auth": {"type": "m.login.registration_token", "token": token, "session": v["session"]}}))
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        b.call("GET", &valid, None, json!({})).await.1["valid"],
        false
    );
    let users = b.hs.admin_list_users().unwrap().len();
    assert_eq!(users, 2, "failed registrations created no users");
}

#[tokio::test]
async fn login_is_rate_limited() {
    let b = new_box_with(HomeserverConfig {
        server_name: "test.box".into(),
        auth_rate_burst: 3,
        auth_rate_per_second: 0.01,
        ..Default::default()
    });
    let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "nobody"}, "password": "x"});
    for _ in 0..3 {
        assert_err(
            &b.call("POST", "/_matrix/client/v3/login", None, body.clone())
                .await,
            403,
            "M_FORBIDDEN",
        );
    }
    let got = b.call("POST", "/_matrix/client/v3/login", None, body).await;
    assert_err(&got, 429, "M_LIMIT_EXCEEDED");
    assert!(got.1["retry_after_ms"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn stored_events_verify_with_ruma() {
    use ruma::{
        signatures::{reference_hash, verify_event, Verified},
        CanonicalJsonObject, RoomVersionId,
    };
    for version in ["10", "11", "12"] {
        let b = new_box();
        let (_, token) = b.register("alice").await;
        let (s, v) = b
            .call(
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(&token),
                json!({"room_version": version}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let room = v["room_id"].as_str().unwrap().to_owned();
        let (s, v) = b
            .call(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/1",
                    enc(&room)
                ),
                Some(&token),
                json!({"msgtype": "m.text", "body": "signed"}),
            )
            .await;
        assert_eq!(s, 200);
        let event_id = v["event_id"].as_str().unwrap().to_owned();
        let stored =
            b.hs.db
                .read(|c| secta_homeserver::pdu::get_event(c, &event_id))
                .unwrap()
                .unwrap();
        let obj: CanonicalJsonObject = serde_json::from_str(&stored.json).unwrap();
        let rules = RoomVersionId::try_from(version).unwrap().rules().unwrap();
        let (key_id, key) = b.hs.verify_key();
        let mut keys = std::collections::BTreeMap::new();
        keys.insert(key_id, ruma::serde::Base64::parse(&key).unwrap());
        let mut map = std::collections::BTreeMap::new();
        map.insert(b.hs.server_name.to_string(), keys);
        assert_eq!(
            verify_event(&map, &obj, &rules).unwrap(),
            Verified::All,
            "room version {version}"
        );
        assert_eq!(
            format!("${}", reference_hash(&obj, &rules).unwrap()),
            event_id
        );
        // Tampering is detected.
        let mut bad = obj.clone();
        bad.insert(
            "origin_server_ts".into(),
            ruma::CanonicalJsonValue::Integer(1u32.into()),
        );
        assert!(
            verify_event(&map, &bad, &rules).is_err()
                || format!("${}", reference_hash(&bad, &rules).unwrap()) != event_id
        );
        let mut bad = obj.clone();
        bad.insert(
            "content".into(),
            serde_json::from_value(json!({"body": "forged"})).unwrap(),
        );
        assert_eq!(
            verify_event(&map, &bad, &rules).unwrap(),
            Verified::Signatures,
            "content hash mismatch is seen"
        );
    }
}

#[tokio::test]
async fn search_finds_russian_word_forms() {
    let b = new_box();
    let (_, token) = b.register("alice").await;
    let room = b.room(&token).await;
    for (i, body) in [
        "Завтра начнутся голосования по бюджету",
        "Радио в эфире",
        "Meeting notes",
    ]
    .iter()
    .enumerate()
    {
        let (s, _) = b
            .call(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{i}",
                    enc(&room)
                ),
                Some(&token),
                json!({"msgtype": "m.text", "body": body}),
            )
            .await;
        assert_eq!(s, 200);
    }
    let search = |term: &str| {
        b.call(
            "POST",
            "/_matrix/client/v3/search",
            Some(&token),
            json!({"search_categories": {"room_events": {"search_term": term}}}),
        )
    };
    let (s, v) = search("голосование").await;
    assert_eq!(s, 200, "{v}");
    let results = v["search_categories"]["room_events"]["results"]
        .as_array()
        .unwrap();
    assert_eq!(results.len(), 1, "{v}");
    assert!(results[0]["result"]["content"]["body"]
        .as_str()
        .unwrap()
        .contains("голосования"));
    let (_, v) = search("meetings").await;
    assert_eq!(v["search_categories"]["room_events"]["count"], 1);
    let (_, v) = search("телевидение").await;
    assert_eq!(v["search_categories"]["room_events"]["count"], 0);
}

async fn search_count(b: &Box_, token: &str, term: &str) -> i64 {
    let (s, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/search",
            Some(token),
            json!({"search_categories": {"room_events": {"search_term": term}}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["search_categories"]["room_events"]["count"]
        .as_i64()
        .unwrap()
}

/// Indexing runs behind the writes: a message redacted before it was indexed
/// is never found, one stored just before a restart is found after it.
#[tokio::test]
async fn search_sees_every_stored_message_across_redactions_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let open = || box_at(dir.path());
    let b = open();
    let (_, token) = b.register("alice").await;
    let room = b.room(&token).await;
    let send = |txn: &str, body: &str| {
        let uri = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(&room)
        );
        let body = json!({"msgtype": "m.text", "body": body});
        let (b, token) = (&b, token.clone());
        async move { b.call("PUT", &uri, Some(&token), body).await }
    };
    let (s, v) = send("1", "секретный пароль от склада").await;
    assert_eq!(s, 200);
    let secret = v["event_id"].as_str().unwrap().to_owned();
    let (s, _) = b
        .redact(&token, &room, &secret, "r1", json!({"reason": "oops"}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        search_count(&b, &token, "пароль").await,
        0,
        "redacted before it was indexed"
    );
    assert_eq!(send("2", "встреча на складе в пятницу").await.0, 200);
    assert_eq!(search_count(&b, &token, "склад").await, 1);
    let (_, v) = send("3", "ещё одна встреча").await;
    let third = v["event_id"].as_str().unwrap().to_owned();
    let (s, _) = b.redact(&token, &room, &third, "r2", json!({})).await;
    assert_eq!(s, 200);
    for i in 0..5 {
        assert_eq!(send(&format!("m{i}"), "радиоэфир в субботу").await.0, 200);
    }
    // Stored, not yet indexed: no search, no housekeeping ran.
    b.hs.db.checkpoint();
    drop(b);
    let b = open();
    let (s, v) = b.login("alice").await;
    assert_eq!(s, 200, "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        search_count(&b, &token, "субботу").await,
        5,
        "indexed after the restart"
    );
    assert_eq!(
        search_count(&b, &token, "встреча").await,
        1,
        "the redacted one is gone"
    );
    assert_eq!(search_count(&b, &token, "пароль").await, 0);
}

#[tokio::test]
async fn incremental_sync_long_polls_and_wakes() {
    let b = new_box();
    let (_, token) = b.register("alice").await;
    let room = b.room(&token).await;
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&token), json!({}))
        .await;
    let since = v["next_batch"].as_str().unwrap().to_owned();
    let b = Arc::new(b);
    let waiter = {
        let b = b.clone();
        let token = token.clone();
        tokio::spawn(async move {
            b.call(
                "GET",
                &format!("/_matrix/client/v3/sync?since={since}&timeout=10000"),
                Some(&token),
                json!({}),
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "nothing new: sync must wait");
    let (s, _) = b
        .call(
            "PUT",
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/w",
                enc(&room)
            ),
            Some(&token),
            json!({"msgtype": "m.text", "body": "wake"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, 200);
    let events = v["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["content"]["body"], "wake");
    assert_eq!(events[0]["unsigned"]["transaction_id"], "w");
}

#[tokio::test]
async fn history_visibility_is_honoured() {
    let b = new_box();
    let (_, alice) = b.register("alice").await;
    let (bob_id, bob) = b.register("bob").await;
    for (hv, bob_sees_early) in [("joined", false), ("shared", true)] {
        let (s, v) = b
            .call(
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(&alice),
                json!({"preset": "public_chat",
                       "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": hv}}]}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let room = v["room_id"].as_str().unwrap().to_owned();
        let send = |txn: &str, body: &str| {
            let url = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/{hv}{txn}",
                enc(&room)
            );
            let body = json!({"msgtype": "m.text", "body": body});
            let b = &b;
            let alice = alice.clone();
            async move { b.call("PUT", &url, Some(&alice), body).await }
        };
        let (_, early) = send("1", "before bob").await;
        let (s, _) = b
            .call(
                "POST",
                &format!("/_matrix/client/v3/join/{}", enc(&room)),
                Some(&bob),
                json!({}),
            )
            .await;
        assert_eq!(s, 200);
        send("2", "after bob").await;
        let (_, v) = b
            .call(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                    enc(&room)
                ),
                Some(&bob),
                json!({}),
            )
            .await;
        let bodies: Vec<&str> = v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str())
            .collect();
        assert!(bodies.contains(&"after bob"), "{hv}: {bodies:?}");
        assert_eq!(
            bodies.contains(&"before bob"),
            bob_sees_early,
            "{hv}: {bodies:?}"
        );
        let got = b
            .call(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/event/{}",
                    enc(&room),
                    enc(early["event_id"].as_str().unwrap())
                ),
                Some(&bob),
                json!({}),
            )
            .await;
        assert_eq!(got.0 == 200, bob_sees_early, "{hv}: {}", got.1);
        let (_, sync) = b
            .call("GET", "/_matrix/client/v3/sync", Some(&bob), json!({}))
            .await;
        let tl: Vec<&str> = sync["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str())
            .collect();
        assert_eq!(
            tl.contains(&"before bob"),
            bob_sees_early,
            "{hv} sync: {tl:?}"
        );
        let _ = &bob_id;
    }
}

#[tokio::test]
async fn presence_costs_nothing_when_off_and_works_when_on() {
    let off = new_box();
    let (alice_id, alice) = off.register("alice").await;
    let (s, _) = off
        .call(
            "PUT",
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id)),
            Some(&alice),
            json!({"presence": "online"}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = off
        .call(
            "GET",
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id)),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(v["presence"], "offline");

    let on = new_box_with(HomeserverConfig {
        server_name: "test.box".into(),
        presence: true,
        ..Default::default()
    });
    let (alice_id, alice) = on.register("alice").await;
    let (_, bob) = on.register("bob").await;
    let room = on.room(&alice).await;
    let (s, _) = on
        .call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = on
        .call(
            "PUT",
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id)),
            Some(&alice),
            json!({"presence": "unavailable", "status_msg": "на радио"}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = on
        .call(
            "GET",
            "/_matrix/client/v3/sync?set_presence=offline",
            Some(&bob),
            json!({}),
        )
        .await;
    let events = v["presence"]["events"].as_array().unwrap();
    let a = events
        .iter()
        .find(|e| e["sender"] == alice_id.as_str())
        .expect("alice's presence in bob's sync");
    assert_eq!(a["content"]["presence"], "unavailable");
    assert_eq!(a["content"]["status_msg"], "на радио");
}

#[tokio::test]
async fn pushers_are_kept_and_removed() {
    let b = new_box();
    let (_, t) = b.register("alice").await;
    let pusher = json!({"pushkey": "k1", "kind": "http", "app_id": "im.vector", "app_display_name": "Element",
        "device_display_name": "phone", "lang": "ru", "data": {"url": "https://push.example/_matrix/push/v1/notify"}});
    assert_eq!(
        b.call(
            "POST",
            "/_matrix/client/v3/pushers/set",
            Some(&t),
            pusher.clone()
        )
        .await
        .0,
        200
    );
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/pushers", Some(&t), json!({}))
        .await;
    assert_eq!(v["pushers"][0]["pushkey"], "k1");
    let mut bad = pusher.clone();
    bad["data"] = json!({});
    assert_err(
        &b.call("POST", "/_matrix/client/v3/pushers/set", Some(&t), bad)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let del = json!({"pushkey": "k1", "kind": null, "app_id": "im.vector"});
    assert_eq!(
        b.call("POST", "/_matrix/client/v3/pushers/set", Some(&t), del)
            .await
            .0,
        200
    );
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/pushers", Some(&t), json!({}))
        .await;
    assert_eq!(v["pushers"].as_array().unwrap().len(), 0);
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        wr.write_image_data(&data).unwrap();
    }
    out
}

/// A tiny PNG that claims to be 30000 × 30000 pixels.
fn png_bomb() -> Vec<u8> {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut enc = png::Encoder::new(file, 30_000, 30_000);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        enc.set_compression(png::Compression::Fast);
        let mut wr = enc.write_header().unwrap().into_stream_writer().unwrap();
        let row = vec![0u8; 30_000 / 8];
        for _ in 0..30_000 {
            wr.write_all(&row).unwrap();
        }
        wr.finish().unwrap();
    }
    std::fs::read(&path).unwrap()
}

impl Box_ {
    async fn upload(&self, token: &str, ctype: &str, body: Vec<u8>) -> (u16, Value) {
        let req = Request::builder()
            .method("POST")
            .uri("/_matrix/media/v3/upload?filename=photo.png")
            .header("content-type", ctype)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get_bytes(&self, uri: &str, token: &str) -> (u16, http::HeaderMap, Vec<u8>) {
        let req = Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, bytes.to_vec())
    }
}

#[tokio::test]
async fn media_upload_download_thumbnail_and_bad_input() {
    let b = new_box_with(HomeserverConfig {
        server_name: "test.box".into(),
        media_max_bytes: 1_000_000,
        ..Default::default()
    });
    let (_, t) = b.register("alice").await;
    let png = png_bytes(400, 300);
    let (s, v) = b.upload(&t, "image/png", png.clone()).await;
    assert_eq!(s, 200, "{v}");
    let uri = v["content_uri"].as_str().unwrap().to_owned();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    let (s, h, body) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/download/test.box/{id}"),
            &t,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(body, png);
    assert_eq!(h["content-type"], "image/png");
    assert!(h["content-disposition"]
        .to_str()
        .unwrap()
        .contains("photo.png"));
    let (s, h, body) = b
        .get_bytes(
            &format!(
                "/_matrix/client/v1/media/thumbnail/test.box/{id}?width=96&height=96&method=crop"
            ),
            &t,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "image/png");
    let thumb = image::load_from_memory(&body).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (96, 96));
    let (s, _, body2) = b
        .get_bytes(
            &format!(
                "/_matrix/client/v1/media/thumbnail/test.box/{id}?width=90&height=90&method=crop"
            ),
            &t,
        )
        .await;
    assert_eq!((s, &body2), (200, &body), "served from the cache");
    let (s, _, body) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/thumbnail/test.box/{id}?width=320&height=240"),
            &t,
        )
        .await;
    assert_eq!(s, 200);
    let thumb = image::load_from_memory(&body).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (320, 240));

    // Authenticated media needs a token.
    let (s, _, _) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/download/test.box/{id}"),
            "bad",
        )
        .await;
    assert_eq!(s, 401);

    let media_files = || walk(&b._dir.path().join("media"));
    let before = media_files();
    // Too large, lying content type: refused, nothing stored.
    assert_err(
        &b.upload(&t, "application/octet-stream", vec![0u8; 1_000_001])
            .await,
        413,
        "M_TOO_LARGE",
    );
    assert_err(
        &b.upload(&t, "image/png", b"GIF89a this is not a png".to_vec())
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(media_files(), before, "refused uploads leave no files");
    // Path traversal and enormous sizes.
    for bad in ["..%2F..%2Fhomeserver.db", "a%2Fb", "%2E%2E"] {
        let (s, _, body) = b
            .get_bytes(
                &format!("/_matrix/client/v1/media/download/test.box/{bad}"),
                &t,
            )
            .await;
        assert!(s == 400 || s == 404, "{bad}: {s}");
        assert!(!String::from_utf8_lossy(&body).contains("SQLite"), "{bad}");
    }
    let (s, _, _) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/thumbnail/test.box/{id}?width=100000&height=100000"),
            &t,
        )
        .await;
    assert_eq!(s, 400);
    // A decompression bomb is refused without decoding it.
    let bomb = png_bomb();
    assert!(bomb.len() < 1_000_000, "bomb is {} bytes", bomb.len());
    let (s, v) = b.upload(&t, "image/png", bomb).await;
    assert_eq!(s, 200, "{v}");
    let bomb_id = v["content_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let req = Request::builder()
        .uri(format!(
            "/_matrix/client/v1/media/thumbnail/test.box/{bomb_id}?width=96&height=96&method=crop"
        ))
        .header("authorization", format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let resp = b.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    // Config.
    let (_, v) = b
        .call(
            "GET",
            "/_matrix/client/v1/media/config",
            Some(&t),
            json!({}),
        )
        .await;
    assert_eq!(v["m.upload.size"], 1_000_000);
}

#[tokio::test]
async fn async_media_upload() {
    let b = new_box();
    let (_, t) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let (s, v) = b
        .call("POST", "/_matrix/media/v1/create", Some(&t), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["content_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let (s, _, _) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/download/test.box/{id}?timeout_ms=0"),
            &t,
        )
        .await;
    assert_eq!(s, 504);
    let put = |token: &str| {
        Request::builder()
            .method("PUT")
            .uri(format!(
                "/_matrix/media/v3/upload/test.box/{id}?filename=a.txt"
            ))
            .header("content-type", "text/plain")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from("hello"))
            .unwrap()
    };
    assert_eq!(
        b.app
            .clone()
            .oneshot(put(&bob))
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        b.app
            .clone()
            .oneshot(put(&t))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        b.app
            .clone()
            .oneshot(put(&t))
            .await
            .unwrap()
            .status()
            .as_u16(),
        409
    );
    let (s, _, body) = b
        .get_bytes(
            &format!("/_matrix/client/v1/media/download/test.box/{id}"),
            &t,
        )
        .await;
    assert_eq!((s, body.as_slice()), (200, b"hello".as_slice()));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn push_rules_drive_unread_and_highlight_counts() {
    let b = new_box();
    let (alice_id, alice) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let room = b.room(&alice).await;
    assert_eq!(
        b.call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            json!({})
        )
        .await
        .0,
        200
    );
    let send = |txn: &str, content: Value| {
        let url = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(&room)
        );
        let bob = bob.clone();
        let b = &b;
        async move { b.call("PUT", &url, Some(&bob), content).await }
    };
    send("1", json!({"msgtype": "m.text", "body": "hello all"})).await;
    let (_, mention) = send(
        "2",
        json!({"msgtype": "m.text", "body": "alice, look", "m.mentions": {"user_ids": [alice_id]}}),
    )
    .await;
    let counts = |v: &Value| {
        let r = &v["rooms"]["join"][&room]["unread_notifications"];
        (
            r["notification_count"].as_i64().unwrap(),
            r["highlight_count"].as_i64().unwrap(),
        )
    };
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    assert_eq!(
        counts(&v),
        (2, 1),
        "{}",
        v["rooms"]["join"][&room]["unread_notifications"]
    );
    let (_, n) = b
        .call(
            "GET",
            "/_matrix/client/v3/notifications?only=highlight",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(n["notifications"].as_array().unwrap().len(), 1);
    assert_eq!(
        n["notifications"][0]["event"]["event_id"],
        mention["event_id"]
    );
    // A mute rule for the room silences new messages.
    let (s, _) = b
        .call(
            "PUT",
            &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)),
            Some(&alice),
            json!({"actions": []}),
        )
        .await;
    assert_eq!(s, 200);
    send("3", json!({"msgtype": "m.text", "body": "quiet"})).await;
    // Reading the mention clears both counts.
    let rec = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        enc(&room),
        enc(mention["event_id"].as_str().unwrap())
    );
    assert_eq!(b.call("POST", &rec, Some(&alice), json!({})).await.0, 200);
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    assert_eq!(counts(&v), (0, 0));
    // Unmuted: new messages count again, on top of the (cached) earlier count.
    let (s, _) = b
        .call(
            "DELETE",
            &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    send(
        "4",
        json!({"msgtype": "m.text", "body": "hi again", "m.mentions": {"user_ids": [alice_id]}}),
    )
    .await;
    let next = v["next_batch"].as_str().unwrap().to_owned();
    let (_, v) = b
        .call(
            "GET",
            &format!("/_matrix/client/v3/sync?since={next}"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(counts(&v), (1, 1), "{}", v["rooms"]["join"][&room]);
    // A member who joins after the room's members were cached is notified at once.
    let (carol_id, carol) = b.register("carol").await;
    assert_eq!(
        b.call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&carol),
            json!({})
        )
        .await
        .0,
        200
    );
    send("5", json!({"msgtype": "m.text", "body": "welcome"})).await;
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&carol), json!({}))
        .await;
    assert_eq!(counts(&v), (1, 0), "{}", v["rooms"]["join"][&room]);
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    assert_eq!(counts(&v), (2, 1));
    // Both have the default rules; a mention of one highlights for her only.
    send(
        "6",
        json!({"msgtype": "m.text", "body": "carol?", "m.mentions": {"user_ids": [carol_id]}}),
    )
    .await;
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&carol), json!({}))
        .await;
    assert_eq!(counts(&v), (2, 1));
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    assert_eq!(counts(&v), (3, 1));
    // Her own message marks the room read.
    let url = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/own1",
        enc(&room)
    );
    let (s, _) = b
        .call(
            "PUT",
            &url,
            Some(&alice),
            json!({"msgtype": "m.text", "body": "да"}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    assert_eq!(counts(&v), (0, 0));
    // The same through incremental syncs (counted on from the cached count):
    // bob's message counts, her own starts the count over.
    let sync_since = |v: &Value| {
        let url = format!(
            "/_matrix/client/v3/sync?since={}",
            v["next_batch"].as_str().unwrap()
        );
        let alice = alice.clone();
        let b = &b;
        async move { b.call("GET", &url, Some(&alice), json!({})).await.1 }
    };
    send("7", json!({"msgtype": "m.text", "body": "and me"})).await;
    let v = sync_since(&v).await;
    assert_eq!(counts(&v), (1, 0), "{}", v["rooms"]["join"][&room]);
    let own2 = url.replace("own1", "own2");
    let body = json!({"msgtype": "m.text", "body": "I am here"});
    assert_eq!(b.call("PUT", &own2, Some(&alice), body).await.0, 200);
    let v = sync_since(&v).await;
    assert_eq!(counts(&v), (0, 0), "{}", v["rooms"]["join"][&room]);
    send("8", json!({"msgtype": "m.text", "body": "again"})).await;
    let v = sync_since(&v).await;
    assert_eq!(counts(&v), (1, 0), "{}", v["rooms"]["join"][&room]);
}

#[tokio::test]
async fn sliding_sync_lists_rooms_invites_and_updates() {
    let dir = tempfile::tempdir().unwrap();
    let b = box_at(dir.path());
    let (alice_id, alice) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let mut rooms = Vec::new();
    for i in 0..3 {
        let (s, v) = b
            .call(
                "POST",
                "/_matrix/client/v3/createRoom",
                Some(&bob),
                json!({"preset": "public_chat", "name": format!("room {i}")}),
            )
            .await;
        assert_eq!(s, 200);
        let r = v["room_id"].as_str().unwrap().to_owned();
        assert_eq!(
            b.call(
                "POST",
                &format!("/_matrix/client/v3/join/{}", enc(&r)),
                Some(&alice),
                json!({})
            )
            .await
            .0,
            200
        );
        rooms.push(r);
    }
    let (_, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(&bob),
            json!({"preset": "private_chat", "invite": [alice_id], "is_direct": true}),
        )
        .await;
    let invite_room = v["room_id"].as_str().unwrap().to_owned();
    let ss = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let body = json!({
        "conn_id": "room-list",
        "lists": {
            "all": {"ranges": [[0, 1]], "timeline_limit": 1, "required_state": [["m.room.name", ""], ["m.room.member", "$ME"]]},
            "invites": {"ranges": [[0, 10]], "timeline_limit": 0, "filters": {"is_invite": true}}
        },
        "extensions": {"e2ee": {"enabled": true}, "to_device": {"enabled": true}, "account_data": {"enabled": true}}
    });
    let (s, v) = b.call("POST", ss, Some(&alice), body.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["lists"]["all"]["count"], 4);
    assert_eq!(v["lists"]["invites"]["count"], 1);
    let got = v["rooms"].as_object().unwrap();
    assert!(got.contains_key(&invite_room), "invites are listed");
    assert!(got[&invite_room]["invite_state"].is_array());
    assert_eq!(got[&invite_room]["is_dm"], true);
    // The two most recent joined rooms (plus the invite) are in range.
    assert!(
        got.contains_key(&rooms[2]) && !got.contains_key(&rooms[0]),
        "{:?}",
        got.keys()
    );
    assert_eq!(got[&rooms[2]]["name"], "room 2");
    assert_eq!(got[&rooms[2]]["initial"], true);
    assert_eq!(got[&rooms[2]]["timeline"].as_array().unwrap().len(), 1);
    assert!(got[&rooms[2]]["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.name"));
    assert!(v["extensions"]["e2ee"]["device_one_time_keys_count"].is_object());
    let pos = v["pos"].as_str().unwrap().to_owned();

    // A message in the oldest room bumps it into range.
    let url = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/m1",
        enc(&rooms[0])
    );
    assert_eq!(
        b.call(
            "PUT",
            &url,
            Some(&bob),
            json!({"msgtype": "m.text", "body": "bump"})
        )
        .await
        .0,
        200
    );

    // The pos survives a restart of the server.
    drop(b);
    let b = box_at(dir.path());
    let (s, v) = b
        .call(
            "POST",
            &format!("{ss}?pos={pos}&timeout=0"),
            Some(&alice),
            body.clone(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let r0 = &v["rooms"][&rooms[0]];
    assert_eq!(r0["initial"], true, "newly in range: {v}");
    assert_eq!(r0["timeline"][0]["content"]["body"], "bump");
    assert_eq!(r0["notification_count"], 1);
    assert!(
        v["rooms"].get(&rooms[2]).is_none(),
        "unchanged rooms are not repeated"
    );
    let pos2 = v["pos"].as_str().unwrap().to_owned();
    // Nothing new: an empty answer after the timeout.
    let (s, v) = b
        .call(
            "POST",
            &format!("{ss}?pos={pos2}&timeout=50"),
            Some(&alice),
            body.clone(),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["rooms"].as_object().unwrap().len(), 0, "{v}");
    // Unknown positions are refused with the errcode clients reset on.
    assert_err(
        &b.call("POST", &format!("{ss}?pos=999"), Some(&alice), body)
            .await,
        400,
        "M_UNKNOWN_POS",
    );
}

#[tokio::test]
async fn notifications_reach_an_http_push_gateway() {
    // A push gateway on loopback that records what it receives.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let gateway = axum::Router::new().route(
        "/_matrix/push/v1/notify",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                axum::Json(json!({ "rejected": [] }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, gateway).await.unwrap() });

    let b = new_box();
    let (trigger, shutdown) = secta_runtime::Shutdown::new();
    b.hs.start_background(shutdown);
    let (_, alice) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let room = b.room(&alice).await;
    assert_eq!(
        b.call(
            "POST",
            &format!("/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            json!({})
        )
        .await
        .0,
        200
    );
    let pusher = json!({"pushkey": "phone-1", "kind": "http", "app_id": "org.secta.test", "app_display_name": "Test",
        "device_display_name": "phone", "lang": "ru", "data": {"url": format!("http://127.0.0.1:{port}/_matrix/push/v1/notify")}});
    assert_eq!(
        b.call(
            "POST",
            "/_matrix/client/v3/pushers/set",
            Some(&alice),
            pusher
        )
        .await
        .0,
        200
    );
    let bad = json!({"pushkey": "k", "kind": "http", "app_id": "x", "app_display_name": "x", "device_display_name": "x",
        "lang": "ru", "data": {"url": format!("http://127.0.0.1:{port}/_synapse/admin/v1/register")}});
    assert_err(
        &b.call("POST", "/_matrix/client/v3/pushers/set", Some(&alice), bad)
            .await,
        400,
        "M_INVALID_PARAM",
    );
    let (s, sent) = b
        .call(
            "PUT",
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/p1",
                enc(&room)
            ),
            Some(&bob),
            json!({"msgtype": "m.text", "body": "привет"}),
        )
        .await;
    assert_eq!(s, 200);
    let got = tokio::time::timeout(std::time::Duration::from_secs(15), rx.recv())
        .await
        .expect("gateway got nothing")
        .unwrap();
    let n = &got["notification"];
    assert_eq!(n["event_id"], sent["event_id"]);
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["devices"][0]["pushkey"], "phone-1");
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["content"]["body"], "привет");
    trigger.trigger();
}

#[tokio::test]
async fn rotated_signing_keys_still_verify_old_events() {
    use ruma::{signatures::verify_event, CanonicalJsonObject, RoomVersionId};
    let dir = tempfile::tempdir().unwrap();
    let config = HomeserverConfig {
        server_name: "test.box".into(),
        ..Default::default()
    };
    let (event_id, old_id) = {
        let hs = Hs::open(config.clone(), dir.path()).unwrap();
        let b = Box_ {
            _dir: tempfile::tempdir().unwrap(),
            app: hs.router(),
            hs,
        };
        let (_, t) = b.register("alice").await;
        let room = b.room(&t).await;
        let (_, v) = b
            .call(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/1",
                    enc(&room)
                ),
                Some(&t),
                json!({"body": "old"}),
            )
            .await;
        (
            v["event_id"].as_str().unwrap().to_owned(),
            b.hs.verify_key().0,
        )
    };
    let new_id = secta_homeserver::rotate_signing_key(dir.path(), None).unwrap();
    assert_ne!(new_id, old_id);
    let hs = Hs::open(config, dir.path()).unwrap();
    let b = Box_ {
        _dir: tempfile::tempdir().unwrap(),
        app: hs.router(),
        hs,
    };
    let (s, keys) = b
        .call("GET", "/_matrix/key/v2/server", None, json!({}))
        .await;
    assert_eq!(s, 200);
    assert!(keys["verify_keys"].get(&new_id).is_some());
    let old = &keys["old_verify_keys"][&old_id];
    assert!(old["expired_ts"].is_u64(), "{keys}");
    // The old event verifies with the published old key.
    let stored =
        b.hs.db
            .read(|c| secta_homeserver::pdu::get_event(c, &event_id))
            .unwrap()
            .unwrap();
    let obj: CanonicalJsonObject = serde_json::from_str(&stored.json).unwrap();
    let mut set = std::collections::BTreeMap::new();
    set.insert(
        old_id,
        ruma::serde::Base64::parse(old["key"].as_str().unwrap()).unwrap(),
    );
    let map = std::collections::BTreeMap::from([("test.box".to_owned(), set)]);
    let rules = RoomVersionId::V12.rules().unwrap();
    assert!(verify_event(&map, &obj, &rules).is_ok());
}

#[tokio::test]
async fn admin_registration_token_api() {
    let b = new_box();
    b.hs.admin_create_user("boss", "pw", true).unwrap();
    let (s, v) = b
        .call("POST", "/_matrix/client/v3/login", None, json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "boss"}, "password": "pw"}))
        .await;
    assert_eq!(s, 200);
    let admin = v["access_token"].as_str().unwrap().to_owned();
    let (_, member) = b.register("alice").await;
    let api = "/_synapse/admin/v1/registration_tokens";
    assert_err(
        &b.call("GET", api, Some(&member), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let (s, t) = b
        .call(
            "POST",
            &format!("{api}/new"),
            Some(&admin),
            json!({"token": "welcome-2026", "uses_allowed": 1}),
        )
        .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        (
            t["token"].as_str(),
            t["uses_allowed"].as_i64(),
            t["completed"].as_i64()
        ),
        (Some("welcome-2026"), Some(1), Some(0))
    );
    assert_err(
        &b.call(
            "POST",
            &format!("{api}/new"),
            Some(&admin),
            json!({"token": "welcome-2026"}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_err(
        &b.call(
            "POST",
            &format!("{api}/new"),
            Some(&admin),
            json!({"uses_allowed": -1}),
        )
        .await,
        400,
        "M_INVALID_PARAM",
    );
    // The token works for registration, then counts as used.
    let (s, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            json!({"username": "bob", "password": PW}),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = b
        .call("POST", "/_matrix/client/v3/register", None, json!({"username": "bob", "password": PW,
            "auth": {"type": "m.login.registration_token", "token": "welcome-2026", "session": v["session"]}}))
        .await;
    assert_eq!(s, 200);
    let (_, list) = b
        .call(
            "GET",
            &format!("{api}?valid=false"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert!(
        list["registration_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["token"] == "welcome-2026" && t["completed"] == 1),
        "{list}"
    );
    let (s, t) = b
        .call(
            "PUT",
            &format!("{api}/welcome-2026"),
            Some(&admin),
            json!({"uses_allowed": 5}),
        )
        .await;
    assert_eq!((s, t["uses_allowed"].as_i64()), (200, Some(5)));
    assert_eq!(
        b.call(
            "DELETE",
            &format!("{api}/welcome-2026"),
            Some(&admin),
            json!({})
        )
        .await
        .0,
        200
    );
    assert_err(
        &b.call(
            "GET",
            &format!("{api}/welcome-2026"),
            Some(&admin),
            json!({}),
        )
        .await,
        404,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn account_data_reaches_incremental_sync_once() {
    let b = new_box();
    let (alice_id, alice) = b.register("alice").await;
    let room = b.room(&alice).await;
    let (_, v) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    let since = v["next_batch"].as_str().unwrap().to_owned();
    let (s, _) = b
        .call(
            "PUT",
            &format!(
                "/_matrix/client/v3/user/{}/account_data/org.example.settings",
                enc(&alice_id)
            ),
            Some(&alice),
            json!({"theme": "dark"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = b
        .call(
            "PUT",
            &format!(
                "/_matrix/client/v3/user/{}/rooms/{}/account_data/org.example.tag",
                enc(&alice_id),
                enc(&room)
            ),
            Some(&alice),
            json!({"pinned": true}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = b
        .call(
            "GET",
            &format!("/_matrix/client/v3/sync?since={since}"),
            Some(&alice),
            json!({}),
        )
        .await;
    let global = v["account_data"]["events"].as_array().unwrap();
    assert!(
        global
            .iter()
            .any(|e| e["type"] == "org.example.settings" && e["content"]["theme"] == "dark"),
        "{v}"
    );
    let in_room = v["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .unwrap();
    assert!(
        in_room.iter().any(|e| e["type"] == "org.example.tag"),
        "{v}"
    );
    // Nothing new: the next incremental sync carries neither.
    let next = v["next_batch"].as_str().unwrap().to_owned();
    let (_, v) = b
        .call(
            "GET",
            &format!("/_matrix/client/v3/sync?since={next}&timeout=0"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert!(
        v["account_data"]["events"].as_array().unwrap().is_empty(),
        "{v}"
    );
    assert!(v["rooms"]["join"].get(&room).is_none(), "{v}");
}

/// Federation input from peers: a real peer (its key pinned in the peer table)
/// joins a room and talks; forged signatures, tampered content, forged
/// senders, a server not in the room, bad X-Matrix headers, malformed JSON and
/// oversized transactions are refused, and nothing of them reaches a client.
/// `/.well-known/matrix/server` says where federation for this server name
/// goes: the configured delegation, else the name itself when it has a port,
/// else its host on the federation TLS port (443 without a TLS listener).
#[tokio::test]
async fn well_known_server_delegation() {
    use secta_homeserver::config::FederationConfig;
    let cases = [
        ("box.test", None, None, "box.test:443"),
        ("box.test", Some("0.0.0.0:8448"), None, "box.test:8448"),
        ("box.test:8449", Some("0.0.0.0:8448"), None, "box.test:8449"),
        (
            "box.test",
            Some("0.0.0.0:8448"),
            Some("matrix.box.test"),
            "matrix.box.test",
        ),
    ];
    for (name, tls, delegated, want) in cases {
        let b = new_box_with(HomeserverConfig {
            server_name: name.into(),
            federation: FederationConfig {
                tls_listen: tls.map(str::to_owned),
                well_known_server: delegated.map(str::to_owned),
                ..Default::default()
            },
            ..Default::default()
        });
        let (s, v) = b
            .call("GET", "/.well-known/matrix/server", None, json!({}))
            .await;
        assert_eq!((s, v["m.server"].as_str()), (200, Some(want)), "{name}");
    }
    // A delegation that is no server name is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let bad = HomeserverConfig {
        federation: FederationConfig {
            well_known_server: Some("not a name".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = Hs::open(bad, dir.path()).err().expect("refused");
    assert!(format!("{err:#}").contains("well_known_server"), "{err:#}");
}

mod federation_input {
    use super::*;
    use ruma::{
        api::federation::authentication::{XMatrix, XMatrixSigningInput},
        serde::Base64,
        signatures::{hash_and_sign_event, reference_hash, Ed25519KeyPair},
        CanonicalJsonObject, RoomVersionId, ServerName,
    };
    use secta_homeserver::config::{FederationConfig, Peer};

    fn keypair(version: &str) -> (Ed25519KeyPair, String) {
        let der = Ed25519KeyPair::generate();
        let kp = Ed25519KeyPair::from_der(&der, version.into()).unwrap();
        let public =
            Base64::<ruma::serde::base64::Standard>::new(kp.public_key().to_vec()).encode();
        (kp, public)
    }

    fn peer(name: &str, public: &str) -> Peer {
        Peer {
            server_name: name.into(),
            url: "https://127.0.0.1:9".into(),
            pinned_key: Some(("ed25519:k1".into(), public.into())),
            accept_self_signed: false,
        }
    }

    /// The box `test.box` knowing these peers.
    fn fed_box(peers: Vec<Peer>) -> Box_ {
        new_box_with(HomeserverConfig {
            server_name: "test.box".into(),
            federation: FederationConfig {
                peers,
                ..Default::default()
            },
            ..Default::default()
        })
    }

    /// A PDU hashed and signed by `origin` with `kp`; returns (event id, JSON).
    fn sign_pdu(kp: &Ed25519KeyPair, origin: &str, v: Value) -> (String, Value) {
        let rules = RoomVersionId::V11.rules().unwrap();
        let mut obj: CanonicalJsonObject = serde_json::from_value(v).unwrap();
        hash_and_sign_event(origin, kp, &mut obj, &rules.redaction).unwrap();
        let id = format!("${}", reference_hash(&obj, &rules).unwrap());
        (id, serde_json::to_value(obj).unwrap())
    }

    impl Box_ {
        /// A federation request from `origin` to `dest`, X-Matrix signed with `kp`
        /// over `signed` (the body sent is `sent`, normally the same bytes).
        #[allow(clippy::too_many_arguments)]
        async fn fed_raw(
            &self,
            kp: Option<&Ed25519KeyPair>,
            origin: &str,
            dest: &str,
            method: &str,
            uri: &str,
            signed: Vec<u8>,
            sent: Vec<u8>,
        ) -> (u16, Value) {
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json");
            if let Some(kp) = kp {
                let to_sign = http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(signed)
                    .unwrap();
                let x = XMatrix::sign_http_request(
                    &to_sign,
                    XMatrixSigningInput::new(
                        ServerName::parse(origin).unwrap(),
                        ServerName::parse(dest).unwrap(),
                        kp,
                    ),
                )
                .unwrap();
                req = req.header("authorization", http::HeaderValue::from(&x));
            }
            self.send(req.body(Body::from(sent)).unwrap()).await
        }

        async fn fed(
            &self,
            kp: &Ed25519KeyPair,
            origin: &str,
            method: &str,
            uri: &str,
            body: Option<Value>,
        ) -> (u16, Value) {
            let b = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
            self.fed_raw(Some(kp), origin, "test.box", method, uri, b.clone(), b)
                .await
        }
    }

    /// A public room (v11) made by alice on the box, and mallory of good.test
    /// joined to it through make_join/send_join.
    struct Joined {
        tok: String,
        room: String,
        join_id: String,
        join: Value,
        create: String,
        pl: String,
        join_rules: String,
    }

    impl Box_ {
        async fn room_with_mallory(&self, good: &Ed25519KeyPair) -> Joined {
            let b = self;
            let (_alice, tok) = b.register("alice").await;
            let (s, v) = b
                .call(
                    "POST",
                    "/_matrix/client/v3/createRoom",
                    Some(&tok),
                    json!({"preset": "public_chat", "room_version": "11"}),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            let room = v["room_id"].as_str().unwrap().to_owned();

            // mallory on good.test joins through make_join / send_join.
            let mallory = "@mallory:good.test";
            let (s, made) = b
                .fed(
                    &good,
                    "good.test",
                    "GET",
                    &format!(
                        "/_matrix/federation/v1/make_join/{}/{}?ver=11",
                        enc(&room),
                        enc(mallory)
                    ),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{made}");
            let mut tpl = made["event"].clone();
            tpl["origin_server_ts"] = json!(1_700_000_000_000u64);
            let (join_id, join) = sign_pdu(&good, "good.test", tpl);
            let (s, v) = b
                .fed(
                    &good,
                    "good.test",
                    "PUT",
                    &format!(
                        "/_matrix/federation/v2/send_join/{}/{}",
                        enc(&room),
                        enc(&join_id)
                    ),
                    Some(join.clone()),
                )
                .await;
            assert_eq!(s, 200, "{v}");

            let (_, state) = b
                .call(
                    "GET",
                    &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
                    Some(&tok),
                    json!({}),
                )
                .await;
            let id_of = |t: &str| -> String {
                state
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["type"] == t)
                    .unwrap()["event_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            };
            let (create, pl) = (id_of("m.room.create"), id_of("m.room.power_levels"));
            Joined {
                tok,
                room,
                join_id,
                join,
                create,
                pl,
                join_rules: id_of("m.room.join_rules"),
            }
        }
    }

    fn enc(s: &str) -> String {
        s.replace('!', "%21")
            .replace(':', "%3A")
            .replace('$', "%24")
            .replace('@', "%40")
    }

    #[tokio::test]
    async fn forged_and_malformed_federation_input_is_refused() {
        let (good, good_pub) = keypair("k1");
        let (other, other_pub) = keypair("k1");
        // Same key id as good.test's, different key: a forgery.
        let (forger, _) = keypair("k1");
        let b = fed_box(vec![
            peer("good.test", &good_pub),
            peer("other.test", &other_pub),
        ]);
        let Joined {
            tok,
            room,
            join_id,
            join,
            create,
            pl,
            ..
        } = b.room_with_mallory(&good).await;
        let mallory = "@mallory:good.test";
        let depth = join["depth"].as_u64().unwrap();
        let message = |sender: &str, body: &str, auth: Vec<String>, n: u64| {
            json!({
                "type": "m.room.message", "room_id": room, "sender": sender,
                "content": {"msgtype": "m.text", "body": body},
                "origin_server_ts": 1_700_000_000_000u64 + n, "depth": depth + n,
                "prev_events": [join_id], "auth_events": auth,
            })
        };
        let member_auth = vec![create.clone(), pl.clone(), join_id.clone()];
        let send = |txn: &str, pdus: Vec<Value>| {
            let body = json!({"origin": "good.test", "origin_server_ts": 1, "pdus": pdus});
            (format!("/_matrix/federation/v1/send/{txn}"), body)
        };

        // A real message is taken in (the control: the checks below can fail).
        let (ok_id, ok) = sign_pdu(
            &good,
            "good.test",
            message(mallory, "честное сообщение", member_auth.clone(), 1),
        );
        let (uri, body) = send("t1", vec![ok]);
        let (s, v) = b.fed(&good, "good.test", "PUT", &uri, Some(body)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["pdus"][&ok_id], json!({}), "{v}");

        // Forged signature: signed with another key under good.test's key id.
        let (forged_id, forged) = sign_pdu(
            &forger,
            "good.test",
            message(mallory, "подделка", member_auth.clone(), 2),
        );
        // Forged sender: a local user's name on an event good.test signed.
        let (fake_local_id, fake_local) = sign_pdu(
            &good,
            "good.test",
            message(
                "@alice:test.box",
                "я не alice",
                vec![create.clone(), pl.clone()],
                3,
            ),
        );
        // Tampered after signing: the content hash no longer matches.
        let (_, mut tampered) = sign_pdu(
            &good,
            "good.test",
            message(mallory, "до правки", member_auth.clone(), 4),
        );
        tampered["content"]["body"] = json!("после правки");
        let (uri, body) = send("t3", vec![forged, fake_local, tampered]);
        let (s, v) = b.fed(&good, "good.test", "PUT", &uri, Some(body)).await;
        assert_eq!(s, 200, "{v}");
        assert!(
            v["pdus"][&forged_id]["error"].is_string(),
            "forged signature: {v}"
        );
        assert!(
            v["pdus"][&fake_local_id]["error"].is_string(),
            "forged sender: {v}"
        );

        // A server none of whose users are in the room cannot post to it.
        let (stranger_id, stranger) = sign_pdu(
            &other,
            "other.test",
            message(
                "@eve:other.test",
                "чужак",
                vec![create.clone(), pl.clone()],
                5,
            ),
        );
        let body = json!({"origin": "other.test", "origin_server_ts": 1, "pdus": [stranger]});
        let (s, v) = b
            .fed(
                &other,
                "other.test",
                "PUT",
                "/_matrix/federation/v1/send/o1",
                Some(body),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert!(
            v["pdus"][&stranger_id]["error"].is_string(),
            "server not in the room: {v}"
        );

        // Bad requests: no X-Matrix, wrong destination, a body other than the
        // one signed, malformed JSON, too many PDUs.
        let body = br#"{"origin":"good.test","pdus":[]}"#.to_vec();
        let altered = br#"{"origin":"good.test","pdus":[{}]}"#.to_vec();
        let cases: [(
            &str,
            Option<&Ed25519KeyPair>,
            &str,
            Vec<u8>,
            Vec<u8>,
            u16,
            &str,
        ); 4] = [
            (
                "no X-Matrix",
                None,
                "test.box",
                vec![],
                body.clone(),
                401,
                "M_UNAUTHORIZED",
            ),
            (
                "wrong destination",
                Some(&good),
                "elsewhere.test",
                body.clone(),
                body.clone(),
                401,
                "M_UNAUTHORIZED",
            ),
            (
                "altered body",
                Some(&good),
                "test.box",
                body.clone(),
                altered,
                401,
                "M_UNAUTHORIZED",
            ),
            (
                "malformed JSON",
                Some(&good),
                "test.box",
                b"{}".to_vec(),
                b"{not json".to_vec(),
                400,
                "M_NOT_JSON",
            ),
        ];
        for (i, (what, kp, dest, signed, sent, status, errcode)) in cases.into_iter().enumerate() {
            let uri = format!("/_matrix/federation/v1/send/x{i}");
            let (s, v) = b
                .fed_raw(kp, "good.test", dest, "PUT", &uri, signed, sent)
                .await;
            assert_eq!(
                (s, v["errcode"].as_str()),
                (status, Some(errcode)),
                "{what}: {v}"
            );
        }
        let many: Vec<Value> = (0..51).map(|_| json!({})).collect();
        let (s, v) = b
            .fed(
                &good,
                "good.test",
                "PUT",
                "/_matrix/federation/v1/send/x5",
                Some(json!({"origin": "good.test", "pdus": many})),
            )
            .await;
        assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");

        // What alice sees: the real message, none of the forgeries.
        let (s, v) = b
            .call(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                    enc(&room)
                ),
                Some(&tok),
                json!({}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let bodies: Vec<&str> = v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str())
            .collect();
        assert!(bodies.contains(&"честное сообщение"), "{bodies:?}");
        for bad in [
            "подделка",
            "я не alice",
            "после правки",
            "до правки",
            "чужак",
        ] {
            assert!(
                !bodies.contains(&bad),
                "{bad:?} reached a client: {bodies:?}"
            );
        }
        for id in [&forged_id, &fake_local_id, &stranger_id] {
            let (s, _) = b
                .call(
                    "GET",
                    &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id)),
                    Some(&tok),
                    json!({}),
                )
                .await;
            assert_eq!(s, 404, "{id} is visible to clients");
        }
        // A rejected event is not served to other servers either; an accepted one is.
        for (id, want) in [(&stranger_id, 404), (&ok_id, 200)] {
            let uri = format!("/_matrix/federation/v1/event/{}", enc(id));
            let (s, v) = b.fed(&good, "good.test", "GET", &uri, None).await;
            assert_eq!(s, want, "federation /event of {id}: {v}");
        }
    }

    /// With more forward extremities than an event may cite (20), a local
    /// event's state is the resolution of the ones it cites — what other
    /// servers compute from its prev_events — while the room's current state
    /// still resolves over all of them.
    #[tokio::test]
    async fn an_event_citing_20_of_21_extremities_has_their_state() {
        let (good, good_pub) = keypair("k1");
        let b = fed_box(vec![peer("good.test", &good_pub)]);
        let Joined {
            tok,
            room,
            join_id,
            join,
            create,
            pl,
            join_rules,
        } = b.room_with_mallory(&good).await;
        let mallory = "@mallory:good.test";
        let depth = join["depth"].as_u64().unwrap();
        // 21 forks off mallory's join: a new display name (the lowest, so not
        // cited) and 20 messages.
        let (rename_id, rename) = sign_pdu(
            &good,
            "good.test",
            json!({
                "type": "m.room.member", "state_key": mallory, "room_id": room, "sender": mallory,
                "content": {"membership": "join", "displayname": "Новое имя"},
                "origin_server_ts": 1_700_000_000_001u64, "depth": depth + 1,
                "prev_events": [join_id], "auth_events": [create, pl, join_id, join_rules],
            }),
        );
        let mut pdus = vec![rename];
        for i in 0..20u64 {
            pdus.push(
                sign_pdu(
                    &good,
                    "good.test",
                    json!({
                        "type": "m.room.message", "room_id": room, "sender": mallory,
                        "content": {"msgtype": "m.text", "body": format!("ветка {i}")},
                        "origin_server_ts": 1_700_000_000_100u64 + i, "depth": depth + 5,
                        "prev_events": [join_id], "auth_events": [create, pl, join_id],
                    }),
                )
                .1,
            );
        }
        let body = json!({"origin": "good.test", "origin_server_ts": 1, "pdus": pdus});
        let (s, v) = b
            .fed(
                &good,
                "good.test",
                "PUT",
                "/_matrix/federation/v1/send/f1",
                Some(body),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert!(
            v["pdus"]
                .as_object()
                .unwrap()
                .values()
                .all(|r| r == &json!({})),
            "{v}"
        );
        let (s, v) = b
            .call(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
                    enc(&room)
                ),
                Some(&tok),
                json!({"msgtype": "m.text", "body": "всем ветвям"}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let ev_id = v["event_id"].as_str().unwrap().to_owned();
        let (s, v) = b
            .fed(
                &good,
                "good.test",
                "GET",
                &format!("/_matrix/federation/v1/event/{}", enc(&ev_id)),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let prevs = v["pdus"][0]["prev_events"].as_array().unwrap().clone();
        assert_eq!(prevs.len(), 20, "{prevs:?}");
        assert!(!prevs.contains(&json!(rename_id)), "{prevs:?}");
        // The state before it (served to other servers) is that of the cited
        // forks: mallory's join, not his rename.
        let (s, v) = b
            .fed(
                &good,
                "good.test",
                "GET",
                &format!(
                    "/_matrix/federation/v1/state_ids/{}?event_id={}",
                    enc(&room),
                    enc(&ev_id)
                ),
                None,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let ids = v["pdu_ids"].as_array().unwrap();
        assert!(
            ids.contains(&json!(join_id)) && !ids.contains(&json!(rename_id)),
            "{v}"
        );
        // The room's current state has the rename (resolved over every extremity).
        let (s, v) = b
            .call(
                "GET",
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
                    enc(&room),
                    enc(mallory)
                ),
                Some(&tok),
                json!({}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["displayname"], "Новое имя", "{v}");
    }

    /// An invite from another server to a room this box does not hold shows in
    /// `/sync` and in sliding sync (Element X), with the state that came with it.
    #[tokio::test]
    async fn an_invite_from_another_server_shows_in_both_syncs() {
        let (good, good_pub) = keypair("k1");
        let b = fed_box(vec![peer("good.test", &good_pub)]);
        let (alice_id, alice) = b.register("alice").await;
        let room = "!elsewhere:good.test";
        let (invite_id, invite) = sign_pdu(
            &good,
            "good.test",
            json!({
                "type": "m.room.member", "state_key": alice_id, "room_id": room,
                "sender": "@mallory:good.test", "content": {"membership": "invite", "is_direct": true},
                "origin_server_ts": 1_700_000_000_000u64, "depth": 5,
                "prev_events": ["$prev"], "auth_events": ["$create"],
            }),
        );
        let body = json!({
            "room_version": "11", "event": invite,
            "invite_room_state": [
                {"type": "m.room.name", "state_key": "", "sender": "@mallory:good.test", "content": {"name": "Снаружи"}},
                {"type": "m.room.encryption", "state_key": "", "sender": "@mallory:good.test", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
            ],
        });
        let (s, v) = b
            .fed(
                &good,
                "good.test",
                "PUT",
                &format!(
                    "/_matrix/federation/v2/invite/{}/{}",
                    enc(room),
                    enc(&invite_id)
                ),
                Some(body),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let (_, v) = b
            .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
            .await;
        let state = &v["rooms"]["invite"][room]["invite_state"]["events"];
        assert!(
            state
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["content"]["name"] == "Снаружи"),
            "{v}"
        );
        let body = json!({
            "conn_id": "remote",
            "lists": {
                "invites": {"ranges": [[0, 10]], "timeline_limit": 0, "filters": {"is_invite": true}},
                "encrypted": {"ranges": [[0, 10]], "timeline_limit": 0, "filters": {"is_encrypted": true}}
            }
        });
        let (s, v) = b
            .call(
                "POST",
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
                Some(&alice),
                body,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["lists"]["invites"]["count"], 1, "{v}");
        assert_eq!(v["lists"]["encrypted"]["count"], 1, "{v}");
        let r = &v["rooms"][room];
        assert_eq!(r["name"], "Снаружи", "{v}");
        assert_eq!(r["is_dm"], true, "{v}");
        assert!(
            r["invite_state"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "m.room.member"
                    && e["state_key"] == alice_id.as_str()
                    && e["content"]["membership"] == "invite"),
            "{v}"
        );
    }
}

/// Every sync reports the device's one-time key counts and unused fallback key
/// types (kept in memory between key writes): uploads and claims show at once.
#[tokio::test]
async fn sync_reports_key_counts_after_uploads_and_claims() {
    let b = new_box();
    let (alice_id, alice) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let (_, who) = b
        .call(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&alice),
            json!({}),
        )
        .await;
    let device = who["device_id"].as_str().unwrap().to_owned();
    async fn counts(b: &Box_, token: &str) -> (i64, Value) {
        let (s, v) = b
            .call("GET", "/_matrix/client/v3/sync", Some(token), json!({}))
            .await;
        assert_eq!(s, 200, "{v}");
        (
            v["device_one_time_keys_count"]["curve25519"]
                .as_i64()
                .unwrap_or(0),
            v["device_unused_fallback_key_types"].clone(),
        )
    }
    assert_eq!(counts(&b, &alice).await, (0, json!([])));
    let upload = json!({
        "one_time_keys": {"curve25519:a1": "a2V5MQ", "curve25519:a2": "a2V5Mg"},
        "fallback_keys": {"curve25519:f1": "ZmFsbGJhY2s"},
    });
    let (s, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/keys/upload",
            Some(&alice),
            upload,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(counts(&b, &alice).await, (2, json!(["curve25519"])));
    let claim = json!({"one_time_keys": {alice_id.clone(): {device.clone(): "curve25519"}}});
    let mut claimed = Vec::new();
    for left in [1, 0] {
        let (s, v) = b
            .call(
                "POST",
                "/_matrix/client/v3/keys/claim",
                Some(&bob),
                claim.clone(),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        claimed.push(v["one_time_keys"][&alice_id][&device].clone());
        assert_eq!(counts(&b, &alice).await, (left, json!(["curve25519"])));
    }
    // With no one-time key left, a claim gets the fallback key, now used.
    let (_, v) = b
        .call(
            "POST",
            "/_matrix/client/v3/keys/claim",
            Some(&bob),
            claim.clone(),
        )
        .await;
    assert!(
        v["one_time_keys"][&alice_id][&device]["curve25519:f1"].is_string(),
        "{v}"
    );
    assert_eq!(counts(&b, &alice).await, (0, json!([])));
    assert_ne!(claimed[0], claimed[1]);
    let more = json!({"one_time_keys": {"curve25519:a3": "a2V5Mw"}});
    let (s, _) = b
        .call("POST", "/_matrix/client/v3/keys/upload", Some(&alice), more)
        .await;
    assert_eq!(s, 200);
    assert_eq!(counts(&b, &alice).await, (1, json!([])));
}

/// Sync shares each event's formatted form between viewers: the sender's own
/// transaction id must stay hers, and a redaction must show at once (the
/// shared form of the original is made again).
#[tokio::test]
async fn synced_events_are_per_viewer_and_redactions_show() {
    let b = new_box();
    let (_, alice) = b.register("alice").await;
    let (_, bob) = b.register("bob").await;
    let room = b.room(&alice).await;
    let join = format!("/_matrix/client/v3/join/{}", enc(&room));
    assert_eq!(b.call("POST", &join, Some(&bob), json!({})).await.0, 200);
    let send = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
        enc(&room)
    );
    let body = json!({"msgtype": "m.text", "body": "секрет до редакции"});
    let (s, v) = b.call("PUT", &send, Some(&alice), body).await;
    assert_eq!(s, 200, "{v}");
    let event_id = v["event_id"].as_str().unwrap().to_owned();
    let find = |v: &Value| -> Value {
        v["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event_id"] == event_id.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (_, for_bob) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&bob), json!({}))
        .await;
    let (_, for_alice) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&alice), json!({}))
        .await;
    let (seen_by_bob, seen_by_alice) = (find(&for_bob), find(&for_alice));
    assert_eq!(seen_by_bob["content"]["body"], "секрет до редакции");
    assert!(seen_by_bob["unsigned"]["transaction_id"].is_null());
    assert_eq!(seen_by_alice["unsigned"]["transaction_id"], "t1");
    assert!(seen_by_bob["unsigned"]["age"].is_u64());
    let (s, v) = b
        .redact(&alice, &room, &event_id, "r1", json!({"reason": "oops"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let redaction_id = v["event_id"].as_str().unwrap().to_owned();
    let (_, again) = b
        .call("GET", "/_matrix/client/v3/sync", Some(&bob), json!({}))
        .await;
    let redacted = find(&again);
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    assert_eq!(
        redacted["unsigned"]["redacted_because"]["event_id"],
        redaction_id.as_str()
    );
    let text = again.to_string();
    assert!(!text.contains("секрет до редакции"), "{text}");
}

#[tokio::test]
async fn weak_passwords_are_refused_at_registration_and_change() {
    let b = new_box();
    let reg = |body: Value| b.call("POST", "/_matrix/client/v3/register", None, body);
    // Refused before any auth step, with the spec's error code.
    for weak in [
        "short1",
        "erin-is-here-1",
        "aaaaaaaaaa",
        "12345678",
        "Пароль123",
    ] {
        assert_err(
            &reg(json!({"username": "erin", "password": weak})).await,
            400,
            "M_WEAK_PASSWORD",
        );
    }
    let (s, _) = reg(json!({"username": "erin", "password": PW})).await;
    assert_eq!(s, 401, "a good password goes on to the auth step");
    // A password change is held to the same rules; the old password stays.
    let (_, token) = b.register("frank").await;
    let change = |new: &str| {
        b.call(
            "POST",
            "/_matrix/client/v3/account/password",
            Some(&token),
            json!({"new_password": new, "logout_devices": false,
                   "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "frank"}, "password": PW}}),
        )
    };
    assert_err(&change("frank-2024!").await, 400, "M_WEAK_PASSWORD");
    assert_err(&change("qwerty123").await, 400, "M_WEAK_PASSWORD");
    let login = |pw: &str| {
        b.call(
            "POST",
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "frank"}, "password": pw}),
        )
    };
    assert_eq!(login(PW).await.0, 200, "the old password still works");
    assert_eq!(change("violet-harbor-sextant").await.0, 200);
    assert_eq!(login("violet-harbor-sextant").await.0, 200);
    // With the policy off (the admin's choice), any non-empty password goes on.
    let lax = new_box_with(HomeserverConfig {
        server_name: "test.box".into(),
        password_policy: false,
        ..Default::default()
    });
    let (s, _) = lax
        .call(
            "POST",
            "/_matrix/client/v3/register",
            None,
            json!({"username": "erin", "password": "x"}),
        )
        .await;
    assert_eq!(s, 401);
}
