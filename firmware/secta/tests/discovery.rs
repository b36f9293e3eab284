//! Server discovery against real peers: dnsmasq on loopback answers the SRV
//! and A records, small HTTPS servers (certificates from a test CA) answer
//! `/.well-known/matrix/server` on port 443 and stand in for the servers the
//! answers point at. Every branch of the spec's order is checked, and that
//! answers are cached for their TTLs.

mod common;

use std::time::Duration;

use common::dns::{dnsmasq, dnsmasq_missing, Ca, HttpsServer};
use secta_homeserver::{
    config::FederationConfig,
    discovery::{Discovery, Step, Target},
};

fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn discovery(dns: std::net::SocketAddr, ca: &std::path::Path) -> Discovery {
    let cfg = FederationConfig {
        dns_servers: vec![dns.to_string()],
        ca_certificates: vec![ca.to_owned()],
        ..FederationConfig::default()
    };
    Discovery::new(&cfg).expect("discovery")
}

fn resolve(rt: &tokio::runtime::Runtime, d: &Discovery, name: &str) -> Result<Target, String> {
    let name = ruma::ServerName::parse(name).unwrap();
    rt.block_on(d.resolve(&name))
}

/// GETs `path` from the target as federation requests do; the test servers
/// answer with the `Host` header and TLS server name they saw.
fn fetch(rt: &tokio::runtime::Runtime, d: &Discovery, t: &Target) -> Result<String, String> {
    rt.block_on(async {
        let r = d
            .client(false)
            .get(format!("{}/_matrix/federation/v1/version", t.base))
            .header("host", &t.host)
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        r.text().await.map_err(|e| e.to_string())
    })
}

/// Answers with what the request looked like.
fn echo(s: common::dns::Seen<'_>) -> common::dns::Answer {
    (
        200,
        vec![],
        format!("host={} sni={}", s.host, s.sni.unwrap_or("-")),
    )
}

fn srv(service: &str, target: &str, port: u16, priority: u16) -> String {
    format!("--srv-host={service},{target},{port},{priority}")
}

fn a(name: &str, ip: &str) -> String {
    format!("--host-record={name},{ip}")
}

