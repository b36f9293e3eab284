//! Two `secta demo` boxes federating over TLS on loopback, each with its own
//! matrix-sdk 0.18 clients: alice lives on box A, bob on box B. Encrypted
//! chat across the boxes (remote `/keys/query` and `/keys/claim` through
//! federation, `m.direct_to_device` and `m.device_list_update` EDUs), a
//! second device that appears later, plain messages with typing and
//! receipt EDUs, and a knock on the other box's room answered by an invite.
//! Each box has its own loopback address. See README.md.
//!
//! Everything between the boxes goes through each box's outbound queue, so
//! waits here are longer than on one box ([`FED_WITHIN`]).

mod common;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use matrix_sdk::deserialized_responses::{TimelineEvent, TimelineEventKind};
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType as CreateReceiptType;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::receipt::{ReceiptThread, ReceiptType};
use matrix_sdk::ruma::events::room::join_rules::{JoinRule, RoomJoinRulesEventContent};
use matrix_sdk::ruma::{
    DeviceId, EventId, OwnedDeviceId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    RoomOrAliasId, ServerName, UserId,
};
use matrix_sdk::{Client, Room, RoomState};
use serde_json::{json, Value};

use common::*;

/// How long one "the other box's user sees it" may take: delivery goes
/// through the sender's federation queue (woken at once, else polled every
/// 2 s, with back-off after a failure).
const FED_WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

/// Two federating boxes; alice registered on A, bob on B, both clients past
/// their first `/sync` (which uploads their device keys).
struct Boxes {
    a: Secta,
    b: Secta,
    alice: Client,
    bob: Client,
    alice_id: OwnedUserId,
    bob_id: OwnedUserId,
}

impl Boxes {
    async fn start() -> Result<Boxes> {
        let (a, b) = Secta::start_pair().await?;
        let alice = a
            .register("alice", &a.invite(1)?)
            .await
            .context("alice on box A")?;
        let bob = b
            .register("bob", &b.invite(1)?)
            .await
            .context("bob on box B")?;
        sync_once(&alice)
            .await
            .context("alice initial sync (box A)")?;
        sync_once(&bob).await.context("bob initial sync (box B)")?;
        let alice_id = UserId::parse(a.user_id("alice"))?;
        let bob_id = UserId::parse(b.user_id("bob"))?;
        // Both devices uploaded their keys to their own box.
        for (name, server, client, user) in
            [("alice", &a, &alice, &alice_id), ("bob", &b, &bob, &bob_id)]
        {
            let dev = device_id(client)?;
            ensure!(
                local_device_keys(server, client, user.as_str(), dev.as_str())
                    .await?
                    .is_some(),
                "{name}: POST /keys/query on her/his own box shows no keys for {user}/{dev} after \
                 the first sync (the SDK uploads them with POST /keys/upload)"
            );
        }
        Ok(Boxes {
            a,
            b,
            alice,
            bob,
            alice_id,
            bob_id,
        })
    }

    fn a_name(&self) -> Result<OwnedServerName> {
        Ok(ServerName::parse(&self.a.listen)?)
    }

    /// Federation queue status of both boxes (`secta admin federation`), for
    /// failure messages.
    fn fed_status(&self) -> String {
        format!(
            "box A ({}) `secta admin federation`:\n{}\nbox B ({}) `secta admin federation`:\n{}",
            self.a.listen,
            self.a.federation_status(),
            self.b.listen,
            self.b.federation_status()
        )
    }

