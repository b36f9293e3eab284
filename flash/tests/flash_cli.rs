//! secta-flash on image files, as a user runs it: write, verify, pre-seed, and
//! read the pre-seed back with an independent FAT reader (mtools); damaged
//! images, bad targets and bad settings are refused and leave no bootable card.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const MIB: usize = 1 << 20;
const IMAGE_LEN: usize = 8 * MIB;
const BOOT_START: usize = MIB;
const BOOT_LEN: usize = 4 * MIB;
const DATA_START: usize = 5 * MIB;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_secta-flash"));
    c.env_remove("SECTA_WIFI_PASSPHRASE")
        .env_remove("SECTA_ADMIN_PASSWORD")
        .env_remove("SECTA_INVITE_TOKEN");
    c
}

/// An image laid out like the Pi images: MBR, FAT boot partition at 1 MiB with
/// a config.txt, a Linux partition after it with recognisable bytes.
fn make_image() -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_LEN];
    let entry = |img: &mut Vec<u8>, i: usize, kind: u8, start: usize, len: usize| {
        let e = 446 + 16 * i;
        img[e + 4] = kind;
        img[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    };
    entry(&mut img, 0, 0x0c, BOOT_START, BOOT_LEN);
    entry(&mut img, 1, 0x83, DATA_START, IMAGE_LEN - DATA_START);
    img[510] = 0x55;
    img[511] = 0xaa;
    {
        let mut cur = std::io::Cursor::new(&mut img[BOOT_START..BOOT_START + BOOT_LEN]);
        fatfs::format_volume(
            &mut cur,
            fatfs::FormatVolumeOptions::new().volume_label(*b"SECTABOOT  "),
        )
        .unwrap();
        let fs = fatfs::FileSystem::new(cur, fatfs::FsOptions::new()).unwrap();
        fs.root_dir()
            .create_file("config.txt")
            .unwrap()
            .write_all(b"dtparam=spi=on\n")
            .unwrap();
        fs.unmount().unwrap();
    }
    for (i, b) in img[DATA_START..].iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    img
}

