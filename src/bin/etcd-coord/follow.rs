//! The commands that follow something and print its changes: `elect --listen`, `discover`.

use etcd_coord::etcd_client::Client;
use etcd_coord::{Change, Discovery, Election, Instance, LeaderEvent};
use futures::StreamExt;
use serde_json::json;

use crate::child::Signals;
use crate::exit::Failure;
use crate::output::{line, printable};

/// Prints every change of leader of election `name` until interrupted.
pub async fn leaders(
    client: Client,
    name: &str,
    timeout: std::time::Duration,
    as_json: bool,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let observer = Election::observer(client, name)?.request_timeout(timeout)?;
    let mut events = observer.observe();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = signals.recv() => return Ok(0),
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                return Err(Failure::from(e).context(format_args!("observing election {name:?}")))
            }
            None => {
                return Err(Failure::msg(format!(
                    "observing election {name:?}: stopped"
                )))
            }
        };
        line(&leader_line(&event, as_json)).await?;
    }
}

fn leader_line(event: &LeaderEvent, as_json: bool) -> String {
    let kind = match event {
        LeaderEvent::Elected(_) => "elected",
        LeaderEvent::Proclaimed(_) => "proclaimed",
        LeaderEvent::Vacant { .. } => "vacant",
        // Events added to the library later are shown by name only.
        _ => "changed",
    };
    match (event.leader(), as_json) {
        (Some(l), false) => format!(
            "{kind} {} {}",
            printable(l.key.as_bytes()),
            printable(&l.value)
        )
        .trim_end()
        .to_owned(),
        (None, false) => "no leader".to_owned(),
        (Some(l), true) => json!({
            "event": kind,
            "key": l.key,
            "value": String::from_utf8_lossy(&l.value),
            "fencing_token": l.create_revision,
            "revision": event.revision(),
        })
        .to_string(),
        (None, true) => json!({ "event": kind, "revision": event.revision() }).to_string(),
    }
}

/// Prints the instances of `service`, then (unless `once`) every change until interrupted.
pub async fn instances(
    client: Client,
    prefix: &str,
    service: &str,
    once: bool,
    as_json: bool,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    let discovery = Discovery::new(client, prefix, service)
        .await
        .map_err(|e| Failure::from(e).context(format_args!("discovering {prefix}/{service}")))?;
    let (now, mut changes) = discovery.subscribe();
    for instance in now.values() {
        line(&instance_line("added", instance, now.revision(), as_json)).await?;
    }
    if once {
        return Ok(0);
    }
    loop {
        let change = tokio::select! {
            change = changes.recv() => change
                .map_err(|e| Failure::from(e).context(format_args!("discovering {prefix}/{service}")))?,
            _ = signals.recv() => return Ok(0),
        };
        let revision = changes.revision();
        let text = match &change {
            Change::Added { value, .. } => instance_line("added", value, revision, as_json),
            Change::Updated { new, .. } => instance_line("updated", new, revision, as_json),
            Change::Removed { old, .. } if as_json => {
                json!({ "event": "removed", "id": old.id, "revision": revision }).to_string()
            }
            Change::Removed { old, .. } => format!("removed {}", printable(old.id.as_bytes())),
        };
        line(&text).await?;
    }
}

fn instance_line(kind: &str, i: &Instance, revision: i64, as_json: bool) -> String {
    if as_json {
        return json!({
            "event": kind,
            "id": i.id,
            "address": i.address,
            "metadata": i.metadata,
            "revision": revision,
        })
        .to_string();
    }
    let mut text = format!(
        "{kind} {} {}",
        printable(i.id.as_bytes()),
        printable(i.address.as_bytes())
    );
    if !i.metadata.is_null() {
        text.push(' ');
        text.push_str(&i.metadata.to_string());
    }
    text
}
