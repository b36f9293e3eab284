//! The tunnel engine: one WireGuard interface on a TUN device.
//!
//! `workers` threads each own one TUN queue and one UDP socket (all bound to
//! the listen port with `SO_REUSEPORT`), so different peers and flows are
//! spread over cores. A timer thread drives boringtun's timers (handshakes,
//! rekeys, keepalives) every 250 ms and resets the rate limiter.
//!
//! Each peer's `Tunn` sits behind its own mutex, so one peer's packets are
//! encrypted one at a time while other peers proceed in parallel (as in
//! boringtun's own device). Incoming handshakes go through the interface's
//! rate limiter first (cookie replies under load) before any Diffie-Hellman
//! is spent on them; datagrams for unknown peers or indices are dropped and
//! counted; a decrypted packet whose source address is not among its peer's
//! AllowedIPs is dropped (cryptokey routing).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use boringtun::{
    noise::{handshake::parse_handshake_anon, rate_limiter::RateLimiter, Packet, Tunn, TunnResult},
    x25519,
};
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    gso::{self, Coalescer, VnetHdr, VNET_HDR_LEN},
    keys::{PublicKey, SecretKey},
    obfs::Obfuscation,
    tun::{self, Tun, TunError},
};

/// Room before boringtun's output for S1/S2 padding.
const PAD: usize = crate::obfs::MAX_JUNK;
const BUF: usize = 65536;
const BATCH: usize = 64;
/// Most datagrams in one `UDP_SEGMENT` send (the kernel's limit is 64).
const MAX_SEGMENTS: usize = 64;

/// Most bytes of datagrams in one `UDP_SEGMENT` send.
const MAX_BATCH_BYTES: usize = 65000;

/// Encrypted data messages to one peer, of one size (the last may be
/// shorter), to leave in one send. boringtun encrypts straight into the free
/// tail of `buf`, so a message is never copied after encryption.
struct TxBatch {
    /// `len` bytes of datagrams, then room for the next one.
    buf: Vec<u8>,
    len: usize,
    seg: usize,
    count: usize,
    last_short: bool,
    dest: Option<(SocketAddr, Arc<Peer>)>,
    /// The peer (and its endpoint) of the last TUN read's destination, with
    /// `Shared::generation` when it was looked up (forgotten after a wakeup).
    route: Option<(IpAddr, Arc<Peer>, Option<SocketAddr>, u64)>,
}

impl Default for TxBatch {
    fn default() -> Self {
        Self {
            // A full batch, then the largest message one TUN read can give
            // (a packet of BUF bytes and boringtun's 32 bytes).
            buf: vec![0u8; MAX_BATCH_BYTES + BUF + 32],
            len: 0,
            seg: 0,
            count: 0,
            last_short: false,
            dest: None,
            route: None,
        }
    }
}

impl TxBatch {
    /// Whether a datagram of `n` bytes to `to` may join this batch.
    fn fits(&self, n: usize, to: SocketAddr) -> bool {
        match &self.dest {
            None => true,
            Some((t, _)) => {
                *t == to
                    && !self.last_short
                    && n <= self.seg
                    && self.count < MAX_SEGMENTS
                    && self.len + n <= MAX_BATCH_BYTES
            }
        }
    }

    /// Takes the `n` bytes written at the tail as the batch's next datagram
    /// (after [`TxBatch::fits`] said they may join).
    fn commit(&mut self, n: usize, to: SocketAddr, peer: &Arc<Peer>) {
        if self.dest.is_none() {
            self.dest = Some((to, peer.clone()));
            self.seg = n;
        } else {
            self.last_short = n < self.seg;
        }
        self.len += n;
        self.count += 1;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
        self.seg = 0;
        self.last_short = false;
        self.dest = None;
    }
}

/// What a worker remembers of the peer its last data messages came from.
/// Valid while [`Shared::generation`] (bumped on every change of peers or
/// AllowedIPs) stays the same; saves a lock and a table lookup per packet.
#[derive(Default)]
struct RxCache {
    generation: u64,
    /// Receiver index (without the session bits) and its peer.
    peer: Option<(u32, Arc<Peer>)>,
    /// A source address found among that peer's AllowedIPs.
    allowed_from: Option<IpAddr>,
    /// Bytes received from the peer, not yet added to its counter.
    rx_pending: u64,
    /// Where the peer's last authenticated data message came from, not yet
    /// recorded as its endpoint.
    endpoint_pending: Option<SocketAddr>,
}

