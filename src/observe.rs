//! One observation of the world: every backend account and every CI source the config names, each asked once,
//! all at the same time.
//!
//! A cycle either sees everything or plans nothing: planning on a partial view (say, instances without the CI's
//! agents) could take busy agents for orphans.

use std::collections::BTreeSet;

use jiff::Timestamp;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::model::{BackendName, CiName, Desired, InstanceMode, Observed};
use crate::providers::{self, ListInstances, Providers};

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("could not observe backend `{name}`")]
    Backend {
        name: BackendName,
        #[source]
        source: providers::Error,
    },
    #[error("could not observe ci source `{name}`")]
    Ci {
        name: CiName,
        #[source]
        source: providers::Error,
    },
    #[error("the config names {what} `{name}` but no provider was connected for it")]
    Missing { what: &'static str, name: String },
    /// More than one provider failed: each is named with its cause, so a user fixes them all in one go.
    #[error("could not observe {} providers:{}", .0.len(), .0.iter().map(|failure| format!("\n  {}", crate::providers::http::error_chain(failure))).collect::<String>())]
    Several(Vec<ObserveError>),
}

enum Part {
    Backend(BackendName, providers::Result<crate::model::BackendObservation>),
    Ci(CiName, providers::Result<crate::model::CiObservation>),
}

/// Observes every provider once, concurrently. `observed_at` is the moment the observation started: the planner
/// uses it as its "now", which keeps `plan --observed` deterministic.
pub async fn observe(desired: &Desired, providers: &Providers, observed_at: Timestamp) -> Result<Observed, ObserveError> {
    let mut calls = JoinSet::new();
    for name in desired.backends.keys() {
        let backend = providers
            .backends
            .get(name)
            .ok_or_else(|| ObserveError::Missing { what: "backend", name: name.to_string() })?
            .clone();
        let request = ListInstances {
            owner: desired.owner.clone(),
            adopted: adopted_on(desired, name),
            images: images_on(desired, name),
        };
        let name = name.clone();
        let span = tracing::debug_span!("observe_backend", backend = %name);
        calls.spawn(async move { Part::Backend(name, backend.observe(&request).await) }.instrument(span));
    }
    for name in desired.ci.keys() {
        let source = providers
            .ci
            .get(name)
            .ok_or_else(|| ObserveError::Missing { what: "ci source", name: name.to_string() })?
            .clone();
        let name = name.clone();
        let span = tracing::debug_span!("observe_ci", ci = %name);
        calls.spawn(async move { Part::Ci(name, source.observe().await) }.instrument(span));
    }

    let mut observed = Observed { observed_at, ..Observed::default() };
    // Every call is waited for, so every failing provider is reported, not only the first to fail.
    let mut failures = Vec::new();
    while let Some(joined) = calls.join_next().await {
        // A panicking provider is a bug, but it must not take the daemon down with it.
        let part = match joined {
            Ok(part) => part,
            Err(join_error) => {
                failures.push(ObserveError::Backend {
                    name: BackendName::new("?"),
                    source: providers::Error::Other { provider: "observe".into(), source: Box::new(join_error) },
                });
                continue;
            }
        };
        match part {
            Part::Backend(name, Ok(observation)) => {
                observed.backends.insert(name, observation);
            }
            Part::Backend(name, Err(source)) => failures.push(ObserveError::Backend { name, source }),
            Part::Ci(name, Ok(observation)) => {
                observed.ci.insert(name, observation);
            }
            Part::Ci(name, Err(source)) => failures.push(ObserveError::Ci { name, source }),
        }
    }
    if failures.len() > 1 {
        // In config order (backends, then ci sources, by name), not in the order the calls happened to end.
        failures.sort_by_key(|failure| match failure {
            ObserveError::Backend { name, .. } => (0, name.to_string()),
            ObserveError::Ci { name, .. } => (1, name.to_string()),
            _ => (2, String::new()),
        });
        return Err(ObserveError::Several(failures));
    }
    match failures.pop() {
        Some(failure) => Err(failure),
        None => Ok(observed),
    }
}

/// The `machine.image` values of the pools that create instances on one backend, sorted and without repeats:
/// the backend says which of them it lacks, so the plan can ask for `ciscale provision` instead of failing creates.
fn images_on(desired: &Desired, backend: &BackendName) -> Vec<String> {
    let images: BTreeSet<String> = desired
        .pools
        .iter()
        .filter(|pool| &pool.backend.backend == backend && matches!(pool.backend.mode, InstanceMode::Create))
        .filter_map(|pool| pool.backend.machine.get("image").cloned())
        .collect();
    images.into_iter().collect()
}

/// Instance ids the config adopts on one backend (start/stop pools), sorted and without repeats.
fn adopted_on(desired: &Desired, backend: &BackendName) -> Vec<crate::model::InstanceId> {
    let ids: BTreeSet<_> = desired
        .pools
        .iter()
        .filter(|pool| &pool.backend.backend == backend)
        .flat_map(|pool| match &pool.backend.mode {
            InstanceMode::StartStop { instances } => instances.iter().map(|adopted| adopted.id.clone()).collect(),
            InstanceMode::Create => Vec::new(),
        })
        .collect();
    ids.into_iter().collect()
}
