//! The box's status: one channel every service reports into.
//!
//! Services hold a [`Status`] handle and send [`Report`]s; the panel (LED
//! strip), the admin API and the web app's virtual panel read the resulting
//! [`BoxStatus`] snapshot. Reporting never blocks and never fails: the latest
//! snapshot is kept, readers look at it when they like (the strip does so at
//! its frame rate). Services do not know who reads.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

/// Where the box is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Starting services.
    #[default]
    Booting,
    /// Every enabled service started.
    Ready,
}

/// The panic wipe as the strip shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum WipeStatus {
    /// Nothing armed.
    #[default]
    Idle,
    /// A wipe gesture is being held: it fires after `remaining_ms` more of `total_ms`.
    Armed { remaining_ms: u32, total_ms: u32 },
    /// The wipe was decided and runs.
    InProgress,
    /// Key and data are gone; the box is in its first-boot state.
    Wiped,
}

/// Everything the status strip can show, as the latest reports left it.
/// `None` means "no service reports this" (not the same as down).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BoxStatus {
    pub phase: Phase,
    /// Phones and laptops currently accepted on the hotspot.
    pub hotspot_clients: Option<u32>,
    /// Whether the box reaches the internet.
    pub internet: Option<bool>,
    /// Whether the upstream VPN exit for hotspot traffic is up.
    pub vpn_exit: Option<bool>,
    /// Federation peers: (reachable, known).
    pub federation: Option<(u32, u32)>,
    /// A radio show (live source) is on air.
    pub radio_on_air: bool,
    /// Problems needing the admin, by service; empty when all is well.
    pub problems: BTreeMap<String, String>,
    pub wipe: WipeStatus,
}

/// One thing a service reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Booting,
    Ready,
    HotspotClients(u32),
    Internet(bool),
    VpnExit(bool),
    FederationPeers {
        reachable: u32,
        known: u32,
    },
    RadioOnAir(bool),
    /// A problem that needs the admin, keyed by service (a new one replaces the old).
    Problem {
        service: String,
        message: String,
    },
    ProblemCleared {
        service: String,
    },
    Wipe(WipeStatus),
}

impl BoxStatus {
    /// Applies one report.
    pub fn apply(&mut self, report: Report) {
        match report {
            Report::Booting => self.phase = Phase::Booting,
            Report::Ready => self.phase = Phase::Ready,
            Report::HotspotClients(n) => self.hotspot_clients = Some(n),
            Report::Internet(up) => self.internet = Some(up),
            Report::VpnExit(up) => self.vpn_exit = Some(up),
            Report::FederationPeers { reachable, known } => {
                self.federation = Some((reachable.min(known), known))
            }
            Report::RadioOnAir(on) => self.radio_on_air = on,
            Report::Problem { service, message } => {
                self.problems.insert(service, message);
            }
            Report::ProblemCleared { service } => {
                self.problems.remove(&service);
            }
            Report::Wipe(w) => {
                // Once wiped, only a new process (first boot) starts over.
                if self.wipe != WipeStatus::Wiped
                    && !(self.wipe == WipeStatus::InProgress
                        && matches!(w, WipeStatus::Idle | WipeStatus::Armed { .. }))
                {
                    self.wipe = w;
                }
            }
        }
    }
}

/// A cloneable handle: report into it, read or watch the snapshot.
#[derive(Clone)]
pub struct Status {
    tx: Arc<watch::Sender<BoxStatus>>,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(BoxStatus::default())),
        }
    }

    /// Applies a report; wakes watchers only when the snapshot changed.
    pub fn report(&self, report: Report) {
        self.tx.send_if_modified(|s| {
            let before = s.clone();
            s.apply(report);
            *s != before
        });
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> BoxStatus {
        self.tx.borrow().clone()
    }

    /// A receiver that is woken on every change.
    pub fn watch(&self) -> watch::Receiver<BoxStatus> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_build_the_snapshot() {
        let s = Status::new();
        let mut rx = s.watch();
        assert_eq!(s.snapshot().phase, Phase::Booting);
        s.report(Report::Ready);
        s.report(Report::HotspotClients(3));
        s.report(Report::FederationPeers {
            reachable: 5,
            known: 2,
        });
        s.report(Report::Problem {
            service: "radio".into(),
            message: "disk full".into(),
        });
        let snap = s.snapshot();
        assert_eq!(snap.phase, Phase::Ready);
        assert_eq!(snap.hotspot_clients, Some(3));
        assert_eq!(snap.federation, Some((2, 2)));
        assert_eq!(snap.problems.len(), 1);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        s.report(Report::HotspotClients(3));
        assert!(
            !rx.has_changed().unwrap(),
            "an unchanged report wakes nobody"
        );
        s.report(Report::ProblemCleared {
            service: "radio".into(),
        });
        assert!(s.snapshot().problems.is_empty());
    }

    #[test]
    fn wiped_is_final_and_a_running_wipe_is_not_disarmed() {
        let s = Status::new();
        s.report(Report::Wipe(WipeStatus::Armed {
            remaining_ms: 1000,
            total_ms: 3000,
        }));
        s.report(Report::Wipe(WipeStatus::InProgress));
        s.report(Report::Wipe(WipeStatus::Idle));
        assert_eq!(s.snapshot().wipe, WipeStatus::InProgress);
        s.report(Report::Wipe(WipeStatus::Wiped));
        s.report(Report::Wipe(WipeStatus::Idle));
        assert_eq!(s.snapshot().wipe, WipeStatus::Wiped);
    }
}
