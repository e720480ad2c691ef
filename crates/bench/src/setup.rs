//! Setting up the simulated devices through the real client library, before anything is
//! measured: one profile per device, conversations created and joined over the real server,
//! then each conversation's sender encrypts its pool of application messages. Not for the
//! measured window: that speaks the wire protocol directly (`relay.rs`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use blindpost_client::{BenchRoute, Client, ServerSettings, Suite};
use futures_util::StreamExt;

/// What the tool is asked to set up.
pub struct Plan {
    /// Servers (URL, pins, relays); device `d` uses `servers[d % len]`.
    pub servers: Vec<ServerSettings>,
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
    /// The server it uses, and how to reach it.
    pub server: ServerSettings,
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
    let all = spread(
        plan.conversations,
        plan.threads,
        plan.concurrency,
        |c| async move {
            conversation(plan, root, run_id, c)
                .await
                .with_context(|| format!("setting up conversation {c}"))
        },
    )?;
    eprintln!(
        "set up {} conversations of {} devices in {:.1}s",
        plan.conversations,
        plan.group_size,
        started.elapsed().as_secs_f64()
    );
    Ok(all)
}

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
    let phase = Instant::now();
    // The creator adds everyone at once (in as few commits as fit in a frame), so each member
    // joins from a Welcome and has few or no later commits to process. It claims k - 1 key
    // packages on one connection: the server's claim limits must allow it (`--spawn-server`
    // raises them).
    if k == 2 {
        creator.send(&targets[0], "hello").await?;
    } else {
        creator
            .create_group(&group_name, &names[1..])
            .await
            .with_context(|| {
                format!(
                    "creating a group of {k} (the server's claim_burst must allow {} \
                     key-package claims on one connection)",
                    k - 1
                )
            })?;
    }
    let created = phase.elapsed();
    let pool = creator.bench_encrypt(&targets[0], plan.pool, plan.text_len)?;
    let mut members = Vec::with_capacity(k);
    let mut joiners = Vec::with_capacity(k - 1);
    for (m, ((client, dir, server), target)) in clients.into_iter().zip(targets).enumerate() {
        if m == 0 {
            let route = client.bench_route(&target)?;
            members.push(Member {
                dir,
                target,
                server,
                route,
            });
        } else {
            // Reopened by the thread that joins it.
            drop(client);
            joiners.push((dir, server, target));
        }
    }
    // Each member joins and checks every other member's key against the directory: for a
    // large group most of the setup, so it is spread over the setup threads.
    let (threads, concurrency) = (plan.threads, plan.concurrency);
    let joined = tokio::task::spawn_blocking(move || join_all(joiners, threads, concurrency))
        .await
        .map_err(|e| anyhow::anyhow!("a join thread failed: {e}"))??;
    members.extend(joined);
    if k > 2 {
        eprintln!(
            "conversation {c}: group created in {:.1}s, {} members joined in {:.1}s",
            created.as_secs_f64(),
            k - 1,
            (phase.elapsed() - created).as_secs_f64()
        );
    }
    let epoch = members[0].route.epoch;
    if members.iter().any(|m| m.route.epoch != epoch) {
        bail!("conversation {c}: members disagree on the epoch after setup");
    }
    Ok(Conversation { members, pool })
}

/// Has each of `joiners` (profile directory, server, target) receive its Welcome, on
/// `threads` threads with `concurrency` members at once on each. Returns them in order.
fn join_all(
    joiners: Vec<(PathBuf, ServerSettings, String)>,
    threads: usize,
    concurrency: usize,
) -> Result<Vec<Member>> {
    let joiners = &joiners;
    spread(joiners.len(), threads, concurrency, |i| async move {
        let (dir, server, target) = &joiners[i];
        let client = Client::open(dir)?;
        client.receive().await?;
        let route = client.bench_route(target)?;
        Ok(Member {
            dir: dir.clone(),
            target: target.clone(),
            server: server.clone(),
            route,
        })
    })
}

/// Runs `job(i)` for every `i` below `n`: item `i` on thread `i % threads`, each thread with
/// its own single-threaded runtime running `concurrency` items at once. Returns the results
/// in order, or the first error.
fn spread<T, Fut>(
    n: usize,
    threads: usize,
    concurrency: usize,
    job: impl Fn(usize) -> Fut + Sync,
) -> Result<Vec<T>>
where
    T: Send,
    Fut: Future<Output = Result<T>>,
{
    let threads = threads.clamp(1, n.max(1));
    let job = &job;
    let parts: Vec<Result<Vec<(usize, T)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> Result<Vec<(usize, T)>> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let mine = (0..n).filter(|i| i % threads == t);
                        let mut stream = futures_util::stream::iter(mine)
                            .map(|i| async move { job(i).await.map(|v| (i, v)) })
                            .buffer_unordered(concurrency.max(1));
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
    let mut all = Vec::with_capacity(n);
    for part in parts {
        all.extend(part?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, v)| v).collect())
}
