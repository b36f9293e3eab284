//! The captive portal as phones meet it: probes say "captive" until the client
//! accepts, then exactly what the real services say; the RFC 8908 API; sessions
//! that expire; one client cannot accept for another.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{body::Body, extract::ConnectInfo, http::Request};
use secta_hotspot::{HotspotConfig, Portal, SimFirewall};
use tower::ServiceExt;

struct Reply {
    status: u16,
    location: Option<String>,
    content_type: Option<String>,
    cache: Option<String>,
    body: String,
}

async fn get(portal: &Arc<Portal>, client: &str, method: &str, host: &str, path: &str) -> Reply {
    let addr: SocketAddr = format!("{client}:40000").parse().unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    let resp = portal.router().oneshot(req).await.unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, location, content_type, cache) = (
        resp.status().as_u16(),
        h("location"),
        h("content-type"),
        h("cache-control"),
    );
    let body = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    Reply {
        status,
        location,
        content_type,
        cache,
        body,
    }
}

fn portal(session: Option<Duration>) -> (Arc<Portal>, Arc<SimFirewall>) {
    let fw = Arc::new(SimFirewall::default());
    let p = Portal::with_session(
        HotspotConfig::default(),
        "Секта".into(),
        fw.clone(),
        session,
    );
    (p, fw)
}

const PROBES: &[(&str, &str)] = &[
    ("connectivitycheck.gstatic.com", "/generate_204"),
    ("clients3.google.com", "/generate_204"),
    ("connectivitycheck.android.com", "/gen_204"),
    ("captive.apple.com", "/hotspot-detect.html"),
    ("www.msftconnecttest.com", "/connecttest.txt"),
    ("www.msftncsi.com", "/ncsi.txt"),
    ("detectportal.firefox.com", "/success.txt"),
    ("nmcheck.gnome.org", "/check_network_status.txt"),
];

#[tokio::test]
async fn probes_say_captive_then_exactly_online() {
    let (p, fw) = portal(None);
    let me = "10.42.0.77";
    for (host, path) in PROBES {
        let r = get(&p, me, "GET", host, path).await;
        assert_eq!(
            (r.status, r.location.as_deref()),
            (302, Some("http://secta.box/")),
            "{host}{path} before acceptance"
        );
    }
    // Any other web page also leads to the portal.
    let r = get(&p, me, "GET", "example.org", "/news").await;
    assert_eq!(r.status, 302);
    let r = get(&p, me, "GET", "secta.box", "/api/captive").await;
    assert_eq!(r.content_type.as_deref(), Some("application/captive+json"));
    assert_eq!(r.cache.as_deref(), Some("private, no-store"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["captive"], true);
    assert_eq!(v["user-portal-url"], "http://secta.box/");

    let page = get(&p, me, "GET", "secta.box", "/").await;
    assert!(page.body.contains("Добро пожаловать") && page.body.contains("action=\"/accept\""));
    assert_eq!(
        get(&p, me, "POST", "secta.box", "/accept").await.status,
        200
    );
    assert!(
        fw.allowed().contains(&me.parse().unwrap()),
        "the firewall opened for this client"
    );

    let expect: &[(&str, u16, &str)] = &[
        ("connectivitycheck.gstatic.com", 204, ""),
        ("clients3.google.com", 204, ""),
        ("connectivitycheck.android.com", 204, ""),
        (
            "captive.apple.com",
            200,
            "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>",
        ),
        ("www.msftconnecttest.com", 200, "Microsoft Connect Test"),
        ("www.msftncsi.com", 200, "Microsoft NCSI"),
        ("detectportal.firefox.com", 200, "success\n"),
        ("nmcheck.gnome.org", 200, "NetworkManager is online\n"),
    ];
    for ((host, path), (h2, status, body)) in PROBES.iter().zip(expect) {
        assert_eq!(host, h2);
        let r = get(&p, me, "GET", host, path).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (*status, *body),
            "{host}{path} after acceptance"
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(&get(&p, me, "GET", "secta.box", "/api/captive").await.body).unwrap();
    assert_eq!(v["captive"], false);

    // Another phone is still captive: acceptance is per client, by its address.
    let other = get(
        &p,
        "10.42.0.78",
        "GET",
        "captive.apple.com",
        "/hotspot-detect.html",
    )
    .await;
    assert_eq!(other.status, 302);
    assert!(!fw.allowed().contains(&"10.42.0.78".parse().unwrap()));
}

#[tokio::test]
async fn sessions_expire_and_close_the_firewall() {
    let (p, fw) = portal(Some(Duration::from_millis(200)));
    let me: IpAddr = "10.42.0.90".parse().unwrap();
    assert_eq!(
        get(&p, "10.42.0.90", "POST", "secta.box", "/accept")
            .await
            .status,
        200
    );
    let v: serde_json::Value = serde_json::from_str(
        &get(&p, "10.42.0.90", "GET", "secta.box", "/api/captive")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(v["captive"], false);
    assert!(v["seconds-remaining"].is_u64());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!p.is_accepted(me));
    assert_eq!(p.expire(), 1);
    assert!(fw.allowed().is_empty(), "expired clients lose forwarding");
    let r = get(
        &p,
        "10.42.0.90",
        "GET",
        "connectivitycheck.gstatic.com",
        "/generate_204",
    )
    .await;
    assert_eq!(r.status, 302, "captive again after expiry");
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let (p, fw) = portal(None);
    let addr: SocketAddr = "10.42.0.5:1234".parse().unwrap();
    let mut req = Request::builder()
        .method("POST")
        .uri("/accept")
        .header("host", "secta.box")
        .header("content-length", "1000000")
        .body(Body::from(vec![b'x'; 1_000_000]))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    let resp = p.router().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert!(fw.allowed().is_empty(), "a refused request changes nothing");
    assert!(!p.is_accepted(addr.ip()));
}

#[tokio::test]
async fn oversized_headers_are_refused_clearly() {
    let (p, fw) = portal(None);
    let addr: SocketAddr = "10.42.0.6:1234".parse().unwrap();
    let mut req = Request::builder()
        .method("POST")
        .uri("/accept")
        .header("host", "secta.box")
        .header("cookie", "x".repeat(20_000))
        .body(Body::empty())
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    let resp = p.router().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&body).contains("Request headers too large"));
    assert!(fw.allowed().is_empty());
    // Ordinary requests still work.
    assert_eq!(
        get(&p, "10.42.0.6", "GET", "secta.box", "/api/captive")
            .await
            .status,
        200
    );
}

