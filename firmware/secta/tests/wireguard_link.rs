//! Two boxes link over WireGuard and federate over the link, in two network
//! namespaces the test makes. Box A can be reached (its pairing code carries
//! an endpoint); box B cannot (no endpoint: it dials out and keeps the link up
//! with keepalives, as behind NAT). Each enters the other's pairing code; the
//! link comes up; federation requests travel both ways over the link
//! addresses, the only path between the boxes' federation listeners.
//!
//! Needs root, /dev/net/tun, `ip netns`, curl and ping: skipped loudly otherwise.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::netns::{ok, secta, sh, skip_reason, Lab};

const A: &str = "secta-wl-a";
const B: &str = "secta-wl-b";

fn vpn(data: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![secta(), "admin", "--data", data.to_str().unwrap(), "vpn"];
    all.extend_from_slice(args);
    sh(&all)
}

fn vpn_ok(data: &Path, args: &[&str]) -> String {
    let out = vpn(data, args);
    assert!(
        out.status.success(),
        "vpn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A client API call made inside a box's namespace (curl), returning the body.
fn api(lab: &Lab, ns: &str, args: &[&str]) -> String {
    let mut all = vec!["curl", "-s", "-m", "20"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&lab.run(ns, &all).stdout).into_owned()
}

fn login(lab: &Lab, ns: &str, user: &str) -> String {
    let body = format!(
        r#"{{"type":"m.login.password","identifier":{{"type":"m.id.user","user":"{user}"}},"password":"pw"}}"#
    );
    let v: serde_json::Value = serde_json::from_str(&api(
        lab,
        ns,
        &[
            "-XPOST",
            "http://127.0.0.1:8008/_matrix/client/v3/login",
            "-d",
            &body,
        ],
    ))
    .unwrap();
    v["access_token"].as_str().expect("logged in").to_owned()
}

/// The profile of a user on the other box, asked of this box (a federation query).
fn remote_profile(lab: &Lab, ns: &str, token: &str, user: &str) -> String {
    api(
        lab,
        ns,
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!(
                "http://127.0.0.1:8008/_matrix/client/v3/profile/{}",
                user.replace('@', "%40").replace(':', "%3A")
            ),
        ],
    )
}

#[test]
fn two_boxes_pair_link_and_federate_over_it() {
    if let Some(why) = skip_reason(&["/dev/net/tun", "/usr/bin/curl", "/usr/bin/ping"]) {
        eprintln!("SKIPPED: WireGuard link test: {why}");
        println!("SKIPPED: WireGuard link test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    let (da, db) = (d.join("a"), d.join("b"));
    for (data, name, iface, endpoint) in [
        (
            &da,
            "boxa.test",
            "stwl-a",
            "endpoint = \"192.0.2.1:51821\"\n",
        ),
        (&db, "boxb.test", "stwl-b", ""),
    ] {
        std::fs::create_dir_all(data).unwrap();
        std::fs::write(
            data.join("secta.toml"),
            format!(
                "[box]\ndata_dir = {:?}\n[homeserver]\nserver_name = \"{name}\"\nlisten = \"0.0.0.0:8008\"\n\
                 [radio]\nenabled = false\n\
                 [wireguard]\nenabled = true\n\
                 [wireguard.members]\nenabled = false\n\
                 [wireguard.links]\ninterface = \"{iface}\"\n{endpoint}",
                data.to_str().unwrap()
            ),
        )
        .unwrap();
    }

    // Pairing: A shows its code, B enters it (and shows its own), A enters B's.
    let code_a = vpn_ok(&da, &["link", "code"]).trim().to_owned();
    assert!(code_a.starts_with("secta-link:"), "{code_a}");
    assert!(vpn_ok(&da, &["link", "code", "--qr"]).lines().count() > 20);
    // Bad input: a mistyped code, and a box's own code.
    let mut typo = code_a.clone().into_bytes();
    let i = typo.len() / 2;
    typo[i] = if typo[i] == b'x' { b'y' } else { b'x' };
    let refused = vpn(
        &db,
        &[
            "link",
            "pair",
            std::str::from_utf8(&typo).unwrap(),
            "--name",
            "a",
        ],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("checksum"),
        "{refused:?}"
    );
    let own = vpn(&da, &["link", "pair", &code_a, "--name", "me"]);
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("own pairing code"),
        "{own:?}"
    );

    let paired = vpn_ok(&db, &["link", "pair", &code_a, "--name", "a"]);
    // The federation peer table points at the link address.
    assert!(
        paired.contains("federation goes to https://10.78."),
        "{paired}"
    );
    let code_b = paired.lines().last().unwrap().trim().to_owned();
    assert!(
        code_b.starts_with("secta-link:") && code_b != code_a,
        "{paired}"
    );
    vpn_ok(&da, &["link", "pair", &code_b, "--name", "b"]);
    let addr_of = |data: &Path, name: &str| -> String {
        let list = vpn_ok(data, &["link", "list"]);
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{list}"));
        line.split('\t').nth(2).unwrap().to_owned()
    };
    let (addr_a, addr_b) = (addr_of(&db, "a"), addr_of(&da, "b"));
    assert!(vpn_ok(&da, &["link", "list"]).contains("(dials us)"));

    let mut lab = Lab::new(&[A, B]);
    lab.veth(A, "stwl-va", "192.0.2.1/24", B, "stwl-vb", "192.0.2.2/24");
    for (label, ns, data) in [("a", A, &da), ("b", B, &db)] {
        lab.spawn(
            label,
            ns,
            &[
                secta(),
                "demo",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                "0.0.0.0:8008",
                "--federation-tls-listen",
                "0.0.0.0:8448",
            ],
            &d.join(format!("{label}.log")),
        );
    }
    // B dials A (A cannot dial B); the link comes up both ways.
    assert!(
        lab.wait_ping(B, &addr_a, 20),
        "no link\nA:\n{}\nB:\n{}",
        log("a.log"),
        log("b.log")
    );
    assert!(lab.wait_ping(A, &addr_b, 10));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab
        .run(
            A,
            &[
                "curl",
                "-sf",
                "-m",
                "2",
                "http://127.0.0.1:8008/_matrix/client/versions",
            ],
        )
        .status
        .success()
        || !lab
            .run(
                B,
                &[
                    "curl",
                    "-sf",
                    "-m",
                    "2",
                    "http://127.0.0.1:8008/_matrix/client/versions",
                ],
            )
            .status
            .success()
    {
        assert!(
            Instant::now() < deadline,
            "boxes did not start\nA:\n{}\nB:\n{}",
            log("a.log"),
            log("b.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (data, user) in [(&da, "alice"), (&db, "bob")] {
        ok(&[
            secta(),
            "admin",
            "--data",
            data.to_str().unwrap(),
            "user",
            "create",
            user,
            "--password",
            "pw",
        ]);
    }
    let alice = login(&lab, A, "alice");
    let bob = login(&lab, B, "bob");
    // B asks A for alice's profile and A asks B for bob's: federation over the link.
    let p = remote_profile(&lab, B, &bob, "@alice:boxa.test");
    assert!(
        p.contains("\"displayname\":\"alice\""),
        "B could not ask A: {p}\nB:\n{}",
        log("b.log")
    );
    let p = remote_profile(&lab, A, &alice, "@bob:boxb.test");
    assert!(
        p.contains("\"displayname\":\"bob\""),
        "A could not ask B: {p}\nA:\n{}",
        log("a.log")
    );
    // The link shows its handshake and traffic on both boxes.
    for data in [&da, &db] {
        let status = vpn_ok(data, &["status"]);
        assert!(status.contains("links: stwl-"), "{status}");
        assert!(
            status.contains("handshake") && !status.contains("handshake never"),
            "{status}"
        );
    }
}
