//! Obfuscation against DPI end to end: a box whose members' interface has
//! AmneziaWG-style settings hands out `.conf` files carrying them; a member
//! configured from one connects; a capture of the tunnel's UDP shows junk
//! datagrams before the handshake, padded handshakes and no standard
//! WireGuard message header at all; a standard WireGuard peer (wireguard-go)
//! with the same keys cannot connect.
//!
//! Needs root, /dev/net/tun, `ip netns`, ping and tcpdump: skipped loudly otherwise.

mod common;

use std::{path::Path, time::Duration};

use common::netns::{ok, secta, sh, skip_reason, vpn_admin_ok, Lab};

const BOX: &str = "secta-wo-box";
const MEM: &str = "secta-wo-mem";
const GO: &str = "secta-wo-go";

/// UDP payloads of the IPv4 packets in a pcap file (Ethernet link type).
fn udp_payloads(pcap: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(pcap).unwrap();
    assert!(b.len() >= 24, "short pcap");
    let le = b[0..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |i: usize| {
        let a: [u8; 4] = b[i..i + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let caplen = u32_at(at + 8) as usize;
        let frame = &b[at + 16..(at + 16 + caplen).min(b.len())];
        at += 16 + caplen;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        out.push(ip[ihl + 8..].to_vec());
    }
    out
}

#[test]
fn obfuscated_members_interface() {
    if let Some(why) = skip_reason(&["/dev/net/tun", "/usr/bin/ping", "/usr/bin/tcpdump"]) {
        eprintln!("SKIPPED: WireGuard obfuscation test: {why}");
        println!("SKIPPED: WireGuard obfuscation test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    let data = d.join("box");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = data.join("secta.toml");
    std::fs::write(
        &cfg,
        format!(
            "[box]\ndata_dir = {:?}\n[homeserver]\nlisten = \"127.0.0.1:8008\"\n[radio]\nenabled = false\n\
             [wireguard]\nenabled = true\n\
             [wireguard.members]\ninterface = \"stwo-box\"\nendpoint = \"192.0.2.1:51820\"\n\
             obfuscation = {{ jc = 5, jmin = 40, jmax = 70, s1 = 37, s2 = 51, h1 = 1234567, h2 = 2345678, h3 = 3456789, h4 = 4567890 }}\n\
             [wireguard.links]\nenabled = false\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    // `vpn obfuscation` suggests fresh random settings that the config accepts.
    let suggested = vpn_admin_ok(&data, &["obfuscation"]);
    assert!(
        suggested.starts_with("obfuscation = { jc = "),
        "{suggested}"
    );
    let conf = vpn_admin_ok(&data, &["peers", "add", "phone"]);
    for want in ["Jc = 5", "S1 = 37", "H4 = 4567890"] {
        assert!(conf.contains(want), "{want} missing in\n{conf}");
    }
    let phone = d.join("phone.conf");
    std::fs::write(&phone, &conf).unwrap();

    let mut lab = Lab::new(&[BOX, MEM, GO]);
    lab.veth(
        BOX,
        "stwo-b0",
        "192.0.2.1/24",
        MEM,
        "stwo-m0",
        "192.0.2.2/24",
    );
    lab.veth(
        BOX,
        "stwo-b1",
        "192.0.3.1/24",
        GO,
        "stwo-g0",
        "192.0.3.2/24",
    );
    ok(&[
        "ip",
        "-n",
        GO,
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "192.0.3.1",
    ]);
    let pcap = d.join("wire.pcap");
    lab.capture("tcpdump", BOX, "stwo-b0", &pcap, "udp port 51820");
    lab.spawn(
        "box",
        BOX,
        &[secta(), "run", "--config", cfg.to_str().unwrap()],
        &d.join("box.log"),
    );
    std::thread::sleep(Duration::from_millis(800));
    lab.spawn(
        "member",
        MEM,
        &[
            secta(),
            "vpn",
            "up",
            phone.to_str().unwrap(),
            "--interface",
            "stwo-mem",
        ],
        &d.join("member.log"),
    );
    assert!(
        lab.wait_ping(MEM, "10.77.0.1", 20),
        "no ping through the obfuscated tunnel\nbox:\n{}\nmember:\n{}",
        log("box.log"),
        log("member.log")
    );
    for _ in 0..5 {
        assert!(lab.ping(MEM, "10.77.0.1"));
    }
    std::thread::sleep(Duration::from_millis(300));
    lab.stop("tcpdump", true);
    let p = udp_payloads(&pcap);
    assert!(
        p.len() > 10,
        "captured {} datagrams: {}\n{:?}",
        p.len(),
        log("tcpdump.log"),
        sh(&["tcpdump", "-n", "-r", pcap.to_str().unwrap()])
    );
    let standard = |x: &[u8]| x.len() >= 4 && (1..=4).contains(&x[0]) && x[1..4] == [0, 0, 0];
    assert!(
        !p.iter().any(|x| standard(x)),
        "a standard WireGuard header on the wire"
    );
    let header = |x: &[u8], at: usize| {
        x.get(at..at + 4)
            .map(|h| u32::from_le_bytes(h.try_into().unwrap()))
    };
    let first_init = p
        .iter()
        .position(|x| x.len() == 37 + 148 && header(x, 37) == Some(1234567))
        .expect("a padded handshake initiation with header H1");
    assert!(
        first_init >= 5,
        "junk before the first initiation: {first_init}"
    );
    assert!(p[..first_init].iter().all(|x| (40..=70).contains(&x.len())));
    assert!(
        p.iter()
            .any(|x| x.len() == 51 + 92 && header(x, 51) == Some(2345678)),
        "padded response"
    );
    assert!(
        p.iter().any(|x| header(x, 0) == Some(4567890)),
        "data with header H4"
    );

    // Standard WireGuard with the same keys gets no answer.
    if Path::new("/usr/bin/wireguard-go").exists() && Path::new("/usr/bin/wg").exists() {
        lab.stop("member", true);
        lab.wireguard_go(GO, "stwo-go", &d.join("go.log"));
        let plain: String = conf
            .lines()
            .filter(|l| {
                ![
                    "Address", "MTU", "DNS", "Jc", "Jmin", "Jmax", "S1", "S2", "H1", "H2", "H3",
                    "H4",
                ]
                .iter()
                .any(|k| l.starts_with(&format!("{k} =")))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let f = d.join("plain.conf");
        std::fs::write(&f, plain).unwrap();
        ok(&[
            "ip",
            "netns",
            "exec",
            GO,
            "wg",
            "setconf",
            "stwo-go",
            f.to_str().unwrap(),
        ]);
        ok(&[
            "ip",
            "-n",
            GO,
            "addr",
            "add",
            "10.77.0.2/32",
            "dev",
            "stwo-go",
        ]);
        ok(&["ip", "-n", GO, "link", "set", "stwo-go", "up"]);
        ok(&[
            "ip",
            "-n",
            GO,
            "route",
            "add",
            "10.77.0.0/24",
            "dev",
            "stwo-go",
        ]);
        assert!(
            !lab.wait_ping(GO, "10.77.0.1", 6),
            "standard WireGuard got through"
        );
        let dump =
            String::from_utf8_lossy(&sh(&["wg", "show", "stwo-go", "latest-handshakes"]).stdout)
                .into_owned();
        assert!(
            dump.trim().ends_with("\t0"),
            "wireguard-go completed a handshake: {dump}"
        );
    } else {
        println!(
            "SKIPPED: standard WireGuard against the obfuscated box (wireguard-go not installed)"
        );
    }
}
