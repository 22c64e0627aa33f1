//! Network namespaces for tests that need more than loopback: each test
//! creates its own (named after the test process, so parallel runs do not
//! collide) and deletes it when the owning handle drops. Needs root.

use std::os::fd::AsRawFd;

/// A network namespace, deleted when its owner drops.
pub struct Netns {
    pub name: String,
    owner: bool,
}

impl Netns {
    /// Create `weft-<pid>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("weft-{}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, owner: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Another handle on the namespace, which does not delete it.
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owner: false,
        }
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Run a command inside the namespace; returns its stdout.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, cmd: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c
    }

    /// Run `f`'s future on a thread whose network namespace is this one:
    /// every socket it opens (sidecars, apps) lives in the namespace.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Run `cmd ARGS…` to completion; panics with its stderr unless it succeeds.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
