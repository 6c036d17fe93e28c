//! A local copy of every key under a prefix, kept current by one watch: the machinery behind
//! service discovery, and usable on its own for configuration.
//!
//! The cache reads the prefix once, then watches it from the read's revision + 1 (a "synced"
//! watch in etcd, whose events arrive at once rather than through the 100 ms catch-up loop).
//! Nothing is lost between the read and the watch: every change after the read has a higher
//! revision. The watch never dies quietly: a broken stream is reopened from the last applied
//! revision + 1 with backoff; a watch cancelled because that revision was compacted re-reads the
//! prefix, emits the differences as changes and watches again; an error no retry can cure
//! (permission denied) ends the change streams with that error.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions, WatchResponse};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{header_revision, Error, Result};
use crate::keys::{prefix_end, show};
use crate::session::{with_timeout, Backoff, DEFAULT_REQUEST_TIMEOUT};

/// How many keys one read of the prefix asks for; larger prefixes are read in pages, all at
/// the revision of the first page.
const PAGE: i64 = 500;
/// Bounds on the pause between attempts to reopen a broken watch.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// After this long without a message the cache asks the server for a progress report; no
/// answer within the request timeout means the stream is dead (a hung member, a connection
/// without HTTP/2 keepalives) and it is reopened.
const PROBE_IDLE: Duration = Duration::from_secs(30);
/// How many recent steps (one per watch response) are kept for change streams that fall behind;
/// a stream further behind gets the net difference instead.
const HISTORY: usize = 256;
/// Bookkeeping per entry beyond its key and value, for [`Snapshot::approx_bytes`]: the share of
/// a map node (entries plus slack), and the counters and allocator rounding of the two `Arc`s.
const ENTRY_OVERHEAD: usize = 96;

type Decoder<T> = Arc<dyn Fn(&KeyValue) -> Option<T> + Send + Sync>;
type Sizer<T> = Arc<dyn Fn(&T) -> usize + Send + Sync>;
type Map<T> = BTreeMap<Arc<[u8]>, Slot<T>>;

struct Slot<T> {
    value: Arc<T>,
    mod_revision: i64,
    bytes: usize,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot {
            value: self.value.clone(),
            mod_revision: self.mod_revision,
            bytes: self.bytes,
        }
    }
}

/// The cache's contents at one revision. Cheap to clone and to keep: entries are shared, not
/// copied.
///
/// ```no_run
/// # async fn f(cache: etcd_coord::PrefixCache) {
/// let snapshot = cache.snapshot();
/// for (key, kv) in snapshot.iter() {
///     println!("{} = {:?} (as of revision {})", String::from_utf8_lossy(key), kv.value_str(), snapshot.revision());
/// }
/// # }
/// ```
pub struct Snapshot<T> {
    entries: Arc<Map<T>>,
    revision: i64,
    bytes: usize,
    /// Counts publications, so that a change stream knows whether it missed one.
    seq: u64,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            entries: self.entries.clone(),
            revision: self.revision,
            bytes: self.bytes,
            seq: self.seq,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.revision)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<T> Snapshot<T> {
    /// The revision this snapshot reflects: every change under the prefix up to this revision
    /// is in it, none after it.
    ///
    /// It advances with each change under the prefix, and otherwise only with the server's
    /// progress reports, so it may lag the store's revision while the prefix is quiet.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// println!("as of revision {}", s.revision());
    /// # }
    /// ```
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The number of entries.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// println!("{} keys", s.len());
    /// # }
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// if s.is_empty() { println!("nothing configured yet"); }
    /// # }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of the full key `key`, if present.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// if let Some(kv) = s.get("config/app/log-level") {
    ///     println!("log level {:?}", kv.value_str());
    /// }
    /// # }
    /// ```
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&Arc<T>> {
        self.entries.get(key.as_ref()).map(|slot| &slot.value)
    }

    /// The entries in key order.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// let keys: Vec<&[u8]> = s.iter().map(|(k, _)| k).collect();
    /// # }
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Arc<T>)> + '_ {
        self.entries.iter().map(|(k, slot)| (&**k, &slot.value))
    }

    /// The values in key order.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// let total: usize = s.values().map(|kv| kv.value().len()).sum();
    /// # }
    /// ```
    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> + '_ {
        self.entries.values().map(|slot| &slot.value)
    }

    /// An estimate of the heap memory this snapshot's entries take: per entry the key, the
    /// value (its size, plus what it owns as told by
    /// [`PrefixCacheBuilder::heap_size`], or else the length of the stored value), and a fixed
    /// overhead for the map and reference counts. Snapshots share entries, so this is the
    /// cost of the cache, not of each snapshot.
    ///
    /// ```no_run
    /// # fn f(s: etcd_coord::Snapshot<etcd_coord::etcd_client::KeyValue>) {
    /// println!("about {} KiB", s.approx_bytes() / 1024);
    /// # }
    /// ```
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }

    /// Counts the cache's published steps (see [`Changes`]).
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn with_entries(entries: Map<T>, revision: i64, seq: u64) -> Self {
        let bytes = entries.iter().map(|(k, s)| k.len() + s.bytes).sum();
        Snapshot {
            entries: Arc::new(entries),
            revision,
            bytes,
            seq,
        }
    }
}

