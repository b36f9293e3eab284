//! Turning a frame of colours into the bytes an LED strip wants on its SPI bus.
//!
//! * **WS2812/WS2812B/SK6812** have a single data line with pulse-width coded
//!   bits. Clocked out of SPI's MOSI at 3.2 MHz, each LED bit becomes four SPI
//!   bits: `1000` for 0 (0.31 µs high) and `1110` for 1 (0.94 µs high), so one
//!   LED (24 bits, green-red-blue, most significant bit first) is 12 bytes. The
//!   line is then held low for at least 280 µs (newer parts; old ones needed
//!   50 µs) so the LEDs latch: zero bytes at the end of the frame.
//! * **APA102/SK9822** take clock and data: a start frame of 32 zero bits, per
//!   LED `0b111` + 5-bit global brightness then blue, green, red, and an end
//!   frame. The end frame is 32 zero bits (SK9822 latches on it) followed by at
//!   least n/2 more clock edges (APA102 shifts data one LED per half clock
//!   behind), sent as zero bytes so both chips agree.

use crate::Rgb;

/// Which chip is on the strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LedType {
    /// WS2812, WS2812B, SK6812 (RGB): one data line, driven from SPI MOSI.
    Ws2812,
    /// APA102 (DotStar): clock + data.
    Apa102,
    /// SK9822: APA102-compatible, latches on a 32-bit zero frame.
    Sk9822,
}

/// How long a WS2812 strip must see a low line to latch (newer parts need 280 µs).
pub const WS2812_RESET_US: u32 = 300;

/// Zero bytes after a WS2812 frame so the line stays low for the reset gap at `spi_hz`.
pub fn ws2812_reset_bytes(spi_hz: u32) -> usize {
    (u64::from(WS2812_RESET_US) * u64::from(spi_hz)).div_ceil(8 * 1_000_000) as usize
}

/// One colour byte as four SPI bytes: every LED bit is four SPI bits.
fn ws2812_byte(b: u8, out: &mut Vec<u8>) {
    for pair in (0..4).rev() {
        let hi = (b >> (pair * 2 + 1)) & 1;
        let lo = (b >> (pair * 2)) & 1;
        let nib = |bit: u8| if bit == 1 { 0b1110 } else { 0b1000 };
        out.push((nib(hi) << 4) | nib(lo));
    }
}

/// WS2812 frame: 12 bytes per LED (G, R, B) then the reset gap.
pub fn ws2812(frame: &[Rgb], spi_hz: u32, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(frame.len() * 12 + ws2812_reset_bytes(spi_hz));
    for c in frame {
        ws2812_byte(c.g, out);
        ws2812_byte(c.r, out);
        ws2812_byte(c.b, out);
    }
    out.resize(out.len() + ws2812_reset_bytes(spi_hz), 0);
}

/// APA102/SK9822 frame: start frame, one 4-byte frame per LED (full global
/// brightness: the colours are already brightness-limited), end frame.
pub fn apa102(frame: &[Rgb], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    for c in frame {
        out.extend_from_slice(&[0xE0 | 31, c.b, c.g, c.r]);
    }
    out.extend_from_slice(&[0; 4]);
    out.resize(out.len() + frame.len().div_ceil(16), 0);
}

/// Encodes for the given chip.
pub fn encode(kind: LedType, frame: &[Rgb], spi_hz: u32, out: &mut Vec<u8>) {
    match kind {
        LedType::Ws2812 => ws2812(frame, spi_hz, out),
        LedType::Apa102 | LedType::Sk9822 => apa102(frame, out),
    }
}

