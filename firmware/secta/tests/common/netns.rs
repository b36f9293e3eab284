//! Network namespaces made by a test, and the processes run in them; all are
//! removed when the `Lab` is dropped. Every wait is bounded.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `secta` binary under test.
pub fn secta() -> &'static str {
    env!("CARGO_BIN_EXE_secta")
}

/// `secta admin --data DATA vpn ARGS…`.
pub fn vpn_admin(data: &Path, args: &[&str]) -> Output {
    let data = data.to_str().unwrap();
    sh(&[&[secta(), "admin", "--data", data, "vpn"], args].concat())
}

/// [`vpn_admin`] that must succeed; its standard output.
pub fn vpn_admin_ok(data: &Path, args: &[&str]) -> String {
    let data = data.to_str().unwrap();
    ok(&[&[secta(), "admin", "--data", data, "vpn"], args].concat())
}

/// Why namespace tests cannot run here (root, `ip netns`, the files in `tools`).
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if sh(&["id", "-u"]).stdout != b"0\n" {
        return Some("not root".into());
    }
    for t in tools {
        if !Path::new(t).exists() {
            return Some(format!("{t} is missing"));
        }
    }
    let probe = "secta-t-wgprobe";
    let made = sh(&["ip", "netns", "add", probe]);
    if !made.status.success() {
        return Some(format!(
            "ip netns unavailable: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    let _ = sh(&["ip", "netns", "del", probe]);
    None
}

/// Namespaces and the children running in them.
pub struct Lab {
    pub names: Vec<String>,
    pub children: Vec<(String, Child)>,
}

impl Lab {
    /// Creates the namespaces (deleting leftovers of an earlier run), loopback up.
    pub fn new(names: &[&str]) -> Lab {
        for n in names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
        for n in names {
            ok(&["ip", "netns", "add", n]);
            ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        Lab {
            names: names.iter().map(|s| s.to_string()).collect(),
            children: Vec::new(),
        }
    }

    /// A veth pair `a_if`@`a` (address `a_addr`) — `b_if`@`b` (address `b_addr`).
    pub fn veth(&self, a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
        ok(&[
            "ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        for (n, i, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            ok(&["ip", "-n", n, "addr", "add", addr, "dev", i]);
            ok(&["ip", "-n", n, "link", "set", i, "up"]);
        }
    }

    /// Runs a command in a namespace and waits for it.
    pub fn run(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Starts a long-running command in a namespace; output goes to `log`.
    pub fn spawn(&mut self, label: &str, ns: &str, args: &[&str], log: &Path) {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        self.children.push((label.to_owned(), child));
    }

    /// Stops a child started with `spawn` (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, label: &str, graceful: bool) {
        let Some(i) = self.children.iter().position(|(l, _)| l == label) else {
            return;
        };
        let (_, mut c) = self.children.remove(i);
        if graceful {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts wireguard-go (foreground) for `iface` in `ns` and waits until its
    /// UAPI socket answers (a stale socket from an earlier run is removed first).
    pub fn wireguard_go(&mut self, ns: &str, iface: &str, log: &Path) {
        let sock = Path::new("/var/run/wireguard").join(format!("{iface}.sock"));
        let _ = std::fs::remove_file(&sock);
        self.spawn(iface, ns, &["wireguard-go", "-f", iface], log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts tcpdump on `iface` in `ns`, writing every packet matching
    /// `filter` to `pcap` at once (immediate mode), and waits for it to listen.
    pub fn capture(&mut self, label: &str, ns: &str, iface: &str, pcap: &Path, filter: &str) {
        let log = pcap.with_extension("log");
        self.spawn(
            label,
            ns,
            &[
                "tcpdump",
                "-U",
                "--immediate-mode",
                "-n",
                "-i",
                iface,
                "-w",
                pcap.to_str().unwrap(),
                filter,
            ],
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `ping` from `ns` to `to` gets one answer within a second.
    pub fn ping(&self, ns: &str, to: &str) -> bool {
        self.run(ns, &["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
    }

    /// Waits up to `secs` for `ping` to succeed.
    pub fn wait_ping(&self, ns: &str, to: &str, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self.ping(ns, to) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (_, c) in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// SHA-256 of a file, via sha256sum run in a namespace (or here).
pub fn sha256(path: &Path) -> String {
    let out = ok(&["sha256sum", path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_owned()
}
