//! Files encrypted with XChaCha20-Poly1305 in the STREAM construction
//! (Hoang, Reyhanitabar, Rogaway, Vizár: online AEAD), big-endian 32-bit
//! counter, as RustCrypto's `aead::stream::StreamBE32` implements it.
//!
//! Layout: `SECTAF01` · 19-byte random nonce prefix · chunks. Every chunk is
//! 64 KiB of plaintext + a 16-byte tag, except the last (0..=64 KiB + tag),
//! which is sealed with the "last block" flag: truncating, reordering or
//! extending a file fails authentication. The header is the associated data of
//! every chunk. Because chunks have a fixed size, any byte range can be read by
//! decrypting only the chunks that hold it (media range requests).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use chacha20poly1305::{
    aead::{
        generic_array::GenericArray,
        stream::{NewStream, StreamBE32, StreamPrimitive},
        KeyInit,
    },
    XChaCha20Poly1305,
};
use zeroize::Zeroizing;

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// The first bytes of every sealed file.
pub(crate) const MAGIC: &[u8; 8] = b"SECTAF01";
const PREFIX: usize = 19;
/// Bytes before the first chunk.
pub const HEADER: usize = MAGIC.len() + PREFIX;

/// The file key (derived from the data key); zeroized on drop.
pub struct FileCipher {
    key: Zeroizing<[u8; 32]>,
}

impl FileCipher {
    pub(crate) fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self { key }
    }

    fn stream(&self, header: &[u8]) -> StreamBE32<XChaCha20Poly1305> {
        let aead = XChaCha20Poly1305::new(self.key.as_ref().into());
        StreamBE32::from_aead(aead, GenericArray::from_slice(&header[MAGIC.len()..HEADER]))
    }

    /// A streaming encryptor for a new file (fresh random nonce prefix).
    pub fn encryptor(&self) -> Encryptor {
        let mut header = [0u8; HEADER];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut header[MAGIC.len()..]);
        Encryptor {
            stream: self.stream(&header),
            header,
            position: 0,
            buf: Vec::with_capacity(CHUNK + TAG),
            header_sent: false,
        }
    }

    /// Encrypts a whole buffer.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(encrypted_len(plain.len() as u64) as usize);
        let mut e = self.encryptor();
        e.update(plain, &mut out);
        e.finish(&mut out);
        out
    }

    /// Decrypts a whole file's bytes.
    pub fn open(&self, bytes: &[u8]) -> Result<Vec<u8>, FileError> {
        let d = self.decryptor(
            bytes.get(..HEADER).ok_or(FileError::NotEncrypted)?,
            bytes.len() as u64,
        )?;
        let mut out = Vec::with_capacity(d.plain_len() as usize);
        for i in 0..d.chunks() {
            let (off, len) = d.chunk_location(i);
            out.extend_from_slice(&d.decrypt_chunk(i, &bytes[off as usize..(off + len) as usize])?);
        }
        Ok(out)
    }

    /// A decryptor for a file whose first [`HEADER`] bytes are `header` and
    /// whose length is `file_len`.
    pub fn decryptor(&self, header: &[u8], file_len: u64) -> Result<Decryptor, FileError> {
        if header.len() < HEADER || &header[..MAGIC.len()] != MAGIC {
            return Err(FileError::NotEncrypted);
        }
        let body = file_len
            .checked_sub(HEADER as u64)
            .ok_or(FileError::Truncated)?;
        let whole = (CHUNK + TAG) as u64;
        let (full, rem) = (body / whole, body % whole);
        let (chunks, plain_len) = match rem {
            0 if full == 0 => return Err(FileError::Truncated),
            0 => (full, full * CHUNK as u64),
            r if r < TAG as u64 => return Err(FileError::Truncated),
            r => (full + 1, full * CHUNK as u64 + r - TAG as u64),
        };
        if chunks > u64::from(u32::MAX) {
            return Err(FileError::Truncated);
        }
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&header[..HEADER]);
        Ok(Decryptor {
            stream: self.stream(&h),
            header: h,
            chunks,
            plain_len,
        })
    }

    /// Writes `plain` encrypted to `path` atomically (temp file, fsync, rename),
    /// owner-only.
    pub fn write_file(&self, path: &Path, plain: &[u8]) -> std::io::Result<()> {
        crate::wipe::write_synced(path, &self.seal(plain))
    }

    /// Reads and decrypts a whole file.
    pub fn read_file(&self, path: &Path) -> Result<Vec<u8>, FileError> {
        self.open(&std::fs::read(path).map_err(FileError::Io)?)
    }

    /// Opens an encrypted file for reading plaintext from any offset.
    pub fn reader(&self, path: &Path) -> Result<DecryptReader, FileError> {
        let mut file = File::open(path).map_err(FileError::Io)?;
        let len = file.metadata().map_err(FileError::Io)?.len();
        let mut header = [0u8; HEADER];
        file.read_exact(&mut header)
            .map_err(|_| FileError::Truncated)?;
        Ok(DecryptReader {
            dec: self.decryptor(&header, len)?,
            file,
            pos: 0,
            buf: Vec::new(),
            buf_chunk: u64::MAX,
        })
    }
}

