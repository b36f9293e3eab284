//! End-to-end chat tests: a real Matrix client (matrix-sdk 0.18) against a
//! `secta demo` server started per test. See README.md for how to run.

mod common;

use std::collections::HashSet;

use anyhow::{anyhow, bail, ensure, Context, Result};
use matrix_sdk::room::{IncludeRelations, MessagesOptions, RelationsOptions};
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType as CreateReceiptType;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::receipt::{ReceiptThread, ReceiptType};
use matrix_sdk::ruma::events::relation::{RelationType, Thread};
use matrix_sdk::ruma::events::room::message::{
    Relation, ReplacementMetadata, RoomMessageEventContent,
};
use matrix_sdk::ruma::{UInt, UserId};

use common::*;

/// 1. Register with an invite token, create a private chat, invite, join,
/// talk both ways, each side sees the other's message through /sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_invite_join_and_chat() {
    bounded("register_invite_join_and_chat", 120, async {
        let p = Pair::setup().await?;
        let alice_room = p.room(&p.alice)?;
        let bob_room = p.room(&p.bob)?;
        let alice_id = p.server.user_id("alice");
        let bob_id = p.server.user_id("bob");

        // alice -> bob
        let a_msg = send_text(&alice_room, "hello bob, from alice").await?;
        let rid = p.room_id.clone();
        let (want, alice_uid) = (a_msg.to_string(), alice_id.clone());
        sync_until(&p.bob, "alice's message", SEE_WITHIN, |r| {
            timeline(r, &rid).iter().any(|e| {
                e["event_id"] == want.as_str()
                    && e["sender"] == alice_uid.as_str()
                    && body(e) == Some("hello bob, from alice")
                    && e["origin_server_ts"].is_u64()
            })
        })
        .await?;

        // bob -> alice
        let b_msg = send_text(&bob_room, "hi alice, bob here").await?;
        let (want, bob_uid) = (b_msg.to_string(), bob_id.clone());
        sync_until(&p.alice, "bob's message", SEE_WITHIN, |r| {
            timeline(r, &rid).iter().any(|e| {
                e["event_id"] == want.as_str()
                    && e["sender"] == bob_uid.as_str()
                    && body(e) == Some("hi alice, bob here")
            })
        })
        .await?;

        // Both members joined, as the client's own state store sees it.
        let members = alice_room
            .members(matrix_sdk::RoomMemberships::JOIN)
            .await
            .at("GET /rooms/{roomId}/members (alice)")?;
        let ids: HashSet<String> = members.iter().map(|m| m.user_id().to_string()).collect();
        ensure!(
            ids.contains(&alice_id) && ids.contains(&bob_id),
            "joined members seen by alice: {ids:?}"
        );

        // private_chat rooms are encrypted by default (the server adds
        // m.room.encryption), so both messages above went through Megolm.
        let state = alice_room
            .latest_encryption_state()
            .await
            .at("GET /rooms/{roomId}/state/m.room.encryption")?;
        ensure!(
            state.is_encrypted(),
            "a room created with preset private_chat is not encrypted ({state:?})"
        );
        Ok(())
    })
    .await;
}

