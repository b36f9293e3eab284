//! The members' VPN end to end, in network namespaces the test makes: a box
//! (`secta run` with the WireGuard gateway) and a member's device joined by a
//! veth pair. The member runs a second instance of the engine (`secta vpn up`)
//! configured only from the `.conf` the box produced; ping and TCP transfers
//! both ways go through the tunnel and arrive byte for byte; `wg show` reads
//! the box's UAPI socket; a device whose key the box does not know gets
//! nothing; standard WireGuard (wireguard-go configured by `wg setconf` from
//! the same kind of `.conf`) interoperates; disabling the member stops its
//! traffic and enabling it lets it back. A TUN device that cannot be made is
//! refused with a message naming the missing permission.
//!
//! Needs root, /dev/net/tun, `ip netns`, busybox, curl and ping: skipped loudly otherwise.

mod common;

use std::{path::Path, time::Duration};

use common::netns::{ok, secta, sh, skip_reason, Lab};

const BOX: &str = "secta-wg-box";
const MEM: &str = "secta-wg-mem";
const GO: &str = "secta-wg-go";
const ROGUE: &str = "secta-wg-rogue";
const BOX_IF: &str = "stwm-box";
const UAPI: &str = "/var/run/wireguard";

fn admin(data: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![secta(), "admin", "--data", data.to_str().unwrap(), "vpn"];
    all.extend_from_slice(args);
    sh(&all)
}

