//! The box's state → what the LED strip shows: one declarative table.
//!
//! The strip is read left to right. Whole-strip rows (wipe, booting) win in
//! table order; otherwise every slot row paints its own LED(s):
//!
//! | LED | meaning |
//! |---|---|
//! | 0 | the box: green = ready, amber blinking = a problem needs the admin |
//! | 1 | internet: green = up, red = down |
//! | 2 | VPN exit: cyan = up (off = down or none) |
//! | 3 | federation: violet = peers reachable, violet blinking = none reachable |
//! | 4 | radio: yellow = a show is on air |
//! | 5… | hotspot: one blue LED per connected client |
//!
//! Every colour passes through the brightness limit last.

use secta_runtime::{status::Phase, BoxStatus, WipeStatus};

use crate::Rgb;

/// How an LED (or the whole strip) looks over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    Off,
    Solid(Rgb),
    /// On for half of each period.
    Blink(Rgb, u32),
    /// Fades up and down over the period.
    Breathe(Rgb, u32),
    /// One lit LED running along the strip, one step per `period` ms.
    Chase(Rgb, u32),
    /// The fraction of the strip still to wait is lit (wipe countdown), blinking.
    Countdown(Rgb),
    /// One LED per counted thing, from the slot to the end of the strip.
    Count(Rgb),
}

/// Where a row paints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The whole strip; the first matching whole row hides every other row.
    Whole,
    /// One LED.
    Led(usize),
    /// From this LED to the end.
    From(usize),
}

/// One row of the table.
pub struct Row {
    /// A stable name (tests, docs, the web app's legend).
    pub name: &'static str,
    pub place: Place,
    /// The look for this state, or `None` when the row does not apply.
    pub look: fn(&BoxStatus) -> Option<Look>,
}

const GREEN: Rgb = Rgb::new(0, 255, 0);
const RED: Rgb = Rgb::new(255, 0, 0);
const AMBER: Rgb = Rgb::new(255, 120, 0);
const BLUE: Rgb = Rgb::new(0, 0, 255);
const CYAN: Rgb = Rgb::new(0, 200, 255);
const VIOLET: Rgb = Rgb::new(160, 0, 255);
const YELLOW: Rgb = Rgb::new(255, 220, 0);
const WHITE: Rgb = Rgb::new(255, 255, 255);

/// The table. Order matters for whole-strip rows.
pub const TABLE: &[Row] = &[
    Row {
        name: "wiped",
        place: Place::Whole,
        look: |s| (s.wipe == WipeStatus::Wiped).then_some(Look::Solid(WHITE)),
    },
    Row {
        name: "wipe_in_progress",
        place: Place::Whole,
        look: |s| (s.wipe == WipeStatus::InProgress).then_some(Look::Chase(RED, 40)),
    },
    Row {
        name: "wipe_armed",
        place: Place::Whole,
        look: |s| matches!(s.wipe, WipeStatus::Armed { .. }).then_some(Look::Countdown(RED)),
    },
    Row {
        name: "booting",
        place: Place::Whole,
        look: |s| (s.phase == Phase::Booting).then_some(Look::Chase(BLUE, 120)),
    },
    Row {
        name: "box",
        place: Place::Led(0),
        look: |s| {
            Some(if s.problems.is_empty() {
                Look::Breathe(GREEN, 4000)
            } else {
                Look::Blink(AMBER, 1000)
            })
        },
    },
    Row {
        name: "internet",
        place: Place::Led(1),
        look: |s| {
            s.internet
                .map(|up| Look::Solid(if up { GREEN } else { RED }))
        },
    },
    Row {
        name: "vpn_exit",
        place: Place::Led(2),
        look: |s| {
            s.vpn_exit
                .map(|up| if up { Look::Solid(CYAN) } else { Look::Off })
        },
    },
    Row {
        name: "federation",
        place: Place::Led(3),
        look: |s| match s.federation {
            None | Some((_, 0)) => None,
            Some((0, _)) => Some(Look::Blink(VIOLET, 2000)),
            Some(_) => Some(Look::Solid(VIOLET)),
        },
    },
    Row {
        name: "radio_on_air",
        place: Place::Led(4),
        look: |s| s.radio_on_air.then_some(Look::Solid(YELLOW)),
    },
    Row {
        name: "hotspot_clients",
        place: Place::From(5),
        look: |s| {
            s.hotspot_clients
                .filter(|&n| n > 0)
                .map(|_| Look::Count(BLUE))
        },
    },
];

