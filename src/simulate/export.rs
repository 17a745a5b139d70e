//! `ciscale trace export`: a trace of the jobs a CI source ran, from its own history ([`CiSource::history`]), so
//! users simulate their own week rather than a made-up one.

use std::collections::BTreeMap;

use super::trace::{Job, Trace};
use crate::model::{CiName, Desired};
use crate::providers::{self, HistoryRequest, PastJob, Providers};

/// What an export found, besides the trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exported {
    pub trace: Trace,
    /// Per source: jobs in the window that never started (cancelled while queued, or still waiting).
    pub never_started: BTreeMap<CiName, usize>,
    /// Per source: jobs still running (no duration yet).
    pub still_running: BTreeMap<CiName, usize>,
    /// Per source: jobs written.
    pub written: BTreeMap<CiName, usize>,
    /// Sources skipped because they keep no history ciscale can read (only when every source was asked for), with
    /// why.
    pub unsupported: BTreeMap<CiName, String>,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the config has no ci source `{name}`")]
    UnknownSource { name: CiName },
    #[error("could not read the job history of ci source `{name}`")]
    History {
        name: CiName,
        #[source]
        source: providers::Error,
    },
}

/// Reads the history of `sources` (every CI source of the config when empty) for the jobs `request` names.
pub async fn export(
    desired: &Desired,
    providers: &Providers,
    sources: &[CiName],
    request: &HistoryRequest,
) -> Result<Exported, ExportError> {
    let names: Vec<CiName> = if sources.is_empty() { desired.ci.keys().cloned().collect() } else { sources.to_vec() };
    let mut exported = Exported::default();
    let mut jobs = Vec::new();
    for name in names {
        let source = providers.ci.get(&name).ok_or_else(|| ExportError::UnknownSource { name: name.clone() })?;
        let history = match source.history(request).await {
            Ok(history) => history,
            // Every source was asked for: one that keeps no readable history must not stop the others.
            Err(error @ providers::Error::Unsupported { .. }) if sources.is_empty() => {
                exported.unsupported.insert(name.clone(), error.to_string());
                continue;
            }
            Err(source) => return Err(ExportError::History { name: name.clone(), source }),
        };
        let (source_jobs, never_started, still_running) = to_jobs(&name, history, desired.ci.len() > 1);
        exported.written.insert(name.clone(), source_jobs.len());
        exported.never_started.insert(name.clone(), never_started);
        exported.still_running.insert(name.clone(), still_running);
        jobs.extend(source_jobs);
    }
    exported.trace = Trace::new(jobs);
    Ok(exported)
}

/// The trace lines of a source's history: jobs that started and finished. `name_source`: say which source a job
/// came from (configs with several).
pub fn to_jobs(source: &CiName, history: Vec<PastJob>, name_source: bool) -> (Vec<Job>, usize, usize) {
    let (mut never_started, mut still_running) = (0, 0);
    let mut jobs = Vec::new();
    for past in history {
        match (past.started_at, past.finished_at) {
            (None, _) => never_started += 1,
            (Some(_), None) => still_running += 1,
            (Some(started), Some(finished)) => jobs.push(Job {
                at: past.queued_at,
                // A clock skew between CI components must not make a negative run.
                duration: finished.duration_since(started).max(jiff::SignedDuration::ZERO),
                labels: past.labels.into(),
                demands: past.demands,
                ci: name_source.then(|| source.clone()),
                id: Some(past.id),
            }),
        }
    }
    (jobs, never_started, still_running)
}
