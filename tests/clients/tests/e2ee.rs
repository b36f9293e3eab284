//! End-to-end encryption against a `secta demo` server: matrix-sdk 0.18 with
//! its `e2e-encryption` feature (in-memory crypto store), several devices per
//! user, device-list tracking, cross-signing, server-side key backup, and raw
//! HTTP checks of the key endpoints' error cases. See README.md.

mod common;

use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use matrix_sdk::deserialized_responses::{TimelineEvent, TimelineEventKind};
use matrix_sdk::encryption::recovery::RecoveryState;
use matrix_sdk::encryption::CrossSigningResetAuthType;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::{
    CanonicalJsonValue, DeviceId, EventId, OwnedDeviceId, OwnedEventId, OwnedUserId, RoomId, UInt,
    UserId,
};
use matrix_sdk::{Client, Room, RoomState};
use serde_json::{json, Value};
use vodozemac::{Curve25519PublicKey, Curve25519SecretKey, Ed25519SecretKey};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A logged-in device and a name for messages.
struct Dev<'a> {
    name: &'a str,
    client: &'a Client,
}

fn uid(server: &Secta, localpart: &str) -> Result<OwnedUserId> {
    Ok(UserId::parse(server.user_id(localpart))?)
}

fn device_id(client: &Client) -> Result<OwnedDeviceId> {
    client
        .device_id()
        .map(ToOwned::to_owned)
        .ok_or_else(|| anyhow!("client has no device id"))
}

/// The room as `client` sees it, which must be joined.
fn joined_room(client: &Client, rid: &RoomId) -> Result<Room> {
    let r = client
        .get_room(rid)
        .ok_or_else(|| anyhow!("client has no room {rid}"))?;
    if r.state() != RoomState::Joined {
        bail!(
            "room {rid} is {:?} in the client, expected Joined",
            r.state()
        );
    }
    Ok(r)
}

/// Sync `client` until it has `rid` as a joined room.
async fn wait_joined(name: &str, client: &Client, rid: &RoomId) -> Result<()> {
    if client
        .get_room(rid)
        .is_some_and(|r| r.state() == RoomState::Joined)
    {
        return Ok(());
    }
    let rid2 = rid.to_owned();
    sync_until(
        client,
        &format!("{name}: room {rid} joined"),
        SEE_WITHIN,
        |r| r.rooms.joined.contains_key(&rid2),
    )
    .await?;
    joined_room(client, rid).map(|_| ())
}

/// `inviter` invites `localpart`; `joiner` (a device of that user) syncs until
/// the invite shows and joins.
async fn invite_and_join(
    server: &Secta,
    inviter: &Client,
    rid: &RoomId,
    localpart: &str,
    joiner: &Client,
) -> Result<()> {
    let user = uid(server, localpart)?;
    joined_room(inviter, rid)?
        .invite_user_by_id(&user)
        .await
        .at(&format!("POST /rooms/{{roomId}}/invite ({localpart})"))?;
    let rid2 = rid.to_owned();
    sync_until(
        joiner,
        &format!("the invite of {localpart}"),
        SEE_WITHIN,
        |r| r.rooms.invited.contains_key(&rid2),
    )
    .await?;
    joiner
        .get_room(rid)
        .ok_or_else(|| anyhow!("{localpart} saw the invite but has no room object"))?
        .join()
        .await
        .at(&format!("POST /rooms/{{roomId}}/join ({localpart})"))?;
    wait_joined(localpart, joiner, rid).await
}

/// The server made the room encrypted (private_chat preset), as `client`
/// learns from /sync. (Deliberately not `latest_encryption_state()`, whose
/// `GET /state/m.room.encryption/` is covered in chat.rs.)
async fn ensure_encrypted(name: &str, client: &Client, rid: &RoomId) -> Result<()> {
    let deadline = Instant::now() + SEE_WITHIN;
    loop {
        let state = joined_room(client, rid)?.encryption_state();
        if !state.is_unknown() {
            ensure!(
                state.is_encrypted(),
                "room {rid} (private_chat preset) is not encrypted as {name} sees it: {state:?}"
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name}: /sync never told the encryption state of {rid}"
        );
        sync_once(client)
            .await
            .with_context(|| format!("{name} waiting for the room state"))?;
    }
}

/// Whether the event was encrypted and decrypted to an m.room.message with
/// body `text`; the error says what it was instead.
fn decrypted_as(ev: &TimelineEvent, text: &str) -> std::result::Result<(), String> {
    match &ev.kind {
        TimelineEventKind::Decrypted(_) => {
            let v = json_of(ev);
            if body(&v) == Some(text) {
                Ok(())
            } else {
                Err(format!("decrypted, but to {} {}", v["type"], v["content"]))
            }
        }
        TimelineEventKind::UnableToDecrypt { utd_info, .. } => Err(format!(
            "unable to decrypt (session {:?}, reason {:?})",
            utd_info.session_id, utd_info.reason
        )),
        TimelineEventKind::PlainText { .. } => {
            Err("it was not encrypted (plaintext event in an encrypted room)".to_owned())
        }
    }
}

