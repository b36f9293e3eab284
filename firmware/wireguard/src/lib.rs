//! The WireGuard gateway of the Secta box, on boringtun in userspace (no kernel
//! module needed): members' devices dial in, hotspot traffic can leave through
//! an upstream exit with a kill switch, and boxes link to each other.
//!
//! The protocol is boringtun's `noise::Tunn`; this crate owns the device loop
//! (TUN queues, UDP sockets, timers, the `wg` UAPI socket) so it can add
//! obfuscation, mark its own UDP packets and run several workers.

pub mod alloc;
pub mod conf;
pub mod config;
pub mod device;
pub mod exit;
pub mod gso;
pub mod iface;
pub mod keys;
pub mod link;
pub mod net;
pub mod obfs;
pub mod profile;
pub mod qr;
pub mod service;
pub mod store;
pub mod tun;
pub mod uapi;

pub use conf::WgConf;
pub use config::WireguardConfig;
pub use keys::{PublicKey, SecretKey};
pub use service::{run, serve, Gateway};
pub use store::Store;
