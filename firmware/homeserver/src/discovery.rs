//! Server discovery: where to send requests for a server name, in the order
//! of the spec's "Resolving server names" (IP literal; explicit port;
//! `/.well-known/matrix/server` and its delegation rules; `_matrix-fed._tcp`
//! SRV, then the deprecated `_matrix._tcp`; port 8448), with results cached
//! for as long as DNS TTLs and the well-known response's cache headers allow.
//!
//! SRV lookups go through hickory-resolver, to the servers of
//! `[homeserver.federation] dns_servers` or the system's `/etc/resolv.conf`;
//! A/AAAA lookups too when `dns_servers` is set, else through the system's
//! resolver. HTTPS connections are made by reqwest with a resolver that knows
//! the SRV answers: the URL keeps the name the certificate must be valid for
//! (and the `Host` header), while the connection goes to the SRV target and port.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    proto::ProtoErrorKind,
    ResolveError, ResolveErrorKind, TokioResolver,
};
use ruma::ServerName;
use serde_json::Value;

use crate::config::FederationConfig;

/// The spec's default federation port.
const DEFAULT_PORT: u16 = 8448;
/// Well-known answers without cache headers are kept this long (the spec's default)…
const WK_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// …never longer than this, nor shorter than this.
const WK_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
const WK_MIN_TTL: Duration = Duration::from_secs(60);
/// A well-known answer that is an error or invalid is remembered this long;
/// a server that could not be reached at all, a shorter time.
const WK_ERROR_TTL: Duration = Duration::from_secs(3600);
const WK_UNREACHABLE_TTL: Duration = Duration::from_secs(300);
/// A failed lookup with no TTL of its own (no SOA) is remembered this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Largest well-known body read.
const WK_MAX_BYTES: usize = 64 * 1024;
/// Cached names kept before the caches start over.
const MAX_CACHED: usize = 10_000;

/// Which rule of the spec found the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// 1: the server name is an IP literal (its port or 8448).
    IpLiteral,
    /// 2: a host name with an explicit port (A/AAAA).
    ExplicitPort,
    /// 3.1: `.well-known` delegates to an IP literal.
    DelegatedIp,
    /// 3.2: `.well-known` delegates to a host name with a port.
    DelegatedPort,
    /// 3.3: `.well-known` delegates to a host name; `_matrix-fed._tcp` SRV of it.
    DelegatedSrv,
    /// 3.4: as 3.3 with the deprecated `_matrix._tcp` SRV.
    DelegatedSrvLegacy,
    /// 3.5: `.well-known` delegates to a host name without SRV: port 8448.
    DelegatedDefault,
    /// 4: no well-known; `_matrix-fed._tcp` SRV of the server's host name.
    Srv,
    /// 5: no well-known; the deprecated `_matrix._tcp` SRV.
    SrvLegacy,
    /// 6: no well-known and no SRV: the host name, port 8448.
    Default,
}

/// Where to send a server's federation requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub step: Step,
    /// `https://` and the authority for request URLs: the name the TLS
    /// certificate must be valid for, with a port unless SRV gives it.
    pub base: String,
    /// The `Host` header to send.
    pub host: String,
    /// For SRV answers: the targets (host, port) connections go to, in order.
    pub srv: Vec<(String, u16)>,
}

/// A cached answer of `.well-known/matrix/server`.
#[derive(Clone)]
enum WellKnown {
    Delegated(String),
    None,
}

/// SRV answers by the host name put in request URLs.
type SrvMap = Arc<Mutex<HashMap<String, Vec<(String, u16)>>>>;

/// Resolves server names and holds the HTTPS clients that follow the answers.
pub struct Discovery {
    dns: TokioResolver,
    srv: SrvMap,
    well_known_http: reqwest::Client,
    http: reqwest::Client,
    http_self_signed: reqwest::Client,
    targets: Mutex<HashMap<String, (Target, Instant)>>,
    well_known: Mutex<HashMap<String, (WellKnown, Instant)>>,
}

/// DNS for reqwest: SRV names to their targets; host names through hickory
/// when DNS servers are configured, else the system's resolver (so
/// `/etc/hosts`, mDNS and the like keep working for peers named in URLs).
struct DnsForHttp {
    dns: TokioResolver,
    system: bool,
    srv: SrvMap,
}

