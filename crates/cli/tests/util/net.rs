//! Real network parts for the transport tests: daemons whose stdout announces where they
//! listen (`blindpostd` with TLS, `blindpostd relay`), a SOCKS5 server (`microsocks`), packet
//! captures (`tcpdump`) read back as TCP streams, and network namespaces with a censor's
//! firewall (`ip netns`, nftables). Each external tool is required when
//! `BLINDPOST_REQUIRE_NETWORK_TOOLS` is set (CI sets it); otherwise a test that lacks one
//! prints `SKIPPED …` on stderr and passes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use super::bin;

/// Whether `tool` can be run; if not, says on stderr that `test` is skipped (or fails the test
/// when the tools are required).
pub fn have_tool(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(test, &format!("{tool} is not installed"));
    }
    found
}

/// Reports a skipped test, or fails it when the network tools are required.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}");
    assert!(
        std::env::var_os("BLINDPOST_REQUIRE_NETWORK_TOOLS").is_none(),
        "{line}, and BLINDPOST_REQUIRE_NETWORK_TOOLS is set"
    );
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A child process killed on drop, with the lines it printed on stdout.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read so far, in order.
    pub seen: Vec<String>,
    _data: Option<TempDir>,
}

impl Daemon {
    /// Spawns `command` (stdout piped) and waits until it printed a line starting with each
    /// of `expect`, in any order.
    pub fn spawn(mut command: Command, expect: &[&str], data: Option<TempDir>) -> Self {
        command.stdout(Stdio::piped());
        let mut child = command.spawn().expect("the daemon starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self {
            child,
            lines,
            seen: Vec::new(),
            _data: data,
        };
        for prefix in expect {
            daemon.line(prefix);
        }
        daemon
    }

    /// The rest of the first line (seen or still to come) that starts with `prefix`.
    pub fn line(&mut self, prefix: &str) -> String {
        loop {
            if let Some(rest) = self.seen.iter().find_map(|l| l.strip_prefix(prefix)) {
                return rest.trim().to_string();
            }
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line {prefix:?}; saw {:?}", self.seen),
            }
        }
    }

    /// SIGTERM, then wait.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `blindpostd` with a self-signed certificate, and its pin.
pub struct TlsServer {
    pub daemon: Daemon,
    /// `HOST:PORT` it listens on.
    pub addr: String,
    /// `sha256:HEX`.
    pub pin: String,
    /// Its data directory.
    pub data: PathBuf,
}

