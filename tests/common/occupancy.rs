//! An independent record of who is inside a critical section, kept in etcd through owner-only
//! transactions: entering reads everyone inside and adds us, atomically and only while our
//! guard still holds; the record is bound to the holder's lease, so a holder whose lease ends
//! leaves the room at the very revision its lock goes.

use etcd_coord::etcd_client::{GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use etcd_coord::{Error, LockGuard};

pub struct Room {
    prefix: String,
}

impl Room {
    pub fn new(name: &str) -> Room {
        Room {
            prefix: format!("{name}-room/"),
        }
    }

    /// Enters as `kind` ("r", "w", or anything), returning the kinds already inside, or `None`
    /// if the guard no longer held.
    pub async fn enter(&self, guard: &LockGuard, kind: &str) -> Option<Vec<String>> {
        let me = format!(
            "{}{:x}-{}",
            self.prefix,
            guard.session().lease_id(),
            guard.fencing_token()
        );
        let txn = Txn::new().and_then([
            TxnOp::get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::put(
                me,
                kind,
                Some(PutOptions::new().with_lease(guard.session().lease_id())),
            ),
        ]);
        match guard.txn(txn).await {
            Ok(resp) => Some(
                resp.op_responses()
                    .iter()
                    .filter_map(|r| match r {
                        TxnOpResponse::Get(g) => Some(g.kvs()),
                        _ => None,
                    })
                    .flatten()
                    .map(|kv| kv.value_str().unwrap().to_string())
                    .collect(),
            ),
            Err(Error::NotHeld { .. }) => None,
            Err(e) if e.is_retryable() => None,
            Err(e) => panic!("owner-only txn failed: {e}"),
        }
    }

    /// Leaves, if the guard still holds (otherwise the lease took the record already or will).
    pub async fn leave(&self, guard: &LockGuard) {
        let me = format!(
            "{}{:x}-{}",
            self.prefix,
            guard.session().lease_id(),
            guard.fencing_token()
        );
        let _ = guard
            .txn(Txn::new().and_then([TxnOp::delete(me, None)]))
            .await;
    }
}
