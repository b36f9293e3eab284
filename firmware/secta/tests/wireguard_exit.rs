//! The upstream exit end to end in three network namespaces the test makes: a
//! hotspot client, the box, and the "internet" holding the exit server (a
//! standard WireGuard: wireguard-go configured with `wg`, or the box's own
//! engine when wireguard-go is missing) and a web server that tells each
//! caller its address.
//!
//! Without an exit the client reaches the web server directly. With the exit
//! set, the client's traffic arrives from the exit's tunnel address, and a
//! capture on the box's plain uplink sees none of the client's packets —
//! IPv6 included, which the box refuses for routed clients. When the exit
//! server goes down, and again when the box's own process is killed, the
//! client's traffic is dropped and the uplink still sees none of it.
//!
//! Needs root, /dev/net/tun, `ip netns`, busybox, curl, ping and tcpdump: skipped loudly otherwise.

mod common;

use std::{path::Path, time::Duration};

use common::netns::{ok, secta, sh, skip_reason, vpn_admin, vpn_admin_ok, Lab};
use secta_wireguard::SecretKey;

const CLI: &str = "secta-wx-cli";
const BOX: &str = "secta-wx-box";
const NET: &str = "secta-wx-net";
const UAPI: &str = "/var/run/wireguard";

/// What the web server says the client's address is (None: no answer).
fn seen_as(lab: &Lab) -> Option<String> {
    let out = lab.run(
        CLI,
        &["curl", "-sf", "-m", "3", "http://203.0.113.10/cgi-bin/ip"],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Packets in a capture file.
fn captured(pcap: &Path) -> Vec<String> {
    let out = sh(&["tcpdump", "-n", "-r", pcap.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Client traffic on the uplink: the web server, the client's subnets.
const FILTER: &str = "host 203.0.113.10 or net 10.42.0.0/24 or net fd42::/64";

#[test]
fn exit_with_kill_switch_in_network_namespaces() {
    if let Some(why) = skip_reason(&[
        "/dev/net/tun",
        "/usr/bin/busybox",
        "/usr/bin/curl",
        "/usr/bin/ping",
        "/usr/bin/tcpdump",
    ]) {
        eprintln!("SKIPPED: WireGuard exit test: {why}");
        println!("SKIPPED: WireGuard exit test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    let mut lab = Lab::new(&[CLI, BOX, NET]);
    lab.veth(
        CLI,
        "stwx-c0",
        "10.42.0.2/24",
        BOX,
        "stwx-wlan",
        "10.42.0.1/24",
    );
    lab.veth(
        BOX,
        "stwx-up",
        "198.51.100.1/24",
        NET,
        "stwx-n0",
        "198.51.100.2/24",
    );
    ok(&[
        "ip",
        "-n",
        CLI,
        "route",
        "add",
        "default",
        "via",
        "10.42.0.1",
    ]);
    ok(&[
        "ip",
        "-n",
        BOX,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.2",
    ]);
    ok(&[
        "ip",
        "-n",
        NET,
        "route",
        "add",
        "10.42.0.0/24",
        "via",
        "198.51.100.1",
    ]);
    ok(&[
        "ip",
        "-n",
        NET,
        "addr",
        "add",
        "203.0.113.10/32",
        "dev",
        "lo",
    ]);
    // IPv6 on both links, so a leak would have a path.
    for (ns, dev, addr) in [
        (CLI, "stwx-c0", "fd42::2/64"),
        (BOX, "stwx-wlan", "fd42::1/64"),
        (BOX, "stwx-up", "2001:db8::1/64"),
        (NET, "stwx-n0", "2001:db8::2/64"),
    ] {
        ok(&[
            "ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad",
        ]);
    }
    ok(&[
        "ip", "-n", CLI, "-6", "route", "add", "default", "via", "fd42::1",
    ]);
    ok(&[
        "ip",
        "-n",
        NET,
        "-6",
        "route",
        "add",
        "fd42::/64",
        "via",
        "2001:db8::1",
    ]);
    lab.run(BOX, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    lab.run(BOX, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

    // The "internet": a web server answering with the caller's address.
    let www = d.join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin/ip");
    std::fs::write(
        &cgi,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$REMOTE_ADDR\"\n",
    )
    .unwrap();
    ok(&["chmod", "755", cgi.to_str().unwrap()]);
    lab.spawn(
        "httpd",
        NET,
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "203.0.113.10:80",
            "-h",
            www.to_str().unwrap(),
        ],
        &d.join("httpd.log"),
    );

    // Without an exit: direct, and the capture on the uplink sees it (the capture works).
    let pcap0 = d.join("direct.pcap");
    lab.capture("tcpdump0", BOX, "stwx-up", &pcap0, FILTER);
    let mut direct = None;
    for _ in 0..20 {
        direct = seen_as(&lab);
        if direct.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        direct.as_deref(),
        Some("10.42.0.2"),
        "no direct path: {}",
        log("httpd.log")
    );
    assert!(lab.wait_ping(CLI, "2001:db8::2", 10), "no direct IPv6 path");
    std::thread::sleep(Duration::from_millis(300));
    lab.stop("tcpdump0", true);
    assert!(
        !captured(&pcap0).is_empty(),
        "the capture saw nothing: {}",
        log("direct.log")
    );

    // The exit server and the box's exit .conf, as a provider would hand it out.
    let server = SecretKey::generate();
    let client = SecretKey::generate();
    let server_conf = d.join("server.conf");
    std::fs::write(
        &server_conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.2.0.1/24\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.2.0.2/32\n",
            &*server.expose_base64(),
            client.public()
        ),
    )
    .unwrap();
    let exit_conf = d.join("exit.conf");
    std::fs::write(
        &exit_conf,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.2.0.2/32\nDNS = 10.2.0.1\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = 198.51.100.2:51820\n",
            &*client.expose_base64(),
            server.public()
        ),
    )
    .unwrap();
    let go = Path::new("/usr/bin/wireguard-go").exists() && Path::new("/usr/bin/wg").exists();
    if go {
        lab.wireguard_go(NET, "stwx-srv", &d.join("server.log"));
        let plain = d.join("server-wg.conf");
        std::fs::write(
            &plain,
            std::fs::read_to_string(&server_conf)
                .unwrap()
                .replace("Address = 10.2.0.1/24\n", ""),
        )
        .unwrap();
        ok(&[
            "ip",
            "netns",
            "exec",
            NET,
            "wg",
            "setconf",
            "stwx-srv",
            plain.to_str().unwrap(),
        ]);
        ok(&[
            "ip",
            "-n",
            NET,
            "addr",
            "add",
            "10.2.0.1/24",
            "dev",
            "stwx-srv",
        ]);
        ok(&["ip", "-n", NET, "link", "set", "stwx-srv", "up"]);
    } else {
        println!("SKIPPED: wireguard-go as the exit server (not installed); the box's own engine plays it");
        lab.spawn(
            "exit-server",
            NET,
            &[
                secta(),
                "vpn",
                "up",
                server_conf.to_str().unwrap(),
                "--interface",
                "stwx-srv",
            ],
            &d.join("server.log"),
        );
    }

    let data = d.join("box");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = data.join("secta.toml");
    std::fs::write(
        &cfg,
        format!(
            "[box]\ndata_dir = {:?}\n[homeserver]\nlisten = \"127.0.0.1:8008\"\n[radio]\nenabled = false\n\
             [wireguard]\nenabled = true\nuapi_dir = \"{UAPI}\"\n\
             [wireguard.members]\nenabled = false\n[wireguard.links]\nenabled = false\n\
             [wireguard.exit]\ninterface = \"stwx-exit\"\nroute_interfaces = [\"stwx-wlan\"]\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    // Bad input: a .conf that is not an exit is refused and nothing is stored.
    let refused = vpn_admin(&data, &["exit", "set", server_conf.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Endpoint"),
        "{refused:?}"
    );
    vpn_admin_ok(&data, &["exit", "set", exit_conf.to_str().unwrap()]);

    lab.spawn(
        "box",
        BOX,
        &[secta(), "run", "--config", cfg.to_str().unwrap()],
        &d.join("box.log"),
    );

    // Through the exit: the web server sees the exit's tunnel address.
    let mut via = None;
    for _ in 0..40 {
        via = seen_as(&lab);
        if via.as_deref() == Some("10.2.0.2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        via.as_deref(),
        Some("10.2.0.2"),
        "traffic did not leave through the exit\nbox:\n{}\nserver:\n{}",
        log("box.log"),
        log("server.log")
    );
    // From now on, none of the client's packets may show on the plain uplink.
    let pcap = d.join("exit.pcap");
    lab.capture("tcpdump", BOX, "stwx-up", &pcap, FILTER);
    assert_eq!(seen_as(&lab).as_deref(), Some("10.2.0.2"));
    // The box's resolver reaches the exit's DNS through the tunnel.
    let route = String::from_utf8_lossy(&lab.run(BOX, &["ip", "route", "get", "10.2.0.1"]).stdout)
        .into_owned();
    assert!(route.contains("dev stwx-exit"), "{route}");
    // IPv6 from the hotspot is refused instead of leaving directly.
    assert!(!lab
        .run(CLI, &["ping", "-6", "-c", "1", "-W", "2", "2001:db8::2"])
        .status
        .success());
    // The box's status shows the exit with a handshake.
    let status = vpn_admin_ok(&data, &["status"]);
    assert!(status.contains("exit: stwx-exit running"), "{status}");

    // The exit server goes down: the client gets nothing, and nothing leaks.
    lab.stop(if go { "stwx-srv" } else { "exit-server" }, false);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        assert_eq!(seen_as(&lab), None, "traffic flowed with the exit down");
    }
    // The box's process dies: the blackhole in the exit's table still holds.
    lab.stop("box", false);
    assert!(
        !lab.run(BOX, &["ip", "link", "show", "stwx-exit"])
            .status
            .success(),
        "the exit's TUN device outlived the box"
    );
    for _ in 0..3 {
        assert_eq!(
            seen_as(&lab),
            None,
            "traffic flowed with the box's engine gone"
        );
    }
    let table = String::from_utf8_lossy(
        &lab.run(BOX, &["ip", "route", "show", "table", "51820"])
            .stdout,
    )
    .into_owned();
    assert!(table.contains("blackhole"), "{table}");
    std::thread::sleep(Duration::from_millis(300));
    lab.stop("tcpdump", true);
    // The killed processes could not remove their UAPI sockets.
    for s in ["stwx-exit", "stwx-srv"] {
        let _ = std::fs::remove_file(Path::new(UAPI).join(format!("{s}.sock")));
    }
    let leaked = captured(&pcap);
    assert!(
        leaked.is_empty(),
        "client traffic on the plain uplink:\n{}",
        leaked.join("\n")
    );
}