impl RxCache {
    /// Records what is pending on the cached peer (counter, endpoint).
    fn settle(&mut self) {
        if let Some((_, peer)) = &self.peer {
            if self.rx_pending > 0 {
                peer.rx.fetch_add(self.rx_pending, Ordering::Relaxed);
                self.rx_pending = 0;
            }
            if let Some(src) = self.endpoint_pending.take() {
                set_endpoint(peer, src);
            }
        }
    }

    /// The peer of a data message's receiver index.
    fn peer(&mut self, shared: &Shared, index: u32) -> Option<Arc<Peer>> {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.settle();
            *self = RxCache {
                generation,
                ..Default::default()
            };
        }
        if let Some((i, p)) = &self.peer {
            if *i == index {
                return Some(p.clone());
            }
        }
        self.settle();
        let p = shared.peers.read().by_index.get(&index).cloned()?;
        self.peer = Some((index, p.clone()));
        self.allowed_from = None;
        Some(p)
    }
}

/// Records where a peer's last authenticated message came from (roaming).
fn set_endpoint(peer: &Peer, src: SocketAddr) {
    if *peer.endpoint.read() != Some(src) {
        *peer.endpoint.write() = Some(src);
    }
}

fn tun_write(name: &str, fd: i32, b: &[u8]) {
    if let Err(e) = tun::write_fd(fd, b) {
        tracing::trace!(iface = %name, error = %e, "TUN write failed");
    }
}

/// One `sendmsg` of `buf` cut by the kernel into `seg`-byte datagrams.
fn send_segments(sock: &UdpSocket, buf: &[u8], seg: usize, to: SocketAddr) -> io::Result<()> {
    let addr = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg of CMSG_SPACE(2) bytes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = gso::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
    // SAFETY: msg is fully initialised and points at live buffers.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to coalesce arriving datagrams (`UDP_GRO`); whether it will.
fn enable_udp_gro(sock: &UdpSocket) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            gso::UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        ) == 0
    }
}

/// Receives one datagram, or with GRO several of `seg` bytes each (`seg` = 0: one).
fn recv_segments(
    sock: &UdpSocket,
    buf: &mut [u8],
    gro: bool,
) -> io::Result<(usize, usize, SocketAddr)> {
    if !gro {
        let (n, from) = sock.recv_from(buf)?;
        return Ok((n, 0, from));
    }
    let mut storage = socket2::SockAddrStorage::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; the pointers set below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_namelen = storage.size_of();
    // SAFETY: a SockAddrStorage is a sockaddr_storage.
    msg.msg_name =
        unsafe { storage.view_as::<libc::sockaddr_storage>() } as *mut _ as *mut libc::c_void;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut seg = 0usize;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == gso::UDP_GRO {
                seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>()) as usize;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // SAFETY: the kernel filled `storage` with msg_namelen bytes of an address.
    let addr = unsafe { socket2::SockAddr::new(storage, msg.msg_namelen) };
    let from = addr
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP source"))?;
    Ok((n as usize, seg, from))
}

/// A peer as configured.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
        }
    }
}

/// An interface as configured.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The TUN interface name.
    pub name: String,
    pub private_key: SecretKey,
    /// UDP port (0: any free port).
    pub listen_port: u16,
    /// `SO_MARK` on the UDP sockets (0: none).
    pub fwmark: u32,
    pub peers: Vec<PeerConfig>,
    pub obfuscation: Obfuscation,
    pub workers: usize,
    /// Handshakes per second before cookie replies are demanded.
    pub handshake_rate_limit: u64,
}

impl DeviceConfig {
    pub fn new(name: &str, private_key: SecretKey) -> Self {
        Self {
            name: name.to_owned(),
            private_key,
            listen_port: 0,
            fwmark: 0,
            peers: Vec::new(),
            obfuscation: Obfuscation::default(),
            workers: 2,
            handshake_rate_limit: 100,
        }
    }
}

