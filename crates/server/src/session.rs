//! One connection's protocol state and request dispatch: which queues it authenticated with
//! `Subscribe`, which of them push and up to which sequence number, its key-package claim
//! budget. Handlers only call the service and build the wire answer.
//! Not for: socket I/O (see `ws`) or domain rules (see `service`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use blindpost_wire::limits::MAX_SUBSCRIPTIONS_PER_CONNECTION;
use blindpost_wire::response::Body;
use blindpost_wire::{
    ClientFrame, Committed, KeyPackage, Messages, Ping, Push, QueueMessage, Request, Response,
    Subscribe, Subscribed,
};
use tokio::time::Instant;

use crate::error::{BadRequest, Credential, Limit, Refusal, ServerFault, ServiceError, to_wire};
use crate::hub::Inbox;
use crate::rate::TokenBucket;
use crate::service::{Service, ServiceResult};
use crate::store::{Fetched, KeyPackageCount};
use crate::types::QueueId;

/// Per-connection limits, from the configuration (see `Config` for each one's meaning).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Key-package claims per minute, on average.
    pub claims_per_minute: u32,
    /// Key-package claims in a burst.
    pub claim_burst: u32,
    /// Requests per second, on average.
    pub requests_per_second: u32,
    /// Requests in a burst.
    pub request_burst: u32,
    /// Queues one connection may subscribe to.
    pub max_subscriptions: usize,
    /// How long writing one frame to the client may take.
    pub send_timeout: Duration,
}

impl SessionLimits {
    /// The limits of a configuration.
    pub fn from_config(config: &crate::Config) -> Self {
        Self {
            claims_per_minute: config.claims_per_minute,
            claim_burst: config.claim_burst,
            requests_per_second: config.requests_per_second,
            request_burst: config.request_burst,
            max_subscriptions: (config.max_subscriptions as usize)
                .min(MAX_SUBSCRIPTIONS_PER_CONNECTION),
            send_timeout: Duration::from_secs(config.send_timeout_secs),
        }
    }
}

/// What this connection may do with one queue it authenticated.
#[derive(Debug, Clone, Copy, Default)]
struct QueueAccess {
    /// With push on: the highest sequence number pushed (or the `after_seq` asked for).
    pushed_up_to: Option<u64>,
    /// The highest sequence number acknowledged on this connection. Acknowledgements are
    /// written after they are answered, so reads skip what they cover themselves.
    acked_up_to: u64,
}

/// The state of one connection.
pub struct Session {
    service: Arc<Service>,
    inbox: Arc<Inbox>,
    queues: HashMap<QueueId, QueueAccess>,
    /// The keys of `queues`, shared with the posts that skip them (`Post.skip_subscribed`):
    /// a post takes a reference, not a copy of up to 4,096 ids. Changed only through
    /// [`Session::access`] and [`Session::forget`].
    subscribed: Arc<HashSet<QueueId>>,
    claims: TokenBucket,
    requests: TokenBucket,
    max_subscriptions: usize,
}

impl Session {
    /// A fresh session: nothing authenticated.
    pub fn new(service: Arc<Service>, limits: SessionLimits) -> Self {
        let inbox = service.hub().inbox();
        Self {
            service,
            inbox,
            queues: HashMap::new(),
            subscribed: Arc::default(),
            claims: TokenBucket::per_minute(limits.claim_burst, limits.claims_per_minute),
            requests: TokenBucket::new(limits.request_burst, f64::from(limits.requests_per_second)),
            max_subscriptions: limits.max_subscriptions,
        }
    }

    /// Takes one request from the connection's rate budget; `false` when it is spent.
    pub fn admit(&mut self) -> bool {
        self.requests.try_take(Instant::now())
    }

    /// This connection's wake-up inbox.
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// Answers one decoded frame; `None` for a quiet `Ack` that succeeded (nothing to send).
    pub async fn handle(&mut self, frame: ClientFrame) -> Option<Response> {
        let id = frame.id;
        let Some(request) = frame.request else {
            return Some(to_wire(
                id,
                &BadRequest::Malformed("the frame carries no request".into()).into(),
            ));
        };
        let kind = request_kind(&request);
        if !self.admit() {
            return Some(to_wire(
                id,
                &Refusal::LimitExceeded(Limit::RequestRate).into(),
            ));
        }
        let quiet = matches!(&request, Request::Ack(ack) if ack.quiet);
        // Boxed: the largest handler's future (a directory proof) is several KiB, and inline it
        // would sit in every idle connection's task for the connection's whole life
        // (measured with massif: ~8 KiB per connection).
        Some(match Box::pin(self.dispatch(request)).await {
            Ok(_) if quiet => return None,
            Ok(body) => Response {
                id,
                body: Some(body),
            },
            Err(err) => {
                match &err {
                    ServiceError::Server(
                        ServerFault::Storage(detail) | ServerFault::StorageFull(detail),
                    ) => {
                        tracing::error!(request = kind, error = %detail, "request failed");
                    }
                    other => tracing::debug!(request = kind, error = %other, "request refused"),
                }
                to_wire(id, &err)
            }
        })
    }