fn admin_ok(data: &Path, args: &[&str]) -> String {
    let out = admin(data, args);
    assert!(
        out.status.success(),
        "vpn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `curl` in a namespace; the body is written to `out`.
fn fetch(lab: &Lab, ns: &str, url: &str, out: &Path) -> bool {
    lab.run(
        ns,
        &["curl", "-sf", "-m", "20", "-o", out.to_str().unwrap(), url],
    )
    .status
    .success()
}

fn random_file(path: &Path, len: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(len);
    f.write_all(&buf).unwrap();
}

#[test]
fn members_vpn_in_network_namespaces() {
    if let Some(why) = skip_reason(&[
        "/dev/net/tun",
        "/usr/bin/busybox",
        "/usr/bin/curl",
        "/usr/bin/ping",
    ]) {
        eprintln!("SKIPPED: WireGuard members test: {why}");
        println!("SKIPPED: WireGuard members test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("box");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("secta.toml"),
        format!(
            "[box]\ndata_dir = {:?}\n[homeserver]\nserver_name = \"box.test\"\nlisten = \"0.0.0.0:8008\"\n\
             [radio]\nenabled = false\n\
             [wireguard]\nenabled = true\nuapi_dir = \"{UAPI}\"\n\
             [wireguard.members]\ninterface = \"{BOX_IF}\"\nendpoint = \"192.0.2.1:51820\"\n\
             [wireguard.links]\nenabled = false\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();

    // Bad input first: a device name that is not one, and no .conf before the box exists.
    let bad = admin(&data, &["peers", "add", "bad name"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad name"));

    let conf = admin_ok(&data, &["peers", "add", "phone"]);
    assert!(conf.contains("Address = 10.77.0.2/32"), "{conf}");
    assert!(conf.contains("Endpoint = 192.0.2.1:51820"), "{conf}");
    let phone = d.join("phone.conf");
    std::fs::write(&phone, &conf).unwrap();
    let tablet = d.join("tablet.conf");
    std::fs::write(&tablet, admin_ok(&data, &["peers", "add", "tablet"])).unwrap();
    // The QR of the .conf renders (terminal, PNG).
    assert!(admin_ok(&data, &["peers", "qr", "phone"]).lines().count() > 20);
    let png = d.join("phone.png");
    admin_ok(
        &data,
        &["peers", "qr", "phone", "--png", png.to_str().unwrap()],
    );
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // show-conf gives the same file again.
    assert_eq!(admin_ok(&data, &["peers", "show-conf", "phone"]), conf);

    let mut lab = Lab::new(&[BOX, MEM, GO, ROGUE]);
    lab.veth(
        BOX,
        "stwm-b0",
        "192.0.2.1/24",
        MEM,
        "stwm-m0",
        "192.0.2.2/24",
    );
    lab.veth(
        BOX,
        "stwm-b1",
        "192.0.3.1/24",
        GO,
        "stwm-g0",
        "192.0.3.2/24",
    );
    lab.veth(
        BOX,
        "stwm-b2",
        "192.0.4.1/24",
        ROGUE,
        "stwm-r0",
        "192.0.4.2/24",
    );
    for (ns, via) in [(GO, "192.0.3.1"), (ROGUE, "192.0.4.1")] {
        ok(&["ip", "-n", ns, "route", "add", "192.0.2.0/24", "via", via]);
    }
    let cfg = data.join("secta.toml");
    lab.spawn(
        "box",
        BOX,
        &[secta(), "run", "--config", cfg.to_str().unwrap()],
        &d.join("box.log"),
    );
    lab.spawn(
        "member",
        MEM,
        &[
            secta(),
            "vpn",
            "up",
            phone.to_str().unwrap(),
            "--interface",
            "stwm-mem",
        ],
        &d.join("member.log"),
    );
    let up = lab.wait_ping(MEM, "10.77.0.1", 20);
    let log = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    assert!(
        up,
        "no ping through the tunnel\nbox:\n{}\nmember:\n{}",
        log("box.log"),
        log("member.log")
    );

    // The member reaches the box's homeserver as if on its Wi-Fi.
    let versions = d.join("versions.json");
    assert!(fetch(
        &lab,
        MEM,
        "http://10.77.0.1:8008/_matrix/client/versions",
        &versions
    ));
    assert!(std::fs::read_to_string(&versions)
        .unwrap()
        .contains("versions"));

    // TCP both ways through the tunnel, byte for byte: the box serves a file to
    // the member and fetches one from it.
    let www_box = d.join("www-box");
    let www_mem = d.join("www-mem");
    std::fs::create_dir_all(&www_box).unwrap();
    std::fs::create_dir_all(&www_mem).unwrap();
    random_file(&www_box.join("blob"), 8 << 20);
    random_file(&www_mem.join("blob"), 3 << 20 | 12345);
    for (label, ns, addr, root) in [
        ("httpd-box", BOX, "10.77.0.1:9080", &www_box),
        ("httpd-mem", MEM, "10.77.0.2:9080", &www_mem),
    ] {
        lab.spawn(
            label,
            ns,
            &[
                "busybox",
                "httpd",
                "-f",
                "-p",
                addr,
                "-h",
                root.to_str().unwrap(),
            ],
            &d.join(format!("{label}.log")),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let down = d.join("down");
    assert!(fetch(&lab, MEM, "http://10.77.0.1:9080/blob", &down));
    assert_eq!(
        std::fs::read(&down).unwrap(),
        std::fs::read(www_box.join("blob")).unwrap()
    );
    let upl = d.join("up");
    assert!(fetch(&lab, BOX, "http://10.77.0.2:9080/blob", &upl));
    assert_eq!(
        std::fs::read(&upl).unwrap(),
        std::fs::read(www_mem.join("blob")).unwrap()
    );

    // `wg show` reads the box's UAPI socket: the member with its handshake and traffic.
    if Path::new("/usr/bin/wg").exists() {
        let dump = ok(&["wg", "show", BOX_IF, "dump"]);
        let line = dump
            .lines()
            .find(|l| l.contains("10.77.0.2/32"))
            .unwrap_or_else(|| panic!("member not in wg show:\n{dump}"));
        let f: Vec<&str> = line.split('\t').collect();
        assert!(f[2].starts_with("192.0.2.2:"), "endpoint {line}");
        assert!(f[4].parse::<u64>().unwrap() > 0, "no handshake: {line}");
        assert!(f[5].parse::<u64>().unwrap() > 3 << 20, "rx bytes: {line}");
        assert!(f[6].parse::<u64>().unwrap() > 8 << 20, "tx bytes: {line}");
        // `wg set` works against it too: add and remove a peer.
        let k = ok(&["sh", "-c", "wg genkey | wg pubkey"]).trim().to_owned();
        ok(&[
            "wg",
            "set",
            BOX_IF,
            "peer",
            &k,
            "allowed-ips",
            "10.77.0.200/32",
        ]);
        assert!(ok(&["wg", "show", BOX_IF, "peers"]).contains(&k));
        ok(&["wg", "set", BOX_IF, "peer", &k, "remove"]);
        assert!(!ok(&["wg", "show", BOX_IF, "peers"]).contains(&k));
        // Bad input to wg set is refused and changes nothing.
        assert!(!sh(&[
            "wg",
            "set",
            BOX_IF,
            "peer",
            "AAAA",
            "allowed-ips",
            "10.1.1.1/32"
        ])
        .status
        .success());
    } else {
        println!("SKIPPED: wg show/set against the UAPI socket (wireguard-tools not installed)");
    }

    // A device with a key the box does not know gets nothing: the tablet's
    // .conf with a fresh private key.
    let tablet_text = std::fs::read_to_string(&tablet).unwrap();
    let tablet_key = tablet_text
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .unwrap();
    let fresh = ok(&["sh", "-c", "head -c 32 /dev/urandom | base64"]);
    let rogue_conf = d.join("rogue.conf");
    std::fs::write(&rogue_conf, tablet_text.replace(tablet_key, fresh.trim())).unwrap();
    lab.spawn(
        "rogue",
        ROGUE,
        &[
            secta(),
            "vpn",
            "up",
            rogue_conf.to_str().unwrap(),
            "--interface",
            "stwm-rog",
        ],
        &d.join("rogue.log"),
    );
    assert!(
        !lab.wait_ping(ROGUE, "10.77.0.1", 3),
        "an unknown key got through"
    );

    // Standard WireGuard (wireguard-go, configured by wg from the tablet's .conf) interoperates.
    if Path::new("/usr/bin/wireguard-go").exists() && Path::new("/usr/bin/wg-quick").exists() {
        let go_if = "stwm-go";
        lab.wireguard_go(GO, go_if, &d.join("go.log"));
        let stripped = ok(&["wg-quick", "strip", tablet.to_str().unwrap()]);
        let plain = d.join("tablet-wg.conf");
        std::fs::write(&plain, stripped).unwrap();
        ok(&[
            "ip",
            "netns",
            "exec",
            GO,
            "wg",
            "setconf",
            go_if,
            plain.to_str().unwrap(),
        ]);
        ok(&["ip", "-n", GO, "addr", "add", "10.77.0.3/32", "dev", go_if]);
        ok(&["ip", "-n", GO, "link", "set", go_if, "up"]);
        ok(&["ip", "-n", GO, "route", "add", "10.77.0.0/24", "dev", go_if]);
        assert!(
            lab.wait_ping(GO, "10.77.0.1", 15),
            "wireguard-go could not reach the box\n{}",
            log("go.log")
        );
        let got = d.join("go-down");
        assert!(fetch(&lab, GO, "http://10.77.0.1:9080/blob", &got));
        assert_eq!(
            std::fs::read(&got).unwrap(),
            std::fs::read(www_box.join("blob")).unwrap()
        );
        lab.stop(go_if, true);
    } else {
        println!("SKIPPED: interop with wireguard-go (wireguard-go or wg-quick not installed)");
    }

    // Disabling the member stops its traffic within the box's sync period.
    assert!(lab.ping(MEM, "10.77.0.1"));
    admin_ok(&data, &["peers", "disable", "phone"]);
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        assert!(
            !lab.ping(MEM, "10.77.0.1"),
            "a disabled member still gets through"
        );
    }
    assert!(!fetch(
        &lab,
        MEM,
        "http://10.77.0.1:8008/_matrix/client/versions",
        &d.join("x")
    ));
    let list = admin_ok(&data, &["peers", "list"]);
    assert!(list.contains("phone\t10.77.0.2\tdisabled"), "{list}");
    // Enabled again, it comes back (its next handshake is accepted).
    admin_ok(&data, &["peers", "enable", "phone"]);
    assert!(
        lab.wait_ping(MEM, "10.77.0.1", 30),
        "the re-enabled member did not come back"
    );
    let status = admin_ok(&data, &["status"]);
    assert!(
        status.contains(&format!("members: {BOX_IF} running")),
        "{status}"
    );
    assert!(status.contains("phone\thandshake"), "{status}");

    // A TUN device that cannot be made: the error names the missing permission.
    let denied = sh(&[
        "ip",
        "netns",
        "exec",
        MEM,
        "setpriv",
        "--bounding-set",
        "-net_admin",
        "--inh-caps",
        "-net_admin",
        secta(),
        "vpn",
        "up",
        phone.to_str().unwrap(),
        "--interface",
        "stwm-deny",
    ]);
    assert!(!denied.status.success());
    let why = String::from_utf8_lossy(&denied.stderr);
    assert!(why.contains("CAP_NET_ADMIN"), "{why}");
    // The running tunnel kept working.
    assert!(lab.ping(MEM, "10.77.0.1"));

    lab.stop("box", true);
    assert!(
        !Path::new(UAPI).join(format!("{BOX_IF}.sock")).exists(),
        "UAPI socket left behind"
    );
}
