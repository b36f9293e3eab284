//! Three `secta demo` boxes in one room, each on its own loopback address
//! (127.0.0.2-4) and federating over TLS, with a matrix-sdk client per box:
//! alice on A, bob on B, carol on C. B is cut off (killed) while alice sends
//! 1,000 messages; when B comes back, A's outbound queue delivers them and
//! bob reads all of them, none missing, in the order they were sent. carol
//! joins only afterwards and pages back through history her box was never
//! sent (backfill from A), then her own message reaches both others.

mod common;

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::{OwnedServerName, RoomId, RoomOrAliasId, ServerName, UInt};
use matrix_sdk::{Client, Room};

use common::*;

const SENT_WHILE_DOWN: usize = 1000;

/// Delivery between boxes goes through the sender's queue, which backs off
/// while the other box is down.
const FED_WITHIN: Duration = Duration::from_secs(30);
const CATCH_UP_WITHIN: Duration = Duration::from_secs(150);

fn joined(client: &Client, rid: &RoomId) -> Result<Room> {
    client
        .get_room(rid)
        .ok_or_else(|| anyhow!("{:?} has no room {rid}", client.user_id()))
}

/// Every message body of the room as `client`'s box serves it, oldest first,
/// paging back through `/messages` 100 at a time (at most 50 pages).
async fn all_bodies(client: &Client, rid: &RoomId) -> Result<Vec<String>> {
    let room = joined(client, rid)?;
    let mut out = Vec::new();
    let mut from: Option<String> = None;
    for page in 0.. {
        ensure!(page < 50, "more than 50 pages of /messages");
        let mut opts = MessagesOptions::backward().from(from.as_deref());
        opts.limit = UInt::from(100u32);
        let r = room
            .messages(opts)
            .await
            .at("GET /rooms/{roomId}/messages?dir=b&limit=100")?;
        out.extend(
            r.chunk
                .iter()
                .filter_map(|e| json_of(e)["content"]["body"].as_str().map(str::to_owned)),
        );
        match r.end {
            Some(end) if !r.chunk.is_empty() => from = Some(end),
            _ => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// Sync `client` until the newest message it sees in the room is `body`.
async fn until_newest(client: &Client, rid: &RoomId, body: &str, within: Duration) -> Result<()> {
    let what = format!("{body:?} as the newest message");
    sync_until(client, &what, within, |r| {
        timeline(r, rid)
            .iter()
            .rev()
            .find(|e| e["type"] == "m.room.message")
            .is_some_and(|e| e["content"]["body"] == body)
    })
    .await
}

async fn join_via(client: &Client, rid: &RoomId, via: &OwnedServerName) -> Result<()> {
    let target: &RoomOrAliasId = rid.into();
    client
        .join_room_by_id_or_alias(target, std::slice::from_ref(via))
        .await
        .at("POST /join/{roomId}?via=<box A> (federation make_join/send_join)")?;
    Ok(())
}

async fn scenario(boxes: &mut [Secta]) -> Result<()> {
    let alice = boxes[0].register("alice", &boxes[0].invite(1)?).await?;
    let bob = boxes[1].register("bob", &boxes[1].invite(1)?).await?;
    let carol = boxes[2].register("carol", &boxes[2].invite(1)?).await?;
    for c in [&alice, &bob, &carol] {
        sync_once(c).await?;
    }
    let a_name: OwnedServerName = ServerName::parse(&boxes[0].listen)?;

    let room = create_public_room(&alice, "Три коробки").await?;
    let rid = room.room_id().to_owned();
    join_via(&bob, &rid, &a_name).await?;
    send_text(&room, "до перерыва").await?;
    until_newest(&bob, &rid, "до перерыва", FED_WITHIN).await?;

    // B goes down; alice keeps talking.
    boxes[1].stop();
    let expected: Vec<String> = (0..SENT_WHILE_DOWN)
        .map(|i| format!("сообщение {i:04}"))
        .collect();
    for body in &expected {
        send_text(&room, body).await?;
    }
    // B comes back; A's queue delivers what it missed.
    let back = Instant::now();
    boxes[1].restart().await?;
    until_newest(&bob, &rid, expected.last().unwrap(), CATCH_UP_WITHIN).await?;
    eprintln!(
        "B caught up on {SENT_WHILE_DOWN} messages {:.1} s after it restarted",
        back.elapsed().as_secs_f64()
    );
    let on_b: Vec<String> = all_bodies(&bob, &rid)
        .await?
        .into_iter()
        .filter(|m| m.starts_with("сообщение "))
        .collect();
    ensure!(
        on_b.len() == SENT_WHILE_DOWN,
        "bob sees {} of the {SENT_WHILE_DOWN} messages sent while B was down",
        on_b.len()
    );
    ensure!(on_b == expected, "bob sees them out of order");

    // carol joins now and pages back through history C never received.
    join_via(&carol, &rid, &a_name).await?;
    let on_c = all_bodies(&carol, &rid).await?;
    for want in ["до перерыва", "сообщение 0500", "сообщение 0999"] {
        ensure!(
            on_c.iter().any(|m| m == want),
            "carol's history lacks {want:?}: {} messages, first {:?}",
            on_c.len(),
            on_c.first()
        );
    }
    // And carol's own message reaches both other boxes.
    send_text(&joined(&carol, &rid)?, "привет от C").await?;
    for c in [&alice, &bob] {
        until_newest(c, &rid, "привет от C", FED_WITHIN).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_box_catches_up_in_order_and_a_late_box_reads_history() {
    let mut boxes = Secta::start_group(3).await.expect("three boxes");
    if let Err(e) = scenario(&mut boxes).await {
        let status: Vec<String> = boxes
            .iter()
            .map(|b| {
                format!(
                    "{} `secta admin federation`:\n{}",
                    b.listen,
                    b.federation_status()
                )
            })
            .collect();
        panic!("{e:#}\n\n{}", status.join("\n"));
    }
}
