//! The hotspot end to end in network namespaces made by the test: a "box", a
//! phone-like "client" and an "internet" host. Real dnsmasq gives the client a
//! lease carrying option 114 and answers DNS with the box; the portal says
//! "captive" before acceptance and exactly "online" after; forwarding to the
//! internet host is blocked (redirected to the portal) before and works after;
//! the firewall rules are gone after the box stops.
//!
//! Needs root, `ip netns`, dnsmasq, nft and busybox: skipped loudly otherwise.

mod common;

use std::{
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BOX: &str = "secta-t-box";
const CLI: &str = "secta-t-cli";
const NET: &str = "secta-t-net";

use common::netns::{ok, sh};

fn ns(name: &str, args: &[&str]) -> Output {
    let mut all = vec!["ip", "netns", "exec", name];
    all.extend_from_slice(args);
    sh(&all)
}

fn skip_reason() -> Option<String> {
    if let Some(why) = common::netns::skip_reason(&[
        "/usr/sbin/dnsmasq",
        "/usr/sbin/nft",
        "/usr/bin/busybox",
        "/usr/bin/curl",
    ]) {
        return Some(why);
    }
    let probe = "secta-t-probe";
    let _ = sh(&["ip", "netns", "add", probe]);
    let nft = ns(probe, &["nft", "list", "tables"]);
    let _ = sh(&["ip", "netns", "del", probe]);
    if !nft.status.success() {
        return Some(format!(
            "nft unusable in a namespace: {}",
            String::from_utf8_lossy(&nft.stderr).trim()
        ));
    }
    None
}

/// Deletes the namespaces (and with them every process and interface) when dropped.
struct Netns {
    children: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in [BOX, CLI, NET] {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// An HTTP request from the client: (status, Location, body).
fn http(args: &[&str]) -> (u16, String, String) {
    let mut all = vec![
        "curl",
        "-s",
        "-m",
        "5",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{redirect_url}",
    ];
    all.extend_from_slice(args);
    let out = ns(CLI, &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, location) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.parse().unwrap_or(0),
        location.to_owned(),
        body.to_owned(),
    )
}

#[test]
fn hotspot_in_network_namespaces() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: hotspot network test: {why}");
        println!("SKIPPED: hotspot network test: {why}");
        return;
    }
    for n in [BOX, CLI, NET] {
        let _ = sh(&["ip", "netns", "del", n]);
    }
    let mut env = Netns {
        children: Vec::new(),
    };
    for n in [BOX, CLI, NET] {
        ok(&["ip", "netns", "add", n]);
        ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    // box wlan <-> client; box uplink <-> internet host.
    ok(&[
        "ip", "link", "add", "sbwlan", "netns", BOX, "type", "veth", "peer", "name", "cleth",
        "netns", CLI,
    ]);
    ok(&[
        "ip", "link", "add", "sbup", "netns", BOX, "type", "veth", "peer", "name", "neteth",
        "netns", NET,
    ]);
    ok(&[
        "ip",
        "-n",
        BOX,
        "addr",
        "add",
        "10.42.0.1/24",
        "dev",
        "sbwlan",
    ]);
    ok(&[
        "ip",
        "-n",
        BOX,
        "addr",
        "add",
        "192.0.2.1/24",
        "dev",
        "sbup",
    ]);
    ok(&[
        "ip",
        "-n",
        NET,
        "addr",
        "add",
        "192.0.2.2/24",
        "dev",
        "neteth",
    ]);
    for (n, dev) in [
        (BOX, "sbwlan"),
        (BOX, "sbup"),
        (CLI, "cleth"),
        (NET, "neteth"),
    ] {
        ok(&["ip", "-n", n, "link", "set", dev, "up"]);
    }
    ok(&[
        "ip",
        "-n",
        NET,
        "route",
        "add",
        "10.42.0.0/24",
        "via",
        "192.0.2.1",
    ]);
    let fwd = ns(BOX, &["sysctl", "-w", "net.ipv4.ip_forward=1"]);
    assert!(fwd.status.success());

    // The internet host serves a page.
    let www = std::env::temp_dir().join(format!("secta-www-{}", std::process::id()));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "the open internet").unwrap();
    env.children.push(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                NET,
                "busybox",
                "httpd",
                "-f",
                "-p",
                "192.0.2.2:80",
                "-h",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The box: config, dnsmasq with the generated file, secta with the portal.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("secta.toml");
    std::fs::write(
        &cfg,
        format!(
            "[box]\ndata_dir = {:?}\nname = \"Тест\"\n\n[homeserver]\nserver_name = \"secta.box\"\nlisten = \"10.42.0.1:8008\"\n\n\
             [hotspot]\nenabled = true\ninterface = \"sbwlan\"\nuplink = \"sbup\"\ndhcp_option_114 = true\nsession_minutes = 30\nrun_hostapd = false\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    // The printed dnsmasq file is what the box runs (secta starts dnsmasq itself).
    let conf = ok(&[
        env!("CARGO_BIN_EXE_secta"),
        "hotspot-config",
        "--config",
        cfg.to_str().unwrap(),
        "dnsmasq",
    ]);
    assert!(conf.contains("interface=sbwlan") && conf.contains("dhcp-option=114"));
    let log = std::fs::File::create(dir.path().join("secta.log")).unwrap();
    env.children.push(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                BOX,
                env!("CARGO_BIN_EXE_secta"),
                "run",
                "--config",
            ])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The rules are in place once the portal answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns(BOX, &["nft", "list", "table", "inet", "secta_hotspot"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "secta did not install its rules: {}",
            std::fs::read_to_string(dir.path().join("secta.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // dnsmasq is supervised: killed, it comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns(BOX, &["pgrep", "-x", "dnsmasq"]).status.success() {
        assert!(Instant::now() < deadline, "secta did not start dnsmasq");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&["ip", "netns", "exec", BOX, "pkill", "-x", "dnsmasq"]);
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns(BOX, &["pgrep", "-x", "dnsmasq"]).status.success() {
        assert!(Instant::now() < deadline, "secta did not restart dnsmasq");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The client asks for a lease, printing what it got (including option 114).
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n ip addr add \"$ip/$mask\" dev \"$interface\"\n ip route add default via \"$router\"\n \
         echo \"lease ip=$ip dns=$dns opt114=$opt114\" ;;\nesac\n",
    )
    .unwrap();
    ok(&["chmod", "+x", script.to_str().unwrap()]);
    let lease = ns(
        CLI,
        &[
            "busybox",
            "udhcpc",
            "-i",
            "cleth",
            "-q",
            "-n",
            "-t",
            "10",
            "-O",
            "114",
            "-s",
            script.to_str().unwrap(),
        ],
    );
    let lease_out = String::from_utf8_lossy(&lease.stdout).into_owned();
    assert!(
        lease.status.success(),
        "no lease: {lease_out} {}",
        String::from_utf8_lossy(&lease.stderr)
    );
    assert!(lease_out.contains("ip=10.42.0."), "{lease_out}");
    assert!(lease_out.contains("dns=10.42.0.1"), "{lease_out}");
    // udhcpc prints unknown options in hex: "https://secta.box/api/captive".
    let url_hex: String = "https://secta.box/api/captive"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        lease_out.to_lowercase().contains(&url_hex),
        "option 114 missing: {lease_out}"
    );

    // DNS: probe names resolve to the box.
    let dns = ns(
        CLI,
        &["busybox", "nslookup", "captive.apple.com", "10.42.0.1"],
    );
    assert!(
        String::from_utf8_lossy(&dns.stdout).contains("10.42.0.1"),
        "{}",
        String::from_utf8_lossy(&dns.stdout)
    );

    // Before acceptance: the probe is sent to the portal, the internet host unreachable.
    let (code, location, _) = http(&[
        "-H",
        "Host: captive.apple.com",
        "http://10.42.0.1/hotspot-detect.html",
    ]);
    assert_eq!(
        (code, location.as_str()),
        (302, "http://secta.box/"),
        "captive before acceptance"
    );
    // HTTP to the internet host is turned to the portal; the page never comes.
    let (code, location, body) = http(&["http://192.0.2.2/"]);
    assert!(
        !body.contains("the open internet"),
        "reached the internet before acceptance"
    );
    assert_eq!((code, location.as_str()), (302, "http://secta.box/"));

    // Accept on the portal's page.
    let (code, _, body) = http(&["-X", "POST", "http://10.42.0.1/accept"]);
    assert!(code == 200 && body.contains("подключены"), "{code} {body}");

    // After: exactly the online answer, and the internet host is reachable.
    let (code, _, body) = http(&[
        "-H",
        "Host: captive.apple.com",
        "http://10.42.0.1/hotspot-detect.html",
    ]);
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>"
        )
    );
    let (code, _, body) = http(&["http://192.0.2.2/"]);
    assert!(
        code == 200 && body.contains("the open internet"),
        "forwarding after acceptance: {code} {body}"
    );

    // Stop the box: the rules are removed.
    let secta = env.children.last_mut().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &secta.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while ns(BOX, &["nft", "list", "table", "inet", "secta_hotspot"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "rules still present after stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&www);
}
