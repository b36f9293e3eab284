//! First boot: apply the pre-seed file from the boot partition, once.
//!
//! `secta firstboot --boot /boot --config /data/secta.toml` is run by the
//! box's init before `secta run`. With a valid pre-seed it writes the config
//! (box name, server name, hotspot), creates the data directory and the box's
//! keys (by opening the homeserver), the first admin and the invite token, the
//! VPN exit `.conf` and the time zone; then it overwrites and deletes the
//! pre-seed file (it holds secrets) and leaves a report without secrets on the
//! boot partition. Every step can be repeated, so a power cut halfway is
//! finished on the next boot.
//!
//! Without a pre-seed, or with a broken one, the box still starts: with the
//! default config, a `setup-needed` note in the data directory that `secta run`
//! shows on the welcome page, and the reasons in the boot partition's report
//! (a fixed pre-seed file is applied on the next boot).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context;
use secta_preseed::{Preseed, FILE_NAME, RESULT_FILE_NAME};
use secta_runtime::ConfigFile;

/// Marker in the data directory: first boot is done (JSON, no secrets).
pub const DONE_FILE: &str = "firstboot.done";
/// Note in the data directory: the box runs unconfigured, and why.
pub const SETUP_NEEDED_FILE: &str = "setup-needed";

/// What first boot did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The pre-seed was applied; the admin's user id.
    Applied { admin: String },
    /// The box was set up before (a pre-seed found now was removed unapplied).
    AlreadyDone { removed_preseed: bool },
    /// No usable pre-seed: the box starts in first-boot setup.
    NeedsSetup { reasons: Vec<String> },
}