impl reqwest::dns::Resolve for DnsForHttp {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let targets = self
            .srv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name.as_str())
            .cloned()
            // Port 0: the URL's port (or 443) is used.
            .unwrap_or_else(|| vec![(name.as_str().to_owned(), 0)]);
        let (dns, system) = (self.dns.clone(), self.system);
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            let mut last_err: Option<Box<dyn std::error::Error + Send + Sync>> = None;
            for (host, port) in targets.iter().take(8) {
                if system {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(found) => addrs.extend(found),
                        Err(e) => last_err = Some(Box::new(e)),
                    }
                    continue;
                }
                match dns.lookup_ip(fqdn(host)).await {
                    Ok(ips) => addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, *port))),
                    Err(e) => last_err = Some(Box::new(e)),
                }
            }
            if addrs.is_empty() {
                return Err(last_err.unwrap_or_else(|| "no address".into()));
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A name as an absolute DNS name (no search domains appended).
fn fqdn(host: &str) -> String {
    if host.ends_with('.') {
        host.to_owned()
    } else {
        format!("{host}.")
    }
}

/// `host:port` or `[v6]:port` split; `None` port when there is none.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let name = ServerName::parse(s).ok()?;
    Some((name.host().to_owned(), name.port()))
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

impl Discovery {
    /// Builds the resolver (configured DNS servers, or the system's) and the
    /// HTTPS clients (web PKI roots plus `ca_certificates`).
    pub fn new(cfg: &FederationConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let provider = TokioConnectionProvider::default();
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.cache_size = 1024;
        let dns = if cfg.dns_servers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(mut b) => {
                    b.options_mut().cache_size = 1024;
                    b.build()
                }
                Err(e) => {
                    // No resolv.conf (e.g. a box with the internet cut): names
                    // cannot be resolved, configured peers and IP literals still work.
                    tracing::warn!(error = %e, "no system DNS configuration; server names will not resolve");
                    TokioResolver::builder_with_config(ResolverConfig::new(), provider)
                        .with_options(opts)
                        .build()
                }
            }
        } else {
            let mut group = NameServerConfigGroup::new();
            for s in &cfg.dns_servers {
                let addr: SocketAddr = s
                    .parse()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .with_context(|| format!("dns_servers: {s:?} is not IP or IP:PORT"))?;
                group.merge(NameServerConfigGroup::from_ips_clear(
                    &[addr.ip()],
                    addr.port(),
                    true,
                ));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                provider,
            )
            .with_options(opts)
            .build()
        };
        let mut roots = Vec::new();
        for path in &cfg.ca_certificates {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading ca_certificates file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("no certificates in {}", path.display()))?;
            roots.extend(certs);
        }
        let srv: SrvMap = Arc::new(Mutex::new(HashMap::new()));
        let ua = concat!("Secta/", env!("CARGO_PKG_VERSION"));
        let client = |srv: SrvMap, self_signed: bool, redirects: bool| {
            let mut b = reqwest::Client::builder()
                .user_agent(ua)
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(10))
                .dns_resolver(Arc::new(DnsForHttp {
                    dns: dns.clone(),
                    system: cfg.dns_servers.is_empty(),
                    srv,
                }))
                .danger_accept_invalid_certs(self_signed)
                .redirect(if redirects {
                    reqwest::redirect::Policy::limited(5)
                } else {
                    reqwest::redirect::Policy::none()
                });
            for c in &roots {
                b = b.add_root_certificate(c.clone());
            }
            b.build()
        };
        Ok(Self {
            well_known_http: client(Arc::new(Mutex::new(HashMap::new())), false, true)?,
            http: client(srv.clone(), false, false)?,
            http_self_signed: client(srv.clone(), true, false)?,
            dns,
            srv,
            targets: Mutex::new(HashMap::new()),
            well_known: Mutex::new(HashMap::new()),
        })
    }

    /// The HTTPS client for federation requests (SRV-aware); with
    /// `self_signed`, one that accepts any certificate (pinned peers only).
    pub fn client(&self, self_signed: bool) -> &reqwest::Client {
        if self_signed {
            &self.http_self_signed
        } else {
            &self.http
        }
    }

    /// Where requests for `server` go, from the cache or found afresh.
    pub async fn resolve(&self, server: &ServerName) -> Result<Target, String> {
        let (host, port) = (server.host().to_owned(), server.port());
        // 1 and 2 need no lookup now (A/AAAA happen when connecting).
        if is_ip_literal(&host) {
            return Ok(Target {
                step: Step::IpLiteral,
                base: format!("https://{host}:{}", port.unwrap_or(DEFAULT_PORT)),
                host: server.to_string(),
                srv: Vec::new(),
            });
        }
        if let Some(p) = port {
            return Ok(Target {
                step: Step::ExplicitPort,
                base: format!("https://{host}:{p}"),
                host: server.to_string(),
                srv: Vec::new(),
            });
        }
        if let Some((t, until)) = self.cached(&self.targets, server.as_str()) {
            if Instant::now() < until {
                return Ok(t);
            }
        }
        let (target, until) = self.discover(&host).await?;
        if !target.srv.is_empty() {
            let url_host = target.base.trim_start_matches("https://").to_owned();
            let mut srv = self.srv.lock().unwrap_or_else(|p| p.into_inner());
            if srv.len() >= MAX_CACHED {
                srv.clear();
            }
            srv.insert(url_host, target.srv.clone());
        }
        let mut cache = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(server.to_string(), (target.clone(), until));
        Ok(target)
    }

    fn cached<T: Clone>(
        &self,
        map: &Mutex<HashMap<String, (T, Instant)>>,
        key: &str,
    ) -> Option<(T, Instant)> {
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Steps 3 to 6 for a host name without a port; the answer and until when it holds.
    async fn discover(&self, host: &str) -> Result<(Target, Instant), String> {
        let (wk, wk_until) = self.well_known(host).await;
        if let WellKnown::Delegated(d) = wk {
            let (dhost, dport) = split_host_port(&d)
                .ok_or_else(|| format!("{host}'s .well-known names an invalid server {d:?}"))?;
            if is_ip_literal(&dhost) {
                return Ok((
                    Target {
                        step: Step::DelegatedIp,
                        base: format!("https://{dhost}:{}", dport.unwrap_or(DEFAULT_PORT)),
                        host: d.clone(),
                        srv: Vec::new(),
                    },
                    wk_until,
                ));
            }
            if let Some(p) = dport {
                return Ok((
                    Target {
                        step: Step::DelegatedPort,
                        base: format!("https://{dhost}:{p}"),
                        host: d.clone(),
                        srv: Vec::new(),
                    },
                    wk_until,
                ));
            }
            let (t, until) = self
                .srv_or_default(
                    &dhost,
                    [
                        Step::DelegatedSrv,
                        Step::DelegatedSrvLegacy,
                        Step::DelegatedDefault,
                    ],
                )
                .await?;
            return Ok((t, until.min(wk_until)));
        }
        let (t, until) = self
            .srv_or_default(host, [Step::Srv, Step::SrvLegacy, Step::Default])
            .await?;
        Ok((t, until.min(wk_until)))
    }

    /// `_matrix-fed._tcp`, then `_matrix._tcp`, then port 8448, for `host`.
    async fn srv_or_default(
        &self,
        host: &str,
        steps: [Step; 3],
    ) -> Result<(Target, Instant), String> {
        let mut until = Instant::now() + WK_MAX_TTL;
        for (service, step) in [("_matrix-fed._tcp", steps[0]), ("_matrix._tcp", steps[1])] {
            match self
                .dns
                .srv_lookup(fqdn(&format!("{service}.{host}")))
                .await
            {
                Ok(lookup) => {
                    let records: Vec<SrvRecord> = lookup
                        .iter()
                        .filter(|r| !r.target().is_root())
                        .map(|r| SrvRecord {
                            priority: r.priority(),
                            weight: r.weight(),
                            target: r.target().to_utf8().trim_end_matches('.').to_owned(),
                            port: r.port(),
                        })
                        .collect();
                    if records.is_empty() {
                        continue;
                    }
                    return Ok((
                        Target {
                            step,
                            base: format!("https://{host}"),
                            host: host.to_owned(),
                            srv: srv_order(records, &mut rand::thread_rng()),
                        },
                        lookup.as_lookup().valid_until().min(until),
                    ));
                }
                Err(e) if not_found(&e).is_some() => {
                    until =
                        until.min(Instant::now() + not_found(&e).flatten().unwrap_or(NEGATIVE_TTL));
                }
                Err(e) => return Err(format!("DNS lookup of {service}.{host} failed: {e}")),
            }
        }
        Ok((
            Target {
                step: steps[2],
                base: format!("https://{host}:{DEFAULT_PORT}"),
                host: host.to_owned(),
                srv: Vec::new(),
            },
            until,
        ))
    }

    /// `https://HOST/.well-known/matrix/server`, cached.
    async fn well_known(&self, host: &str) -> (WellKnown, Instant) {
        if let Some((wk, until)) = self.cached(&self.well_known, host) {
            if Instant::now() < until {
                return (wk, until);
            }
        }
        let (wk, ttl) = self.fetch_well_known(host).await;
        let until = Instant::now() + ttl;
        let mut cache = self.well_known.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(host.to_owned(), (wk.clone(), until));
        (wk, until)
    }

    async fn fetch_well_known(&self, host: &str) -> (WellKnown, Duration) {
        let url = format!("https://{host}/.well-known/matrix/server");
        let resp = match self
            .well_known_http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(host, error = %e, "no .well-known/matrix/server");
                return (WellKnown::None, WK_UNREACHABLE_TTL);
            }
        };
        if !resp.status().is_success() {
            return (WellKnown::None, WK_ERROR_TTL);
        }
        let ttl = cache_ttl(resp.headers());
        let mut body = Vec::new();
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) if body.len() + c.len() <= WK_MAX_BYTES => body.extend_from_slice(&c),
                Ok(None) => break,
                _ => return (WellKnown::None, WK_ERROR_TTL),
            }
        }
        let delegated = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["m.server"].as_str().map(str::to_owned))
            .filter(|d| split_host_port(d).is_some());
        match delegated {
            Some(d) => (WellKnown::Delegated(d), ttl),
            None => (WellKnown::None, WK_ERROR_TTL),
        }
    }
}

