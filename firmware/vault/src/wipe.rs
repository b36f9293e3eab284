//! The panic wipe: crypto-erase first, then delete.
//!
//! Order: (1) a wipe-in-progress marker is written and synced, so a wipe cut
//! by power loss is finished on the next start before anything else; (2) every
//! key file is overwritten with random bytes, synced, and unlinked, and the
//! directory synced — from here on the data is unreadable; the in-memory key
//! is zeroized; (3) the caller stops services; (4) every data file and folder
//! is deleted; (5) after services are gone, a second sweep removes anything a
//! dying service wrote, and the marker goes last. What remains is the first-boot
//! state: the config file (`secta.toml`), if it lives there, and nothing else.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Vault, VaultConfig};

/// Present while a wipe has begun and not finished.
pub const WIPE_MARKER: &str = ".wipe-in-progress";
/// Kept by the running box (an advisory lock); survives wipes.
pub const LOCK_FILE: &str = ".lock";
/// Kept across a wipe: the config of the box, not data about people.
pub const KEEP: &[&str] = &["secta.toml", WIPE_MARKER, LOCK_FILE];

/// What a wipe destroys.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Key material, destroyed first.
    pub keys: Vec<PathBuf>,
    /// Everything else in the data directory.
    pub data: Vec<PathBuf>,
}

/// Lists what a wipe of `data_dir` destroys.
pub fn plan(cfg: &VaultConfig, data_dir: &Path) -> Plan {
    let key_file = cfg.key_file(data_dir);
    let mut keys = Vec::new();
    if key_file.exists() {
        keys.push(key_file.clone());
    }
    // A key file being written (temp name of write_synced).
    let tmp = tmp_path(&key_file);
    if tmp.exists() {
        keys.push(tmp);
    }
    let mut data: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    !keys.contains(p)
                        && !p
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| KEEP.contains(&n))
                })
                .collect()
        })
        .unwrap_or_default();
    data.sort();
    Plan { keys, data }
}

/// Timings and problems of one wipe.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub key_destroyed_ms: f64,
    pub files_deleted_ms: f64,
    pub keys: usize,
    pub entries: usize,
    pub errors: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs steps 1–4 (see the module doc). `started` is when the wipe was
/// decided; `key_gone` is called right after the key is destroyed (stop the
/// services there). Never stops at an error: everything is tried.
pub fn run(
    cfg: &VaultConfig,
    data_dir: &Path,
    vault: Option<&Vault>,
    started: Instant,
    key_gone: impl FnOnce(),
) -> Report {
    let mut report = Report::default();
    if let Err(e) = write_synced(&data_dir.join(WIPE_MARKER), b"wipe in progress\n") {
        report.errors.push(format!("writing the wipe marker: {e}"));
    }
    let plan = plan(cfg, data_dir);
    for k in &plan.keys {
        if let Err(e) = destroy_file(k) {
            report
                .errors
                .push(format!("destroying {}: {e}", k.display()));
        }
    }
    if let Some(v) = vault {
        v.forget();
    }
    report.keys = plan.keys.len();
    report.key_destroyed_ms = ms(started.elapsed());
    key_gone();
    report.entries = plan.data.len();
    for p in &plan.data {
        if let Err(e) = remove(p) {
            report.errors.push(format!("deleting {}: {e}", p.display()));
        }
    }
    let _ = sync_dir(data_dir);
    report.files_deleted_ms = ms(started.elapsed());
    report
}

/// Step 5: deletes whatever appeared since (a service that was still writing)
/// and then the marker. The data directory is then in its first-boot state.
pub fn finish(cfg: &VaultConfig, data_dir: &Path) -> std::io::Result<()> {
    let plan = plan(cfg, data_dir);
    for k in &plan.keys {
        destroy_file(k)?;
    }
    for p in &plan.data {
        remove(p)?;
    }
    match std::fs::remove_file(data_dir.join(WIPE_MARKER)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(data_dir)
}

/// At start: if a wipe was interrupted, finish it before anything else.
pub fn resume_if_needed(cfg: &VaultConfig, data_dir: &Path) -> std::io::Result<Option<Report>> {
    if !data_dir.join(WIPE_MARKER).exists() {
        return Ok(None);
    }
    tracing::warn!(data = %data_dir.display(), "a wipe was interrupted: finishing it before anything else");
    let report = run(cfg, data_dir, None, Instant::now(), || {});
    finish(cfg, data_dir)?;
    Ok(Some(report))
}

/// Overwrites a file with random bytes, syncs it, unlinks it and syncs its
/// folder. (On flash the old blocks may survive in the controller; see
/// ARCHITECTURE.md.) A missing file is fine.
pub fn destroy_file(path: &Path) -> std::io::Result<()> {
    let mut f = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len() as usize;
    let mut noise = vec![0u8; len.max(1)];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut noise);
    f.write_all(&noise[..len])?;
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn remove(p: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a file owner-only and durably: temp file, fsync, rename, fsync folder.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Bytes under `p` (files and folders), for the audit.
pub fn size_of(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}
