//! The hotspot service: the captive portal (OS probe answers, the RFC 8908 API,
//! sessions), and the configuration of hostapd, dnsmasq and nftables that the box
//! writes for its Wi-Fi.
//!
//! Network effects sit behind the [`Firewall`] trait: a simulated backend for
//! tests and demo mode, and nftables on a real box.

pub mod config;
pub mod control;
pub mod gen;
pub mod leases;
pub mod portal;
pub mod supervise;

pub use config::HotspotConfig;
pub use control::Hotspot;
pub use portal::{ClientInfo, Firewall, NftFirewall, Portal, SimFirewall, WebUi};