/// One SRV answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SrvRecord {
    priority: u16,
    weight: u16,
    target: String,
    port: u16,
}

/// The order to try SRV targets in (RFC 2782): lowest priority first; within
/// a priority, a weighted random order (weight 0 rarely first).
fn srv_order(mut records: Vec<SrvRecord>, rng: &mut impl rand::Rng) -> Vec<(String, u16)> {
    records.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(records.len());
    while !records.is_empty() {
        let prio = records[0].priority;
        let end = records
            .iter()
            .position(|r| r.priority != prio)
            .unwrap_or(records.len());
        let mut group: Vec<SrvRecord> = records.drain(..end).collect();
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight) + 1).sum();
            let mut pick = rng.gen_range(0..total);
            let i = group
                .iter()
                .position(|r| {
                    let w = u32::from(r.weight) + 1;
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            let r = group.remove(i);
            out.push((r.target, r.port));
        }
    }
    out
}

/// For "no such record" answers: `Some(negative TTL if the answer had one)`;
/// `None` for other failures (timeouts, refused queries).
fn not_found(e: &ResolveError) -> Option<Option<Duration>> {
    if let ResolveErrorKind::Proto(p) = e.kind() {
        if let ProtoErrorKind::NoRecordsFound { negative_ttl, .. } = p.kind() {
            return Some(negative_ttl.map(|t| Duration::from_secs(u64::from(t))));
        }
    }
    None
}

