//! Finding disks a card could be written to, from `/sys/block`, and telling
//! which must not be touched: the system disk, mounted disks, disks in use by
//! device-mapper or RAID, read-only ones.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// One whole disk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Disk {
    /// Kernel name (`sdb`, `mmcblk0`).
    pub name: String,
    /// Device node (`/dev/sdb`).
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The kernel says removable, or it hangs off USB, or it is an SD/MMC slot.
    pub removable: bool,
    pub read_only: bool,
    /// `usb`, `mmc`, `nvme`, `ata/scsi`, `virtio`, …
    pub transport: String,
    pub model: String,
    /// Mount points of the disk or its partitions (also `[swap]`).
    pub mounted: Vec<String>,
    /// Holds `/`, `/boot`, `/usr` or swap.
    pub system: bool,
    /// A partition or the disk is held by device-mapper/RAID (LVM, LUKS, md).
    pub held: bool,
}

impl Disk {
    /// Why writing to this disk is refused without `--force` (None: fine).
    pub fn refusal(&self) -> Option<String> {
        if self.system {
            return Some(format!(
                "{} holds this computer's system ({})",
                self.path.display(),
                self.mounted.join(", ")
            ));
        }
        if !self.mounted.is_empty() {
            return Some(format!(
                "{} is mounted at {} (unmount it first)",
                self.path.display(),
                self.mounted.join(", ")
            ));
        }
        if self.held {
            return Some(format!(
                "{} is in use by device-mapper or RAID (LVM, LUKS, md)",
                self.path.display()
            ));
        }
        if !self.removable {
            return Some(format!(
                "{} is not a removable disk ({} {})",
                self.path.display(),
                self.transport,
                self.model
            ));
        }
        None
    }
}

/// Device names that are never cards.
fn is_virtual(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

/// Lists whole disks under `sys_block` (normally `/sys/block`), with mounts from
/// `mountinfo` (`/proc/self/mountinfo` text) and swap from `swaps` (`/proc/swaps`).
pub fn list(sys_block: &Path, mountinfo: &str, swaps: &str) -> Vec<Disk> {
    let mounts: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // id parent MAJ:MIN root mountpoint ...
            Some((f.get(2)?.to_string(), unescape(f.get(4)?)))
        })
        .collect();
    let swap_devs: Vec<String> = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|d| d.strip_prefix("/dev/").map(str::to_owned))
        .collect();
    let mut names: Vec<String> = fs::read_dir(sys_block)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !is_virtual(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut disks = Vec::new();
    for name in names {
        let dir = sys_block.join(&name);
        let sectors: u64 = read_trim(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if sectors == 0 {
            continue; // empty card reader slot
        }
        // Nodes of the disk and of its partitions: (kernel name, MAJ:MIN, sysfs dir).
        let mut nodes = vec![(name.clone(), read_trim(&dir.join("dev")), dir.clone())];
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let pname = e.file_name().to_string_lossy().into_owned();
                if pname.starts_with(&name) && e.path().join("partition").exists() {
                    nodes.push((pname, read_trim(&e.path().join("dev")), e.path()));
                }
            }
        }
        let mut mounted = Vec::new();
        let mut held = false;
        for (node, dev, path) in &nodes {
            if let Some(dev) = dev {
                mounted.extend(
                    mounts
                        .iter()
                        .filter(|(d, _)| d == dev)
                        .map(|(_, m)| m.clone()),
                );
            }
            if swap_devs.contains(node) {
                mounted.push("[swap]".into());
            }
            held |= fs::read_dir(path.join("holders"))
                .map(|mut rd| rd.next().is_some())
                .unwrap_or(false);
        }
        mounted.sort();
        mounted.dedup();
        let system = mounted.iter().any(|m| {
            matches!(
                m.as_str(),
                "/" | "/boot" | "/boot/efi" | "/usr" | "/var" | "/home" | "[swap]"
            )
        });
        let real = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        let real = real.to_string_lossy();
        let transport = if real.contains("/usb") {
            "usb"
        } else if name.starts_with("mmcblk") {
            "mmc"
        } else if name.starts_with("nvme") {
            "nvme"
        } else if name.starts_with("vd") {
            "virtio"
        } else {
            "ata/scsi"
        };
        let removable = read_trim(&dir.join("removable")).as_deref() == Some("1")
            || matches!(transport, "usb" | "mmc");
        let model = [
            read_trim(&dir.join("device/vendor")),
            read_trim(&dir.join("device/model")),
            read_trim(&dir.join("device/name")),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
        disks.push(Disk {
            path: PathBuf::from("/dev").join(&name),
            name,
            size_bytes: sectors * 512,
            removable,
            read_only: read_trim(&dir.join("ro")).as_deref() == Some("1"),
            transport: transport.into(),
            model,
            mounted,
            system,
            held,
        });
    }
    disks
}

