//! Opening an image: raw, or compressed with xz, gzip or zstd (told apart by
//! their magic bytes, not the file name).

use std::{
    fs::File,
    io::{BufReader, Read},
    path::Path,
};

use anyhow::{bail, Context};

/// How an image file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Gzip,
    Zstd,
}

impl Compression {
    /// Recognises the format from the file's first bytes.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "raw",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// An image being read: the decompressed bytes and what is known about them.
pub struct Image {
    pub reader: Box<dyn Read>,
    pub compression: Compression,
    /// Size of the decompressed image when known before reading it (raw files,
    /// zstd frames that record it).
    pub size: Option<u64>,
    /// Size of the file itself.
    pub file_size: u64,
}

/// Opens `path` and sets up decompression.
pub fn open(path: &Path) -> anyhow::Result<Image> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open image {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("image {} is not a regular file", path.display());
    }
    let file_size = meta.len();
    if file_size == 0 {
        bail!("image {} is empty", path.display());
    }
    let mut head = [0u8; 18];
    let n = read_up_to(&mut file, &mut head)?;
    let compression = Compression::sniff(&head[..n]);
    let file = File::open(path)?;
    let size = match compression {
        Compression::None => Some(file_size),
        Compression::Zstd => zstd::zstd_safe::get_frame_content_size(&head[..n])
            .ok()
            .flatten(),
        _ => None,
    };
    let buffered = BufReader::with_capacity(1 << 20, file);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(buffered)),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .context("cannot start the zstd decoder")?,
        ),
    };
    Ok(Image {
        reader,
        compression,
        size,
        file_size,
    })
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
pub fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The expected SHA-256 from a `NAME.sha256` file beside the image (`sha256sum`
/// format; for `NAME.img.xz` the file `NAME.img.sha256` is looked up too, as the
/// hash is of the decompressed image).
pub fn sidecar_sha256(image: &Path) -> anyhow::Result<Option<String>> {
    let mut candidates = vec![image.with_extension(
        image
            .extension()
            .map(|e| format!("{}.sha256", e.to_string_lossy()))
            .unwrap_or_else(|| "sha256".into()),
    )];
    if let Some(ext) = image.extension() {
        if ["xz", "gz", "zst"].contains(&ext.to_string_lossy().as_ref()) {
            candidates.insert(0, image.with_extension("sha256"));
        }
    }
    for c in candidates {
        if c.is_file() {
            let text =
                std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
            let hex = text.split_whitespace().next().unwrap_or("").to_lowercase();
            return Ok(Some(parse_sha256(&hex).with_context(|| {
                format!("{} does not start with a SHA-256", c.display())
            })?));
        }
    }
    Ok(None)
}

/// A SHA-256 in hex (64 hex digits), lower-cased.
pub fn parse_sha256(s: &str) -> anyhow::Result<String> {
    let s = s.trim().to_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a SHA-256 is 64 hex digits, got {s:?}");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_and_decompresses_every_format() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&data).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let zst = zstd::bulk::compress(&data, 3).unwrap();
        for (name, bytes, kind) in [
            ("a.img", data.clone(), Compression::None),
            ("a.img.xz", xz.finish().unwrap(), Compression::Xz),
            ("a.img.gz", gz.finish().unwrap(), Compression::Gzip),
            ("a.img.zst", zst, Compression::Zstd),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let mut img = open(&p).unwrap();
            assert_eq!(img.compression, kind, "{name}");
            let mut out = Vec::new();
            img.reader.read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{name}");
            if matches!(kind, Compression::None | Compression::Zstd) {
                assert_eq!(img.size, Some(data.len() as u64), "{name}");
            }
        }
    }

    #[test]
    fn sidecar_hash_is_found_for_compressed_images() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("secta.img.xz");
        std::fs::write(&img, b"x").unwrap();
        assert_eq!(sidecar_sha256(&img).unwrap(), None);
        let h = "ab".repeat(32);
        std::fs::write(
            dir.path().join("secta.img.sha256"),
            format!("{h}  secta.img\n"),
        )
        .unwrap();
        assert_eq!(sidecar_sha256(&img).unwrap(), Some(h));
        std::fs::write(dir.path().join("secta.img.sha256"), "nonsense\n").unwrap();
        assert!(sidecar_sha256(&img).is_err());
    }
}
