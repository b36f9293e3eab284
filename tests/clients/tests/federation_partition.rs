//! Two `secta demo` boxes whose link is cut while both change the same room,
//! driven by matrix-sdk clients (alice on A, bob on B). Each box reaches the
//! other's federation TLS port through a TCP relay of this test, which can be
//! cut (open connections dropped, new ones refused) and healed. After the
//! heal both boxes hold the same state, chosen by state resolution v2 (not by
//! whoever spoke last), bob's client hears of it in an incremental sync, and
//! every message reached both sides.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use matrix_sdk::ruma::api::client::state::get_state_events;
use matrix_sdk::ruma::{Int, OwnedRoomId, RoomId, RoomOrAliasId, ServerName, UserId};
use matrix_sdk::Client;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use common::*;

const FED_WITHIN: Duration = Duration::from_secs(60);

/// A TCP relay on `ip` to `ip:to` that can be cut and healed.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Relay {
    async fn new(ip: &str, to: u16) -> Result<Relay> {
        let l = TcpListener::bind((ip, 0)).await?;
        let port = l.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let (flag, target) = (up.clone(), format!("{ip}:{to}"));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (flag, target) = (flag.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    // Copy both ways until either side closes or the relay is
                    // cut (then both connections are dropped).
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                                if !flag.load(Ordering::SeqCst) {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(Relay { port, up })
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

/// The room's whole current state as `client`'s box serves it (`GET /state`).
async fn state(client: &Client, rid: &RoomId) -> Result<Vec<Value>> {
    let r = client
        .send(get_state_events::v3::Request::new(rid.to_owned()))
        .await
        .context("GET /rooms/{roomId}/state")?;
    r.room_state
        .iter()
        .map(|e| Ok(serde_json::from_str::<Value>(e.json().get())?))
        .collect()
}

fn content<'a>(state: &'a [Value], kind: &str) -> Option<&'a Value> {
    state
        .iter()
        .find(|e| e["type"] == kind && e["state_key"] == "")
        .map(|e| &e["content"])
}

fn name_of(state: &[Value]) -> Option<&str> {
    content(state, "m.room.name")?["name"].as_str()
}

/// bob's level in the power levels (0 when not listed: the users default).
fn level_of(state: &[Value], user: &str) -> i64 {
    content(state, "m.room.power_levels")
        .and_then(|c| c["users"][user].as_i64())
        .unwrap_or(0)
}

async fn bodies(client: &Client, rid: &RoomId) -> Result<Vec<String>> {
    let room = client
        .get_room(rid)
        .ok_or_else(|| anyhow!("no room {rid}"))?;
    let mut opts = matrix_sdk::room::MessagesOptions::backward();
    opts.limit = matrix_sdk::ruma::UInt::from(100u32);
    let r = room
        .messages(opts)
        .await
        .at("GET /rooms/{roomId}/messages?dir=b")?;
    Ok(r.chunk
        .iter()
        .filter_map(|e| json_of(e)["content"]["body"].as_str().map(str::to_owned))
        .collect())
}

/// Polls `probe` (bounded) until it holds.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if probe().await? {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Pair {
    a: Secta,
    b: Secta,
    to_a: Relay,
    to_b: Relay,
}

async fn start() -> Result<Pair> {
    let (pa, pb) = (free_ports_at(IP_A, 2)?, free_ports_at(IP_B, 2)?);
    let to_b = Relay::new(IP_B, pb[1]).await?;
    let to_a = Relay::new(IP_A, pa[1]).await?;
    let a = Secta::start_at(IP_A, pa[0], pa[1], &[(IP_B, pb[0], to_b.port)]).await?;
    let b = Secta::start_at(IP_B, pb[0], pb[1], &[(IP_A, pa[0], to_a.port)]).await?;
    Ok(Pair { a, b, to_a, to_b })
}

