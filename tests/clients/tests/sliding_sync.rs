//! The room list over Simplified Sliding Sync (MSC4186), driven the way
//! Element X drives it: matrix-sdk-ui's `RoomListService` (and `SyncService`,
//! which runs the room list plus the encryption sync side by side), with the
//! `all_rooms` list watched through `entries_with_dynamic_adapters`.
//!
//! The user whose list is watched never calls `/sync` (v2): whatever the list
//! shows came through `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::{pin_mut, StreamExt};
use matrix_sdk::deserialized_responses::RawSyncOrStrippedState;
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType as CreateReceiptType;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::receipt::ReceiptThread;
use matrix_sdk::ruma::events::room::create::RoomCreateEventContent;
use matrix_sdk::ruma::events::room::history_visibility::RoomHistoryVisibilityEventContent;
use matrix_sdk::ruma::events::room::join_rules::RoomJoinRulesEventContent;
use matrix_sdk::ruma::events::room::power_levels::RoomPowerLevelsEventContent;
use matrix_sdk::ruma::{OwnedRoomId, RoomId, UserId};
use matrix_sdk::{Client, EncryptionState, Room, RoomState};
use matrix_sdk_ui::eyeball_im::Vector;
use matrix_sdk_ui::room_list_service::filters::new_filter_non_left;
use matrix_sdk_ui::room_list_service::{
    RoomList, RoomListItem, RoomListLoadingState, RoomListService,
};
use matrix_sdk_ui::sync_service::{State as SyncServiceState, SyncService};
use serde_json::json;
use tokio::task::JoinHandle;

use common::*;

/// The room list as a UI holds it: the `all_rooms` entries (non-left rooms,
/// sorted the SDK's way), kept up to date by applying each `VectorDiff` from
/// `entries_with_dynamic_adapters`, plus whatever went wrong while syncing.
struct ListWatch {
    who: String,
    entries: Arc<Mutex<Vector<RoomListItem>>>,
    loading: eyeball::Subscriber<RoomListLoadingState>,
    errors: Arc<Mutex<Vec<String>>>,
    /// For `SyncService`: its state, checked for `Error` on every poll.
    service_state: Option<eyeball::Subscriber<SyncServiceState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ListWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn describe_room(r: &Room) -> String {
    let c = r.unread_notification_counts();
    format!(
        "{} [{:?}] name={:?} joined={} server_counts=({}, {}) client_unread=(msgs {}, notifs {}, mentions {}) recency={:?}",
        r.room_id(),
        r.state(),
        r.name(),
        r.joined_members_count(),
        c.notification_count,
        c.highlight_count,
        r.num_unread_messages(),
        r.num_unread_notifications(),
        r.num_unread_mentions(),
        r.recency_stamp(),
    )
}

impl ListWatch {
    /// Watch `list`'s entries (all non-left rooms, one page of 100).
    fn start(who: &str, list: RoomList, errors: Arc<Mutex<Vec<String>>>) -> ListWatch {
        let entries: Arc<Mutex<Vector<RoomListItem>>> = Arc::default();
        let loading = list.loading_state();
        let mirror = entries.clone();
        let errs = errors.clone();
        let task = tokio::spawn(async move {
            let (stream, controller) = list.entries_with_dynamic_adapters(100);
            // Nothing is yielded until a filter is set (as in Element X).
            if !controller.set_filter(Box::new(new_filter_non_left())) {
                errs.lock()
                    .unwrap()
                    .push("RoomList: set_filter had no effect".into());
            }
            pin_mut!(stream);
            while let Some(diffs) = stream.next().await {
                let mut v = mirror.lock().unwrap();
                for d in diffs {
                    d.apply(&mut v);
                }
            }
            errs.lock()
                .unwrap()
                .push("RoomList: the entries stream ended".into());
        });
        ListWatch {
            who: who.to_owned(),
            entries,
            loading,
            errors,
            service_state: None,
            tasks: vec![task],
        }
    }