/// One change to the cache's contents.
///
/// ```no_run
/// # fn f(change: etcd_coord::Change<etcd_coord::etcd_client::KeyValue>) {
/// use etcd_coord::Change;
/// match change {
///     Change::Added { value, .. } => println!("new: {:?}", value.value_str()),
///     Change::Updated { old, new, .. } => println!("{:?} -> {:?}", old.value_str(), new.value_str()),
///     Change::Removed { old, .. } => println!("gone: {:?}", old.key_str()),
/// }
/// # }
/// ```
#[derive(Debug)]
pub enum Change<T> {
    /// A key appeared.
    Added {
        /// The full key.
        key: Arc<[u8]>,
        /// Its value.
        value: Arc<T>,
    },
    /// A key's value changed.
    Updated {
        /// The full key.
        key: Arc<[u8]>,
        /// The value before.
        old: Arc<T>,
        /// The value now.
        new: Arc<T>,
    },
    /// A key was deleted (or its lease expired, or its new value could not be decoded).
    Removed {
        /// The full key.
        key: Arc<[u8]>,
        /// The last value.
        old: Arc<T>,
    },
}

impl<T> Clone for Change<T> {
    fn clone(&self) -> Self {
        match self {
            Change::Added { key, value } => Change::Added {
                key: key.clone(),
                value: value.clone(),
            },
            Change::Updated { key, old, new } => Change::Updated {
                key: key.clone(),
                old: old.clone(),
                new: new.clone(),
            },
            Change::Removed { key, old } => Change::Removed {
                key: key.clone(),
                old: old.clone(),
            },
        }
    }
}

impl<T> Change<T> {
    /// The full key that changed.
    ///
    /// ```no_run
    /// # fn f(c: etcd_coord::Change<etcd_coord::etcd_client::KeyValue>) {
    /// println!("{} changed", String::from_utf8_lossy(c.key()));
    /// # }
    /// ```
    pub fn key(&self) -> &[u8] {
        match self {
            Change::Added { key, .. }
            | Change::Updated { key, .. }
            | Change::Removed { key, .. } => key,
        }
    }

    /// The value after the change, or `None` for a removal.
    ///
    /// ```no_run
    /// # fn f(c: etcd_coord::Change<etcd_coord::etcd_client::KeyValue>) {
    /// let now = c.value().map(|kv| kv.value().to_vec());
    /// # }
    /// ```
    pub fn value(&self) -> Option<&Arc<T>> {
        match self {
            Change::Added { value, .. } => Some(value),
            Change::Updated { new, .. } => Some(new),
            Change::Removed { .. } => None,
        }
    }
}

/// How busy the cache's watch has been, for monitoring and tests.
///
/// ```no_run
/// # fn f(cache: etcd_coord::PrefixCache) {
/// let stats = cache.stats();
/// println!("{} streams opened, {} resyncs", stats.watches_opened, stats.resyncs);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Watch streams opened: 1 at start, one more for each reopen after an error.
    pub watches_opened: u64,
    /// Re-reads of the whole prefix after the watch fell behind a compaction.
    pub resyncs: u64,
}

#[derive(Default)]
struct Counters {
    watches_opened: AtomicU64,
    resyncs: AtomicU64,
}

/// What the background task publishes: the latest snapshot, the changes of the last steps
/// that led to it (the last one is the step to `snapshot.seq`), and the reason it stopped, if
/// it did.
struct Published<T> {
    snapshot: Snapshot<T>,
    history: VecDeque<Arc<[Change<T>]>>,
    failed: Option<Arc<Error>>,
}

impl<T> Published<T> {
    /// Records one step: the snapshot already holds its result.
    fn step(&mut self, changes: Vec<Change<T>>) {
        self.snapshot.seq += 1;
        self.history.push_back(Arc::from(changes));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }
}

/// Builder for a [`PrefixCache`]; start one with [`PrefixCache::builder`].
///
/// ```no_run
/// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
/// use std::time::Duration;
/// let cache = etcd_coord::PrefixCache::builder(client, "config/app/")
///     .request_timeout(Duration::from_secs(2))
///     .decode(|kv| kv.value_str().ok().map(str::to_owned))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub struct PrefixCacheBuilder<T> {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    decode: Decoder<T>,
    heap_size: Option<Sizer<T>>,
}

