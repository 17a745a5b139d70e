//! Trigger sources built from the config: today the Incus lifecycle event stream of every Incus backend. (The
//! other trigger, webhook deliveries, comes from the daemon's HTTP listener: [`super::webhooks`].)

use tokio::sync::mpsc;

use super::Trigger;
use crate::model::{BackendKind, Desired};
use crate::providers::incus::{events, Incus};

/// One trigger stream per event-capable backend. Needs a Tokio runtime (the listeners are spawned tasks); they
/// stop when the returned receivers are dropped.
pub fn from_config(desired: &Desired) -> Vec<mpsc::Receiver<Trigger>> {
    let mut triggers = Vec::new();
    for (name, spec) in &desired.backends {
        if let BackendKind::Incus { socket, project } = &spec.kind {
            let incus = Incus::new(socket.as_deref(), project.as_deref());
            let signals = events::subscribe(incus, desired.owner.clone());
            triggers.push(relay(format!("backend {name}"), signals));
        }
    }
    triggers
}

fn relay(source: String, mut signals: mpsc::Receiver<events::Signal>) -> mpsc::Receiver<Trigger> {
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(signal) = signals.recv().await {
            let reason = match signal {
                events::Signal::Connected => "event stream (re)connected: re-list".to_owned(),
                events::Signal::InstanceGone { name, action } => format!("{action} of `{name}`"),
            };
            if sender.send(Trigger { source: source.clone(), reason }).await.is_err() {
                return;
            }
        }
    });
    receiver
}