/// A client is known by its connection's address; its MAC comes from dnsmasq's
/// lease table, never from what it sends (a form field naming another MAC is ignored).
#[tokio::test]
async fn clients_mac_comes_from_the_lease_table_not_the_form() {
    let (p, _fw) = portal(None);
    let dir = std::env::temp_dir().join(format!("secta-portal-leases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let leases = dir.join("dnsmasq.leases");
    std::fs::write(
        &leases,
        "4000000000 02:00:00:00:00:0a 10.42.0.10 phone-a *\n4000000000 02:00:00:00:00:0b 10.42.0.11 phone-b *\n",
    )
    .unwrap();
    p.set_lease_file(leases);
    // Client A posts a form claiming to be B's MAC (and B's address).
    let addr: SocketAddr = "10.42.0.10:5555".parse().unwrap();
    let mut req = Request::builder()
        .method("POST")
        .uri("/accept")
        .header("host", "secta.box")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("mac=02%3A00%3A00%3A00%3A00%3A0b&ip=10.42.0.11"))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    assert_eq!(
        p.router().oneshot(req).await.unwrap().status().as_u16(),
        200
    );
    let a = p.client("10.42.0.10".parse().unwrap());
    let b = p.client("10.42.0.11".parse().unwrap());
    assert!(
        a.accepted && a.mac.as_deref() == Some("02:00:00:00:00:0a"),
        "{a:?}"
    );
    assert!(!b.accepted, "B was not accepted by A's form: {b:?}");
    let all = p.clients();
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().filter(|c| c.accepted).count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Vendors' Android builds probe their own hosts with Google's path: after
/// acceptance they get 204 too (offline every name resolves to the box).
#[tokio::test]
async fn vendor_android_probes_get_204_after_acceptance() {
    let (p, _fw) = portal(None);
    let before = get(
        &p,
        "10.42.0.9",
        "GET",
        "connect.rom.miui.com",
        "/generate_204",
    )
    .await;
    assert_eq!(before.status, 302);
    assert_eq!(
        get(&p, "10.42.0.9", "POST", "secta.box", "/accept")
            .await
            .status,
        200
    );
    for host in [
        "connect.rom.miui.com",
        "connectivitycheck.platform.hicloud.com",
        "wifi.vivo.com.cn",
    ] {
        assert_eq!(
            get(&p, "10.42.0.9", "GET", host, "/generate_204")
                .await
                .status,
            204,
            "{host}"
        );
    }
    // Other pages on other hosts still say the box is offline.
    assert_eq!(
        get(&p, "10.42.0.9", "GET", "example.org", "/").await.status,
        200
    );
}