fn preseed_args() -> Vec<&'static str> {
    vec![
        "--box-name",
        "Коммуна",
        "--server-name",
        "kommuna.example",
        "--ssid",
        "Kommuna",
        "--wifi-passphrase",
        "tulip-quarry-anvil-73",
        "--country",
        "RU",
        "--timezone",
        "Europe/Moscow",
        "--peer",
        "other.example=https://10.8.0.2:8448",
    ]
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// `secta-flash write IMAGE CARD --no-preseed ARGS…`
fn write_plain(image: &str, card: &str, args: &[&str]) -> Output {
    let mut all = vec!["write", image, card, "--no-preseed"];
    all.extend(args);
    run(&all)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn bootable(card: &Path) -> bool {
    let b = std::fs::read(card).unwrap();
    b.len() >= 512 && b[510..512] == [0x55, 0xaa]
}

/// `mtype -i card@@1M ::NAME` (None when mtools is missing).
fn mtype(card: &Path, name: &str) -> Option<Result<String, String>> {
    let o = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", card.display(), BOOT_START))
        .arg(format!("::{name}"))
        .output();
    match o {
        Err(_) => {
            eprintln!("SKIPPED: reading the pre-seed back with mtools (mtype not installed)");
            None
        }
        Ok(o) if o.status.success() => Some(Ok(String::from_utf8_lossy(&o.stdout).into_owned())),
        Ok(o) => Some(Err(text(&o))),
    }
}

struct Dir {
    _t: tempfile::TempDir,
    path: PathBuf,
    raw: PathBuf,
}

fn setup() -> Dir {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().to_owned();
    let raw = path.join("secta.img");
    std::fs::write(&raw, make_image()).unwrap();
    Dir { _t: t, path, raw }
}

fn compress(d: &Dir, ext: &str) -> PathBuf {
    let data = std::fs::read(&d.raw).unwrap();
    let out = d.path.join(format!("secta.img.{ext}"));
    let bytes = match ext {
        "xz" => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 3);
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        }
        "gz" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        }
        "zst" => zstd::stream::encode_all(&data[..], 3).unwrap(),
        _ => unreachable!(),
    };
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn writes_verifies_and_preseeds_every_format() {
    let d = setup();
    let image = std::fs::read(&d.raw).unwrap();
    for src in [
        d.raw.clone(),
        compress(&d, "xz"),
        compress(&d, "gz"),
        compress(&d, "zst"),
    ] {
        let card = d.path.join("card.img");
        let _ = std::fs::remove_file(&card);
        let mut args = vec!["write", src.to_str().unwrap(), card.to_str().unwrap()];
        args.extend(preseed_args());
        let o = run(&args);
        let out = text(&o);
        assert!(o.status.success(), "{}: {out}", src.display());
        assert!(out.contains("read it back: SHA-256"), "{out}");
        assert!(out.contains("Next steps"), "{out}");
        assert!(out.contains("Log in as @admin:kommuna.example"), "{out}");
        // The generated one-time password and invite are printed once.
        assert!(out.contains("one-time password "), "{out}");
        assert!(out.contains("invite code "), "{out}");
        let written = std::fs::read(&card).unwrap();
        assert_eq!(written.len(), image.len());
        assert!(bootable(&card));
        // Everything outside the boot partition is the image, byte for byte.
        assert_eq!(written[..BOOT_START], image[..BOOT_START]);
        assert_eq!(written[DATA_START..], image[DATA_START..]);
        let Some(pre) = mtype(&card, "secta-preseed.toml") else {
            continue;
        };
        let pre = pre.unwrap();
        let parsed = secta_preseed::Preseed::parse(pre.as_bytes()).unwrap();
        assert_eq!(parsed.server_name, "kommuna.example");
        assert_eq!(parsed.box_name, "Коммуна");
        assert_eq!(
            parsed.wifi.passphrase.as_deref(),
            Some("tulip-quarry-anvil-73")
        );
        assert_eq!(parsed.timezone.as_deref(), Some("Europe/Moscow"));
        assert_eq!(parsed.peers, ["other.example=https://10.8.0.2:8448"]);
        assert!(
            out.contains(&parsed.admin.password),
            "printed password is the seeded one"
        );
        assert!(out.contains(&parsed.invite.as_ref().unwrap().token));
        assert!(parsed.problems().is_empty());
        assert_eq!(
            mtype(&card, "config.txt").unwrap().unwrap(),
            "dtparam=spi=on\n"
        );
    }
}

#[test]
fn expected_sha256_is_checked() {
    let d = setup();
    let card = d.path.join("card.img");
    let good = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&d.raw).unwrap()))
    };
    let o = write_plain(
        d.raw.to_str().unwrap(),
        card.to_str().unwrap(),
        &["--sha256", &good],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("matches the expected one"));
    assert!(text(&o).contains("first-boot setup"));
    // A sidecar file that does not match: refused, and the card no longer boots.
    std::fs::write(
        d.path.join("secta.img.sha256"),
        format!("{}  secta.img\n", "0".repeat(64)),
    )
    .unwrap();
    let o = write_plain(d.raw.to_str().unwrap(), card.to_str().unwrap(), &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("was expected"), "{}", text(&o));
    assert!(!bootable(&card));
    let o = write_plain(
        d.raw.to_str().unwrap(),
        card.to_str().unwrap(),
        &["--sha256", "abc"],
    );
    assert!(text(&o).contains("64 hex digits"), "{}", text(&o));
}