/// What `wg show` shows of a peer.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

/// Counters of what was dropped, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Handshakes from keys that are not peers.
    pub unknown_peer: u64,
    /// Datagrams naming no current session, failing MACs, or malformed.
    pub invalid: u64,
    /// Decrypted packets from addresses outside the peer's AllowedIPs.
    pub bad_source: u64,
    /// Packets from the TUN for addresses no peer routes.
    pub no_route: u64,
    /// Cookie replies sent because of handshake load.
    pub cookies_sent: u64,
    /// Datagrams not recognised as obfuscated messages.
    pub junk: u64,
}

#[derive(Default)]
struct DropCounters {
    unknown_peer: AtomicU64,
    invalid: AtomicU64,
    bad_source: AtomicU64,
    no_route: AtomicU64,
    cookies_sent: AtomicU64,
    junk: AtomicU64,
}

struct Peer {
    cfg: RwLock<PeerConfig>,
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    rx: AtomicU64,
    tx: AtomicU64,
    /// Start a handshake on the next timer tick.
    kick: AtomicBool,
}

struct Peers {
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: IpNetworkTable<Arc<Peer>>,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: IpNetworkTable::new(),
        }
    }
}

impl Peers {
    fn rebuild_routes(&mut self) {
        let mut t = IpNetworkTable::new();
        for p in self.by_key.values() {
            for n in &p.cfg.read().allowed_ips {
                if let Ok(net) = IpNetwork::new(n.network(), n.prefix_len()) {
                    t.insert(net, p.clone());
                }
            }
        }
        self.routes = t;
    }
}

struct Identity {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    key: SecretKey,
}

struct Shared {
    name: String,
    identity: RwLock<Identity>,
    peers: RwLock<Peers>,
    obfs: Obfuscation,
    limiter: RwLock<Arc<RateLimiter>>,
    rate_limit: u64,
    sockets: Vec<UdpSocket>,
    v6: bool,
    port: u16,
    fwmark: AtomicU32,
    /// The kernel takes `UDP_SEGMENT` sends (turned off at the first refusal).
    udp_gso: AtomicBool,
    tun: Tun,
    stop: AtomicBool,
    next_index: AtomicU32,
    drops: DropCounters,
    /// Bumped whenever peers or AllowedIPs change (invalidates `RxCache`s).
    generation: AtomicU64,
}

