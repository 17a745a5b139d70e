//! Incus's lifecycle event stream, reduced to what `watch` needs: "an owned instance went away, look now".
//!
//! A background task holds a websocket on `/1.0/events?type=lifecycle` (over the unix socket), keeps the set of
//! owned instance names up to date, and sends a [`Signal`] when one of them shuts down, stops or is deleted —
//! an ephemeral agent that powered itself off after its job emits `instance-shutdown` then `instance-deleted`.
//! After every (re)connect it sends [`Signal::Connected`]: events may have been missed while disconnected, so
//! the receiver re-lists. Reconnects back off exponentially (100 ms doubling to 10 s). The task ends when the
//! receiver is dropped.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{client::encode, Incus, LABEL_KEY_PREFIX};
use crate::model::OWNER_LABEL;
use crate::providers::{Backend as _, Error, ListInstances};

/// What the event stream tells its subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The stream is (re)connected; anything may have happened while it was not.
    Connected,
    /// An owned instance shut down, stopped or was deleted (`action` is Incus's lifecycle action name).
    InstanceGone { name: String, action: String },
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection that lived this long resets the backoff: the server was fine, it just went away once.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Starts following `incus`'s lifecycle events for instances owned by `owner`. Needs a Tokio runtime.
pub fn subscribe(incus: Incus, owner: String) -> mpsc::Receiver<Signal> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected_at = std::time::Instant::now();
            match follow(&incus, &owner, &sender).await {
                Ok(()) => return, // the subscriber left
                Err(error) => tracing::warn!(error = %error, "incus event stream lost; reconnecting"),
            }
            if sender.is_closed() {
                return;
            }
            if connected_at.elapsed() >= HEALTHY_AFTER {
                backoff = MIN_BACKOFF;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    receiver
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect to `{socket}`: {source}")]
    Connect { socket: String, source: std::io::Error },
    #[error("websocket: {0}")]
    Websocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("listing owned instances: {0}")]
    List(#[from] Error),
    #[error("the server closed the event stream")]
    Closed,
}

/// One connection's life: connect, learn the owned names, then relay events until the stream ends (error) or
/// the subscriber is gone (`Ok`).
async fn follow(incus: &Incus, owner: &str, sender: &mpsc::Sender<Signal>) -> Result<(), StreamError> {
    let socket = incus.socket().display().to_string();
    let stream = UnixStream::connect(incus.socket())
        .await
        .map_err(|source| StreamError::Connect { socket: socket.clone(), source })?;
    let url = format!("ws://incus{}", incus.client().with_project("/1.0/events?type=lifecycle"));
    let (mut websocket, _) = tokio_tungstenite::client_async(url, stream).await?;

    // Subscribed first, listed second: an instance created in between is seen by one or the other.
    let listed =
        incus.observe(&ListInstances { owner: owner.to_owned(), adopted: Vec::new(), images: Vec::new() }).await?;
    let mut owned: BTreeSet<String> = listed.instances.into_iter().map(|instance| instance.name).collect();
    tracing::debug!(owned = owned.len(), "incus event stream connected");
    if sender.send(Signal::Connected).await.is_err() {
        return Ok(());
    }

    while let Some(message) = websocket.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        // The first frame is a bare `"keepalive"` string, not an event object.
        let Ok(event) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        let Some((action, name)) = lifecycle(&event) else {
            continue;
        };
        match action {
            "instance-created" => {
                if names_owner(&event, owner) || is_owned(incus, &name, owner).await {
                    owned.insert(name);
                }
            }
            "instance-shutdown" | "instance-stopped" | "instance-deleted" => {
                let known = if action == "instance-deleted" { owned.remove(&name) } else { owned.contains(&name) };
                if known || names_owner(&event, owner) {
                    tracing::debug!(instance = %name, action, "owned instance went away");
                    let signal = Signal::InstanceGone { name, action: action.to_owned() };
                    if sender.send(signal).await.is_err() {
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
        if sender.is_closed() {
            return Ok(());
        }
    }
    Err(StreamError::Closed)
}

/// `(action, instance name)` of an instance lifecycle event.
fn lifecycle(event: &Value) -> Option<(&str, String)> {
    if event.get("type").and_then(Value::as_str) != Some("lifecycle") {
        return None;
    }
    let metadata = event.get("metadata")?;
    let action = metadata.get("action").and_then(Value::as_str)?;
    let source = metadata.get("source").and_then(Value::as_str)?;
    let path = source.split('?').next().unwrap_or(source);
    let name = path.strip_prefix("/1.0/instances/")?;
    if name.is_empty() || name.contains('/') {
        return None; // a sub-resource (`/1.0/instances/x/snapshots/y`), not the instance itself
    }
    Some((action, name.to_owned()))
}

/// Some events carry the instance's config in their context; when they do, it says who owns it.
fn names_owner(event: &Value, owner: &str) -> bool {
    let key = format!("{LABEL_KEY_PREFIX}{OWNER_LABEL}");
    event
        .pointer("/metadata/context/config")
        .and_then(|config| config.get(&key))
        .and_then(Value::as_str)
        .is_some_and(|value| value == owner)
}

async fn is_owned(incus: &Incus, name: &str, owner: &str) -> bool {
    match incus.client().send(super::client::Call::get(format!("/1.0/instances/{}", encode(name)))).await {
        Ok(reply) => {
            let object = reply.into_sync();
            let key = format!("{LABEL_KEY_PREFIX}{OWNER_LABEL}");
            object.pointer("/config").and_then(|config| config.get(&key)).and_then(Value::as_str) == Some(owner)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_instance_lifecycle_events() {
        let event = json!({
            "type": "lifecycle",
            "metadata": { "action": "instance-shutdown", "source": "/1.0/instances/builds-docker-1?project=ci" }
        });
        assert_eq!(lifecycle(&event), Some(("instance-shutdown", "builds-docker-1".to_owned())));
        let snapshot = json!({
            "type": "lifecycle",
            "metadata": { "action": "instance-snapshot-created", "source": "/1.0/instances/a/snapshots/b" }
        });
        assert_eq!(lifecycle(&snapshot), None);
        assert_eq!(lifecycle(&json!("keepalive")), None);
    }

    #[test]
    fn owner_from_context_config() {
        let event = json!({ "metadata": { "context": { "config": { "user.ciscale.owner": "builds" } } } });
        assert!(names_owner(&event, "builds"));
        assert!(!names_owner(&event, "other"));
    }
}