/// Runs first boot. `template` is the config the image ships (with the board's
/// defaults); `default_text` is used when there is none.
pub fn run(
    boot: &Path,
    config: &Path,
    template: Option<&Path>,
    default_text: &str,
) -> anyhow::Result<Outcome> {
    let base = if config.exists() {
        fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?
    } else {
        match template.filter(|t| t.exists()) {
            Some(t) => fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?,
            None => default_text.to_owned(),
        }
    };
    // Only [box] is needed now: a template may be valid only once the pre-seed
    // is in (e.g. WPA3 without the passphrase yet).
    let base_file = ConfigFile::parse(&base)?;
    let data = base_file
        .section::<secta_runtime::BoxConfig>("box")?
        .data_dir;
    // A wipe cut short by power loss is finished first: what it left is not
    // a set-up box (and the marker says so even when `DONE_FILE` survived).
    if let Ok(vault_cfg) = base_file.section::<secta_vault::VaultConfig>("vault") {
        secta_vault::wipe::resume_if_needed(&vault_cfg, &data)?;
    }
    let preseed_path = boot.join(FILE_NAME);
    let done = data.join(DONE_FILE);

    if done.exists() {
        let removed_preseed = preseed_path.exists();
        if removed_preseed {
            scrub(&preseed_path)?;
            write_report(
                boot,
                "Коробка уже настроена: новый файл настроек не применён и удалён.\n\
                 The box was set up before: the new settings file was not applied and was removed.\n\
                 (Чтобы настроить заново, сотрите коробку. / To set it up anew, wipe the box.)\n",
            );
        }
        return Ok(Outcome::AlreadyDone { removed_preseed });
    }

    let preseed = match fs::read(&preseed_path) {
        Ok(bytes) => match Preseed::parse(&bytes) {
            Ok(p) => {
                let mut problems = p.problems();
                if let Some(why) = p
                    .vpn_exit_conf
                    .as_deref()
                    .and_then(secta_wireguard::store::exit_conf_problem)
                {
                    problems.push(format!("VPN exit .conf: {why}"));
                }
                if problems.is_empty() {
                    Ok(p)
                } else {
                    Err(problems)
                }
            }
            Err(e) => Err(vec![e.to_string()]),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(vec![format!("no {FILE_NAME} on the boot partition")])
        }
        Err(e) => Err(vec![format!("cannot read {FILE_NAME}: {e}")]),
    };
    let preseed = match preseed {
        Ok(p) => p,
        Err(reasons) => {
            secta_runtime::ensure_data_dir(&data)?;
            if !config.exists() {
                // The box must start: a template that is not valid on its own
                // gives way to the built-in defaults (with the template's data dir).
                let text = match crate::load_setup(&ConfigFile::parse(&base)?) {
                    Ok(_) => base.clone(),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "the image's config needs first-boot settings; using the defaults");
                        apply_data_dir(default_text, &data)?
                    }
                };
                write_config(config, &text)?;
            }
            secta_runtime::write_secret_file(
                &data.join(SETUP_NEEDED_FILE),
                reasons.join("\n").as_bytes(),
            )?;
            write_report(
                boot,
                &format!(
                    "Настройки первой загрузки не применены. / The first-boot settings were not applied.\n\
                     Причины / Why:\n  - {}\n\n\
                     Коробка запущена с настройками по умолчанию и ждёт настройки.\n\
                     The box runs with default settings and waits to be set up.\n\
                     Исправьте {FILE_NAME} на этой карте или запишите его заново\n\
                     Fix {FILE_NAME} on this card or write it anew:\n  secta-flash preseed /dev/sdX --server-name … --ssid … --country …\n",
                    reasons.join("\n  - ")
                ),
            );
            return Ok(Outcome::NeedsSetup { reasons });
        }
    };

    // The config, checked by the same loader `secta run` uses before it is written.
    let text = apply_to_config(&base, &preseed)?;
    let setup = crate::load_setup(&ConfigFile::parse(&text)?)
        .context("the pre-seed makes an invalid config")?;
    write_config(config, &text)?;
    secta_runtime::ensure_data_dir(&data)?;
    if let Some(tz) = &preseed.timezone {
        fs::write(data.join("timezone"), format!("{tz}\n"))?;
    }
    // The data key first (everything is encrypted from its first write), then
    // the VPN exit and the homeserver's keys (signing key, registration
    // secret) as it opens.
    let vault = secta_vault::Vault::open(&setup.vault, &data)?;
    if let Some(conf) = &preseed.vpn_exit_conf {
        // As `secta admin vpn exit set` does; the gateway is switched on below.
        secta_wireguard::Store::open(&data, vault.as_deref())?.set_exit(conf)?;
    }
    let hs = secta_homeserver::Hs::open_with_vault(setup.hs.clone(), &data, vault)?;
    let admin = match hs.admin_create_user(&preseed.admin.username, &preseed.admin.password, true) {
        Ok(id) => id,
        Err(e) if e.errcode == "M_USER_IN_USE" => {
            // A first boot cut short after this step: same account, same password.
            hs.admin_reset_password(&preseed.admin.username, &preseed.admin.password)
                .map_err(crate::mx)?;
            format!("@{}:{}", preseed.admin.username, setup.hs.server_name)
        }
        Err(e) => return Err(crate::mx(e)),
    };
    if let Some(inv) = &preseed.invite {
        hs.admin_add_invite(
            &inv.token,
            (inv.uses > 0).then_some(i64::from(inv.uses)),
            None,
        )
        .map_err(crate::mx)?;
    }
    drop(hs);

    let record = serde_json::json!({
        "applied_at_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        "admin": admin,
        "server_name": preseed.server_name,
        "box_name": preseed.box_name,
    });
    secta_runtime::write_secret_file(&done, record.to_string().as_bytes())?;
    let _ = fs::remove_file(data.join(SETUP_NEEDED_FILE));
    scrub(&preseed_path)?;
    write_report(
        boot,
        &format!(
            "Первая загрузка выполнена. / First boot done.\n\
             Коробка / Box: {}\nСервер / Server: {}\nАдминистратор / Admin: {admin}\nWi-Fi: {}\n\
             Пароли и ключи удалены с этой карты. / Passwords and keys were removed from this card.\n",
            preseed.box_name, preseed.server_name, preseed.wifi.ssid
        ),
    );
    Ok(Outcome::Applied { admin })
}

