//! Segmentation offload between the kernel and the engine.
//!
//! The TUN device is opened with `IFF_VNET_HDR` and TCP segmentation offload,
//! so the kernel hands over TCP data in blocks of up to 64 KiB (one read
//! instead of ~45) with a `virtio_net_hdr` in front; the engine cuts a block
//! into MTU-sized segments (IP/TCP headers rewritten, checksums computed)
//! before encrypting each. Encrypted segments to one peer leave in one
//! `sendmsg` with `UDP_SEGMENT`, and arrive through `UDP_GRO` in one
//! `recvmsg`. Fewer system calls per packet is what lets a userspace tunnel
//! keep up on a small board.

/// Length of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
/// The checksum of a packet we write was verified (the AEAD authenticated it).
pub const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// `SOL_UDP` socket options (Linux ABI, the same on every architecture).
pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;

#[derive(Debug, Clone, Copy, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> VnetHdr {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }
}

/// The header written before every packet handed to the kernel.
pub fn write_hdr(b: &mut [u8]) {
    b[..VNET_HDR_LEN].fill(0);
    b[0] = F_DATA_VALID;
}

/// RFC 1071 sum of `data` added to `sum` (not folded).
///
/// The data is summed as native-endian 32-bit words into a 64-bit
/// accumulator (no per-word byte swap, so the loop vectorises) and folded
/// once; the one's-complement sum does not depend on byte order (RFC 1071
/// section 2(B)), so a little-endian sum is the big-endian one byte-swapped.
fn sum16(data: &[u8], sum: u64) -> u64 {
    let mut acc = 0u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u32::from_ne_bytes(w.try_into().expect("4")) as u64;
    }
    let mut folded = fold16(acc);
    if cfg!(target_endian = "little") {
        folded = folded.swap_bytes();
    }
    let mut sum = sum + folded as u64;
    let mut rest = words.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// A sum folded to 16 bits (end-around carries added back).
