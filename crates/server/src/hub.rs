//! Wake-ups: tells connections that queues they push from have new messages, and hands them
//! the payload of a post right away so the usual delivery needs no read of the store.
//! Not for: ordering or durability (the store's sequence numbers and commits do that): only
//! what has committed is ever handed over, and a connection falls back to reading the store
//! whenever what it holds is not the exact next run of sequence numbers.
//!
//! Design: every connection owns an [`Inbox`]: a `Notify` plus, per queue with news, a
//! [`News`]: the messages handed over with their sequence numbers (bounded by
//! [`HELD_MESSAGES`] and [`HELD_BYTES`]) and a `read_store` flag for news that came without
//! payload. [`Hub::deliver`] (after a post commits) offers the payload to each connection
//! registered for the queue; [`Hub::notify`] (commits, Welcomes, other PostgreSQL nodes) only
//! sets the flag. Past either bound an inbox drops what it holds for that queue and keeps the
//! flag, so memory stays bounded however many messages arrive. Wake-ups are level-triggered:
//! a connection takes a queue's news *before* it reads the store, so a message committed after
//! the read arrives as new news and is never missed.
//!
//! Anything that learns of appends can feed [`Hub::notify`]: the service after each committed
//! transaction, and on PostgreSQL the `LISTEN` task relaying other nodes' `NOTIFY`s (through
//! the [`Wakeups`] impl; after a gap in listening it calls [`Hub::notify_all`]).
//!
//! Lock order: the hub's registry lock, then an inbox's news lock; never the reverse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::store::Appended;
use crate::store::postgres::Wakeups;
use crate::types::QueueId;

/// Most messages an inbox holds in hand for one queue.
pub const HELD_MESSAGES: usize = 64;
/// Most payload bytes an inbox holds in hand over all its queues (a larger payload always
/// goes through the store).
pub const HELD_BYTES: usize = 64 * 1024;

/// The registry of which connections push from which queues.
#[derive(Default)]
pub struct Hub {
    registry: Mutex<HashMap<QueueId, Vec<Arc<Inbox>>>>,
    next_inbox: AtomicU64,
}

/// One connection's wake-up state.
pub struct Inbox {
    id: u64,
    notify: Notify,
    news: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    queues: HashMap<QueueId, News>,
    bytes: usize,
}

/// What an inbox learnt about one queue since the connection last looked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct News {
    /// Committed messages handed over, as `(seq, payload)`, in the order they came.
    pub messages: Vec<(u64, Arc<[u8]>)>,
    /// Something arrived that is not in `messages`: read the store.
    pub read_store: bool,
}

impl News {
    /// Payload bytes held.
    fn bytes(&self) -> usize {
        self.messages.iter().map(|(_, p)| p.len()).sum()
    }

    /// The messages in hand if they are exactly the run `after + 1 ..` (sorted, those at or
    /// below `after` dropped); `None` if the store must be read (flagged, or a gap).
    pub fn next_run(self, after: u64) -> Option<Vec<(u64, Arc<[u8]>)>> {
        if self.read_store {
            return None;
        }
        let mut run = self.messages;
        run.retain(|(seq, _)| *seq > after);
        run.sort_unstable_by_key(|(seq, _)| *seq);
        run.dedup_by_key(|(seq, _)| *seq);
        let contiguous = run
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| Some(*seq) == after.checked_add(i as u64 + 1));
        contiguous.then_some(run)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data inconsistent (single inserts
    // and removes; at worst a byte count too high, which only sends more reads to the
    // store), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new inbox for a connection.
    pub fn inbox(&self) -> Arc<Inbox> {
        Arc::new(Inbox {
            id: self.next_inbox.fetch_add(1, Ordering::Relaxed),
            notify: Notify::new(),
            news: Mutex::new(Held::default()),
        })
    }

    /// Wakes `inbox` whenever `queue` gets messages. Registering twice is harmless.
    pub fn register(&self, queue: QueueId, inbox: &Arc<Inbox>) {
        let mut registry = lock(&self.registry);
        let inboxes = registry.entry(queue).or_default();
        if !inboxes.iter().any(|i| i.id == inbox.id) {
            inboxes.push(Arc::clone(inbox));
        }
    }

    /// Stops waking `inbox` for `queue`, and forgets its news.
    pub fn unregister(&self, queue: QueueId, inbox: &Inbox) {
        let mut registry = lock(&self.registry);
        if let Some(inboxes) = registry.get_mut(&queue) {
            inboxes.retain(|i| i.id != inbox.id);
            if inboxes.is_empty() {
                registry.remove(&queue);
            }
        }
        inbox.forget(queue);
    }

    /// Signals that `queues` have new messages (the connections read them from the store).
    pub fn notify(&self, queues: &[QueueId]) {
        let registry = lock(&self.registry);
        for queue in queues {
            if let Some(inboxes) = registry.get(queue) {
                for inbox in inboxes {
                    inbox.mark(*queue);
                }
            }
        }
    }

    /// Hands a committed post's `payload` to every connection registered for a queue it was
    /// appended to.
    pub fn deliver(&self, appended: &[Appended], payload: &Arc<[u8]>) {
        let registry = lock(&self.registry);
        for a in appended {
            if let Some(inboxes) = registry.get(&a.queue) {
                for inbox in inboxes {
                    inbox.offer(a.queue, a.seq, payload);
                }
            }
        }
    }

    /// Signals every registered queue, as if each had news: after wake-ups may have been
    /// missed, every connection re-reads its subscriptions (a read finding nothing is cheap).
    pub fn notify_all(&self) {
        let registry = lock(&self.registry);
        for (queue, inboxes) in registry.iter() {
            for inbox in inboxes {
                inbox.mark(*queue);
            }
        }
    }

    /// How many queues have at least one registered connection (for tests and metrics).
    pub fn registered_queues(&self) -> usize {
        lock(&self.registry).len()
    }
}

impl Wakeups for Hub {
    fn appended(&self, queues: &[QueueId]) {
        self.notify(queues);
    }