/// A running interface. Stops (and its TUN device disappears) when dropped.
pub struct Device {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why an interface could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("UDP port {port} for {name}: {err}")]
    Socket {
        name: String,
        port: u16,
        err: io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn make_socket(port: u16, v6: bool, fwmark: u32) -> io::Result<Socket> {
    let (domain, addr): (Domain, SocketAddr) = if v6 {
        (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into())
    } else {
        (Domain::IPV4, ([0, 0, 0, 0], port).into())
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(false)?;
    }
    s.set_reuse_port(true)?;
    if fwmark != 0 {
        s.set_mark(fwmark)?;
    }
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn bind_sockets(n: usize, port: u16, fwmark: u32) -> io::Result<(Vec<UdpSocket>, bool, u16)> {
    // Dual-stack first; IPv4 alone where IPv6 is off.
    let v6 = make_socket(port, true, fwmark).is_ok_and(|s| {
        drop(s);
        true
    });
    let first = make_socket(port, v6, fwmark)?;
    let port = first.local_addr()?.as_socket().map_or(port, |a| a.port());
    let mut out = vec![UdpSocket::from(first)];
    for _ in 1..n {
        out.push(UdpSocket::from(make_socket(port, v6, fwmark)?));
    }
    Ok((out, v6, port))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

impl Shared {
    fn new_peer(&self, cfg: PeerConfig) -> Result<Arc<Peer>, DeviceError> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let id = self.identity.read();
        let tunn = Tunn::new(
            id.secret.clone(),
            cfg.public_key.x25519(),
            cfg.preshared_key.as_ref().map(SecretKey::bytes),
            cfg.persistent_keepalive.filter(|k| *k > 0),
            index,
            None,
        )
        .map_err(|e| DeviceError::Config(format!("peer {}: {e}", cfg.public_key)))?;
        let endpoint = cfg.endpoint;
        let kick = cfg.persistent_keepalive.is_some_and(|k| k > 0);
        Ok(Arc::new(Peer {
            kick: AtomicBool::new(kick),
            cfg: RwLock::new(cfg),
            index,
            tunn: Mutex::new(tunn),
            endpoint: RwLock::new(endpoint),
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
        }))
    }

    fn dest(&self, a: SocketAddr) -> SocketAddr {
        match (a, self.v6) {
            (SocketAddr::V4(v4), true) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => a,
        }
    }

    /// Sends boringtun's message in `buf[PAD..PAD+len]` (obfuscated if set).
    fn send(&self, sock: &UdpSocket, buf: &mut [u8], len: usize, to: SocketAddr) -> usize {
        let (start, n, junk) = self.obfs.wrap(buf, PAD, len);
        let to = self.dest(to);
        if junk {
            for j in self.obfs.junk() {
                let _ = sock.send_to(&j, to);
            }
        }
        match sock.send_to(&buf[start..start + n], to) {
            Ok(_) => n,
            Err(e) => {
                tracing::debug!(iface = %self.name, error = %e, "UDP send failed");
                0
            }
        }
    }

    fn peer_by_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .by_index
            .get(&(receiver_idx >> 8))
            .cloned()
    }

    /// The peer routing `dst` and its endpoint, or `None` (counted) when no peer does.
    fn route(&self, dst: IpAddr) -> Option<(Arc<Peer>, Option<SocketAddr>)> {
        let found = self
            .peers
            .read()
            .routes
            .longest_match(dst)
            .map(|(_, p)| p.clone());
        let Some(p) = found else {
            self.drops.no_route.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let ep = *p.endpoint.read();
        Some((p, ep))
    }

    /// A packet read from the TUN device, for `peer`: encrypted straight into
    /// the batch (sent together); a handshake (no session yet) goes at once.
    fn from_tun(
        &self,
        sock: &UdpSocket,
        pkt: &[u8],
        peer: &Arc<Peer>,
        ep: Option<SocketAddr>,
        out: &mut [u8],
        batch: &mut TxBatch,
    ) {
        // A data message is the packet with a 16-byte header and a 16-byte tag.
        let n = pkt.len() + 32;
        let to = ep.map(|e| self.dest(e));
        if let Some(to) = to {
            if !batch.fits(n, to) {
                self.flush(sock, batch);
            }
        }
        let at = batch.len;
        // Room for a handshake initiation too (sent instead when there is no session).
        let room = n.max(crate::obfs::INIT_LEN);
        let len = match peer
            .tunn
            .lock()
            .encapsulate(pkt, &mut batch.buf[at..at + room])
        {
            TunnResult::WriteToNetwork(p) => p.len(),
            TunnResult::Err(e) => {
                tracing::trace!(iface = %self.name, error = ?e, "encapsulate failed");
                return;
            }
            _ => return,
        };
        let (Some(ep), Some(to)) = (ep, to) else {
            return;
        };
        let data = batch.buf[at..at + 4] == (crate::obfs::DATA).to_le_bytes();
        if data && len == n {
            if self.obfs.is_on() {
                self.obfs.wrap(&mut batch.buf, at, len);
            }
            batch.commit(len, to, peer);
        } else {
            out[PAD..PAD + len].copy_from_slice(&batch.buf[at..at + len]);
            self.flush(sock, batch);
            let n = self.send(sock, out, len, ep);
            peer.tx.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Sends the batched datagrams: one `sendmsg` with `UDP_SEGMENT` when there
    /// are several (falling back to one call each where the kernel refuses).
    fn flush(&self, sock: &UdpSocket, batch: &mut TxBatch) {
        let Some((to, peer)) = batch.dest.take() else {
            return;
        };
        let datagrams = &batch.buf[..batch.len];
        let sent = if batch.count > 1 && self.udp_gso.load(Ordering::Relaxed) {
            match send_segments(sock, datagrams, batch.seg, to) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(iface = %self.name, error = %e, "UDP segmentation offload refused; sending one by one");
                    self.udp_gso.store(false, Ordering::Relaxed);
                    false
                }
            }
        } else {
            false
        };
        if !sent {
            for d in datagrams.chunks(batch.seg) {
                if let Err(e) = sock.send_to(d, to) {
                    tracing::debug!(iface = %self.name, error = %e, "UDP send failed");
                }
            }
        }
        peer.tx.fetch_add(batch.len as u64, Ordering::Relaxed);
        batch.clear();
    }

    /// Whether `from` is among `peer`'s AllowedIPs (cryptokey routing).
    fn allowed(&self, peer: &Arc<Peer>, from: IpAddr) -> bool {
        self.peers
            .read()
            .routes
            .longest_match(from)
            .is_some_and(|(_, p)| Arc::ptr_eq(p, peer))
    }

    /// A datagram from the network. Data messages find their peer through
    /// the worker's `cache`; their counters and endpoint are recorded when
    /// the cache settles (after each receive).
    #[allow(clippy::too_many_arguments)]
    fn from_udp(
        &self,
        sock: &UdpSocket,
        buf: &mut [u8],
        src: SocketAddr,
        out: &mut [u8],
        rx: &mut Coalescer,
        cache: &mut RxCache,
        write: &mut impl FnMut(&[u8]),
    ) {
        let (start, len) = if self.obfs.is_on() {
            match self.obfs.unwrap(buf) {
                Some(r) => r,
                None => {
                    self.drops.junk.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            (0, buf.len())
        };
        let datagram = &buf[start..start + len];
        let wire_len = buf.len() as u64;
        let is_data = datagram.len() >= crate::obfs::DATA_MIN_LEN
            && datagram[..4] == (crate::obfs::DATA).to_le_bytes();
        let peer = if is_data {
            let index = u32::from_le_bytes(datagram[4..8].try_into().expect("4 bytes")) >> 8;
            cache.peer(self, index)
        } else {
            let limiter = self.limiter.read().clone();
            match limiter.verify_packet(Some(src.ip()), datagram, &mut out[PAD..]) {
                Ok(Packet::HandshakeInit(p)) => {
                    let half = {
                        let id = self.identity.read();
                        parse_handshake_anon(&id.secret, &id.public, &p)
                    };
                    let Ok(half) = half else {
                        self.drops.invalid.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let key = PublicKey(half.peer_static_public);
                    let found = self.peers.read().by_key.get(&key).cloned();
                    if found.is_none() {
                        self.drops.unknown_peer.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(iface = %self.name, peer = %key.short(), from = %src, "handshake from an unknown key dropped");
                        return;
                    }
                    found
                }
                Ok(Packet::HandshakeResponse(p)) => self.peer_by_index(p.receiver_idx),
                Ok(Packet::PacketCookieReply(p)) => self.peer_by_index(p.receiver_idx),
                Ok(Packet::PacketData(p)) => self.peer_by_index(p.receiver_idx),
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let n = cookie.len();
                    self.drops.cookies_sent.fetch_add(1, Ordering::Relaxed);
                    self.send(sock, out, n, src);
                    return;
                }
                Err(_) => {
                    self.drops.invalid.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        let Some(peer) = peer else {
            // An index no session of ours has (old, forged, or a removed peer).
            self.drops.invalid.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut tunn = peer.tunn.lock();
        let mut res = tunn.decapsulate(Some(src.ip()), datagram, &mut out[PAD..]);
        let mut authenticated = false;
        let mut deliver = None;
        loop {
            match res {
                TunnResult::WriteToNetwork(p) => {
                    authenticated = true;
                    let n = p.len();
                    let sent = self.send(sock, out, n, src);
                    peer.tx.fetch_add(sent as u64, Ordering::Relaxed);
                    res = tunn.decapsulate(None, &[], &mut out[PAD..]);
                }
                TunnResult::WriteToTunnelV4(p, from) => {
                    authenticated = true;
                    deliver = Some((p.as_ptr() as usize, p.len(), IpAddr::V4(from)));
                    break;
                }
                TunnResult::WriteToTunnelV6(p, from) => {
                    authenticated = true;
                    deliver = Some((p.as_ptr() as usize, p.len(), IpAddr::V6(from)));
                    break;
                }
                TunnResult::Done => {
                    authenticated = true;
                    break;
                }
                TunnResult::Err(e) => {
                    self.drops.invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(iface = %self.name, error = ?e, "decapsulate failed");
                    break;
                }
            }
        }
        drop(tunn);
        if let Some((ptr, len, from)) = deliver {
            let off = ptr - out.as_ptr() as usize;
            // Hands the packet to the TUN device (through the receive
            // coalescer) if its source is one of the peer's AllowedIPs.
            let allowed = if is_data && cache.allowed_from == Some(from) {
                true
            } else {
                let ok = self.allowed(&peer, from);
                if ok && is_data {
                    cache.allowed_from = Some(from);
                }
                ok
            };
            if allowed {
                rx.push(&out[off..off + len], write);
            } else {
                self.drops.bad_source.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(iface = %self.name, %from, "packet from outside the peer's AllowedIPs dropped");
            }
        }
        if authenticated {
            if is_data {
                cache.rx_pending += wire_len;
                cache.endpoint_pending = Some(src);
            } else {
                peer.rx.fetch_add(wire_len, Ordering::Relaxed);
                set_endpoint(&peer, src);
            }
        }
    }

    fn worker(self: Arc<Self>, i: usize) {
        let sock = &self.sockets[i];
        let tun_fd = self.tun.fd(i);
        let sock_fd = sock.as_raw_fd();
        let gro = enable_udp_gro(sock);
        let mut inbuf = vec![0u8; BUF + VNET_HDR_LEN];
        let mut out = vec![0u8; PAD + BUF];
        let mut batch = TxBatch::default();
        let mut rx = Coalescer::default();
        let mut cache = RxCache::default();
        let mut write = |b: &[u8]| tun_write(&self.name, tun_fd, b);
        while !self.stop.load(Ordering::Relaxed) {
            let [tun_ready, udp_ready] = tun::poll_readable([tun_fd, sock_fd], 200);
            if tun_ready {
                for _ in 0..BATCH {
                    match tun::read_fd(tun_fd, &mut inbuf) {
                        Ok(Some(n)) if n > VNET_HDR_LEN => {
                            let hdr = VnetHdr::parse(&inbuf[..VNET_HDR_LEN]);
                            let pkt = &mut inbuf[VNET_HDR_LEN..n];
                            // Segments of one TUN read share their destination.
                            let Some(dst) = Tunn::dst_address(pkt) else {
                                continue;
                            };
                            let generation = self.generation.load(Ordering::Acquire);
                            let route = match &batch.route {
                                Some((ip, p, ep, g)) if *ip == dst && *g == generation => {
                                    Some((p.clone(), *ep))
                                }
                                _ => self.route(dst),
                            };
                            let Some((peer, ep)) = route else {
                                continue;
                            };
                            batch.route = Some((dst, peer.clone(), ep, generation));
                            gso::segments(&hdr, pkt, |seg| {
                                self.from_tun(sock, seg, &peer, ep, &mut out, &mut batch)
                            });
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(iface = %self.name, error = %e, "TUN read failed");
                            std::thread::sleep(Duration::from_millis(50));
                            break;
                        }
                    }
                }
                batch.route = None;
                self.flush(sock, &mut batch);
            }
            if udp_ready {
                for _ in 0..BATCH {
                    match recv_segments(sock, &mut inbuf, gro) {
                        Ok((n, seg, src)) => {
                            let src = canonical(src);
                            let seg = if seg == 0 { n } else { seg };
                            let mut at = 0;
                            while at < n {
                                let end = (at + seg).min(n);
                                self.from_udp(
                                    sock,
                                    &mut inbuf[at..end],
                                    src,
                                    &mut out,
                                    &mut rx,
                                    &mut cache,
                                    &mut write,
                                );
                                at = end;
                            }
                            cache.settle();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // ICMP errors (port unreachable) surface here; not fatal.
                            tracing::trace!(iface = %self.name, error = %e, "UDP receive error");
                            break;
                        }
                    }
                }
                rx.flush(&mut write);
            }
        }
    }

    fn timers(self: Arc<Self>) {
        let mut out = vec![0u8; PAD + BUF];
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            self.limiter.read().reset_count();
            let peers: Vec<Arc<Peer>> = self.peers.read().by_key.values().cloned().collect();
            for peer in peers {
                let mut tunn = peer.tunn.lock();
                // A peer with a keepalive (a box link behind NAT, an exit) is
                // dialled at once rather than at its first keepalive.
                let kick =
                    peer.kick.swap(false, Ordering::Relaxed) && peer.endpoint.read().is_some();
                let res = if kick {
                    tunn.format_handshake_initiation(&mut out[PAD..], false)
                } else {
                    tunn.update_timers(&mut out[PAD..])
                };
                let len = match res {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => continue,
                };
                drop(tunn);
                let ep = *peer.endpoint.read();
                if let Some(ep) = ep {
                    let n = self.send(&self.sockets[0], &mut out, len, ep);
                    peer.tx.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Device {
    /// Creates the TUN interface and the UDP sockets and starts the threads.
    /// The interface's addresses and routes are the caller's business.
    pub fn start(cfg: DeviceConfig) -> Result<Arc<Device>, DeviceError> {
        let problems = cfg.obfuscation.problems();
        if !problems.is_empty() {
            return Err(DeviceError::Config(problems.join("; ")));
        }
        let workers = cfg.workers.clamp(1, 64);
        let tun = Tun::create(&cfg.name, workers)?;
        let (sockets, v6, port) =
            bind_sockets(workers, cfg.listen_port, cfg.fwmark).map_err(|err| {
                DeviceError::Socket {
                    name: cfg.name.clone(),
                    port: cfg.listen_port,
                    err,
                }
            })?;
        let secret = cfg.private_key.x25519();
        let public = x25519::PublicKey::from(&secret);
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            limiter: RwLock::new(Arc::new(RateLimiter::new(
                &public,
                cfg.handshake_rate_limit,
            ))),
            rate_limit: cfg.handshake_rate_limit,
            identity: RwLock::new(Identity {
                secret,
                public,
                key: cfg.private_key.clone(),
            }),
            peers: RwLock::new(Peers::default()),
            obfs: cfg.obfuscation,
            sockets,
            v6,
            port,
            fwmark: AtomicU32::new(cfg.fwmark),
            udp_gso: AtomicBool::new(true),
            tun,
            stop: AtomicBool::new(false),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            drops: DropCounters::default(),
            generation: AtomicU64::new(0),
        });
        let dev = Arc::new(Device {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        });
        for p in cfg.peers {
            dev.set_peer(p, false)?;
        }
        let mut threads = dev.threads.lock();
        for i in 0..workers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wg-{}-{i}", cfg.name))
                    .spawn(move || s.worker(i))
                    .map_err(|e| DeviceError::Config(e.to_string()))?,
            );
        }
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("wg-{}-timers", cfg.name))
                .spawn(move || s.timers())
                .map_err(|e| DeviceError::Config(e.to_string()))?,
        );
        drop(threads);
        tracing::info!(iface = %cfg.name, port, workers, peers = dev.shared.peers.read().by_key.len(), obfuscated = cfg.obfuscation.is_on(), "WireGuard interface up");
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.port
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.shared.identity.read().public.to_bytes())
    }

    pub(crate) fn private_key(&self) -> SecretKey {
        self.shared.identity.read().key.clone()
    }

    pub fn fwmark(&self) -> u32 {
        self.shared.fwmark.load(Ordering::Relaxed)
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        for s in &self.shared.sockets {
            socket2::SockRef::from(s).set_mark(mark)?;
        }
        self.shared.fwmark.store(mark, Ordering::Relaxed);
        Ok(())
    }

    /// Replaces the interface's private key; every peer starts a fresh session.
    pub fn set_private_key(&self, key: SecretKey) {
        let secret = key.x25519();
        let public = x25519::PublicKey::from(&secret);
        *self.shared.limiter.write() = Arc::new(RateLimiter::new(&public, self.shared.rate_limit));
        *self.shared.identity.write() = Identity {
            secret: secret.clone(),
            public,
            key,
        };
        let peers = self.shared.peers.read();
        for p in peers.by_key.values() {
            let _ = p
                .tunn
                .lock()
                .set_static_private(secret.clone(), public, None);
        }
    }

    /// Adds a peer or updates one. With `merge_allowed_ips` the given AllowedIPs
    /// are added to the peer's; otherwise they replace them. A changed preshared
    /// key or keepalive starts a fresh session.
    pub fn set_peer(&self, cfg: PeerConfig, merge_allowed_ips: bool) -> Result<(), DeviceError> {
        if cfg.public_key == self.public_key() {
            return Err(DeviceError::Config(
                "a peer cannot have the interface's own public key".into(),
            ));
        }
        let mut peers = self.shared.peers.write();
        // As in WireGuard, an AllowedIP belongs to one peer: the last to claim it.
        for (k, p) in &peers.by_key {
            if *k != cfg.public_key {
                p.cfg
                    .write()
                    .allowed_ips
                    .retain(|a| !cfg.allowed_ips.contains(a));
            }
        }
        match peers.by_key.get(&cfg.public_key).cloned() {
            Some(p) => {
                let mut old = p.cfg.write();
                let fresh = old.preshared_key != cfg.preshared_key
                    || old.persistent_keepalive != cfg.persistent_keepalive;
                if let Some(e) = cfg.endpoint {
                    *p.endpoint.write() = Some(e);
                    old.endpoint = Some(e);
                }
                if merge_allowed_ips {
                    for a in cfg.allowed_ips {
                        if !old.allowed_ips.contains(&a) {
                            old.allowed_ips.push(a);
                        }
                    }
                } else {
                    old.allowed_ips = cfg.allowed_ips;
                }
                old.preshared_key = cfg.preshared_key;
                old.persistent_keepalive = cfg.persistent_keepalive;
                if fresh {
                    let replacement = self.shared.new_peer(old.clone())?;
                    *replacement.endpoint.write() = *p.endpoint.read();
                    let key = old.public_key;
                    drop(old);
                    peers.by_index.remove(&p.index);
                    peers
                        .by_index
                        .insert(replacement.index, replacement.clone());
                    peers.by_key.insert(key, replacement);
                }
            }
            None => {
                let key = cfg.public_key;
                let p = self.shared.new_peer(cfg)?;
                peers.by_index.insert(p.index, p.clone());
                peers.by_key.insert(key, p);
            }
        }
        peers.rebuild_routes();
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// A peer's configuration (endpoint as last seen).
    pub fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        let p = self.shared.peers.read().by_key.get(key).cloned()?;
        let mut c = p.cfg.read().clone();
        c.endpoint = *p.endpoint.read();
        Some(c)
    }

    /// Removes a peer; its traffic stops at once. Returns whether it existed.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        let mut peers = self.shared.peers.write();
        let Some(p) = peers.by_key.remove(key) else {
            return false;
        };
        peers.by_index.remove(&p.index);
        peers.rebuild_routes();
        self.shared.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Removes every peer.
    pub fn clear_peers(&self) {
        let mut peers = self.shared.peers.write();
        *peers = Peers::default();
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    pub fn peer_keys(&self) -> Vec<PublicKey> {
        self.shared.peers.read().by_key.keys().copied().collect()
    }

    /// The peers with their last handshake and traffic.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let peers: Vec<Arc<Peer>> = self.shared.peers.read().by_key.values().cloned().collect();
        let now = SystemTime::now();
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|p| {
                let cfg = p.cfg.read().clone();
                let since = p.tunn.lock().time_since_last_handshake();
                PeerStatus {
                    public_key: cfg.public_key,
                    preshared_key: cfg.preshared_key,
                    endpoint: *p.endpoint.read(),
                    allowed_ips: cfg.allowed_ips,
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: p.rx.load(Ordering::Relaxed),
                    tx_bytes: p.tx.load(Ordering::Relaxed),
                    persistent_keepalive: cfg.persistent_keepalive,
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    pub fn drops(&self) -> Drops {
        let d = &self.shared.drops;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Drops {
            unknown_peer: l(&d.unknown_peer),
            invalid: l(&d.invalid),
            bad_source: l(&d.bad_source),
            no_route: l(&d.no_route),
            cookies_sent: l(&d.cookies_sent),
            junk: l(&d.junk),
        }
    }

    /// Stops the threads; the TUN interface goes away when the device is dropped.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
    }
}
