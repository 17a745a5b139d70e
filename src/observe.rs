//! One observation of the world: every backend account and every CI source the config names, each asked once,
//! all at the same time.
//!
//! `plan`, `apply` and `observe` need the whole view ([`observe`]): planning on a partial one (say, instances
//! without the CI's agents) could take busy agents for orphans. `watch` takes what answered
//! ([`observe_sources`]) and plans only what the sources that answered can vouch for (`watch::schedule`), so one
//! account that is down holds back only the pools that need it.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::model::{BackendName, CiName, Desired, InstanceMode, Observed};
use crate::providers::{self, ListInstances, Providers};

/// One thing that is observed: a backend account or a CI source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "kebab-case")]
pub enum Source {
    Backend(BackendName),
    Ci(CiName),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Backend(name) => write!(f, "backend `{name}`"),
            Source::Ci(name) => write!(f, "ci source `{name}`"),
        }
    }
}

/// Every source the config names.
pub fn sources(desired: &Desired) -> BTreeSet<Source> {
    desired
        .backends
        .keys()
        .map(|name| Source::Backend(name.clone()))
        .chain(desired.ci.keys().map(|name| Source::Ci(name.clone())))
        .collect()
}

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

impl ObserveError {
    /// The source that failed, when the error names one the config has.
    pub fn failed_source(&self) -> Option<Source> {
        match self {
            ObserveError::Backend { name, .. } => Some(Source::Backend(name.clone())),
            ObserveError::Ci { name, .. } => Some(Source::Ci(name.clone())),
            ObserveError::Missing { what: "backend", name } => Some(Source::Backend(BackendName::new(name.clone()))),
            ObserveError::Missing { name, .. } => Some(Source::Ci(CiName::new(name.clone()))),
            ObserveError::Several(_) => None,
        }
    }

    /// The provider's error, when there is one.
    pub fn provider_error(&self) -> Option<&providers::Error> {
        match self {
            ObserveError::Backend { source, .. } | ObserveError::Ci { source, .. } => Some(source),
            ObserveError::Missing { .. } | ObserveError::Several(_) => None,
        }
    }
}

/// What one round of [`observe_sources`] saw: every source that answered is in `observed`; the others failed.
#[derive(Debug)]
pub struct Observation {
    pub observed: Observed,
    /// In source order (backends by name, then CI sources by name).
    pub failures: Vec<ObserveError>,
}

/// Tries per source within one observation before it counts as failed [3]: a provider's blip (one 5xx, a dropped
/// connection) must not cost the pools that need it a whole cycle.
pub const OBSERVE_ATTEMPTS: u32 = 3;
/// The pause before the first retry [100ms]; it doubles (100 ms, 200 ms: the observation is late by a fraction of
/// a second, and the job it would show is not).
const OBSERVE_RETRY_DELAY: Duration = Duration::from_millis(100);
/// A `Retry-After` up to this long [1s] is waited out within the observation; a longer one fails the source, which
/// the caller then leaves alone for that long. A rate limit that names no `Retry-After` counts as this long: a
/// quick retry would only be refused again.
const OBSERVE_RETRY_AFTER_MAX: Duration = Duration::from_secs(1);

/// The pause before retry number `retry` (1-based) after `error`, or `None` if it is not worth retrying now.
fn observe_retry_delay(error: &providers::Error, retry: u32) -> Option<Duration> {
    match error {
        providers::Error::RateLimited { retry_after: Some(after), .. } => {
            (*after <= OBSERVE_RETRY_AFTER_MAX).then_some(*after)
        }
        providers::Error::RateLimited { retry_after: None, .. } => Some(OBSERVE_RETRY_AFTER_MAX),
        providers::Error::Unavailable { .. } => {
            Some(OBSERVE_RETRY_DELAY.saturating_mul(2u32.saturating_pow(retry.saturating_sub(1))))
        }
        _ => None,
    }
}

async fn with_observe_retries<T, Call, Fut>(mut call: Call) -> providers::Result<T>
where
    Call: FnMut() -> Fut,
    Fut: Future<Output = providers::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) => match observe_retry_delay(&error, attempt).filter(|_| attempt < OBSERVE_ATTEMPTS) {
                Some(delay) => {
                    tracing::debug!(attempt, delay_ms = delay.as_millis() as u64, error = %error, "observation failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => return Err(error),
            },
        }
    }
}

/// `call`, failing as unavailable when it has not finished within `deadline`.
async fn within<T>(
    deadline: Option<Duration>,
    call: impl Future<Output = providers::Result<T>>,
) -> providers::Result<T> {
    let Some(deadline) = deadline else { return call.await };
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(providers::Error::Unavailable {
            provider: "observe".to_owned(),
            message: format!("no answer within {}", crate::model::GoDuration(deadline)),
        }),
    }
}

