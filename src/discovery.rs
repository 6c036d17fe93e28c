//! Service registry and discovery: instances register under a prefix with their session's
//! lease, so that a crash removes them; clients keep a live list with a [`PrefixCache`].
//!
//! # Key layout
//!
//! An instance of service `SERVICE` with id `ID`, registered under the registry prefix
//! `PREFIX`, lives at
//!
//! ```text
//! PREFIX/SERVICE/ID   →   {"Addr":"10.0.0.7:8080","Metadata":{...}}
//! ```
//!
//! bound to the registering session's lease. The value is the JSON encoding of Go's
//! `go.etcd.io/etcd/client/v3/naming/endpoints.Endpoint`, so a Go service using
//! `endpoints.NewManager(client, "PREFIX/SERVICE")` (or gRPC-Go's etcd resolver on
//! `etcd:///PREFIX/SERVICE`) sees the same instances, and instances it adds are discovered
//! here. Service names and ids contain no `/`, so one service's keys never fall under another's.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};

use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use serde_json::Value;

use crate::cache::{Changes, PrefixCache, Snapshot};
use crate::error::{header_revision, Error, Result};
use crate::keys::{show, validate_name};
use crate::session::Session;
use crate::wait;

/// The largest encoded instance value (address and metadata as JSON) accepted, in bytes:
/// well under etcd's default 1.5 MiB request limit. Discovery data this large is almost
/// certainly a mistake.
pub const MAX_INSTANCE_VALUE_LEN: usize = 1 << 20;

/// One registered instance of a service, as discovered.
///
/// ```no_run
/// # fn f(i: etcd_coord::Instance) {
/// println!("{}/{} at {} ({})", i.service, i.id, i.address, i.metadata);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Instance {
    /// The service name.
    pub service: String,
    /// The instance id, unique within the service.
    pub id: String,
    /// Where to reach it (`Addr` in the stored JSON).
    pub address: String,
    /// Whatever the instance published about itself (`Metadata` in the stored JSON; `null`
    /// when absent).
    pub metadata: Value,
    /// The lease the key is bound to (0 for a key without a lease).
    pub lease: i64,
    /// The revision at which the key was created.
    pub create_revision: i64,
    /// The revision of the key's last write (registration or update).
    pub mod_revision: i64,
}

impl Instance {
    /// The metadata as your own type.
    ///
    /// # Errors
    ///
    /// The JSON error if the metadata does not have that shape.
    ///
    /// ```no_run
    /// # fn f(i: etcd_coord::Instance) -> serde_json::Result<()> {
    /// let weights: std::collections::HashMap<String, u32> = i.metadata_as()?;
    /// # Ok(()) }
    /// ```
    pub fn metadata_as<M: serde::de::DeserializeOwned>(&self) -> serde_json::Result<M> {
        <M as serde::Deserialize>::deserialize(&self.metadata)
    }
}

/// Checks a service name or instance id: a valid name without `/`.
fn validate_segment(arg: &'static str, value: &str) -> Result<()> {
    validate_name(arg, value)?;
    if value.contains('/') {
        return Err(Error::invalid(
            arg,
            format!("{value:?} contains '/', which separates the parts of a key"),
        ));
    }
    Ok(())
}

fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}/{service}/")
}