/// The size of the encrypted form of `plain_len` bytes.
pub fn encrypted_len(plain_len: u64) -> u64 {
    let chunks = plain_len.div_ceil(CHUNK as u64).max(1);
    HEADER as u64 + plain_len + chunks * TAG as u64
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("not an encrypted Secta file")]
    NotEncrypted,
    #[error("encrypted file is truncated")]
    Truncated,
    #[error("encrypted file does not authenticate (corrupt, altered, or another key)")]
    Corrupt,
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<FileError> for std::io::Error {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Io(e) => e,
            e => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

/// Encrypts a stream of bytes chunk by chunk.
pub struct Encryptor {
    stream: StreamBE32<XChaCha20Poly1305>,
    header: [u8; HEADER],
    position: u32,
    /// Plaintext not yet sealed (at most one chunk: the last chunk is only
    /// known to be last at `finish`).
    buf: Vec<u8>,
    header_sent: bool,
}

impl Encryptor {
    /// Adds plaintext; appends whatever ciphertext is ready to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        if !self.header_sent {
            out.extend_from_slice(&self.header);
            self.header_sent = true;
        }
        while !data.is_empty() {
            if self.buf.len() == CHUNK {
                self.seal_chunk(false, out);
            }
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// Seals the last chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if !self.header_sent {
            out.extend_from_slice(&self.header);
        }
        self.seal_chunk(true, out);
    }

    fn seal_chunk(&mut self, last: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.buf);
        self.buf.clear();
        let mut tail = out.split_off(start);
        self.stream
            .encrypt_in_place(self.position, last, &self.header, &mut tail)
            .expect("STREAM position below 2^32 (files under 256 TiB)");
        out.extend_from_slice(&tail);
        self.position += 1;
    }
}

/// Random access to an encrypted file's chunks.
pub struct Decryptor {
    stream: StreamBE32<XChaCha20Poly1305>,
    header: [u8; HEADER],
    chunks: u64,
    plain_len: u64,
}

impl Decryptor {
    pub fn plain_len(&self) -> u64 {
        self.plain_len
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Where chunk `i`'s ciphertext is in the file: (offset, length).
    pub fn chunk_location(&self, i: u64) -> (u64, u64) {
        let off = HEADER as u64 + i * (CHUNK + TAG) as u64;
        let len = if i + 1 == self.chunks {
            self.plain_len - i * CHUNK as u64 + TAG as u64
        } else {
            (CHUNK + TAG) as u64
        };
        (off, len)
    }

    pub fn decrypt_chunk(&self, i: u64, ciphertext: &[u8]) -> Result<Vec<u8>, FileError> {
        let mut buf = ciphertext.to_vec();
        self.stream
            .decrypt_in_place(i as u32, i + 1 == self.chunks, &self.header, &mut buf)
            .map_err(|_| FileError::Corrupt)?;
        Ok(buf)
    }
}

/// `Read + Seek` over the plaintext of an encrypted file; decrypts one chunk
/// at a time.
pub struct DecryptReader {
    dec: Decryptor,
    file: File,
    pos: u64,
    buf: Vec<u8>,
    buf_chunk: u64,
}

impl DecryptReader {
    pub fn plain_len(&self) -> u64 {
        self.dec.plain_len
    }
}

impl Read for DecryptReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.dec.plain_len || out.is_empty() {
            return Ok(0);
        }
        let chunk = self.pos / CHUNK as u64;
        if chunk != self.buf_chunk {
            let (off, len) = self.dec.chunk_location(chunk);
            let mut ct = vec![0u8; len as usize];
            self.file.seek(SeekFrom::Start(off))?;
            self.file.read_exact(&mut ct)?;
            self.buf = self.dec.decrypt_chunk(chunk, &ct)?;
            self.buf_chunk = chunk;
        }
        let at = (self.pos - chunk * CHUNK as u64) as usize;
        let n = (self.buf.len() - at).min(out.len());
        out[..n].copy_from_slice(&self.buf[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DecryptReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.dec.plain_len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start")
        })?;
        self.pos = new;
        Ok(new)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cipher with a fixed test key.
    pub(crate) fn cipher(b: u8) -> FileCipher {
        FileCipher::new(Zeroizing::new([b; 32]))
    }

