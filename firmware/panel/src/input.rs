//! Buttons: software debounce, short and long presses, two-button chords, and
//! the rule that a button already held when the box starts never counts until
//! it has been released.
//!
//! Everything here is a pure function of (time in ms, raw readings), so the
//! tests drive it with bouncing, noisy sequences without hardware or sleeps.

/// Timing of button gestures, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A reading must hold this long before it counts (contact bounce, noise).
    pub debounce_ms: u64,
    /// A press held this long is a long press.
    pub long_press_ms: u64,
    /// Two buttons held together this long are a chord.
    pub chord_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            debounce_ms: 30,
            long_press_ms: 1000,
            chord_ms: 1500,
        }
    }
}

/// What the buttons did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonEvent {
    /// The button went down (after debounce).
    Down(usize),
    /// Released before a long press, and not part of a chord.
    Short(usize),
    /// Held for the long-press time (sent once, while still held).
    Long(usize),
    /// The two buttons (lower index first) held together for the chord time.
    Chord(usize, usize),
    /// The button went up after `held_ms`.
    Up { button: usize, held_ms: u64 },
}

#[derive(Debug, Clone, Default)]
struct Button {
    /// Debounced state: pressed or not.
    pressed: bool,
    /// The raw reading being timed, and since when it has held.
    candidate: bool,
    candidate_since: u64,
    /// False while a button that was down at start has not been released yet.
    armed: bool,
    /// When the current (armed) press began.
    down_at: Option<u64>,
    long_sent: bool,
    /// This press was used by a chord: no short or long press for it.
    in_chord: bool,
}

/// The debounced state of all buttons.
#[derive(Debug, Clone)]
pub struct Buttons {
    timing: Timing,
    buttons: Vec<Button>,
    started: bool,
    chord_sent: bool,
}

impl Buttons {
    pub fn new(count: usize, timing: Timing) -> Self {
        Self {
            timing,
            buttons: vec![Button::default(); count],
            started: false,
            chord_sent: false,
        }
    }

    /// Feeds one sample of every button (`true` = pressed) taken at `now_ms`
    /// (monotonic); returns what happened. Sample every few milliseconds.
    pub fn update(&mut self, now_ms: u64, raw: &[bool]) -> Vec<ButtonEvent> {
        let mut events = Vec::new();
        if !self.started {
            // Whatever is held at start is stuck (or someone leaned on it): it
            // must be seen released before it may do anything.
            self.started = true;
            for (b, &r) in self.buttons.iter_mut().zip(raw) {
                b.pressed = r;
                b.candidate = r;
                b.candidate_since = now_ms;
                b.armed = !r;
            }
            return events;
        }
        for (i, (b, &r)) in self.buttons.iter_mut().zip(raw).enumerate() {
            if r != b.candidate {
                b.candidate = r;
                b.candidate_since = now_ms;
            }
            if b.candidate == b.pressed
                || now_ms.saturating_sub(b.candidate_since) < self.timing.debounce_ms
            {
                continue;
            }
            b.pressed = b.candidate;
            if !b.armed {
                if !b.pressed {
                    b.armed = true;
                }
                continue;
            }
            if b.pressed {
                // The press began when the contact first closed, not when the
                // debounce finished.
                b.down_at = Some(b.candidate_since);
                b.long_sent = false;
                b.in_chord = false;
                events.push(ButtonEvent::Down(i));
            } else if let Some(at) = b.down_at.take() {
                let held_ms = b.candidate_since.saturating_sub(at);
                if !b.long_sent && !b.in_chord {
                    events.push(ButtonEvent::Short(i));
                }
                events.push(ButtonEvent::Up { button: i, held_ms });
            }
        }
        // Chords: the first two buttons held together.
        let held: Vec<usize> = (0..self.buttons.len())
            .filter(|&i| self.buttons[i].down_at.is_some())
            .collect();
        if held.len() < 2 {
            self.chord_sent = false;
        } else if !self.chord_sent {
            let (a, b) = (held[0], held[1]);
            self.buttons[a].in_chord = true;
            self.buttons[b].in_chord = true;
            if self.chord_held_ms(now_ms).unwrap_or(0) >= self.timing.chord_ms {
                self.chord_sent = true;
                events.push(ButtonEvent::Chord(a, b));
            }
        }
        for (i, b) in self.buttons.iter_mut().enumerate() {
            if let Some(at) = b.down_at {
                if !b.long_sent && !b.in_chord && now_ms - at >= self.timing.long_press_ms {
                    b.long_sent = true;
                    events.push(ButtonEvent::Long(i));
                }
            }
        }
        events
    }