    async fn dispatch(&mut self, request: Request) -> ServiceResult<Body> {
        let service = Arc::clone(&self.service);
        match request {
            Request::CreateQueue(r) => service.create_queue(&r).await.map(ok),
            Request::Subscribe(r) => self.subscribe(r).await,
            Request::Unsubscribe(r) => {
                let queue = self.authenticated(&r.queue_id)?;
                self.stop_push(queue);
                Ok(ok(()))
            }
            Request::Fetch(r) => {
                let queue = self.authenticated(&r.queue_id)?;
                let after = r.after_seq.max(self.acked_up_to(queue));
                let fetched = service.fetch(queue, after, r.limit).await?;
                Ok(Body::Messages(messages(fetched)))
            }
            Request::Ack(r) => {
                let queue = self.authenticated(&r.queue_id)?;
                service.ack_soon(queue, r.up_to_seq).await?;
                if let Some(access) = self.queues.get_mut(&queue) {
                    access.acked_up_to = access.acked_up_to.max(r.up_to_seq);
                }
                Ok(ok(()))
            }
            Request::DeleteQueue(r) => {
                let queue = service.delete_queue(&r).await?;
                self.stop_push(queue);
                self.forget(queue);
                Ok(ok(()))
            }
            Request::PublishKeyPackages(r) => service.publish_key_packages(r).await.map(count),
            Request::ClaimKeyPackage(r) => {
                if !self.claims.try_take(Instant::now()) {
                    return Err(Refusal::LimitExceeded(Limit::ClaimRate).into());
                }
                let claimed = service.claim_key_package(&r).await?;
                Ok(Body::KeyPackage(KeyPackage {
                    key_package: claimed.data,
                    last_resort: claimed.last_resort,
                }))
            }
            Request::KeyPackageStatus(r) => service.key_package_status(&r).await.map(count),
            Request::RegisterUser(r) => service.register_user(r).await.map(ok),
            Request::LookupUser(r) => service.lookup_user(&r).await.map(Body::User),
            Request::DirectoryLookup(r) => service
                .directory_lookup(&r)
                .await
                .map(Body::DirectoryLookupProof),
            Request::DirectoryHistory(r) => service
                .directory_history(&r)
                .await
                .map(Body::DirectoryHistoryProof),
            Request::DirectoryAudit(r) => service
                .directory_audit(&r)
                .await
                .map(Body::DirectoryAuditProof),
            Request::DirectoryRoot(_) => service.directory_root().await.map(Body::SignedRoot),
            Request::CreateGroup(r) => service.create_group(&r).await.map(ok),
            Request::Commit(r) => {
                let epoch = service.commit(r).await?;
                Ok(Body::Committed(Committed { epoch }))
            }
            Request::Post(r) => {
                let skip = if r.skip_subscribed {
                    Arc::clone(&self.subscribed)
                } else {
                    Arc::default()
                };
                service.post(r, skip).await.map(ok)
            }
            Request::Ping(_) => Ok(ok(())),
        }
    }

    async fn subscribe(&mut self, r: Subscribe) -> ServiceResult<Body> {
        let queue = QueueId::parse(&r.queue_id)?;
        if !self.queues.contains_key(&queue) && self.queues.len() >= self.max_subscriptions {
            return Err(Refusal::LimitExceeded(Limit::Subscriptions).into());
        }
        let (queue, head_seq) = self
            .service
            .authenticate_queue(&r.queue_id, &r.receive_secret)
            .await?;
        if r.push {
            // Register before the first read, and mark so the backlog above `after_seq` is
            // pushed: anything committed later marks the queue again.
            self.service.hub().register(queue, &self.inbox);
            self.access(queue).pushed_up_to = Some(r.after_seq);
            self.inbox.mark(queue);
        } else {
            self.stop_push(queue);
            self.access(queue).pushed_up_to = None;
        }
        Ok(Body::Subscribed(Subscribed { head_seq }))
    }

