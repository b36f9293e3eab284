//! Just enough of the stream formats to pass them through intact: Ogg page
//! framing (CRC-checked), Vorbis/Opus comment titles, and MP3/ADTS frame sync
//! to tell audio from garbage.

use bytes::{Bytes, BytesMut};

/// What a mount carries; the bytes are never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Mp3,
    Ogg,
    Aac,
}

impl Codec {
    /// From a source's `Content-Type` (legacy clients that send none mean MP3).
    pub fn from_content_type(ct: Option<&str>) -> Option<Codec> {
        let ct = ct
            .unwrap_or("audio/mpeg")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ct.as_str() {
            "audio/mpeg" | "audio/mp3" | "audio/mpeg3" => Some(Codec::Mp3),
            "application/ogg" | "audio/ogg" | "audio/opus" | "audio/vorbis" | "video/ogg" => {
                Some(Codec::Ogg)
            }
            "audio/aac" | "audio/aacp" | "audio/x-aac" | "audio/mp4a-latm" => Some(Codec::Aac),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Mp3 => "audio/mpeg",
            Codec::Ogg => "application/ogg",
            Codec::Aac => "audio/aac",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Codec::Mp3 => "mp3",
            Codec::Ogg => "ogg",
            Codec::Aac => "aac",
        }
    }
}

/// The length of the MPEG audio frame whose header starts `b`, if it is one.
pub fn mp3_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 4 || b[0] != 0xFF || b[1] & 0xE0 != 0xE0 {
        return None;
    }
    let version = (b[1] >> 3) & 3; // 0: 2.5, 2: 2, 3: 1
    let layer = (b[1] >> 1) & 3; // 1: III, 2: II, 3: I
    let br_idx = (b[2] >> 4) as usize;
    let sr_idx = ((b[2] >> 2) & 3) as usize;
    let pad = ((b[2] >> 1) & 1) as usize;
    if version == 1 || layer == 0 || br_idx == 0 || br_idx == 15 || sr_idx == 3 {
        return None;
    }
    const BR_V1: [[u32; 15]; 3] = [
        [
            0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
        ],
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
        ],
        [
            0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
        ],
    ];
    const BR_V2: [[u32; 15]; 2] = [
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
        ],
        [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
    ];
    const SR: [[u32; 3]; 3] = [
        [11025, 12000, 8000],
        [22050, 24000, 16000],
        [44100, 48000, 32000],
    ];
    let sr = SR[match version {
        0 => 0,
        2 => 1,
        _ => 2,
    }][sr_idx];
    let layer_n = 4 - layer as usize; // 1, 2 or 3
    let br = if version == 3 {
        BR_V1[layer_n - 1][br_idx]
    } else {
        BR_V2[if layer_n == 1 { 0 } else { 1 }][br_idx]
    } * 1000;
    let len = match (layer_n, version) {
        (1, _) => (12 * br / sr) as usize * 4 + pad * 4,
        (3, v) if v != 3 => (72 * br / sr) as usize + pad,
        _ => (144 * br / sr) as usize + pad,
    };
    (len >= 4).then_some(len)
}

/// The length of the ADTS (AAC) frame whose header starts `b`, if it is one.
pub fn adts_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 7 || b[0] != 0xFF || b[1] & 0xF6 != 0xF0 {
        return None;
    }
    let len = (((b[3] & 3) as usize) << 11) | ((b[4] as usize) << 3) | ((b[5] >> 5) as usize);
    (len >= 7).then_some(len)
}