/// Sync `client` until the room timeline in /sync carries `event_id`,
/// decrypted by the SDK to `text`. If it arrives undecryptable (its room key
/// not there yet), keep syncing and ask the SDK to decrypt it again
/// (`GET /event` + decryption) after each sync; that passes with a NOTE.
async fn wait_decrypted(
    name: &str,
    client: &Client,
    rid: &RoomId,
    event_id: &EventId,
    text: &str,
) -> Result<()> {
    let deadline = Instant::now() + SEE_WITHIN;
    let mut problem: Option<String> = None;
    let mut syncs = 0u32;
    loop {
        if Instant::now() >= deadline {
            let detail = match &problem {
                Some(p) => format!("it arrived in /sync but {p}"),
                None => "it never arrived in the room's /sync timeline".to_owned(),
            };
            bail!(
                "{name}: message {event_id} ({text:?}) not decrypted within {SEE_WITHIN:?} \
                 ({syncs} syncs): {detail}"
            );
        }
        let resp = sync_once(client)
            .await
            .with_context(|| format!("{name} waiting for {event_id}"))?;
        syncs += 1;
        if let Some(u) = resp.rooms.joined.get(rid) {
            for ev in &u.timeline.events {
                if ev.event_id().as_deref() != Some(event_id) {
                    continue;
                }
                match decrypted_as(ev, text) {
                    Ok(()) => return Ok(()),
                    Err(why) => problem = Some(why),
                }
            }
        }
        if let Some(why) = &problem {
            let ev = joined_room(client, rid)?
                .event(event_id, None)
                .await
                .at("GET /rooms/{roomId}/event/{eventId}")?;
            if decrypted_as(&ev, text).is_ok() {
                eprintln!(
                    "NOTE: {name}: {event_id} came through /sync before its room key ({why}); \
                     it decrypted after a later sync"
                );
                return Ok(());
            }
        }
    }
}

/// Sync `client` until its crypto store knows `device` of `user` (it learns
/// of new devices through `device_lists.changed` and `/keys/query`).
async fn wait_knows_device(
    name: &str,
    client: &Client,
    user: &UserId,
    device: &DeviceId,
) -> Result<matrix_sdk::encryption::identities::Device> {
    let deadline = Instant::now() + SEE_WITHIN;
    let mut syncs = 0u32;
    loop {
        if let Some(d) = client
            .encryption()
            .get_device(user, device)
            .await
            .map_err(|e| anyhow!("crypto store: {e}"))?
        {
            return Ok(d);
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}: never learned of device {device} of {user} within {SEE_WITHIN:?} \
                 ({syncs} syncs): /sync device_lists.changed did not name {user}, or \
                 /keys/query did not return the device"
            );
        }
        sync_once(client)
            .await
            .with_context(|| format!("{name} waiting for {user}/{device}"))?;
        syncs += 1;
    }
}

/// The server has device keys for `user`/`device` (raw /keys/query).
async fn server_has_device_keys(raw: &RawHttp, user: &str, device: &str) -> Result<Option<Value>> {
    let q = raw
        .ok(
            "POST",
            "/keys/query",
            Some(&json!({ "device_keys": { user: [] } })),
        )
        .await?;
    let k = &q["device_keys"][user][device];
    Ok(if k.is_object() { Some(k.clone()) } else { None })
}

/// Password UIA for `user`, in the given session.
fn password_auth(user: &UserId, password: &str, session: Option<String>) -> uiaa::AuthData {
    let mut p = uiaa::Password::new(user.to_owned().into(), password.to_owned());
    p.session = session;
    uiaa::AuthData::Password(p)
}

/// `obj` signed by `user`'s key `key_id`, the Matrix way (canonical JSON
/// without `signatures` and `unsigned`).
fn sign_json(obj: &Value, key: &Ed25519SecretKey, user: &str, key_id: &str) -> Result<Value> {
    let mut bare = obj.clone();
    if let Some(o) = bare.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    let canonical = CanonicalJsonValue::try_from(bare)?.to_string();
    let sig = key.sign(canonical.as_bytes()).to_base64();
    let mut out = obj.clone();
    out["signatures"][user][key_id] = json!(sig);
    Ok(out)
}

fn curve_key() -> String {
    Curve25519PublicKey::from(&Curve25519SecretKey::new()).to_base64()
}

// ---------------------------------------------------------------------------
// a. Two users with two devices each
// ---------------------------------------------------------------------------