async fn scenario(p: &Pair) -> Result<()> {
    let alice = p.a.register("alice", &p.a.invite(1)?).await?;
    let bob = p.b.register("bob", &p.b.invite(1)?).await?;
    sync_once(&alice).await?;
    sync_once(&bob).await?;
    let bob_id = UserId::parse(p.b.user_id("bob"))?;
    let bob_s = bob_id.to_string();

    let room = create_public_room(&alice, "Исходное имя").await?;
    let rid: OwnedRoomId = room.room_id().to_owned();
    let target: &RoomOrAliasId = (&*rid).into();
    bob.join_room_by_id_or_alias(target, &[ServerName::parse(&p.a.listen)?])
        .await
        .at("POST /join/{roomId}?via=<box A> on box B")?;
    // alice makes bob a moderator once his join reached her, and both boxes agree.
    sync_until_member_joined(&alice, &rid, &bob_s, FED_WITHIN).await?;
    room.update_power_levels(vec![(&bob_id, Int::from(100))])
        .await
        .at("PUT /state/m.room.power_levels/ on A (bob to 100)")?;
    wait_for("bob's power level 100 on B", FED_WITHIN, || async {
        Ok(level_of(&state(&bob, &rid).await?, &bob_s) == 100)
    })
    .await?;
    sync_once(&bob).await?;

    // The link goes down. Meanwhile alice demotes bob on A, and bob, still a
    // moderator as far as B knows, renames the room; both keep talking.
    p.to_a.set_up(false);
    p.to_b.set_up(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    room.update_power_levels(vec![(&bob_id, Int::from(0))])
        .await
        .at("PUT /state/m.room.power_levels/ on A (bob to 0) while cut")?;
    send_text(&room, "пока связи нет (A)").await?;
    let bob_room = bob
        .get_room(&rid)
        .ok_or_else(|| anyhow!("bob has no room"))?;
    bob_room
        .set_name("Имя от Боба".to_owned())
        .await
        .at("PUT /state/m.room.name/ on B while cut")?;
    send_text(&bob_room, "пока связи нет (B)").await?;
    ensure!(
        name_of(&state(&bob, &rid).await?) == Some("Имя от Боба"),
        "B took bob's rename while cut off"
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // both queues fail a few times
                                                      // bob's client is up to date before the heal: what follows reaches it by
                                                      // incremental syncs.
    sync_once(&bob).await?;

    // The link heals: each side's queue delivers what the other missed.
    p.to_a.set_up(true);
    p.to_b.set_up(true);
    wait_for("both messages on both boxes", FED_WITHIN, || async {
        let (on_a, on_b) = (bodies(&alice, &rid).await?, bodies(&bob, &rid).await?);
        Ok(["пока связи нет (A)", "пока связи нет (B)"]
            .iter()
            .all(|m| on_a.iter().any(|x| x == m) && on_b.iter().any(|x| x == m)))
    })
    .await?;
    // Resolution puts alice's power-level change first: with it bob may not
    // rename the room, so both boxes keep the original name and bob at 0.
    wait_for(
        "the same resolved state on both boxes",
        FED_WITHIN,
        || async {
            let (sa, sb) = (state(&alice, &rid).await?, state(&bob, &rid).await?);
            Ok([&sa, &sb]
                .iter()
                .all(|s| name_of(s) == Some("Исходное имя") && level_of(s, &bob_s) == 0))
        },
    )
    .await?;
    // bob's rename was undone by the resolution alone (no new event): his
    // client's incremental sync says so.
    sync_until(
        &bob,
        "the resolved room name in bob's incremental sync",
        FED_WITHIN,
        |r| {
            timeline_and_state(r, &rid)
                .iter()
                .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Исходное имя")
        },
    )
    .await?;
    ensure!(
        bob.get_room(&rid).and_then(|r| r.name()).as_deref() == Some("Исходное имя"),
        "bob's client shows the room as {:?}",
        bob.get_room(&rid).and_then(|r| r.name())
    );
    let ids = |s: &[Value]| {
        let mut v: Vec<String> = s
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
            .collect();
        v.sort();
        v
    };
    ensure!(
        ids(&state(&alice, &rid).await?) == ids(&state(&bob, &rid).await?),
        "the whole current state differs between the boxes"
    );
    // The room goes on: bob, now an ordinary member, is still heard…
    send_text(&bob_room, "снова вместе").await?;
    wait_for("bob's message after the heal on A", FED_WITHIN, || async {
        Ok(bodies(&alice, &rid)
            .await?
            .iter()
            .any(|x| x == "снова вместе"))
    })
    .await?;
    // …but may no longer rename the room, on his own box either.
    let denied = bob_room.set_name("ещё раз".to_owned()).await;
    ensure!(
        denied.as_ref().err().and_then(errcode).as_deref() == Some("M_FORBIDDEN"),
        "bob's rename after the heal: {:?}",
        denied.map(|_| ()).map_err(|e| describe(&e))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_heals_into_the_same_resolved_state_on_both_boxes() {
    let p = start().await.context("two boxes with relays").unwrap();
    if let Err(e) = scenario(&p).await {
        panic!(
            "{e:#}\n\nA `secta admin federation`:\n{}\nB `secta admin federation`:\n{}",
            p.a.federation_status(),
            p.b.federation_status()
        );
    }
}