    /// On failure, add both boxes' federation status.
    fn annotate<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| anyhow!("{e:#}\n\n{}", self.fed_status()))
    }

    /// alice (A) creates a `private_chat` room (encrypted by the server),
    /// invites bob (B) across the boxes; bob sees the invite in his `/sync`
    /// and joins (a remote join through A). Both clients end up with the room
    /// joined and known to be encrypted.
    async fn encrypted_room(&self) -> Result<OwnedRoomId> {
        let rid = create_private_chat(&self.alice, "between boxes").await?;
        ensure_encrypted("alice", &self.alice, &rid).await?;
        joined_room(&self.alice, &rid)?
            .invite_user_by_id(&self.bob_id)
            .await
            .at("POST /rooms/{roomId}/invite on box A for @bob of box B (federation PUT /v2/invite)")?;
        let r2 = rid.clone();
        sync_until(
            &self.bob,
            "the invite from box A in bob's /sync on box B",
            FED_WITHIN,
            |r| r.rooms.invited.contains_key(&r2),
        )
        .await?;
        let room = self
            .bob
            .get_room(&rid)
            .ok_or_else(|| anyhow!("bob saw the invite but his client has no room object"))?;
        ensure!(
            room.state() == RoomState::Invited,
            "bob's room after the invite sync is {:?}, expected Invited",
            room.state()
        );
        room.join()
            .await
            .at("POST /rooms/{roomId}/join on box B (federation make_join/send_join to A)")?;
        self.both_see_join(&rid).await?;
        ensure_encrypted("bob", &self.bob, &rid).await?;
        Ok(rid)
    }

    /// alice (A) creates a `public_chat` room (not encrypted); bob (B) joins
    /// it by id, through A (`via`), without an invite.
    async fn public_room(&self) -> Result<OwnedRoomId> {
        let mut req = create_room::v3::Request::new();
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        req.name = Some("public, between boxes".to_owned());
        let room = self
            .alice
            .create_room(req)
            .await
            .at("POST /createRoom (public_chat) on box A")?;
        let rid = room.room_id().to_owned();
        let target: &RoomOrAliasId = (&*rid).into();
        self.bob
            .join_room_by_id_or_alias(target, &[self.a_name()?])
            .await
            .at("POST /join/{roomId}?via=<box A> on box B (federation make_join/send_join to A)")?;
        self.both_see_join(&rid).await?;
        for (name, c) in [("alice", &self.alice), ("bob", &self.bob)] {
            let state = joined_room(c, &rid)?
                .latest_encryption_state()
                .await
                .at(&format!("GET /state/m.room.encryption/ ({name})"))?;
            ensure!(
                !state.is_encrypted(),
                "{name}: the public_chat room is encrypted: {state:?}"
            );
        }
        Ok(rid)
    }

    /// bob's join reaches alice's sync, and bob's client has the room joined.
    async fn both_see_join(&self, rid: &RoomId) -> Result<()> {
        let (r2, bob_s) = (rid.to_owned(), self.bob_id.to_string());
        sync_until(
            &self.alice,
            "bob's join (from box B) in alice's /sync",
            FED_WITHIN,
            |r| {
                timeline_and_state(r, &r2).iter().any(|e| {
                    e["type"] == "m.room.member"
                        && e["state_key"] == bob_s.as_str()
                        && e["content"]["membership"] == "join"
                })
            },
        )
        .await?;
        wait_joined("bob", &self.bob, rid).await
    }
}

// ---------------------------------------------------------------------------
// Helpers (as in e2ee.rs, with the longer federation wait)
// ---------------------------------------------------------------------------

fn device_id(client: &Client) -> Result<OwnedDeviceId> {
    client
        .device_id()
        .map(ToOwned::to_owned)
        .ok_or_else(|| anyhow!("client has no device id"))
}

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
        FED_WITHIN,
        |r| r.rooms.joined.contains_key(&rid2),
    )
    .await?;
    joined_room(client, rid).map(|_| ())
}

