//! `weft iptables install|uninstall`: the rules an init container (with
//! NET_ADMIN) puts in a pod's network namespace so the app's traffic goes
//! through the sidecar without the app knowing.
//!
//! - **Outbound**: every TCP connection the pod makes is redirected (nat
//!   OUTPUT → REDIRECT) to the sidecar's capture port, except the
//!   sidecar's own (matched by its UID or GID, so its connections to peers
//!   and passthrough destinations are not captured again), loopback, and the
//!   configured ports and CIDRs. The sidecar reads where the app meant to
//!   go with `SO_ORIGINAL_DST`.
//! - **Inbound**: mesh traffic arrives as QUIC on UDP and reaches the app
//!   from the sidecar over loopback. In `strict` mode every new TCP
//!   connection from outside the pod to a captured port is refused with a
//!   TCP reset (filter INPUT), so only mesh traffic reaches the app; in
//!   `permissive` mode plain TCP still passes (for migrating a namespace).
//!
//! Rules live in our own chains (`WEFT_*`), installed with
//! `iptables-restore --noflush` for IPv4 and IPv6 alike; install removes
//! any earlier copy first, so running it twice leaves one set.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Our chains, by table.
const NAT_CHAINS: &[&str] = &["WEFT_OUTPUT", "WEFT_REDIRECT"];
const FILTER_CHAINS: &[&str] = &["WEFT_INBOUND"];

/// What to capture.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The sidecar's outbound capture port (its `--capture-outbound` listeners).
    pub outbound_port: u16,
    /// The sidecar's UID and GID: their connections are never captured.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Destination ports whose outbound traffic is not captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks whose outbound traffic is not captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub inbound_mode: InboundMode,
    /// Ports refused to non-mesh clients in strict mode; `None`: all TCP ports.
    pub inbound_ports: Option<Vec<u16>>,
    /// Ports always open (admin/probes, say), even in strict mode.
    pub exclude_inbound_ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMode {
    /// Only mesh traffic reaches the app: plain TCP from outside is refused.
    Strict,
    /// Plain TCP from outside still reaches the app.
    Permissive,
}

