//! Push rules as the server evaluates them, seen through `/sync`'s
//! `unread_notifications` (notification_count / highlight_count) and
//! `/notifications`: plain messages notify, mentions (`m.mentions`) and
//! keyword rules added through the push rules API highlight.
//!
//! The room is unencrypted: in an encrypted room the server cannot see the
//! body or `m.mentions`, so it cannot highlight anything.

mod common;

use anyhow::{anyhow, ensure, Context, Result};
use matrix_sdk::ruma::api::client::push::{get_pushrules_all, set_pushrule};
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType as CreateReceiptType;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::receipt::ReceiptThread;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::Mentions;
use matrix_sdk::ruma::push::{
    Action, HighlightTweakValue, NewPatternedPushRule, NewPushRule, Tweak,
};
use matrix_sdk::ruma::{OwnedEventId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use serde_json::Value;

use common::*;

/// Sync `client` until its sync reports `(notification_count, highlight_count)`
/// = `want` for `room`, then check the client's room holds the same.
async fn wait_counts(client: &Client, room: &RoomId, want: (u64, u64), after: &str) -> Result<()> {
    let mut last = None;
    let rid = room.to_owned();
    sync_until(
        client,
        &format!("unread_notifications = {want:?} after {after}"),
        SEE_WITHIN,
        |r| {
            if let Some(j) = r.rooms.joined.get(&rid) {
                let c = j.unread_notifications;
                last = Some((c.notification_count, c.highlight_count));
            }
            last == Some(want)
        },
    )
    .await
    .with_context(|| {
        format!(
            "rooms.join.{room}.unread_notifications (notification_count, highlight_count) \
             last seen in /sync: {last:?}"
        )
    })?;
    let stored = client
        .get_room(room)
        .ok_or_else(|| anyhow!("client has no room {room}"))?
        .unread_notification_counts();
    ensure!(
        (stored.notification_count, stored.highlight_count) == want,
        "the client's room holds counts {stored:?}, /sync said {want:?}"
    );
    Ok(())
}

async fn send(room: &Room, content: RoomMessageEventContent, what: &str) -> Result<OwnedEventId> {
    Ok(room
        .send(content)
        .await
        .at(&format!(
            "PUT /rooms/{{roomId}}/send/m.room.message/{{txnId}} ({what})"
        ))?
        .response
        .event_id)
}

/// Plain messages raise only notification_count; a message whose `m.mentions`
/// names bob, one that matches a keyword rule bob added through
/// `PUT /pushrules/global/content/{ruleId}` (with the highlight tweak), and an
/// `@room` mention by the room's creator raise highlight_count too. A word
/// that merely contains the keyword does not. `/notifications` lists them,
/// and a read receipt brings both counts back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_and_keywords_highlight() {
    bounded("mentions_and_keywords_highlight", 150, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        let alice = server.register("alice", &token).await?;
        let bob = server.register("bob", &token).await?;
        let bob_id = UserId::parse(server.user_id("bob"))?;
        sync_once(&alice).await?;
        sync_once(&bob).await?;

        let mut req = create_room::v3::Request::new();
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        req.name = Some("push rules".to_owned());
        let room = alice.create_room(req).await.at("POST /createRoom (public_chat)")?;
        let rid = room.room_id().to_owned();
        bob.join_room_by_id(&rid).await.at("POST /join/{roomId}")?;
        let r2 = rid.clone();
        sync_until(&bob, "the joined room", SEE_WITHIN, |r| r.rooms.joined.contains_key(&r2)).await?;
        ensure!(
            !room.latest_encryption_state().await.at("GET /state/m.room.encryption/")?.is_encrypted(),
            "the public_chat room is encrypted; the server could not evaluate mentions"
        );

        // 1. Plain message: notify, no highlight.
        send(&room, RoomMessageEventContent::text_plain("hello there"), "plain").await?;
        wait_counts(&bob, &rid, (1, 0), "a plain message").await?;

        // 2. m.mentions names bob (the body does not contain his name).
        let mention = RoomMessageEventContent::text_plain("could you look at this, please?")
            .add_mentions(Mentions::with_user_ids([bob_id.clone()]));
        send(&room, mention, "m.mentions.user_ids = [bob]").await?;
        wait_counts(&bob, &rid, (2, 1), "a message whose m.mentions names bob").await?;

        // 3. bob adds a keyword rule through the push rules API (as the SDK
        //    writes it: {"pattern": "pizza", "actions": ["notify", {"set_tweak": "highlight"}]}).
        let rule = NewPushRule::Content(NewPatternedPushRule::new(
            "pizza".to_owned(),
            "pizza".to_owned(),
            vec![Action::Notify, Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes))],
        ));
        bob.send(set_pushrule::v3::Request::new(rule))
            .await
            .map_err(|e| anyhow!("PUT /pushrules/global/content/pizza: {e}"))?;
        let all = bob
            .send(get_pushrules_all::v3::Request::new())
            .await
            .map_err(|e| anyhow!("GET /pushrules/: {e}"))?;
        let stored = all.global.content.iter().find(|r| r.rule_id == "pizza");
        ensure!(
            stored.is_some_and(|r| r.enabled && r.pattern == "pizza" && r.actions.iter().any(Action::is_highlight)),
            "GET /pushrules/: global.content has no enabled highlighting rule `pizza`: {:?}",
            all.global.content
        );
        send(&room, RoomMessageEventContent::text_plain("Who wants PIZZA tonight?"), "keyword").await?;
        wait_counts(&bob, &rid, (3, 2), "a message with bob's keyword (other case)").await?;

        // 4. A word that only contains the keyword: content rules match whole words.
        send(&room, RoomMessageEventContent::text_plain("the pizzeria on the corner is closed"), "pizzeria").await?;
        wait_counts(&bob, &rid, (4, 2), "a message with `pizzeria` (not the word `pizza`)").await?;

        // 5. @room by the creator (power 100 >= notifications.room 50).
        let room_mention = RoomMessageEventContent::text_plain("everyone: meeting at five")
            .add_mentions(Mentions::with_room_mention());
        let last = send(&room, room_mention, "m.mentions.room = true").await?;
        wait_counts(&bob, &rid, (5, 3), "an @room mention by the room creator").await?;

        // The sender's own counts stay at 0.
        let stored = alice.get_room(&rid).ok_or_else(|| anyhow!("alice has no room"))?;
        sync_once(&alice).await?;
        let c = stored.unread_notification_counts();
        ensure!(
            c.notification_count == 0 && c.highlight_count == 0,
            "alice's own messages count as unread for her: {c:?}"
        );

        // The same counts on the room in Simplified Sliding Sync.
        let path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0";
        let ss = server
            .raw_as(&bob)?
            .call_abs(
                "POST",
                path,
                Some(&serde_json::json!({
                    "conn_id": "push-test",
                    "room_subscriptions": { rid.as_str(): { "timeline_limit": 1, "required_state": [] } }
                })),
            )
            .await?;
        let r = &ss.body["rooms"][rid.as_str()];
        ensure!(
            ss.status == 200 && r["notification_count"] == 5 && r["highlight_count"] == 3,
            "POST {path} (room_subscriptions): expected notification_count 5, highlight_count 3 \
             on rooms.{rid}, got HTTP {} {}",
            ss.status,
            r
        );

        // /notifications: five for bob, three of them highlights, unread.
        let raw = server.raw_as(&bob)?;
        let all = raw.ok("GET", "/notifications", None).await?;
        let list = all["notifications"].as_array().cloned().unwrap_or_default();
        let bodies: Vec<&str> = list
            .iter()
            .filter_map(|n| n["event"]["content"]["body"].as_str())
            .collect();
        ensure!(
            list.len() == 5 && list.iter().all(|n| n["read"] == false && n["room_id"] == rid.as_str()),
            "GET /notifications: expected 5 unread notifications in {rid}, got {} ({bodies:?}): {all}",
            list.len()
        );
        let highlights = raw.ok("GET", "/notifications?only=highlight", None).await?;
        let hl: Vec<&str> = highlights["notifications"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["event"]["content"]["body"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            hl.len() == 3
                && hl.iter().all(|b| b.contains("look at this") || b.contains("PIZZA") || b.contains("meeting")),
            "GET /notifications?only=highlight: expected the mention, the keyword and the @room \
             messages, got {hl:?}"
        );
        let actions: Vec<&Value> = highlights["notifications"]
            .as_array()
            .map(|a| a.iter().map(|n| &n["actions"]).collect())
            .unwrap_or_default();
        ensure!(
            actions.iter().all(|a| a
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x["set_tweak"] == "highlight" && x["value"] != false))),
            "GET /notifications?only=highlight: actions without a highlight tweak: {actions:?}"
        );

        // Reading clears both counts.
        bob.get_room(&rid)
            .ok_or_else(|| anyhow!("bob has no room"))?
            .send_single_receipt(CreateReceiptType::Read, ReceiptThread::Unthreaded, last)
            .await
            .at("POST /rooms/{roomId}/receipt/m.read/{eventId}")?;
        wait_counts(&bob, &rid, (0, 0), "bob's read receipt on the latest message").await?;
        let after = raw.ok("GET", "/notifications", None).await?;
        ensure!(
            after["notifications"]
                .as_array()
                .is_some_and(|a| a.len() == 5 && a.iter().all(|n| n["read"] == true)),
            "GET /notifications after the read receipt: expected all 5 marked read: {after}"
        );
        Ok(())
    })
    .await;
}