    fn resync(&self) {
        self.notify_all();
    }
}

impl Inbox {
    /// Marks `queue` as having news to read from the store, and wakes the connection. What
    /// was held for it is dropped: the read returns it too.
    pub fn mark(&self, queue: QueueId) {
        {
            let mut held = lock(&self.news);
            let news = held.queues.entry(queue).or_default();
            let freed = news.bytes();
            news.messages.clear();
            news.read_store = true;
            held.bytes = held.bytes.saturating_sub(freed);
        }
        self.notify.notify_one();
    }

    /// Hands over one committed message of `queue` (held while within the bounds, otherwise
    /// the queue is marked), and wakes the connection.
    pub fn offer(&self, queue: QueueId, seq: u64, payload: &Arc<[u8]>) {
        let fits = {
            let mut held = lock(&self.news);
            let room = held.bytes.saturating_add(payload.len()) <= HELD_BYTES;
            let news = held.queues.entry(queue).or_default();
            let fits = !news.read_store && room && news.messages.len() < HELD_MESSAGES;
            if fits {
                news.messages.push((seq, Arc::clone(payload)));
                held.bytes += payload.len();
            }
            fits
        };
        if fits {
            self.notify.notify_one();
        } else {
            self.mark(queue);
        }
    }

    /// Takes the news of one queue.
    pub fn take(&self) -> Option<(QueueId, News)> {
        let mut held = lock(&self.news);
        let queue = held.queues.keys().next().copied()?;
        let news = held.queues.remove(&queue)?;
        held.bytes = held.bytes.saturating_sub(news.bytes());
        Some((queue, news))
    }

    fn forget(&self, queue: QueueId) {
        let mut held = lock(&self.news);
        if let Some(news) = held.queues.remove(&queue) {
            held.bytes = held.bytes.saturating_sub(news.bytes());
        }
    }

    /// Whether any queue has news.
    pub fn has_news(&self) -> bool {
        !lock(&self.news).queues.is_empty()
    }

    /// Waits for a wake-up. A wake-up that came while nobody waited is kept, so checking
    /// [`Inbox::has_news`] and then waiting never sleeps through news.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: u8) -> QueueId {
        QueueId::new([n; 16])
    }

    fn taken(inbox: &Inbox) -> Option<QueueId> {
        inbox.take().map(|(queue, _)| queue)
    }

    fn at(queue: QueueId, seq: u64) -> Appended {
        Appended { queue, seq }
    }

    fn seqs(run: Option<Vec<(u64, Arc<[u8]>)>>) -> Option<Vec<u64>> {
        run.map(|r| r.into_iter().map(|(seq, _)| seq).collect())
    }

