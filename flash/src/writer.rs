//! Writing, verifying and pre-seeding, in an order that never leaves a card
//! that looks bootable but is not what was asked for.
//!
//! 1. The image's head (partition table) is read and checked; nothing is written
//!    if it is unusable.
//! 2. The target's first [`HEAD_LEN`] bytes are zeroed and flushed: from here on,
//!    until step 6, the card has no partition table and boots nowhere.
//! 3. The rest of the image is streamed to the target (hashing it), then flushed.
//! 4. It is read back from the medium (caches dropped) and its SHA-256 compared;
//!    an expected SHA-256, when given, is compared too.
//! 5. The pre-seed file is written into the FAT boot partition and read back.
//! 6. The head is written (its last partition, the box's data partition, grown
//!    to the end of the card), flushed and read back.

use std::{os::unix::fs::FileExt, time::Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::{
    bootpart::{self, BootPartition},
    image::{read_up_to, Image},
    target::Target,
    HEAD_LEN,
};

const CHUNK: usize = 1 << 20;

/// What was done.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Decompressed image size.
    pub image_bytes: u64,
    /// SHA-256 of the decompressed image, as read back from the target.
    pub sha256: String,
    pub boot_partition: Option<(u64, u64)>,
    pub preseed_written: bool,
    /// The data partition's new size, when it was grown to fill the target.
    pub data_partition_grown_to: Option<u64>,
    pub write_secs: f64,
    pub verify_secs: f64,
}

/// A file to put on the boot partition.
pub struct BootFile<'a> {
    pub name: &'a str,
    pub contents: &'a [u8],
    /// Files removed from the boot partition first.
    pub remove: &'a [&'a str],
}

fn bar(len: Option<u64>, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = match len {
        Some(l) => ProgressBar::new(l).with_style(
            ProgressStyle::with_template(
                "{msg:9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg:9} {spinner} {bytes} {bytes_per_sec}")
                .expect("valid template"),
        ),
    };
    pb.set_message(what.to_owned());
    pb
}

