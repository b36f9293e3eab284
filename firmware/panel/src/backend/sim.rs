//! Simulated buttons and strip: embedded-hal `InputPin`s whose level the
//! tests (or the web app's virtual buttons) set, and an `SpiBus` that keeps the
//! last frame's bytes, decoded back into colours exactly as a strip would.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use embedded_hal::{digital, spi};

use super::{HalButton, HalStrip, Hardware};
use crate::{encode::LedType, Rgb};

struct Inner {
    /// Electrical level of each button's line (true = high). Buttons are wired
    /// active-low like the real ones: pressed pulls the line low.
    lines: Vec<AtomicBool>,
    led_type: LedType,
    leds: usize,
    last: Mutex<Vec<u8>>,
    frames: AtomicU64,
}

/// A simulated panel board. Clones share the board.
#[derive(Clone)]
pub struct SimBoard(Arc<Inner>);

impl SimBoard {
    pub fn new(buttons: usize, led_type: LedType, leds: usize) -> Self {
        Self(Arc::new(Inner {
            lines: (0..buttons).map(|_| AtomicBool::new(true)).collect(),
            led_type,
            leds,
            last: Mutex::new(Vec::new()),
            frames: AtomicU64::new(0),
        }))
    }

    /// The hardware to give the panel.
    pub fn hardware(&self) -> Hardware {
        Hardware {
            buttons: (0..self.0.lines.len())
                .map(|i| {
                    Box::new(HalButton {
                        pin: SimPin(self.clone(), i),
                        active_low: true,
                    }) as _
                })
                .collect(),
            strip: Some(Box::new(HalStrip(SimSpi(self.clone())))),
        }
    }

    /// Presses (`true`) or releases button `i`; out-of-range is ignored.
    pub fn set(&self, i: usize, pressed: bool) {
        if let Some(l) = self.0.lines.get(i) {
            l.store(!pressed, Ordering::SeqCst);
        }
    }

    pub fn is_pressed(&self, i: usize) -> bool {
        self.0
            .lines
            .get(i)
            .is_some_and(|l| !l.load(Ordering::SeqCst))
    }

    pub fn buttons(&self) -> usize {
        self.0.lines.len()
    }

    /// The colours the strip shows (decoded from the last SPI frame).
    pub fn frame(&self) -> Option<Vec<Rgb>> {
        let bytes = self.0.last.lock().unwrap_or_else(|p| p.into_inner());
        crate::encode::decode(self.0.led_type, &bytes, self.0.leds)
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.0.frames.load(Ordering::SeqCst)
    }
}

/// One simulated button line.
pub struct SimPin(SimBoard, usize);

impl digital::ErrorType for SimPin {
    type Error = Infallible;
}

impl digital::InputPin for SimPin {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.0 .0.lines[self.1].load(Ordering::SeqCst))
    }
    fn is_low(&mut self) -> Result<bool, Infallible> {
        self.is_high().map(|h| !h)
    }
}

/// The simulated strip's SPI bus.
pub struct SimSpi(SimBoard);

impl spi::ErrorType for SimSpi {
    type Error = Infallible;
}

impl spi::SpiBus<u8> for SimSpi {
    fn read(&mut self, words: &mut [u8]) -> Result<(), Infallible> {
        words.fill(0);
        Ok(())
    }
    fn write(&mut self, words: &[u8]) -> Result<(), Infallible> {
        let mut last = self.0 .0.last.lock().unwrap_or_else(|p| p.into_inner());
        last.clear();
        last.extend_from_slice(words);
        self.0 .0.frames.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn transfer(&mut self, read: &mut [u8], write: &[u8]) -> Result<(), Infallible> {
        self.write(write)?;
        read.fill(0);
        Ok(())
    }
    fn transfer_in_place(&mut self, words: &mut [u8]) -> Result<(), Infallible> {
        self.write(&words.to_vec())?;
        words.fill(0);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}