impl<T> fmt::Debug for PrefixCacheBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixCacheBuilder")
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> PrefixCacheBuilder<T> {
    /// Bounds each read and each attempt to open the watch (default
    /// [`DEFAULT_REQUEST_TIMEOUT`](crate::DEFAULT_REQUEST_TIMEOUT)).
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client) {
    /// let b = etcd_coord::PrefixCache::builder(client, "config/")
    ///     .request_timeout(std::time::Duration::from_secs(1));
    /// # }
    /// ```
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Turns each key-value into the type the cache holds, once per change rather than on
    /// every read. A key whose value decodes to `None` is left out (and a key whose new value
    /// no longer decodes is reported as removed).
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let limits = etcd_coord::PrefixCache::builder(client, "limits/")
    ///     .decode(|kv| kv.value_str().ok()?.parse::<u64>().ok())
    ///     .build()
    ///     .await?;
    /// let total: u64 = limits.snapshot().values().map(|v| **v).sum();
    /// # Ok(()) }
    /// ```
    pub fn decode<U, F>(self, decode: F) -> PrefixCacheBuilder<U>
    where
        F: Fn(&KeyValue) -> Option<U> + Send + Sync + 'static,
    {
        PrefixCacheBuilder {
            client: self.client,
            prefix: self.prefix,
            request_timeout: self.request_timeout,
            decode: Arc::new(decode),
            heap_size: None,
        }
    }

    /// Tells [`Snapshot::approx_bytes`] how many heap bytes a decoded value owns (strings,
    /// vectors, trees), for decoders whose values are much larger or smaller than the stored
    /// bytes. Without it the stored value's length is used.
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let names = etcd_coord::PrefixCache::builder(client, "names/")
    ///     .decode(|kv| kv.value_str().ok().map(str::to_owned))
    ///     .heap_size(|s: &String| s.capacity())
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn heap_size<F>(mut self, heap_size: F) -> Self
    where
        F: Fn(&T) -> usize + Send + Sync + 'static,
    {
        self.heap_size = Some(Arc::new(heap_size));
        self
    }

    /// Reads the prefix and starts the background task that watches it.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `prefix` (empty: it would copy the whole keyspace)
    ///   or `request_timeout` (zero), before anything is sent;
    /// - [`Error::Timeout`] or [`Error::Unavailable`] if the first read gets no answer within
    ///   the request timeout; [`Error::PermissionDenied`] if the prefix may not be read.
    ///
    /// Later failures do not end the cache: it retries, and only an error no retry can cure
    /// is reported, through [`Changes::recv`] and the `wait_*` methods.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is started until the first read has completed.
    pub async fn build(self) -> Result<PrefixCache<T>> {
        if self.prefix.is_empty() {
            return Err(Error::invalid(
                "prefix",
                "must not be empty (the cache would copy the whole keyspace)",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid(
                "request_timeout",
                "must be greater than zero",
            ));
        }
        let prefix = self.prefix.into_bytes();
        #[cfg(feature = "testing")]
        let (held_tx, held) = watch::channel(0usize);
        #[cfg(feature = "testing")]
        let (closed_tx, closed) = watch::channel(false);
        let task = Task {
            client: self.client,
            end: prefix_end(&prefix),
            prefix,
            timeout: self.request_timeout,
            decode: self.decode,
            heap_size: self.heap_size,
            counters: Arc::new(Counters::default()),
            stop: CancellationToken::new(),
            #[cfg(feature = "testing")]
            held,
            #[cfg(feature = "testing")]
            closed: closed_tx,
        };
        let (revision, kvs) = task.read().await?;
        let mut entries = Map::new();
        for kv in &kvs {
            if let Some(slot) = task.slot(kv) {
                entries.insert(Arc::from(kv.key()), slot);
            }
        }
        let snapshot = Snapshot::with_entries(entries, revision, 0);
        tracing::debug!(prefix = %show(&task.prefix), revision, len = snapshot.len(), "prefix cache loaded");
        let (tx, rx) = watch::channel(Published {
            snapshot,
            history: VecDeque::new(),
            failed: None,
        });
        let handle = Handle {
            rx,
            counters: task.counters.clone(),
            prefix: String::from_utf8_lossy(&task.prefix).into_owned(),
            _stop: task.stop.clone().drop_guard(),
            #[cfg(feature = "testing")]
            held: held_tx,
            #[cfg(feature = "testing")]
            closed,
        };
        tokio::spawn(task.run(tx));
        Ok(PrefixCache {
            handle: Arc::new(handle),
        })
    }
}

struct Handle<T> {
    rx: watch::Receiver<Published<T>>,
    counters: Arc<Counters>,
    prefix: String,
    /// Stops the background task when the last handle (cache or change stream) goes.
    _stop: DropGuard,
    /// Test hook: how many holds are taken, and whether the task has closed its stream.
    #[cfg(feature = "testing")]
    held: watch::Sender<usize>,
    #[cfg(feature = "testing")]
    closed: watch::Receiver<bool>,
}

/// A local copy of every key under a prefix, kept current by a single watch.
///
/// Reads ([`snapshot`](Self::snapshot), [`get`](Self::get)) never touch the network: they
/// return the latest published [`Snapshot`], which costs one reference-count increment. A
/// [`Changes`] stream delivers each change (added, updated, removed) in revision order (see
/// there for a stream that falls far behind).
///
/// # Guarantees
///
/// - **One watch stream** per cache, however many keys the prefix holds, owned by one
///   background task that stops when the last handle (cache or change stream) is dropped.
/// - **No gap**: the watch starts at the initial read's revision + 1; after a broken stream it
///   restarts at the last applied revision + 1, so every change is seen exactly once.
/// - **Compaction**: if etcd cancels the watch because the revision it needs was compacted, the
///   cache re-reads the prefix, emits the difference with its old contents as changes, and
///   watches from the new read's revision + 1. Intermediate values are then skipped, but the
///   cache converges to the store's state.
/// - **Failures**: errors of the stream, members that die or restart, members without a
///   leader (streams use require-leader when the client comes from [`Connect`](crate::Connect))
///   lead to a reopen with backoff (50 ms doubling to 2 s). A stream silent for 30 s is probed
///   with a progress request and reopened if the probe goes unanswered. Only an error no retry
///   can cure (permission denied) stops the cache, and then every change stream reports it:
///   the stream never just ends.
///
/// Entries are shared between snapshots; applying a change copies the map's index (not keys
/// or values) only while an older snapshot is still held, e.g. by a change stream.
///
/// # Examples
///
/// ```no_run
/// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
/// let cache = etcd_coord::PrefixCache::new(client, "config/app/").await?;
/// let level = cache.get("config/app/log-level").map(|kv| kv.value().to_vec());
/// let mut changes = cache.changes();
/// while let Ok(change) = changes.recv().await {
///     println!("{} changed", String::from_utf8_lossy(change.key()));
/// }
/// # Ok(()) }
/// ```
pub struct PrefixCache<T = KeyValue> {
    handle: Arc<Handle<T>>,
}

impl<T> Clone for PrefixCache<T> {
    fn clone(&self) -> Self {
        PrefixCache {
            handle: self.handle.clone(),
        }
    }
}

impl<T> fmt::Debug for PrefixCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.handle.rx.borrow();
        f.debug_struct("PrefixCache")
            .field("prefix", &self.handle.prefix)
            .field("revision", &p.snapshot.revision)
            .field("len", &p.snapshot.len())
            .field("failed", &p.failed)
            .finish()
    }
}