/// Flushes the target to the medium and drops its cached pages, so that what is
/// read next comes from the card.
fn sync_and_forget(t: &Target) -> anyhow::Result<()> {
    t.file
        .sync_all()
        .with_context(|| format!("flushing {} failed (was it removed?)", t.path.display()))?;
    #[cfg(target_os = "linux")]
    {
        nix::ioctl_none!(blkflsbuf, 0x12, 97);
        use std::os::fd::AsRawFd;
        if t.is_block_device() {
            // SAFETY: BLKFLSBUF takes no argument; the fd is a block device we hold open.
            unsafe { blkflsbuf(t.file.as_raw_fd()) }
                .with_context(|| format!("dropping the cache of {}", t.path.display()))?;
        }
        let _ = nix::fcntl::posix_fadvise(
            &t.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    Ok(())
}

fn write_at(t: &Target, buf: &[u8], offset: u64) -> anyhow::Result<()> {
    t.file.write_all_at(buf, offset).with_context(|| {
        format!(
            "writing {} failed at byte {offset} (was the card removed, or is it full?); it is left without a partition table and will not boot",
            t.path.display()
        )
    })
}

fn too_small(t: &Target, need: u64, cap: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is too small: the image needs {} bytes{} but it holds {cap}",
        t.path.display(),
        need,
        if t.capacity.is_some() { "" } else { " or more" }
    )
}

/// Writes `image` to `target`, verifies it, puts `boot_file` (the pre-seed) on
/// its boot partition and finally writes the partition table.
pub fn flash(
    mut image: Image,
    target: &mut Target,
    boot_file: Option<BootFile<'_>>,
    expected_sha256: Option<&str>,
    grow: bool,
    progress: bool,
) -> anyhow::Result<Report> {
    // 1. The head, checked before anything is written.
    let mut head = vec![0u8; HEAD_LEN];
    let n = read_up_to(&mut image.reader, &mut head)
        .context("reading the image failed (is it damaged?)")?;
    if n < 512 {
        bail!("the image is only {n} bytes: it is truncated or not a disk image");
    }
    head.truncate(n);
    let boot = match bootpart::find(&head) {
        Ok(b) => Some(b),
        Err(e) if boot_file.is_some() => {
            return Err(
                e.context("cannot pre-seed this image (use --no-preseed to write it as it is)")
            )
        }
        Err(_) => None,
    };
    if let Some(b) = boot {
        if b.start < HEAD_LEN as u64 {
            bail!("the image's boot partition starts inside its first {HEAD_LEN} bytes");
        }
    }
    if let (Some(size), Some(cap)) = (image.size, target.capacity) {
        if size > cap {
            return Err(too_small(target, size, cap));
        }
    }
    if let (Some(b), Some(size)) = (boot, image.size) {
        if b.start + b.len > size {
            bail!("the image's boot partition reaches past its end: the image is truncated");
        }
    }

    // 2. No partition table until the end.
    write_at(target, &vec![0u8; HEAD_LEN], 0)?;
    sync_and_forget(target)?;

    // 3. Stream the rest.
    let started = Instant::now();
    let mut hasher = Sha256::new();
    hasher.update(&head);
    let mut offset = head.len() as u64;
    let pb = bar(image.size, "writing", progress);
    pb.set_position(offset);
    let mut buf = vec![0u8; CHUNK];
    if head.len() == HEAD_LEN {
        loop {
            let n = read_up_to(&mut image.reader, &mut buf)
                .context("reading the image failed (it is damaged or truncated); the target is left without a partition table and will not boot")?;
            if n == 0 {
                break;
            }
            if let Some(cap) = target.capacity {
                if offset + n as u64 > cap {
                    return Err(too_small(target, offset + n as u64, cap).context(
                        "the target is left without a partition table and will not boot",
                    ));
                }
            }
            hasher.update(&buf[..n]);
            write_at(target, &buf[..n], offset)?;
            offset += n as u64;
            pb.set_position(offset);
        }
    }
    let total = offset;
    if let Some(size) = image.size {
        if size != total {
            bail!("the image was {total} bytes, {size} were expected: it is truncated");
        }
    }
    if let Some(b) = boot {
        if b.start + b.len > total {
            bail!("the image's boot partition reaches past its end: the image is truncated");
        }
    }
    let image_sha = hex::encode(hasher.finalize());
    if target.capacity.is_none() {
        // A new file: give it the image's exact length (for a padded image).
        target.file.set_len(total)?;
    }
    sync_and_forget(target)?;
    pb.finish_and_clear();
    let write_secs = started.elapsed().as_secs_f64();
    if let Some(exp) = expected_sha256 {
        if exp != image_sha {
            bail!(
                "the image's SHA-256 is {image_sha}, {exp} was expected: the image is damaged or not the one meant; the target is left without a partition table and will not boot"
            );
        }
    }

    // 4. Read back.
    let started = Instant::now();
    let pb = bar(Some(total), "verifying", progress);
    let mut hasher = Sha256::new();
    hasher.update(&head);
    let mut pos = head.len() as u64;
    while pos < total {
        let len = CHUNK.min((total - pos) as usize);
        target
            .file
            .read_exact_at(&mut buf[..len], pos)
            .with_context(|| {
                format!(
                    "reading {} back failed at byte {pos}",
                    target.path.display()
                )
            })?;
        hasher.update(&buf[..len]);
        pos += len as u64;
        pb.set_position(pos);
    }
    pb.finish_and_clear();
    let read_sha = hex::encode(hasher.finalize());
    if read_sha != image_sha {
        bail!(
            "verification failed: {} reads back as SHA-256 {read_sha}, the image is {image_sha} (a bad or fake card?); it is left without a partition table",
            target.path.display()
        );
    }
    let verify_secs = started.elapsed().as_secs_f64();

    // 5. The pre-seed.
    let preseed_written = match (&boot_file, boot) {
        (Some(f), Some(b)) => {
            bootpart::write_file(&target.file, b, f.name, f.contents, f.remove)?;
            sync_and_forget(target)?;
            true
        }
        _ => false,
    };

    // 6. The partition table, last (with the data partition grown to the card).
    let data_partition_grown_to = match target.capacity {
        Some(cap) if grow => bootpart::grow_data_partition(&mut head, cap)?,
        _ => None,
    };
    write_at(target, &head, 0)?;
    sync_and_forget(target)?;
    let mut back = vec![0u8; head.len()];
    target.file.read_exact_at(&mut back, 0)?;
    if back != head {
        bail!("the partition table read back differs from the one written (a bad card?)");
    }
    Ok(Report {
        image_bytes: total,
        sha256: image_sha,
        boot_partition: boot.map(|b| (b.start, b.len)),
        preseed_written,
        data_partition_grown_to,
        write_secs,
        verify_secs,
    })
}

/// Writes only a boot file (the pre-seed) onto an already written card or image.
pub fn put_boot_file(target: &Target, f: BootFile<'_>) -> anyhow::Result<BootPartition> {
    let mut head = vec![0u8; 512];
    target
        .file
        .read_exact_at(&mut head, 0)
        .with_context(|| format!("reading the partition table of {}", target.path.display()))?;
    let b = bootpart::find(&head)?;
    bootpart::write_file(&target.file, b, f.name, f.contents, f.remove)?;
    sync_and_forget(target)?;
    Ok(b)
}

/// Reads a boot file from a written card or image.
pub fn get_boot_file(target: &Target, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut head = vec![0u8; 512];
    target.file.read_exact_at(&mut head, 0)?;
    let b = bootpart::find(&head)?;
    bootpart::read_file(&target.file, b, name)
}