enum Part {
    Backend(BackendName, providers::Result<crate::model::BackendObservation>),
    Ci(CiName, providers::Result<crate::model::CiObservation>),
}

/// Observes every provider once, concurrently, and fails naming every source that did not answer (in source
/// order), so a user fixes them all in one go. `observed_at` is the moment the observation started: the planner uses it as its "now", which keeps
/// `plan --observed` deterministic.
pub async fn observe(
    desired: &Desired,
    providers: &Providers,
    observed_at: Timestamp,
) -> Result<Observed, ObserveError> {
    let mut observation = observe_sources(desired, providers, &sources(desired), observed_at, None).await;
    if observation.failures.len() > 1 {
        return Err(ObserveError::Several(observation.failures));
    }
    match observation.failures.pop() {
        Some(error) => Err(error),
        None => Ok(observation.observed),
    }
}

/// Observes the sources in `which` (each once, concurrently; a transient failure is retried at once, up to
/// [`OBSERVE_ATTEMPTS`] tries) and keeps what answered; the rest are in `failures`. Sources not in `which` are
/// neither asked nor reported. With a `deadline`, a source that has not answered by then fails (its request is
/// dropped: a listing is safe to cut off), so one account that hangs cannot hold up the others for longer.
pub async fn observe_sources(
    desired: &Desired,
    providers: &Providers,
    which: &BTreeSet<Source>,
    observed_at: Timestamp,
    deadline: Option<Duration>,
) -> Observation {
    let mut observed = Observed { observed_at, ..Observed::default() };
    let mut failures = Vec::new();
    let mut calls = JoinSet::new();
    for name in desired.backends.keys().filter(|name| which.contains(&Source::Backend((*name).clone()))) {
        let Some(backend) = providers.backends.get(name).cloned() else {
            failures.push(ObserveError::Missing { what: "backend", name: name.to_string() });
            continue;
        };
        let request = ListInstances {
            owner: desired.owner.clone(),
            adopted: adopted_on(desired, name),
            images: images_on(desired, name),
        };
        let name = name.clone();
        let span = tracing::debug_span!("observe_backend", backend = %name);
        calls.spawn(
            async move {
                let result = within(deadline, with_observe_retries(|| backend.observe(&request))).await;
                Part::Backend(name, result)
            }
            .instrument(span),
        );
    }
    for name in desired.ci.keys().filter(|name| which.contains(&Source::Ci((*name).clone()))) {
        let Some(source) = providers.ci.get(name).cloned() else {
            failures.push(ObserveError::Missing { what: "ci source", name: name.to_string() });
            continue;
        };
        let name = name.clone();
        let span = tracing::debug_span!("observe_ci", ci = %name);
        calls.spawn(
            async move { Part::Ci(name, within(deadline, with_observe_retries(|| source.observe())).await) }
                .instrument(span),
        );
    }

    // Provider errors can echo what they were sent: no observation error leaves here with a secret in it.
    let redactor = crate::redact::Redactor::from_desired(desired);
    while let Some(joined) = calls.join_next().await {
        let part = match joined {
            Ok(part) => part,
            // A panicking provider is a bug, but it must not take the daemon down with it. Which one it was is
            // lost with the task: the sources that never reported are marked failed below.
            Err(join_error) => {
                tracing::error!(error = %join_error, "an observation task died");
                continue;
            }
        };
        match part {
            Part::Backend(name, Ok(observation)) => {
                observed.backends.insert(name, observation);
            }
            Part::Backend(name, Err(source)) => {
                failures.push(ObserveError::Backend { name, source: source.redacted(&redactor) })
            }
            Part::Ci(name, Ok(observation)) => {
                observed.ci.insert(name, observation);
            }
            Part::Ci(name, Err(source)) => failures.push(ObserveError::Ci { name, source: source.redacted(&redactor) }),
        }
    }
    for source in which {
        let answered = match source {
            Source::Backend(name) => observed.backends.contains_key(name),
            Source::Ci(name) => observed.ci.contains_key(name),
        };
        let reported = failures.iter().any(|failure| failure.failed_source().as_ref() == Some(source));
        let configured = match source {
            Source::Backend(name) => desired.backends.contains_key(name),
            Source::Ci(name) => desired.ci.contains_key(name),
        };
        if configured && !answered && !reported {
            let (provider, name) = match source {
                Source::Backend(name) => ("backend", name.to_string()),
                Source::Ci(name) => ("ci", name.to_string()),
            };
            let died =
                providers::Error::Other { provider: provider.to_owned(), source: "the observation task died".into() };
            failures.push(match source {
                Source::Backend(_) => ObserveError::Backend { name: BackendName::new(name), source: died },
                Source::Ci(_) => ObserveError::Ci { name: CiName::new(name), source: died },
            });
        }
    }
    failures.sort_by_key(ObserveError::failed_source);
    Observation { observed, failures }
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