/// 2. Edits (m.replace), thread replies (m.thread), and /relations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_thread_and_relations() {
    bounded("edit_thread_and_relations", 120, async {
        let p = Pair::setup().await?;
        let alice_room = p.room(&p.alice)?;
        let bob_room = p.room(&p.bob)?;
        let rid = p.room_id.clone();

        // --- Edit ---
        let original = send_text(&alice_room, "teh original").await?;
        let edit = RoomMessageEventContent::text_plain("the original")
            .make_replacement(ReplacementMetadata::new(original.clone(), None));
        let edit_id = alice_room
            .send(edit)
            .await
            .at("PUT /rooms/{roomId}/send/m.room.message/{txnId} (m.replace edit)")?
            .response
            .event_id;
        let (orig_s, edit_s) = (original.to_string(), edit_id.to_string());
        let mut saw_original = false;
        let mut saw_edit = false;
        sync_until(&p.bob, "alice's message and its edit", SEE_WITHIN, |r| {
            for e in timeline(r, &rid) {
                if e["event_id"] == orig_s.as_str() {
                    saw_original = true;
                }
                if e["event_id"] == edit_s.as_str()
                    && e["content"]["m.relates_to"]["rel_type"] == "m.replace"
                    && e["content"]["m.relates_to"]["event_id"] == orig_s.as_str()
                    && e["content"]["m.new_content"]["body"] == "the original"
                {
                    saw_edit = true;
                }
            }
            saw_original && saw_edit
        })
        .await?;

        // /relations on the original returns the edit.
        let rels = bob_room
            .relations(original.clone(), RelationsOptions::default())
            .await
            .at("GET /rooms/{roomId}/relations/{originalId}")?;
        let ids: Vec<String> = rels
            .chunk
            .iter()
            .filter_map(|e| e.event_id().map(|i| i.to_string()))
            .collect();
        ensure!(
            ids.contains(&edit_s),
            "GET /relations/{original}: edit {edit_s} missing, got {ids:?}"
        );

        // Server-side aggregation (spec: SHOULD) -- reported, not enforced.
        let fetched = bob_room
            .event(&original, None)
            .await
            .at("GET /rooms/{roomId}/event/{originalId}")?;
        let fetched = json_of(&fetched);
        if fetched["unsigned"]["m.relations"]["m.replace"]["event_id"] != edit_s.as_str() {
            eprintln!(
                "NOTE: GET /event/{original}: unsigned.m.relations.m.replace does not name \
                 the edit {edit_s} (unsigned = {})",
                fetched["unsigned"]
            );
        }

        // --- Thread ---
        let root = send_text(&alice_room, "thread root").await?;
        let root_s = root.to_string();
        sync_until(&p.bob, "the thread root", SEE_WITHIN, |r| {
            timeline(r, &rid)
                .iter()
                .any(|e| e["event_id"] == root_s.as_str())
        })
        .await?;
        let mut reply = RoomMessageEventContent::text_plain("a reply in the thread");
        reply.relates_to = Some(Relation::Thread(Thread::plain(root.clone(), root.clone())));
        let reply_id = bob_room
            .send(reply)
            .await
            .at("PUT /rooms/{roomId}/send/m.room.message/{txnId} (m.thread reply)")?
            .response
            .event_id;
        let reply_s = reply_id.to_string();
        sync_until(&p.alice, "bob's thread reply", SEE_WITHIN, |r| {
            timeline(r, &rid).iter().any(|e| {
                e["event_id"] == reply_s.as_str()
                    && e["content"]["m.relates_to"]["rel_type"] == "m.thread"
                    && e["content"]["m.relates_to"]["event_id"] == root_s.as_str()
                    && body(e) == Some("a reply in the thread")
            })
        })
        .await?;

        // Thread summary on the root (spec: SHOULD) -- reported, not enforced.
        let fetched = alice_room
            .event(&root, None)
            .await
            .at("GET /rooms/{roomId}/event/{rootId}")?;
        let fetched = json_of(&fetched);
        let summary = &fetched["unsigned"]["m.relations"]["m.thread"];
        if summary["count"] != 1 || summary["latest_event"]["event_id"] != reply_s.as_str() {
            eprintln!(
                "NOTE: GET /event/{root}: unsigned.m.relations.m.thread is not \
                 {{count: 1, latest_event: {reply_s}}} (unsigned = {})",
                fetched["unsigned"]
            );
        }

        // All relations of the root.
        let all = alice_room
            .relations(root.clone(), RelationsOptions::default())
            .await
            .at("GET /rooms/{roomId}/relations/{rootId}")?;
        let all_ids: Vec<String> = all
            .chunk
            .iter()
            .filter_map(|e| e.event_id().map(|i| i.to_string()))
            .collect();
        ensure!(
            all_ids == vec![reply_s.clone()],
            "GET /relations/{root}: expected exactly [{reply_s}], got {all_ids:?}"
        );

        // Only m.thread relations.
        let threads = alice_room
            .relations(
                root.clone(),
                RelationsOptions {
                    include_relations: IncludeRelations::RelationsOfType(RelationType::Thread),
                    ..Default::default()
                },
            )
            .await
            .at("GET /rooms/{roomId}/relations/{rootId}/m.thread")?;
        let t_ids: Vec<String> = threads
            .chunk
            .iter()
            .filter_map(|e| e.event_id().map(|i| i.to_string()))
            .collect();
        ensure!(
            t_ids == vec![reply_s.clone()],
            "GET /relations/{root}/m.thread: expected [{reply_s}], got {t_ids:?}"
        );

        // m.thread + event type, and a relation type with nothing in it. The
        // filter applies to the type the server stores: in an encrypted room
        // (private_chat rooms are encrypted by default) that is
        // m.room.encrypted, and nothing matches m.room.message.
        let encrypted = alice_room
            .latest_encryption_state()
            .await
            .at("GET /rooms/{roomId}/state/m.room.encryption")?
            .is_encrypted();
        let (wire_type, other_type) = if encrypted {
            ("m.room.encrypted", "m.room.message")
        } else {
            ("m.room.message", "m.room.encrypted")
        };
        for (event_type, want) in [(wire_type, 1usize), (other_type, 0usize)] {
            let typed = alice_room
                .relations(
                    root.clone(),
                    RelationsOptions {
                        include_relations: IncludeRelations::RelationsOfTypeAndEventType(
                            RelationType::Thread,
                            event_type.into(),
                        ),
                        ..Default::default()
                    },
                )
                .await
                .at(&format!(
                    "GET /rooms/{{roomId}}/relations/{{rootId}}/m.thread/{event_type}"
                ))?;
            ensure!(
                typed.chunk.len() == want,
                "GET /relations/{root}/m.thread/{event_type} (room encrypted: {encrypted}): \
                 expected {want} event(s), got {}",
                typed.chunk.len()
            );
        }
        let none = alice_room
            .relations(
                root.clone(),
                RelationsOptions {
                    include_relations: IncludeRelations::RelationsOfType(RelationType::Replacement),
                    ..Default::default()
                },
            )
            .await
            .at("GET /rooms/{roomId}/relations/{rootId}/m.replace")?;
        ensure!(
            none.chunk.is_empty(),
            "GET /relations/{root}/m.replace: expected nothing, got {} events",
            none.chunk.len()
        );
        Ok(())
    })
    .await;
}