    /// The next push for a queue with news, if any: messages above what was pushed, in
    /// order, at most one batch. Messages the hub handed over are pushed as they are when
    /// they continue exactly after what was pushed; otherwise the store is read. A queue with
    /// more is marked again.
    pub async fn next_push(&mut self) -> ServiceResult<Option<Push>> {
        let Some((queue, news)) = self.inbox.take() else {
            return Ok(None);
        };
        let Some(pushed_up_to) = self.queues.get(&queue).and_then(|a| a.pushed_up_to) else {
            return Ok(None);
        };
        if let Some(run) = news.next_run(pushed_up_to) {
            let Some(&(last, _)) = run.last() else {
                return Ok(None);
            };
            if let Some(access) = self.queues.get_mut(&queue) {
                access.pushed_up_to = Some(last);
            }
            return Ok(Some(Push {
                queue_id: queue.as_bytes().to_vec(),
                messages: run
                    .into_iter()
                    .map(|(seq, payload)| QueueMessage {
                        seq,
                        payload: payload.to_vec(),
                    })
                    .collect(),
            }));
        }
        let after = pushed_up_to.max(self.acked_up_to(queue));
        let fetched = match self.service.fetch(queue, after, 0).await {
            Ok(f) => f,
            Err(e) => {
                // Try again on the next wake-up rather than lose the news.
                self.inbox.mark(queue);
                return Err(e);
            }
        };
        if fetched.more {
            self.inbox.mark(queue);
        }
        // Nothing read: everything up to `after` was pushed or acknowledged already.
        let last = fetched.messages.last().map_or(after, |m| m.seq);
        if let Some(access) = self.queues.get_mut(&queue) {
            access.pushed_up_to = Some(last);
        }
        if fetched.messages.is_empty() {
            return Ok(None);
        }
        Ok(Some(Push {
            queue_id: queue.as_bytes().to_vec(),
            messages: messages(fetched).messages,
        }))
    }

    /// This connection's access to `queue`, authenticated now if it was not yet.
    fn access(&mut self, queue: QueueId) -> &mut QueueAccess {
        if !self.subscribed.contains(&queue) {
            // Copies the set only while a post still holds the old one.
            Arc::make_mut(&mut self.subscribed).insert(queue);
        }
        self.queues.entry(queue).or_default()
    }

    /// Drops `queue` from what this connection authenticated.
    fn forget(&mut self, queue: QueueId) {
        if self.queues.remove(&queue).is_some() {
            Arc::make_mut(&mut self.subscribed).remove(&queue);
        }
    }

    fn acked_up_to(&self, queue: QueueId) -> u64 {
        self.queues.get(&queue).map_or(0, |a| a.acked_up_to)
    }

    fn authenticated(&self, queue_id: &[u8]) -> ServiceResult<QueueId> {
        let queue = QueueId::parse(queue_id)?;
        if self.queues.contains_key(&queue) {
            Ok(queue)
        } else {
            Err(Refusal::Forbidden(Credential::Subscription).into())
        }
    }

    fn stop_push(&mut self, queue: QueueId) {
        if let Some(access) = self.queues.get_mut(&queue) {
            access.pushed_up_to = None;
        }
        self.service.hub().unregister(queue, &self.inbox);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let hub = Arc::clone(self.service.hub());
        for (queue, access) in &self.queues {
            if access.pushed_up_to.is_some() {
                hub.unregister(*queue, &self.inbox);
            }
        }
    }
}

fn ok<T>(_: T) -> Body {
    Body::Ok(Ping {})
}

fn count(c: KeyPackageCount) -> Body {
    Body::KeyPackageCount(blindpost_wire::KeyPackageCount {
        one_time: c.one_time,
        has_last_resort: c.has_last_resort,
    })
}

fn messages(f: Fetched) -> Messages {
    Messages {
        messages: f
            .messages
            .into_iter()
            .map(|m| QueueMessage {
                seq: m.seq,
                payload: m.payload,
            })
            .collect(),
        more: f.more,
    }
}

/// The request's name, for logs (never its content).
fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::CreateQueue(_) => "CreateQueue",
        Request::Subscribe(_) => "Subscribe",
        Request::Fetch(_) => "Fetch",
        Request::Ack(_) => "Ack",
        Request::DeleteQueue(_) => "DeleteQueue",
        Request::PublishKeyPackages(_) => "PublishKeyPackages",
        Request::ClaimKeyPackage(_) => "ClaimKeyPackage",
        Request::KeyPackageStatus(_) => "KeyPackageStatus",
        Request::RegisterUser(_) => "RegisterUser",
        Request::LookupUser(_) => "LookupUser",
        Request::DirectoryLookup(_) => "DirectoryLookup",
        Request::DirectoryHistory(_) => "DirectoryHistory",
        Request::DirectoryAudit(_) => "DirectoryAudit",
        Request::DirectoryRoot(_) => "DirectoryRoot",
        Request::CreateGroup(_) => "CreateGroup",
        Request::Commit(_) => "Commit",
        Request::Post(_) => "Post",
        Request::Ping(_) => "Ping",
        Request::Unsubscribe(_) => "Unsubscribe",
    }
}