/// The stored value: Go's `endpoints.Endpoint` as JSON.
fn encode(address: &str, metadata: &Value) -> Result<Vec<u8>> {
    let value = serde_json::json!({ "Addr": address, "Metadata": metadata });
    let bytes =
        serde_json::to_vec(&value).map_err(|e| Error::invalid("metadata", e.to_string()))?;
    if bytes.len() > MAX_INSTANCE_VALUE_LEN {
        return Err(Error::invalid(
            "metadata",
            format!(
                "the encoded instance is {} bytes; the limit is {MAX_INSTANCE_VALUE_LEN}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// The instance stored at `kv`, if it is one: a direct child of the service prefix with a
/// JSON object that has a string `Addr`.
fn decode(service: &str, prefix_len: usize, kv: &KeyValue) -> Option<Instance> {
    let id = std::str::from_utf8(kv.key().get(prefix_len..)?).ok()?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    let parsed: Value = match serde_json::from_slice(kv.value()) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(key = %show(kv.key()), error = %e, "not an instance: invalid JSON");
            return None;
        }
    };
    let address = parsed.get("Addr")?.as_str()?.to_owned();
    Some(Instance {
        service: service.to_owned(),
        id: id.to_owned(),
        address,
        metadata: parsed.get("Metadata").cloned().unwrap_or(Value::Null),
        lease: kv.lease(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// Roughly the heap a JSON value owns. An object is a B-tree map whose nodes hold up to 11
/// entries and are at least about two-thirds full in practice.
fn json_heap(v: &Value) -> usize {
    use std::mem::size_of;
    const NODE: usize = 11 * (size_of::<String>() + size_of::<Value>()) + 16;
    match v {
        Value::String(s) => s.capacity(),
        Value::Array(a) => {
            a.capacity() * size_of::<Value>() + a.iter().map(json_heap).sum::<usize>()
        }
        Value::Object(m) if m.is_empty() => 0,
        Value::Object(m) => {
            NODE * m.len().div_ceil(8)
                + m.iter()
                    .map(|(k, v)| k.capacity() + json_heap(v))
                    .sum::<usize>()
        }
        _ => 0,
    }
}

/// Registers instances of services under a prefix, bound to a session.
///
/// An instance stays registered while its [`Registration`] lives and the session's lease is
/// alive: if the process crashes, the lease expires one TTL later and etcd deletes the key, so
/// every client's [`Discovery`] drops it. Pick the session's TTL for how long a dead instance
/// may still be listed.
///
/// # Ownership
///
/// A registration is ours while its key is bound to our session's lease. Registering an id
/// that exists under another lease takes the key over (the newest registration wins, as with
/// Go's endpoints manager): that is how a restarted process, with a new session, replaces the
/// registration its crashed predecessor left behind without waiting for the old lease to
/// expire. From then on, the old registration's updates and deregistration fail with
/// [`Error::NotHeld`] and delete nothing.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let registry = etcd_coord::Registry::new(&session, "services")?;
/// let registration = registry
///     .register("billing", "pod-7", "10.0.0.7:8080", serde_json::json!({"zone": "eu-1"}))
///     .await?;
/// // ... serve ...
/// registration.deregister().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    session: Session,
    prefix: String,
}

impl Registry {
    /// A registry under `prefix` (for example `services`; keys are `prefix/SERVICE/ID`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `prefix` if it is empty, too long, has control
    /// characters or ends with `/`.
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let registry = etcd_coord::Registry::new(&session, "prod/services")?;
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, prefix: impl Into<String>) -> Result<Registry> {
        let prefix = prefix.into();
        validate_name("prefix", &prefix)?;
        Ok(Registry {
            session: session.clone(),
            prefix,
        })
    }

    /// The registry prefix.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::Registry) {
    /// assert_eq!(r.prefix(), "services");
    /// # }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The session registrations are bound to.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registry) {
    /// r.session().lost().await; // every registration of this registry is gone
    /// # }
    /// ```
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Registers instance `id` of `service` at `address`, with `metadata` (any JSON;
    /// [`Value::Null`] for none). One request (retried while the session lives if etcd is
    /// briefly unreachable).
    ///
    /// Registering an id again replaces its address and metadata; see [ownership](Registry#ownership)
    /// for an id registered by another session.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `service`, `id`, `address` or `metadata`, before
    ///   anything is sent;
    /// - the session's error ([`Error::SessionExpired`], [`Error::SessionClosed`]) if it is
    ///   not alive or ends while retrying;
    /// - non-retryable etcd errors such as [`Error::PermissionDenied`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped after the request was sent, the key is deleted in
    /// the background if it is bound to this session (tracked by the session, so
    /// [`Session::close`] waits for it). Note that this also removes an earlier registration of
    /// the same id by the same session.
    ///
    /// ```no_run
    /// # async fn f(registry: etcd_coord::Registry) -> etcd_coord::Result<()> {
    /// let reg = registry.register("search", "node-1", "10.1.2.3:9200", serde_json::Value::Null).await?;
    /// println!("registered at revision {}", reg.revision());
    /// # Ok(()) }
    /// ```
    pub async fn register(
        &self,
        service: &str,
        id: &str,
        address: &str,
        metadata: Value,
    ) -> Result<Registration> {
        validate_segment("service", service)?;
        validate_segment("id", id)?;
        if address.is_empty() {
            return Err(Error::invalid("address", "must not be empty"));
        }
        if let Some(c) = address.chars().find(|c| c.is_control()) {
            return Err(Error::invalid(
                "address",
                format!("contains the control character {c:?}"),
            ));
        }
        let value = encode(address, &metadata)?;
        let session = &self.session;
        session.check_alive()?;
        let key = format!("{}{id}", service_prefix(&self.prefix, service));
        let pending = wait::PendingKey::new(session, key.clone());
        let opts = PutOptions::new()
            .with_lease(session.lease_id())
            .with_prev_key();
        let resp = wait::retrying(session, || {
            let mut client = session.client().clone();
            let (key, value, opts) = (key.clone(), value.clone(), opts.clone());
            async move {
                session
                    .request(
                        "registering an instance",
                        client.put(key, value, Some(opts)),
                    )
                    .await
            }
        })
        .await?;
        let revision = header_revision(resp.header())?;
        pending.disarm();
        match resp.prev_key() {
            Some(prev) if prev.lease() != session.lease_id() => tracing::debug!(
                key = %key, revision, previous_lease = %format_args!("{:x}", prev.lease()),
                "registered, taking the key over from another lease"
            ),
            _ => tracing::debug!(key = %key, revision, "registered"),
        }
        Ok(Registration {
            session: session.clone(),
            key,
            service: service.to_owned(),
            id: id.to_owned(),
            address: address.to_owned(),
            metadata: StdMutex::new(metadata),
            revision: AtomicI64::new(revision),
            released: AtomicBool::new(false),
        })
    }
}

/// A registered instance. Dropping it deregisters the instance in the background; keep it for
/// as long as the instance should be listed, or [`detach`](Self::detach) it to leave the
/// instance registered until the session ends.
///
/// ```no_run
/// # async fn f(registry: etcd_coord::Registry) -> etcd_coord::Result<()> {
/// let reg = registry.register("search", "node-1", "10.1.2.3:9200", serde_json::json!({"load": 0.1})).await?;
/// reg.update(serde_json::json!({"load": 0.8})).await?;
/// reg.deregister().await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping the registration deregisters the instance"]
pub struct Registration {
    session: Session,
    key: String,
    service: String,
    id: String,
    address: String,
    metadata: StdMutex<Value>,
    revision: AtomicI64,
    released: AtomicBool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("address", &self.address)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// The instance's key (`PREFIX/SERVICE/ID`).
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::Registration) {
    /// println!("registered at {}", r.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The service name.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::Registration) {
    /// println!("{}", r.service());
    /// # }
    /// ```
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instance id.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::Registration) {
    /// println!("{}", r.id());
    /// # }
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The revision of the last write by this registration (the registration or the latest
    /// [`update`](Self::update)); [`Discovery::wait_for`] with it waits until a client sees it.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registration, d: etcd_coord::Discovery) -> etcd_coord::Result<()> {
    /// d.wait_for(r.revision()).await?;
    /// # Ok(()) }
    /// ```
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// The session the registration is bound to.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registration) {
    /// r.session().lost().await;
    /// eprintln!("registration gone with the session");
    /// # }
    /// ```
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// A comparison that holds only while the key is bound to this registration's session,
    /// for your own transactions.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registration, mut client: etcd_client::Client) -> Result<(), etcd_client::Error> {
    /// use etcd_client::{Txn, TxnOp};
    /// let txn = Txn::new().when([r.is_owner()]).and_then([TxnOp::put("status/node-1", "serving", None)]);
    /// client.txn(txn).await?;
    /// # Ok(()) }
    /// ```
    pub fn is_owner(&self) -> Compare {
        Compare::lease(self.key.clone(), CompareOp::Equal, self.session.lease_id())
    }

    /// Replaces the metadata, only while the registration is ours. One request; returns its
    /// revision.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `metadata` if it is too large;
    /// - the session's error if it is not alive;
    /// - [`Error::NotHeld`] if the key is gone or was taken over by another session (nothing
    ///   was written);
    /// - [`Error::Timeout`] / [`Error::Unavailable`] if etcd did not answer.
    ///
    /// # Cancel safety
    ///
    /// If dropped after sending, the update may or may not have been applied.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registration) -> etcd_coord::Result<()> {
    /// r.update(serde_json::json!({"draining": true})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn update(&self, metadata: Value) -> Result<i64> {
        let value = encode(&self.address, &metadata)?;
        self.session.check_alive()?;
        let txn = Txn::new().when([self.is_owner()]).and_then([TxnOp::put(
            self.key.clone(),
            value,
            Some(PutOptions::new().with_lease(self.session.lease_id())),
        )]);
        let mut client = self.session.client().clone();
        let resp = self
            .session
            .request("updating an instance", client.txn(txn))
            .await?;
        if !resp.succeeded() {
            tracing::debug!(key = %self.key, "update refused: the registration is no longer ours");
            return Err(Error::NotHeld {
                key: self.key.clone(),
            });
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.revision.fetch_max(revision, Ordering::AcqRel);
        *self.metadata.lock().unwrap_or_else(PoisonError::into_inner) = metadata;
        tracing::debug!(key = %self.key, revision, "instance updated");
        Ok(revision)
    }

    /// The metadata as last registered or updated by this handle.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::Registration) {
    /// println!("{}", r.metadata());
    /// # }
    /// ```
    pub fn metadata(&self) -> Value {
        self.metadata
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Deregisters now: deletes the key if it is still bound to this session.
    ///
    /// # Errors
    ///
    /// [`Error::NotHeld`] if the key was already gone or taken over (nothing was deleted);
    /// [`Error::Timeout`] / [`Error::Unavailable`] if etcd did not answer, in which case the
    /// deregistration continues in the background.
    ///
    /// # Cancel safety
    ///
    /// If dropped, the deregistration continues in the background.
    ///
    /// ```no_run
    /// # async fn f(r: etcd_coord::Registration) -> etcd_coord::Result<()> {
    /// r.deregister().await?;
    /// # Ok(()) }
    /// ```
    pub async fn deregister(self) -> Result<()> {
        let deleted = wait::release(&self.session, &self.key, None).await;
        if deleted.is_ok() {
            self.released.store(true, Ordering::Release);
        }
        if deleted? {
            Ok(())
        } else {
            Err(Error::NotHeld {
                key: self.key.clone(),
            })
        }
    }

    /// Gives up the handle and leaves the instance registered until the session ends (or
    /// another session takes the id over).
    ///
    /// ```no_run
    /// # async fn f(registry: etcd_coord::Registry) -> etcd_coord::Result<()> {
    /// registry.register("cron", "worker-1", "10.0.0.9:7000", serde_json::Value::Null).await?.detach();
    /// # Ok(()) }
    /// ```
    pub fn detach(self) {
        self.released.store(true, Ordering::Release);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            tracing::debug!(key = %self.key, "registration dropped; deregistering in the background");
            wait::release_in_background(&self.session, self.key.clone(), None);
        }
    }
}

/// The live instances of one service, kept current by a [`PrefixCache`] (one watch stream).
///
/// Needs only a [`Client`], no session. Reads are local and cheap; see [`PrefixCache`] for how
/// the list survives compaction, member failures and restarts.
///
/// # Examples
///
/// ```no_run
/// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
/// let billing = etcd_coord::Discovery::new(client, "services", "billing").await?;
/// let picker = billing.picker();
/// if let Some(instance) = picker.pick() {
///     println!("calling {}", instance.address);
/// }
/// let mut changes = billing.changes();
/// while let Ok(change) = changes.recv().await {
///     println!("{:?}", change);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Discovery {
    cache: PrefixCache<Instance>,
    prefix: String,
    service: String,
}

impl Discovery {
    /// Lists the instances of `service` registered under `prefix` and starts watching them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `prefix` or `service` before anything is sent;
    /// otherwise as [`PrefixCacheBuilder::build`](crate::PrefixCacheBuilder::build).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    ///
    /// ```no_run
    /// # async fn f(client: etcd_client::Client) -> etcd_coord::Result<()> {
    /// let d = etcd_coord::Discovery::new(client, "services", "billing").await?;
    /// # Ok(()) }
    /// ```
    pub async fn new(client: Client, prefix: &str, service: &str) -> Result<Discovery> {
        validate_name("prefix", prefix)?;
        validate_segment("service", service)?;
        let key_prefix = service_prefix(prefix, service);
        let prefix_len = key_prefix.len();
        let name = service.to_owned();
        let cache = PrefixCache::builder(client, key_prefix)
            .decode(move |kv| decode(&name, prefix_len, kv))
            .heap_size(|i: &Instance| {
                i.service.capacity()
                    + i.id.capacity()
                    + i.address.capacity()
                    + json_heap(&i.metadata)
            })
            .build()
            .await?;
        Ok(Discovery {
            cache,
            prefix: prefix.to_owned(),
            service: service.to_owned(),
        })
    }

    /// The service name.
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// println!("{}", d.service());
    /// # }
    /// ```
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The live instances, ordered by id. No request is sent.
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// for i in d.instances() {
    ///     println!("{} at {}", i.id, i.address);
    /// }
    /// # }
    /// ```
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.cache.snapshot().values().cloned().collect()
    }

    /// The instance with this id, if it is live. No request is sent.
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// let up = d.get("pod-7").is_some();
    /// # }
    /// ```
    pub fn get(&self, id: &str) -> Option<Arc<Instance>> {
        self.cache.get(format!(
            "{}{id}",
            service_prefix(&self.prefix, &self.service)
        ))
    }

    /// The live instances with the revision they reflect.
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// let s = d.snapshot();
    /// println!("{} instances as of revision {}", s.len(), s.revision());
    /// # }
    /// ```
    pub fn snapshot(&self) -> Snapshot<Instance> {
        self.cache.snapshot()
    }

    /// Instances added, updated and removed from now on. See [`Changes`].
    ///
    /// ```no_run
    /// # async fn f(d: etcd_coord::Discovery) -> etcd_coord::Result<()> {
    /// use etcd_coord::Change;
    /// let mut changes = d.changes();
    /// if let Change::Removed { old, .. } = changes.recv().await? {
    ///     println!("{} left", old.id);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn changes(&self) -> Changes<Instance> {
        self.cache.changes()
    }

    /// The instances now and the changes after them; see [`PrefixCache::subscribe`].
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// let (now, changes) = d.subscribe();
    /// # }
    /// ```
    pub fn subscribe(&self) -> (Snapshot<Instance>, Changes<Instance>) {
        self.cache.subscribe()
    }

    /// A round-robin picker over the live instances.
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// let picker = d.picker();
    /// let next = picker.pick();
    /// # }
    /// ```
    pub fn picker(&self) -> RoundRobin {
        RoundRobin {
            cache: self.cache.clone(),
            next: AtomicUsize::new(0),
            list: StdMutex::new((u64::MAX, Arc::from(Vec::new()))),
        }
    }

    /// Waits until the list reflects at least `revision` (e.g. a [`Registration::revision`]);
    /// see [`PrefixCache::wait_for`].
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
    /// # async fn f(d: etcd_coord::Discovery) -> etcd_coord::Result<()> {
    /// let s = d.wait_for(1234).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_for(&self, revision: i64) -> Result<Snapshot<Instance>> {
        self.cache.wait_for(revision).await
    }

    /// Waits until `predicate` holds for the live instances; see
    /// [`PrefixCache::wait_until`].
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
    /// # async fn f(d: etcd_coord::Discovery) -> etcd_coord::Result<()> {
    /// d.wait_until(|s| s.len() >= 3).await?; // quorum of backends up
    /// # Ok(()) }
    /// ```
    pub async fn wait_until<F>(&self, predicate: F) -> Result<Snapshot<Instance>>
    where
        F: FnMut(&Snapshot<Instance>) -> bool,
    {
        self.cache.wait_until(predicate).await
    }

    /// The underlying cache (for [`stats`](PrefixCache::stats) and the like).
    ///
    /// ```no_run
    /// # fn f(d: etcd_coord::Discovery) {
    /// println!("{:?}", d.cache().stats());
    /// # }
    /// ```
    pub fn cache(&self) -> &PrefixCache<Instance> {
        &self.cache
    }
}

/// Hands out a service's live instances in turn; from [`Discovery::picker`].
///
/// Picking is local and O(1) (the list is rebuilt once after each change). When instances come
/// or go the rotation continues over the new list, so no instance waits more than about one
/// round.
///
/// ```no_run
/// # async fn f(d: etcd_coord::Discovery) {
/// let picker = d.picker();
/// for _ in 0..3 {
///     if let Some(i) = picker.pick() { println!("-> {}", i.address); }
/// }
/// # }
/// ```
pub struct RoundRobin {
    cache: PrefixCache<Instance>,
    next: AtomicUsize,
    /// The instances of the snapshot with this sequence number.
    list: StdMutex<(u64, Arc<[Arc<Instance>]>)>,
}

impl fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobin")
            .field("next", &self.next.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RoundRobin {
    /// The next instance, or `None` while there is none.
    ///
    /// ```no_run
    /// # fn f(p: etcd_coord::RoundRobin) {
    /// match p.pick() {
    ///     Some(i) => println!("calling {}", i.address),
    ///     None => eprintln!("no instance available"),
    /// }
    /// # }
    /// ```
    pub fn pick(&self) -> Option<Arc<Instance>> {
        let snapshot = self.cache.snapshot();
        let list = {
            let mut cached = self.list.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0 != snapshot.seq() {
                *cached = (snapshot.seq(), snapshot.values().cloned().collect());
            }
            cached.1.clone()
        };
        if list.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(list[n % list.len()].clone())
    }
}