/// Why the box runs unconfigured, when first boot found no usable pre-seed.
pub fn setup_needed(data: &Path) -> Option<String> {
    fs::read_to_string(data.join(SETUP_NEEDED_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The box's config text with the pre-seed's settings put in (comments kept).
pub fn apply_to_config(base: &str, p: &Preseed) -> anyhow::Result<String> {
    use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};
    let mut doc: DocumentMut = base.parse().context("the config is not valid TOML")?;
    let root = doc.as_table_mut();
    table(root, "box")?["name"] = value(p.box_name.trim());
    let hs = table(root, "homeserver")?;
    hs["server_name"] = value(&p.server_name);
    let specs = p.peer_specs();
    if !specs.is_empty() {
        let mut peers = ArrayOfTables::new();
        for s in specs {
            let url = s.url.unwrap_or_else(|| {
                if s.server_name.rsplit_once(':').is_some_and(|(_, port)| {
                    !s.server_name.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit())
                }) {
                    format!("https://{}", s.server_name)
                } else {
                    format!("https://{}:8448", s.server_name)
                }
            });
            let mut t = Table::new();
            t["server_name"] = value(&s.server_name);
            t["url"] = value(url);
            peers.push(t);
        }
        table(hs, "federation")?["peers"] = Item::ArrayOfTables(peers);
    }
    if p.vpn_exit_conf.is_some() {
        // The hotspot's traffic leaves through the exit: the gateway must run.
        table(root, "wireguard")?["enabled"] = value(true);
    }
    let hotspot = table(root, "hotspot")?;
    hotspot["ssid"] = value(&p.wifi.ssid);
    hotspot["country"] = value(&p.country);
    match &p.wifi.passphrase {
        Some(pw) => hotspot["passphrase"] = value(pw),
        None => {
            hotspot.remove("passphrase");
            hotspot.remove("wpa3");
        }
    }
    Ok(doc.to_string())
}

/// The standard (not inline) table `key` of `t`, made if missing.
fn table<'a>(t: &'a mut toml_edit::Table, key: &str) -> anyhow::Result<&'a mut toml_edit::Table> {
    t.entry(key)
        .or_insert_with(|| {
            let mut n = toml_edit::Table::new();
            n.set_implicit(true);
            toml_edit::Item::Table(n)
        })
        .as_table_mut()
        .with_context(|| format!("[{key}] in the config is not a table"))
}

fn apply_data_dir(text: &str, data: &Path) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("the config is not valid TOML")?;
    table(doc.as_table_mut(), "box")?["data_dir"] =
        toml_edit::value(data.to_string_lossy().as_ref());
    Ok(doc.to_string())
}

fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // It holds the Wi-Fi passphrase.
    secta_runtime::write_secret_file(path, text.as_bytes())
}