    #[test]
    fn round_trips_at_chunk_edges_and_sizes_are_exact() {
        let c = cipher(7);
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            // Fed in odd pieces.
            let mut e = c.encryptor();
            let mut out = Vec::new();
            for piece in plain.chunks(7919) {
                e.update(piece, &mut out);
            }
            e.finish(&mut out);
            assert_eq!(out.len() as u64, encrypted_len(len as u64), "len {len}");
            assert_eq!(c.open(&out).unwrap(), plain, "len {len}");
            assert_eq!(c.seal(&plain).len(), out.len());
            if len > 64 {
                // No plaintext run survives.
                assert!(!out.windows(32).any(|w| w == &plain[..32]));
            }
        }
    }

    #[test]
    fn tampering_truncation_reordering_and_wrong_key_fail() {
        let c = cipher(1);
        let plain = vec![42u8; 2 * CHUNK + 100];
        let sealed = c.seal(&plain);
        let mut flipped = sealed.clone();
        flipped[HEADER + 5] ^= 1;
        assert!(matches!(c.open(&flipped), Err(FileError::Corrupt)));
        let mut header = sealed.clone();
        header[10] ^= 1;
        assert!(c.open(&header).is_err());
        // Drop the last chunk: the new last chunk was not sealed as last.
        let cut = &sealed[..HEADER + 2 * (CHUNK + TAG)];
        assert!(matches!(c.open(cut), Err(FileError::Corrupt)));
        assert!(matches!(
            c.open(&sealed[..HEADER + 10]),
            Err(FileError::Truncated)
        ));
        // Swap the first two chunks.
        let mut swapped = sealed.clone();
        let (a, b) = (HEADER, HEADER + CHUNK + TAG);
        let first = sealed[a..b].to_vec();
        swapped.copy_within(b..b + CHUNK + TAG, a);
        swapped[b..b + CHUNK + TAG].copy_from_slice(&first);
        assert!(matches!(c.open(&swapped), Err(FileError::Corrupt)));
        assert!(matches!(cipher(2).open(&sealed), Err(FileError::Corrupt)));
        assert!(matches!(
            c.open(b"plain text file, not encrypted at all"),
            Err(FileError::NotEncrypted)
        ));
    }

    #[test]
    fn range_reads_decrypt_only_what_they_need() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c = cipher(3);
        let plain: Vec<u8> = (0..(5 * CHUNK + 123)).map(|i| (i % 253) as u8).collect();
        c.write_file(&path, &plain).unwrap();
        let mut r = c.reader(&path).unwrap();
        assert_eq!(r.plain_len(), plain.len() as u64);
        for (start, len) in [
            (0usize, 10usize),
            (CHUNK - 3, 6),
            (2 * CHUNK + 5, CHUNK * 2),
            (plain.len() - 1, 1),
            (plain.len() - 500, 500),
        ] {
            r.seek(SeekFrom::Start(start as u64)).unwrap();
            let mut got = vec![0u8; len];
            r.read_exact(&mut got).unwrap();
            assert_eq!(got, &plain[start..start + len]);
        }
        r.seek(SeekFrom::Start(plain.len() as u64)).unwrap();
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
    }
}
