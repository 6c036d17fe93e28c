//! A double barrier: a fixed number of participants start a round together and finish it
//! together, round after round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnResponse,
};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::keys::{participant_key, prefix, prefix_end, show, validate_name};
use crate::session::Session;
use crate::wait::{self, Entry, PendingKey};

/// Lets `count` participants start a phase together ([`enter`](Self::enter)) and finish it
/// together ([`BarrierRound::leave`]), as often as they like.
///
/// # Rounds
///
/// Participation is counted in numbered rounds, and a round's keys live under their own
/// prefix, so a fast participant that enters round *k + 1* can never be mistaken for a slow
/// one still leaving round *k* (the trap of Go's `recipes.DoubleBarrier`, whose single
/// `ready` key is shared by all rounds).
///
/// - `NAME/round` holds the number of the round open for entry (absent: round 0). It is the
///   only key that stays when nobody takes part.
/// - `NAME/<round>/<lease hex>_<random>` is one participant, bound to its session's lease.
///
/// [`enter`](Self::enter) adds a participant to the open round. The participant that sees
/// `count` of them *seals* the round in one transaction: it checks that the round is still
/// open and that each of the first `count` participants (by arrival) is still there, opens the
/// next round, and writes into each member's key that it is a member. Every member's `enter`
/// then returns a [`BarrierRound`]. So when `enter` returns, `count` participants were alive
/// and inside at one and the same revision.
///
/// [`BarrierRound::leave`] returns once every member of the round has left. The first member
/// (the oldest key) stays until all the others are gone and then leaves last; everyone else
/// deletes its key at once and waits for the first member's key to go.
///
/// With exactly `count` participants that each leave before entering again, rounds follow one
/// another strictly: nobody can enter round *k + 1* before every member left round *k*.
///
/// # More than `count` participants
///
/// A participant that arrives when the open round already has `count` members is not an
/// error: it waits for, and joins, the next round. The members of a round are the first
/// `count` to arrive. Note that such a next round (made of extra participants) can start while
/// the previous one is still working: a double barrier synchronises the members of one round,
/// not rounds with each other.
///
/// # Failures
///
/// Nobody ever waits on a dead participant:
///
/// - one whose session ends (or whose `enter` is cancelled) before its round is sealed simply
///   did not enter: the round waits for somebody else to fill its place;
/// - a member whose session ends after the round was sealed (a crash, a revoked lease) counts
///   as having left when its key goes with its lease: at once on a revoke, one TTL after a
///   crash. The others' `leave` then returns normally. If you need to know that every member
///   finished its work, record that in your own data; the barrier only promises not to hang.
/// - the participant whose session ended gets the session's error (or [`Error::NotHeld`] if its
///   key went first) from `enter` or `leave`.
///
/// # Cost
///
/// In etcd requests: each [`enter`](Self::enter) is one transaction to join, plus one more:
/// the seal for the participant that fills the round, or one read when the seal wakes it. Each
/// [`leave`](BarrierRound::leave) is one transaction, plus one read when the first member's
/// departure wakes it; the first member instead reads once each time the newest remaining
/// member leaves (at most `count - 1` times) and then deletes its key. A round therefore costs
/// at most `5 * count - 1` requests. Waiters are woken only by the events that concern them
/// (the seal of their round, the departure of the one member they watch), never by every
/// arrival or departure, and each wake-up costs one request. A crashed first member costs each
/// remaining member one more wake-up.
///
/// `count` is at most [`MAX_COUNT`](Self::MAX_COUNT), because the seal is one transaction with
/// a comparison and a write per member.
///
/// # Examples
///
/// ```no_run
/// # async fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
/// let barrier = etcd_coord::DoubleBarrier::new(&session, "jobs/etl/workers", 10)?;
/// loop {
///     let round = barrier.enter().await?; // all 10 workers are here
///     println!("round {}", round.round());
///     // ... this round's work ...
///     round.leave().await?; // all 10 are done
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DoubleBarrier {
    session: Session,
    name: String,
    prefix: String,
    round_key: String,
    count: usize,
    /// The round this handle expects to be open: a guess, checked by every join, that saves
    /// a read in the usual case of the same participants going round after round.
    next_round: Arc<AtomicU64>,
}