impl PrefixCache<KeyValue> {
    /// Reads every key under `prefix` and starts watching it. The prefix is used as given:
    /// `config/app/` holds `config/app/x` but not `config/application`.
    ///
    /// # Errors
    ///
    /// As [`PrefixCacheBuilder::build`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let cache = etcd_coord::PrefixCache::new(client, "config/app/").await?;
    /// println!("{} keys", cache.snapshot().len());
    /// # Ok(()) }
    /// ```
    pub async fn new(client: Client, prefix: impl Into<String>) -> Result<Self> {
        Self::builder(client, prefix).build().await
    }

    /// A builder with the defaults: raw key-values, [`DEFAULT_REQUEST_TIMEOUT`].
    ///
    /// ```no_run
    /// # fn f(client: etcd_client::Client) {
    /// let builder = etcd_coord::PrefixCache::builder(client, "config/app/");
    /// # }
    /// ```
    pub fn builder(client: Client, prefix: impl Into<String>) -> PrefixCacheBuilder<KeyValue> {
        PrefixCacheBuilder {
            client,
            prefix: prefix.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            decode: Arc::new(|kv: &KeyValue| Some(kv.clone())),
            heap_size: Some(Arc::new(|kv: &KeyValue| kv.key().len() + kv.value().len())),
        }
    }
}