#[test]
fn damaged_and_truncated_images_leave_no_bootable_card() {
    let d = setup();
    let xz = compress(&d, "xz");
    let bytes = std::fs::read(&xz).unwrap();
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    let corrupt_path = d.path.join("corrupt.img.xz");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    let trunc_path = d.path.join("trunc.img.xz");
    std::fs::write(&trunc_path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let raw = std::fs::read(&d.raw).unwrap();
    let trunc_raw = d.path.join("trunc.img");
    std::fs::write(&trunc_raw, &raw[..3 * MIB]).unwrap();
    let tiny = d.path.join("tiny.img");
    std::fs::write(&tiny, b"not an image").unwrap();
    let card = d.path.join("card.img");
    for (bad, word) in [
        (&corrupt_path, "damaged"),
        (&trunc_path, "damaged or truncated"),
        (&trunc_raw, "truncated"),
        (&tiny, "truncated"),
    ] {
        // Start from a good, bootable card each time.
        let _ = std::fs::remove_file(&card);
        let o = write_plain(d.raw.to_str().unwrap(), card.to_str().unwrap(), &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(bootable(&card));
        let mut args = vec!["write", bad.to_str().unwrap(), card.to_str().unwrap()];
        args.extend(preseed_args());
        let o = run(&args);
        let out = text(&o);
        assert!(!o.status.success(), "{}: {out}", bad.display());
        assert!(out.contains(word), "{}: {out}", bad.display());
        assert!(!out.contains("Next steps"), "{out}");
        if bad != &tiny && bad != &trunc_raw {
            assert!(!bootable(&card), "{} left a bootable card", bad.display());
        }
    }
}

#[test]
fn too_small_and_unwritable_targets_are_refused() {
    let d = setup();
    // A 4 MiB "card": the raw image's size is known, so nothing is touched.
    let small = d.path.join("small.img");
    std::fs::write(&small, vec![7u8; 4 * MIB]).unwrap();
    let o = write_plain(d.raw.to_str().unwrap(), small.to_str().unwrap(), &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("too small"), "{}", text(&o));
    assert_eq!(
        std::fs::read(&small).unwrap(),
        vec![7u8; 4 * MIB],
        "target untouched"
    );
    // xz: the size shows only while writing; the card is left unbootable.
    let xz = compress(&d, "xz");
    let o = write_plain(xz.to_str().unwrap(), small.to_str().unwrap(), &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("too small"), "{}", text(&o));
    assert!(!bootable(&small));
    // The target fails mid-write (here: the file size limit, as when a card is pulled).
    let card = d.path.join("card.img");
    let o = write_plain(d.raw.to_str().unwrap(), card.to_str().unwrap(), &[]);
    assert!(o.status.success());
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 2048; exec '{}' write '{}' '{}' --no-preseed",
            env!("CARGO_BIN_EXE_secta-flash"),
            d.raw.display(),
            card.display()
        ))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("failed at byte"), "{}", text(&o));
    assert!(!bootable(&card));
    // Not a file or disk; the image itself.
    let o = write_plain(d.raw.to_str().unwrap(), d.path.to_str().unwrap(), &[]);
    assert!(
        text(&o).contains("neither a disk nor a regular file"),
        "{}",
        text(&o)
    );
    let o = write_plain(d.raw.to_str().unwrap(), d.raw.to_str().unwrap(), &[]);
    assert!(text(&o).contains("image itself"), "{}", text(&o));
    // Read-only: an immutable file (root ignores permission bits).
    let ro = d.path.join("ro.img");
    std::fs::write(&ro, vec![0u8; IMAGE_LEN]).unwrap();
    let immutable = Command::new("chattr")
        .arg("+i")
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    }
    let writable = std::fs::OpenOptions::new().write(true).open(&ro).is_ok();
    if writable {
        eprintln!("SKIPPED: read-only target (running as root without chattr +i support here)");
    } else {
        let o = write_plain(d.raw.to_str().unwrap(), ro.to_str().unwrap(), &[]);
        assert!(!o.status.success());
        assert!(text(&o).contains("read-only"), "{}", text(&o));
    }
    if immutable {
        let _ = Command::new("chattr").arg("-i").arg(&ro).status();
    }
}

