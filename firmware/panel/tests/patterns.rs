//! Snapshot of the LED patterns for every state the strip can show: the exact
//! colours of an 8-LED strip (full brightness, and one limited frame) at a few
//! moments. Regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p secta-panel`
//! after a deliberate change, and review the diff.

use secta_panel::pattern::{active_rows, render};
use secta_runtime::{status::Phase, BoxStatus, WipeStatus};

fn ready() -> BoxStatus {
    BoxStatus {
        phase: Phase::Ready,
        ..Default::default()
    }
}

fn states() -> Vec<(&'static str, BoxStatus)> {
    let mut v = vec![("booting", BoxStatus::default()), ("ready", ready())];
    let mut s = ready();
    s.hotspot_clients = Some(2);
    v.push(("hotspot_2_clients", s));
    let mut s = ready();
    s.hotspot_clients = Some(9);
    v.push(("hotspot_9_clients_more_than_fit", s));
    let mut s = ready();
    s.internet = Some(true);
    v.push(("internet_up", s));
    let mut s = ready();
    s.internet = Some(false);
    v.push(("internet_down", s));
    let mut s = ready();
    s.vpn_exit = Some(true);
    v.push(("vpn_exit_up", s));
    let mut s = ready();
    s.federation = Some((2, 3));
    v.push(("federation_peers_reachable", s));
    let mut s = ready();
    s.federation = Some((0, 3));
    v.push(("federation_no_peer_reachable", s));
    let mut s = ready();
    s.radio_on_air = true;
    v.push(("radio_on_air", s));
    let mut s = ready();
    s.problems.insert("radio".into(), "disk full".into());
    v.push(("problem_needs_admin", s));
    let mut s = ready();
    s.internet = Some(true);
    s.vpn_exit = Some(true);
    s.federation = Some((1, 1));
    s.radio_on_air = true;
    s.hotspot_clients = Some(1);
    v.push(("everything_up", s.clone()));
    s.wipe = WipeStatus::Armed {
        remaining_ms: 3000,
        total_ms: 3000,
    };
    v.push(("wipe_armed_3s_left", s.clone()));
    s.wipe = WipeStatus::Armed {
        remaining_ms: 1000,
        total_ms: 3000,
    };
    v.push(("wipe_armed_1s_left", s.clone()));
    s.wipe = WipeStatus::InProgress;
    v.push(("wipe_in_progress", s.clone()));
    s.wipe = WipeStatus::Wiped;
    v.push(("wiped", s));
    v
}

fn frame_text(status: &BoxStatus, t: u64, brightness: u8) -> String {
    render(status, t, 8, brightness)
        .iter()
        .map(|c| c.hex())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn led_patterns_match_the_snapshot() {
    let mut text = String::new();
    for (name, s) in states() {
        text.push_str(&format!("{name}  [{}]\n", active_rows(&s).join(", ")));
        for t in [0u64, 200, 1000, 2500] {
            text.push_str(&format!("  t={t:<5} {}\n", frame_text(&s, t, 255)));
        }
        text.push_str(&format!("  limited {}\n", frame_text(&s, 0, 64)));
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots/patterns.txt");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let want = std::fs::read_to_string(path).expect("snapshot file (UPDATE_SNAPSHOTS=1 makes it)");
    if want != text {
        for (i, (a, b)) in want.lines().zip(text.lines()).enumerate() {
            if a != b {
                panic!("snapshot differs at line {}:\n want {a}\n  got {b}", i + 1);
            }
        }
        panic!("snapshot differs in length");
    }
}

#[test]
fn each_state_has_its_own_frame() {
    // No two states (other than the hotspot count variants) look alike at t=0
    // and t=1000 together, so the strip tells them apart.
    let all = states();
    for (i, (a, sa)) in all.iter().enumerate() {
        for (b, sb) in &all[i + 1..] {
            let fa = (frame_text(sa, 0, 255), frame_text(sa, 1000, 255));
            let fb = (frame_text(sb, 0, 255), frame_text(sb, 1000, 255));
            assert_ne!(fa, fb, "{a} and {b} look the same");
        }
    }
}
