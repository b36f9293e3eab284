//! The Secta box's hardware panel: buttons and the LED status strip.
//!
//! Buttons are embedded-hal 1.0 `InputPin`s and the strip an embedded-hal
//! `SpiBus`, from one of the [`backend`]s. [`Panel::start`] runs two threads:
//! one samples the buttons (debounce, presses, chords, the panic-wipe
//! gesture), the other renders the box's [`secta_runtime::Status`] onto the
//! strip at a steady frame rate. Neither waits on anything else in the box;
//! a wipe decision is handed to a callback that must not block.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use secta_runtime::{Report, Status, WipeStatus};

pub mod backend;
pub mod config;
pub mod encode;
pub mod input;
pub mod pattern;

pub use backend::{sim::SimBoard, Hardware};
pub use config::{Backend, ButtonConfig, PanelConfig};
pub use encode::LedType;
pub use input::{ButtonEvent, WipeTrigger};

/// One LED's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Rgb {
    pub r: u8,
    pub g: u8,
    pub b: u8,
}

impl Rgb {
    pub const OFF: Rgb = Rgb::new(0, 0, 0);

    pub const fn new(r: u8, g: u8, b: u8) -> Self {
        Self { r, g, b }
    }

    /// `#rrggbb`.
    pub fn hex(&self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.r, self.g, self.b)
    }
}

/// Something the panel noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelEvent {
    Button(ButtonEvent),
    /// The wipe gesture completed: wipe now.
    Wipe(WipeTrigger),
}

/// Opens the configured backend's hardware. `Backend::Sim` gives a fresh
/// simulated board too; `Backend::None` gives `Ok(None)`.
pub fn open(cfg: &PanelConfig) -> Result<Option<(Hardware, Option<SimBoard>)>, String> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(format!("invalid [panel] settings: {}", problems.join("; ")));
    }
    match cfg.backend {
        Backend::None => Ok(None),
        Backend::Sim => {
            let board = SimBoard::new(cfg.buttons.len(), cfg.led_type, cfg.leds);
            Ok(Some((board.hardware(), Some(board))))
        }
        #[cfg(feature = "rppal")]
        Backend::Rppal => backend::rpi::open(cfg).map(|h| Some((h, None))),
        #[cfg(not(feature = "rppal"))]
        Backend::Rppal => {
            Err("this build has no Raspberry Pi support (cargo feature `rppal`)".into())
        }
        #[cfg(feature = "linux")]
        Backend::Linux => backend::linux::open(cfg).map(|h| Some((h, None))),
        #[cfg(not(feature = "linux"))]
        Backend::Linux => {
            Err("this build has no Linux GPIO support (cargo feature `linux`)".into())
        }
    }
}

/// The running panel; dropping it stops both threads.
pub struct Panel {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Panel {
    /// Starts the button and strip threads. `on_event` is called from the
    /// button thread and must return quickly (send on a channel).
    pub fn start(
        cfg: &PanelConfig,
        hw: Hardware,
        status: Status,
        on_event: impl Fn(PanelEvent) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let Hardware { buttons, strip } = hw;
        if let Some(strip) = strip {
            let (cfg, status, stop) = (cfg.clone(), status.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("secta-strip".into())
                    .spawn(move || strip_loop(&cfg, strip, &status, &stop))?,
            );
        }
        if !buttons.is_empty() {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("secta-buttons".into())
                    .spawn(move || button_loop(&cfg, buttons, &status, &stop, on_event))?,
            );
        }
        Ok(Self { stop, threads })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Panel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Renders at a steady rate: frame k is due at start + k·period, whatever
/// the previous write cost (a late frame is skipped, not queued).
fn strip_loop(
    cfg: &PanelConfig,
    mut strip: Box<dyn backend::StripBus>,
    status: &Status,
    stop: &AtomicBool,
) {
    let period = Duration::from_secs(1) / cfg.frame_rate.max(1);
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut next = start;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let t = now.duration_since(start).as_millis() as u64;
        let frame = pattern::render(&status.snapshot(), t, cfg.leds, cfg.brightness);
        encode::encode(cfg.led_type, &frame, cfg.spi_hz, &mut bytes);
        match strip.write_frame(&bytes) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "LED strip write failed");
            }
            Err(_) => {}
        }
        next += period;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        std::thread::sleep(next - now);
    }
    // Dark on the way out (not after a wipe: "wiped" stays lit).
    if status.snapshot().wipe != WipeStatus::Wiped {
        encode::encode(
            cfg.led_type,
            &vec![Rgb::OFF; cfg.leds],
            cfg.spi_hz,
            &mut bytes,
        );
        let _ = strip.write_frame(&bytes);
    }
}

fn button_loop(
    cfg: &PanelConfig,
    mut pins: Vec<Box<dyn backend::ButtonPin>>,
    status: &Status,
    stop: &AtomicBool,
    on_event: impl Fn(PanelEvent),
) {
    let timing = input::Timing {
        debounce_ms: cfg.debounce_ms,
        long_press_ms: cfg.long_press_ms,
        chord_ms: cfg.chord_ms,
    };
    let mut buttons = input::Buttons::new(pins.len(), timing);
    let mut gesture = input::WipeGesture::new(0, cfg.wipe_hold_ms, cfg.chord_wipe, cfg.chord_ms);
    let start = Instant::now();
    let mut raw = vec![false; pins.len()];
    let mut failing = vec![false; pins.len()];
    let mut arming = false;
    let mut stuck_logged = false;
    while !stop.load(Ordering::Relaxed) {
        for (i, p) in pins.iter_mut().enumerate() {
            raw[i] = match p.pressed() {
                Ok(v) => {
                    failing[i] = false;
                    v
                }
                Err(e) => {
                    if !failing[i] {
                        tracing::warn!(button = %cfg.buttons[i].name, error = %e, "reading a button failed");
                    }
                    failing[i] = true;
                    false
                }
            };
        }
        let now = start.elapsed().as_millis() as u64;
        for e in buttons.update(now, &raw) {
            tracing::debug!(event = ?e, "button");
            on_event(PanelEvent::Button(e));
        }
        if !stuck_logged && (0..pins.len()).any(|i| buttons.is_stuck(i)) {
            stuck_logged = true;
            tracing::warn!("a panel button is held since start: it is ignored until released");
        }
        match gesture.update(&buttons, now) {
            input::Gesture::Arming {
                remaining_ms,
                total_ms,
            } => {
                arming = true;
                // Tenths of a second are enough for the strip and the web app.
                let remaining_ms = (remaining_ms.div_ceil(100) * 100) as u32;
                status.report(Report::Wipe(WipeStatus::Armed {
                    remaining_ms,
                    total_ms: total_ms as u32,
                }));
            }
            input::Gesture::Fire(trigger) => {
                arming = false;
                tracing::warn!(?trigger, "panic wipe gesture completed");
                status.report(Report::Wipe(WipeStatus::InProgress));
                on_event(PanelEvent::Wipe(trigger));
            }
            input::Gesture::Idle if arming => {
                arming = false;
                tracing::info!("panic wipe cancelled (button let go)");
                status.report(Report::Wipe(WipeStatus::Idle));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(cfg.sample_ms));
    }
}