    #[test]
    fn a_delivered_post_is_held_for_registered_inboxes_only() {
        let hub = Hub::new();
        let a = hub.inbox();
        let b = hub.inbox();
        hub.register(q(1), &a);
        hub.register(q(2), &b);
        let payload: Arc<[u8]> = Arc::from(&b"hello"[..]);
        hub.deliver(&[at(q(1), 7), at(q(3), 1)], &payload);
        let (queue, news) = a.take().expect("a has news");
        assert_eq!(queue, q(1));
        assert!(!news.read_store);
        assert_eq!(news.messages, vec![(7, payload)]);
        assert!(!b.has_news(), "b is registered for another queue");
    }

    #[test]
    fn a_run_is_used_only_when_it_continues_exactly_after_what_was_pushed() {
        let p: Arc<[u8]> = Arc::from(&b"x"[..]);
        let news = |seqs: &[u64], read_store| News {
            messages: seqs.iter().map(|s| (*s, Arc::clone(&p))).collect(),
            read_store,
        };
        assert_eq!(
            seqs(news(&[5, 4, 6], false).next_run(3)),
            Some(vec![4, 5, 6])
        );
        assert_eq!(
            seqs(news(&[2, 3, 4], false).next_run(3)),
            Some(vec![4]),
            "what was pushed already is dropped"
        );
        assert_eq!(seqs(news(&[5], false).next_run(3)), None, "4 is missing");
        assert_eq!(
            seqs(news(&[4], true).next_run(3)),
            None,
            "flagged: read the store"
        );
        assert_eq!(seqs(news(&[3], false).next_run(3)), Some(vec![]));
    }

    #[test]
    fn past_its_bounds_an_inbox_keeps_only_the_mark() {
        let hub = Hub::new();
        let a = hub.inbox();
        hub.register(q(1), &a);
        hub.register(q(2), &a);
        let small: Arc<[u8]> = Arc::from(vec![0u8; 10]);
        for seq in 1..=HELD_MESSAGES as u64 + 1 {
            hub.deliver(&[at(q(1), seq)], &small);
        }
        let (_, news) = a.take().expect("news");
        assert!(news.read_store, "one message too many");
        assert!(news.messages.is_empty(), "nothing is held once marked");

        let big: Arc<[u8]> = Arc::from(vec![0u8; HELD_BYTES + 1]);
        hub.deliver(&[at(q(2), 1)], &big);
        let (_, news) = a.take().expect("news");
        assert!(
            news.read_store && news.messages.is_empty(),
            "too large to hold"
        );

        hub.deliver(&[at(q(1), 9)], &small);
        hub.notify(&[q(1)]);
        let (_, news) = a.take().expect("news");
        assert!(
            news.read_store && news.messages.is_empty(),
            "a mark drops what was held"
        );
        assert_eq!(lock(&a.news).bytes, 0, "the byte count returns to zero");
    }

    #[test]
    fn notify_marks_only_registered_inboxes_and_coalesces() {
        let hub = Hub::new();
        let a = hub.inbox();
        let b = hub.inbox();
        hub.register(q(1), &a);
        hub.register(q(2), &b);
        for _ in 0..1000 {
            hub.notify(&[q(1), q(3)]);
        }
        assert_eq!(taken(&a), Some(q(1)));
        assert_eq!(
            taken(&a),
            None,
            "a thousand notifications coalesce into one mark"
        );
        assert!(!b.has_news());
    }

    #[test]
    fn unregister_drops_the_entry_and_pending_mark() {
        let hub = Hub::new();
        let a = hub.inbox();
        hub.register(q(1), &a);
        hub.register(q(1), &a);
        hub.notify(&[q(1)]);
        hub.unregister(q(1), &a);
        assert!(!a.has_news());
        assert_eq!(hub.registered_queues(), 0);
        hub.notify(&[q(1)]);
        assert!(!a.has_news());
    }

    #[test]
    fn notify_all_marks_every_registered_queue_of_every_inbox() {
        let hub = Hub::new();
        let a = hub.inbox();
        let b = hub.inbox();
        hub.register(q(1), &a);
        hub.register(q(2), &a);
        hub.register(q(2), &b);
        hub.notify_all();
        let mut marked = vec![taken(&a), taken(&a)];
        marked.sort();
        assert_eq!(marked, vec![Some(q(1)), Some(q(2))]);
        assert_eq!(taken(&a), None);
        assert_eq!(taken(&b), Some(q(2)));
    }

    #[tokio::test]
    async fn a_wake_up_before_waiting_is_not_lost() {
        let hub = Hub::new();
        let a = hub.inbox();
        hub.register(q(1), &a);
        hub.notify(&[q(1)]);
        a.wait().await; // returns at once: the permit was stored
        assert_eq!(taken(&a), Some(q(1)));
    }
}
