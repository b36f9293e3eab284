//! Small secret files (interface keys, passwords, a pasted `.conf`): sealed
//! with the file key ([`FileCipher`], the format of [`crate::file`]) when the
//! box encrypts its data, plain otherwise; owner-only and written atomically
//! either way (`secta_runtime::write_secret_file`).
//!
//! A plaintext file from before encryption at rest, found while a cipher is
//! given, is converted once (re-written sealed) with one warning: its old
//! blocks may remain on the card until they are overwritten.

use std::path::Path;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use crate::file::{FileCipher, MAGIC};

fn seal(cipher: Option<&FileCipher>, plain: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(match cipher {
        Some(c) => c.seal(plain),
        None => plain.to_vec(),
    })
}

/// Writes `plain` to `path` (replacing it atomically), sealed when `cipher` is given.
pub fn write(cipher: Option<&FileCipher>, path: &Path, plain: &[u8]) -> anyhow::Result<()> {
    secta_runtime::write_secret_file(path, &seal(cipher, plain))
}

/// Creates `path` with `plain` only if it does not exist yet (of concurrent
/// callers exactly one does); false when it was already there.
pub fn create(cipher: Option<&FileCipher>, path: &Path, plain: &[u8]) -> anyhow::Result<bool> {
    secta_runtime::create_secret_file(path, &seal(cipher, plain))
}

fn read_raw(path: &Path) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(Zeroizing::new(b))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The plaintext of `path` (None when it does not exist). With a cipher, a
/// sealed file that does not authenticate is an error naming the file (it is
/// left as it is), and a plaintext one is converted; without a cipher, a
/// sealed file is an error.
pub fn read(
    cipher: Option<&FileCipher>,
    path: &Path,
) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    let Some(bytes) = read_raw(path)? else {
        return Ok(None);
    };
    let sealed = bytes.starts_with(MAGIC);
    match cipher {
        None if sealed => bail!(
            "{} is encrypted under a data key and cannot be read with `[vault] encrypt = false`",
            path.display()
        ),
        None => Ok(Some(bytes)),
        Some(c) if sealed => match c.open(&bytes) {
            Ok(plain) => Ok(Some(Zeroizing::new(plain))),
            Err(e) => bail!(
                "{} cannot be decrypted ({e}): it was not written under this box's data key, or it is damaged; it was left as it is",
                path.display()
            ),
        },
        Some(c) => {
            convert_bytes(c, path, &bytes)?;
            warn_converted(&[path]);
            Ok(Some(bytes))
        }
    }
}

/// A password kept in `path`: the stored one (trimmed), or, when there is
/// none (or it is empty), one from `make`, stored now. A stored one that
/// cannot be read is an error, never replaced.
pub fn password(
    cipher: Option<&FileCipher>,
    path: &Path,
    make: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    if let Some(p) = read(cipher, path)? {
        let p = String::from_utf8_lossy(&p);
        if !p.trim().is_empty() {
            return Ok(p.trim().to_owned());
        }
    }
    let p = make();
    write(cipher, path, p.as_bytes())?;
    Ok(p)
}

/// Whether `path` exists in the clear (not sealed): a file to [`convert`].
pub fn is_plaintext(path: &Path) -> bool {
    read_raw(path).is_ok_and(|b| b.is_some_and(|b| !b.starts_with(MAGIC)))
}

/// Converts `path` to the sealed form if it is a plaintext file from before
/// encryption at rest; true when it did (the caller warns, [`warn_converted`]).
/// A missing or sealed file is left alone.
pub fn convert(cipher: &FileCipher, path: &Path) -> anyhow::Result<bool> {
    match read_raw(path)? {
        Some(bytes) if !bytes.starts_with(MAGIC) => {
            convert_bytes(cipher, path, &bytes)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn convert_bytes(cipher: &FileCipher, path: &Path, plain: &[u8]) -> anyhow::Result<()> {
    write(Some(cipher), path, plain).with_context(|| {
        format!(
            "encrypting {}, written before encryption at rest",
            path.display()
        )
    })?;
    Ok(())
}

/// The one warning for files (or a database) converted from plaintext.
pub fn warn_converted(files: &[&Path]) {
    if files.is_empty() {
        return;
    }
    let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    tracing::warn!(
        files = %files.join(", "),
        "encrypted what was written in the clear before encryption at rest; the old plaintext blocks may remain on the card until they are overwritten (a wipe deletes these files but cannot crypto-erase those blocks)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::tests::cipher;

    #[test]
    fn sealed_plain_converted_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cipher(5);
        let p = dir.path().join("password");
        assert!(read(Some(&c), &p).unwrap().is_none());
        assert!(create(Some(&c), &p, b"hunter2-secret").unwrap());
        assert!(!create(Some(&c), &p, b"another").unwrap(), "never replaced");
        let raw = std::fs::read(&p).unwrap();
        assert!(raw.starts_with(MAGIC) && !raw.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&*read(Some(&c), &p).unwrap().unwrap(), b"hunter2-secret");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o077,
            0
        );

        // Without the key, or under another key: a clear error naming the
        // file, and the file is untouched.
        let e = format!("{:#}", read(None, &p).unwrap_err());
        assert!(
            e.contains("password") && e.contains("encrypt = false"),
            "{e}"
        );
        let e = format!("{:#}", read(Some(&cipher(6)), &p).unwrap_err());
        assert!(
            e.contains(&p.display().to_string()) && e.contains("cannot be decrypted"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), raw);

        // A plaintext file from before is converted once, by reading it or by
        // `convert`.
        let old = dir.path().join("old");
        write(None, &old, b"plain-old-secret").unwrap();
        assert_eq!(&*read(None, &old).unwrap().unwrap(), b"plain-old-secret");
        assert_eq!(
            &*read(Some(&c), &old).unwrap().unwrap(),
            b"plain-old-secret"
        );
        assert!(std::fs::read(&old).unwrap().starts_with(MAGIC));
        assert_eq!(
            &*read(Some(&c), &old).unwrap().unwrap(),
            b"plain-old-secret"
        );
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        assert!(convert(&c, &other).unwrap());
        assert!(!convert(&c, &other).unwrap());
        assert!(!convert(&c, &dir.path().join("missing")).unwrap());
        assert_eq!(&*read(Some(&c), &other).unwrap().unwrap(), b"x");
    }
}
