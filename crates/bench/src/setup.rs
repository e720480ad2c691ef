//! Setting up the simulated devices through the real client library, before anything is
//! measured: one profile per device, conversations created and joined over the real server,
//! then each conversation's sender encrypts its pool of application messages. Not for the
//! measured window: that speaks the wire protocol directly (`relay.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use blindpost_client::{BenchRoute, Client, Suite};
use futures_util::StreamExt;

/// What the tool is asked to set up.
pub struct Plan {
    /// Server URLs; device `d` uses `servers[d % len]`.
    pub servers: Vec<String>,
    /// Number of conversations.
    pub conversations: usize,
    /// Devices per conversation (2: a 1:1 chat).
    pub group_size: usize,
    /// Application messages each conversation's sender encrypts ahead of time.
    pub pool: usize,
    /// Text length of each message.
    pub text_len: usize,
    /// Worker threads, each with its own runtime.
    pub threads: usize,
    /// Conversations set up at once per thread.
    pub concurrency: usize,
}

/// One device after setup.
pub struct Member {
    /// Its profile directory.
    pub dir: PathBuf,
    /// How it names the conversation (`@peer` or the group name).
    pub target: String,
    /// The server it uses.
    pub server: String,
    /// Where it posts and what it reads, on the wire.
    pub route: BenchRoute,
}

/// One conversation after setup. Member 0 is the sender.
pub struct Conversation {
    /// The devices.
    pub members: Vec<Member>,
    /// The sender's pre-encrypted messages, in ratchet order.
    pub pool: Vec<Vec<u8>>,
}

/// Set everything up under `root`. Returns the conversations in order.
pub fn run(plan: &Plan, root: &Path, run_id: &str) -> Result<Vec<Conversation>> {
    let started = Instant::now();
    let threads = plan.threads.clamp(1, plan.conversations.max(1));
    let results: Vec<Result<Vec<(usize, Conversation)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> Result<Vec<(usize, Conversation)>> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let mine = (0..plan.conversations).filter(|c| c % threads == t);
                        let mut stream = futures_util::stream::iter(mine)
                            .map(|c| async move {
                                conversation(plan, root, run_id, c)
                                    .await
                                    .with_context(|| format!("setting up conversation {c}"))
                                    .map(|conv| (c, conv))
                            })
                            .buffer_unordered(plan.concurrency.max(1));
                        let mut out = Vec::new();
                        while let Some(r) = stream.next().await {
                            out.push(r?);
                        }
                        Ok(out)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a setup thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(plan.conversations);
    for r in results {
        all.extend(r?);
    }
    all.sort_by_key(|(c, _)| *c);
    eprintln!(
        "set up {} conversations of {} devices in {:.1}s",
        plan.conversations,
        plan.group_size,
        started.elapsed().as_secs_f64()
    );
    Ok(all.into_iter().map(|(_, conv)| conv).collect())
}

/// Largest number of members one session adds: the server's default per-connection claim
/// burst is 20, and every add operation opens its own connection.
const ADD_CHUNK: usize = 19;

async fn conversation(plan: &Plan, root: &Path, run_id: &str, c: usize) -> Result<Conversation> {
    let k = plan.group_size;
    let names: Vec<String> = (0..k).map(|m| format!("b{run_id}c{c}m{m}")).collect();
    let mut clients = Vec::with_capacity(k);
    for (m, name) in names.iter().enumerate() {
        let dir = root.join(name);
        let server = plan.servers[(c * k + m) % plan.servers.len()].clone();
        let client = Client::open(&dir)?;
        client
            .setup(std::slice::from_ref(&server), name, Suite::PostQuantum)
            .await?;
        clients.push((client, dir, server));
    }
    let group_name = format!("g{c}");
    let targets: Vec<String> = if k == 2 {
        vec![format!("@{}", names[1]), format!("@{}", names[0])]
    } else {
        vec![group_name.clone(); k]
    };
    let creator = &clients[0].0;
    if k == 2 {
        creator.send(&targets[0], "hello").await?;
    } else {
        let others = &names[1..];
        let (first, rest) = others.split_at(others.len().min(ADD_CHUNK));
        creator.create_group(&group_name, first).await?;
        for chunk in rest.chunks(ADD_CHUNK) {
            creator.add_members(&group_name, chunk).await?;
        }
    }
    for (client, _, _) in &clients[1..] {
        client.receive().await?;
    }
    let pool = creator.bench_encrypt(&targets[0], plan.pool, plan.text_len)?;
    let mut members = Vec::with_capacity(k);
    for ((client, dir, server), target) in clients.into_iter().zip(targets) {
        let route = client.bench_route(&target)?;
        members.push(Member {
            dir,
            target,
            server,
            route,
        });
    }
    let epoch = members[0].route.epoch;
    if members.iter().any(|m| m.route.epoch != epoch) {
        bail!("conversation {c}: members disagree on the epoch after setup");
    }
    Ok(Conversation { members, pool })
}