/// What the sealer writes into every member's key: the create revisions of the first and of
/// the last member, which is all a member needs to tell members from latecomers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seal {
    first: i64,
    last: i64,
}

impl Seal {
    fn value(self) -> String {
        format!("{} {}", self.first, self.last)
    }

    fn parse(key: &str, value: &[u8]) -> Result<Option<Seal>> {
        if value.is_empty() {
            return Ok(None);
        }
        let mut parts = std::str::from_utf8(value)
            .ok()
            .into_iter()
            .flat_map(|s| s.split(' '))
            .map(|n| n.parse::<i64>().ok());
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Some(first)), Some(Some(last)), None) => Ok(Some(Seal { first, last })),
            _ => Err(Error::Conflict(format!(
                "{key} holds {:?}, which is not a double barrier member's mark",
                show(value)
            ))),
        }
    }
}

/// A participant's view of its round, as of `revision`.
#[derive(Debug)]
struct View {
    revision: i64,
    /// The round open for entry.
    open: u64,
    /// Our own key's seal, once the round is sealed with us in it.
    seal: Option<Seal>,
    /// The first `count` participants of our round by arrival: key and create revision.
    first: Vec<(Vec<u8>, i64)>,
}

enum Joined {
    In(Entry, View),
    /// The round we tried is closed; this one is open.
    Moved(u64),
}

enum Outcome {
    Member(Seal),
    /// Our round was sealed without us; this one is open.
    Extra(u64),
}

impl DoubleBarrier {
    /// The largest `count`: etcd's default limit of 128 operations per transaction, less the
    /// one that opens the next round.
    pub const MAX_COUNT: usize = 127;