/// 3. 500 messages, read back with backwards /messages pagination: once from
/// the live end with no token, once the way a client does it (latest sync
/// timeline + `prev_batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginate_500_messages_backwards() {
    bounded("paginate_500_messages_backwards", 300, async {
        const N: usize = 500;
        let p = Pair::setup().await?;
        let alice_room = p.room(&p.alice)?;
        let bob_room = p.room(&p.bob)?;
        let expected: Vec<String> = (0..N).map(|i| format!("msg {i:04}")).collect();

        for (i, text) in expected.iter().enumerate() {
            send_text(&alice_room, text)
                .await
                .with_context(|| format!("sending message {i} of {N}"))?;
        }

        // (a) sync's timeline, then back-paginate from its prev_batch. This
        // runs first: the room is encrypted, and this sync also brings bob the
        // room keys (to-device) without which /messages would return
        // undecryptable events.
        let resp = sync_once(&p.bob).await?;
        let upd =
            resp.rooms.joined.get(&p.room_id).ok_or_else(|| {
                anyhow!("bob's incremental sync after 500 messages lacks the room")
            })?;
        // Events still of type m.room.encrypted could not be decrypted.
        let mut utd = upd
            .timeline
            .events
            .iter()
            .filter(|e| is_utd(&json_of(e)))
            .count();
        let mut newest_first: Vec<String> = upd
            .timeline
            .events
            .iter()
            .rev()
            .filter_map(|e| body(&json_of(e)).map(str::to_owned))
            .filter(|b| b.starts_with("msg "))
            .collect();
        if newest_first.len() < N {
            ensure!(
                upd.timeline.limited,
                "sync timeline has {} of {N} new messages but limited=false",
                newest_first.len()
            );
            let mut from = upd.timeline.prev_batch.clone().ok_or_else(|| {
                anyhow!("sync timeline is limited but carries no prev_batch token")
            })?;
            let mut pages = 0;
            loop {
                pages += 1;
                ensure!(
                    pages <= 200,
                    "more than 200 pages of /messages from prev_batch"
                );
                let page = bob_room
                    .messages(MessagesOptions::backward().from(from.as_str()))
                    .await
                    .at("GET /rooms/{roomId}/messages?dir=b&from=<prev_batch>")?;
                utd += page.chunk.iter().filter(|e| is_utd(&json_of(e))).count();
                for ev in &page.chunk {
                    if let Some(b) = body(&json_of(ev)) {
                        if b.starts_with("msg ") {
                            newest_first.push(b.to_owned());
                        }
                    }
                }
                match page.end {
                    Some(end) if !page.chunk.is_empty() => from = end,
                    _ => break,
                }
            }
        }
        newest_first.reverse();
        check_sequence(
            "sync timeline + /messages from prev_batch",
            &newest_first,
            &expected,
            utd,
        )?;

        // (b) /messages backwards from the end, 50 at a time.
        let mut seen: Vec<String> = Vec::new();
        let mut utd = 0;
        let mut from: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            ensure!(pages <= 100, "more than 100 pages of /messages; stopping");
            let mut opts = MessagesOptions::backward().from(from.as_deref());
            opts.limit = UInt::from(50u32);
            let page = bob_room
                .messages(opts)
                .await
                .at("GET /rooms/{roomId}/messages?dir=b&limit=50")
                .with_context(|| format!("page {pages}, from {from:?}"))?;
            ensure!(
                page.chunk.len() <= 50,
                "/messages returned {} events for limit=50",
                page.chunk.len()
            );
            utd += page.chunk.iter().filter(|e| is_utd(&json_of(e))).count();
            for ev in &page.chunk {
                let v = json_of(ev);
                if let Some(b) = body(&v) {
                    if b.starts_with("msg ") {
                        seen.push(b.to_owned());
                    }
                }
            }
            match page.end {
                Some(end) if !page.chunk.is_empty() => {
                    ensure!(
                        Some(&end) != from.as_ref(),
                        "/messages returned end == from ({end}) with a non-empty chunk"
                    );
                    from = Some(end);
                }
                _ => break,
            }
        }
        seen.reverse();
        check_sequence("backward /messages without token", &seen, &expected, utd)?;
        Ok(())
    })
    .await;
}

