//! Any Linux board (OpenWrt routers, other SBCs): buttons are lines of a GPIO
//! character device (`/dev/gpiochipN`, by offset), the strip is a spidev
//! device. The v1 character-device ABI sets no bias: the board needs pull-ups
//! (external or from its device tree) on the button lines.

use linux_embedded_hal::{
    gpio_cdev::{Chip, LineRequestFlags},
    spidev::{SpiModeFlags, SpidevOptions},
    CdevPin, SpidevBus,
};

use super::{HalButton, HalStrip, Hardware};
use crate::PanelConfig;

pub fn open(cfg: &PanelConfig) -> Result<Hardware, String> {
    let chip_path = cfg.gpiochip.display();
    let mut chip = Chip::new(&cfg.gpiochip).map_err(|e| format!("opening {chip_path}: {e}"))?;
    let mut buttons: Vec<Box<dyn super::ButtonPin>> = Vec::new();
    for b in &cfg.buttons {
        let handle = chip
            .get_line(b.pin)
            .and_then(|l| l.request(LineRequestFlags::INPUT, 0, "secta-panel"))
            .map_err(|e| format!("{chip_path} line {} ({}): {e}", b.pin, b.name))?;
        let pin = CdevPin::new(handle).map_err(|e| format!("{chip_path} line {}: {e}", b.pin))?;
        buttons.push(Box::new(HalButton {
            pin,
            active_low: b.active_low,
        }));
    }
    let strip = if cfg.leds > 0 {
        let dev = cfg.spi_device.display();
        let mut bus =
            SpidevBus::open(&cfg.spi_device).map_err(|e| format!("opening {dev}: {e:?}"))?;
        bus.0
            .configure(
                &SpidevOptions::new()
                    .bits_per_word(8)
                    .max_speed_hz(cfg.spi_hz)
                    .mode(SpiModeFlags::SPI_MODE_0)
                    .build(),
            )
            .map_err(|e| format!("configuring {dev}: {e}"))?;
        Some(Box::new(HalStrip(bus)) as _)
    } else {
        None
    };
    Ok(Hardware { buttons, strip })
}