/// An IP network, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network like 10.0.0.0/8 or fd00::/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// IPv4 or IPv6: one script each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
    fn has(self, addr: IpAddr) -> bool {
        matches!(
            (self, addr),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

fn ports(list: &[u16]) -> String {
    list.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Rules {
    /// The `iptables-restore --noflush` input for `family`.
    pub fn script(&self, family: Family) -> String {
        let mut s = String::new();
        // nat: outbound capture.
        s.push_str("*nat\n:WEFT_OUTPUT - [0:0]\n:WEFT_REDIRECT - [0:0]\n");
        let _ = writeln!(
            s,
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        s.push_str("-A OUTPUT -p tcp -j WEFT_OUTPUT\n");
        let _ = writeln!(
            s,
            "-A WEFT_OUTPUT -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(
            s,
            "-A WEFT_OUTPUT -m owner --gid-owner {} -j RETURN",
            self.proxy_gid
        );
        // Loopback: the app talking to itself, or to the sidecar's listeners.
        s.push_str("-A WEFT_OUTPUT -o lo -j RETURN\n");
        let _ = writeln!(s, "-A WEFT_OUTPUT -d {} -j RETURN", family.loopback());
        // multiport takes at most 15 ports per rule.
        for chunk in self.exclude_outbound_ports.chunks(15) {
            let _ = writeln!(
                s,
                "-A WEFT_OUTPUT -p tcp -m multiport --dports {} -j RETURN",
                ports(chunk)
            );
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| family.has(c.addr))
        {
            let _ = writeln!(s, "-A WEFT_OUTPUT -d {cidr} -j RETURN");
        }
        s.push_str("-A WEFT_OUTPUT -j WEFT_REDIRECT\nCOMMIT\n");
        // filter: inbound, strict mode only.
        if self.inbound_mode == InboundMode::Strict {
            s.push_str("*filter\n:WEFT_INBOUND - [0:0]\n");
            s.push_str("-A INPUT -p tcp -j WEFT_INBOUND\n");
            s.push_str("-A WEFT_INBOUND -i lo -j RETURN\n");
            for chunk in self.exclude_inbound_ports.chunks(15) {
                let _ = writeln!(
                    s,
                    "-A WEFT_INBOUND -p tcp -m multiport --dports {} -j RETURN",
                    ports(chunk)
                );
            }
            // Only new connections (SYN without ACK): replies to the pod's
            // own outbound connections still come in.
            match &self.inbound_ports {
                None => {
                    s.push_str("-A WEFT_INBOUND -p tcp --syn -j REJECT --reject-with tcp-reset\n")
                }
                Some(list) => {
                    for chunk in list.chunks(15) {
                        let _ = writeln!(
                            s,
                            "-A WEFT_INBOUND -p tcp --syn -m multiport --dports {} -j REJECT --reject-with tcp-reset",
                            ports(chunk)
                        );
                    }
                }
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// Whether this kernel has IPv6 at all (pods may run without it).
fn ipv6_available() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

fn families() -> Vec<Family> {
    if ipv6_available() {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Install `rules` for IPv4 and (when the kernel has it) IPv6, replacing
/// any earlier Weft rules.
pub fn install(rules: &Rules) -> Result<(), String> {
    uninstall()?;
    for family in families() {
        let script = rules.script(family);
        let mut child = Command::new(family.restore())
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "running {}: {e} (install the iptables package)",
                    family.restore()
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("writing rules to {}: {e}", family.restore()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {}: {e}", family.restore()))?;
        if !out.status.success() {
            return Err(format!(
                "{} refused the rules: {}\nrules were:\n{script}",
                family.restore(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Remove every Weft rule and chain; nothing to remove is not an error.
pub fn uninstall() -> Result<(), String> {
    for family in families() {
        let ipt = family.iptables();
        let run = |args: &[&str]| {
            Command::new(ipt)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("running {ipt}: {e} (install the iptables package)"))
        };
        for (table, hook, chain, extra) in [
            ("nat", "OUTPUT", "WEFT_OUTPUT", &["-p", "tcp"][..]),
            ("filter", "INPUT", "WEFT_INBOUND", &["-p", "tcp"][..]),
        ] {
            // Delete every jump into our chain (install may have run twice
            // by hand with different tools).
            loop {
                let mut args = vec!["-w", "-t", table, "-D", hook];
                args.extend_from_slice(extra);
                args.extend_from_slice(&["-j", chain]);
                if !run(&args)?.success() {
                    break;
                }
            }
        }
        for (table, chains) in [("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)] {
            for chain in chains {
                let _ = run(&["-w", "-t", table, "-F", chain])?;
            }
            for chain in chains {
                let _ = run(&["-w", "-t", table, "-X", chain])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            outbound_port: 15001,
            proxy_uid: 1337,
            proxy_gid: 1337,
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            inbound_mode: InboundMode::Strict,
            inbound_ports: None,
            exclude_inbound_ports: vec![15000],
        }
    }

    #[test]
    fn strict_v4_script() {
        let s = rules().script(Family::V4);
        let expected = "\
*nat
:WEFT_OUTPUT - [0:0]
:WEFT_REDIRECT - [0:0]
-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A OUTPUT -p tcp -j WEFT_OUTPUT
-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A WEFT_OUTPUT -o lo -j RETURN
-A WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN
-A WEFT_OUTPUT -j WEFT_REDIRECT
COMMIT
*filter
:WEFT_INBOUND - [0:0]
-A INPUT -p tcp -j WEFT_INBOUND
-A WEFT_INBOUND -i lo -j RETURN
-A WEFT_INBOUND -p tcp -m multiport --dports 15000 -j RETURN
-A WEFT_INBOUND -p tcp --syn -j REJECT --reject-with tcp-reset
COMMIT
";
        assert_eq!(s, expected);
    }

    #[test]
    fn exclusions_go_to_their_family_and_ports_are_chunked() {
        let mut r = rules();
        r.exclude_outbound_cidrs = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        r.exclude_outbound_ports = (1..=16).collect();
        r.inbound_ports = Some(vec![8080, 9090]);
        let v4 = r.script(Family::V4);
        let v6 = r.script(Family::V6);
        assert!(v4.contains("-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN"));
        assert!(!v4.contains("fd00::"));
        assert!(v6.contains("-A WEFT_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(v6.contains("-d ::1/128 -j RETURN"));
        assert!(!v6.contains("10.0.0.0"));
        assert!(v4.contains("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN"));
        assert!(v4.contains("--dports 16 -j RETURN"));
        assert!(v4.contains("--syn -m multiport --dports 8080,9090 -j REJECT"));
        assert!(!v4.contains("--syn -j REJECT"));
    }

    #[test]
    fn permissive_mode_has_no_filter_rules() {
        let mut r = rules();
        r.inbound_mode = InboundMode::Permissive;
        let s = r.script(Family::V4);
        assert!(!s.contains("*filter"));
        assert!(s.contains("REDIRECT --to-ports 15001"));
    }

    #[test]
    fn cidrs_parse_or_explain() {
        assert_eq!(
            "10.1.0.0/16".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0..=32"));
        assert!("banana/8".parse::<Cidr>().is_err());
    }
}
