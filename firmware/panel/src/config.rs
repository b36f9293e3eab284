//! The `[panel]` section of the config file.

use std::path::PathBuf;

use crate::encode::LedType;

/// Which driver talks to the buttons and the strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// No panel hardware (the default: nothing is touched).
    None,
    /// Simulated buttons and strip (tests, demo; the web app's virtual panel).
    Sim,
    /// Raspberry Pi GPIO + SPI through rppal (BCM pin numbers).
    Rppal,
    /// Linux GPIO character device (`gpiochip`, line offsets) + spidev.
    Linux,
}

/// One button.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ButtonConfig {
    /// A name for logs ("panic", "aux").
    pub name: String,
    /// BCM GPIO number (rppal) or line offset on `gpiochip` (linux).
    pub pin: u32,
    /// Pressed pulls the line to ground (the usual wiring, with the pull-up on).
    #[serde(default = "yes")]
    pub active_low: bool,
}

fn yes() -> bool {
    true
}

/// `[panel]`: pins, strip, gesture timing. Defaults are safe: no hardware
/// touched until `backend` says which.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PanelConfig {
    pub backend: Backend,
    /// The first button is the panic button.
    pub buttons: Vec<ButtonConfig>,
    /// GPIO character device (linux backend).
    pub gpiochip: PathBuf,
    /// spidev device (linux backend); the rppal backend uses SPI0 CE0.
    pub spi_device: PathBuf,
    /// SPI clock: WS2812 wants 2–3.8 MHz (3.2 MHz → 1.25 µs per LED bit);
    /// APA102 takes up to several MHz.
    pub spi_hz: u32,
    pub led_type: LedType,
    /// LEDs on the strip.
    pub leds: usize,
    /// Upper limit of every colour channel, 0–255 (current draw and glare).
    pub brightness: u8,
    /// Strip frames per second.
    pub frame_rate: u32,
    /// How often buttons are read.
    pub sample_ms: u64,
    pub debounce_ms: u64,
    pub long_press_ms: u64,
    /// Holding the panic button this long wipes the box (the strip counts down).
    pub wipe_hold_ms: u64,
    /// Holding the first two buttons together also wipes, after `chord_ms`.
    pub chord_wipe: bool,
    pub chord_ms: u64,
    /// Serve the panel's HTTP endpoint (virtual panel, duress wipe) here, e.g.
    /// "127.0.0.1:8090"; off by default.
    pub http_listen: Option<String>,
}

impl Default for PanelConfig {
    fn default() -> Self {
        Self {
            backend: Backend::None,
            buttons: vec![
                ButtonConfig {
                    name: "panic".into(),
                    pin: 17,
                    active_low: true,
                },
                ButtonConfig {
                    name: "aux".into(),
                    pin: 27,
                    active_low: true,
                },
            ],
            gpiochip: PathBuf::from("/dev/gpiochip0"),
            spi_device: PathBuf::from("/dev/spidev0.0"),
            spi_hz: 3_200_000,
            led_type: LedType::Ws2812,
            leds: 8,
            brightness: 48,
            frame_rate: 30,
            sample_ms: 5,
            debounce_ms: 30,
            long_press_ms: 1000,
            wipe_hold_ms: 3000,
            chord_wipe: true,
            chord_ms: 1500,
            http_listen: None,
        }
    }
}

impl PanelConfig {
    /// Everything wrong with these settings (empty when fine).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.leds > 1024 {
            p.push(format!("leds = {} is more than 1024", self.leds));
        }
        if self.led_type == LedType::Ws2812 && !(2_000_000..=3_800_000).contains(&self.spi_hz) {
            p.push(format!(
                "spi_hz = {} is outside 2–3.8 MHz, where WS2812 timing holds",
                self.spi_hz
            ));
        }
        if !(1..=120).contains(&self.frame_rate) {
            p.push("frame_rate must be 1–120".into());
        }
        if !(1..=50).contains(&self.sample_ms) {
            p.push("sample_ms must be 1–50".into());
        }
        if self.debounce_ms < self.sample_ms * 2 || self.debounce_ms > 500 {
            p.push("debounce_ms must be at least two samples and at most 500".into());
        }
        if self.wipe_hold_ms < 1000 {
            p.push("wipe_hold_ms below 1000 invites accidents".into());
        }
        if self.chord_wipe && self.buttons.len() < 2 {
            p.push("chord_wipe needs two buttons".into());
        }
        if self.chord_wipe && self.chord_ms < 500 {
            p.push("chord_ms below 500 invites accidents".into());
        }
        let mut pins: Vec<u32> = self.buttons.iter().map(|b| b.pin).collect();
        pins.sort_unstable();
        pins.dedup();
        if pins.len() != self.buttons.len() {
            p.push("two buttons on one pin".into());
        }
        p
    }
}