fn check_sequence(how: &str, got: &[String], expected: &[String], utd: usize) -> Result<()> {
    if got == expected {
        return Ok(());
    }
    let unique: HashSet<&String> = got.iter().collect();
    let first_diff = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    bail!(
        "{how}: got {} messages ({} distinct), expected {}; first difference at index {first_diff}: got {:?}, expected {:?}; \
         {utd} event(s) the client could not decrypt",
        got.len(),
        unique.len(),
        expected.len(),
        got.get(first_diff),
        expected.get(first_diff)
    )
}

/// 4. Typing notices and read receipts arrive through the other side's sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_read_receipts() {
    bounded("typing_and_read_receipts", 120, async {
        let p = Pair::setup().await?;
        let alice_room = p.room(&p.alice)?;
        let bob_room = p.room(&p.bob)?;
        let rid = p.room_id.clone();
        let alice_id = p.server.user_id("alice");
        let bob_id = p.server.user_id("bob");

        // Typing on.
        alice_room
            .typing_notice(true)
            .await
            .at("PUT /rooms/{roomId}/typing/{userId} typing=true")?;
        let a = alice_id.clone();
        sync_until(&p.bob, "m.typing listing alice", SEE_WITHIN, |r| {
            ephemeral(r, &rid).iter().any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"]
                        .as_array()
                        .is_some_and(|ids| ids.iter().any(|u| u == a.as_str()))
            })
        })
        .await?;

        // Typing off.
        alice_room
            .typing_notice(false)
            .await
            .at("PUT /rooms/{roomId}/typing/{userId} typing=false")?;
        let a = alice_id.clone();
        sync_until(&p.bob, "m.typing without alice", SEE_WITHIN, |r| {
            ephemeral(r, &rid).iter().any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"]
                        .as_array()
                        .is_some_and(|ids| !ids.iter().any(|u| u == a.as_str()))
            })
        })
        .await?;

        // Read receipt on alice's latest event.
        let latest = send_text(&alice_room, "read me").await?;
        let latest_s = latest.to_string();
        sync_until(&p.bob, "alice's message to acknowledge", SEE_WITHIN, |r| {
            timeline(r, &rid).iter().any(|e| e["event_id"] == latest_s.as_str())
        })
        .await?;
        bob_room
            .send_single_receipt(CreateReceiptType::Read, ReceiptThread::Unthreaded, latest.clone())
            .await
            .at("POST /rooms/{roomId}/receipt/m.read/{eventId}")?;
        let b = bob_id.clone();
        let mut raw_receipt = None;
        sync_until(&p.alice, "bob's m.read receipt", SEE_WITHIN, |r| {
            for e in ephemeral(r, &rid) {
                if e["type"] == "m.receipt" {
                    let ts = &e["content"][latest_s.as_str()]["m.read"][b.as_str()]["ts"];
                    if ts.is_u64() {
                        raw_receipt = Some(e.clone());
                        return true;
                    }
                }
            }
            false
        })
        .await?;

        // The client's own store took it in too.
        let bob_uid = UserId::parse(&bob_id)?;
        let stored = alice_room
            .load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &bob_uid)
            .await
            .at("load_user_receipt (client store)")?;
        match stored {
            Some((ev, _)) if ev == latest => {}
            other => bail!(
                "alice's client store has bob's receipt on {:?}, expected {latest}; raw m.receipt: {:?}",
                other.map(|(e, _)| e),
                raw_receipt
            ),
        }
        Ok(())
    })
    .await;
}

