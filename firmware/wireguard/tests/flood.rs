//! Bad input against a running engine, over loopback UDP (its TUN device has
//! no address, so nothing else on the machine is touched): a handshake flood
//! from a known key is answered with cookie replies once over the rate limit;
//! handshakes from unknown keys and garbage datagrams are dropped and counted;
//! through all of it a real peer still completes its handshake.
//!
//! Needs root and /dev/net/tun: skipped loudly otherwise.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use boringtun::noise::{Tunn, TunnResult};
use secta_wireguard::{
    device::{Device, DeviceConfig, PeerConfig},
    SecretKey,
};

fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing");
    }
    None
}

#[test]
fn floods_unknown_keys_and_garbage_leave_real_peers_working() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED: WireGuard flood test ({why})");
        eprintln!("SKIPPED: WireGuard flood test ({why})");
        return;
    }
    let box_key = SecretKey::generate();
    let flooder = SecretKey::generate();
    let real = SecretKey::generate();
    let mut cfg = DeviceConfig::new("stwf-box", box_key.clone());
    cfg.handshake_rate_limit = 5;
    cfg.workers = 2;
    for k in [&flooder, &real] {
        let mut p = PeerConfig::new(k.public());
        p.allowed_ips = vec![if k == &flooder {
            "10.99.0.2/32".parse().unwrap()
        } else {
            "10.99.0.3/32".parse().unwrap()
        }];
        cfg.peers.push(p);
    }
    let dev = Device::start(cfg).expect("engine starts");
    let port = dev.listen_port();
    let target = format!("127.0.0.1:{port}");

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut t = Tunn::new(
        flooder.x25519(),
        box_key.public().x25519(),
        None,
        None,
        1,
        None,
    )
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let (mut responses, mut cookies) = (0, 0);
    let read = |sock: &UdpSocket, responses: &mut i32, cookies: &mut i32| {
        let mut r = [0u8; 256];
        while let Ok(n) = sock.recv(&mut r) {
            match (r[0], n) {
                (2, 92) => *responses += 1,
                (3, 64) => *cookies += 1,
                _ => {}
            }
        }
    };
    for _ in 0..300 {
        if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
            sock.send_to(p, &target).unwrap();
        }
    }
    read(&sock, &mut responses, &mut cookies);
    let drops = dev.drops();
    assert!(
        drops.cookies_sent > 0 && cookies > 0,
        "no cookie replies under load: {drops:?}, {cookies} received"
    );
    assert!(responses < 300, "every flooded handshake was answered");

    // Handshakes from a key that is not a peer: dropped without an answer.
    let stranger = SecretKey::generate();
    let mut s = Tunn::new(
        stranger.x25519(),
        box_key.public().x25519(),
        None,
        None,
        2,
        None,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a fresh rate-limit second
    let before = dev.drops().unknown_peer;
    for _ in 0..3 {
        if let TunnResult::WriteToNetwork(p) = s.format_handshake_initiation(&mut buf, true) {
            sock.send_to(p, &target).unwrap();
        }
    }
    // Garbage of every size: dropped and counted.
    let before_invalid = dev.drops().invalid;
    for n in [0usize, 1, 3, 4, 31, 32, 64, 92, 148, 500, 1400] {
        let junk: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        sock.send_to(&junk, &target).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while (dev.drops().unknown_peer < before + 3 || dev.drops().invalid < before_invalid + 10)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dev.drops().unknown_peer >= before + 3, "{:?}", dev.drops());
    assert!(
        dev.drops().invalid >= before_invalid + 10,
        "{:?}",
        dev.drops()
    );

    // A real peer (a second engine) still completes its handshake.
    let mut peer_cfg = DeviceConfig::new("stwf-peer", real.clone());
    let mut p = PeerConfig::new(box_key.public());
    p.endpoint = Some(target.parse().unwrap());
    p.allowed_ips = vec!["10.99.0.1/32".parse().unwrap()];
    p.persistent_keepalive = Some(25);
    peer_cfg.peers.push(p);
    let peer = Device::start(peer_cfg).expect("second engine starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    let handshaken = |d: &Device| d.peers().iter().all(|p| p.last_handshake.is_some());
    while !handshaken(&peer) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(handshaken(&peer), "the real peer could not handshake");
    // The box (the responder) counts the handshake once the initiator's first
    // data message (its keepalive) arrives, a moment after the initiator does.
    let real_on_box = || {
        dev.peers()
            .into_iter()
            .find(|p| p.public_key == real.public())
            .unwrap()
    };
    while real_on_box().last_handshake.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let real_on_box = real_on_box();
    assert!(real_on_box.last_handshake.is_some());
    assert!(real_on_box.endpoint.is_some());
}