/// The room is encrypted as `client` learns it from `/sync` (for bob, from
/// the state box A handed over in `send_join`).
async fn ensure_encrypted(name: &str, client: &Client, rid: &RoomId) -> Result<()> {
    let deadline = Instant::now() + FED_WITHIN;
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

/// `POST /keys/query` on `server` as `client`, for `user`/`device`.
async fn local_device_keys(
    server: &Secta,
    client: &Client,
    user: &str,
    device: &str,
) -> Result<Option<Value>> {
    let q = server
        .raw_as(client)?
        .ok(
            "POST",
            "/keys/query",
            Some(&json!({ "device_keys": { user: [] } })),
        )
        .await?;
    let k = &q["device_keys"][user][device];
    Ok(if k.is_object() { Some(k.clone()) } else { None })
}

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

/// Sync `client` until the room timeline carries `event_id` decrypted to
/// `text`. An event that came before its room key (the to-device message
/// travels as a separate EDU) passes once a later sync brings the key and
/// the SDK decrypts it (`GET /event`), with a NOTE.
async fn wait_decrypted(
    name: &str,
    client: &Client,
    rid: &RoomId,
    event_id: &EventId,
    text: &str,
) -> Result<()> {
    let deadline = Instant::now() + FED_WITHIN;
    let mut problem: Option<String> = None;
    let mut syncs = 0u32;
    loop {
        if Instant::now() >= deadline {
            let detail = match &problem {
                Some(p) => format!("it arrived in /sync but {p}"),
                None => "it never arrived in the room's /sync timeline".to_owned(),
            };
            bail!(
                "{name}: message {event_id} ({text:?}) not decrypted within {FED_WITHIN:?} \
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

/// Sync `client` until its crypto store knows `device` of `user` (from
/// `device_lists.changed` and `/keys/query`, which the box forwards to the
/// user's box).
async fn wait_knows_device(
    name: &str,
    client: &Client,
    user: &UserId,
    device: &DeviceId,
) -> Result<()> {
    let deadline = Instant::now() + FED_WITHIN;
    let mut syncs = 0u32;
    loop {
        if client
            .encryption()
            .get_device(user, device)
            .await
            .map_err(|e| anyhow!("crypto store: {e}"))?
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}: never learned of device {device} of {user} within {FED_WITHIN:?} \
                 ({syncs} syncs). Either the m.device_list_update EDU did not reach this box, or the remote \
                 /keys/query (federation /user/keys/query) did not return the device"
            );
        }
        sync_once(client)
            .await
            .with_context(|| format!("{name} waiting for {user}/{device}"))?;
        syncs += 1;
    }
}

/// The message `event_id` with `text`, not encrypted, from `sender`.
fn plain_message(e: &Value, event_id: &str, sender: &str, text: &str) -> bool {
    e["event_id"] == event_id && e["sender"] == sender && body(e) == Some(text)
}

// ---------------------------------------------------------------------------
// 1. Encrypted chat across two boxes
// ---------------------------------------------------------------------------

/// alice (box A) and bob (box B) in an encrypted private chat. Each side's
/// SDK needs the other's device keys (`/keys/query` forwarded to the other
/// box), a one-time key (`/keys/claim` forwarded), and sends the Megolm
/// session as `m.room.encrypted` to-device (`m.direct_to_device` EDU). Each
/// side must decrypt the other's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_chat_across_two_boxes() {
    bounded("encrypted_chat_across_two_boxes", 240, async {
        let x = Boxes::start().await?;
        let r = async {
            let rid = x.encrypted_room().await?;
            let alice_room = joined_room(&x.alice, &rid)?;
            let bob_room = joined_room(&x.bob, &rid)?;

            let t1 = "hello bob on box B, from alice on box A";
            let m1 = send_text(&alice_room, t1)
                .await
                .context("alice sending (A)")?;
            wait_decrypted("bob (B)", &x.bob, &rid, &m1, t1)
                .await
                .context("alice -> bob")?;

            let t2 = "hi alice on box A, bob here on box B";
            let m2 = send_text(&bob_room, t2).await.context("bob sending (B)")?;
            wait_decrypted("alice (A)", &x.alice, &rid, &m2, t2)
                .await
                .context("bob -> alice")?;

            // A second round on the established sessions.
            let t3 = "second message from alice";
            let m3 = send_text(&alice_room, t3).await?;
            wait_decrypted("bob (B)", &x.bob, &rid, &m3, t3)
                .await
                .context("alice -> bob, again")?;
            let t4 = "second message from bob";
            let m4 = send_text(&bob_room, t4).await?;
            wait_decrypted("alice (A)", &x.alice, &rid, &m4, t4)
                .await
                .context("bob -> alice, again")?;

            // Each side knows the other's device (from the remote /keys/query).
            let bob_dev = device_id(&x.bob)?;
            let alice_dev = device_id(&x.alice)?;
            wait_knows_device("alice (A)", &x.alice, &x.bob_id, &bob_dev).await?;
            wait_knows_device("bob (B)", &x.bob, &x.alice_id, &alice_dev).await?;
            Ok(())
        }
        .await;
        x.annotate(r)
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. A second device on box B
// ---------------------------------------------------------------------------

/// After the first exchange, bob logs in a second device on box B. Box B
/// tells box A (`m.device_list_update` EDU); alice's `/sync` names bob in
/// `device_lists.changed`; her SDK asks for his keys again (remote
/// `/keys/query`), claims a one-time key of the new device (remote
/// `/keys/claim`) and sends it the room key. Her next message must decrypt
/// on the new device (and on the old one), and the new device's own message
/// must decrypt for alice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_device_across_boxes() {
    bounded("second_device_across_boxes", 240, async {
        let x = Boxes::start().await?;
        let r = async {
            let rid = x.encrypted_room().await?;
            let alice_room = joined_room(&x.alice, &rid)?;

            let t0 = "before bob's second device";
            let m0 = send_text(&alice_room, t0).await?;
            wait_decrypted("bob#1 (B)", &x.bob, &rid, &m0, t0).await?;

            // alice's position before the new device exists.
            let t_before = sync_once(&x.alice).await?.next_batch;

            let bob2 = x.b.login("bob", "bob's second device").await?;
            let bob2_dev = device_id(&bob2)?;
            sync_once(&bob2).await.context("bob#2 initial sync (box B)")?;
            wait_joined("bob#2", &bob2, &rid).await?;
            ensure!(
                local_device_keys(&x.b, &bob2, x.bob_id.as_str(), bob2_dev.as_str())
                    .await?
                    .is_some(),
                "POST /keys/query on box B: no keys for bob's new device {bob2_dev} after its \
                 first sync"
            );

            // Box A can return the new device through federation (raw
            // /keys/query by alice on A, which A forwards to B).
            let deadline = Instant::now() + FED_WITHIN;
            loop {
                if local_device_keys(&x.a, &x.alice, x.bob_id.as_str(), bob2_dev.as_str())
                    .await?
                    .is_some()
                {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "POST /keys/query on box A for {} (forwarded to box B as federation \
                     /user/keys/query) never listed the new device {bob2_dev} within {FED_WITHIN:?}",
                    x.bob_id
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }

            // Box B told box A (m.device_list_update EDU): alice's box lists
            // bob as changed since `t_before` (GET /keys/changes on A, which
            // reads the same table as /sync's device_lists.changed).
            let alice_raw = x.a.raw_as(&x.alice)?;
            let deadline = Instant::now() + FED_WITHIN;
            loop {
                let now = sync_once(&x.alice).await?.next_batch;
                let ch = alice_raw
                    .ok("GET", &format!("/keys/changes?from={t_before}&to={now}"), None)
                    .await?;
                let changed = ch["changed"].as_array().cloned().unwrap_or_default();
                if changed.iter().any(|u| u == x.bob_id.as_str()) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "box A never listed {} in device_lists.changed within {FED_WITHIN:?} after \
                     bob's new device {bob2_dev} uploaded its keys on box B (the \
                     m.device_list_update EDU B -> A did not arrive or was not recorded); \
                     last GET /keys/changes?from={t_before}&to={now}: {ch}",
                    x.bob_id
                );
            }

            // alice's client learns of it through her /sync on A.
            wait_knows_device("alice (A)", &x.alice, &x.bob_id, &bob2_dev).await?;

            let t1 = "after bob's second device appeared";
            let m1 = send_text(&alice_room, t1).await?;
            wait_decrypted("bob#2 (B)", &bob2, &rid, &m1, t1).await?;
            wait_decrypted("bob#1 (B)", &x.bob, &rid, &m1, t1).await?;

            let t2 = "hello from bob's second device";
            let m2 = send_text(&joined_room(&bob2, &rid)?, t2).await.context("bob#2 sending")?;
            wait_decrypted("alice (A)", &x.alice, &rid, &m2, t2).await?;
            wait_decrypted("bob#1 (B)", &x.bob, &rid, &m2, t2).await?;
            Ok(())
        }
        .await;
        x.annotate(r)
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Plain messages, typing and receipts across the boxes
// ---------------------------------------------------------------------------

/// An unencrypted public room on box A that bob (B) joins by id through A.
/// Messages both ways; bob's typing notice (`m.typing` EDU B -> A) shows in
/// alice's sync, on and then off; alice's read receipt (`m.receipt` EDU
/// A -> B) shows in bob's sync and in his client's receipt store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_and_typing_across_boxes() {
    bounded("plain_messages_and_typing_across_boxes", 240, async {
        let x = Boxes::start().await?;
        let r = async {
            let rid = x.public_room().await?;
            let alice_room = joined_room(&x.alice, &rid)?;
            let bob_room = joined_room(&x.bob, &rid)?;
            let (alice_s, bob_s) = (x.alice_id.to_string(), x.bob_id.to_string());

            // A -> B
            let t1 = "plain hello from box A";
            let m1 = send_text(&alice_room, t1).await?.to_string();
            sync_until(&x.bob, "alice's plain message (from box A)", FED_WITHIN, |r| {
                timeline(r, &rid).iter().any(|e| plain_message(e, &m1, &alice_s, t1))
            })
            .await?;

            // B -> A
            let t2 = "plain reply from box B";
            let m2 = send_text(&bob_room, t2).await?;
            let m2_s = m2.to_string();
            sync_until(&x.alice, "bob's plain message (from box B)", FED_WITHIN, |r| {
                timeline(r, &rid).iter().any(|e| plain_message(e, &m2_s, &bob_s, t2))
            })
            .await?;

            // Typing on B, seen on A.
            bob_room
                .typing_notice(true)
                .await
                .at("PUT /rooms/{roomId}/typing/{userId} typing=true (bob, box B)")?;
            sync_until(&x.alice, "m.typing listing bob (m.typing EDU from box B)", FED_WITHIN, |r| {
                ephemeral(r, &rid).iter().any(|e| {
                    e["type"] == "m.typing"
                        && e["content"]["user_ids"]
                            .as_array()
                            .is_some_and(|ids| ids.iter().any(|u| u == bob_s.as_str()))
                })
            })
            .await?;
            bob_room
                .typing_notice(false)
                .await
                .at("PUT /rooms/{roomId}/typing/{userId} typing=false (bob, box B)")?;
            sync_until(&x.alice, "m.typing without bob (typing=false EDU from box B)", FED_WITHIN, |r| {
                ephemeral(r, &rid).iter().any(|e| {
                    e["type"] == "m.typing"
                        && e["content"]["user_ids"]
                            .as_array()
                            .is_some_and(|ids| !ids.iter().any(|u| u == bob_s.as_str()))
                })
            })
            .await?;

            // Read receipt on A for bob's message, seen on B.
            alice_room
                .send_single_receipt(CreateReceiptType::Read, ReceiptThread::Unthreaded, m2.clone())
                .await
                .at("POST /rooms/{roomId}/receipt/m.read/{eventId} (alice, box A)")?;
            let mut raw_receipt = None;
            sync_until(&x.bob, "alice's m.read receipt (m.receipt EDU from box A)", FED_WITHIN, |r| {
                for e in ephemeral(r, &rid) {
                    if e["type"] == "m.receipt"
                        && e["content"][m2_s.as_str()]["m.read"][alice_s.as_str()]["ts"].is_u64()
                    {
                        raw_receipt = Some(e);
                        return true;
                    }
                }
                false
            })
            .await?;
            let stored = bob_room
                .load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &x.alice_id)
                .await
                .at("load_user_receipt (bob's client store)")?;
            match stored {
                Some((ev, _)) if ev == m2 => {}
                other => bail!(
                    "bob's client store has alice's receipt on {:?}, expected {m2}; raw m.receipt: {:?}",
                    other.map(|(e, _)| e),
                    raw_receipt
                ),
            }
            Ok(())
        }
        .await;
        x.annotate(r)
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Knocking on a room of the other box
// ---------------------------------------------------------------------------

/// alice's room on box A takes knocks; bob (B) knocks through A with a
/// reason (federation make_knock/send_knock), his client holds the room as
/// knocked, alice sees the knock, invites him, and he joins and talks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knock_across_boxes() {
    bounded("knock_across_boxes", 240, async {
        let x = Boxes::start().await?;
        let r = async {
            let mut req = create_room::v3::Request::new();
            req.preset = Some(create_room::v3::RoomPreset::PublicChat);
            req.name = Some("knock to enter".to_owned());
            let alice_room = x
                .alice
                .create_room(req)
                .await
                .at("POST /createRoom (public_chat) on box A")?;
            alice_room
                .send_state_event(RoomJoinRulesEventContent::new(JoinRule::Knock))
                .await
                .at("PUT /rooms/{roomId}/state/m.room.join_rules/ (knock) on box A")?;
            let rid = alice_room.room_id().to_owned();

            let knocked = x
                .bob
                .knock(
                    rid.clone().into(),
                    Some("let me in, please".to_owned()),
                    vec![x.a_name()?],
                )
                .await
                .at("POST /knock/{roomId}?via=<box A> on box B (federation make_knock/send_knock to A)")?;
            ensure!(
                knocked.state() == RoomState::Knocked,
                "bob's room after knocking is {:?}, expected Knocked",
                knocked.state()
            );
            let (r2, bob_s) = (rid.clone(), x.bob_id.to_string());
            sync_until(&x.alice, "bob's knock (from box B) in alice's /sync", FED_WITHIN, |r| {
                timeline_and_state(r, &r2).iter().any(|e| {
                    e["state_key"] == bob_s.as_str()
                        && e["content"]["membership"] == "knock"
                        && e["content"]["reason"] == "let me in, please"
                })
            })
            .await?;

            alice_room
                .invite_user_by_id(&x.bob_id)
                .await
                .at("POST /rooms/{roomId}/invite on box A for the knocking @bob of box B")?;
            sync_until(&x.bob, "the invite answering bob's knock", FED_WITHIN, |r| {
                r.rooms.invited.contains_key(&r2)
            })
            .await?;
            let room = x
                .bob
                .get_room(&rid)
                .ok_or_else(|| anyhow!("bob saw the invite but his client has no room object"))?;
            ensure!(
                room.state() == RoomState::Invited,
                "bob's room after the invite is {:?}, expected Invited",
                room.state()
            );
            room.join()
                .await
                .at("POST /rooms/{roomId}/join on box B after the invite (make_join/send_join to A)")?;
            x.both_see_join(&rid).await?;
            let text = "thanks for letting me in";
            let m = send_text(&joined_room(&x.bob, &rid)?, text).await?.to_string();
            sync_until(&x.alice, "bob's message after the knock", FED_WITHIN, |r| {
                timeline(r, &r2)
                    .iter()
                    .any(|e| plain_message(e, &m, &bob_s, text))
            })
            .await
        }
        .await;
        x.annotate(r)
    })
    .await;
}