/// `\040` and friends (octal escapes) in mountinfo paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The disks of this computer.
pub fn system_disks() -> Vec<Disk> {
    list(
        Path::new("/sys/block"),
        &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        &fs::read_to_string("/proc/swaps").unwrap_or_default(),
    )
}

/// Human size: `31.9 GB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(root: &Path, name: &str, sectors: u64, removable: bool, parts: &[(&str, &str)]) {
        let d = root.join(name);
        fs::create_dir_all(d.join("holders")).unwrap();
        fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
        fs::write(d.join("removable"), if removable { "1\n" } else { "0\n" }).unwrap();
        fs::write(d.join("ro"), "0\n").unwrap();
        fs::write(d.join("dev"), format!("8:{}\n", name.len())).unwrap();
        for (p, dev) in parts {
            let pd = d.join(p);
            fs::create_dir_all(pd.join("holders")).unwrap();
            fs::write(pd.join("partition"), "1\n").unwrap();
            fs::write(pd.join("dev"), format!("{dev}\n")).unwrap();
        }
    }

    #[test]
    fn system_mounted_held_and_fixed_disks_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        disk(
            r,
            "sda",
            1_000_000,
            false,
            &[("sda1", "8:1"), ("sda2", "8:2")],
        );
        disk(r, "sdb", 62_000_000, true, &[("sdb1", "8:17")]);
        disk(r, "sdc", 62_000_000, true, &[("sdc1", "8:33")]);
        disk(r, "sdd", 62_000_000, true, &[("sdd1", "8:49")]);
        disk(r, "sde", 62_000_000, false, &[]);
        disk(r, "sdf", 0, true, &[]);
        fs::create_dir_all(r.join("loop0")).unwrap();
        fs::write(r.join("sdd/sdd1/holders/dm-0"), "").unwrap();
        let mountinfo = "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n\
                         23 22 8:33 / /media/my\\040card\\040флешка rw - vfat /dev/sdc1 rw\n";
        let swaps = "Filename Type Size Used Priority\n/dev/sda1 partition 1 0 -2\n";
        let disks = list(r, mountinfo, swaps);
        let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "sdb", "sdc", "sdd", "sde"]);
        let by = |n: &str| disks.iter().find(|d| d.name == n).unwrap();
        assert!(by("sda").system);
        assert!(by("sda").refusal().unwrap().contains("system"));
        assert_eq!(by("sdb").refusal(), None);
        assert_eq!(by("sdb").size_bytes, 62_000_000 * 512);
        assert!(by("sdc")
            .refusal()
            .unwrap()
            .contains("/media/my card флешка"));
        assert!(by("sdd").refusal().unwrap().contains("device-mapper"));
        assert!(by("sde").refusal().unwrap().contains("not a removable"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(31_914_983_424), "31.9 GB");
        assert_eq!(human(5_000_000), "5.0 MB");
        assert_eq!(human(12), "12 bytes");
    }
}
