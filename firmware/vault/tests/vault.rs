//! The key file's life: first start, reopen, every bad-input case (missing,
//! corrupt, wrong secret, plaintext data, encryption turned off), the wipe and
//! its resumption after an interruption, and the audit.

use std::{path::Path, time::Instant};

use secta_vault::{audit, wipe, Vault, VaultConfig, VaultError, ENCRYPTED_MARKER};

fn cfg() -> VaultConfig {
    VaultConfig::default()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn first_start_creates_an_owner_only_key_and_reopens_it() {
    let d = tempfile::tempdir().unwrap();
    let v = Vault::open(&cfg(), d.path()).unwrap().unwrap();
    let id = v.key_id().to_owned();
    let key_file = d.path().join("data.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(std::fs::metadata(&key_file).unwrap().len(), 97);
    let k1 = v.sqlcipher_key("homeserver.db").unwrap();
    drop(v);
    let v = Vault::open(&cfg(), d.path()).unwrap().unwrap();
    assert_eq!(v.key_id(), id);
    assert_eq!(*v.sqlcipher_key("homeserver.db").unwrap(), *k1);
    assert_ne!(*v.sqlcipher_key("other.db").unwrap(), *k1);
    // Files sealed before reopen open after.
    let sealed = v.file_cipher().unwrap().seal(b"hello");
    assert_eq!(v.file_cipher().unwrap().open(&sealed).unwrap(), b"hello");
    v.forget();
    assert!(matches!(v.file_cipher(), Err(VaultError::Wiped)));
    assert!(matches!(
        v.sqlcipher_key("homeserver.db"),
        Err(VaultError::Wiped)
    ));
}

#[test]
fn missing_or_corrupt_key_with_encrypted_data_refuses_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let v = Vault::open(&cfg(), d.path()).unwrap().unwrap();
    let id = v.key_id().to_owned();
    drop(v);
    std::fs::write(d.path().join("homeserver.db"), b"encrypted pages").unwrap();
    let key_file = d.path().join("data.key");
    let good = std::fs::read(&key_file).unwrap();

    // Corrupt: one flipped bit.
    let mut bad = good.clone();
    bad[60] ^= 0x10;
    std::fs::write(&key_file, &bad).unwrap();
    let before = listing(d.path());
    let e = Vault::open(&cfg(), d.path()).err().unwrap();
    assert!(matches!(e, VaultError::KeyUnreadable { .. }), "{e}");
    assert!(e.to_string().contains("does not authenticate"), "{e}");
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        bad,
        "the corrupt key file is left as it was"
    );
    assert_eq!(listing(d.path()), before);

    // Truncated.
    std::fs::write(&key_file, &good[..40]).unwrap();
    assert!(matches!(
        Vault::open(&cfg(), d.path()),
        Err(VaultError::KeyUnreadable { .. })
    ));

    // Missing: never a new key over existing encrypted data.
    std::fs::remove_file(&key_file).unwrap();
    let e = Vault::open(&cfg(), d.path()).err().unwrap();
    assert!(matches!(e, VaultError::KeyMissing { .. }), "{e}");
    assert!(
        e.to_string().contains(&id) && e.to_string().contains("refusing"),
        "{e}"
    );
    assert!(!key_file.exists());

    // Someone else's key file.
    let other = tempfile::tempdir().unwrap();
    drop(Vault::open(&cfg(), other.path()).unwrap());
    std::fs::copy(other.path().join("data.key"), &key_file).unwrap();
    assert!(matches!(
        Vault::open(&cfg(), d.path()),
        Err(VaultError::WrongKey { .. })
    ));

    // The right key again: fine.
    std::fs::write(&key_file, &good).unwrap();
    assert_eq!(Vault::open(&cfg(), d.path()).unwrap().unwrap().key_id(), id);

    // Encryption turned off over encrypted data.
    let off = VaultConfig {
        encrypt: false,
        ..cfg()
    };
    assert!(matches!(
        Vault::open(&off, d.path()),
        Err(VaultError::EncryptionOff { .. })
    ));
}

#[test]
fn plaintext_data_from_before_is_not_silently_encrypted_over() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("homeserver.db"), b"SQLite format 3\0").unwrap();
    let e = Vault::open(&cfg(), d.path()).err().unwrap();
    assert!(matches!(e, VaultError::PlaintextData { .. }), "{e}");
    assert!(!d.path().join("data.key").exists());
    let off = VaultConfig {
        encrypt: false,
        ..cfg()
    };
    assert!(Vault::open(&off, d.path()).unwrap().is_none());
}