/// How long a well-known answer may be kept: `Cache-Control: max-age` (or
/// `no-store`/`no-cache`: the shortest time), else `Expires`… the spec's 24 h
/// default; within [1 min, 48 h].
fn cache_ttl(headers: &reqwest::header::HeaderMap) -> Duration {
    let cc = headers
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut ttl = None;
    for part in cc.split(',').map(str::trim) {
        let lower = part.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            ttl = Some(Duration::ZERO);
        } else if let Some(v) = lower.strip_prefix("max-age=") {
            if let Ok(s) = v.trim_matches('"').parse::<u64>() {
                ttl = Some(ttl.map_or(Duration::from_secs(s), |t: Duration| {
                    t.min(Duration::from_secs(s))
                }));
            }
        }
    }
    ttl.unwrap_or(WK_DEFAULT_TTL).clamp(WK_MIN_TTL, WK_MAX_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(cache_ttl(&h), WK_DEFAULT_TTL);
        h.insert("cache-control", "public, max-age=7200".parse().unwrap());
        assert_eq!(cache_ttl(&h), Duration::from_secs(7200));
        h.insert("cache-control", "max-age=999999999".parse().unwrap());
        assert_eq!(cache_ttl(&h), WK_MAX_TTL);
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(cache_ttl(&h), WK_MIN_TTL);
    }

    #[test]
    fn srv_targets_by_priority_then_weight() {
        let rec = |priority, weight, target: &str| SrvRecord {
            priority,
            weight,
            target: target.into(),
            port: 8448,
        };
        let mut rng = rand::thread_rng();
        let mut heavy_first = 0;
        for _ in 0..1000 {
            let order = srv_order(
                vec![
                    rec(20, 0, "backup"),
                    rec(10, 90, "heavy"),
                    rec(10, 9, "light"),
                ],
                &mut rng,
            );
            let names: Vec<&str> = order.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(names[2], "backup", "{names:?}");
            heavy_first += usize::from(names[0] == "heavy");
        }
        // Weight 90 against 9 (each +1): "heavy" first about 91 % of the time.
        assert!((850..=960).contains(&heavy_first), "{heavy_first}");
    }

    #[test]
    fn names() {
        assert!(is_ip_literal("[::1]"));
        assert!(is_ip_literal("10.1.2.3"));
        assert!(!is_ip_literal("box.test"));
        assert_eq!(
            split_host_port("box.test:8448"),
            Some(("box.test".into(), Some(8448)))
        );
        assert_eq!(split_host_port("[::1]"), Some(("[::1]".into(), None)));
        assert_eq!(split_host_port("bad name"), None);
        assert_eq!(fqdn("a.test"), "a.test.");
    }
}
