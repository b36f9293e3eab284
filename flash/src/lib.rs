//! `secta-flash`: writes a Secta image to an SD card or an image file, verifies
//! it, and pre-seeds the box's first-boot settings on its FAT boot partition.
//!
//! The order of writes keeps a failed run from looking like a good card: the
//! first [`HEAD_LEN`] bytes (the partition table) are zeroed first and written
//! last, after the rest was read back and its SHA-256 matched, and after the
//! pre-seed file was written and read back. A card whose write failed has no
//! partition table, so no board boots from it.

pub mod bootpart;
pub mod disks;
pub mod image;
pub mod secrets;
pub mod target;
pub mod writer;

/// Bytes at the start of the target that are held back and written last: the
/// MBR (Secta images use MBR partitioning, as the Raspberry Pi firmware expects).
pub const HEAD_LEN: usize = 4096;