/// Reads a WS2812 frame back from SPI bytes (the simulated strip and the web
/// app's virtual strip show what the real one would). `None` if the bytes are
/// not a valid encoding of `n` LEDs.
pub fn decode_ws2812(bytes: &[u8], n: usize) -> Option<Vec<Rgb>> {
    if bytes.len() < n * 12 || bytes[n * 12..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for led in bytes[..n * 12].chunks(12) {
        let mut ch = [0u8; 3];
        for (i, four) in led.chunks(4).enumerate() {
            let mut v = 0u8;
            for byte in four {
                for nib in [byte >> 4, byte & 0xF] {
                    v = (v << 1)
                        | match nib {
                            0b1110 => 1,
                            0b1000 => 0,
                            _ => return None,
                        };
                }
            }
            ch[i] = v;
        }
        out.push(Rgb::new(ch[1], ch[0], ch[2]));
    }
    Some(out)
}

/// Reads an APA102 frame back from SPI bytes (full global brightness only).
pub fn decode_apa102(bytes: &[u8], n: usize) -> Option<Vec<Rgb>> {
    let end = 4 + n * 4;
    if bytes.len() != end + 4 + n.div_ceil(16) || bytes[..4] != [0; 4] {
        return None;
    }
    if bytes[end..].iter().any(|&b| b != 0) {
        return None;
    }
    bytes[4..end]
        .chunks(4)
        .map(|f| (f[0] == 0xFF).then(|| Rgb::new(f[3], f[2], f[1])))
        .collect()
}

/// Decodes for the given chip.
pub fn decode(kind: LedType, bytes: &[u8], n: usize) -> Option<Vec<Rgb>> {
    match kind {
        LedType::Ws2812 => decode_ws2812(bytes, n),
        LedType::Apa102 | LedType::Sk9822 => decode_apa102(bytes, n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws2812_bits_become_nibbles_grb_msb_first() {
        let mut out = Vec::new();
        // G = 0x80 (only MSB), R = 0x01 (only LSB), B = 0xA5.
        ws2812(&[Rgb::new(0x01, 0x80, 0xA5)], 3_200_000, &mut out);
        assert_eq!(
            &out[..12],
            &[
                0xE8, 0x88, 0x88, 0x88, // G 1000 0000
                0x88, 0x88, 0x88, 0x8E, // R 0000 0001
                0xE8, 0xE8, 0x8E, 0x8E, // B 1010 0101
            ]
        );
        // 300 µs at 3.2 MHz = 960 bits = 120 zero bytes.
        assert_eq!(out.len(), 12 + 120);
        assert!(out[12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn ws2812_white_black_and_length() {
        let mut out = Vec::new();
        ws2812(
            &[Rgb::new(255, 255, 255), Rgb::new(0, 0, 0)],
            2_400_000,
            &mut out,
        );
        assert_eq!(&out[..12], &[0xEE; 12]);
        assert_eq!(&out[12..24], &[0x88; 12]);
        assert_eq!(ws2812_reset_bytes(2_400_000), 90);
        assert_eq!(out.len(), 24 + 90);
        // 3.8 MHz rounds up: 300 µs · 3.8 MHz / 8 = 142.5 → 143.
        assert_eq!(ws2812_reset_bytes(3_800_000), 143);
    }

    #[test]
    fn apa102_frames() {
        let mut out = Vec::new();
        apa102(&[Rgb::new(1, 2, 3), Rgb::new(0xFF, 0, 0x10)], &mut out);
        assert_eq!(
            out,
            vec![
                0, 0, 0, 0, // start
                0xFF, 3, 2, 1, // LED 0: brightness 31, B G R
                0xFF, 0x10, 0, 0xFF, // LED 1
                0, 0, 0, 0, // SK9822 reset frame
                0, // ≥ n/2 clock edges: one byte covers 16 LEDs
            ]
        );
        let frame = vec![Rgb::new(9, 8, 7); 17];
        apa102(&frame, &mut out);
        assert_eq!(out.len(), 4 + 17 * 4 + 4 + 2);
    }

    #[test]
    fn decoders_invert_encoders_and_refuse_garbage() {
        let frame: Vec<Rgb> = (0..20u8)
            .map(|i| Rgb::new(i * 13, 255 - i, i.wrapping_mul(77)))
            .collect();
        let mut out = Vec::new();
        for kind in [LedType::Ws2812, LedType::Apa102, LedType::Sk9822] {
            encode(kind, &frame, 3_200_000, &mut out);
            assert_eq!(decode(kind, &out, frame.len()).unwrap(), frame);
        }
        encode(LedType::Ws2812, &frame, 3_200_000, &mut out);
        out[5] = 0xFF;
        assert!(decode_ws2812(&out, frame.len()).is_none());
        assert!(decode_apa102(&[1, 2, 3], 1).is_none());
    }
}