fn fold16(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum of a sum: folded, then complemented.
fn fold(sum: u64) -> u16 {
    !fold16(sum)
}

/// The TCP/UDP pseudo-header sum for an IPv4 or IPv6 packet.
fn pseudo(pkt: &[u8], proto: u8, len: usize) -> u64 {
    let s = if pkt[0] >> 4 == 4 {
        sum16(&pkt[12..20], 0)
    } else {
        sum16(&pkt[8..40], 0)
    };
    s + proto as u64 + len as u64
}

/// Longest IP + TCP header of a segment (60-byte IPv4 or 40-byte IPv6
/// header, 60-byte TCP header).
const MAX_HLEN: usize = 120;

/// Calls `f` with every IP packet carried by one TUN read (`pkt` after the
/// virtio header), cutting TCP blocks into segments in place: segment `i`'s
/// headers are written over the end of segment `i - 1`'s payload (already
/// handed to `f`), so no payload is copied.
pub fn segments(hdr: &VnetHdr, pkt: &mut [u8], mut f: impl FnMut(&[u8])) {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE || hdr.gso_size == 0 {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = hdr.csum_start as usize;
            let at = start + hdr.csum_offset as usize;
            if at + 2 <= pkt.len() {
                let c = fold(sum16(&pkt[start..], 0));
                pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        f(pkt);
        return;
    }
    if gso != GSO_TCPV4 && gso != GSO_TCPV6 || pkt.len() < 40 {
        return; // not offered to the kernel; drop
    }
    let v4 = pkt[0] >> 4 == 4;
    let ip_len = if v4 { (pkt[0] & 0x0f) as usize * 4 } else { 40 };
    if pkt.len() < ip_len + 20 {
        return;
    }
    let tcp_len = (pkt[ip_len + 12] >> 4) as usize * 4;
    let hlen = ip_len + tcp_len;
    let mss = hdr.gso_size as usize;
    if pkt.len() < hlen || hlen > MAX_HLEN || mss == 0 {
        return;
    }
    let mut head = [0u8; MAX_HLEN];
    head[..hlen].copy_from_slice(&pkt[..hlen]);
    let head = &head[..hlen];
    let seq0 = u32::from_be_bytes(head[ip_len + 4..ip_len + 8].try_into().expect("4"));
    let id0 = u16::from_be_bytes([head[4], head[5]]);
    let flags0 = head[ip_len + 13];
    let payload = pkt.len() - hlen;
    let n = payload.div_ceil(mss);
    for i in 0..n {
        let off = i * mss;
        let len = mss.min(payload - off);
        let total = hlen + len;
        let s = &mut pkt[off..off + total];
        if i > 0 {
            s[..hlen].copy_from_slice(head);
        }
        if v4 {
            s[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            s[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            s[10..12].fill(0);
            let c = fold(sum16(&s[..ip_len], 0));
            s[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            s[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        let t = ip_len;
        s[t + 4..t + 8].copy_from_slice(&seq0.wrapping_add(off as u32).to_be_bytes());
        if i + 1 < n {
            s[t + 13] = flags0 & !(0x01 | 0x08); // FIN and PSH only on the last
        }
        s[t + 16..t + 18].fill(0);
        let c = fold(sum16(&s[t..total], pseudo(s, 6, total - t)));
        s[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        f(s);
    }
}

/// Merges consecutive TCP segments of one flow (decrypted from the tunnel)
/// into one block written with a virtio GSO header, so the kernel's TCP
/// stack handles one packet where the peer sent dozens (receive offload).
pub struct Coalescer {
    /// virtio header space, then the merged packet.
    buf: Vec<u8>,
    ip_len: usize,
    hlen: usize,
    mss: usize,
    next_seq: u32,
    count: usize,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self {
            buf: Vec::with_capacity(VNET_HDR_LEN + 65535),
            ip_len: 0,
            hlen: 0,
            mss: 0,
            next_seq: 0,
            count: 0,
            closed: false,
        }
    }
}

/// (IP header length, TCP header length) of a plain TCP segment that may be
/// merged: no fragments, no IPv6 extension headers, only ACK (and PSH) set.
fn mergeable(p: &[u8]) -> Option<(usize, usize)> {
    let ip_len = match p.first()? >> 4 {
        4 => {
            let l = (p[0] & 0x0f) as usize * 4;
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff;
            (p.get(9) == Some(&6) && frag == 0 && l == 20).then_some(l)?
        }
        6 => (p.get(6) == Some(&6)).then_some(40)?,
        _ => return None,
    };
    let flags = *p.get(ip_len + 13)?;
    if flags & !0x18 != 0 || flags & 0x10 == 0 {
        return None;
    }
    let tcp_len = (p[ip_len + 12] >> 4) as usize * 4;
    (p.len() > ip_len + tcp_len).then_some((ip_len, tcp_len))
}

impl Coalescer {
    /// Adds a decrypted packet; packets that cannot join are written through `write`.
    pub fn push(&mut self, p: &[u8], write: &mut impl FnMut(&[u8])) {
        if self.count > 0 && !self.closed && self.fits(p) {
            let t = self.ip_len;
            let payload = &p[self.hlen..];
            self.buf.extend_from_slice(payload);
            self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
            self.count += 1;
            // PSH or a short segment ends the block.
            let at = VNET_HDR_LEN + t + 13;
            self.buf[at] |= p[t + 13];
            self.closed = p[t + 13] & 0x08 != 0 || payload.len() < self.mss;
            return;
        }
        self.flush(write);
        match mergeable(p) {
            Some((ip_len, tcp_len)) => {
                self.buf.clear();
                self.buf.resize(VNET_HDR_LEN, 0);
                self.buf.extend_from_slice(p);
                self.ip_len = ip_len;
                self.hlen = ip_len + tcp_len;
                self.mss = p.len() - self.hlen;
                let seq = u32::from_be_bytes(p[ip_len + 4..ip_len + 8].try_into().expect("4"));
                self.next_seq = seq.wrapping_add(self.mss as u32);
                self.count = 1;
                self.closed = p[ip_len + 13] & 0x08 != 0;
            }
            None => {
                self.buf.clear();
                self.buf.resize(VNET_HDR_LEN, 0);
                self.buf.extend_from_slice(p);
                write_hdr(&mut self.buf);
                write(&self.buf);
                self.buf.clear();
            }
        }
    }

    fn fits(&self, p: &[u8]) -> bool {
        let head = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.hlen];
        let (t, h) = (self.ip_len, self.hlen);
        if p.len() <= h
            || p.len() - h > self.mss
            || self.buf.len() - VNET_HDR_LEN + p.len() - h > 65535 - 100
            || mergeable(p) != Some((t, h - t))
        {
            return false;
        }
        let seq = u32::from_be_bytes(p[t + 4..t + 8].try_into().expect("4"));
        if seq != self.next_seq {
            return false;
        }
        // Every header byte equal but lengths, ids, checksums, seq and flags.
        let same = |a: usize, b: usize| head[a..b] == p[a..b];
        let ip_same = if t == 20 {
            same(0, 2) && same(6, 10) && same(12, 20)
        } else {
            same(0, 4) && same(6, 40)
        };
        ip_same && same(t, t + 4) && same(t + 8, t + 13) && same(t + 14, t + 16) && same(t + 18, h)
    }

    /// Writes the block (with a GSO header when it merged several segments).
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        if self.count == 0 {
            return;
        }
        let (t, total) = (self.ip_len, self.buf.len() - VNET_HDR_LEN);
        if self.count == 1 {
            write_hdr(&mut self.buf);
        } else {
            let p = &mut self.buf[VNET_HDR_LEN..];
            let v4 = t == 20;
            if v4 {
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[10..12].fill(0);
                let c = fold(sum16(&p[..20], 0));
                p[10..12].copy_from_slice(&c.to_be_bytes());
            } else {
                p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            }
            // The kernel completes the TCP checksum from the pseudo-header sum.
            let partial = !fold(pseudo(p, 6, total - t));
            p[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
            let h = &mut self.buf[..VNET_HDR_LEN];
            h[0] = F_NEEDS_CSUM;
            h[1] = if v4 { GSO_TCPV4 } else { GSO_TCPV6 };
            h[2..4].copy_from_slice(&(self.hlen as u16).to_ne_bytes());
            h[4..6].copy_from_slice(&(self.mss as u16).to_ne_bytes());
            h[6..8].copy_from_slice(&(t as u16).to_ne_bytes());
            h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        }
        write(&self.buf);
        self.buf.clear();
        self.count = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 packet with correct checksums.
    fn tcp4(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        let total = (40 + payload.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&1234u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p.extend_from_slice(payload);
        let c = fold(sum16(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let c = fold(sum16(&p[20..], pseudo(&p, 6, p.len() - 20)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// RFC 1071 the slow way: big-endian 16-bit words, odd byte padded.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut sum = 0u64;
        for c in data.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
        }
        fold(sum)
    }

    #[test]
    fn the_fast_sum_agrees_with_rfc_1071() {
        let mut x = 0x1234_5678u32;
        for len in (0..70).chain([1419, 1420, 1421, 9000, 65535]) {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            assert_eq!(fold(sum16(&data, 0)), reference_sum(&data), "length {len}");
            let ones = vec![0xffu8; len];
            assert_eq!(fold(sum16(&ones, 0)), reference_sum(&ones), "0xff × {len}");
        }
    }

    #[test]
    fn a_tso_block_becomes_the_segments_tcp_would_have_sent() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 31) as u8).collect();
        let mut block = tcp4(&payload, 1000, 0x18); // PSH|ACK
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut got = Vec::new();
        segments(&hdr, &mut block, |s| got.push(s.to_vec()));
        assert_eq!(got.len(), 3);
        for (i, s) in got.iter().enumerate() {
            let off = i * 1400;
            let len = 1400.min(3000 - off);
            let want = tcp4(
                &payload[off..off + len],
                1000 + off as u32,
                if i == 2 { 0x18 } else { 0x10 },
            );
            // Same bytes except the IP id, which counts up.
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
            let mut w = want.clone();
            w[4..6].copy_from_slice(&s[4..6]);
            w[10..12].fill(0);
            let c = fold(sum16(&w[..20], 0));
            w[10..12].copy_from_slice(&c.to_be_bytes());
            assert_eq!(s, &w, "segment {i}");
            // Checksums verify to zero.
            assert_eq!(fold(sum16(&s[..20], 0)), 0);
            assert_eq!(fold(sum16(&s[20..], pseudo(s, 6, s.len() - 20))), 0);
        }
    }

    #[test]
    fn consecutive_segments_merge_back_into_one_block() {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 13) as u8).collect();
        let mut block = tcp4(&payload, 5000, 0x18);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut segs = Vec::new();
        segments(&hdr, &mut block, |s| segs.push(s.to_vec()));
        assert_eq!(segs.len(), 4);
        let mut c = Coalescer::default();
        let mut written: Vec<Vec<u8>> = Vec::new();
        let mut w = |b: &[u8]| written.push(b.to_vec());
        for s in &segs {
            c.push(s, &mut w);
        }
        // An unrelated packet (another flow) is written on its own after the block.
        let other = tcp4(b"x", 1, 0x10);
        let mut other_flow = other.clone();
        other_flow[20..22].copy_from_slice(&999u16.to_be_bytes());
        c.push(&other_flow, &mut w);
        c.flush(&mut w);
        assert_eq!(written.len(), 2);
        let h = VnetHdr::parse(&written[0]);
        assert_eq!((h.gso_type, h.gso_size, h.hdr_len), (GSO_TCPV4, 1000, 40));
        let merged = &written[0][VNET_HDR_LEN..];
        assert_eq!(&merged[40..], &payload[..]);
        assert_eq!(merged[33], 0x18, "PSH of the last segment kept");
        // Cut again by the same rules, it gives the segments back.
        let mut again = merged.to_vec();
        let mut back = Vec::new();
        segments(&h, &mut again, |s| back.push(s.to_vec()));
        assert_eq!(back, segs);
        assert_eq!(VnetHdr::parse(&written[1]).gso_type, GSO_NONE);
        assert_eq!(&written[1][VNET_HDR_LEN..], &other_flow[..]);
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut p = tcp4(b"hello", 1, 0x18);
        let good = p.clone();
        // What the kernel leaves: the pseudo-header sum, not complemented.
        let partial = !fold(pseudo(&p, 6, p.len() - 20));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = Vec::new();
        segments(&hdr, &mut p, |s| out = s.to_vec());
        assert_eq!(out, good);
    }
}