/// Whether `b` (the first bytes a source sent) looks like `codec`: an Ogg
/// page with a good CRC, or two MPEG/ADTS frames in a row (after an ID3 tag).
/// `None` while more bytes are needed to tell.
pub fn looks_like(codec: Codec, b: &[u8]) -> Option<bool> {
    match codec {
        Codec::Ogg => match page_len(b) {
            Ok(Some(n)) => Some(page_crc_ok(&b[..n])),
            Ok(None) => None,
            Err(NotOgg) => Some(false),
        },
        Codec::Mp3 | Codec::Aac => {
            let mut start = 0;
            if b.len() >= 10 && &b[..3] == b"ID3" {
                let size = b[6..10]
                    .iter()
                    .fold(0usize, |a, &x| (a << 7) | (x & 0x7F) as usize);
                start = 10 + size;
            }
            let frame = |s: &[u8]| match codec {
                Codec::Mp3 => mp3_frame_len(s),
                _ => adts_frame_len(s),
            };
            // Look for a sync in the first 4 KiB after the tag, confirmed by the next frame.
            let end = b.len().min(start + 4096);
            for i in start..end {
                if b.len() < i + 8 {
                    return None;
                }
                if let Some(n) = frame(&b[i..]) {
                    if b.len() < i + n + 8 {
                        return None;
                    }
                    if frame(&b[i + n..]).is_some() {
                        return Some(true);
                    }
                }
            }
            if b.len() >= start + 4096 {
                Some(false)
            } else {
                None
            }
        }
    }
}

/// Bytes that do not start with an Ogg page header.
#[derive(Debug, PartialEq)]
pub struct NotOgg;

/// The length of the Ogg page at the start of `b`: `Ok(None)` if incomplete,
/// `Err` if `b` does not start with a page header.
pub fn page_len(b: &[u8]) -> Result<Option<usize>, NotOgg> {
    if b.len() < 27 {
        return if b"OggS".starts_with(&b[..b.len().min(4)]) {
            Ok(None)
        } else {
            Err(NotOgg)
        };
    }
    if &b[..4] != b"OggS" || b[4] != 0 {
        return Err(NotOgg);
    }
    let nseg = b[26] as usize;
    if b.len() < 27 + nseg {
        return Ok(None);
    }
    let body: usize = b[27..27 + nseg].iter().map(|&x| x as usize).sum();
    let len = 27 + nseg + body;
    Ok((b.len() >= len).then_some(len))
}

fn crc_table() -> &'static [u32; 256] {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut r = (i as u32) << 24;
            for _ in 0..8 {
                r = if r & 0x8000_0000 != 0 {
                    (r << 1) ^ 0x04C1_1DB7
                } else {
                    r << 1
                };
            }
            *e = r;
        }
        t
    })
}

/// Whether a whole page's CRC (bytes 22..26, computed with them zeroed) matches.
pub fn page_crc_ok(page: &[u8]) -> bool {
    if page.len() < 27 {
        return false;
    }
    let t = crc_table();
    let mut crc = 0u32;
    for (i, &x) in page.iter().enumerate() {
        let x = if (22..26).contains(&i) { 0 } else { x };
        crc = (crc << 8) ^ t[((crc >> 24) as u8 ^ x) as usize];
    }
    crc == u32::from_le_bytes([page[22], page[23], page[24], page[25]])
}

/// One Ogg page, as it arrived.
pub struct Page {
    pub bytes: Bytes,
}

impl Page {
    pub fn bos(&self) -> bool {
        self.bytes[5] & 2 != 0
    }
    pub fn granule(&self) -> u64 {
        u64::from_le_bytes(self.bytes[6..14].try_into().expect("8 bytes"))
    }
    /// The page body (its packets' data).
    pub fn body(&self) -> &[u8] {
        let nseg = self.bytes[26] as usize;
        &self.bytes[27 + nseg..]
    }
}

/// Splits a byte stream into whole Ogg pages.
#[derive(Default)]
pub struct PageSplitter {
    buf: BytesMut,
}

impl PageSplitter {
    /// Adds bytes; returns the pages now complete, or `Err` on a broken stream.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Page>, &'static str> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match page_len(&self.buf) {
                Ok(Some(n)) => {
                    let bytes = self.buf.split_to(n).freeze();
                    if !page_crc_ok(&bytes) {
                        return Err("Ogg page with a bad CRC");
                    }
                    out.push(Page { bytes });
                }
                Ok(None) => return Ok(out),
                Err(NotOgg) => return Err("not an Ogg page"),
            }
        }
    }
}

