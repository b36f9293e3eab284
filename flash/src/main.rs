//! `secta-flash`: write a Secta image to an SD card and pre-seed the box.

use std::{
    io::{BufRead, IsTerminal},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use secta_flash::{disks, image, secrets, target, writer};
use secta_preseed::{Admin, Invite, Preseed, Wifi};

#[derive(Parser)]
#[command(
    name = "secta-flash",
    version,
    about = "Write a Secta box image to an SD card (or an image file), verify it, and pre-seed the box's first-boot settings"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List removable disks a card could be written to.
    List {
        /// Also list fixed disks (they are still refused without --force).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write IMAGE (raw, .xz, .gz or .zst) to TARGET (a disk such as /dev/sdb, or a file),
    /// verify it and write the pre-seed file onto its boot partition.
    Write {
        image: PathBuf,
        target: PathBuf,
        /// SHA-256 of the decompressed image (default: IMAGE.sha256 beside it, if present).
        #[arg(long)]
        sha256: Option<String>,
        /// Write even to a disk that is mounted, fixed or holds the system. Dangerous.
        #[arg(long)]
        force: bool,
        /// Do not ask before erasing a disk.
        #[arg(long, short)]
        yes: bool,
        /// Print the report as JSON (no secrets).
        #[arg(long)]
        json: bool,
        /// Keep the data partition at the image's size instead of filling the card.
        #[arg(long)]
        no_grow: bool,
        #[command(flatten)]
        preseed: PreseedArgs,
    },
    /// Write (or replace) only the pre-seed file on an already written card or image.
    Preseed {
        target: PathBuf,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        preseed: PreseedArgs,
    },
    /// Check pre-seed settings without writing anything.
    Check {
        #[command(flatten)]
        preseed: PreseedArgs,
    },
}

#[derive(Args, Default)]
struct PreseedArgs {
    /// Write the image as it is: the box starts in first-boot setup.
    #[arg(long, conflicts_with_all = ["preseed_file", "server_name"])]
    no_preseed: bool,
    /// Take every setting from a pre-seed TOML file instead of the options below.
    #[arg(long = "preseed", value_name = "FILE", conflicts_with_all = ["server_name", "ssid", "country"])]
    preseed_file: Option<PathBuf>,
    /// Human name of the box.
    #[arg(long, default_value = "Secta")]
    box_name: String,
    /// Matrix server name, e.g. box.example.org (cannot be changed later).
    #[arg(long)]
    server_name: Option<String>,
    /// Wi-Fi network name of the box's hotspot.
    #[arg(long)]
    ssid: Option<String>,
    /// Wi-Fi password (8-63 characters, hard to guess). Prefer the environment
    /// variable: command lines are visible to other users.
    #[arg(long, env = "SECTA_WIFI_PASSPHRASE", hide_env_values = true)]
    wifi_passphrase: Option<String>,
    /// An open hotspot without a Wi-Fi password.
    #[arg(long, conflicts_with = "wifi_passphrase")]
    open_wifi: bool,
    /// Two-letter country code (Wi-Fi regulations), e.g. RU, DE, KZ.
    #[arg(long)]
    country: Option<String>,
    /// Time zone, e.g. Europe/Moscow.
    #[arg(long)]
    timezone: Option<String>,
    /// The first admin's username.
    #[arg(long, default_value = "admin")]
    admin: String,
    /// One-time admin password (default: generated and printed once).
    #[arg(long, env = "SECTA_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// How many people can register with the invite code made at first boot (0: unlimited).
    #[arg(long, default_value_t = 20)]
    invite_uses: u32,
    /// The invite code (default: generated).
    #[arg(long, env = "SECTA_INVITE_TOKEN", hide_env_values = true)]
    invite_token: Option<String>,
    /// Make no invite code at first boot.
    #[arg(long, conflicts_with_all = ["invite_token"])]
    no_invite: bool,
    /// A WireGuard .conf for the upstream exit of hotspot traffic.
    #[arg(long, value_name = "FILE")]
    vpn_exit: Option<PathBuf>,
    /// A known federation peer: SERVER_NAME or SERVER_NAME=URL (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
}

/// The pre-seed, and whether the admin password was generated here.
struct Built {
    preseed: Preseed,
    password_generated: bool,
}

fn build_preseed(a: &PreseedArgs) -> anyhow::Result<Option<Built>> {
    if a.no_preseed {
        return Ok(None);
    }
    let built = if let Some(path) = &a.preseed_file {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Built {
            preseed: Preseed::parse(&bytes)?,
            password_generated: false,
        }
    } else {
        let mut missing = Vec::new();
        if a.server_name.is_none() {
            missing.push("--server-name");
        }
        if a.ssid.is_none() {
            missing.push("--ssid");
        }
        if a.country.is_none() {
            missing.push("--country");
        }
        if a.wifi_passphrase.is_none() && !a.open_wifi {
            missing.push("--wifi-passphrase (or SECTA_WIFI_PASSPHRASE, or --open-wifi)");
        }
        if !missing.is_empty() {
            bail!(
                "first-boot settings missing: {}. (--no-preseed writes the image without them; the box then starts in first-boot setup.)",
                missing.join(", ")
            );
        }
        let vpn_exit_conf = a
            .vpn_exit
            .as_ref()
            .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
            .transpose()?;
        let password_generated = a.admin_password.is_none();
        Built {
            preseed: Preseed {
                version: secta_preseed::VERSION,
                box_name: a.box_name.clone(),
                server_name: a.server_name.clone().unwrap_or_default(),
                country: a.country.clone().unwrap_or_default(),
                timezone: a.timezone.clone(),
                wifi: Wifi {
                    ssid: a.ssid.clone().unwrap_or_default(),
                    passphrase: a.wifi_passphrase.clone(),
                },
                admin: Admin {
                    username: a.admin.clone(),
                    password: a
                        .admin_password
                        .clone()
                        .unwrap_or_else(|| secrets::random_token(20)),
                },
                invite: (!a.no_invite).then(|| Invite {
                    token: a
                        .invite_token
                        .clone()
                        .unwrap_or_else(|| secrets::random_token(16)),
                    uses: a.invite_uses,
                }),
                vpn_exit_conf,
                peers: a.peers.clone(),
            },
            password_generated,
        }
    };
    let problems = secrets::problems(&built.preseed, built.password_generated);
    if !problems.is_empty() {
        bail!(
            "the first-boot settings are not valid; nothing was written:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(Some(built))
}

fn confirm(t: &target::Target, yes: bool) -> anyhow::Result<()> {
    let Some(d) = &t.disk else { return Ok(()) };
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to erase {} without --yes (no terminal to ask on)",
            t.path.display()
        );
    }
    eprint!(
        "Everything on {} ({} {}, {}) will be erased. Type yes to go on: ",
        d.path.display(),
        d.transport,
        d.model,
        disks::human(d.size_bytes)
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        bail!("nothing was written");
    }
    Ok(())
}

fn next_steps(p: Option<&Built>, target: &Path, is_disk: bool) -> String {
    let mut steps = Vec::new();
    if is_disk {
        steps.push(format!(
            "Take the card out ({} is safe to remove) and put it into the box.",
            target.display()
        ));
    } else {
        steps.push(format!(
            "{} is ready: write it to a card, or boot it (see README, \"Image and flashing\").",
            target.display()
        ));
    }
    steps.push("Plug the box in. The first start takes a minute or two; the LEDs show progress, then \"ready\".".into());
    match p {
        Some(b) => {
            let pre = &b.preseed;
            steps.push(match &pre.wifi.passphrase {
                Some(_) => format!(
                    "Join the Wi-Fi \"{}\" with the password you chose.",
                    pre.wifi.ssid
                ),
                None => format!("Join the open Wi-Fi \"{}\".", pre.wifi.ssid),
            });
            let password = if b.password_generated {
                format!(
                    "with the one-time password {}\nWrite it down now: it is not shown again, and the box removes it from the card.",
                    pre.admin.password
                )
            } else {
                "with the password you chose. The box removes it from the card at first boot.".into()
            };
            steps.push(format!(
                "The welcome page opens by itself (or go to http://secta.box/). Log in as @{}:{}\n{password}\nChange it after the first login.",
                pre.admin.username, pre.server_name
            ));
            if let Some(i) = &pre.invite {
                let uses = if i.uses == 0 {
                    "any number of people".to_owned()
                } else {
                    format!("up to {} people", i.uses)
                };
                steps.push(format!(
                    "Members create their accounts with the invite code {} ({uses}).",
                    i.token
                ));
            }
        }
        None => steps.push(
            "No first-boot settings were written: the box starts in first-boot setup and says so on its welcome page."
                .into(),
        ),
    }
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("  {}. {}\n", i + 1, s.replace('\n', "\n     ")))
        .collect()
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List { all, json } => {
            let list: Vec<_> = disks::system_disks()
                .into_iter()
                .filter(|d| all || d.removable)
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!(
                    "No removable disks found. Insert the card (or its USB reader) and try again."
                );
            }
            for d in list {
                println!(
                    "{}\t{}\t{}\t{}{}",
                    d.path.display(),
                    disks::human(d.size_bytes),
                    d.transport,
                    d.model,
                    d.refusal()
                        .map(|r| format!("\tREFUSED: {r}"))
                        .or(d.read_only.then(|| "\tREAD-ONLY".into()))
                        .unwrap_or_default()
                );
            }
        }
        Cmd::Check { preseed } => match build_preseed(&preseed)? {
            Some(b) => println!(
                "The first-boot settings are valid ({} on {}, Wi-Fi \"{}\").",
                b.preseed.box_name, b.preseed.server_name, b.preseed.wifi.ssid
            ),
            None => println!("No first-boot settings to check."),
        },
        Cmd::Preseed {
            target,
            force,
            preseed,
        } => {
            let built = build_preseed(&preseed)?.context("--no-preseed: nothing to write")?;
            let t = target::open(&target, None, force)?;
            let text = built.preseed.to_toml();
            writer::put_boot_file(
                &t,
                writer::BootFile {
                    name: secta_preseed::FILE_NAME,
                    contents: text.as_bytes(),
                    remove: &[secta_preseed::RESULT_FILE_NAME],
                },
            )?;
            println!(
                "Wrote the first-boot settings onto {}.\n\nNext steps:\n{}",
                target.display(),
                next_steps(Some(&built), &target, t.is_block_device())
            );
        }
        Cmd::Write {
            image: image_path,
            target: target_path,
            sha256,
            force,
            yes,
            json,
            no_grow,
            preseed,
        } => {
            // Everything is checked before the first byte is written.
            let built = build_preseed(&preseed)?;
            let expected = match sha256 {
                Some(s) => Some(image::parse_sha256(&s)?),
                None => image::sidecar_sha256(&image_path)?,
            };
            let img = image::open(&image_path)?;
            let mut t = target::open(&target_path, Some(&image_path), force)?;
            confirm(&t, yes)?;
            let text = built.as_ref().map(|b| b.preseed.to_toml());
            let boot_file = text.as_ref().map(|t| writer::BootFile {
                name: secta_preseed::FILE_NAME,
                contents: t.as_bytes(),
                remove: &[secta_preseed::RESULT_FILE_NAME],
            });
            let compression = img.compression;
            let report = writer::flash(
                img,
                &mut t,
                boot_file,
                expected.as_deref(),
                !no_grow,
                !json && std::io::stderr().is_terminal(),
            )?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
                return Ok(());
            }
            println!(
                "Wrote {} ({}, {} decompressed) to {} and read it back: SHA-256 {} {}.",
                image_path.display(),
                compression.name(),
                disks::human(report.image_bytes),
                target_path.display(),
                report.sha256,
                if expected.is_some() {
                    "matches the expected one"
                } else {
                    "(no expected SHA-256 given; the copy on the target equals the image)"
                }
            );
            if let Some(bytes) = report.data_partition_grown_to {
                println!(
                    "The data partition fills the rest of the card ({}).",
                    disks::human(bytes)
                );
            }
            if report.preseed_written {
                println!(
                    "Wrote the first-boot settings ({}) onto the boot partition.",
                    secta_preseed::FILE_NAME
                );
            }
            println!(
                "\nNext steps:\n{}",
                next_steps(built.as_ref(), &target_path, t.is_block_device())
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // A file target that hits the file-size limit gets EFBIG (a clear error)
    // instead of the process being killed.
    // SAFETY: setting a signal's disposition to ignore, before any threads start.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("secta-flash: {e:#}");
            ExitCode::FAILURE
        }
    }
}
