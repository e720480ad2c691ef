//! Test harness for end-to-end tests: runs the real `blindpostd` on a free port with a temp
//! data dir, and the real `blindpost` binary against it, one profile directory per user.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;

use serde_json::Value;
use tempfile::TempDir;

/// Path of a workspace binary (built by `cargo test --workspace`; built here if missing).
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    if !dir.join("blindpostd").exists() || !dir.join("blindpost").exists() {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--bin", "blindpostd", "--bin", "blindpost"])
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the binaries failed");
        });
    }
    path
}

/// A running `blindpostd`.
pub struct Server {
    child: Child,
    data: TempDir,
    pub url: String,
    pub addr: String,
    /// Where its stderr (the log) goes, if captured: outside the data directory.
    log: Option<(TempDir, PathBuf)>,
}

impl Server {
    pub fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let (child, addr) = spawn_server(data.path(), "127.0.0.1:0", None);
        Self {
            child,
            url: format!("ws://{addr}"),
            addr,
            data,
            log: None,
        }
    }

    /// Starts on `ip` (port 0) logging at `level` to a file, for tests that read the log.
    pub fn start_logged(ip: &str, level: &str) -> Self {
        let data = tempfile::tempdir().unwrap();
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("blindpostd.log");
        let (child, addr) = spawn_server(
            data.path(),
            &format!("{ip}:0"),
            Some((log.as_path(), level)),
        );
        Self {
            child,
            url: format!("ws://{addr}"),
            addr,
            data,
            log: Some((log_dir, log)),
        }
    }

    /// The captured log so far.
    pub fn log(&self) -> Vec<u8> {
        let (_, path) = self.log.as_ref().expect("started with start_logged");
        std::fs::read(path).unwrap()
    }

    /// Stop (SIGTERM, wait) and start again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.log.is_none(), "restart of a logged server");
        let (child, addr) = spawn_server(self.data.path(), &self.addr, None);
        assert_eq!(addr, self.addr);
        self.child = child;
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "blindpostd exited badly on SIGTERM: {status}"
        );
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(data: &Path, listen: &str, log: Option<(&Path, &str)>) -> (Child, String) {
    // The port of a just-stopped server may linger briefly; retry binding a few times.
    for attempt in 0..50 {
        let mut command = Command::new(bin("blindpostd"));
        command
            .args(["--listen", listen, "--data"])
            .arg(data)
            .stdout(Stdio::piped());
        match log {
            Some((file, level)) => {
                command
                    .args(["--log", level])
                    .stderr(std::fs::File::create(file).unwrap());
            }
            None => {
                command.stderr(Stdio::null());
            }
        }
        let mut child = command.spawn().expect("blindpostd starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if let Some(addr) = line.trim().strip_prefix("blindpostd listening on ") {
            return (child, addr.to_string());
        }
        let _ = child.wait();
        assert!(attempt < 49, "blindpostd did not start: {line:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    unreachable!()
}

/// One user: a profile directory.
pub struct User {
    pub name: String,
    dir: TempDir,
}

impl User {
    /// A new, empty profile.
    pub fn fresh(name: &str) -> Self {
        Self {
            name: name.to_string(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A new profile, set up on `server` with username `name`.
    pub fn setup(server: &Server, name: &str) -> Self {
        Self::setup_at(&server.url, name)
    }

    /// A new profile, set up with username `name` on the server at `url` (e.g. a relay).
    pub fn setup_at(url: &str, name: &str) -> Self {
        let u = Self::fresh(name);
        u.ok(&["setup", "--server", url, "--username", name]);
        u
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("blindpost"));
        c.arg("--profile").arg(self.dir.path()).args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Run; assert success; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run; assert failure; stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "{} {:?} unexpectedly succeeded: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Start `receive --follow --json --timeout 60`; its output lines arrive on the receiver.
    pub fn follow(&self) -> Follower {
        let mut child = self
            .command(&["receive", "--follow", "--json", "--timeout", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// Run with `--json`; one value per line.
    pub fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        parse_lines(&self.ok(&a))
    }

    /// `receive --json`.
    pub fn receive(&self) -> Vec<Value> {
        self.json(&["receive"])
    }

    /// Texts of received messages.
    pub fn receive_texts(&self) -> Vec<String> {
        texts(&self.receive())
    }
}

/// A running `receive --follow`.
pub struct Follower {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    /// Collect message texts until `n` arrived or 30 s passed.
    pub fn texts(&self, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while seen.len() < n && std::time::Instant::now() < deadline {
            if let Ok(line) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(200))
            {
                seen.extend(texts(&parse_lines(&line)));
            }
        }
        seen
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The texts of the `message` items.
pub fn texts(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter(|i| i["kind"] == "message")
        .map(|i| i["text"].as_str().unwrap().to_string())
        .collect()
}

/// Items of a kind.
pub fn of_kind<'a>(items: &'a [Value], kind: &str) -> Vec<&'a Value> {
    items.iter().filter(|i| i["kind"] == kind).collect()
}