/// 5. Registration is refused with a used-up token and with a bogus one, and
/// then works with a fresh token (so the refusal was about the token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refused_with_bad_or_used_token() {
    bounded("registration_refused_with_bad_or_used_token", 120, async {
        let server = Secta::start().await?;
        let token = server.invite(2)?;
        server.register("alice", &token).await?;
        server.register("bob", &token).await?;

        // Used up (2 uses, both spent).
        let charlie = server.client().await?;
        let outcome = try_register(&charlie, "charlie", &token)
            .await
            .context("charlie, used-up token")?;
        match outcome {
            Ok(resp) => bail!(
                "POST /register with a used-up token succeeded as {}",
                resp.user_id
            ),
            Err(e) => {
                let code = errcode(&e);
                eprintln!("used-up token refused: {}", describe(&e));
                ensure!(
                    matches!(
                        code.as_deref(),
                        Some("M_FORBIDDEN") | Some("M_UNAUTHORIZED")
                    ),
                    "POST /register with a used-up token: expected errcode M_FORBIDDEN \
                     (or M_UNAUTHORIZED in the UIA body), got {}",
                    describe(&e)
                );
            }
        }
        ensure!(
            charlie.user_id().is_none(),
            "charlie's client got logged in anyway"
        );

        // Bogus.
        let outcome = try_register(&charlie, "charlie", "not-a-real-token")
            .await
            .context("charlie, bogus token")?;
        match outcome {
            Ok(resp) => bail!(
                "POST /register with a bogus token succeeded as {}",
                resp.user_id
            ),
            Err(e) => {
                let code = errcode(&e);
                eprintln!("bogus token refused: {}", describe(&e));
                ensure!(
                    matches!(
                        code.as_deref(),
                        Some("M_FORBIDDEN") | Some("M_UNAUTHORIZED")
                    ),
                    "POST /register with a bogus token: expected errcode M_FORBIDDEN \
                     (or M_UNAUTHORIZED in the UIA body), got {}",
                    describe(&e)
                );
            }
        }
        ensure!(
            charlie.user_id().is_none(),
            "charlie's client got logged in anyway"
        );

        // A fresh token works for the same username.
        let fresh = server.invite(1)?;
        ensure!(
            fresh != token,
            "`invite create` returned the same token twice"
        );
        server
            .register("charlie", &fresh)
            .await
            .context("charlie with a fresh token after the refusals")?;
        Ok(())
    })
    .await;
}