impl<T: Send + Sync + 'static> PrefixCache<T> {
    /// The prefix this cache copies.
    ///
    /// ```no_run
    /// # fn f(cache: etcd_coord::PrefixCache) {
    /// println!("caching {}", cache.prefix());
    /// # }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.handle.prefix
    }

    /// The latest contents. No request is sent.
    ///
    /// ```no_run
    /// # fn f(cache: etcd_coord::PrefixCache) {
    /// let s = cache.snapshot();
    /// println!("{} keys at revision {}", s.len(), s.revision());
    /// # }
    /// ```
    pub fn snapshot(&self) -> Snapshot<T> {
        self.handle.rx.borrow().snapshot.clone()
    }

    /// The latest value of the full key `key`. No request is sent.
    ///
    /// ```no_run
    /// # fn f(cache: etcd_coord::PrefixCache) {
    /// let on = cache.get("config/app/feature-x").is_some_and(|kv| kv.value() == b"on");
    /// # }
    /// ```
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Arc<T>> {
        self.handle.rx.borrow().snapshot.get(key).cloned()
    }

    /// Counters of the watch's work.
    ///
    /// ```no_run
    /// # fn f(cache: etcd_coord::PrefixCache) {
    /// assert!(cache.stats().watches_opened >= 1);
    /// # }
    /// ```
    pub fn stats(&self) -> CacheStats {
        let c = &self.handle.counters;
        CacheStats {
            watches_opened: c.watches_opened.load(Ordering::Relaxed),
            resyncs: c.resyncs.load(Ordering::Relaxed),
        }
    }

    /// The changes that happen after now.
    ///
    /// ```no_run
    /// # async fn f(cache: etcd_coord::PrefixCache) -> etcd_coord::Result<()> {
    /// let mut changes = cache.changes();
    /// let first = changes.recv().await?;
    /// # Ok(()) }
    /// ```
    pub fn changes(&self) -> Changes<T> {
        self.subscribe().1
    }

    /// The current contents and the changes after them, with nothing missed or repeated in
    /// between: applying every change received, in order, to the snapshot gives the cache's
    /// later contents.
    ///
    /// ```no_run
    /// # async fn f(cache: etcd_coord::PrefixCache) -> etcd_coord::Result<()> {
    /// let (initial, mut changes) = cache.subscribe();
    /// println!("starting with {} keys", initial.len());
    /// loop {
    ///     let change = changes.recv().await?;
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self) -> (Snapshot<T>, Changes<T>) {
        let mut rx = self.handle.rx.clone();
        let base = rx.borrow_and_update().snapshot.clone();
        let changes = Changes {
            _handle: self.handle.clone(),
            rx,
            base: base.clone(),
            pending: VecDeque::new(),
        };
        (base, changes)
    }

    /// Waits until the cache reflects at least `revision` (for example the revision of a
    /// write you made under the prefix) and returns that snapshot.
    ///
    /// A revision of a write under the prefix is reached as soon as its event arrives; a
    /// revision of an unrelated write is reached with the next change under the prefix (or the
    /// server's next progress report). Bound it with [`tokio::time::timeout`].
    ///
    /// # Errors
    ///
    /// The error that stopped the cache, if it stops first.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(cache: etcd_coord::PrefixCache, mut client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let rev = client.put("config/app/x", "1", None).await?.header().unwrap().revision();
    /// let snapshot = cache.wait_for(rev).await?;
    /// assert!(snapshot.get("config/app/x").is_some());
    /// # Ok(()) }
    /// ```
    pub async fn wait_for(&self, revision: i64) -> Result<Snapshot<T>> {
        self.wait_until(|s| s.revision() >= revision).await
    }

    /// Waits until `predicate` holds for the cache's contents and returns them. The predicate
    /// is checked on the current contents first, then after each change.
    ///
    /// # Errors
    ///
    /// The error that stopped the cache, if it stops first.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(cache: etcd_coord::PrefixCache) -> etcd_coord::Result<()> {
    /// let ready = cache.wait_until(|s| s.get("config/app/ready").is_some()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_until<F>(&self, mut predicate: F) -> Result<Snapshot<T>>
    where
        F: FnMut(&Snapshot<T>) -> bool,
    {
        let mut rx = self.handle.rx.clone();
        let outcome = rx
            .wait_for(|p| p.failed.is_some() || predicate(&p.snapshot))
            .await;
        match outcome {
            Ok(p) => match &p.failed {
                Some(e) if !predicate(&p.snapshot) => Err(replay(e)),
                _ => Ok(p.snapshot.clone()),
            },
            Err(_) => Err(stopped()),
        }
    }

    /// Test hook (feature `testing`): closes the cache's watch stream and keeps it closed
    /// until the returned guard is dropped, as a network partition between this client and
    /// etcd would. Returns once the stream is closed (or the cache has stopped). Changes made
    /// meanwhile arrive when the watch reopens; if the store was compacted past them, the
    /// reopened watch is cancelled for compaction and the cache resynchronises.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the hold is released if the future is dropped.
    ///
    /// ```no_run
    /// # async fn f(cache: etcd_coord::PrefixCache) {
    /// let hold = cache.hold_watch().await;
    /// // ... write and compact ...
    /// drop(hold);
    /// # }
    /// ```
    #[cfg(feature = "testing")]
    pub async fn hold_watch(&self) -> WatchHold {
        self.handle.held.send_modify(|n| *n += 1);
        let hold = WatchHold {
            held: self.handle.held.clone(),
        };
        let mut closed = self.handle.closed.clone();
        let _ = closed.wait_for(|c| *c).await.is_ok();
        hold
    }
}

/// Keeps a cache's watch closed while it lives; see [`PrefixCache::hold_watch`].
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct WatchHold {
    held: watch::Sender<usize>,
}