#[test]
fn discovery_without_well_known_ip_literals_ports_srv_and_default() {
    if let Some(why) = dnsmasq_missing() {
        eprintln!("SKIPPED: discovery test ({why})");
        println!("SKIPPED: discovery test ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_path = ca.write(dir.path());
    let (p0, p1) = (free_port_on("127.0.0.21"), free_port_on("127.0.0.22"));
    let (p2, p3) = (free_port_on("127.0.0.23"), free_port_on("127.0.0.25"));
    let records = vec![
        // Two _matrix-fed targets (lower priority value first) and a legacy
        // record that must not be used when the new one exists.
        srv("_matrix-fed._tcp.srv.test", "fed1.srv.test", p1, 10),
        srv("_matrix-fed._tcp.srv.test", "fed0.srv.test", p0, 5),
        srv("_matrix._tcp.srv.test", "wrong.test", 1, 0),
        a("fed0.srv.test", "127.0.0.21"),
        a("fed1.srv.test", "127.0.0.22"),
        srv("_matrix._tcp.legacy.test", "fed.legacy.test", p2, 0),
        a("fed.legacy.test", "127.0.0.23"),
        a("plain.test", "127.0.0.24"),
        a("port.test", "127.0.0.25"),
    ];
    let dns = dnsmasq(dir.path(), 2, &records);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = discovery(dns.addr, &ca_path);

    // 1. IP literals: as they are, 8448 by default; Host is the server name.
    let t = resolve(&rt, &d, "127.0.0.5").unwrap();
    assert_eq!(
        (t.step, t.base.as_str(), t.host.as_str()),
        (Step::IpLiteral, "https://127.0.0.5:8448", "127.0.0.5")
    );
    let t = resolve(&rt, &d, "127.0.0.5:1234").unwrap();
    assert_eq!(
        (t.base.as_str(), t.host.as_str()),
        ("https://127.0.0.5:1234", "127.0.0.5:1234")
    );
    let t = resolve(&rt, &d, "[::1]").unwrap();
    assert_eq!(
        (t.step, t.base.as_str()),
        (Step::IpLiteral, "https://[::1]:8448")
    );

    // 2. A host name with a port: A record, that port, Host with the port.
    let port_server =
        HttpsServer::start(&format!("127.0.0.25:{p3}"), &ca.issue(&["port.test"]), echo).unwrap();
    let name = format!("port.test:{p3}");
    let t = resolve(&rt, &d, &name).unwrap();
    assert_eq!(
        (t.step, t.base.clone(), t.host.clone()),
        (Step::ExplicitPort, format!("https://{name}"), name.clone())
    );
    assert_eq!(
        fetch(&rt, &d, &t).unwrap(),
        format!("host={name} sni=port.test")
    );
    drop(port_server);

    // 4. No well-known (nothing on port 443): _matrix-fed._tcp, by priority.
    let t = resolve(&rt, &d, "srv.test").unwrap();
    assert_eq!(t.step, Step::Srv, "{t:?}");
    assert_eq!(
        (t.base.as_str(), t.host.as_str()),
        ("https://srv.test", "srv.test")
    );
    assert_eq!(
        t.srv,
        vec![
            ("fed0.srv.test".to_owned(), p0),
            ("fed1.srv.test".to_owned(), p1)
        ]
    );
    // The connection goes to the SRV target and port; TLS and Host name the server.
    let fed0 =
        HttpsServer::start(&format!("127.0.0.21:{p0}"), &ca.issue(&["srv.test"]), echo).unwrap();
    assert_eq!(fetch(&rt, &d, &t).unwrap(), "host=srv.test sni=srv.test");
    drop(fed0);
    // With the first target down, the next one answers.
    let fed1 =
        HttpsServer::start(&format!("127.0.0.22:{p1}"), &ca.issue(&["srv.test"]), echo).unwrap();
    assert_eq!(fetch(&rt, &d, &t).unwrap(), "host=srv.test sni=srv.test");
    drop(fed1);

    // 5. Only the deprecated _matrix._tcp record.
    let t = resolve(&rt, &d, "legacy.test").unwrap();
    assert_eq!(
        (t.step, t.srv.clone()),
        (Step::SrvLegacy, vec![("fed.legacy.test".to_owned(), p2)])
    );
    // Certificates are checked: the target's certificate must be for legacy.test.
    let wrong = HttpsServer::start(
        &format!("127.0.0.23:{p2}"),
        &ca.issue(&["fed.legacy.test"]),
        echo,
    )
    .unwrap();
    let err = fetch(&rt, &d, &t).unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    drop(wrong);
    let right = HttpsServer::start(
        &format!("127.0.0.23:{p2}"),
        &ca.issue(&["legacy.test"]),
        echo,
    )
    .unwrap();
    assert_eq!(
        fetch(&rt, &d, &t).unwrap(),
        "host=legacy.test sni=legacy.test"
    );
    drop(right);

    // 6. Neither: the host name on port 8448.
    for name in ["plain.test", "nowhere.test"] {
        let t = resolve(&rt, &d, name).unwrap();
        assert_eq!(
            (t.step, t.base.clone(), t.host.clone(), t.srv.is_empty()),
            (
                Step::Default,
                format!("https://{name}:8448"),
                name.to_owned(),
                true
            )
        );
    }

    // Answers are cached for their TTL (2 s here): with the DNS server gone,
    // srv.test still resolves at once, and no longer once the TTL has passed.
    drop(dns);
    let t = resolve(&rt, &d, "srv.test").unwrap();
    assert_eq!(t.step, Step::Srv);
    std::thread::sleep(Duration::from_millis(2500));
    let err = resolve(&rt, &d, "srv.test").unwrap_err();
    assert!(err.contains("DNS"), "{err}");
}

#[test]
fn discovery_with_well_known_delegation() {
    if let Some(why) = dnsmasq_missing() {
        eprintln!("SKIPPED: well-known discovery test ({why})");
        println!("SKIPPED: well-known discovery test ({why})");
        return;
    }
    if common::netns::sh(&["id", "-u"]).stdout != b"0\n" {
        eprintln!("SKIPPED: well-known discovery test (needs root for port 443)");
        println!("SKIPPED: well-known discovery test (needs root for port 443)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_path = ca.write(dir.path());
    // One well-known server per name, each on its own loopback address, port 443.
    let sites: [(&str, &str); 8] = [
        ("wk-ip.test", "127.0.0.31"),
        ("wk-port.test", "127.0.0.32"),
        ("wk-srv.test", "127.0.0.33"),
        ("wk-legacy.test", "127.0.0.34"),
        ("wk-default.test", "127.0.0.35"),
        ("wk-bad.test", "127.0.0.36"),
        ("wk-404.test", "127.0.0.37"),
        ("wk-redirect.test", "127.0.0.38"),
    ];
    let ptarget = free_port_on("127.0.0.39");
    let mut records: Vec<String> = sites.iter().map(|(n, ip)| a(n, ip)).collect();
    records.extend([
        srv("_matrix-fed._tcp.dsrv.test", "t.dsrv.test", ptarget, 0),
        a("t.dsrv.test", "127.0.0.39"),
        // Ignored: the delegation wins over the server name's own records.
        srv("_matrix-fed._tcp.wk-srv.test", "wrong.test", 1, 0),
        srv("_matrix._tcp.dleg.test", "t.dleg.test", 7012, 0),
        srv("_matrix-fed._tcp.wk-bad.test", "t.wk-bad.test", 7013, 0),
    ]);
    let dns = dnsmasq(dir.path(), 2, &records);
    let names: Vec<&str> = sites.iter().map(|(n, _)| *n).collect();
    let cert = ca.issue(&names);
    let mut servers = Vec::new();
    for (_, ip) in sites {
        match HttpsServer::start(&format!("{ip}:443"), &cert, |s| {
            let body = |b: &str| {
                (
                    200,
                    vec!["Cache-Control: max-age=600".to_owned()],
                    b.to_owned(),
                )
            };
            match (s.host, s.path) {
                (_, p) if p != "/.well-known/matrix/server" => (404, vec![], "{}".into()),
                ("wk-ip.test", _) => body(r#"{"m.server": "127.0.0.42:7010"}"#),
                ("wk-port.test", _) => body(r#"{"m.server": "deleg.test:7011"}"#),
                ("wk-srv.test", _) => body(r#"{"m.server": "dsrv.test"}"#),
                ("wk-legacy.test", _) => body(r#"{"m.server": "dleg.test"}"#),
                ("wk-default.test", _) => body(r#"{"m.server": "ddef.test"}"#),
                ("wk-bad.test", _) => body("this is not JSON"),
                ("wk-redirect.test", _) => (
                    302,
                    vec!["Location: https://wk-port.test/.well-known/matrix/server".into()],
                    String::new(),
                ),
                _ => (404, vec![], r#"{"errcode":"M_NOT_FOUND"}"#.into()),
            }
        }) {
            Ok(s) => servers.push(s),
            Err(e) => {
                eprintln!("SKIPPED: well-known discovery test (cannot listen on {ip}:443: {e})");
                println!("SKIPPED: well-known discovery test (cannot listen on {ip}:443: {e})");
                return;
            }
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = discovery(dns.addr, &ca_path);
    let check = |name: &str, step: Step, base: &str, host: &str| {
        let t = resolve(&rt, &d, name).unwrap();
        assert_eq!(
            (t.step, t.base.as_str(), t.host.as_str()),
            (step, base, host),
            "{name}: {t:?}"
        );
        t
    };
    // 3.1 an IP literal (its port), Host with the port.
    check(
        "wk-ip.test",
        Step::DelegatedIp,
        "https://127.0.0.42:7010",
        "127.0.0.42:7010",
    );
    // 3.2 a host name with a port; also reached through a redirect.
    check(
        "wk-port.test",
        Step::DelegatedPort,
        "https://deleg.test:7011",
        "deleg.test:7011",
    );
    check(
        "wk-redirect.test",
        Step::DelegatedPort,
        "https://deleg.test:7011",
        "deleg.test:7011",
    );
    // 3.3 a host name without a port: _matrix-fed._tcp of the delegated name.
    let t = check(
        "wk-srv.test",
        Step::DelegatedSrv,
        "https://dsrv.test",
        "dsrv.test",
    );
    assert_eq!(t.srv, vec![("t.dsrv.test".to_owned(), ptarget)]);
    let target = HttpsServer::start(
        &format!("127.0.0.39:{ptarget}"),
        &ca.issue(&["dsrv.test"]),
        echo,
    )
    .unwrap();
    assert_eq!(fetch(&rt, &d, &t).unwrap(), "host=dsrv.test sni=dsrv.test");
    drop(target);
    // 3.4 the deprecated _matrix._tcp of the delegated name.
    let t = check(
        "wk-legacy.test",
        Step::DelegatedSrvLegacy,
        "https://dleg.test",
        "dleg.test",
    );
    assert_eq!(t.srv, vec![("t.dleg.test".to_owned(), 7012)]);
    // 3.5 no SRV: the delegated name on 8448.
    check(
        "wk-default.test",
        Step::DelegatedDefault,
        "https://ddef.test:8448",
        "ddef.test",
    );
    // An invalid answer or an error: on to the server name's own SRV, then 8448.
    let t = check(
        "wk-bad.test",
        Step::Srv,
        "https://wk-bad.test",
        "wk-bad.test",
    );
    assert_eq!(t.srv, vec![("t.wk-bad.test".to_owned(), 7013)]);
    check(
        "wk-404.test",
        Step::Default,
        "https://wk-404.test:8448",
        "wk-404.test",
    );

    // Well-known answers are kept as their Cache-Control says (600 s), beyond the
    // SRV answer's TTL (2 s): with every well-known server gone, wk-srv.test is
    // found again from the cached delegation and a fresh SRV lookup.
    drop(servers);
    std::thread::sleep(Duration::from_millis(2500));
    check(
        "wk-srv.test",
        Step::DelegatedSrv,
        "https://dsrv.test",
        "dsrv.test",
    );
    check(
        "wk-ip.test",
        Step::DelegatedIp,
        "https://127.0.0.42:7010",
        "127.0.0.42:7010",
    );
}

/// Waits (bounded) until the newest message of `room` seen by a user of `base` is `body`.
fn wait_for_message(base: &str, token: &str, room: &str, body: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = common::call(
            "GET",
            &format!(
                "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1",
                common::enc(room)
            ),
            token,
            serde_json::json!({}),
        );
        if v.is_ok_and(|v| v["chunk"][0]["content"]["body"] == body) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{body:?} never reached {base}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two boxes named `a.test` and `b.test` with no peer table: each finds the
/// other through DNS (dnsmasq) — B by `_matrix-fed._tcp`, A by the deprecated
/// `_matrix._tcp` — and checks its certificate against the community CA.
#[test]
fn two_boxes_find_each_other_through_srv_records() {
    if let Some(why) = dnsmasq_missing() {
        eprintln!("SKIPPED: boxes found by SRV ({why})");
        println!("SKIPPED: boxes found by SRV ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_path = ca.write(dir.path());
    let (ip_a, ip_b) = ("127.0.0.6", "127.0.0.7");
    let (pa, ta) = (free_port_on(ip_a), free_port_on(ip_a));
    let (pb, tb) = (free_port_on(ip_b), free_port_on(ip_b));
    let dns = dnsmasq(
        dir.path(),
        60,
        &[
            srv("_matrix._tcp.a.test", "fed.a.test", ta, 0),
            a("fed.a.test", ip_a),
            srv("_matrix-fed._tcp.b.test", "fed.b.test", tb, 0),
            a("fed.b.test", ip_b),
        ],
    );
    let mut boxes = Vec::new();
    for (name, ip, port, tls) in [("a.test", ip_a, pa, ta), ("b.test", ip_b, pb, tb)] {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        let (cert, key) = ca.issue(&[name]);
        std::fs::write(data.join("tls.crt"), cert).unwrap();
        std::fs::write(data.join("tls.key"), key).unwrap();
        std::fs::write(
            data.join("secta.toml"),
            format!(
                "[box]\nname = \"box\"\n\n[homeserver]\nserver_name = \"{name}\"\nlisten = \"{ip}:{port}\"\n\n\
                 [homeserver.federation]\ntls_listen = \"{ip}:{tls}\"\ntls_cert = {:?}\ntls_key = {:?}\n\
                 dns_servers = [\"{}\"]\nca_certificates = [{:?}]\n",
                data.join("tls.crt"),
                data.join("tls.key"),
                dns.addr,
                ca_path
            ),
        )
        .unwrap();
        boxes.push((common::start_at(&data, ip, port, &[]), data));
    }
    let ((a_box, da), (b_box, db)) = (&boxes[0], &boxes[1]);
    common::admin(da, &["user", "create", "alice", "--password", "pw"]);
    common::admin(db, &["user", "create", "bob", "--password", "pw"]);
    let alice = common::login(&a_box.base, "alice");
    let bob = common::login(&b_box.base, "bob");
    let room = common::create_room(
        &a_box.base,
        &alice,
        serde_json::json!({"preset": "public_chat", "name": "Через DNS"}),
    );
    common::call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            a_box.base,
            common::enc(&room)
        ),
        &alice,
        serde_json::json!({"user_id": "@bob:b.test"}),
    )
    .expect("invite @bob:b.test: A finds B by _matrix-fed._tcp.b.test");
    common::call(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}",
            b_box.base,
            common::enc(&room)
        ),
        &bob,
        serde_json::json!({}),
    )
    .expect("bob joins through a.test: B finds A by _matrix._tcp.a.test");
    common::send(&b_box.base, &bob, &room, "dns1", "нашёл по SRV");
    wait_for_message(&a_box.base, &alice, &room, "нашёл по SRV");
    common::send(&a_box.base, &alice, &room, "dns2", "и я тебя");
    wait_for_message(&b_box.base, &bob, &room, "и я тебя");
    let status = common::admin(da, &["federation"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("b.test") && l.contains("queued 0")),
        "{status}"
    );
}