/// alice and bob, two devices each (two logins, two clients), in an encrypted
/// room: every device decrypts every message sent by every other device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_two_devices_each_decrypt_everything() {
    bounded(
        "two_users_two_devices_each_decrypt_everything",
        240,
        async {
            let server = Secta::start().await?;
            let token = server.invite(2)?;
            let alice1 = server.register("alice", &token).await?;
            let bob1 = server.register("bob", &token).await?;
            let alice2 = server.login("alice", "alice's second device").await?;
            let bob2 = server.login("bob", "bob's second device").await?;
            let devs = [
                Dev {
                    name: "alice#1",
                    client: &alice1,
                },
                Dev {
                    name: "alice#2",
                    client: &alice2,
                },
                Dev {
                    name: "bob#1",
                    client: &bob1,
                },
                Dev {
                    name: "bob#2",
                    client: &bob2,
                },
            ];
            // First syncs: each device uploads its keys.
            for d in &devs {
                sync_once(d.client)
                    .await
                    .with_context(|| format!("{} initial sync", d.name))?;
            }
            let raw = server.raw_as(&alice1)?;
            for d in &devs {
                let user = d
                    .client
                    .user_id()
                    .ok_or_else(|| anyhow!("no user id"))?
                    .to_string();
                let dev = device_id(d.client)?;
                ensure!(
                    server_has_device_keys(&raw, &user, dev.as_str())
                        .await?
                        .is_some(),
                    "POST /keys/query: no device keys for {} ({user}/{dev}) after its first sync \
                 (the SDK uploads them with POST /keys/upload)",
                    d.name
                );
            }

            let rid = create_private_chat(&alice1, "four devices").await?;
            ensure_encrypted("alice#1", &alice1, &rid).await?;
            invite_and_join(&server, &alice1, &rid, "bob", &bob1).await?;
            for d in &devs {
                wait_joined(d.name, d.client, &rid).await?;
            }

            for sender in &devs {
                let text = format!("hello from {}", sender.name);
                let event_id = send_text(&joined_room(sender.client, &rid)?, &text)
                    .await
                    .with_context(|| format!("{} sending", sender.name))?;
                for receiver in devs.iter().filter(|d| d.name != sender.name) {
                    wait_decrypted(receiver.name, receiver.client, &rid, &event_id, &text)
                        .await
                        .with_context(|| format!("{} -> {}", sender.name, receiver.name))?;
                }
            }
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// b. A device that appears later gets the keys of later messages
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_device_decrypts_messages_sent_after_it_appeared() {
    bounded(
        "new_device_decrypts_messages_sent_after_it_appeared",
        180,
        async {
            let p = Pair::setup().await?;
            let rid = p.room_id.clone();
            let alice_room = p.room(&p.alice)?;
            ensure_encrypted("alice", &p.alice, &rid).await?;

            let before = "before bob's new device";
            let m0 = send_text(&alice_room, before).await?;
            wait_decrypted("bob#1", &p.bob, &rid, &m0, before).await?;

            // bob logs in again; the first sync uploads the new device's keys.
            let bob2 = p.server.login("bob", "bob's later device").await?;
            let bob2_dev = device_id(&bob2)?;
            sync_once(&bob2).await.context("bob#2 initial sync")?;
            wait_joined("bob#2", &bob2, &rid).await?;
            let bob_id = uid(&p.server, "bob")?;
            ensure!(
                server_has_device_keys(
                    &p.server.raw_as(&p.alice)?,
                    bob_id.as_str(),
                    bob2_dev.as_str()
                )
                .await?
                .is_some(),
                "POST /keys/query: no keys for bob's new device {bob2_dev} after its first sync"
            );

            // alice's client learns of the new device through her /sync
            // (device_lists.changed names bob) and /keys/query.
            wait_knows_device("alice", &p.alice, &bob_id, &bob2_dev).await?;

            let after = "after bob's new device appeared";
            let m1 = send_text(&alice_room, after).await?;
            wait_decrypted("bob#2", &bob2, &rid, &m1, after).await?;
            wait_decrypted("bob#1", &p.bob, &rid, &m1, after).await?;

            // And the new device can talk to everyone.
            let from_new = "hello from bob's later device";
            let m2 = send_text(&joined_room(&bob2, &rid)?, from_new).await?;
            wait_decrypted("alice", &p.alice, &rid, &m2, from_new).await?;
            wait_decrypted("bob#1", &p.bob, &rid, &m2, from_new).await?;
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// c. Device-list updates stop after leaving
// ---------------------------------------------------------------------------

/// After bob leaves the only room he shares with alice, alice's new device
/// must not show up in bob's `device_lists.changed` (sync or /keys/changes),
/// while charlie, still in the room, is told about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_updates_stop_after_leaving() {
    bounded("device_list_updates_stop_after_leaving", 180, async {
        let server = Secta::start().await?;
        let token = server.invite(3)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let charlie = server.register("charlie", &token).await?;
        for (n, c) in [("alice", &alice), ("bob", &bob), ("charlie", &charlie)] {
            sync_once(c).await.with_context(|| format!("{n} initial sync"))?;
        }
        let rid = create_private_chat(&alice, "device lists").await?;
        invite_and_join(&server, &alice, &rid, "bob", &bob).await?;
        invite_and_join(&server, &alice, &rid, "charlie", &charlie).await?;
        let alice_id = server.user_id("alice");

        let bob_raw = server.raw_as(&bob)?;
        let charlie_raw = server.raw_as(&charlie)?;
        let bob_before_leave = bob_raw.sync(None, 0).await?;
        let bob_t0 = bob_before_leave["next_batch"]
            .as_str()
            .ok_or_else(|| anyhow!("raw /sync: no next_batch"))?
            .to_owned();

        joined_room(&bob, &rid)?
            .leave()
            .await
            .at("POST /rooms/{roomId}/leave (bob)")?;

        // The sync that covers the leave: alice is now in `left` (spec:
        // users with whom bob no longer shares an encrypted room).
        let over_leave = bob_raw.sync(Some(&bob_t0), 0).await?;
        let left = device_list(&over_leave, "left");
        let changed = device_list(&over_leave, "changed");
        ensure!(
            left.contains(&alice_id) && !changed.contains(&alice_id),
            "bob's /sync?since={bob_t0} spanning his leave: expected device_lists.left to name \
             {alice_id} (and changed not to), got left={left:?} changed={changed:?}"
        );
        let bob_t1 = over_leave["next_batch"].as_str().unwrap_or_default().to_owned();

        let charlie_before = charlie_raw.sync(None, 0).await?;
        let charlie_t0 = charlie_before["next_batch"].as_str().unwrap_or_default().to_owned();

        // alice logs in a new device; its first sync uploads keys.
        let alice2 = server.login("alice", "alice's new device").await?;
        let alice2_dev = device_id(&alice2)?;
        sync_once(&alice2).await.context("alice#2 initial sync")?;
        ensure!(
            server_has_device_keys(&charlie_raw, &alice_id, alice2_dev.as_str())
                .await?
                .is_some(),
            "POST /keys/query: no keys for alice's new device {alice2_dev} after its first sync"
        );

        // charlie shares the room: his sync names alice in device_lists.changed.
        let deadline = Instant::now() + SEE_WITHIN;
        let mut since = charlie_t0.clone();
        loop {
            let s = charlie_raw.sync(Some(&since), 1000).await?;
            if device_list(&s, "changed").contains(&alice_id) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "charlie (still in a room with alice): no /sync since {charlie_t0} named \
                 {alice_id} in device_lists.changed after her new device {alice2_dev} uploaded keys \
                 (last device_lists: {})",
                s["device_lists"]
            );
            since = s["next_batch"].as_str().unwrap_or_default().to_owned();
        }
        let charlie_now = charlie_raw.sync(Some(&since), 0).await?;
        let to = charlie_now["next_batch"].as_str().unwrap_or_default();
        let ch = charlie_raw
            .ok("GET", &format!("/keys/changes?from={charlie_t0}&to={to}"), None)
            .await?;
        ensure!(
            ch["changed"].as_array().is_some_and(|a| a.iter().any(|u| u == alice_id.as_str())),
            "GET /keys/changes?from={charlie_t0}&to={to} as charlie: expected changed to name \
             {alice_id}, got {ch}"
        );

        // bob left: nothing about alice any more.
        let after = bob_raw.sync(Some(&bob_t1), 1000).await?;
        let changed = device_list(&after, "changed");
        ensure!(
            !changed.contains(&alice_id),
            "bob left the only room he shared with alice, yet /sync?since={bob_t1} lists \
             {alice_id} in device_lists.changed after her new device: {}",
            after["device_lists"]
        );
        let to = after["next_batch"].as_str().unwrap_or_default();
        let ch = bob_raw
            .ok("GET", &format!("/keys/changes?from={bob_t1}&to={to}"), None)
            .await?;
        ensure!(
            !ch["changed"].as_array().is_some_and(|a| a.iter().any(|u| u == alice_id.as_str())),
            "GET /keys/changes?from={bob_t1}&to={to} as bob (who left): alice is listed in \
             changed: {ch}"
        );
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// d. Cross-signing
// ---------------------------------------------------------------------------

/// alice bootstraps cross-signing (first upload: no UIA), signs her second
/// device from the first, and the second device sees itself cross-signed.
/// Replacing the keys afterwards demands password UIA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_signing_bootstrap_and_self_verification() {
    bounded(
        "cross_signing_bootstrap_and_self_verification",
        180,
        async {
            let server = Secta::start().await?;
            let token = server.invite(1)?;
            let alice1 = server.register("alice", &token).await?;
            let alice2 = server.login("alice", "alice's second device").await?;
            sync_once(&alice1).await.context("alice#1 initial sync")?;
            sync_once(&alice2).await.context("alice#2 initial sync")?;
            let alice_id = uid(&server, "alice")?;
            let dev1 = device_id(&alice1)?;
            let dev2 = device_id(&alice2)?;
            let raw = server.raw_as(&alice1)?;

            // No cross-signing keys yet: the upload needs no auth.
            alice1.encryption().bootstrap_cross_signing(None).await.at(
                "bootstrap_cross_signing(None): POST /keys/device_signing/upload (first \
                 upload, no UIA expected) + POST /keys/signatures/upload",
            )?;
            let status = alice1.encryption().cross_signing_status().await;
            ensure!(
                status.as_ref().is_some_and(|s| s.is_complete()),
                "after bootstrap alice#1 does not hold all three private keys: {status:?}"
            );

            let q = raw
                .ok(
                    "POST",
                    "/keys/query",
                    Some(&json!({ "device_keys": { alice_id.as_str(): [] } })),
                )
                .await?;
            let a = alice_id.as_str();
            for field in ["master_keys", "self_signing_keys", "user_signing_keys"] {
                ensure!(
                    q[field][a].is_object(),
                    "POST /keys/query (as alice) after bootstrap: no {field}.{a}: {q}"
                );
            }
            let ssk_id = q["self_signing_keys"][a]["keys"]
                .as_object()
                .and_then(|k| k.keys().next().cloned())
                .ok_or_else(|| {
                    anyhow!("self-signing key without keys: {}", q["self_signing_keys"])
                })?;
            let master_before = q["master_keys"][a].clone();
            ensure!(
                q["device_keys"][a][dev1.as_str()]["signatures"][a][&ssk_id].is_string(),
                "POST /keys/query: alice#1's device keys carry no signature by the self-signing \
             key {ssk_id} (bootstrap uploads one via /keys/signatures/upload): {}",
                q["device_keys"][a][dev1.as_str()]
            );

            // alice#1 signs alice#2 with the self-signing key.
            let d2 = wait_knows_device("alice#1", &alice1, &alice_id, &dev2).await?;
            ensure!(
                !d2.is_cross_signed_by_owner(),
                "alice#2 is cross-signed before anyone signed it"
            );
            d2.verify()
                .await
                .map_err(|e| anyhow!("Device::verify (POST /keys/signatures/upload): {e}"))?;

            let q = raw
                .ok(
                    "POST",
                    "/keys/query",
                    Some(&json!({ "device_keys": { a: [dev2.as_str()] } })),
                )
                .await?;
            ensure!(
                q["device_keys"][a][dev2.as_str()]["signatures"][a][&ssk_id].is_string(),
                "POST /keys/query after signing alice#2: its device keys carry no signature by \
             {ssk_id}: {}",
                q["device_keys"][a][dev2.as_str()]
            );

            // alice#2 re-queries her keys (device_lists.changed names alice) and
            // sees her own device cross-signed.
            let deadline = Instant::now() + SEE_WITHIN;
            loop {
                let own = alice2
                    .encryption()
                    .get_own_device()
                    .await
                    .map_err(|e| anyhow!("crypto store: {e}"))?
                    .ok_or_else(|| anyhow!("alice#2 has no own device"))?;
                if own.is_cross_signed_by_owner() {
                    break;
                }
                ensure!(
                Instant::now() < deadline,
                "alice#2 never saw itself cross-signed within {SEE_WITHIN:?}: its /sync did not \
                 name alice in device_lists.changed, or /keys/query lacked the signature"
            );
                sync_once(&alice2)
                    .await
                    .context("alice#2 waiting to be cross-signed")?;
            }
            ensure!(
                alice2
                    .encryption()
                    .get_user_identity(&alice_id)
                    .await
                    .map_err(|e| anyhow!("crypto store: {e}"))?
                    .is_some(),
                "alice#2 knows no cross-signing identity for alice"
            );
            // alice#1 holds the master key, so for her alice#2 is now verified.
            let deadline = Instant::now() + SEE_WITHIN;
            loop {
                let d2 = wait_knows_device("alice#1", &alice1, &alice_id, &dev2).await?;
                if d2.is_verified_with_cross_signing() {
                    break;
                }
                ensure!(
                Instant::now() < deadline,
                "alice#1 does not see alice#2 as verified with cross-signing within {SEE_WITHIN:?}"
            );
                sync_once(&alice1)
                    .await
                    .context("alice#1 waiting for alice#2's signature")?;
            }

            // Replacing the cross-signing keys needs the password.
            let handle = alice1
                .encryption()
                .reset_cross_signing()
                .await
                .at("reset_cross_signing: POST /keys/device_signing/upload without auth")?
                .ok_or_else(|| {
                    anyhow!(
                    "POST /keys/device_signing/upload replacing existing keys succeeded without \
                     auth; expected 401 with a m.login.password flow"
                )
                })?;
            let session = match handle.auth_type() {
                CrossSigningResetAuthType::Uiaa(info) => {
                    ensure!(
                        info.flows
                            .iter()
                            .any(|f| f.stages.iter().any(|s| s.as_str() == "m.login.password")),
                        "401 on /keys/device_signing/upload offers no m.login.password: {:?}",
                        info.flows
                    );
                    info.session.clone()
                }
                CrossSigningResetAuthType::OAuth(_) => bail!("server asked for OAuth approval"),
            };
            match handle
                .auth(Some(password_auth(
                    &alice_id,
                    "not the password",
                    session.clone(),
                )))
                .await
            {
                Ok(()) => bail!("POST /keys/device_signing/upload with a wrong password succeeded"),
                Err(e) => ensure!(
                    errcode(&e).as_deref() == Some("M_FORBIDDEN"),
                    "POST /keys/device_signing/upload with a wrong password: expected 401 \
                 with errcode M_FORBIDDEN, got {}",
                    describe(&e)
                ),
            }
            let q = raw
                .ok(
                    "POST",
                    "/keys/query",
                    Some(&json!({ "device_keys": { a: [] } })),
                )
                .await?;
            ensure!(
                q["master_keys"][a] == master_before,
                "a refused key replacement changed the master key anyway: {}",
                q["master_keys"][a]
            );
            handle
                .auth(Some(password_auth(&alice_id, PASSWORD, session)))
                .await
                .at("POST /keys/device_signing/upload with password UIA")?;
            let q = raw
                .ok(
                    "POST",
                    "/keys/query",
                    Some(&json!({ "device_keys": { a: [] } })),
                )
                .await?;
            ensure!(
                q["master_keys"][a].is_object() && q["master_keys"][a] != master_before,
                "after the authorised reset /keys/query still shows the old master key"
            );
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// e. Key backup
// ---------------------------------------------------------------------------

/// alice turns on recovery (secret storage + key backup), sends messages; a
/// fresh device of hers restores the backup with the recovery key and
/// decrypts the old messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_backup_restores_old_messages_on_a_new_device() {
    bounded(
        "key_backup_restores_old_messages_on_a_new_device",
        240,
        async {
            let server = Secta::start().await?;
            let token = server.invite(1)?;
            let alice1 = server.register("alice", &token).await?;
            sync_once(&alice1).await.context("alice#1 initial sync")?;
            let rid = create_private_chat(&alice1, "backed up").await?;
            wait_joined("alice#1", &alice1, &rid).await?;
            ensure_encrypted("alice#1", &alice1, &rid).await?;
            let room1 = joined_room(&alice1, &rid)?;

            alice1
                .encryption()
                .bootstrap_cross_signing(None)
                .await
                .at("bootstrap_cross_signing(None)")?;
            let recovery_key = alice1
                .encryption()
                .recovery()
                .enable()
                .wait_for_backups_to_upload()
                .await
                .map_err(|e| anyhow!("recovery().enable(): {e} ({e:?})"))?;
            ensure!(
                alice1.encryption().backups().are_enabled().await,
                "backups not enabled on alice#1 after recovery().enable()"
            );

            let texts: Vec<String> = (1..=3).map(|i| format!("secret number {i}")).collect();
            let mut ids: Vec<OwnedEventId> = Vec::new();
            for t in &texts {
                ids.push(send_text(&room1, t).await?);
            }
            tokio::time::timeout(
                SEE_WITHIN,
                alice1.encryption().backups().wait_for_steady_state(),
            )
            .await
            .map_err(|_| {
                anyhow!("backups().wait_for_steady_state() did not finish within {SEE_WITHIN:?}")
            })?
            .map_err(|e| {
                anyhow!("backups().wait_for_steady_state(): {e:?} (PUT /room_keys/keys)")
            })?;

            let raw = server.raw_as(&alice1)?;
            let version = raw.ok("GET", "/room_keys/version", None).await?;
            let v = version["version"].as_str().unwrap_or_default().to_owned();
            ensure!(
                version["count"].as_u64().unwrap_or(0) >= 1,
                "GET /room_keys/version: no keys backed up after sending: {version}"
            );
            let stored = raw
                .ok("GET", &format!("/room_keys/keys/{rid}?version={v}"), None)
                .await?;
            ensure!(
                stored["sessions"]
                    .as_object()
                    .is_some_and(|s| !s.is_empty()),
                "GET /room_keys/keys/{rid}?version={v}: no sessions: {stored}"
            );

            // A fresh device: the old messages are undecryptable ...
            let alice3 = server.login("alice", "alice's fresh device").await?;
            sync_once(&alice3).await.context("alice#3 initial sync")?;
            wait_joined("alice#3", &alice3, &rid).await?;
            let room3 = joined_room(&alice3, &rid)?;
            let decrypted = |page: &[TimelineEvent]| -> Vec<String> {
                texts
                    .iter()
                    .filter(|t| page.iter().any(|e| decrypted_as(e, t).is_ok()))
                    .cloned()
                    .collect()
            };
            let mut opts = MessagesOptions::backward();
            opts.limit = UInt::from(50u32);
            let page = room3
                .messages(opts)
                .await
                .at("GET /rooms/{roomId}/messages (alice#3)")?;
            let early = decrypted(&page.chunk);
            ensure!(
                early.is_empty(),
                "alice#3 decrypted {early:?} before restoring the backup; the test cannot tell \
             whether the backup worked"
            );

            // ... until it restores the backup with the recovery key.
            alice3
                .encryption()
                .recovery()
                .recover(&recovery_key)
                .await
                .map_err(|e| anyhow!("recovery().recover(key) on alice#3: {e} ({e:?})"))?;
            ensure!(
                alice3.encryption().recovery().state() == RecoveryState::Enabled,
                "alice#3 recovery state after recover(): {:?}",
                alice3.encryption().recovery().state()
            );
            ensure!(
                alice3.encryption().backups().are_enabled().await,
                "alice#3 has no usable backup after recover() (backup key or version missing)"
            );
            alice3
                .encryption()
                .backups()
                .download_room_keys_for_room(&rid)
                .await
                .at("GET /room_keys/keys/{roomId}?version=... (alice#3)")?;

            let mut opts = MessagesOptions::backward();
            opts.limit = UInt::from(50u32);
            let page = room3
                .messages(opts)
                .await
                .at("GET /rooms/{roomId}/messages (alice#3)")?;
            let got = decrypted(&page.chunk);
            if got != texts {
                let states: Vec<String> = ids
                    .iter()
                    .map(|id| {
                        page.chunk
                            .iter()
                            .find(|e| e.event_id().as_deref() == Some(id.as_ref()))
                            .map(|e| match decrypted_as(e, "") {
                                Err(why) => format!("{id}: {why}"),
                                Ok(()) => format!("{id}: ok"),
                            })
                            .unwrap_or_else(|| format!("{id}: not in /messages"))
                    })
                    .collect();
                bail!(
                    "alice#3 after restoring the backup decrypted {got:?}, expected {texts:?}; \
                 events: {states:?}"
                );
            }
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// f. Bad input to the key endpoints (raw HTTP)
// ---------------------------------------------------------------------------

fn expect_error(r: &RawResponse, what: &str, status: u16, errcode: &str) -> Result<()> {
    ensure!(
        r.status == status && r.errcode() == errcode,
        "{what}: expected HTTP {status} {errcode}, got HTTP {} {}",
        r.status,
        r.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_endpoints_reject_bad_input() {
    bounded("key_endpoints_reject_bad_input", 120, async {
        let server = Secta::start().await?;
        let token = server.invite(1)?;
        // Registered with the SDK but never synced, so it uploads nothing;
        // the raw device below is a second, password login.
        let _alice = server.register("alice", &token).await?;
        let alice_id = server.user_id("alice");
        let a = alice_id.as_str();

        let (dev, raw) = raw_login(&server, a).await?;
        let dev = dev.as_str();
        let ed_id = format!("ed25519:{dev}");
        let ed = Ed25519SecretKey::new();
        let device_keys = json!({
            "user_id": a,
            "device_id": dev,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{dev}"): curve_key(),
                ed_id.clone(): ed.public_key().to_base64(),
            },
        });
        let good_keys = sign_json(&device_keys, &ed, a, &ed_id)?;

        // 1. Signed by another key than the one it names.
        let forged = sign_json(&device_keys, &Ed25519SecretKey::new(), a, &ed_id)?;
        let r = raw
            .call(
                "POST",
                "/keys/upload",
                Some(&json!({
                    "device_keys": forged,
                    "one_time_keys": { "curve25519:AAAAAA": curve_key() },
                })),
            )
            .await?;
        expect_error(
            &r,
            "POST /keys/upload, device_keys signed by another key",
            400,
            "M_INVALID_SIGNATURE",
        )?;
        // 2. Signed correctly, then altered.
        let mut tampered = good_keys.clone();
        tampered["keys"][format!("curve25519:{dev}")] = json!(curve_key());
        let r = raw
            .call(
                "POST",
                "/keys/upload",
                Some(&json!({ "device_keys": tampered })),
            )
            .await?;
        expect_error(
            &r,
            "POST /keys/upload, device_keys altered after signing",
            400,
            "M_INVALID_SIGNATURE",
        )?;
        // Nothing of either was stored.
        ensure!(
            server_has_device_keys(&raw, a, dev).await?.is_none(),
            "POST /keys/query shows device keys for {dev} after only rejected uploads"
        );
        let counts = raw.ok("POST", "/keys/upload", Some(&json!({}))).await?;
        ensure!(
            counts["one_time_key_counts"]["curve25519"]
                .as_u64()
                .unwrap_or(0)
                == 0,
            "the one-time key of a rejected upload was stored: {counts}"
        );

        // The correctly signed keys are accepted.
        let otk = |k: &Ed25519SecretKey| sign_json(&json!({ "key": curve_key() }), k, a, &ed_id);
        let otk1 = otk(&ed)?;
        let r = raw
            .ok(
                "POST",
                "/keys/upload",
                Some(&json!({
                    "device_keys": good_keys,
                    "one_time_keys": { "signed_curve25519:AAAAAQ": otk1 },
                })),
            )
            .await
            .context("POST /keys/upload with correctly signed device keys and one-time key")?;
        ensure!(
            r["one_time_key_counts"]["signed_curve25519"] == 1,
            "POST /keys/upload: one_time_key_counts after one key: {r}"
        );
        let stored = server_has_device_keys(&raw, a, dev)
            .await?
            .ok_or_else(|| anyhow!("POST /keys/query: no keys for {dev} after a good upload"))?;
        ensure!(
            stored["keys"][&ed_id] == good_keys["keys"][&ed_id]
                && stored["signatures"][a][&ed_id] == good_keys["signatures"][a][&ed_id],
            "POST /keys/query returns other keys than uploaded: {stored}"
        );

        // 3. The same one-time key id again: same content is harmless,
        // different content is refused.
        raw.ok(
            "POST",
            "/keys/upload",
            Some(&json!({ "one_time_keys": { "signed_curve25519:AAAAAQ": otk1 } })),
        )
        .await
        .context("re-uploading an identical one-time key")?;
        let r = raw
            .call(
                "POST",
                "/keys/upload",
                Some(&json!({ "one_time_keys": { "signed_curve25519:AAAAAQ": otk(&ed)? } })),
            )
            .await?;
        expect_error(
            &r,
            "POST /keys/upload, known one-time key id with new content",
            400,
            "M_INVALID_PARAM",
        )?;
        let counts = raw.ok("POST", "/keys/upload", Some(&json!({}))).await?;
        ensure!(
            counts["one_time_key_counts"]["signed_curve25519"] == 1,
            "one_time_key_counts after the refused re-upload: {counts}"
        );
        let claim = raw
            .ok(
                "POST",
                "/keys/claim",
                Some(&json!({ "one_time_keys": { a: { dev: "signed_curve25519" } } })),
            )
            .await?;
        ensure!(
            claim["one_time_keys"][a][dev]["signed_curve25519:AAAAAQ"] == otk1,
            "POST /keys/claim does not return the original one-time key: {claim}"
        );

        // 4. Key backup: writes to a version other than the current one.
        let backup_version = |tag: &str| {
            json!({
                "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
                "auth_data": { "public_key": curve_key(), "signatures": {}, "tag": tag },
            })
        };
        let v1 = raw
            .ok("POST", "/room_keys/version", Some(&backup_version("first")))
            .await?["version"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let v2 = raw
            .ok(
                "POST",
                "/room_keys/version",
                Some(&backup_version("second")),
            )
            .await?["version"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ensure!(
            !v1.is_empty() && v1 != v2,
            "POST /room_keys/version returned {v1:?} then {v2:?}"
        );
        let room = format!("!backedup:{}", server.listen);
        let session = json!({
            "first_message_index": 0,
            "forwarded_count": 0,
            "is_verified": false,
            "session_data": { "ephemeral": curve_key(), "ciphertext": "AAAA", "mac": "AAAA" },
        });
        let all = json!({ "rooms": { room.clone(): { "sessions": { "sess1": session } } } });
        let one_room = json!({ "sessions": { "sess1": session } });
        for (path, body) in [
            (format!("/room_keys/keys?version={v1}"), &all),
            (format!("/room_keys/keys/{room}?version={v1}"), &one_room),
            (
                format!("/room_keys/keys/{room}/sess1?version={v1}"),
                &session,
            ),
        ] {
            let r = raw.call("PUT", &path, Some(body)).await?;
            expect_error(
                &r,
                &format!("PUT {path} (old version; current is {v2})"),
                403,
                "M_WRONG_ROOM_KEYS_VERSION",
            )?;
            ensure!(
                r.body["current_version"] == v2.as_str(),
                "PUT {path}: M_WRONG_ROOM_KEYS_VERSION without current_version {v2:?}: {}",
                r.body
            );
        }
        let r = raw
            .ok("PUT", &format!("/room_keys/keys?version={v2}"), Some(&all))
            .await?;
        ensure!(r["count"] == 1, "PUT /room_keys/keys?version={v2}: {r}");
        let back = raw
            .ok("GET", &format!("/room_keys/keys?version={v2}"), None)
            .await?;
        ensure!(
            back["rooms"][&room]["sessions"]["sess1"] == session,
            "GET /room_keys/keys?version={v2} does not return what was stored: {back}"
        );
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// g. To-device messages (raw HTTP)
// ---------------------------------------------------------------------------

/// Raw password login as a new device: (device_id, RawHttp).
async fn raw_login(server: &Secta, user: &str) -> Result<(String, RawHttp)> {
    let anon = RawHttp::new(&server.base_url, "")?;
    let login = anon
        .ok(
            "POST",
            "/login",
            Some(&json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": user },
                "password": PASSWORD,
            })),
        )
        .await?;
    let dev = login["device_id"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /login: no device_id: {login}"))?
        .to_owned();
    let token = login["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /login: no access_token: {login}"))?;
    Ok((dev, RawHttp::new(&server.base_url, token)?))
}

/// Raw-sync `raw` from `since` until its `to_device.events` include one of
/// type `kind` whose content matches `content`; returns all to-device events
/// seen (so duplicates show) and the last next_batch.
async fn wait_to_device(
    raw: &RawHttp,
    since: &str,
    kind: &str,
    content: &Value,
) -> Result<(Vec<Value>, String)> {
    let deadline = Instant::now() + SEE_WITHIN;
    let mut since = since.to_owned();
    let mut seen: Vec<Value> = Vec::new();
    loop {
        let s = raw.sync(Some(&since), 1000).await?;
        if let Some(evs) = s["to_device"]["events"].as_array() {
            seen.extend(evs.iter().cloned());
        }
        since = s["next_batch"].as_str().unwrap_or_default().to_owned();
        if seen
            .iter()
            .any(|e| e["type"] == kind && e["content"] == *content)
        {
            return Ok((seen, since));
        }
        ensure!(
            Instant::now() < deadline,
            "no to-device {kind} {content} within {SEE_WITHIN:?}; to-device events seen: {seen:?}"
        );
    }
}

/// To-device delivery through /sync (direct and `*`), idempotent retries,
/// and transaction ids scoped per endpoint: the spec allows the same txnId
/// on `PUT /rooms/{roomId}/send/...` and `PUT /sendToDevice/...`, and both
/// requests are distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_delivery_and_transaction_ids() {
    bounded("to_device_delivery_and_transaction_ids", 120, async {
        let server = Secta::start().await?;
        let token = server.invite(1)?;
        let _alice = server.register("alice", &token).await?;
        let a = server.user_id("alice");
        let (_dev1, raw1) = raw_login(&server, &a).await?;
        let (dev2, raw2) = raw_login(&server, &a).await?;
        let s0 = raw2.sync(None, 0).await?;
        let since = s0["next_batch"].as_str().unwrap_or_default().to_owned();

        // Direct, then the same request again (a retry).
        let body1 = json!({ "messages": { a.as_str(): { dev2.as_str(): { "n": 1 } } } });
        raw1.ok("PUT", "/sendToDevice/m.secta.test/txn-1", Some(&body1))
            .await?;
        raw1.ok("PUT", "/sendToDevice/m.secta.test/txn-1", Some(&body1))
            .await
            .context("retrying PUT /sendToDevice with the same txnId")?;
        let (seen, since) =
            wait_to_device(&raw2, &since, "m.secta.test", &json!({ "n": 1 })).await?;
        let copies = seen.iter().filter(|e| e["content"]["n"] == 1).count();
        ensure!(
            copies == 1,
            "to-device message delivered {copies} times after a retry: {seen:?}"
        );
        let m = seen.iter().find(|e| e["content"]["n"] == 1).unwrap();
        ensure!(
            m["sender"] == a.as_str(),
            "to-device event sender is {} not {a}",
            m["sender"]
        );

        // To all devices.
        let body2 = json!({ "messages": { a.as_str(): { "*": { "n": 2 } } } });
        raw1.ok("PUT", "/sendToDevice/m.secta.test/txn-2", Some(&body2))
            .await?;
        let (seen, since) =
            wait_to_device(&raw2, &since, "m.secta.test", &json!({ "n": 2 })).await?;
        ensure!(
            !seen.iter().any(|e| e["content"]["n"] == 1),
            "the acknowledged to-device message n=1 came again: {seen:?}"
        );

        // The same txnId on a room send and on /sendToDevice: two requests.
        let room = raw1
            .ok(
                "POST",
                "/createRoom",
                Some(&json!({ "preset": "public_chat" })),
            )
            .await?;
        let rid = room["room_id"].as_str().unwrap_or_default().to_owned();
        raw1.ok(
            "PUT",
            &format!("/rooms/{rid}/send/m.room.message/shared-txn"),
            Some(&json!({ "msgtype": "m.text", "body": "room message" })),
        )
        .await?;
        let body3 = json!({ "messages": { a.as_str(): { dev2.as_str(): { "n": 3 } } } });
        let r = raw1
            .call("PUT", "/sendToDevice/m.secta.test/shared-txn", Some(&body3))
            .await?;
        ensure!(
            r.status == 200,
            "PUT /sendToDevice/m.secta.test/shared-txn after PUT /rooms/{{roomId}}/send/\
             m.room.message/shared-txn from the same device: expected 200 (the spec scopes \
             transaction ids to device + endpoint and names exactly this pair as distinct), \
             got HTTP {} {}",
            r.status,
            r.body
        );
        wait_to_device(&raw2, &since, "m.secta.test", &json!({ "n": 3 })).await?;
        Ok(())
    })
    .await;
}
