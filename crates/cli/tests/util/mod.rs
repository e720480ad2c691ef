//! Test harness for end-to-end tests: runs the real `blindpostd` on a free port with a temp
//! data dir (SQLite) or on a shared PostgreSQL database (several nodes), and the real
//! `blindpost` binary against it, one profile directory per user.
//!
//! PostgreSQL: [`PgDatabase::create`] makes a fresh database on `127.0.0.1:5432` with `psql`
//! (trust auth, user `postgres` or `root`) and drops it afterwards. Without a reachable server
//! it prints why the test is skipped to stderr and returns `None` — unless
//! `BLINDPOST_REQUIRE_POSTGRES` is set (CI sets it), when it fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod net;

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
        Self::start_with(None, None)
    }

    /// A node on a shared PostgreSQL database.
    pub fn start_on(db: &PgDatabase) -> Self {
        Self::start_with(Some(&db.url), None)
    }

    /// Started with `toml` as its configuration file (written into its data directory).
    pub fn start_configured(toml: &str) -> Self {
        Self::start_with(None, Some(toml))
    }

    fn start_with(database: Option<&str>, toml: Option<&str>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let config = toml.map(|toml| {
            let file = data.path().join("test-config.toml");
            std::fs::write(&file, toml).unwrap();
            file
        });
        let (child, addr) = spawn_server(
            data.path(),
            "127.0.0.1:0",
            database,
            None,
            config.as_deref(),
        );
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
            None,
            Some((log.as_path(), level)),
            None,
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
        self.restart_with(|_| {});
    }

    /// Stop, run `tamper` on the data directory (as a hostile operator would), start again.
    pub fn restart_with(&mut self, tamper: impl FnOnce(&Path)) {
        self.stop();
        assert!(self.log.is_none(), "restart of a logged server");
        tamper(self.data.path());
        let (child, addr) = spawn_server(self.data.path(), &self.addr, None, None, None);
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

    /// Kill with SIGKILL: no shutdown, no flush, connections cut.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
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

fn spawn_server(
    data: &Path,
    listen: &str,
    database: Option<&str>,
    log: Option<(&Path, &str)>,
    config: Option<&Path>,
) -> (Child, String) {
    // The port of a just-stopped server may linger briefly; retry binding a few times.
    for attempt in 0..50 {
        let mut command = Command::new(bin("blindpostd"));
        command
            .args(["--listen", listen, "--data"])
            .arg(data)
            .stdout(Stdio::piped());
        if let Some(url) = database {
            command.args(["--database", url]);
        }
        if let Some(file) = config {
            command.arg("--config").arg(file);
        }
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

/// A fresh PostgreSQL database, dropped on drop.
pub struct PgDatabase {
    user: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    /// Creates one, or says on stderr why the calling test is skipped and returns `None`.
    pub fn create(test: &str) -> Option<Self> {
        let name = format!(
            "bp_e2e_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let mut reasons = Vec::new();
        for user in ["postgres", "root"] {
            match psql(user, &format!("CREATE DATABASE {name}")) {
                Ok(()) => {
                    return Some(Self {
                        url: format!("postgres://{user}@127.0.0.1:5432/{name}"),
                        user: user.to_string(),
                        name,
                    });
                }
                Err(e) => reasons.push(format!("as {user}: {e}")),
            }
        }
        let why = format!(
            "SKIPPED {test}: no PostgreSQL server on 127.0.0.1:5432 ({})",
            reasons.join("; ")
        );
        assert!(
            std::env::var_os("BLINDPOST_REQUIRE_POSTGRES").is_none(),
            "{why}, and BLINDPOST_REQUIRE_POSTGRES is set"
        );
        // Past the test harness's capture, so the skip shows in `cargo test` output.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{why}");
        None
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &self.user,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(user: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", "5432", "-U", user, "-d", "test"])
        .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One user: a profile directory.
pub struct User {
    pub name: String,
    dir: TempDir,
    /// The network namespace its commands run in (`ip netns exec`), if not this one.
    netns: Option<String>,
}

impl User {
    /// A new, empty profile.
    pub fn fresh(name: &str) -> Self {
        Self {
            name: name.to_string(),
            dir: tempfile::tempdir().unwrap(),
            netns: None,
        }
    }

    /// A new, empty profile whose commands run inside network namespace `ns`.
    pub fn fresh_in(ns: &str, name: &str) -> Self {
        Self {
            netns: Some(ns.to_string()),
            ..Self::fresh(name)
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

    /// A new profile, set up with several servers (tried in this order) as `name`.
    pub fn setup_on(servers: &[&Server], name: &str) -> Self {
        let u = Self::fresh(name);
        let mut args = vec!["setup", "--username", name];
        for s in servers {
            args.extend(["--server", s.url.as_str()]);
        }
        u.ok(&args);
        u
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("blindpost"));
                c
            }
            None => Command::new(bin("blindpost")),
        };
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
        Follower {
            child,
            lines,
            items: Vec::new(),
        }
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
    /// What `wait_for` has read so far.
    pub items: Vec<Value>,
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

    /// Collect every item until one of `kind` arrived or 30 s passed.
    pub fn items_until(&self, kind: &str) -> Vec<Value> {
        let mut seen: Vec<Value> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !seen.iter().any(|i| i["kind"] == kind) && std::time::Instant::now() < deadline {
            if let Ok(line) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(200))
            {
                seen.extend(parse_lines(&line));
            }
        }
        seen
    }
}

impl Follower {
    /// Waits until every text of `want` has been printed; false if `within` passed first.
    pub fn wait_for(&mut self, want: &[String], within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            let seen = texts(&self.items);
            if want.iter().all(|w| seen.contains(w)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            if let Ok(line) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(100))
            {
                self.items.extend(parse_lines(&line));
            }
        }
    }

    /// Kills it; every item it printed (including those `wait_for` read).
    pub fn stop(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self
            .lines
            .recv_timeout(std::time::Duration::from_millis(200))
        {
            self.items.extend(parse_lines(&line));
        }
        std::mem::take(&mut self.items)
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

/// Messages the server still holds for any queue of a client profile.
pub fn pending_for(server_data: &Path, profile: &Path) -> usize {
    let client = rusqlite::Connection::open(profile.join("blindpost.sqlite3")).unwrap();
    let mut st = client.prepare("SELECT id FROM bp_queues").unwrap();
    let queues: Vec<Vec<u8>> = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let server = rusqlite::Connection::open(server_data.join("blindpost.sqlite3")).unwrap();
    queues
        .iter()
        .map(|q| {
            server
                .query_row(
                    "SELECT count(*) FROM messages WHERE queue_id = ?1",
                    [q],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap() as usize
        })
        .sum()
}