    /// A handle on the double barrier `name` for `count` participants per round. Sends nothing.
    ///
    /// Every participant must use the same `count`; the barrier does not check it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `name` if it is not a valid name (as for
    /// [`Mutex`](crate::Mutex)), or naming `count` if it is 0 or more than
    /// [`MAX_COUNT`](Self::MAX_COUNT).
    ///
    /// ```no_run
    /// # fn f(session: etcd_coord::Session) -> etcd_coord::Result<()> {
    /// let barrier = etcd_coord::DoubleBarrier::new(&session, "etl/stage-2", 4)?;
    /// assert!(etcd_coord::DoubleBarrier::new(&session, "etl/stage-2", 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(session: &Session, name: impl Into<String>, count: usize) -> Result<DoubleBarrier> {
        let name = name.into();
        validate_name("name", &name)?;
        if count == 0 {
            return Err(Error::invalid("count", "must be at least 1"));
        }
        if count > Self::MAX_COUNT {
            return Err(Error::invalid(
                "count",
                format!("is {count}; the limit is {}", Self::MAX_COUNT),
            ));
        }
        let prefix = prefix(&name);
        Ok(DoubleBarrier {
            session: session.clone(),
            round_key: format!("{prefix}round"),
            prefix,
            name,
            count,
            next_round: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The barrier's name.
    ///
    /// ```no_run
    /// # fn f(b: etcd_coord::DoubleBarrier) {
    /// println!("{}", b.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of participants per round.
    ///
    /// ```no_run
    /// # fn f(b: etcd_coord::DoubleBarrier) {
    /// assert!(b.count() >= 1);
    /// # }
    /// ```
    pub fn count(&self) -> usize {
        self.count
    }

    /// Joins the open round and waits until it has `count` members; if it fills up without
    /// us, joins the next one (see the type docs).
    ///
    /// Leave the returned round before entering again: until then this participant still
    /// counts in it, and a second `enter` is a second participant.
    ///
    /// # Errors
    ///
    /// - the session's error if it ends first; this participant is then not counted;
    /// - [`Error::NotHeld`] if our key is deleted by someone else;
    /// - [`Error::Conflict`] if the barrier's keys hold something this type did not write;
    /// - non-retryable etcd errors. Transient errors are retried while the session lives.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, its key is deleted in the background (a join still
    /// in flight is awaited first, so that its key cannot appear after the delete), and the
    /// round waits for somebody else. If it is dropped in the instant the round is sealed, the
    /// round goes ahead and this participant counts as having left at once.
    ///
    /// ```no_run
    /// # async fn f(barrier: etcd_coord::DoubleBarrier) -> etcd_coord::Result<()> {
    /// use std::time::Duration;
    /// match tokio::time::timeout(Duration::from_secs(60), barrier.enter()).await {
    ///     Ok(round) => round?.leave().await?,
    ///     Err(_) => eprintln!("the others did not show up"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn enter(&self) -> Result<BarrierRound> {
        let session = &self.session;
        session.check_alive()?;
        let span = tracing::debug_span!("enter", name = %self.name, count = self.count);
        async {
            let mut round = self.next_round.load(Ordering::Relaxed);
            loop {
                let key = participant_key(&self.round_prefix(round), session.lease_id());
                let pending = PendingKey::new(session, key.clone());
                let (entry, view) = match self.join(round, &key).await? {
                    Joined::In(entry, view) => (entry, view),
                    Joined::Moved(open) => {
                        // The put was conditional on `round` being open, and rounds only move
                        // forward, so it did not and will not happen.
                        pending.disarm();
                        round = open;
                        continue;
                    }
                };
                match self.await_seal(round, &entry, view).await? {
                    Outcome::Member(seal) => {
                        pending.disarm();
                        self.next_round.store(round + 1, Ordering::Relaxed);
                        tracing::debug!(round, key = %entry.key, revision = entry.create_rev, "entered");
                        return Ok(BarrierRound {
                            session: session.clone(),
                            name: self.name.clone(),
                            round,
                            members: self.round_prefix(round),
                            entry,
                            seal,
                            left: false,
                        });
                    }
                    Outcome::Extra(open) => {
                        tracing::debug!(round, open, key = %entry.key, "round filled without us; moving on");
                        wait::retrying(session, || {
                            wait::release(session, &entry.key, Some(entry.create_rev))
                        })
                        .await?;
                        pending.disarm();
                        round = open;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn round_prefix(&self, round: u64) -> String {
        format!("{}{round}/", self.prefix)
    }

    /// True while `round` is the open round.
    fn is_open(&self, round: u64) -> Compare {
        if round == 0 {
            Compare::version(self.round_key.as_str(), CompareOp::Equal, 0)
        } else {
            Compare::value(self.round_key.as_str(), CompareOp::Equal, round.to_string())
        }
    }

    /// Reads the first `count` participants of `round` by arrival.
    fn read_first(&self, round: u64) -> TxnOp {
        let start = self.round_prefix(round);
        let opts = GetOptions::new()
            .with_range(prefix_end(start.as_bytes()))
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_keys_only()
            .with_limit(self.count as i64);
        TxnOp::get(start, Some(opts))
    }

    async fn txn(&self, operation: &'static str, txn: Txn) -> Result<TxnResponse> {
        let session = &self.session;
        wait::retrying(session, || {
            let mut client = session.client().clone();
            let txn = txn.clone();
            async move { session.request(operation, client.txn(txn)).await }
        })
        .await
    }

    /// Puts our key into `round` if that round is still open, reading its first participants
    /// in the same transaction.
    async fn join(&self, round: u64, key: &str) -> Result<Joined> {
        let txn = Txn::new()
            .when([
                self.is_open(round),
                Compare::create_revision(key, CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    key,
                    "",
                    Some(PutOptions::new().with_lease(self.session.lease_id())),
                ),
                self.read_first(round),
            ])
            .or_else([
                TxnOp::get(self.round_key.as_str(), None),
                TxnOp::get(key, None),
            ]);
        let session = &self.session;
        // Whether this try put the key or found an earlier try's, it is ours to delete.
        let resp = wait::send_creating(session, "joining a double barrier", key, txn, true).await?;
        let revision = wait::revision(&resp)?;
        let gets = gets(&resp);
        if resp.succeeded() {
            let entry = Entry {
                key: key.to_string(),
                create_rev: revision,
            };
            let view = View {
                revision,
                open: round,
                seal: None,
                first: gets
                    .first()
                    .map(|kvs| keys_and_revs(kvs))
                    .unwrap_or_default(),
            };
            return Ok(Joined::In(entry, view));
        }
        let [open, mine] = &gets[..] else {
            return Err(Error::malformed("a failed join without its reads"));
        };
        if let Some(kv) = mine.first() {
            // An earlier try of this very call committed before its answer was lost.
            let entry = Entry {
                key: key.to_string(),
                create_rev: kv.create_revision(),
            };
            let view = self.check(round, &entry).await?;
            return Ok(Joined::In(entry, view));
        }
        match self.parse_round(open)? {
            // Only a round key written by someone else can say "open" and fail the compare.
            same if same == round => Err(Error::Conflict(format!(
                "{} holds a round number this barrier did not write",
                self.round_key
            ))),
            other => Ok(Joined::Moved(other)),
        }
    }

    /// One request: is our key still there, is it sealed, which round is open, and who are
    /// the first participants of ours?
    async fn check(&self, round: u64, entry: &Entry) -> Result<View> {
        let txn = Txn::new().when([entry.is_owner()]).and_then([
            TxnOp::get(self.round_key.as_str(), None),
            TxnOp::get(entry.key.as_str(), None),
            self.read_first(round),
        ]);
        let resp = self.txn("checking a double barrier", txn).await?;
        if !resp.succeeded() {
            return Err(gone(&self.session, entry));
        }
        let gets = gets(&resp);
        let [open, mine, first] = &gets[..] else {
            return Err(Error::malformed("a check without its reads"));
        };
        let seal = match mine.first() {
            Some(kv) => Seal::parse(&entry.key, kv.value())?,
            None => None,
        };
        Ok(View {
            revision: wait::revision(&resp)?,
            open: self.parse_round(open)?,
            seal,
            first: keys_and_revs(first),
        })
    }

    /// Waits until our round is sealed, with or without us.
    async fn await_seal(&self, round: u64, entry: &Entry, mut view: View) -> Result<Outcome> {
        let session = &self.session;
        let mut backoff = wait::backoff();
        loop {
            if let Some(seal) = view.seal {
                // The read proved our key was alive when sealed; the local state proves we
                // have not lost it since.
                session.check_alive()?;
                return Ok(Outcome::Member(seal));
            }
            if view.open > round {
                return Ok(Outcome::Extra(view.open));
            }
            if view.open < round {
                return Err(Error::Conflict(format!(
                    "{} went back from round {round} to {}",
                    self.round_key, view.open
                )));
            }
            if view.first.len() >= self.count {
                let members = &view.first[..self.count];
                if let Some(seal) = self.seal(round, members).await? {
                    tracing::debug!(
                        round,
                        first = seal.first,
                        last = seal.last,
                        "sealed the round"
                    );
                    if members.iter().any(|(k, _)| k == entry.key.as_bytes()) {
                        session.check_alive()?;
                        return Ok(Outcome::Member(seal));
                    }
                    return Ok(Outcome::Extra(round + 1));
                }
                // Sealed by someone else first, or a member went: look again.
                view = self.check(round, entry).await?;
                continue;
            }
            tracing::debug!(
                round, key = %entry.key, entered = view.first.len(), revision = view.revision,
                "waiting for the round to fill"
            );
            let watched = [
                entry.key.clone().into_bytes(),
                self.round_key.clone().into_bytes(),
            ];
            wait::wake(session, &watched, view.revision + 1, false, &mut backoff).await?;
            view = self.check(round, entry).await?;
        }
    }

    /// Seals `round` with `members` if it is still open and every member still there.
    async fn seal(&self, round: u64, members: &[(Vec<u8>, i64)]) -> Result<Option<Seal>> {
        let seal = Seal {
            first: members[0].1,
            last: members[members.len() - 1].1,
        };
        let mut compares = vec![self.is_open(round)];
        let mut ops = vec![TxnOp::put(
            self.round_key.as_str(),
            (round + 1).to_string(),
            None,
        )];
        for (key, rev) in members {
            compares.push(Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *rev,
            ));
            ops.push(TxnOp::put(
                key.clone(),
                seal.value(),
                Some(PutOptions::new().with_ignore_lease()),
            ));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self.txn("sealing a double barrier round", txn).await?;
        Ok(resp.succeeded().then_some(seal))
    }

    fn parse_round(&self, kvs: &[KeyValue]) -> Result<u64> {
        let Some(kv) = kvs.first() else {
            return Ok(0);
        };
        std::str::from_utf8(kv.value())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "{} holds {:?}, which is not a round number",
                    self.round_key,
                    show(kv.value())
                ))
            })
    }
}

/// Membership of one round of a [`DoubleBarrier`], returned by [`DoubleBarrier::enter`].
///
/// [`leave`](Self::leave) waits until every member has left. Dropping the round instead leaves
/// without waiting: the key is deleted in the background, and the others count this member as
/// gone.
///
/// # Examples
///
/// ```no_run
/// # async fn f(barrier: etcd_coord::DoubleBarrier) -> etcd_coord::Result<()> {
/// let round = barrier.enter().await?;
/// println!("working in round {} as {}", round.round(), round.key());
/// round.leave().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the round leaves it without waiting for the others"]
pub struct BarrierRound {
    session: Session,
    name: String,
    round: u64,
    /// The prefix of this round's participant keys.
    members: String,
    entry: Entry,
    seal: Seal,
    left: bool,
}

impl BarrierRound {
    /// The round number: 0 for the first round of a barrier, one more for each round after.
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::BarrierRound) {
    /// println!("round {}", r.round());
    /// # }
    /// ```
    pub fn round(&self) -> u64 {
        self.round
    }

    /// This participant's key (`NAME/<round>/<lease hex>_<random>`).
    ///
    /// ```no_run
    /// # fn f(r: etcd_coord::BarrierRound) {
    /// println!("{}", r.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.entry.key
    }

    /// Leaves the round and waits until every other member has left too (or is gone with its
    /// session).
    ///
    /// # Errors
    ///
    /// - the session's error if it ends first (or [`Error::NotHeld`] if our key had already
    ///   gone with it); the others do not wait for us;
    /// - non-retryable etcd errors. Transient errors and broken watches are retried while the
    ///   session lives.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, our key is deleted (in the background if it was
    /// not yet), and the others count us as having left.
    ///
    /// ```no_run
    /// # async fn f(round: etcd_coord::BarrierRound) -> etcd_coord::Result<()> {
    /// round.leave().await?;
    /// # Ok(()) }
    /// ```
    pub async fn leave(mut self) -> Result<()> {
        let span = tracing::debug_span!(
            "leave", name = %self.name, round = self.round, key = %self.entry.key
        );
        async {
            if self.entry.create_rev == self.seal.first {
                self.leave_last().await
            } else {
                self.leave_now().await
            }
        }
        .instrument(span)
        .await
    }

    /// The first member: wait for the newest remaining member to go, until we are alone.
    async fn leave_last(&mut self) -> Result<()> {
        let session = self.session.clone();
        let mut backoff = wait::backoff();
        loop {
            let txn = Txn::new()
                .when([self.entry.is_owner()])
                .and_then([self.read_members(SortOrder::Descend)]);
            let resp = retrying_txn(&session, "leaving a double barrier", txn).await?;
            if !resp.succeeded() {
                self.left = true;
                return Err(gone(&session, &self.entry));
            }
            let revision = wait::revision(&resp)?;
            let newest = gets(&resp)
                .first()
                .and_then(|kvs| kvs.first())
                .map(|kv| kv.key().to_vec());
            match newest {
                Some(key) if key != self.entry.key.as_bytes() => {
                    tracing::debug!(waiting_for = %show(&key), revision, "waiting for the others to leave");
                    let watched = [key, self.entry.key.clone().into_bytes()];
                    wait::wake(&session, &watched, revision + 1, true, &mut backoff).await?;
                }
                _ => {
                    let deleted = wait::retrying(&session, || {
                        wait::release(&session, &self.entry.key, Some(self.entry.create_rev))
                    })
                    .await?;
                    self.left = true;
                    if !deleted {
                        return Err(gone(&session, &self.entry));
                    }
                    tracing::debug!(revision, "left last");
                    return Ok(());
                }
            }
        }
    }

    /// Any other member: delete our key, then wait for the oldest remaining member to go,
    /// until none remains.
    async fn leave_now(&mut self) -> Result<()> {
        let session = self.session.clone();
        let txn = Txn::new().when([self.entry.is_owner()]).and_then([
            TxnOp::delete(self.entry.key.as_str(), None),
            self.read_members(SortOrder::Ascend),
        ]);
        let mut resp = retrying_txn(&session, "leaving a double barrier", txn).await?;
        self.left = true;
        if !resp.succeeded() {
            return Err(gone(&session, &self.entry));
        }
        let mut backoff = wait::backoff();
        loop {
            let revision = wait::revision(&resp)?;
            let oldest = gets(&resp)
                .first()
                .and_then(|kvs| kvs.first())
                .map(|kv| kv.key().to_vec());
            let Some(key) = oldest else {
                tracing::debug!(revision, "everyone has left");
                return Ok(());
            };
            tracing::debug!(waiting_for = %show(&key), revision, "left; waiting for the others");
            wait::wake(&session, &[key], revision + 1, true, &mut backoff).await?;
            let txn = Txn::new().and_then([self.read_members(SortOrder::Ascend)]);
            resp = retrying_txn(&session, "waiting to leave a double barrier", txn).await?;
        }
    }

    /// Reads the oldest or the newest member of this round still there.
    fn read_members(&self, order: SortOrder) -> TxnOp {
        let opts = GetOptions::new()
            .with_range(prefix_end(self.members.as_bytes()))
            .with_max_create_revision(self.seal.last)
            .with_sort(SortTarget::Create, order)
            .with_keys_only()
            .with_limit(1);
        TxnOp::get(self.members.as_str(), Some(opts))
    }
}

impl Drop for BarrierRound {
    fn drop(&mut self) {
        if !self.left {
            wait::release_in_background(
                &self.session,
                self.entry.key.clone(),
                Some(self.entry.create_rev),
            );
        }
    }
}

async fn retrying_txn(session: &Session, operation: &'static str, txn: Txn) -> Result<TxnResponse> {
    wait::retrying(session, || {
        let mut client = session.client().clone();
        let txn = txn.clone();
        async move { session.request(operation, client.txn(txn)).await }
    })
    .await
}

/// The error for "our key is gone": the session's, if it has ended, else [`Error::NotHeld`].
fn gone(session: &Session, entry: &Entry) -> Error {
    session
        .check_alive()
        .err()
        .unwrap_or_else(|| Error::NotHeld {
            key: entry.key.clone(),
        })
}

/// The key-values of each range read of a transaction response, in order.
fn gets(resp: &TxnResponse) -> Vec<Vec<KeyValue>> {
    wait::gets(resp)
        .into_iter()
        .map(|mut g| g.take_kvs())
        .collect()
}

fn keys_and_revs(kvs: &[KeyValue]) -> Vec<(Vec<u8>, i64)> {
    kvs.iter()
        .map(|kv| (kv.key().to_vec(), kv.create_revision()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_marks_round_trip_and_foreign_values_are_conflicts() {
        let seal = Seal {
            first: 17,
            last: 42,
        };
        assert_eq!(
            Seal::parse("k", seal.value().as_bytes()).unwrap(),
            Some(seal)
        );
        assert_eq!(Seal::parse("k", b"").unwrap(), None);
        for bad in [&b"17"[..], b"17 42 1", b"a b", b"\xff"] {
            assert!(matches!(Seal::parse("k", bad), Err(Error::Conflict(_))));
        }
    }
}
