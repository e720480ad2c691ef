//! Wake-ups: tells connections that queues they push from have new messages. Carries queue
//! ids only, never payloads; each connection then reads what is new from the store itself.
//! Not for: delivery or ordering (the store's sequence numbers do that).
//!
//! Design: every connection owns an [`Inbox`]: a `Notify` plus a set of "dirty" queue ids.
//! [`Hub::notify`] marks the queue in the inbox of each connection registered for it and wakes
//! it. Marks coalesce, so an inbox holds at most one entry per subscribed queue (bounded by
//! `MAX_SUBSCRIPTIONS_PER_CONNECTION`) however many messages arrive. Wake-ups are
//! level-triggered: a connection clears a mark *before* it reads the store, so a message
//! committed after the read sets the mark again and is never missed.
//!
//! Anything that learns of appends can feed [`Hub::notify`]: the service after each committed
//! transaction, and on PostgreSQL the `LISTEN` task relaying other nodes' `NOTIFY`s (through
//! the [`Wakeups`] impl; after a gap in listening it calls [`Hub::notify_all`]).
//!
//! Lock order: the hub's registry lock, then an inbox's dirty-set lock; never the reverse.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::store::postgres::Wakeups;
use crate::types::QueueId;

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
    dirty: Mutex<HashSet<QueueId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data inconsistent (single inserts
    // and removes), so a poisoned lock is still usable.
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
            dirty: Mutex::new(HashSet::new()),
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

    /// Stops waking `inbox` for `queue`.
    pub fn unregister(&self, queue: QueueId, inbox: &Inbox) {
        let mut registry = lock(&self.registry);
        if let Some(inboxes) = registry.get_mut(&queue) {
            inboxes.retain(|i| i.id != inbox.id);
            if inboxes.is_empty() {
                registry.remove(&queue);
            }
        }
        lock(&inbox.dirty).remove(&queue);
    }

    /// Signals that `queues` have new messages.
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
    /// Marks `queue` as having news for this connection and wakes it.
    pub fn mark(&self, queue: QueueId) {
        lock(&self.dirty).insert(queue);
        self.notify.notify_one();
    }

    /// Takes one marked queue, clearing its mark.
    pub fn take(&self) -> Option<QueueId> {
        let mut dirty = lock(&self.dirty);
        let queue = dirty.iter().next().copied()?;
        dirty.remove(&queue);
        Some(queue)
    }

    /// Whether any queue is marked.
    pub fn has_news(&self) -> bool {
        !lock(&self.dirty).is_empty()
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
        assert_eq!(a.take(), Some(q(1)));
        assert_eq!(
            a.take(),
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
        let mut marked = vec![a.take(), a.take()];
        marked.sort();
        assert_eq!(marked, vec![Some(q(1)), Some(q(2))]);
        assert_eq!(a.take(), None);
        assert_eq!(b.take(), Some(q(2)));
    }

    #[tokio::test]
    async fn a_wake_up_before_waiting_is_not_lost() {
        let hub = Hub::new();
        let a = hub.inbox();
        hub.register(q(1), &a);
        hub.notify(&[q(1)]);
        a.wait().await; // returns at once: the permit was stored
        assert_eq!(a.take(), Some(q(1)));
    }
}
