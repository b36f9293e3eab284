//! The panel's threads on the simulated board: the strip is written at its
//! frame rate and shows the status; holding the panic button counts down on
//! the strip and fires the wipe once; letting go cancels; a button held at
//! start does nothing.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use secta_panel::{Panel, PanelConfig, PanelEvent, Rgb, SimBoard, WipeTrigger};
use secta_runtime::{Report, Status, WipeStatus};

fn cfg() -> PanelConfig {
    PanelConfig {
        backend: secta_panel::Backend::Sim,
        brightness: 255,
        wipe_hold_ms: 1000,
        chord_ms: 600,
        ..Default::default()
    }
}

fn start(board: &SimBoard, status: &Status) -> (Panel, mpsc::Receiver<PanelEvent>) {
    let (tx, rx) = mpsc::channel();
    let panel = Panel::start(&cfg(), board.hardware(), status.clone(), move |e| {
        let _ = tx.send(e);
    })
    .unwrap();
    (panel, rx)
}

/// Waits (bounded) for `f` to hold.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wipes(rx: &mpsc::Receiver<PanelEvent>) -> Vec<WipeTrigger> {
    rx.try_iter()
        .filter_map(|e| match e {
            PanelEvent::Wipe(t) => Some(t),
            _ => None,
        })
        .collect()
}

#[test]
fn strip_shows_status_and_the_long_press_wipes_once() {
    let board = SimBoard::new(2, secta_panel::LedType::Ws2812, 8);
    let status = Status::new();
    status.report(Report::Ready);
    status.report(Report::Internet(false));
    let (panel, rx) = start(&board, &status);
    wait_for("a frame with internet down", || {
        board.frame().is_some_and(|f| f[1] == Rgb::new(255, 0, 0))
    });
    let frames = board.frames();
    std::thread::sleep(Duration::from_millis(500));
    assert!(board.frames() > frames + 5, "the strip keeps rendering");

    // Hold 400 ms and let go: armed, then cancelled, no wipe.
    board.set(0, true);
    wait_for("armed", || {
        matches!(status.snapshot().wipe, WipeStatus::Armed { .. })
    });
    wait_for("countdown on the strip", || {
        board.frame().is_some_and(|f| {
            f.iter()
                .all(|c| *c == Rgb::OFF || *c == Rgb::new(255, 0, 0))
                && f[0] == Rgb::new(255, 0, 0)
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    board.set(0, false);
    wait_for("cancelled", || status.snapshot().wipe == WipeStatus::Idle);
    assert!(wipes(&rx).is_empty());

    // Hold past the wipe time: exactly one wipe.
    board.set(0, true);
    wait_for("in progress", || {
        status.snapshot().wipe == WipeStatus::InProgress
    });
    std::thread::sleep(Duration::from_millis(300));
    board.set(0, false);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(wipes(&rx), vec![WipeTrigger::LongPress]);
    status.report(Report::Wipe(WipeStatus::Wiped));
    wait_for("wiped on the strip", || {
        board
            .frame()
            .is_some_and(|f| f.iter().all(|c| *c == Rgb::new(255, 255, 255)))
    });
    panel.stop();
    // "Wiped" stays lit after the panel stops.
    assert!(board
        .frame()
        .unwrap()
        .iter()
        .all(|c| *c == Rgb::new(255, 255, 255)));
}

#[test]
fn a_button_held_at_start_never_wipes_until_pressed_again() {
    let board = SimBoard::new(2, secta_panel::LedType::Apa102, 8);
    let status = Status::new();
    board.set(0, true);
    board.set(1, true);
    let (panel, rx) = start(&board, &status);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(wipes(&rx).is_empty());
    assert_eq!(status.snapshot().wipe, WipeStatus::Idle);
    board.set(0, false);
    board.set(1, false);
    std::thread::sleep(Duration::from_millis(100));
    // Now the chord (600 ms) counts.
    board.set(0, true);
    board.set(1, true);
    wait_for("wipe", || status.snapshot().wipe == WipeStatus::InProgress);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(wipes(&rx), vec![WipeTrigger::Chord]);
    panel.stop();
}
