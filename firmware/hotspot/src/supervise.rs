//! Runs hostapd and dnsmasq with the generated files and restarts them when they die.

use std::{path::Path, time::Duration};

use crate::{config::HotspotConfig, gen};

/// Writes the configuration files into `dir` and returns their paths.
pub fn write_configs(
    c: &HotspotConfig,
    dir: &Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let hostapd = dir.join("hostapd.conf");
    let dnsmasq = dir.join("dnsmasq.conf");
    // The hostapd file holds the Wi-Fi password: owner-only.
    secta_runtime::write_secret_file(&hostapd, gen::hostapd_conf(c).as_bytes())?;
    std::fs::write(
        &dnsmasq,
        gen::dnsmasq_conf(c, c.uplink.is_some(), &[], &dir.join("dnsmasq.leases")),
    )?;
    Ok((hostapd, dnsmasq))
}

/// Keeps `program args…` running until shutdown: restarts it with a growing pause
/// (1 s doubling to 30 s) whenever it exits, and stops it on shutdown.
pub async fn supervise(
    name: &'static str,
    program: String,
    args: Vec<String>,
    shutdown: secta_runtime::Shutdown,
) {
    let mut pause = Duration::from_secs(1);
    loop {
        let child = tokio::process::Command::new(&program)
            .args(&args)
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = name, error = %e, "cannot start");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => continue,
                    _ = shutdown.clone().wait() => return,
                }
            }
        };
        tracing::info!(program = name, "started");
        let started = std::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                tracing::warn!(program = name, status = ?status.ok(), "exited; restarting");
                if started.elapsed() > Duration::from_secs(60) {
                    pause = Duration::from_secs(1);
                }
            }
            _ = shutdown.clone().wait() => {
                let _ = child.kill().await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.clone().wait() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