#[test]
fn secret_file_and_passphrase_wrap_the_key() {
    let d = tempfile::tempdir().unwrap();
    let usb = tempfile::tempdir().unwrap();
    let secret = usb.path().join("secta.secret");
    std::fs::write(&secret, [7u8; 32]).unwrap();
    let c = VaultConfig {
        secret_file: Some(secret.clone()),
        ..cfg()
    };
    let id = Vault::open(&c, d.path())
        .unwrap()
        .unwrap()
        .key_id()
        .to_owned();
    assert_eq!(Vault::open(&c, d.path()).unwrap().unwrap().key_id(), id);
    std::fs::write(&secret, [8u8; 32]).unwrap();
    let e = Vault::open(&c, d.path()).err().unwrap();
    assert!(e.to_string().contains("wrong secret"), "{e}");
    std::fs::remove_file(&secret).unwrap();
    assert!(matches!(
        Vault::open(&c, d.path()),
        Err(VaultError::Secret { .. })
    ));
    // Without the secret the key file does not open with the default either.
    assert!(matches!(
        Vault::open(&cfg(), d.path()),
        Err(VaultError::KeyUnreadable { .. })
    ));
    assert!(audit(&cfg(), d.path())
        .key_wrapped_by
        .unwrap()
        .contains("secret file"));

    let d = tempfile::tempdir().unwrap();
    let c = VaultConfig {
        passphrase: true,
        ..cfg()
    };
    std::env::set_var("SECTA_PASSPHRASE", "correct horse");
    let id = Vault::open(&c, d.path())
        .unwrap()
        .unwrap()
        .key_id()
        .to_owned();
    assert_eq!(Vault::open(&c, d.path()).unwrap().unwrap().key_id(), id);
    std::env::set_var("SECTA_PASSPHRASE", "wrong horse");
    assert!(matches!(
        Vault::open(&c, d.path()),
        Err(VaultError::KeyUnreadable { .. })
    ));
    std::env::remove_var("SECTA_PASSPHRASE");
    assert!(matches!(
        Vault::open(&c, d.path()),
        Err(VaultError::NoPassphrase)
    ));
}

fn populate(dir: &Path) -> std::sync::Arc<Vault> {
    let v = Vault::open(&cfg(), dir).unwrap().unwrap();
    std::fs::write(dir.join("secta.toml"), "[box]\n").unwrap();
    std::fs::write(dir.join("homeserver.db"), vec![1u8; 10_000]).unwrap();
    std::fs::create_dir_all(dir.join("media/ab")).unwrap();
    v.file_cipher()
        .unwrap()
        .write_file(&dir.join("media/ab/abcdef"), b"picture")
        .unwrap();
    v
}

#[test]
fn wipe_destroys_the_key_first_then_everything_but_the_config() {
    let d = tempfile::tempdir().unwrap();
    let v = populate(d.path());
    let a = audit(&cfg(), d.path());
    assert!(a.encrypted && a.key_file_present && !a.wipe_in_progress);
    assert_eq!(
        a.would_destroy[0],
        d.path().join("data.key"),
        "key material first"
    );
    assert!(a.would_destroy.contains(&d.path().join("media")));
    assert!(!a.would_destroy.contains(&d.path().join("secta.toml")));
    // The audit shows no key bytes.
    let text = format!("{a:?}");
    assert!(!text.contains(&v.sqlcipher_key("homeserver.db").unwrap()[2..66]));

    let mut key_present_when_stopping = true;
    let r = wipe::run(&cfg(), d.path(), Some(&v), Instant::now(), || {
        key_present_when_stopping = d.path().join("data.key").exists();
    });
    assert!(
        !key_present_when_stopping,
        "services are stopped after the key is gone"
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.keys, 1);
    assert!(r.key_destroyed_ms <= r.files_deleted_ms);
    assert!(v.is_forgotten());
    assert_eq!(listing(d.path()), vec![".wipe-in-progress", "secta.toml"]);
    wipe::finish(&cfg(), d.path()).unwrap();
    assert_eq!(listing(d.path()), vec!["secta.toml"]);
    // First boot again: a new key.
    let v2 = Vault::open(&cfg(), d.path()).unwrap().unwrap();
    assert_ne!(v2.key_id(), v.key_id());
}

#[test]
fn an_interrupted_wipe_is_finished_at_the_next_start() {
    let d = tempfile::tempdir().unwrap();
    drop(populate(d.path()));
    // Power lost right after the marker was written.
    std::fs::write(d.path().join(wipe::WIPE_MARKER), b"wipe in progress\n").unwrap();
    let r = wipe::resume_if_needed(&cfg(), d.path()).unwrap().unwrap();
    assert_eq!(r.keys, 1);
    assert_eq!(listing(d.path()), vec!["secta.toml"]);
    assert!(wipe::resume_if_needed(&cfg(), d.path()).unwrap().is_none());
    // Interrupted after the key went: the data without a key would otherwise
    // be "missing key" — the marker says it is a wipe.
    let d = tempfile::tempdir().unwrap();
    drop(populate(d.path()));
    std::fs::write(d.path().join(wipe::WIPE_MARKER), b"").unwrap();
    std::fs::remove_file(d.path().join("data.key")).unwrap();
    assert!(d.path().join(ENCRYPTED_MARKER).exists());
    wipe::resume_if_needed(&cfg(), d.path()).unwrap().unwrap();
    assert_eq!(listing(d.path()), vec!["secta.toml"]);
    assert!(Vault::open(&cfg(), d.path()).unwrap().is_some());
}

#[test]
fn destroy_file_overwrites_before_unlinking() {
    // Keep a second hard link to observe the inode after unlink.
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("k");
    std::fs::write(&f, [0xAAu8; 97]).unwrap();
    std::fs::hard_link(&f, d.path().join("observer")).unwrap();
    wipe::destroy_file(&f).unwrap();
    assert!(!f.exists());
    let after = std::fs::read(d.path().join("observer")).unwrap();
    assert_eq!(after.len(), 97);
    assert_ne!(after, vec![0xAAu8; 97]);
    wipe::destroy_file(&f).unwrap();
}