/// Overwrites a secret file with zeros, flushes, and deletes it. On flash
/// media an overwrite is not a guarantee (wear levelling may keep old blocks);
/// it removes the secret from the file system.
fn scrub(path: &Path) -> anyhow::Result<()> {
    let len = fs::metadata(path)?.len() as usize;
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} to scrub it", path.display()))?;
        f.write_all(&vec![0u8; len])?;
        f.sync_all()?;
    }
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The report on the boot partition is a courtesy: a read-only boot partition
/// must not stop the box.
fn write_report(boot: &Path, text: &str) {
    let path: PathBuf = boot.join(RESULT_FILE_NAME);
    if let Err(e) = fs::write(&path, text) {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the first-boot report");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preseed() -> Preseed {
        Preseed {
            version: 1,
            box_name: "Коммуна".into(),
            server_name: "kommuna.example".into(),
            country: "KZ".into(),
            timezone: Some("Asia/Almaty".into()),
            wifi: secta_preseed::Wifi {
                ssid: "Kommuna".into(),
                passphrase: Some("tulip-quarry-anvil-73".into()),
            },
            admin: secta_preseed::Admin {
                username: "boss".into(),
                password: "violet-harbor-sextant-4".into(),
            },
            invite: Some(secta_preseed::Invite {
                token: "welcome-to-kommuna".into(),
                uses: 5,
            }),
            vpn_exit_conf: Some("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 10.9.0.2/32\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n".into()),
            peers: vec!["a.example".into(), "10.8.0.2:8009=http://10.8.0.2:8009".into()],
        }
    }

    struct Box_ {
        _t: tempfile::TempDir,
        boot: PathBuf,
        data: PathBuf,
        config: PathBuf,
        template: PathBuf,
    }

    fn layout() -> Box_ {
        let t = tempfile::tempdir().unwrap();
        let boot = t.path().join("boot");
        let data = t.path().join("data");
        fs::create_dir_all(&boot).unwrap();
        let template = t.path().join("template.toml");
        fs::write(
            &template,
            format!(
                "# board defaults\n[box]\ndata_dir = {:?}\n\n[hotspot]\nenabled = false\nwpa3 = true\n",
                data.join("secta")
            ),
        )
        .unwrap();
        Box_ {
            config: data.join("secta.toml"),
            data: data.join("secta"),
            boot,
            template,
            _t: t,
        }
    }

    fn go(b: &Box_) -> Outcome {
        run(
            &b.boot,
            &b.config,
            Some(&b.template),
            &crate::default_config_text(),
        )
        .unwrap()
    }

    #[test]
    fn applies_once_and_removes_the_secrets() {
        let b = layout();
        let p = preseed();
        fs::write(b.boot.join(FILE_NAME), p.to_toml()).unwrap();
        assert_eq!(
            go(&b),
            Outcome::Applied {
                admin: "@boss:kommuna.example".into()
            }
        );
        assert!(!b.boot.join(FILE_NAME).exists(), "pre-seed removed");
        let report = fs::read_to_string(b.boot.join(RESULT_FILE_NAME)).unwrap();
        assert!(report.contains("@boss:kommuna.example"));
        for secret in [
            "tulip-quarry",
            "violet-harbor",
            "welcome-to-kommuna",
            "yAnz5",
        ] {
            assert!(!report.contains(secret));
        }
        let cfg = fs::read_to_string(&b.config).unwrap();
        assert!(cfg.contains("# board defaults"), "comments kept: {cfg}");
        let setup = crate::load_setup(&ConfigFile::parse(&cfg).unwrap()).unwrap();
        assert_eq!(setup.hs.server_name, "kommuna.example");
        assert_eq!(setup.boxcfg.name, "Коммуна");
        assert_eq!(setup.hotspot.ssid, "Kommuna");
        assert_eq!(setup.hotspot.country, "KZ");
        assert_eq!(
            setup.hotspot.passphrase.as_deref(),
            Some("tulip-quarry-anvil-73")
        );
        assert!(!setup.hotspot.enabled, "board default kept");
        let peers = &setup.hs.federation.peers;
        assert_eq!(peers[0].url, "https://a.example:8448");
        assert_eq!(peers[1].url, "http://10.8.0.2:8009");
        assert_eq!(
            fs::read_to_string(b.data.join("timezone")).unwrap(),
            "Asia/Almaty\n"
        );
        assert!(
            setup.wireguard.enabled,
            "a pre-seeded exit switches the gateway on"
        );
        let vault = secta_vault::Vault::open(&setup.vault, &b.data).unwrap();
        let exit = secta_wireguard::Store::open(&b.data, vault.as_deref())
            .unwrap()
            .exit()
            .unwrap();
        assert_eq!(
            exit.unwrap().peers[0].endpoint.as_ref().unwrap().port,
            51820
        );
        // The exit's key is not on the card in the clear.
        let stored = fs::read(b.data.join("wireguard/exit.conf")).unwrap();
        assert!(!String::from_utf8_lossy(&stored).contains("yAnz5"));
        drop(vault);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&b.config).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Encrypted from the first write: the box's own start opens it.
        assert!(secta_vault::audit(&setup.vault, &b.data).encrypted);
        let vault = secta_vault::Vault::open(&setup.vault, &b.data).unwrap();
        let hs = secta_homeserver::Hs::open_with_vault(setup.hs.clone(), &b.data, vault).unwrap();
        let users = hs.admin_list_users().unwrap();
        assert!(users
            .iter()
            .any(|u| u.user_id == "@boss:kommuna.example" && u.admin));
        let invites = hs.admin_list_invites().unwrap();
        assert!(invites
            .iter()
            .any(|i| i.token == "welcome-to-kommuna" && i.uses_allowed == Some(5)));
        drop(hs);
        // Again: nothing to do; a new pre-seed is removed, not applied.
        assert_eq!(
            go(&b),
            Outcome::AlreadyDone {
                removed_preseed: false
            }
        );
        let mut other = preseed();
        other.server_name = "other.example".into();
        fs::write(b.boot.join(FILE_NAME), other.to_toml()).unwrap();
        assert_eq!(
            go(&b),
            Outcome::AlreadyDone {
                removed_preseed: true
            }
        );
        assert!(!b.boot.join(FILE_NAME).exists());
        assert!(fs::read_to_string(&b.config)
            .unwrap()
            .contains("kommuna.example"));
    }

    #[test]
    fn missing_or_broken_preseed_starts_setup_and_a_fix_applies_later() {
        let b = layout();
        let Outcome::NeedsSetup { reasons } = go(&b) else {
            panic!("no pre-seed must mean setup")
        };
        assert!(reasons[0].contains("no secta-preseed.toml"));
        // The template (WPA3 without a passphrase) cannot run on its own: the box
        // gets the defaults, with the template's data dir, and starts.
        let cfg = fs::read_to_string(&b.config).unwrap();
        let setup = crate::load_setup(&ConfigFile::parse(&cfg).unwrap()).unwrap();
        assert_eq!(setup.boxcfg.data_dir, b.data);
        assert!(setup_needed(&b.data)
            .unwrap()
            .contains("no secta-preseed.toml"));
        // Broken TOML, then invalid values: both named, nothing applied.
        fs::write(b.boot.join(FILE_NAME), "version = 1\n[wifi\n").unwrap();
        let Outcome::NeedsSetup { reasons } = go(&b) else {
            panic!()
        };
        assert!(reasons[0].contains("not valid"), "{reasons:?}");
        let mut bad = preseed();
        bad.wifi.ssid = "x".repeat(40);
        bad.country = "ZZ".into();
        fs::write(b.boot.join(FILE_NAME), bad.to_toml()).unwrap();
        let Outcome::NeedsSetup { reasons } = go(&b) else {
            panic!()
        };
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        // A VPN exit the gateway would refuse is named too (without its key).
        let mut bad_exit = preseed();
        bad_exit.vpn_exit_conf =
            Some("[Interface]\nPrivateKey yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n".into());
        fs::write(b.boot.join(FILE_NAME), bad_exit.to_toml()).unwrap();
        let Outcome::NeedsSetup { reasons } = go(&b) else {
            panic!()
        };
        assert!(
            reasons[0].starts_with("VPN exit .conf: line 2"),
            "{reasons:?}"
        );
        assert!(!reasons[0].contains("yAnz5"));
        fs::write(b.boot.join(FILE_NAME), bad.to_toml()).unwrap();
        go(&b);
        let report = fs::read_to_string(b.boot.join(RESULT_FILE_NAME)).unwrap();
        assert!(
            report.contains("SSID") && report.contains("country"),
            "{report}"
        );
        assert!(b.boot.join(FILE_NAME).exists(), "left for the owner to fix");
        // Fixed on the card: the next boot applies it.
        fs::write(b.boot.join(FILE_NAME), preseed().to_toml()).unwrap();
        assert!(matches!(go(&b), Outcome::Applied { .. }));
        assert_eq!(setup_needed(&b.data), None);
    }

    #[test]
    fn a_cut_first_boot_finishes_with_the_same_admin() {
        let b = layout();
        fs::write(b.boot.join(FILE_NAME), preseed().to_toml()).unwrap();
        assert!(matches!(go(&b), Outcome::Applied { .. }));
        // As if power was cut before the marker was written.
        fs::remove_file(b.data.join(DONE_FILE)).unwrap();
        fs::write(b.boot.join(FILE_NAME), preseed().to_toml()).unwrap();
        assert!(matches!(go(&b), Outcome::Applied { .. }));
    }

    #[test]
    fn an_interrupted_wipe_is_finished_and_the_box_set_up_anew() {
        let b = layout();
        fs::write(b.boot.join(FILE_NAME), preseed().to_toml()).unwrap();
        assert!(matches!(go(&b), Outcome::Applied { .. }));
        // Power lost in the middle of a wipe: marker written, the done file
        // (and the rest) not yet deleted.
        fs::write(b.data.join(secta_vault::wipe::WIPE_MARKER), b"").unwrap();
        assert!(b.data.join(DONE_FILE).exists());
        let mut p = preseed();
        p.admin.username = "second".into();
        fs::write(b.boot.join(FILE_NAME), p.to_toml()).unwrap();
        assert_eq!(
            go(&b),
            Outcome::Applied {
                admin: "@second:kommuna.example".into()
            }
        );
        assert!(!b.data.join(secta_vault::wipe::WIPE_MARKER).exists());
        let cfg = fs::read_to_string(&b.config).unwrap();
        let setup = crate::load_setup(&ConfigFile::parse(&cfg).unwrap()).unwrap();
        let vault = secta_vault::Vault::open(&setup.vault, &b.data).unwrap();
        let hs = secta_homeserver::Hs::open_with_vault(setup.hs.clone(), &b.data, vault).unwrap();
        let users: Vec<String> = hs
            .admin_list_users()
            .unwrap()
            .into_iter()
            .map(|u| u.user_id)
            .collect();
        assert_eq!(
            users,
            ["@second:kommuna.example"],
            "the old admin went with the wipe"
        );
    }

    #[test]
    fn the_configs_the_images_ship_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for f in [
            "overlays/rootfs/etc/secta/secta.toml",
            "board/qemu-x86_64/overlay/etc/secta/secta.toml",
            "board/openwrt/secta/files/secta.toml",
        ] {
            let text = fs::read_to_string(root.join(f)).unwrap();
            let setup = crate::load_setup(&ConfigFile::parse(&text).unwrap())
                .unwrap_or_else(|e| panic!("{f}: {e:#}"));
            // And with a pre-seed applied.
            let applied = apply_to_config(&text, &preseed()).unwrap();
            crate::load_setup(&ConfigFile::parse(&applied).unwrap())
                .unwrap_or_else(|e| panic!("{f} with a pre-seed: {e:#}"));
            assert!(setup.boxcfg.data_dir.is_absolute(), "{f}");
        }
    }
}
