//! Network effects around the tunnels (addresses, routes, policy rules,
//! sysctls, nftables) behind the [`Net`] trait: [`SystemNet`] runs `ip`, `nft`
//! and writes `/proc/sys`; [`SimNet`] records what would be done, for tests.

use std::{fmt, process::Command};

use anyhow::{bail, Context};
use ipnet::IpNet;
use parking_lot::Mutex;

/// One change to the network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// Bring an interface up with an MTU.
    LinkUp {
        iface: String,
        mtu: u16,
    },
    AddrAdd {
        iface: String,
        addr: IpNet,
    },
    /// A route through an interface, in `table` (None: main).
    Route {
        dest: IpNet,
        iface: String,
        table: Option<u32>,
    },
    /// Drop everything to `dest` in `table` (the kill switch), below any other route.
    Blackhole {
        dest: IpNet,
        table: u32,
    },
    Rule(Rule),
    /// Write a sysctl (`net.ipv4.conf.all.rp_filter`).
    Sysctl {
        key: String,
        value: String,
    },
}

/// An `ip rule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    pub iif: Option<String>,
    pub fwmark: Option<u32>,
    pub action: RuleAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    Lookup(u32),
    /// Refuse with "administratively prohibited".
    Prohibit,
}

impl Rule {
    fn args(&self) -> Vec<String> {
        let mut a = vec![if self.v6 { "-6" } else { "-4" }.to_owned(), "rule".into()];
        a.push("add".into());
        a.extend(["priority".into(), self.priority.to_string()]);
        if let Some(f) = self.from {
            a.extend(["from".into(), f.to_string()]);
        }
        if let Some(t) = self.to {
            a.extend(["to".into(), t.to_string()]);
        }
        if let Some(i) = &self.iif {
            a.extend(["iif".into(), i.clone()]);
        }
        if let Some(m) = self.fwmark {
            a.extend(["fwmark".into(), format!("{m:#x}")]);
        }
        match self.action {
            RuleAction::Lookup(t) => a.extend(["lookup".into(), t.to_string()]),
            RuleAction::Prohibit => a.push("prohibit".into()),
        }
        a
    }
}

impl NetOp {
    /// The `ip` arguments that make this change (`None` for sysctls).
    pub fn ip_args(&self) -> Option<Vec<String>> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Some(match self {
            NetOp::LinkUp { iface, mtu } => {
                s(&["link", "set", "dev", iface, "mtu", &mtu.to_string(), "up"])
            }
            NetOp::AddrAdd { iface, addr } => {
                s(&["addr", "replace", &addr.to_string(), "dev", iface])
            }
            NetOp::Route { dest, iface, table } => {
                let mut a = s(&[
                    fam(dest),
                    "route",
                    "replace",
                    &dest.to_string(),
                    "dev",
                    iface,
                ]);
                if let Some(t) = table {
                    a.extend(["table".into(), t.to_string()]);
                }
                a
            }
            NetOp::Blackhole { dest, table } => s(&[
                fam(dest),
                "route",
                "replace",
                "blackhole",
                &dest.to_string(),
                "table",
                &table.to_string(),
                "metric",
                "4000000000",
            ]),
            NetOp::Rule(r) => r.args(),
            NetOp::Sysctl { .. } => return None,
        })
    }

    /// The `ip` arguments that undo this change, for teardown.
    pub fn undo_args(&self) -> Option<Vec<String>> {
        let mut a = self.ip_args()?;
        match self {
            NetOp::LinkUp { .. } | NetOp::AddrAdd { .. } => return None,
            NetOp::Route { .. } | NetOp::Blackhole { .. } => {
                let i = a.iter().position(|x| x == "replace")?;
                a[i] = "del".into();
            }
            NetOp::Rule(_) => {
                let i = a.iter().position(|x| x == "add")?;
                a[i] = "del".into();
            }
            NetOp::Sysctl { .. } => return None,
        }
        Some(a)
    }
}