impl TlsServer {
    /// Starts on `listen` with `--tls self-signed` and any `extra` flags; `prefix` runs it
    /// inside something (e.g. `ip netns exec NS`).
    pub fn start(listen: &str, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let data_dir = data.path().to_path_buf();
        let mut command = Command::new(bin("blindpostd"));
        command
            .args(["--listen", listen, "--tls", "self-signed"])
            .args(["--admin-listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .args(extra)
            .stderr(Stdio::null());
        let mut daemon = Daemon::spawn(
            command,
            &["blindpostd listening on ", "tls certificate "],
            Some(data),
        );
        let addr = daemon.line("blindpostd listening on ");
        let pin = daemon.line("tls certificate ");
        Self {
            daemon,
            addr,
            pin,
            data: data_dir,
        }
    }
}

/// A `blindpostd relay` with a self-signed certificate in front of `upstream`.
pub struct Relay {
    pub daemon: Daemon,
    pub addr: String,
    pub pin: String,
}

impl Relay {
    pub fn start(listen: &str, upstream: &str, ws_path: &str) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(bin("blindpostd"));
        command
            .args(["relay", "--listen", listen, "--upstream", upstream])
            .args(["--ws-path", ws_path, "--tls", "self-signed", "--data"])
            .arg(data.path())
            .stderr(Stdio::null());
        let mut daemon = Daemon::spawn(
            command,
            &["blindpostd relay listening on ", "tls certificate "],
            Some(data),
        );
        let addr = daemon.line("blindpostd relay listening on ");
        let pin = daemon.line("tls certificate ");
        Self { daemon, addr, pin }
    }
}

/// A free TCP port on `ip` (bound and released; good enough for a test).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process killed on drop.
pub struct Guard(pub Child);

impl Guard {
    /// Kills it now and waits for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `microsocks` (a real SOCKS5 server) on `ip:port`, once it accepts connections.
pub fn microsocks(ip: &str, port: u16) -> Guard {
    let child = Command::new("microsocks")
        .args(["-i", ip, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("microsocks starts");
    let guard = Guard(child);
    wait_for_port(ip, port);
    guard
}

/// Waits (bounded) until something accepts TCP connections on `ip:port`.
pub fn wait_for_port(ip: &str, port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect((ip, port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {ip}:{port}");
}

// ---------------------------------------------------------------------------------------------
// Packet captures

/// A running `tcpdump` writing a capture file.
pub struct Capture {
    child: Child,
    _dir: TempDir,
    file: PathBuf,
}

impl Capture {
    /// Captures TCP on the loopback interface for `ports`, once tcpdump says it listens.
    pub fn start(ports: &[u16]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("capture.pcap");
        let filter = ports
            .iter()
            .map(|p| format!("tcp port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg(&filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("tcpdump says something");
        assert!(line.contains("listening on"), "tcpdump: {line}");
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        Self {
            child,
            _dir: dir,
            file,
        }
    }

    /// Stops tcpdump and returns the raw capture file and its TCP streams.
    pub fn finish(mut self) -> (Vec<u8>, Vec<TcpFlow>) {
        // Let the last packets reach the file, then stop cleanly (it flushes on SIGINT).
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).expect("the capture file");
        let flows = tcp_flows(&raw);
        (raw, flows)
    }
}

/// The payload one side of a TCP connection sent, in capture order.
pub struct TcpFlow {
    pub from: (String, u16),
    pub to: (String, u16),
    pub bytes: Vec<u8>,
}

/// Splits a pcap file (Ethernet, Linux cooked v1/v2 link types; IPv4) into TCP flows.
pub fn tcp_flows(pcap: &[u8]) -> Vec<TcpFlow> {
    assert!(pcap.len() >= 24, "capture too short");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().expect("4 bytes"));
    assert!(
        magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d,
        "not a little-endian pcap file: {magic:#x}"
    );
    let link = u32::from_le_bytes(pcap[20..24].try_into().expect("4 bytes"));
    let mut flows: BTreeMap<(String, u16, String, u16), Vec<u8>> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        let frame = &pcap[at + 16..(at + 16 + len).min(pcap.len())];
        at += 16 + len;
        let (ethertype, ip) = match link {
            1 if frame.len() >= 14 => (u16::from_be_bytes([frame[12], frame[13]]), &frame[14..]),
            113 if frame.len() >= 16 => (u16::from_be_bytes([frame[14], frame[15]]), &frame[16..]),
            276 if frame.len() >= 20 => (u16::from_be_bytes([frame[0], frame[1]]), &frame[20..]),
            _ => continue,
        };
        if ethertype != 0x0800 || ip.len() < 20 || ip[9] != 6 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        if total < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..total];
        let offset = usize::from(tcp[12] >> 4) * 4;
        if tcp.len() < offset {
            continue;
        }
        let src = format!("{}.{}.{}.{}", ip[12], ip[13], ip[14], ip[15]);
        let dst = format!("{}.{}.{}.{}", ip[16], ip[17], ip[18], ip[19]);
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        flows
            .entry((src, sport, dst, dport))
            .or_default()
            .extend_from_slice(&tcp[offset..]);
    }
    flows
        .into_iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .map(|((src, sport, dst, dport), bytes)| TcpFlow {
            from: (src, sport),
            to: (dst, dport),
            bytes,
        })
        .collect()
}

/// Whether `bytes` is nothing but TLS records (a last one may be cut short by the capture's
/// end): content type 20–23, version 3.1–3.4, a length within the record limit.
pub fn all_tls_records(bytes: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    let mut records = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 5)
            .ok_or_else(|| format!("{} stray bytes at the end", bytes.len() - at))?;
        let (kind, major, minor) = (header[0], header[1], header[2]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if !(20..=23).contains(&kind) || major != 3 || !(1..=4).contains(&minor) || len > 18_432 {
            return Err(format!(
                "bytes at offset {at} are not a TLS record: {:02x?}",
                &bytes[at..(at + 16).min(bytes.len())]
            ));
        }
        at += 5 + len;
        records += 1;
    }
    Ok(records)
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// Runs a command (as root), asserting success.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair, with its own `/etc/hosts`
/// (`ip netns exec` mounts `/etc/netns/NAME/hosts` over it); removed on drop.
pub struct Netns {
    pub name: String,
    veth: String,
    etc: PathBuf,
}

impl Netns {
    /// Whether namespaces can be made here (root, `ip`, `nft`, `iptables`); else skipped.
    pub fn available(test: &str) -> bool {
        if !["ip", "nft", "iptables"].iter().all(|t| have_tool(test, t)) {
            return false;
        }
        let probe = "bp-probe-ns";
        let ok = Command::new("ip")
            .args(["netns", "add", probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let _ = Command::new("ip").args(["netns", "del", probe]).status();
        } else {
            skip(test, "cannot create network namespaces (not root?)");
        }
        ok
    }

    /// Namespace `name` with `inside` (CIDR) on its end of a veth pair whose outer end holds
    /// every address of `outside` (CIDRs), and `hosts` as its `/etc/hosts`.
    pub fn create(name: &str, inside: &str, outside: &[&str], hosts: &str) -> Self {
        let veth = format!("{name}-h");
        let peer = format!("{name}-c");
        // Leftovers of an interrupted run.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
        let etc = Path::new("/etc/netns").join(name);
        std::fs::create_dir_all(&etc).expect("/etc/netns/NAME");
        std::fs::write(etc.join("hosts"), hosts).expect("hosts file");
        let ns = Self {
            name: name.to_string(),
            veth: veth.clone(),
            etc,
        };
        sh(&["ip", "netns", "add", name]);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", name]);
        for cidr in outside {
            sh(&["ip", "addr", "add", cidr, "dev", &veth]);
        }
        sh(&["ip", "link", "set", &veth, "up"]);
        ns.exec_ok(&["ip", "addr", "add", inside, "dev", &peer]);
        ns.exec_ok(&["ip", "link", "set", &peer, "up"]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `args` inside, asserting success.
    pub fn exec_ok(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Standard output of `args` run inside.
    pub fn exec_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}
