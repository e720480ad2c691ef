//! `blindpost`: the command-line front end. Flags and glue only: every operation is a call
//! into `blindpost-client`; this file parses arguments, picks the profile directory, prints
//! results (text or one JSON object per line) and turns errors into a one-line reason and a
//! non-zero exit status.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blindpost_client::{
    Chat, Client, Item, Member, RelaySettings, ServerSettings, Suite, VerifyAction,
};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

/// An end-to-end-encrypted messenger whose server sees only ciphertext.
#[derive(Parser)]
#[command(name = "blindpost", version, about)]
struct Cli {
    /// Profile directory (local state). Default: $BLINDPOST_HOME, else the XDG data dir.
    #[arg(long, global = true, env = "BLINDPOST_HOME")]
    profile: Option<PathBuf>,
    /// Print the full cause chain of errors, and on stderr which way each connection went
    /// (directly, through a proxy, through a relay).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this profile's keys and claim a username on a server.
    Setup {
        /// Server URL, wss://HOST[:PORT][/PATH] (ws:// only for this machine), e.g.
        /// wss://chat.example/v1/ws. No path means /v1/ws. Repeat for several nodes of one
        /// deployment: they are tried in turn whenever one does not answer.
        #[arg(long = "server", required_unless_present = "server_link")]
        servers: Vec<String>,
        /// A server link (blindpost://connect?…, from `blindpost servers share` or
        /// `blindpostd link`) carrying the server URLs, their pins and relays; instead of
        /// --server.
        #[arg(long, value_name = "LINK", conflicts_with = "servers")]
        server_link: Option<String>,
        #[command(flatten)]
        connect: ConnectFlags,
        /// Username to claim (2-32 lowercase letters, digits, '_', '-', '.').
        #[arg(long)]
        username: String,
        /// MLS ciphersuite: `pq` (post-quantum hybrid, default) or `classic` (X25519, for
        /// interoperability tests).
        #[arg(long, default_value = "pq")]
        ciphersuite: String,
    },
    /// Send a message to `@user` (starting the 1:1 chat if needed), a group name, or `#id`.
    Send {
        /// The chat.
        target: String,
        /// The message text (or use --stdin).
        text: Option<String>,
        /// Read the message from standard input.
        #[arg(long)]
        stdin: bool,
    },
    /// Fetch everything pending and print what was not shown before.
    Receive {
        /// Keep printing new items until interrupted.
        #[arg(long)]
        follow: bool,
        /// Give up (or, with --follow, stop) after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// List chats.
    Chats {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show a chat's history.
    History {
        /// The chat.
        target: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Group management.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Show the safety number to compare with `@user` (and a QR code), from directory proofs.
    Verify {
        /// The user.
        user: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
        /// Record that you compared the safety number with the user and it matched. Sending
        /// to them is then blocked if their key ever changes, until you accept the change.
        #[arg(long, conflicts_with = "accept_change")]
        confirm: bool,
        /// Accept that a confirmed contact's key changed (unblocks sending; confirm again
        /// after comparing the new safety number).
        #[arg(long)]
        accept_change: bool,
    },
    /// Audit a server's key directory: verify every epoch's root and append-only proof.
    /// Needs no account. Exits non-zero on any inconsistency.
    Audit {
        /// Server URL, e.g. wss://chat.example/v1/ws.
        #[arg(long)]
        server: String,
        /// How to reach it (pins, proxy, relays), as for `setup`.
        #[command(flatten)]
        connect: ConnectFlags,
        /// Require every root to be signed by this server key (hex).
        #[arg(long, value_name = "HEX")]
        server_key: Option<String>,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show or change the server URLs this profile connects to.
    Servers {
        #[command(subcommand)]
        command: ServersCommand,
    },
}

#[derive(Subcommand)]
enum ServersCommand {
    /// List the server URLs, in the order they are tried.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Add a server URL (another node of the same deployment), with how to reach it.
    Add {
        /// The URL, e.g. wss://node2.example/v1/ws.
        url: String,
        #[command(flatten)]
        connect: ConnectFlags,
    },
    /// Print the server link of this profile (URLs, pins, relays; never a proxy) and its QR
    /// code, for `blindpost setup --server-link` on another device.
    Share,
    /// Remove a server URL (the last one cannot be removed).
    Remove {
        /// The URL, as listed.
        url: String,
    },
}

/// How to reach a server: TLS checks, proxy, names, relays. Stored per server.
#[derive(Args)]
struct ConnectFlags {
    /// Accept only this TLS certificate (sha256:HEX of the certificate, as `blindpostd`
    /// prints it as `tls certificate sha256:…`) instead of verifying it against the trusted
    /// roots: for self-signed servers. Repeat to accept any of several (rotation).
    #[arg(long = "server-pin", value_name = "sha256:HEX")]
    server_pins: Vec<String>,
    /// Connect through this proxy: socks5h://[USER:PASS@]HOST:PORT (names resolved by the
    /// proxy: Tor, Orbot, Psiphon, Xray, sing-box), socks5://… (names resolved here) or
    /// http://[USER:PASS@]HOST:PORT (CONNECT). No DNS lookup of the server leaves the proxy
    /// with socks5h:// and http://.
    #[arg(
        long,
        value_name = "URL",
        env = "BLINDPOST_PROXY",
        hide_env_values = true
    )]
    proxy: Option<String>,
    /// Allow ws:// (no TLS) to a host other than this machine. Everything (receive secrets,
    /// tokens, usernames) then crosses the network readable and changeable: only for a
    /// network you fully trust.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Send this TLS server name (SNI) instead of the URL's host, e.g. a CDN's front name.
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// Open the TCP connection to HOST:PORT instead of the URL's host (the WebSocket Host
    /// header stays the URL's host), e.g. a CDN edge.
    #[arg(long, value_name = "HOST:PORT")]
    connect_to: Option<String>,
    /// A volunteer relay, wss://HOST[:PORT]/PATH, tried when the direct path fails (the
    /// relay sees only TLS to the server). Repeat for several.
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// The relay's certificate pin (sha256:HEX): the n-th --relay-pin belongs to the n-th
    /// --relay. A relay without one is verified against the trusted roots.
    #[arg(long = "relay-pin", value_name = "sha256:HEX")]
    relay_pins: Vec<String>,
}

impl ConnectFlags {
    /// Applies these flags to `settings`: pins and relays are added, the rest set.
    fn apply(&self, settings: &mut ServerSettings, with_relays: bool) -> Result<()> {
        settings.pins.extend(self.server_pins.iter().cloned());
        if self.proxy.is_some() {
            settings.proxy.clone_from(&self.proxy);
        }
        settings.insecure_plaintext |= self.insecure_plaintext;
        if self.sni.is_some() {
            settings.sni.clone_from(&self.sni);
        }
        if self.connect_to.is_some() {
            settings.connect_to.clone_from(&self.connect_to);
        }
        if self.relay_pins.len() > self.relays.len() {
            bail!(
                "{} --relay-pin for {} --relay: the n-th pin belongs to the n-th relay",
                self.relay_pins.len(),
                self.relays.len()
            );
        }
        if with_relays {
            for (i, url) in self.relays.iter().enumerate() {
                let pins = self.relay_pins.get(i).cloned().into_iter().collect();
                settings.relays.push(RelaySettings::new(url.clone(), pins));
            }
        }
        Ok(())
    }

    /// The settings of `urls` with these flags: relays belong to the first server (a relay
    /// tunnels to one node).
    fn settings(&self, urls: Vec<ServerSettings>) -> Result<Vec<ServerSettings>> {
        if self.connect_to.is_some() && urls.len() > 1 {
            bail!("--connect-to names one destination; give one server with it");
        }
        let mut out = Vec::with_capacity(urls.len());
        for (i, mut s) in urls.into_iter().enumerate() {
            self.apply(&mut s, i == 0)?;
            out.push(s);
        }
        Ok(out)
    }
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group (its name is end-to-end encrypted).
    Create {
        /// The group's name.
        name: String,
        /// Members, as @user.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add members.
    Add {
        /// The group.
        target: String,
        /// Members, as @user.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove members.
    Remove {
        /// The group.
        target: String,
        /// Members, as @user.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Leave a group.
    Leave {
        /// The group.
        target: String,
    },
    /// List a group's members.
    Members {
        /// The group.
        target: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blindpost: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if verbose {
                eprintln!("blindpost: {e:#}");
            } else {
                eprintln!("blindpost: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let verbose = cli.verbose;
    if let Command::Audit {
        server,
        server_key,
        json,
        connect,
    } = &cli.command
    {
        let mut settings = ServerSettings::new(server.as_str());
        connect.apply(&mut settings, true)?;
        return audit(&settings, server_key.as_deref(), *json, verbose).await;
    }
    let dir = profile_dir(cli.profile)?;
    let mut client =
        Client::open(&dir).with_context(|| format!("cannot open profile {}", dir.display()))?;
    if verbose {
        client.on_connect(|route| eprintln!("blindpost: {route}"));
    }
    match cli.command {
        Command::Setup {
            servers,
            server_link,
            connect,
            username,
            ciphersuite,
        } => {
            let Some(suite) = Suite::from_name(&ciphersuite) else {
                bail!("unknown ciphersuite {ciphersuite:?}: use `pq` or `classic`");
            };
            let urls = match &server_link {
                Some(link) => blindpost_client::servers_from_link(link)?,
                None => servers.iter().map(ServerSettings::from).collect(),
            };
            let settings = connect.settings(urls)?;
            client.setup(&settings, &username, suite).await?;
            let urls: Vec<&str> = settings.iter().map(|s| s.url.as_str()).collect();
            println!("set up as @{username} on {}", urls.join(", "));
        }
        Command::Servers { command } => match command {
            ServersCommand::List { json } => {
                for s in client.server_settings()? {
                    if json {
                        println!("{}", server_json(&s));
                    } else {
                        println!("{}", s.url);
                    }
                }
            }
            ServersCommand::Add { url, connect } => {
                let mut settings = ServerSettings::new(url);
                connect.apply(&mut settings, true)?;
                client.add_server(settings)?;
            }
            ServersCommand::Remove { url } => client.remove_server(&url)?,
            ServersCommand::Share => {
                let link = client.share_link()?;
                println!("{link}");
                print_qr(&link);
            }
        },
        Command::Send {
            target,
            text,
            stdin,
        } => {
            let text = match (text, stdin) {
                (Some(t), false) => t,
                (None, true) => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("cannot read standard input")?;
                    s.trim_end_matches('\n').to_string()
                }
                (Some(_), true) => bail!("give the text either as an argument or with --stdin"),
                (None, false) => bail!("nothing to send: give the text or use --stdin"),
            };
            if text.is_empty() {
                bail!("refusing to send an empty message");
            }
            client.send(&target, &text).await?;
            warn_unverified(&client, &target);
        }
        Command::Receive {
            follow,
            timeout,
            json,
        } => {
            let timeout = timeout.map(parse_timeout).transpose()?;
            if follow {
                let follow = client.follow(timeout, |items| print_items(&items, json));
                tokio::select! {
                    r = follow => r?,
                    _ = tokio::signal::ctrl_c() => {}
                }
            } else {
                let receive = client.receive();
                match timeout {
                    Some(t) => tokio::time::timeout(t, receive)
                        .await
                        .map_err(|_| anyhow::anyhow!("timed out after {}s", t.as_secs_f64()))??,
                    None => receive.await?,
                }
                print_items(&client.take_new_items()?, json);
            }
        }
        Command::Chats { json } => {
            refresh(&client).await?;
            for chat in client.chats()? {
                print_chat(&chat, json);
            }
        }
        Command::History { target, json } => {
            refresh(&client).await?;
            print_items(&client.history(&target)?, json);
        }
        Command::Group { command } => match command {
            GroupCommand::Create { name, members } => {
                let id = client.create_group(&name, &usernames(&members)?).await?;
                println!("created {name} (#{})", &id[..8]);
            }
            GroupCommand::Add { target, members } => {
                client.add_members(&target, &usernames(&members)?).await?;
            }
            GroupCommand::Remove { target, members } => {
                client
                    .remove_members(&target, &usernames(&members)?)
                    .await?;
            }
            GroupCommand::Leave { target } => client.leave(&target).await?,
            GroupCommand::Members { target, json } => {
                refresh(&client).await?;
                for m in client.members(&target)? {
                    print_member(&m, json);
                }
            }
        },
        Command::Verify {
            user,
            json,
            confirm,
            accept_change,
        } => {
            let user = username(&user)?;
            let action = match (confirm, accept_change) {
                (true, _) => VerifyAction::Confirm,
                (false, true) => VerifyAction::AcceptChange,
                (false, false) => VerifyAction::Show,
            };
            let v = client.verify_contact(&user, action).await?;
            let sn = &v.safety;
            if json {
                println!(
                    "{}",
                    json!({
                        "user": user,
                        "safety_number": sn.digits,
                        "identity_key": sn.peer_identity_key,
                        "directory_verified": v.directory_verified,
                        "confirmed": v.confirmed,
                        "key_changed": v.key_changed,
                    })
                );
            } else {
                println!("safety number with @{user}:");
                println!("  {}", sn.grouped());
                print_qr(&sn.digits);
                println!(
                    "directory proof: {}",
                    if v.directory_verified {
                        "verified (both keys are in the server's signed, audited directory)"
                    } else {
                        "NOT verified"
                    }
                );
                if v.key_changed {
                    println!("WARNING: @{user}'s key changed since you confirmed it.");
                }
                if v.confirmed {
                    println!("confirmed: you recorded that you compared this number with @{user}.");
                } else {
                    println!(
                        "compare it with @{user}'s screen; if they match, nobody is in between \
                         (then run `blindpost verify @{user} --confirm`)."
                    );
                }
            }
        }
        // Handled before the profile is opened.
        Command::Audit { .. } => {}
    }
    Ok(())
}

/// A server's settings as `servers list --json` shows them: every field, the proxy's
/// password redacted.
fn server_json(s: &ServerSettings) -> serde_json::Value {
    let s = s.redacted();
    json!({
        "url": s.url,
        "pins": s.pins,
        "proxy": s.proxy,
        "sni": s.sni,
        "connect_to": s.connect_to,
        "insecure_plaintext": s.insecure_plaintext,
        "relays": s.relays.iter().map(|r| json!({ "url": r.url, "pins": r.pins })).collect::<Vec<_>>(),
    })
}

/// `blindpost audit`: the whole directory history, one verdict.
async fn audit(
    server: &ServerSettings,
    server_key: Option<&str>,
    json: bool,
    verbose: bool,
) -> Result<()> {
    let pinned = match server_key {
        Some(h) => {
            let bytes = hex::decode(h).context("--server-key is not hex")?;
            Some(
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| anyhow::anyhow!("--server-key must be 32 bytes"))?,
            )
        }
        None => None,
    };
    let on_connect = |route: &blindpost_client::Route| {
        if verbose {
            eprintln!("blindpost: {route}");
        }
    };
    match blindpost_client::audit(server, pinned, on_connect).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    json!({
                        "consistent": true,
                        "latest_epoch": report.latest_epoch,
                        "server_key": report.server_key,
                        "root_hash": report.root_hash,
                    })
                );
            } else {
                println!(
                    "CONSISTENT: all {} epochs verified; each extends the one before (append-only).",
                    report.latest_epoch
                );
                println!("server key {}", report.server_key);
                println!("latest root {}", report.root_hash);
            }
            Ok(())
        }
        Err(e @ blindpost_client::Error::DirectoryAlarm(_)) => {
            if json {
                println!(
                    "{}",
                    json!({ "consistent": false, "reason": e.to_string() })
                );
            }
            bail!("INCONSISTENT: {e}")
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints `text` as a QR code with Unicode half blocks (two rows per line).
fn print_qr(text: &str) {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => {
            let art = code
                .render::<qrcode::render::unicode::Dense1x2>()
                .dark_color(qrcode::render::unicode::Dense1x2::Light)
                .light_color(qrcode::render::unicode::Dense1x2::Dark)
                .build();
            println!("{art}");
        }
        Err(e) => println!("(no QR code: {e})"),
    }
}

/// Catch up before showing local state; if the server is unreachable, say so and show what
/// is stored.
async fn refresh(client: &Client) -> Result<()> {
    match client.receive().await {
        Ok(()) => Ok(()),
        Err(e @ blindpost_client::Error::Unreachable(_)) => {
            eprintln!("blindpost: showing local state only: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn parse_timeout(secs: f64) -> Result<Duration> {
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        bail!("--timeout must be a non-negative number of seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `@bob` or `bob` → `bob`.
fn username(arg: &str) -> Result<String> {
    let name = arg.strip_prefix('@').unwrap_or(arg);
    if name.is_empty() {
        bail!("empty username in {arg:?}");
    }
    Ok(name.to_string())
}

fn usernames(args: &[String]) -> Result<Vec<String>> {
    args.iter().map(|a| username(a)).collect()
}

fn profile_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".local/share"),
            None => bail!("no profile directory: use --profile DIR or set BLINDPOST_HOME"),
        },
    };
    Ok(data.join("blindpost"))
}

fn print_items(items: &[Item], json: bool) {
    let mut out = std::io::stdout().lock();
    for item in items {
        let line = if json {
            json!({
                "id": item.id,
                "chat": item.chat,
                "chat_id": item.chat_id,
                "from": item.from,
                "kind": item.kind,
                "text": item.text,
                "subject": item.subject,
                "sent_at": item.sent_at_rfc3339(),
            })
            .to_string()
        } else {
            let what = match (item.kind.as_str(), &item.text, &item.subject) {
                ("message", Some(t), _) => format!("{}: {t}", item.from),
                ("member_added", _, Some(s)) => format!("* {} added {s}", item.from),
                ("member_removed", _, Some(s)) => format!("* {} removed {s}", item.from),
                ("member_left", _, Some(s)) => format!("* {s} left"),
                ("joined", _, _) => format!("* you joined (invited by {})", item.from),
                ("unverified_member" | "directory_alarm", Some(t), _) => format!("* {t}"),
                (kind, _, _) => format!("* {kind} by {}", item.from),
            };
            format!("[{}] {}  {what}", item.sent_at_rfc3339(), item.chat)
        };
        // A closed stdout (e.g. piped into `head`) is not an error worth a message.
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
    let _ = out.flush();
}

fn print_chat(chat: &Chat, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "chat": chat.name,
                "id": chat.id,
                "direct": chat.direct,
                "active": chat.active,
                "members": chat.members,
            })
        );
    } else {
        let state = if chat.active { "" } else { " (left)" };
        println!(
            "{}  #{}  {}{state}",
            chat.name,
            &chat.id[..8],
            chat.members.join(", ")
        );
    }
}

fn print_member(m: &Member, json: bool) {
    if json {
        println!(
            "{}",
            json!({ "username": m.username, "me": m.me, "verified": m.verified })
        );
    } else if m.me {
        println!("@{} (you)", m.username);
    } else if m.verified {
        println!("@{}", m.username);
    } else {
        println!(
            "@{} (UNVERIFIED: the key directory does not vouch for this key)",
            m.username
        );
    }
}

/// After sending: tell the user (stderr) who in the chat the key directory does not vouch
/// for. Sending is not blocked; the `unverified_member` item said why.
fn warn_unverified(client: &Client, target: &str) {
    let Ok(members) = client.members(target) else {
        return;
    };
    let unverified: Vec<String> = members
        .iter()
        .filter(|m| !m.verified)
        .map(|m| format!("@{}", m.username))
        .collect();
    if !unverified.is_empty() {
        eprintln!(
            "blindpost: warning: sent to {target}, which has members the key directory does not \
             vouch for: {} (whoever holds their keys can read it)",
            unverified.join(", ")
        );
    }
}