/// The title from a Vorbis or Opus comment header packet at the start of
/// `body`: `ARTIST - TITLE`, or `TITLE`.
pub fn comment_title(body: &[u8]) -> Option<String> {
    let rest = body
        .strip_prefix(b"OpusTags")
        .or_else(|| body.strip_prefix(b"\x03vorbis"))?;
    let mut r = rest;
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (a, b) = r.split_at(n);
        r = b;
        Some(a)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    let vendor = u32_at(take(4)?);
    take(vendor)?;
    let count = u32_at(take(4)?).min(1000);
    let (mut artist, mut title) = (None, None);
    for _ in 0..count {
        let n = u32_at(take(4)?);
        let c = String::from_utf8_lossy(take(n)?).into_owned();
        if let Some((k, v)) = c.split_once('=') {
            match k.to_ascii_uppercase().as_str() {
                "TITLE" => title = Some(v.to_owned()),
                "ARTIST" => artist = Some(v.to_owned()),
                _ => {}
            }
        }
    }
    match (artist, title) {
        (Some(a), Some(t)) => Some(format!("{a} - {t}")),
        (None, Some(t)) => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mp3_frame_lengths() {
        // MPEG-1 layer III, 128 kbps, 44.1 kHz, no padding: 417 bytes.
        assert_eq!(mp3_frame_len(&[0xFF, 0xFB, 0x90, 0x00]), Some(417));
        assert_eq!(mp3_frame_len(&[0xFF, 0xFB, 0x92, 0x00]), Some(418));
        assert_eq!(mp3_frame_len(&[0xFF, 0xFB, 0xF0, 0x00]), None);
        assert_eq!(mp3_frame_len(b"GET "), None);
        let mut two = vec![0u8; 417 * 2 + 8];
        two[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
        two[417..421].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
        assert_eq!(looks_like(Codec::Mp3, &two), Some(true));
        assert_eq!(looks_like(Codec::Mp3, &two[..100]), None);
        assert_eq!(looks_like(Codec::Mp3, &[b'x'; 5000]), Some(false));
    }

    #[test]
    fn ogg_pages_and_comments() {
        // A page carrying an OpusTags packet with ARTIST and TITLE.
        let mut pkt = b"OpusTags".to_vec();
        pkt.extend(3u32.to_le_bytes());
        pkt.extend(b"abc");
        pkt.extend(2u32.to_le_bytes());
        for c in ["artist=Кто", "TITLE=Песня"] {
            pkt.extend((c.len() as u32).to_le_bytes());
            pkt.extend(c.as_bytes());
        }
        let mut page = b"OggS\0\x02".to_vec();
        page.extend([0u8; 8]); // granule
        page.extend([1, 0, 0, 0, 0, 0, 0, 0]); // serial, seq
        page.extend([0u8; 4]); // crc
        page.push(1);
        page.push(pkt.len() as u8);
        page.extend(&pkt);
        let t = crc_table();
        let crc = page
            .iter()
            .fold(0u32, |c, &x| (c << 8) ^ t[((c >> 24) as u8 ^ x) as usize]);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        let mut s = PageSplitter::default();
        assert!(s.push(&page[..20]).unwrap().is_empty());
        let pages = s.push(&page[20..]).unwrap();
        assert_eq!(pages.len(), 1);
        assert!(pages[0].bos());
        assert_eq!(pages[0].granule(), 0);
        assert_eq!(
            comment_title(pages[0].body()).as_deref(),
            Some("Кто - Песня")
        );
        assert_eq!(looks_like(Codec::Ogg, &page), Some(true));
        page[40] ^= 1;
        assert_eq!(looks_like(Codec::Ogg, &page), Some(false));
        assert!(PageSplitter::default().push(&page).is_err());
        assert!(PageSplitter::default()
            .push(b"ID3 not ogg at all here....")
            .is_err());
    }
}
