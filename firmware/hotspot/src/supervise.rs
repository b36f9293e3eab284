//! Runs hostapd and dnsmasq with the generated files and restarts them when they die.

use std::time::Duration;

/// What the box knows about one supervised program (for the admin pages).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProcStatus {
    pub name: &'static str,
    pub running: bool,
    pub pid: Option<u32>,
    /// Starts after the first one (crashes, and restarts for new settings).
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
}

/// A supervised program: its status, and a way to restart it (new settings).
#[derive(Debug)]
pub struct Supervised {
    status: std::sync::Mutex<ProcStatus>,
    restart: tokio::sync::Notify,
}

impl Supervised {
    pub fn new(name: &'static str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            status: std::sync::Mutex::new(ProcStatus {
                name,
                ..Default::default()
            }),
            restart: tokio::sync::Notify::new(),
        })
    }

    pub fn status(&self) -> ProcStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the program and starts it again at once (it rereads its files).
    pub fn restart(&self) {
        self.restart.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut ProcStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Keeps `program args…` running until shutdown: restarts it with a growing pause
/// (1 s doubling to 30 s) whenever it exits, at once when [`Supervised::restart`]
/// is called, and stops it on shutdown.
pub async fn supervise(
    handle: std::sync::Arc<Supervised>,
    program: String,
    args: Vec<String>,
    shutdown: secta_runtime::Shutdown,
) {
    let name = handle.status().name;
    let mut pause = Duration::from_secs(1);
    let mut first = true;
    loop {
        if !first {
            handle.update(|s| s.restarts += 1);
        }
        first = false;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        // If secta itself dies (killed, crashed), its hostapd and dnsmasq go
        // with it rather than holding the Wi-Fi and DHCP for a restarted box.
        // The signal follows the spawning thread: a runtime worker, which
        // lives as long as the runtime.
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = name, error = %e, "cannot start");
                handle.update(|s| {
                    s.running = false;
                    s.last_error = Some(e.to_string());
                });
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => continue,
                    _ = handle.restart.notified() => continue,
                    _ = shutdown.clone().wait() => return,
                }
            }
        };
        tracing::info!(program = name, "started");
        handle.update(|s| {
            s.running = true;
            s.pid = child.id();
            s.last_error = None;
        });
        let started = std::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                tracing::warn!(program = name, status = ?status.as_ref().ok(), "exited; restarting");
                handle.update(|s| {
                    s.running = false;
                    s.pid = None;
                    s.last_exit = Some(match status {
                        Ok(st) => st.to_string(),
                        Err(e) => e.to_string(),
                    });
                });
                if started.elapsed() > Duration::from_secs(60) {
                    pause = Duration::from_secs(1);
                }
            }
            _ = handle.restart.notified() => {
                tracing::info!(program = name, "restarting for new settings");
                let _ = child.kill().await;
                handle.update(|s| {
                    s.running = false;
                    s.pid = None;
                });
                pause = Duration::from_secs(1);
                continue;
            }
            _ = shutdown.clone().wait() => {
                let _ = child.kill().await;
                handle.update(|s| {
                    s.running = false;
                    s.pid = None;
                });
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = handle.restart.notified() => {}
            _ = shutdown.clone().wait() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