    /// How long button `i` has been held (armed presses only).
    pub fn held_ms(&self, i: usize, now_ms: u64) -> Option<u64> {
        self.buttons
            .get(i)?
            .down_at
            .map(|at| now_ms.saturating_sub(at))
    }

    /// How long two buttons have been held together (from the later press).
    pub fn chord_held_ms(&self, now_ms: u64) -> Option<u64> {
        let mut starts: Vec<u64> = self.buttons.iter().filter_map(|b| b.down_at).collect();
        if starts.len() < 2 {
            return None;
        }
        starts.sort_unstable();
        Some(now_ms.saturating_sub(starts[1]))
    }

    /// Whether button `i` is debounced-down but not yet armed (stuck since start).
    pub fn is_stuck(&self, i: usize) -> bool {
        self.buttons.get(i).is_some_and(|b| !b.armed && b.pressed)
    }
}

/// The panic-wipe gesture over [`Buttons`]: hold the panic button for
/// `hold_ms`, or (optionally) hold a two-button chord for `chord_ms`. Letting
/// go before then cancels.
#[derive(Debug, Clone)]
pub struct WipeGesture {
    pub panic_button: usize,
    pub hold_ms: u64,
    pub chord: bool,
    pub chord_ms: u64,
    fired: bool,
}

/// Where the wipe gesture stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gesture {
    Idle,
    /// Held; fires after `remaining_ms` more.
    Arming {
        remaining_ms: u64,
        total_ms: u64,
    },
    /// Fired now (returned once per gesture).
    Fire(WipeTrigger),
    /// Fired earlier and still held.
    Done,
}

/// What fired the wipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipeTrigger {
    LongPress,
    Chord,
}

impl WipeGesture {
    pub fn new(panic_button: usize, hold_ms: u64, chord: bool, chord_ms: u64) -> Self {
        Self {
            panic_button,
            hold_ms,
            chord,
            chord_ms,
            fired: false,
        }
    }