fn scale(c: Rgb, num: u32, den: u32) -> Rgb {
    let f = |v: u8| (u32::from(v) * num / den.max(1)) as u8;
    Rgb::new(f(c.r), f(c.g), f(c.b))
}

/// Paints `look` over `leds` at time `t_ms`.
fn paint(look: Look, leds: &mut [Rgb], t_ms: u64, status: &BoxStatus) {
    let n = leds.len();
    match look {
        Look::Off => leds.fill(Rgb::OFF),
        Look::Solid(c) => leds.fill(c),
        Look::Blink(c, period) => {
            let on = t_ms % u64::from(period.max(2)) < u64::from(period / 2);
            leds.fill(if on { c } else { Rgb::OFF });
        }
        Look::Breathe(c, period) => {
            // Triangle wave between 25% and 100%.
            let p = u64::from(period.max(2));
            let phase = (t_ms % p) as u32;
            let half = (p / 2) as u32;
            let up = if phase < half {
                phase
            } else {
                p as u32 - phase
            };
            leds.fill(scale(c, 256 + 768 * up / half.max(1), 1024));
        }
        Look::Chase(c, step) => {
            leds.fill(Rgb::OFF);
            if n > 0 {
                leds[(t_ms / u64::from(step.max(1))) as usize % n] = c;
            }
        }
        Look::Countdown(c) => {
            leds.fill(Rgb::OFF);
            if let WipeStatus::Armed {
                remaining_ms,
                total_ms,
            } = status.wipe
            {
                // 4 Hz blink so nobody mistakes it for a status colour.
                if t_ms % 250 < 150 {
                    let lit =
                        (n as u64 * u64::from(remaining_ms)).div_ceil(u64::from(total_ms.max(1)));
                    leds[..(lit as usize).min(n)].fill(c);
                }
            }
        }
        Look::Count(c) => {
            leds.fill(Rgb::OFF);
            let k = status.hotspot_clients.unwrap_or(0) as usize;
            leds[..k.min(n)].fill(c);
        }
    }
}

/// The frame for `status` at time `t_ms` on a strip of `n` LEDs, with every
/// channel limited to `brightness` (0–255).
pub fn render(status: &BoxStatus, t_ms: u64, n: usize, brightness: u8) -> Vec<Rgb> {
    let mut frame = vec![Rgb::OFF; n];
    let whole = TABLE
        .iter()
        .filter(|r| r.place == Place::Whole)
        .find_map(|r| (r.look)(status));
    if let Some(look) = whole {
        paint(look, &mut frame, t_ms, status);
    } else {
        for row in TABLE {
            let range = match row.place {
                Place::Whole => continue,
                Place::Led(i) if i < n => i..i + 1,
                Place::From(i) if i < n => i..n,
                _ => continue,
            };
            if let Some(look) = (row.look)(status) {
                paint(look, &mut frame[range], t_ms, status);
            }
        }
    }
    for c in &mut frame {
        *c = scale(*c, u32::from(brightness), 255);
    }
    frame
}

/// The names of the rows that apply to `status` (for logs and the web app).
pub fn active_rows(status: &BoxStatus) -> Vec<&'static str> {
    let whole = TABLE
        .iter()
        .find(|r| r.place == Place::Whole && (r.look)(status).is_some());
    match whole {
        Some(r) => vec![r.name],
        None => TABLE
            .iter()
            .filter(|r| r.place != Place::Whole && (r.look)(status).is_some())
            .map(|r| r.name)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brightness_limit_caps_every_channel() {
        let mut s = BoxStatus::default();
        s.wipe = WipeStatus::Wiped;
        for limit in [0u8, 1, 64, 255] {
            let f = render(&s, 0, 8, limit);
            assert!(f
                .iter()
                .all(|c| c.r <= limit && c.g <= limit && c.b <= limit));
            assert_eq!(f[0].r, limit);
        }
    }

    #[test]
    fn short_strips_do_not_panic() {
        let mut s = BoxStatus::default();
        s.phase = Phase::Ready;
        s.hotspot_clients = Some(40);
        s.internet = Some(true);
        for n in 0..12 {
            assert_eq!(render(&s, 123, n, 255).len(), n);
        }
    }
}
