//! Helpers for tests that drive real external programs (Pebble, proxies, packet capture): skip
//! or require a tool, pick a free port, run a child process killed on drop with its output in a
//! log file. Not for: the blindpost harness itself (`common/mod.rs`), nor assertions.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// Set to `1` (CI does) to turn a missing tool into a failure instead of a skip.
pub const REQUIRE_TOOLS_ENV: &str = "BLINDPOST_REQUIRE_NETWORK_TOOLS";

/// Whether every program in `tools` is installed. When one is missing: fails the test if
/// `BLINDPOST_REQUIRE_NETWORK_TOOLS=1`, otherwise prints `SKIPPED {test}: {tool} is not
/// installed` to stderr and returns `false` (the caller returns, and the test passes).
pub fn tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let Some(missing) = tools.iter().find(|tool| on_path(tool).is_none()) else {
        return true;
    };
    let message = format!("{test}: {missing} is not installed");
    if std::env::var_os(REQUIRE_TOOLS_ENV).is_some_and(|v| v == "1") {
        panic!("{message} and {REQUIRE_TOOLS_ENV}=1 requires it");
    }
    // Straight to stderr, past libtest's capture, so a plain `cargo test` shows the skip.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {message}");
    false
}

/// The first executable file named `program` on `PATH`.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    meta.is_file()
}

/// A port on 127.0.0.1 free right now for both TCP and UDP. Racy by nature (another process
/// may take it before the child binds it): bind listeners yourself where you can.
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port on loopback");
        let port = tcp.local_addr().expect("bound address").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process, killed and reaped when dropped; stdout and stderr go to `log`.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `command` with its output in `{log_dir}/{name}.log`.
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> ChildGuard {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create the child's log file");
        let err = out.try_clone().expect("clone the log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// What the child printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test, with the child's output, if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited early ({status}); its output:\n{}",
                self.name,
                self.output()
            );
        }
    }

    /// The exit status, if the child has exited (or was stopped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match &mut self.child {
            Some(child) => child.try_wait().expect("poll the child"),
            None => Some(ExitStatus::default()),
        }
    }

    /// Kills the child and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}