    pub fn update(&mut self, buttons: &Buttons, now_ms: u64) -> Gesture {
        let long = buttons.held_ms(self.panic_button, now_ms).map(|h| {
            (
                self.hold_ms.saturating_sub(h),
                self.hold_ms,
                WipeTrigger::LongPress,
            )
        });
        let chord = self
            .chord
            .then(|| buttons.chord_held_ms(now_ms))
            .flatten()
            .map(|h| {
                (
                    self.chord_ms.saturating_sub(h),
                    self.chord_ms,
                    WipeTrigger::Chord,
                )
            });
        // The one closer to firing counts.
        let best = match (long, chord) {
            (Some(l), Some(c)) => Some(if c.0 < l.0 { c } else { l }),
            (l, c) => l.or(c),
        };
        match best {
            None => {
                self.fired = false;
                Gesture::Idle
            }
            Some(_) if self.fired => Gesture::Done,
            Some((0, _, trigger)) => {
                self.fired = true;
                Gesture::Fire(trigger)
            }
            Some((remaining_ms, total_ms, _)) => Gesture::Arming {
                remaining_ms,
                total_ms,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `samples` (time ms, readings) through a fresh Buttons every 5 ms
    /// between the given points, holding each reading until the next point.
    fn run(points: &[(u64, &[bool])], until: u64) -> (Buttons, Vec<(u64, ButtonEvent)>) {
        let mut b = Buttons::new(points[0].1.len(), Timing::default());
        let mut out = Vec::new();
        let mut t = 0;
        while t <= until {
            let raw = points.iter().rev().find(|(at, _)| *at <= t).unwrap().1;
            for e in b.update(t, raw) {
                out.push((t, e));
            }
            t += 5;
        }
        (b, out)
    }

    const UP: &[bool] = &[false, false];
    const A: &[bool] = &[true, false];
    const B: &[bool] = &[false, true];
    const AB: &[bool] = &[true, true];

    #[test]
    fn short_press_with_bounce() {
        let (_, ev) = run(
            &[
                (0, UP),
                (100, A),
                (105, UP),
                (110, A),
                (115, UP),
                (120, A),
                (300, UP),
                (305, A),
                (310, UP),
            ],
            600,
        );
        let kinds: Vec<ButtonEvent> = ev.iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            vec![
                ButtonEvent::Down(0),
                ButtonEvent::Short(0),
                ButtonEvent::Up {
                    button: 0,
                    held_ms: 190
                },
            ]
        );
    }

    #[test]
    fn noise_spikes_never_make_a_press() {
        // 20 ms spikes every 100 ms for 10 s: shorter than the debounce.
        let mut pts: Vec<(u64, &[bool])> = vec![(0, UP)];
        for k in 1..100 {
            pts.push((k * 100, A));
            pts.push((k * 100 + 20, UP));
        }
        let (_, ev) = run(&pts, 10_000);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn long_press_fires_once_and_bounces_do_not_cancel_it() {
        let (_, ev) = run(&[(0, UP), (100, A), (600, UP), (610, A), (1500, UP)], 2000);
        let kinds: Vec<ButtonEvent> = ev.iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            vec![
                ButtonEvent::Down(0),
                ButtonEvent::Long(0),
                ButtonEvent::Up {
                    button: 0,
                    held_ms: 1400
                },
            ]
        );
        assert_eq!(ev[1].0, 1100, "long press at 1 s from the first contact");
    }

    #[test]
    fn chord_needs_both_held_for_the_chord_time() {
        let (_, ev) = run(&[(0, UP), (100, A), (300, AB), (2000, B), (2100, UP)], 2500);
        let kinds: Vec<ButtonEvent> = ev.iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            vec![
                ButtonEvent::Down(0),
                ButtonEvent::Down(1),
                ButtonEvent::Chord(0, 1),
                ButtonEvent::Up {
                    button: 0,
                    held_ms: 1900
                },
                ButtonEvent::Up {
                    button: 1,
                    held_ms: 1800
                },
            ]
        );
        assert_eq!(ev[2].0, 1800);
        // Let go early: no chord, and no long press either (the press was a chord attempt).
        let (_, ev) = run(&[(0, UP), (100, AB), (900, UP)], 3000);
        assert!(
            ev.iter().all(|e| !matches!(
                e.1,
                ButtonEvent::Chord(..) | ButtonEvent::Long(_) | ButtonEvent::Short(_)
            )),
            "{ev:?}"
        );
    }

    #[test]
    fn stuck_at_boot_never_triggers_until_released_and_pressed_again() {
        let mut g = WipeGesture::new(0, 3000, true, 1500);
        let mut b = Buttons::new(2, Timing::default());
        // Held from boot for 10 s, with a bounce: nothing, and no countdown.
        let mut t = 0;
        while t < 10_000 {
            let raw = if (5000..5010).contains(&t) { UP } else { A };
            assert!(b.update(t, raw).is_empty());
            assert_eq!(g.update(&b, t), Gesture::Idle);
            t += 5;
        }
        assert!(b.is_stuck(0));
        // Both stuck at boot: no chord either.
        let (_, ev) = run(&[(0, AB)], 5000);
        assert!(ev.is_empty());
        // Released, then pressed again: now it counts.
        let mut fired_at = None;
        while t < 20_000 {
            let raw = if t < 10_500 { UP } else { A };
            b.update(t, raw);
            if let Gesture::Fire(WipeTrigger::LongPress) = g.update(&b, t) {
                fired_at.get_or_insert(t);
            }
            t += 5;
        }
        assert_eq!(fired_at, Some(13_500));
    }

    #[test]
    fn wipe_gesture_counts_down_cancels_and_fires_once() {
        let mut g = WipeGesture::new(0, 3000, true, 1500);
        let mut b = Buttons::new(2, Timing::default());
        let mut seen = Vec::new();
        let mut t = 0;
        // Hold 2 s and let go: armed, counting down, never fired.
        while t < 4000 {
            b.update(t, if (1000..3000).contains(&t) { A } else { UP });
            seen.push(g.update(&b, t));
            t += 5;
        }
        assert!(seen.contains(&Gesture::Arming {
            remaining_ms: 1000,
            total_ms: 3000
        }));
        assert!(!seen.iter().any(|s| matches!(s, Gesture::Fire(_))));
        assert_eq!(*seen.last().unwrap(), Gesture::Idle);
        // Hold 5 s: fires once at 3 s, then Done.
        seen.clear();
        while t < 10_000 {
            b.update(t, if (4000..9000).contains(&t) { A } else { UP });
            seen.push(g.update(&b, t));
            t += 5;
        }
        assert_eq!(
            seen.iter()
                .filter(|s| matches!(s, Gesture::Fire(WipeTrigger::LongPress)))
                .count(),
            1
        );
        assert!(seen.contains(&Gesture::Done));
        // The chord fires sooner than the long press.
        let mut g = WipeGesture::new(0, 3000, true, 1500);
        let mut b = Buttons::new(2, Timing::default());
        let mut fired = None;
        for t in (0..5000).step_by(5) {
            b.update(t, if t >= 100 { AB } else { UP });
            if let Gesture::Fire(w) = g.update(&b, t) {
                fired = Some((t, w));
            }
        }
        assert_eq!(fired, Some((1600, WipeTrigger::Chord)));
    }
}
