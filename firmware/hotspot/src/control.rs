//! The running hotspot: the configuration files it wrote, the programs it
//! supervises, and changing settings while it runs (the admin pages). New
//! settings are validated first, every output is generated before anything is
//! touched, the firewall (atomic in nftables) goes first, then the files are
//! replaced atomically and only the programs whose file changed are restarted.
//! Whatever fails, the settings in force stay as they were.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{
    config::HotspotConfig,
    gen,
    portal::{NftFirewall, Portal},
    supervise::{supervise, ProcStatus, Supervised},
};

/// The files the hotspot writes (in `DATA/hotspot/`).
pub struct Files {
    pub hostapd: PathBuf,
    pub dnsmasq: PathBuf,
    pub nft: PathBuf,
    pub leases: PathBuf,
}

impl Files {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            hostapd: dir.join("hostapd.conf"),
            dnsmasq: dir.join("dnsmasq.conf"),
            nft: dir.join("rules.nft"),
            leases: dir.join("dnsmasq.leases"),
        }
    }
}

/// The three generated texts of one configuration.
#[derive(PartialEq)]
struct Rendered {
    hostapd: String,
    dnsmasq: String,
    nft: String,
}

fn render(c: &HotspotConfig, files: &Files) -> Rendered {
    Rendered {
        hostapd: gen::hostapd_conf(c),
        dnsmasq: gen::dnsmasq_conf(c, c.uplink.is_some(), &[], &files.leases),
        nft: gen::nft_ruleset(c, &[]),
    }
}

/// What [`Hotspot::apply`] changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Applied {
    pub hostapd: bool,
    pub dnsmasq: bool,
    pub firewall: bool,
}

/// The hotspot's state for the admin pages.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub interface: String,
    pub ssid: String,
    pub open: bool,
    /// Programs run on this machine (`false` in the demo: files only).
    pub real: bool,
    pub processes: Vec<ProcStatus>,
    pub clients: usize,
    pub accepted: usize,
}

pub struct Hotspot {
    portal: Arc<Portal>,
    files: Files,
    real: bool,
    hostapd: Option<Arc<Supervised>>,
    dnsmasq: Option<Arc<Supervised>>,
    applying: Mutex<()>,
}

impl Hotspot {
    /// Writes the configuration files into `dir` and, when `real`, installs the
    /// firewall rules and starts hostapd and dnsmasq (as the settings say)
    /// under supervision. In the demo (`real == false`) only the files are
    /// written, so what the box would run can be read there.
    pub fn start(
        portal: Arc<Portal>,
        dir: &Path,
        real: bool,
        shutdown: &secta_runtime::Shutdown,
    ) -> anyhow::Result<Arc<Self>> {
        let config = portal.config();
        std::fs::create_dir_all(dir)?;
        let files = Files::in_dir(dir);
        let r = render(&config, &files);
        if real {
            NftFirewall::apply(&config, &portal.accepted_ips())?;
        }
        write_all(&files, &r)?;
        portal.set_lease_file(files.leases.clone());
        let mut hotspot = Self {
            portal,
            files,
            real,
            hostapd: None,
            dnsmasq: None,
            applying: Mutex::new(()),
        };
        if real && config.run_dnsmasq {
            let h = Supervised::new("dnsmasq");
            let args = vec![
                "--no-daemon".into(),
                "--pid-file=".into(),
                format!("--conf-file={}", hotspot.files.dnsmasq.display()),
            ];
            tokio::spawn(supervise(
                h.clone(),
                "dnsmasq".into(),
                args,
                shutdown.clone(),
            ));
            hotspot.dnsmasq = Some(h);
        }
        if real && config.run_hostapd {
            let h = Supervised::new("hostapd");
            let args = vec![hotspot.files.hostapd.display().to_string()];
            tokio::spawn(supervise(
                h.clone(),
                "hostapd".into(),
                args,
                shutdown.clone(),
            ));
            hotspot.hostapd = Some(h);
        }
        Ok(Arc::new(hotspot))
    }