    fn rooms(&self) -> Vec<Room> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|i| (**i).clone())
            .collect()
    }

    fn find(&self, room_id: &RoomId) -> Option<Room> {
        self.rooms().into_iter().find(|r| r.room_id() == room_id)
    }

    fn dump(&self) -> String {
        let rooms = self.rooms();
        if rooms.is_empty() {
            return "  (empty)".into();
        }
        rooms
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  #{i} {}", describe_room(r)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn health(&self) -> Result<()> {
        let errs = self.errors.lock().unwrap();
        if !errs.is_empty() {
            bail!(
                "{}'s sliding sync failed:\n  {}",
                self.who,
                errs.join("\n  ")
            );
        }
        if let Some(s) = &self.service_state {
            if let SyncServiceState::Error(e) = s.get() {
                bail!(
                    "{}'s SyncService went into State::Error: {e} ({e:?})",
                    self.who
                );
            }
        }
        Ok(())
    }

    /// Poll the list until `check` is true, or fail after `within` with the
    /// list as it stands.
    async fn wait<F>(&self, what: &str, within: Duration, mut check: F) -> Result<()>
    where
        F: FnMut(&[Room]) -> bool,
    {
        let deadline = Instant::now() + within;
        loop {
            self.health()?;
            if check(&self.rooms()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: timed out after {within:?} waiting for {what}; room list now (loading state {:?}):\n{}",
                    self.who,
                    self.loading.get(),
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_room<F>(&self, room_id: &RoomId, what: &str, mut check: F) -> Result<Room>
    where
        F: FnMut(&Room) -> bool,
    {
        let mut found = None;
        self.wait(what, SEE_WITHIN, |rooms| {
            found = rooms
                .iter()
                .find(|r| r.room_id() == room_id && check(r))
                .cloned();
            found.is_some()
        })
        .await?;
        Ok(found.expect("set when wait returned"))
    }
}

/// `RoomListService::new(client)` and its `sync()` stream polled in a spawned
/// task (as matrix-sdk-ui's own tests drive it); the first error ends the
/// loop and is recorded.
async fn room_list_service(
    who: &str,
    client: &Client,
) -> Result<(Arc<RoomListService>, ListWatch)> {
    let rls = Arc::new(
        RoomListService::new(client.clone())
            .await
            .map_err(|e| anyhow!("RoomListService::new: {e}"))?,
    );
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let list = rls
        .all_rooms()
        .await
        .map_err(|e| anyhow!("RoomListService::all_rooms: {e}"))?;
    let mut watch = ListWatch::start(who, list, errors.clone());
    let svc = rls.clone();
    let sync_task = tokio::spawn(async move {
        let stream = svc.sync();
        pin_mut!(stream);
        while let Some(r) = stream.next().await {
            if let Err(e) = r {
                let detail = match &e {
                    matrix_sdk_ui::room_list_service::Error::SlidingSync(inner) => describe(inner),
                    other => format!("{other} ({other:?})"),
                };
                errors.lock().unwrap().push(format!(
                    "POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync: {detail}"
                ));
                break;
            }
        }
    });
    watch.tasks.push(sync_task);
    Ok((rls, watch))
}

/// `SyncService` (room list + encryption sync, two sliding sync connections),
/// started, with its room list watched.
async fn sync_service(who: &str, client: &Client) -> Result<(SyncService, ListWatch)> {
    let svc = SyncService::builder(client.clone())
        .build()
        .await
        .map_err(|e| anyhow!("SyncService::build: {e}"))?;
    svc.start().await;
    let list = svc
        .room_list_service()
        .all_rooms()
        .await
        .map_err(|e| anyhow!("RoomListService::all_rooms: {e}"))?;
    let mut watch = ListWatch::start(who, list, Arc::default());
    watch.service_state = Some(svc.state());
    Ok((svc, watch))
}

async fn wait_loaded(w: &ListWatch, rooms: u32) -> Result<()> {
    let deadline = Instant::now() + SEE_WITHIN;
    loop {
        w.health()?;
        let state = w.loading.get();
        if state
            == (RoomListLoadingState::Loaded {
                maximum_number_of_rooms: Some(rooms),
            })
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: list `all_rooms` not loaded with count {rooms} within {SEE_WITHIN:?} \
                 (loading state {state:?}); lists.all_rooms.count in the sliding sync response \
                 drives this; entries:\n{}",
                w.who,
                w.dump()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `whose` device keys are on the server (`/keys/query` as
/// `asker`), so messages encrypted afterwards are shared with that device.
async fn wait_device_keys(server: &Secta, asker: &Client, whose: &Client) -> Result<()> {
    let raw = server.raw_as(asker)?;
    let uid = whose
        .user_id()
        .ok_or_else(|| anyhow!("logged out"))?
        .to_string();
    let dev = whose
        .device_id()
        .ok_or_else(|| anyhow!("no device id"))?
        .to_string();
    let deadline = Instant::now() + SEE_WITHIN;
    loop {
        let r = raw
            .ok(
                "POST",
                "/keys/query",
                Some(&json!({ "device_keys": { &uid: [] } })),
            )
            .await?;
        if r["device_keys"][&uid][&dev].is_object() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{uid}'s device {dev} never uploaded its keys while on sliding sync \
                 (POST /keys/query: {r})"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_room(
    client: &Client,
    preset: create_room::v3::RoomPreset,
    name: &str,
) -> Result<Room> {
    let mut req = create_room::v3::Request::new();
    req.preset = Some(preset);
    req.name = Some(name.to_owned());
    client
        .create_room(req)
        .await
        .at("POST /_matrix/client/v3/createRoom")
}

fn enc(path_part: &str) -> String {
    path_part
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// (a) A room another user made, joined (over plain HTTP, so the client learns
/// of it only through sliding sync), shows up in the list as joined, with its
/// name. (b) An invite shows up as invited, with the inviter; accepting it
/// (as Element X does, `Room::join`) leaves a complete joined room behind.
/// A new message moves its room to the top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_list_shows_joined_rooms_and_invites() {
    bounded("room_list_shows_joined_rooms_and_invites", 150, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let alice_id = UserId::parse(server.user_id("alice"))?;
        let bob_id = UserId::parse(server.user_id("bob"))?;

        let (rls, list) = room_list_service("bob", &bob).await?;
        wait_loaded(&list, 0)
            .await
            .context("bob's empty room list")?;

        // (a) alice's public room; bob joins it over plain HTTP.
        let lounge = create_room(
            &alice,
            create_room::v3::RoomPreset::PublicChat,
            "Alice's lounge",
        )
        .await?;
        let lounge_id: OwnedRoomId = lounge.room_id().to_owned();
        send_text(&lounge, "welcome to the lounge").await?;
        server
            .raw_as(&bob)?
            .ok(
                "POST",
                &format!("/join/{}", enc(lounge_id.as_str())),
                Some(&json!({})),
            )
            .await
            .context("bob joins alice's room")?;
        let room = list
            .wait_room(
                &lounge_id,
                "alice's room, joined, named, with 2 members",
                |r| {
                    r.state() == RoomState::Joined
                        && r.name().as_deref() == Some("Alice's lounge")
                        && r.joined_members_count() == 2
                },
            )
            .await
            .context("(a) a room bob joined appears in his list")?;
        wait_loaded(&list, 1).await?;
        ensure!(
            matches!(room.encryption_state(), EncryptionState::NotEncrypted),
            "public_chat room: bob's client thinks its encryption state is {:?} \
             (m.room.encryption is in required_state, so absent means not encrypted)",
            room.encryption_state()
        );

        // (b) An invite to an encrypted private chat.
        let secret = create_room(
            &alice,
            create_room::v3::RoomPreset::PrivateChat,
            "Secret plans",
        )
        .await?;
        let secret_id: OwnedRoomId = secret.room_id().to_owned();
        secret
            .invite_user_by_id(&bob_id)
            .await
            .at("POST /rooms/{roomId}/invite (alice invites bob)")?;
        let invited = list
            .wait_room(&secret_id, "the invite, as Invited, with its name", |r| {
                r.state() == RoomState::Invited && r.name().as_deref() == Some("Secret plans")
            })
            .await
            .context("(b) the invite appears in bob's list")?;
        wait_loaded(&list, 2).await?;
        let details = invited
            .invite_details()
            .await
            .at("Room::invite_details (from invite_state)")?;
        ensure!(
            details.inviter_id == alice_id,
            "invite_details().inviter_id is {}, expected {alice_id} (the sender of bob's \
             m.room.member invite in invite_state)",
            details.inviter_id
        );
        ensure!(
            invited.encryption_state().is_encrypted(),
            "invited room: encryption state {:?}; the invite_state carries m.room.encryption",
            invited.encryption_state()
        );
        if details.inviter.is_none() {
            eprintln!(
                "NOTE: invite_state has no m.room.member event for the inviter {alice_id} \
                 (the spec says the stripped state SHOULD include the sender's membership), \
                 so the client cannot show alice's display name/avatar on the invite"
            );
        }

        // Accept the invite the way Element X does.
        invited
            .join()
            .await
            .at("POST /join/{roomId} (bob accepts through Room::join)")?;
        let joined = list
            .wait_room(
                &secret_id,
                "the accepted invite as a joined room with 2 members",
                |r| r.state() == RoomState::Joined && r.joined_members_count() == 2,
            )
            .await
            .context("(b) the accepted invite turns into a joined room")?;
        ensure!(
            joined.encryption_state().is_encrypted(),
            "joined room: encryption state {:?}, expected encrypted",
            joined.encryption_state()
        );
        // A new message in the older room moves it to the top.
        list.wait(
            "both rooms listed, the one joined last first",
            SEE_WITHIN,
            |rooms| rooms.len() == 2 && rooms[0].room_id() == secret_id,
        )
        .await?;
        send_text(&lounge, "news in the lounge").await?;
        list.wait(
            "alice's lounge first (latest activity)",
            SEE_WITHIN,
            |rooms| rooms.first().is_some_and(|r| r.room_id() == lounge_id),
        )
        .await
        .context("room order follows bump_stamp / latest activity")?;

        // After the join the client must hold the room's state as a member,
        // not only the stripped invite state: the room list asks for these in
        // required_state (DEFAULT_REQUIRED_STATE), so the first response after
        // the join has to bring them (MSC4186: a newly joined room is sent as
        // `initial`, with its full required_state).
        let deadline = Instant::now() + SEE_WITHIN;
        loop {
            let mut missing = Vec::new();
            macro_rules! need {
                ($c:ty, $name:expr) => {
                    match joined
                        .get_state_event_static::<$c>()
                        .await
                        .at("state store")?
                    {
                        Some(RawSyncOrStrippedState::Sync(_)) => {}
                        Some(RawSyncOrStrippedState::Stripped(_)) => {
                            missing.push(format!("{} (only stripped invite state)", $name))
                        }
                        None => missing.push($name.to_string()),
                    }
                };
            }
            need!(RoomCreateEventContent, "m.room.create");
            need!(RoomPowerLevelsEventContent, "m.room.power_levels");
            need!(RoomJoinRulesEventContent, "m.room.join_rules");
            need!(
                RoomHistoryVisibilityEventContent,
                "m.room.history_visibility"
            );
            if missing.is_empty() {
                break;
            }
            list.health()?;
            if Instant::now() >= deadline {
                bail!(
                    "after bob joined {secret_id} from an invite, his client still lacks \
                     {missing:?} although the list's required_state asks for them: the \
                     sliding sync response after the join sent the room as an update \
                     (state since the invite only), not as `initial` with full required_state"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        rls.stop_sync().map_err(|e| anyhow!("stop_sync: {e}"))?;
        Ok(())
    })
    .await;
}

/// (c) With `SyncService` (room list plus encryption sync, as Element X runs
/// them), new messages in an encrypted room raise the room's unread counts,
/// both the server's (`notification_count`) and the ones the client computes
/// from the decrypted events; a read receipt brings both back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_rise_and_fall_with_read_receipts() {
    bounded(
        "unread_counts_rise_and_fall_with_read_receipts",
        180,
        async {
            let server = Secta::start().await?;
            let token = server.invite(2)?;
            let alice = server.register("alice", &token).await?;
            let bob = server.register("bob", &token).await?;
            let bob_id = UserId::parse(server.user_id("bob"))?;
            sync_once(&alice).await.context("alice initial sync")?;

            let (svc, list) = sync_service("bob", &bob).await?;
            wait_loaded(&list, 0).await?;
            wait_device_keys(&server, &alice, &bob).await?;

            let room = create_room(
                &alice,
                create_room::v3::RoomPreset::PrivateChat,
                "Unread test",
            )
            .await?;
            let room_id: OwnedRoomId = room.room_id().to_owned();
            room.invite_user_by_id(&bob_id)
                .await
                .at("POST /rooms/{roomId}/invite")?;
            let invited = list
                .wait_room(&room_id, "the invite", |r| r.state() == RoomState::Invited)
                .await?;
            invited
                .join()
                .await
                .at("POST /join/{roomId} (bob accepts through Room::join)")?;
            let bob_uid = bob_id.to_string();
            let rid = room_id.clone();
            sync_until(&alice, "bob's join", SEE_WITHIN, |r| {
                timeline_and_state(r, &rid).iter().any(|e| {
                    e["type"] == "m.room.member"
                        && e["state_key"] == bob_uid.as_str()
                        && e["content"]["membership"] == "join"
                })
            })
            .await?;
            list.wait_room(&room_id, "the joined room with 2 members", |r| {
                r.state() == RoomState::Joined && r.joined_members_count() == 2
            })
            .await?;

            // Three messages, one at a time (the list's timeline_limit is 1, so
            // each must arrive in its own response for the client to count it).
            let alice_room = alice
                .get_room(&room_id)
                .ok_or_else(|| anyhow!("alice has no room"))?;
            let mut last = None;
            for i in 1..=3u64 {
                last = Some(send_text(&alice_room, &format!("unread message {i}")).await?);
                list.wait_room(&room_id, &format!("server notification_count {i}"), |r| {
                    r.unread_notification_counts().notification_count == i
                })
                .await
                .with_context(|| format!("(c) after alice's message {i}"))?;
            }
            let last = last.expect("three messages sent");
            let r = list
                .wait_room(
                    &room_id,
                    "client-side counts of 3 unread messages / 3 notifications",
                    |r| r.num_unread_messages() == 3 && r.num_unread_notifications() == 3,
                )
                .await
                .context("(c) counts computed by the client from the decrypted events")?;
            ensure!(
                r.unread_notification_counts().highlight_count == 0 && r.num_unread_mentions() == 0,
                "plain messages raised a highlight: {}",
                describe_room(&r)
            );

            // The room key came through the encryption sync's to_device extension.
            let ev = r
                .event(&last, None)
                .await
                .at("GET /rooms/{roomId}/event/{eventId}")?;
            let ev = json_of(&ev);
            ensure!(
                body(&ev) == Some("unread message 3"),
                "bob cannot read alice's last message (room key not delivered over the \
             encryption sliding sync?): {ev}"
            );

            // Reading brings the counts down.
            r.send_single_receipt(
                CreateReceiptType::Read,
                ReceiptThread::Unthreaded,
                last.clone(),
            )
            .await
            .at("POST /rooms/{roomId}/receipt/m.read/{eventId}")?;
            list.wait_room(
                &room_id,
                "all counts back at 0 after the read receipt",
                |r| {
                    let c = r.unread_notification_counts();
                    c.notification_count == 0
                        && c.highlight_count == 0
                        && r.num_unread_messages() == 0
                        && r.num_unread_notifications() == 0
                },
            )
            .await
            .context("(c) a read receipt on the latest message clears the counts")?;

            // bob writes back; alice decrypts it (bob's client, fed only by
            // sliding sync, knows the room is encrypted and who is in it).
            ensure!(
            !matches!(r.encryption_state(), EncryptionState::NotEncrypted),
            "bob's client thinks the encrypted room is NOT encrypted and would send in the clear"
        );
            let reply = send_text(&r, "read them all, thanks").await?;
            let want = reply.to_string();
            let rid = room_id.clone();
            sync_until(&alice, "bob's encrypted reply", SEE_WITHIN, |resp| {
                timeline(resp, &rid).iter().any(|e| {
                    e["event_id"] == want.as_str() && body(e) == Some("read them all, thanks")
                })
            })
            .await?;
            // Sending marks the room read for bob too (his own message is newest).
            let r = list
                .find(&room_id)
                .ok_or_else(|| anyhow!("room left the list"))?;
            ensure!(
                r.unread_notification_counts().notification_count == 0,
                "after bob's own message: {}",
                describe_room(&r)
            );

            svc.stop().await;
            Ok(())
        },
    )
    .await;
}

/// A raw sliding sync connection: one request body, the `pos` carried along.
struct RawConn {
    raw: RawHttp,
    body: serde_json::Value,
    pos: Option<String>,
}

const SS_PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

impl RawConn {
    fn new(raw: RawHttp, required_state: serde_json::Value) -> RawConn {
        let body = json!({
            "conn_id": "raw",
            "lists": { "all": { "ranges": [[0, 19]], "timeline_limit": 1, "required_state": required_state } }
        });
        RawConn {
            raw,
            body,
            pos: None,
        }
    }

    async fn once(&mut self, timeout_ms: u64) -> Result<serde_json::Value> {
        let path = match &self.pos {
            Some(p) => format!("{SS_PATH}?pos={p}&timeout={timeout_ms}"),
            None => format!("{SS_PATH}?timeout=0"),
        };
        let r = self.raw.call_abs("POST", &path, Some(&self.body)).await?;
        ensure!(r.status == 200, "POST {path}: HTTP {} {}", r.status, r.body);
        self.pos = Some(
            r.body["pos"]
                .as_str()
                .ok_or_else(|| anyhow!("POST {path}: no string `pos` in {}", r.body))?
                .to_owned(),
        );
        Ok(r.body)
    }

    /// Sync until `rooms.{room}` is present; return that room's JSON.
    async fn until_room(&mut self, room: &str, what: &str) -> Result<serde_json::Value> {
        for _ in 0..10 {
            let b = self.once(2000).await?;
            if b["rooms"][room].is_object() {
                return Ok(b["rooms"][room].clone());
            }
        }
        bail!("rooms.{room} never came down on the raw connection ({what})")
    }
}

fn state_keys(room_json: &serde_json::Value) -> Vec<String> {
    room_json["required_state"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    format!(
                        "{}/{}={}",
                        e["type"].as_str().unwrap_or("?"),
                        e["state_key"].as_str().unwrap_or("?"),
                        e["content"]["membership"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Raw HTTP: after a kick, the room comes down once more, and its
/// `required_state` carries the user's own `leave` membership ($ME asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_kick_sends_own_leave_in_required_state() {
    bounded("raw_kick_sends_own_leave_in_required_state", 90, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let bob_uid = server.user_id("bob");
        let mut conn = RawConn::new(
            server.raw_as(&bob)?,
            json!([
                ["m.room.member", "$ME"],
                ["m.room.name", ""],
                ["m.room.create", ""]
            ]),
        );
        conn.once(0).await?;
        let lounge = create_room(
            &alice,
            create_room::v3::RoomPreset::PublicChat,
            "Alice's lounge",
        )
        .await?;
        let rid = lounge.room_id().to_string();
        server
            .raw_as(&bob)?
            .ok("POST", &format!("/join/{}", enc(&rid)), Some(&json!({})))
            .await?;
        conn.until_room(&rid, "after the join").await?;
        lounge
            .kick_user(&UserId::parse(&bob_uid)?, Some("closing time"))
            .await
            .at("POST /rooms/{roomId}/kick")?;
        let room_json = conn.until_room(&rid, "after the kick").await?;
        let keys = state_keys(&room_json);
        ensure!(
            keys.iter()
                .any(|k| k == &format!("m.room.member/{bob_uid}=leave")),
            "the response after bob was kicked has required_state {keys:?}: no m.room.member \
             for bob with membership leave, although the list asks for [m.room.member, $ME]; \
             matrix-sdk reads its own membership only from required_state, so the room stays \
             Joined in the client. Room JSON: {room_json}"
        );
        Ok(())
    })
    .await;
}

/// Raw HTTP: messages sent after a user was kicked must not reach that user
/// in the response that tells them about the kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_kicked_user_gets_nothing_after_the_kick() {
    bounded("raw_kicked_user_gets_nothing_after_the_kick", 90, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let bob_uid = server.user_id("bob");
        let mut conn = RawConn::new(server.raw_as(&bob)?, json!([["m.room.member", "$ME"]]));
        conn.once(0).await?;
        let lounge = create_room(
            &alice,
            create_room::v3::RoomPreset::PublicChat,
            "Alice's lounge",
        )
        .await?;
        let rid = lounge.room_id().to_string();
        server
            .raw_as(&bob)?
            .ok("POST", &format!("/join/{}", enc(&rid)), Some(&json!({})))
            .await?;
        conn.until_room(&rid, "after the join").await?;
        // The same over /sync v2, for comparison.
        let raw = server.raw_as(&bob)?;
        let v2 = raw.sync(None, 0).await?;
        let since = v2["next_batch"].as_str().unwrap_or_default().to_owned();
        // Kick, then talk, all before bob's next request.
        lounge
            .kick_user(&UserId::parse(&bob_uid)?, None)
            .await
            .at("POST /rooms/{roomId}/kick")?;
        send_text(&lounge, "now that bob is gone: his surprise party").await?;
        let mut problems = Vec::new();
        let room_json = conn.until_room(&rid, "after the kick").await?;
        let leaked: Vec<&str> = room_json["timeline"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["content"]["body"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !leaked.is_empty() {
            problems.push(format!(
                "sliding sync: bob, kicked, received messages sent after his kick: {leaked:?} \
                 (timeline of the left room runs past his leave). Room JSON: {room_json}"
            ));
        }
        let v2 = raw.sync(Some(&since), 0).await?;
        let left = &v2["rooms"]["leave"][&rid];
        let leaked: Vec<&str> = left["timeline"]["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["content"]["body"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !left.is_object() {
            problems.push(format!(
                "/sync v2: rooms.leave.{rid} missing after the kick: {}",
                v2["rooms"]
            ));
        } else if !leaked.is_empty() {
            problems.push(format!(
                "/sync v2: rooms.leave.{rid}.timeline has messages sent after the kick: {leaked:?}"
            ));
        }
        ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    })
    .await;
}

/// Raw HTTP: a list reports its room count and the response carries a `pos`;
/// a `pos` the server never gave out gets 400 `M_UNKNOWN_POS`, which is what
/// makes matrix-sdk drop its session and start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_list_count_and_unknown_pos() {
    bounded("raw_list_count_and_unknown_pos", 90, async {
        let server = Secta::start().await?;
        let token = server.invite(1)?;
        let bob = server.register("bob", &token).await?;
        create_room(&bob, create_room::v3::RoomPreset::PrivateChat, "one").await?;
        let raw = server.raw_as(&bob)?;
        let path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
        let body = json!({
            "conn_id": "raw",
            "lists": { "l": { "ranges": [[0, 9]], "timeline_limit": 1, "required_state": [["m.room.name", ""]] } }
        });
        let first = raw.call_abs("POST", &format!("{path}?timeout=0"), Some(&body)).await?;
        ensure!(first.status == 200, "POST {path}: HTTP {} {}", first.status, first.body);
        ensure!(
            first.body["lists"]["l"]["count"] == 1 && first.body["pos"].is_string(),
            "POST {path}: expected lists.l.count 1 and a string pos, got {}",
            first.body
        );
        let bogus = raw
            .call_abs("POST", &format!("{path}?pos=999999&timeout=0"), Some(&body))
            .await?;
        ensure!(
            bogus.status == 400 && bogus.errcode() == "M_UNKNOWN_POS",
            "POST {path}?pos=999999: expected 400 M_UNKNOWN_POS, got HTTP {} {}",
            bogus.status,
            bogus.body
        );
        Ok(())
    })
    .await;
}

/// Raw HTTP: on one connection, an invite arrives as `invite_state`; after the
/// user joins, the room must come down again as `initial` with its full
/// `required_state` (the client only had stripped state until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_invite_then_join_sends_full_required_state() {
    bounded(
        "raw_invite_then_join_sends_full_required_state",
        90,
        async {
            let server = Secta::start().await?;
            let token = server.invite(2)?;
            let alice = server.register("alice", &token).await?;
            let bob = server.register("bob", &token).await?;
            let mut conn = RawConn::new(
                server.raw_as(&bob)?,
                json!([
                    ["m.room.create", ""],
                    ["m.room.power_levels", ""],
                    ["m.room.name", ""],
                    ["m.room.encryption", ""],
                    ["m.room.member", "$ME"],
                    ["m.room.history_visibility", ""]
                ]),
            );
            conn.once(0).await?;

            let room = create_room(
                &alice,
                create_room::v3::RoomPreset::PrivateChat,
                "Secret plans",
            )
            .await?;
            let rid = room.room_id().to_string();
            room.invite_user_by_id(&UserId::parse(server.user_id("bob"))?)
                .await
                .at("POST /rooms/{roomId}/invite")?;
            let invite = conn.until_room(&rid, "the invite").await?;
            ensure!(
                invite["invite_state"].is_array(),
                "the invite came down without invite_state: {invite}"
            );

            server
                .raw_as(&bob)?
                .ok("POST", &format!("/join/{}", enc(&rid)), Some(&json!({})))
                .await?;
            let room_json = conn.until_room(&rid, "after the join").await?;
            let keys = state_keys(&room_json);
            let wanted = [
                "m.room.create/",
                "m.room.power_levels/",
                "m.room.encryption/",
                "m.room.history_visibility/",
            ];
            let missing: Vec<&str> = wanted
                .iter()
                .copied()
                .filter(|w| !keys.iter().any(|k| k.starts_with(w)))
                .collect();
            ensure!(
                missing.is_empty() && room_json["initial"] == true,
                "first response after the join (invite -> join on the same connection): \
             initial={} required_state={keys:?}, missing {missing:?}; MSC4186 sends a \
             newly joined room as initial with its full required_state. Room JSON: {room_json}",
                room_json["initial"]
            );
            Ok(())
        },
    )
    .await;
}

/// (d) Opening a room as Element X does: subscribe to it (room_subscriptions,
/// timeline_limit 20), build its `Timeline`, and paginate backwards (the
/// event cache goes to `/messages` from the `prev_batch` sliding sync gave)
/// until all 45 encrypted messages are there, decrypted and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opened_room_timeline_paginates_back_through_history() {
    use matrix_sdk_ui::timeline::RoomExt;
    bounded(
        "opened_room_timeline_paginates_back_through_history",
        180,
        async {
            let server = Secta::start().await?;
            let token = server.invite(2)?;
            let alice = server.register("alice", &token).await?;
            let bob = server.register("bob", &token).await?;
            let bob_id = UserId::parse(server.user_id("bob"))?;
            sync_once(&alice).await?;
            let (svc, list) = sync_service("bob", &bob).await?;
            wait_loaded(&list, 0).await?;
            wait_device_keys(&server, &alice, &bob).await?;

            let room =
                create_room(&alice, create_room::v3::RoomPreset::PrivateChat, "History").await?;
            let room_id: OwnedRoomId = room.room_id().to_owned();
            room.invite_user_by_id(&bob_id)
                .await
                .at("POST /rooms/{roomId}/invite")?;
            let invited = list
                .wait_room(&room_id, "the invite", |r| r.state() == RoomState::Invited)
                .await?;
            invited.join().await.at("POST /join/{roomId}")?;
            let (bob_uid, rid) = (bob_id.to_string(), room_id.clone());
            sync_until(&alice, "bob's join", SEE_WITHIN, |r| {
                timeline_and_state(r, &rid).iter().any(|e| {
                    e["type"] == "m.room.member"
                        && e["state_key"] == bob_uid.as_str()
                        && e["content"]["membership"] == "join"
                })
            })
            .await?;

            const N: u64 = 45;
            for i in 1..=N {
                send_text(&room, &format!("history {i}")).await?;
            }
            let bob_room = list
                .wait_room(&room_id, &format!("server notification_count {N}"), |r| {
                    r.unread_notification_counts().notification_count == N
                })
                .await?;

            // Open the room.
            svc.room_list_service()
                .subscribe_to_rooms(&[&room_id])
                .await;
            let timeline = bob_room
                .timeline()
                .await
                .map_err(|e| anyhow!("Room::timeline: {e}"))?;
            let want: Vec<String> = (1..=N).map(|i| format!("history {i}")).collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut paginations = 0;
            loop {
                let items = timeline.items().await;
                let mut bodies = Vec::new();
                let mut utd = 0;
                for item in items.iter() {
                    if let Some(ev) = item.as_event() {
                        if ev.content().is_unable_to_decrypt() {
                            utd += 1;
                        } else if let Some(m) = ev.content().as_message() {
                            if m.body().starts_with("history ") {
                                bodies.push(m.body().to_owned());
                            }
                        }
                    }
                }
                if bodies == want {
                    break;
                }
                list.health()?;
                if Instant::now() >= deadline {
                    bail!(
                        "bob's timeline after {paginations} back-paginations holds {} of the {N} \
                     messages ({utd} undecryptable items): {bodies:?}",
                        bodies.len()
                    );
                }
                let at_start = timeline.paginate_backwards(20).await.map_err(|e| {
                    anyhow!("Timeline::paginate_backwards (GET /rooms/{{roomId}}/messages): {e}")
                })?;
                paginations += 1;
                if at_start && bodies.len() < want.len() {
                    // Reached the start of the room; give decryption a moment, then look again.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            svc.stop().await;
            Ok(())
        },
    )
    .await;
}

/// (e) Kicked from a room by someone else: the room leaves the (non-left)
/// room list and the client marks it as left. The client learns its own
/// membership in sliding sync only from `required_state` (`$ME`), not from
/// the timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_room_leaves_the_room_list() {
    bounded("kicked_room_leaves_the_room_list", 120, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let bob_id = UserId::parse(server.user_id("bob"))?;
        let (rls, list) = room_list_service("bob", &bob).await?;
        wait_loaded(&list, 0).await?;

        let lounge = create_room(
            &alice,
            create_room::v3::RoomPreset::PublicChat,
            "Alice's lounge",
        )
        .await?;
        let lounge_id: OwnedRoomId = lounge.room_id().to_owned();
        server
            .raw_as(&bob)?
            .ok(
                "POST",
                &format!("/join/{}", enc(lounge_id.as_str())),
                Some(&json!({})),
            )
            .await?;
        list.wait_room(&lounge_id, "alice's room, joined", |r| {
            r.state() == RoomState::Joined
        })
        .await?;

        lounge
            .kick_user(&bob_id, Some("closing time"))
            .await
            .at("POST /rooms/{roomId}/kick")?;
        list.wait("the room gone from bob's list", SEE_WITHIN, |rooms| {
            !rooms.iter().any(|r| r.room_id() == lounge_id)
        })
        .await
        .with_context(|| {
            format!(
                "after the kick bob's client holds the room as {:?}: the sliding sync response \
                 for a room the user left must carry the user's new m.room.member in \
                 required_state ($ME) for the SDK to see the leave",
                bob.get_room(&lounge_id).map(|r| r.state())
            )
        })?;
        let state = bob.get_room(&lounge_id).map(|r| r.state());
        ensure!(
            state == Some(RoomState::Left),
            "bob's room after the kick: {state:?}, expected Left"
        );
        rls.stop_sync().map_err(|e| anyhow!("stop_sync: {e}"))?;
        Ok(())
    })
    .await;
}

/// (f) A direct chat as Element X starts and accepts one: `create_dm` (an
/// `is_direct` invite), the invite shows as a DM, `Room::join` records it in
/// bob's `m.direct` account data, which comes back through the
/// account_data extension so the joined room is still a DM; the server's own
/// `is_dm` (room field and list filter) agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_invite_and_join_stay_a_dm() {
    bounded("direct_chat_invite_and_join_stay_a_dm", 120, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let bob_id = UserId::parse(server.user_id("bob"))?;
        let (rls, list) = room_list_service("bob", &bob).await?;
        wait_loaded(&list, 0).await?;

        let dm = alice.create_dm(&bob_id).await.at("POST /createRoom (create_dm: is_direct, invite bob)")?;
        let dm_id: OwnedRoomId = dm.room_id().to_owned();
        let invited = list.wait_room(&dm_id, "the DM invite", |r| r.state() == RoomState::Invited).await?;
        // The room list may announce the invite a moment before the client has
        // applied the DM flag from it; the server sends an invite once per
        // connection, so a flag it left out never arrives and this times out.
        let deadline = Instant::now() + SEE_WITHIN;
        while !invited.is_direct().await.context("Room::is_direct (invite)")? {
            ensure!(
                Instant::now() < deadline,
                "the invite from create_dm is not a DM for bob (invite_state m.room.member of bob \
                 should carry is_direct: true)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        invited.join().await.at("POST /join/{roomId} (Room::join marks the DM in m.direct)")?;

        let deadline = Instant::now() + SEE_WITHIN;
        loop {
            list.health()?;
            let r = bob.get_room(&dm_id).ok_or_else(|| anyhow!("bob lost the room"))?;
            let direct = r.is_direct().await.context("Room::is_direct (joined)")?;
            if r.state() == RoomState::Joined && direct {
                break;
            }
            if Instant::now() >= deadline {
                let ad = server
                    .raw_as(&bob)?
                    .call("GET", &format!("/user/{}/account_data/m.direct", enc(bob_id.as_str())), None)
                    .await?;
                bail!(
                    "bob's joined DM: state {:?}, is_direct {direct}, direct targets {:?}; \
                     GET account_data/m.direct: HTTP {} {}",
                    r.state(),
                    r.direct_targets(),
                    ad.status,
                    ad.body
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The server's view: is_dm on the room and the is_dm list filter.
        let raw = server.raw_as(&bob)?;
        let body = json!({
            "conn_id": "dm-check",
            "lists": {
                "dms": { "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "is_dm": true } },
                "groups": { "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "is_dm": false } }
            }
        });
        let r = raw.call_abs("POST", &format!("{SS_PATH}?timeout=0"), Some(&body)).await?;
        ensure!(
            r.status == 200
                && r.body["lists"]["dms"]["count"] == 1
                && r.body["lists"]["groups"]["count"] == 0
                && r.body["rooms"][dm_id.as_str()]["is_dm"] == true,
            "POST {SS_PATH} with is_dm filters: expected dms 1, groups 0, rooms.{dm_id}.is_dm true; \
             got HTTP {} lists={} is_dm={}",
            r.status,
            r.body["lists"],
            r.body["rooms"][dm_id.as_str()]["is_dm"]
        );
        rls.stop_sync().map_err(|e| anyhow!("stop_sync: {e}"))?;
        Ok(())
    })
    .await;
}