#[test]
fn invalid_settings_write_nothing() {
    let d = setup();
    let card = d.path.join("card.img");
    let cases: &[(&str, &str, &str)] = &[
        ("--ssid", "Сеть-с-очень-длинным-названием", "SSID"),
        ("--wifi-passphrase", "short", "8 to 63"),
        ("--wifi-passphrase", "password123", "too easy to guess"),
        ("--server-name", "not a name", "server name"),
        ("--country", "XX", "country"),
        ("--timezone", "Mars/Olympus", "time zone"),
    ];
    for (flag, value, word) in cases {
        let mut args: Vec<&str> = vec!["write", d.raw.to_str().unwrap(), card.to_str().unwrap()];
        let mut p = preseed_args();
        let i = p.iter().position(|a| a == flag).unwrap();
        p[i + 1] = value;
        args.extend(p);
        let o = run(&args);
        let out = text(&o);
        assert!(!o.status.success(), "{flag} {value}: {out}");
        assert!(
            out.contains("nothing was written") && out.contains(word),
            "{flag} {value}: {out}"
        );
        assert!(!card.exists(), "{flag} {value} created the target");
    }
    // A weak admin password, a bad VPN .conf, missing settings.
    let conf = d.path.join("exit.conf");
    std::fs::write(&conf, "[Interface]\nPrivateKey = nope\n").unwrap();
    let mut args: Vec<&str> = vec!["write", d.raw.to_str().unwrap(), card.to_str().unwrap()];
    args.extend(preseed_args());
    args.extend([
        "--admin-password",
        "qwerty12345",
        "--vpn-exit",
        conf.to_str().unwrap(),
    ]);
    let out = text(&run(&args));
    assert!(out.contains("admin password is too easy"), "{out}");
    assert!(out.contains("VPN exit .conf"), "{out}");
    let out = text(&run(&[
        "write",
        d.raw.to_str().unwrap(),
        card.to_str().unwrap(),
    ]));
    assert!(
        out.contains("--server-name") && out.contains("--no-preseed"),
        "{out}"
    );
    assert!(!card.exists());
    // `check` says the same without any target.
    let mut args = vec!["check"];
    args.extend(preseed_args());
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn preseed_only_replaces_the_settings_file() {
    let d = setup();
    let card = d.path.join("card.img");
    let o = write_plain(d.raw.to_str().unwrap(), card.to_str().unwrap(), &[]);
    assert!(o.status.success());
    // From a hand-written file, secrets through the environment.
    let file = d.path.join("preseed.toml");
    std::fs::write(
        &file,
        "version = 1\nbox_name = \"Box\"\nserver_name = \"10.0.0.1:8448\"\ncountry = \"KZ\"\n\
         [wifi]\nssid = \"Box\"\n[admin]\nusername = \"root.admin\"\npassword = \"violet-harbor-sextant-4\"\n",
    )
    .unwrap();
    let o = run(&[
        "preseed",
        card.to_str().unwrap(),
        "--preseed",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("open Wi-Fi \"Box\""), "{}", text(&o));
    if let Some(r) = mtype(&card, "secta-preseed.toml") {
        let p = secta_preseed::Preseed::parse(r.unwrap().as_bytes()).unwrap();
        assert_eq!(p.admin.username, "root.admin");
        assert_eq!(p.server_name, "10.0.0.1:8448");
        assert!(p.wifi.passphrase.is_none());
    }
    let mut args = vec!["preseed", card.to_str().unwrap()];
    args.extend(preseed_args());
    let o = bin()
        .args(&args)
        .env("SECTA_ADMIN_PASSWORD", "violet-harbor-sextant-5")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("violet-harbor-sextant-5"),
        "a chosen password is not echoed"
    );
    if let Some(r) = mtype(&card, "secta-preseed.toml") {
        let p = secta_preseed::Preseed::parse(r.unwrap().as_bytes()).unwrap();
        assert_eq!(p.admin.password, "violet-harbor-sextant-5");
        assert_eq!(p.server_name, "kommuna.example");
    }
    // A card without a FAT partition.
    let plain = d.path.join("plain.img");
    std::fs::write(&plain, vec![0u8; MIB]).unwrap();
    let mut args = vec!["preseed", plain.to_str().unwrap()];
    args.extend(preseed_args());
    assert!(text(&run(&args)).contains("no MBR"));
}

#[test]
fn the_data_partition_fills_a_larger_card() {
    let d = setup();
    let card = d.path.join("card.img");
    std::fs::write(&card, b"").unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&card).unwrap();
    f.set_len(64 * MIB as u64).unwrap();
    drop(f);
    let o = write_plain(d.raw.to_str().unwrap(), card.to_str().unwrap(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("fills the rest of the card"),
        "{}",
        text(&o)
    );
    let b = std::fs::read(&card).unwrap();
    let sectors = u32::from_le_bytes(b[446 + 16 + 12..446 + 16 + 16].try_into().unwrap());
    assert_eq!(sectors as usize * 512, 64 * MIB - DATA_START);
    // --no-grow keeps the image's table.
    let o = write_plain(
        d.raw.to_str().unwrap(),
        card.to_str().unwrap(),
        &["--no-grow"],
    );
    assert!(o.status.success());
    let b = std::fs::read(&card).unwrap();
    assert_eq!(b[..512], std::fs::read(&d.raw).unwrap()[..512]);
}
