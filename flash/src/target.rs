//! The place an image is written to: a whole removable disk, or a file standing
//! in for one.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

use crate::disks::{self, Disk};

/// An open target.
pub struct Target {
    pub path: PathBuf,
    pub file: File,
    /// The whole disk, when the target is one.
    pub disk: Option<Disk>,
    /// How many bytes fit: the disk's size, or an existing file's length (a file
    /// made with `truncate -s 8G card.img` behaves like an 8 GB card). `None`:
    /// a new or empty file that takes the image's size.
    pub capacity: Option<u64>,
}

impl Target {
    pub fn is_block_device(&self) -> bool {
        self.disk.is_some()
    }
}

/// Opens `path` for writing after the safety checks. `image` is the image being
/// written (it must not be the target); `force` skips the disk refusals.
pub fn open(path: &Path, image: Option<&Path>, force: bool) -> anyhow::Result<Target> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if let (Some(m), Some(img)) = (&meta, image) {
        if let Ok(im) = std::fs::metadata(img) {
            if im.dev() == m.dev() && im.ino() == m.ino() {
                bail!("the target {} is the image itself", path.display());
            }
        }
    }
    match meta {
        Some(m) if m.file_type().is_block_device() => open_disk(path, force),
        Some(m) if m.is_file() => {
            let file = open_rw(path, false)?;
            Ok(Target {
                path: path.to_owned(),
                file,
                disk: None,
                capacity: (m.len() > 0).then_some(m.len()),
            })
        }
        Some(_) => bail!("{} is neither a disk nor a regular file", path.display()),
        None => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Ok(Target {
                path: path.to_owned(),
                file,
                disk: None,
                capacity: None,
            })
        }
    }
}

fn open_rw(path: &Path, exclusive: bool) -> anyhow::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if exclusive {
        // On a block device O_EXCL fails while anything has it mounted.
        o.custom_flags(libc::O_EXCL);
    }
    o.open(path).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                " (it is read-only: check the card's lock switch, or run with the rights to write it)"
            }
            Some(libc::EBUSY) => " (it is in use: unmount it first)",
            _ => "",
        };
        anyhow::anyhow!("cannot open {} for writing: {e}{why}", path.display())
    })
}

fn open_disk(path: &Path, force: bool) -> anyhow::Result<Target> {
    let real = std::fs::canonicalize(path)?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let all = disks::system_disks();
    let Some(disk) = all.iter().find(|d| d.name == name).cloned() else {
        if all.iter().any(|d| name.starts_with(&d.name)) {
            bail!(
                "{} is a partition; write to the whole disk instead (see `secta-flash list`)",
                path.display()
            );
        }
        bail!(
            "{} is not a disk this computer lists in /sys/block",
            path.display()
        );
    };
    if disk.read_only {
        bail!(
            "{} is read-only (check the card's lock switch)",
            path.display()
        );
    }
    if let Some(why) = disk.refusal() {
        if !force {
            bail!("refusing to write: {why}. Use --force only if you are sure.");
        }
        eprintln!("warning: {why}; writing anyway because of --force");
    }
    let file = open_rw(path, !force)?;
    let capacity = {
        use std::io::Seek;
        let mut f = &file;
        f.seek(io::SeekFrom::End(0))?
    };
    Ok(Target {
        path: path.to_owned(),
        file,
        disk: Some(disk),
        capacity: Some(capacity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("card.img");
        let t = open(&new, None, false).unwrap();
        assert_eq!(t.capacity, None);
        drop(t);
        std::fs::write(&new, vec![0u8; 4096]).unwrap();
        assert_eq!(open(&new, None, false).unwrap().capacity, Some(4096));
        assert!(open(&new, Some(&new), false)
            .err()
            .unwrap()
            .to_string()
            .contains("image itself"));
        assert!(open(dir.path(), None, false)
            .err()
            .unwrap()
            .to_string()
            .contains("neither"));
        if nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: read-only file target check (root can write any file)");
        } else {
            let ro = dir.path().join("ro.img");
            std::fs::write(&ro, b"x").unwrap();
            std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .unwrap();
            assert!(open(&ro, None, false)
                .err()
                .unwrap()
                .to_string()
                .contains("read-only"));
        }
    }
}
