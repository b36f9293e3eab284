//! Test peers for server discovery: dnsmasq as the DNS server (on loopback, a
//! free port, records given as its own options), a test certificate
//! authority, and a small HTTPS server. All stop when dropped.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// A running dnsmasq answering only for `*.test`, killed when dropped.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why dnsmasq tests cannot run here.
pub fn dnsmasq_missing() -> Option<String> {
    let found = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
        .iter()
        .any(|p| Path::new(p).exists());
    (!found).then(|| "dnsmasq is not installed".to_owned())
}

/// Starts dnsmasq on 127.0.0.1 (a free port) with `records` (dnsmasq options
/// such as `--srv-host=…` and `--host-record=…`); TTL of local answers `ttl`.
pub fn dnsmasq(dir: &Path, ttl: u32, records: &[String]) -> Dnsmasq {
    // A port free for UDP may be taken for TCP (dnsmasq binds both): when
    // dnsmasq exits at start, try another port (bounded).
    for _ in 0..5 {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let log = dir.join(format!("dnsmasq-{port}.log"));
        let mut child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local=/test/",
                "--pid-file=",
                "--user=root",
                "--log-queries",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--log-facility={}", log.display()))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started")) {
                return Dnsmasq {
                    child,
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                };
            }
            if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("dnsmasq did not start on any of 5 ports");
}

/// A test certificate authority.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Secta test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.use_authority_key_identifier_extension = true;
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns the path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

/// What a request to [`HttpsServer`] looked like.
pub struct Seen<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub sni: Option<&'a str>,
}

/// An answer: status, extra header lines, body.
pub type Answer = (u16, Vec<String>, String);

/// A small HTTPS/1.1 server on a thread, answering each request with
/// `handler` (one request per connection); stops when dropped.
pub struct HttpsServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Drop for HttpsServer {
    /// Returns once the port is closed.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HttpsServer {
    /// Listens on `addr` with the certificate `(cert, key)` (PEM).
    pub fn start(
        addr: &str,
        cert: &(String, String),
        handler: impl Fn(Seen<'_>) -> Answer + Send + 'static,
    ) -> std::io::Result<HttpsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_slice(cert.0.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut tcp) = conn else { continue };
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(mut tls) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut s = rustls::Stream::new(&mut tls, &mut tcp);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let host = text
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                            .map(|(_, v)| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                if path == "/" && host.is_empty() {
                    continue;
                }
                let sni = s.conn.server_name().map(str::to_owned);
                let (status, headers, body) = handler(Seen {
                    host: &host,
                    path: &path,
                    sni: sni.as_deref(),
                });
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for h in headers {
                    out.push_str(&h);
                    out.push_str("\r\n");
                }
                out.push_str("\r\n");
                out.push_str(&body);
                let _ = s.write_all(out.as_bytes());
                let _ = s.flush();
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
        Ok(HttpsServer {
            stop,
            thread: Some(thread),
            addr,
        })
    }
}