fn fam(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetOp::Sysctl { key, value } => write!(f, "sysctl {key}={value}"),
            _ => write!(f, "ip {}", self.ip_args().unwrap_or_default().join(" ")),
        }
    }
}

/// Applies network changes.
pub trait Net: Send + Sync {
    fn apply(&self, op: &NetOp) -> anyhow::Result<()>;
    /// Undoes a change (best effort; missing state is not an error).
    fn undo(&self, op: &NetOp);
    /// Replaces the nftables table `name` (family inet) with `body`, or deletes it (`None`).
    fn nft_table(&self, name: &str, body: Option<&str>) -> anyhow::Result<()>;
}

/// The real backend: `ip`, `nft`, `/proc/sys`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemNet;

fn run(program: &str, args: &[String]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net for SystemNet {
    fn apply(&self, op: &NetOp) -> anyhow::Result<()> {
        tracing::debug!(%op, "network change");
        match op {
            NetOp::Sysctl { key, value } => {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, value).with_context(|| format!("writing {path}"))
            }
            NetOp::Rule(_) => {
                // Rules are not idempotent: delete a twin first.
                if let Some(undo) = op.undo_args() {
                    let _ = Command::new("ip").args(&undo).output();
                }
                run("ip", &op.ip_args().expect("ip op"))
            }
            _ => run("ip", &op.ip_args().expect("ip op")),
        }
    }

    fn undo(&self, op: &NetOp) {
        if let Some(a) = op.undo_args() {
            let _ = Command::new("ip").args(&a).output();
        }
    }

    fn nft_table(&self, name: &str, body: Option<&str>) -> anyhow::Result<()> {
        use std::io::Write;
        let mut text = format!("table inet {name} {{}}\ndelete table inet {name}\n");
        if let Some(b) = body {
            text.push_str(&format!("table inet {name} {{\n{b}}}\n"));
        }
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft (is nftables installed?)")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Records changes instead of making them.
#[derive(Debug, Default)]
pub struct SimNet {
    pub ops: Mutex<Vec<NetOp>>,
    pub undone: Mutex<Vec<NetOp>>,
    pub nft: Mutex<Vec<(String, Option<String>)>>,
}

impl Net for SimNet {
    fn apply(&self, op: &NetOp) -> anyhow::Result<()> {
        self.ops.lock().push(op.clone());
        Ok(())
    }
    fn undo(&self, op: &NetOp) {
        self.undone.lock().push(op.clone());
    }
    fn nft_table(&self, name: &str, body: Option<&str>) -> anyhow::Result<()> {
        self.nft
            .lock()
            .push((name.to_owned(), body.map(str::to_owned)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_become_ip_commands_and_their_undo() {
        let r = NetOp::Rule(Rule {
            v6: false,
            priority: 10000,
            from: None,
            to: None,
            iif: Some("wlan0".into()),
            fwmark: None,
            action: RuleAction::Lookup(51820),
        });
        assert_eq!(
            r.to_string(),
            "ip -4 rule add priority 10000 iif wlan0 lookup 51820"
        );
        assert_eq!(
            r.undo_args().unwrap().join(" "),
            "-4 rule del priority 10000 iif wlan0 lookup 51820"
        );
        let b = NetOp::Blackhole {
            dest: "0.0.0.0/0".parse().unwrap(),
            table: 51820,
        };
        assert_eq!(
            b.to_string(),
            "ip -4 route replace blackhole 0.0.0.0/0 table 51820 metric 4000000000"
        );
        assert!(b.undo_args().unwrap().contains(&"del".to_owned()));
        let l = NetOp::LinkUp {
            iface: "secta-wg".into(),
            mtu: 1420,
        };
        assert_eq!(l.to_string(), "ip link set dev secta-wg mtu 1420 up");
        assert!(l.undo_args().is_none());
    }
}