#[cfg(feature = "testing")]
impl Drop for WatchHold {
    fn drop(&mut self) {
        self.held.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The changes of a [`PrefixCache`], in revision order; from [`PrefixCache::changes`] or
/// [`PrefixCache::subscribe`].
///
/// The cache keeps the changes of its last 256 steps (one step per watch response, or per
/// resynchronisation), shared by all streams. A stream that falls further behind is never cut
/// off and never makes anything buffer without bound: it gets the difference between the
/// contents it last delivered and the latest ones instead, in key order (so a key added and
/// removed while it was not looking is not reported at all). Either way, applying the changes
/// in order to the stream's starting snapshot gives the cache's contents.
///
/// The stream keeps the cache's background task alive. It ends only with an error that says
/// why the cache stopped.
///
/// ```no_run
/// # async fn f(cache: etcd_coord::PrefixCache) -> etcd_coord::Result<()> {
/// use etcd_coord::Change;
/// let mut changes = cache.changes();
/// loop {
///     match changes.recv().await? {
///         Change::Added { key, .. } | Change::Updated { key, .. } => reload(&key),
///         Change::Removed { key, .. } => forget(&key),
///     }
/// }
/// # }
/// # fn reload(_: &[u8]) {} fn forget(_: &[u8]) {}
/// ```
pub struct Changes<T> {
    _handle: Arc<Handle<T>>,
    rx: watch::Receiver<Published<T>>,
    base: Snapshot<T>,
    pending: VecDeque<Change<T>>,
}

impl<T> fmt::Debug for Changes<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes")
            .field("revision", &self.base.revision)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<T> Changes<T> {
    /// The next change.
    ///
    /// # Errors
    ///
    /// The error that stopped the cache (for example [`Error::PermissionDenied`]), after every
    /// change before it was delivered. Later calls return it again.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a change is removed from the stream only when `recv` returns it.
    ///
    /// ```no_run
    /// # async fn f(mut changes: etcd_coord::Changes<etcd_coord::etcd_client::KeyValue>) -> etcd_coord::Result<()> {
    /// let change = changes.recv().await?;
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Result<Change<T>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            {
                let p = self.rx.borrow_and_update();
                if p.snapshot.seq != self.base.seq {
                    let behind = (p.snapshot.seq - self.base.seq) as usize;
                    self.pending = if behind <= p.history.len() {
                        let missed = p.history.iter().skip(p.history.len() - behind);
                        missed.flat_map(|step| step.iter().cloned()).collect()
                    } else {
                        diff(&self.base.entries, &p.snapshot.entries).into()
                    };
                    self.base = p.snapshot.clone();
                    continue;
                }
                if let Some(e) = &p.failed {
                    return Err(replay(e));
                }
            }
            if self.rx.changed().await.is_err() && self.rx.borrow().failed.is_none() {
                return Err(stopped());
            }
        }
    }

    /// The revision of the contents the changes received so far lead to, once the changes
    /// already fetched from the same step are received too.
    ///
    /// ```no_run
    /// # fn f(changes: etcd_coord::Changes<etcd_coord::etcd_client::KeyValue>) {
    /// println!("up to revision {}", changes.revision());
    /// # }
    /// ```
    pub fn revision(&self) -> i64 {
        self.base.revision
    }
}