/// 6. State paths with an empty state key, written the way ruma (and so
/// matrix-sdk) writes them: with a trailing slash,
/// `/rooms/{roomId}/state/{eventType}/`. The SDK asks
/// `GET .../state/m.room.encryption/` before sending into a room whose
/// encryption state it has not seen in /sync (a room it just created, and
/// every unencrypted room), and `set_room_topic` is `PUT .../state/m.room.topic/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_state_key_with_trailing_slash() {
    bounded("empty_state_key_with_trailing_slash", 120, async {
        let p = Pair::setup().await?;
        let rid = p.room_id.clone();

        // A private_chat room just created, not yet synced: the SDK fetches
        // m.room.encryption and must find it.
        let fresh = create_private_chat(&p.alice, "fresh").await?;
        let fresh_room = p
            .alice
            .get_room(&fresh)
            .ok_or_else(|| anyhow!("alice's client does not know the room she created"))?;
        let state = fresh_room
            .latest_encryption_state()
            .await
            .at("GET /rooms/{roomId}/state/m.room.encryption/ (empty state key, trailing slash)")?;
        ensure!(
            state.is_encrypted(),
            "GET /state/m.room.encryption/ on a new private_chat room: SDK concluded {state:?}"
        );
        send_text(&fresh_room, "first words in a fresh room")
            .await
            .context("sending into a room created a moment ago, before any sync")?;

        // An unencrypted room (public_chat preset): sending makes the SDK ask
        // for m.room.encryption, which must be 404 M_NOT_FOUND, not an
        // unrecognised path.
        let mut req = create_room::v3::Request::new();
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        req.name = Some("plain".to_owned());
        let plain = p
            .alice
            .create_room(req)
            .await
            .at("POST /createRoom (preset public_chat)")?;
        let state = plain
            .latest_encryption_state()
            .await
            .at("GET /rooms/{roomId}/state/m.room.encryption/ in an unencrypted room")?;
        ensure!(
            !state.is_encrypted(),
            "a public_chat room is encrypted ({state:?}); expected no m.room.encryption"
        );
        let plain_msg = send_text(&plain, "in the clear")
            .await
            .context("sending into an unencrypted room")?;
        let plain_id = plain.room_id().to_owned();
        let want = plain_msg.to_string();
        sync_until(&p.alice, "her plaintext message", SEE_WITHIN, |r| {
            timeline(r, &plain_id)
                .iter()
                .any(|e| e["event_id"] == want.as_str() && body(e) == Some("in the clear"))
        })
        .await?;

        // PUT with an empty state key and a trailing slash.
        p.room(&p.alice)?
            .set_room_topic("topics with a trailing slash")
            .await
            .at("PUT /rooms/{roomId}/state/m.room.topic/ (empty state key, trailing slash)")?;
        sync_until(&p.bob, "alice's new topic", SEE_WITHIN, |r| {
            timeline_and_state(r, &rid).iter().any(|e| {
                e["type"] == "m.room.topic"
                    && e["state_key"] == ""
                    && e["content"]["topic"] == "topics with a trailing slash"
            })
        })
        .await?;
        Ok(())
    })
    .await;
}
