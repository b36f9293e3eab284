//! Raspberry Pi: buttons on BCM GPIO numbers with the internal pull-up, the
//! strip on SPI0 (MOSI = GPIO 10, SCLK = GPIO 11 for APA102). For WS2812 the
//! SPI clock must not follow the core clock: pin it in config.txt
//! (`core_freq=500` / `core_freq_min=500` on Pi 4) and raise
//! `spidev.bufsiz` on the kernel command line for strips over ~340 LEDs.

use rppal::{
    gpio::Gpio,
    spi::{Bus, Mode, SlaveSelect, Spi},
};

use super::{HalButton, HalStrip, Hardware};
use crate::PanelConfig;

pub fn open(cfg: &PanelConfig) -> Result<Hardware, String> {
    let gpio = Gpio::new().map_err(|e| format!("opening the Pi's GPIO: {e}"))?;
    let mut buttons: Vec<Box<dyn super::ButtonPin>> = Vec::new();
    for b in &cfg.buttons {
        let pin = u8::try_from(b.pin).map_err(|_| format!("GPIO {} does not exist", b.pin))?;
        let pin = gpio
            .get(pin)
            .map_err(|e| format!("GPIO {} ({}): {e}", b.pin, b.name))?;
        let pin = if b.active_low {
            pin.into_input_pullup()
        } else {
            pin.into_input_pulldown()
        };
        buttons.push(Box::new(HalButton {
            pin,
            active_low: b.active_low,
        }));
    }
    let strip = if cfg.leds > 0 {
        let spi = Spi::new(Bus::Spi0, SlaveSelect::Ss0, cfg.spi_hz, Mode::Mode0)
            .map_err(|e| format!("opening SPI0 (enable dtparam=spi=on): {e}"))?;
        Some(Box::new(HalStrip(spi)) as _)
    } else {
        None
    };
    Ok(Hardware { buttons, strip })
}
