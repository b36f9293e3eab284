//! Drivers for the buttons (embedded-hal `InputPin`) and the strip
//! (embedded-hal `SpiBus`): simulated, Raspberry Pi (rppal), Linux GPIO
//! character device + spidev.

use embedded_hal::{digital::InputPin, spi::SpiBus};

pub mod sim;

#[cfg(feature = "linux")]
pub mod linux;
#[cfg(feature = "rppal")]
pub mod rpi;

/// A button as the panel reads it (object-safe over any `InputPin`).
pub trait ButtonPin: Send {
    /// Whether the button is pressed now.
    fn pressed(&mut self) -> Result<bool, String>;
}

/// A strip's bus as the panel writes it (object-safe over any `SpiBus`).
pub trait StripBus: Send {
    fn write_frame(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// Any embedded-hal input pin; `active_low`: pressed reads low.
pub struct HalButton<P> {
    pub pin: P,
    pub active_low: bool,
}

impl<P: InputPin + Send> ButtonPin for HalButton<P> {
    fn pressed(&mut self) -> Result<bool, String> {
        let r = if self.active_low {
            self.pin.is_low()
        } else {
            self.pin.is_high()
        };
        r.map_err(|e| format!("{:?}", embedded_hal::digital::Error::kind(&e)))
    }
}

/// Any embedded-hal SPI bus.
pub struct HalStrip<S>(pub S);

impl<S: SpiBus<u8> + Send> StripBus for HalStrip<S> {
    fn write_frame(&mut self, bytes: &[u8]) -> Result<(), String> {
        let kind = |e: S::Error| format!("{:?}", embedded_hal::spi::Error::kind(&e));
        self.0.write(bytes).map_err(kind)?;
        self.0.flush().map_err(kind)
    }
}

/// Opened panel hardware.
pub struct Hardware {
    pub buttons: Vec<Box<dyn ButtonPin>>,
    /// `None`: no strip (buttons only).
    pub strip: Option<Box<dyn StripBus>>,
}