    pub fn portal(&self) -> &Arc<Portal> {
        &self.portal
    }

    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Applies new settings, or says why not (the old ones then stay in force).
    pub fn apply(&self, new: HotspotConfig) -> Result<Applied, Vec<String>> {
        let problems = new.problems();
        if !problems.is_empty() {
            return Err(problems);
        }
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.portal.config();
        if new.interface != old.interface || new.run_hostapd != old.run_hostapd {
            return Err(vec![
                "the Wi-Fi interface and running hostapd change only with a restart of the box"
                    .to_owned(),
            ]);
        }
        let (before, after) = (render(&old, &self.files), render(&new, &self.files));
        let applied = Applied {
            hostapd: before.hostapd != after.hostapd,
            dnsmasq: before.dnsmasq != after.dnsmasq,
            firewall: before.nft != after.nft,
        };
        if applied.firewall && self.real {
            NftFirewall::apply(&new, &self.portal.accepted_ips())
                .map_err(|e| vec![format!("the firewall refused the new rules: {e:#}")])?;
        }
        if let Err(e) = write_all(&self.files, &after) {
            if applied.firewall && self.real {
                let _ = NftFirewall::apply(&old, &self.portal.accepted_ips());
            }
            return Err(vec![format!("could not write the configuration: {e:#}")]);
        }
        self.portal.set_config(new);
        if applied.hostapd {
            if let Some(h) = &self.hostapd {
                h.restart();
            }
        }
        if applied.dnsmasq {
            if let Some(d) = &self.dnsmasq {
                d.restart();
            }
        }
        tracing::info!(
            hostapd = applied.hostapd,
            dnsmasq = applied.dnsmasq,
            firewall = applied.firewall,
            "hotspot settings applied"
        );
        Ok(applied)
    }

    pub fn status(&self) -> Status {
        let c = self.portal.config();
        let clients = self.portal.clients();
        Status {
            interface: c.interface.clone(),
            ssid: c.ssid.clone(),
            open: c.passphrase.is_none(),
            real: self.real,
            processes: self
                .hostapd
                .iter()
                .chain(self.dnsmasq.iter())
                .map(|p| p.status())
                .collect(),
            accepted: clients.iter().filter(|c| c.accepted).count(),
            clients: clients.len(),
        }
    }
}

/// Replaces the three files, each atomically (the hostapd file holds the Wi-Fi
/// password: owner-only, like the others).
fn write_all(files: &Files, r: &Rendered) -> anyhow::Result<()> {
    secta_runtime::write_secret_file(&files.hostapd, r.hostapd.as_bytes())?;
    secta_runtime::write_secret_file(&files.dnsmasq, r.dnsmasq.as_bytes())?;
    secta_runtime::write_secret_file(&files.nft, r.nft.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portal::SimFirewall;

    #[tokio::test]
    async fn apply_keeps_the_old_settings_on_error_and_rewrites_on_success() {
        let dir = std::env::temp_dir().join(format!("secta-hotspot-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let portal = Portal::new(
            HotspotConfig::default(),
            "Тест".into(),
            Arc::new(SimFirewall::default()),
        );
        let (_trigger, shutdown) = secta_runtime::Shutdown::new();
        let h = Hotspot::start(portal.clone(), &dir, false, &shutdown).unwrap();
        let hostapd = || std::fs::read_to_string(&h.files().hostapd).unwrap();
        let first = hostapd();
        assert!(first.contains(&format!(
            "ssid2={}",
            "Secta"
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )));

        // Invalid: a short password. Nothing changes.
        let bad = HotspotConfig {
            ssid: "Новая сеть".into(),
            passphrase: Some("short".into()),
            ..portal.config()
        };
        let err = h.apply(bad).unwrap_err();
        assert!(err.iter().any(|e| e.contains("8 to 63")), "{err:?}");
        assert_eq!(hostapd(), first);
        assert_eq!(portal.config().ssid, "Secta");

        // A restart-only setting is refused too.
        let moved = HotspotConfig {
            interface: "wlan1".into(),
            ..portal.config()
        };
        assert!(h.apply(moved).is_err());

        // Valid: the SSID and password reach hostapd.conf; dnsmasq and nft are untouched.
        let good = HotspotConfig {
            ssid: "Новая сеть".into(),
            passphrase: Some("correct horse".into()),
            rules: "Не шуметь.".into(),
            ..portal.config()
        };
        let applied = h.apply(good).unwrap();
        assert!(applied.hostapd && !applied.dnsmasq && !applied.firewall);
        let now = hostapd();
        assert!(now.contains("wpa_passphrase=correct horse"));
        assert_eq!(portal.config().rules, "Не шуметь.");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&h.files().hostapd)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "hostapd.conf must be owner-only");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