/// The changes that turn `old` into `new`. Entries with the same modification revision are the
/// same; the walk is linear in the two sizes.
fn diff<T>(old: &Map<T>, new: &Map<T>) -> Vec<Change<T>> {
    let mut changes = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return changes,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            std::cmp::Ordering::Less => {
                if let Some((key, slot)) = a.next() {
                    changes.push(Change::Removed {
                        key: key.clone(),
                        old: slot.value.clone(),
                    });
                }
            }
            std::cmp::Ordering::Greater => {
                if let Some((key, slot)) = b.next() {
                    changes.push(Change::Added {
                        key: key.clone(),
                        value: slot.value.clone(),
                    });
                }
            }
            std::cmp::Ordering::Equal => {
                if let (Some((key, was)), Some((_, now))) = (a.next(), b.next()) {
                    if was.mod_revision != now.mod_revision {
                        changes.push(Change::Updated {
                            key: key.clone(),
                            old: was.value.clone(),
                            new: now.value.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// A copy of the error that stopped the cache, for each stream that reports it (the error type
/// is not `Clone`; the variant and message are kept, the original is the source).
fn replay(e: &Arc<Error>) -> Error {
    let source = Some(Box::new(e.clone()) as crate::error::BoxError);
    match &**e {
        Error::PermissionDenied { message, .. } => Error::PermissionDenied {
            message: message.clone(),
            source,
        },
        Error::Unavailable { message, .. } => Error::Unavailable {
            message: message.clone(),
            source,
        },
        Error::InvalidArgument { name, reason } => Error::InvalidArgument {
            name,
            reason: reason.clone(),
        },
        other => Error::Etcd {
            message: other.to_string(),
            source,
            retryable: false,
        },
    }
}

fn stopped() -> Error {
    Error::Etcd {
        message: "the prefix cache's background task stopped".into(),
        source: None,
        retryable: false,
    }
}

/// How following one watch stream ended.
enum Outcome {
    /// Every handle is gone.
    Stopped,
    /// The revision the watch needed was compacted: re-read.
    Compacted,
    /// The stream broke or was cancelled: reopen (or give up, if not retryable).
    Broken(Error),
    /// A test holds the watch closed.
    #[cfg(feature = "testing")]
    Held,
}

struct Task<T> {
    client: Client,
    prefix: Vec<u8>,
    end: Vec<u8>,
    timeout: Duration,
    decode: Decoder<T>,
    heap_size: Option<Sizer<T>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    #[cfg(feature = "testing")]
    held: watch::Receiver<usize>,
    #[cfg(feature = "testing")]
    closed: watch::Sender<bool>,
}

impl<T: Send + Sync + 'static> Task<T> {
    fn slot(&self, kv: &KeyValue) -> Option<Slot<T>> {
        let value = (self.decode)(kv);
        if value.is_none() {
            tracing::debug!(key = %show(kv.key()), revision = kv.mod_revision(), "value not decoded; left out of the cache");
        }
        value.map(|v| {
            let owned = match &self.heap_size {
                Some(size) => size(&v),
                None => kv.value().len(),
            };
            Slot {
                value: Arc::new(v),
                mod_revision: kv.mod_revision(),
                bytes: std::mem::size_of::<T>() + owned + ENTRY_OVERHEAD,
            }
        })
    }

    /// Every key-value under the prefix, read page by page at one revision.
    async fn read(&self) -> Result<(i64, Vec<KeyValue>)> {
        let mut client = self.client.clone();
        let mut start = self.prefix.clone();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(self.end.clone())
                .with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let mut resp = with_timeout(
                self.timeout,
                "reading the cached prefix",
                client.get(start.clone(), Some(opts)),
            )
            .await?;
            if revision == 0 {
                revision = header_revision(resp.header())?;
            }
            let more = resp.more();
            let page = resp.take_kvs();
            match page.last() {
                Some(last) if more => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => {
                    kvs.extend(page);
                    return Ok((revision, kvs));
                }
            }
            kvs.extend(page);
        }
    }

    async fn run(self, tx: watch::Sender<Published<T>>) {
        let prefix = show(&self.prefix);
        if let Err(e) = self.follow_forever(&tx).await {
            tracing::warn!(prefix = %prefix, error = %e, "prefix cache stopped");
            tx.send_modify(|p| p.failed = Some(Arc::new(e)));
        } else {
            tracing::debug!(prefix = %prefix, "prefix cache dropped; watch closed");
        }
    }

    /// Watches until every handle is gone (`Ok`) or an error no retry cures (`Err`).
    async fn follow_forever(&self, tx: &watch::Sender<Published<T>>) -> Result<()> {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut must_read = false;
        loop {
            #[cfg(feature = "testing")]
            if *self.held.borrow() > 0 {
                self.closed.send_replace(true);
                let mut held = self.held.clone();
                tokio::select! {
                    _ = self.stop.cancelled() => return Ok(()),
                    _ = async { held.wait_for(|n| *n == 0).await.is_ok() } => {}
                }
                self.closed.send_replace(false);
            }
            let problem = if must_read {
                match self.stoppable(self.resync(tx)).await {
                    None => return Ok(()),
                    Some(Ok(())) => {
                        must_read = false;
                        continue;
                    }
                    Some(Err(e)) => e,
                }
            } else {
                let from = tx.borrow().snapshot.revision + 1;
                match self.stoppable(self.open(from)).await {
                    None => return Ok(()),
                    Some(Err(e)) => e,
                    Some(Ok(stream)) => match self.follow(stream, tx, &mut backoff).await {
                        Outcome::Stopped => return Ok(()),
                        Outcome::Compacted => {
                            must_read = true;
                            continue;
                        }
                        #[cfg(feature = "testing")]
                        Outcome::Held => continue,
                        Outcome::Broken(e) => e,
                    },
                }
            };
            if !problem.is_retryable() {
                return Err(problem);
            }
            let delay = backoff.next_delay();
            tracing::warn!(prefix = %show(&self.prefix), error = %problem, ?delay, "prefix watch failed; retrying");
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// `None` if every handle went away first.
    async fn stoppable<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            _ = self.stop.cancelled() => None,
            out = fut => Some(out),
        }
    }

    async fn open(&self, from: i64) -> Result<etcd_client::WatchStream> {
        let opts = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(from)
            .with_progress_notify();
        let mut client = self.client.clone();
        let stream = with_timeout(
            self.timeout,
            "opening the prefix watch",
            client.watch(self.prefix.clone(), Some(opts)),
        )
        .await?;
        self.counters.watches_opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(prefix = %show(&self.prefix), start_revision = from, "prefix watch opened");
        Ok(stream)
    }

    /// Applies the stream's events until it ends one way or another.
    async fn follow(
        &self,
        mut stream: etcd_client::WatchStream,
        tx: &watch::Sender<Published<T>>,
        backoff: &mut Backoff,
    ) -> Outcome {
        let mut watch_id = None;
        let mut quiet_until = Instant::now() + PROBE_IDLE;
        let mut probe_sent = false;
        #[cfg(feature = "testing")]
        let mut held = self.held.clone();
        #[cfg(feature = "testing")]
        let hold = async move {
            let _ = held.wait_for(|n| *n > 0).await.is_ok();
        };
        #[cfg(not(feature = "testing"))]
        let hold = std::future::pending::<()>();
        tokio::pin!(hold);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Outcome::Stopped,
                _ = &mut hold => {
                    #[cfg(feature = "testing")]
                    return Outcome::Held;
                }
                _ = tokio::time::sleep_until(quiet_until) => {
                    if probe_sent {
                        return Outcome::Broken(Error::Timeout {
                            operation: "waiting for the prefix watch to answer a progress request",
                            after: self.timeout,
                        });
                    }
                    if let Err(e) = stream.request_progress().await {
                        return Outcome::Broken(e.into());
                    }
                    probe_sent = true;
                    quiet_until = Instant::now() + self.timeout;
                }
                message = stream.message() => {
                    probe_sent = false;
                    quiet_until = Instant::now() + PROBE_IDLE;
                    let resp = match message {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return Outcome::Broken(Error::Unavailable {
                            message: "the watch stream ended".into(),
                            source: None,
                        }),
                        Err(e) => return Outcome::Broken(e.into()),
                    };
                    if resp.canceled() {
                        return self.cancelled(&resp);
                    }
                    if resp.created() {
                        watch_id = Some(resp.watch_id());
                        backoff.reset();
                    }
                    self.apply(&resp, watch_id, tx);
                }
            }
        }
    }

    fn cancelled(&self, resp: &WatchResponse) -> Outcome {
        let reason = resp.cancel_reason();
        if resp.compact_revision() > 0 {
            tracing::debug!(
                prefix = %show(&self.prefix), compact_revision = resp.compact_revision(),
                "prefix watch fell behind a compaction; re-reading"
            );
            return Outcome::Compacted;
        }
        let message = format!("the server cancelled the watch: {reason}");
        if reason.contains("permission denied") {
            return Outcome::Broken(Error::PermissionDenied {
                message,
                source: None,
            });
        }
        Outcome::Broken(Error::Etcd {
            message,
            source: None,
            retryable: true,
        })
    }

    /// Applies one watch response and publishes the result, if anything changed.
    fn apply(&self, resp: &WatchResponse, watch_id: Option<i64>, tx: &watch::Sender<Published<T>>) {
        let events = resp.events();
        if events.is_empty() {
            // Progress reports for our watch id come only when it has caught up, so their
            // revision is complete. Answers to progress requests (id -1) are not trusted: old
            // servers send them even while the watch is behind.
            let progress = resp.header().map_or(0, |h| h.revision());
            if Some(resp.watch_id()) == watch_id && !resp.created() {
                tx.send_if_modified(|p| {
                    if progress > p.snapshot.revision {
                        p.snapshot.revision = progress;
                        true
                    } else {
                        false
                    }
                });
            }
            return;
        }
        tx.send_modify(|p| {
            let snapshot = &mut p.snapshot;
            let entries = Arc::make_mut(&mut snapshot.entries);
            let mut batch = Vec::new();
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                snapshot.revision = snapshot.revision.max(revision);
                let key = kv.key();
                let current = entries.get(key).map(|s| s.mod_revision);
                if current.is_some_and(|rev| rev >= revision) {
                    continue; // already applied (a replayed event)
                }
                let slot = match event.event_type() {
                    EventType::Put => self.slot(kv),
                    EventType::Delete => None,
                };
                let change = match (entries.remove_entry(key), slot) {
                    (None, None) => continue,
                    (None, Some(slot)) => {
                        let key: Arc<[u8]> = Arc::from(key);
                        snapshot.bytes += key.len() + slot.bytes;
                        let value = slot.value.clone();
                        entries.insert(key.clone(), slot);
                        Change::Added { key, value }
                    }
                    (Some((key, was)), Some(slot)) => {
                        snapshot.bytes = snapshot.bytes - was.bytes + slot.bytes;
                        let new = slot.value.clone();
                        entries.insert(key.clone(), slot);
                        Change::Updated {
                            key,
                            old: was.value,
                            new,
                        }
                    }
                    (Some((key, was)), None) => {
                        snapshot.bytes -= key.len() + was.bytes;
                        Change::Removed {
                            key,
                            old: was.value,
                        }
                    }
                };
                tracing::debug!(key = %show(change.key()), revision, "cache changed");
                batch.push(change);
            }
            if !batch.is_empty() {
                p.step(batch);
            }
        });
    }

    /// Re-reads the prefix after a compaction and publishes the difference as one step.
    async fn resync(&self, tx: &watch::Sender<Published<T>>) -> Result<()> {
        let (revision, kvs) = self.read().await?;
        self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
        let old = tx.borrow().snapshot.clone();
        let mut entries = Map::new();
        for kv in &kvs {
            // Unchanged entries keep their decoded value.
            let kept = old
                .entries
                .get_key_value(kv.key())
                .filter(|(_, s)| s.mod_revision == kv.mod_revision());
            if let Some((key, slot)) = kept {
                entries.insert(key.clone(), slot.clone());
            } else if let Some(slot) = self.slot(kv) {
                entries.insert(Arc::from(kv.key()), slot);
            }
        }
        let batch = diff(&old.entries, &entries);
        tracing::debug!(
            prefix = %show(&self.prefix), revision, changes = batch.len(),
            "prefix cache resynchronised"
        );
        tx.send_modify(|p| {
            p.snapshot = Snapshot::with_entries(entries, revision, p.snapshot.seq);
            p.step(batch);
        });
        Ok(())
    }
}
