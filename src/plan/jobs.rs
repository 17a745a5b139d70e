//! Jobs for agents that serve one job each: a CI source whose agents are bound at registration to the job they
//! are made for (`providers::CiCapabilities::job_bound`; Forgejo's `one-job --handle`) needs each create to say
//! which job, and no job to get a second agent. The job is the task label [`JOB_LABEL`]; an agent names the job
//! it was made for with the same label.
//!
//! Demand needs nothing special: every waiting job counts once (`demand`), and an agent made for a waiting job
//! is a serving member of its pool like any other, so the creates planned are exactly the waiting jobs no agent
//! was made for yet. This module only says which jobs those are, per pool, in queue order, so `scale_up` can
//! hand one to each create (`label.ciscale.job` in the change's `after`, which apply passes to `register`).

use super::fasthash::FastSet;
use super::matching::pool_matches;
use crate::model::{Desired, Observed, JOB_LABEL};

/// Per pool (indexed like `desired.pools`): the waiting jobs of job-bound sources that the pool takes (the first
/// pool in config order that matches, as in `demand`) and that no agent of the source was made for.
pub(super) fn unserved(desired: &Desired, observed: &Observed) -> Vec<Vec<String>> {
    let mut jobs = vec![Vec::new(); desired.pools.len()];
    for (source, observation) in &observed.ci {
        let Some(spec) = desired.ci.get(source) else { continue };
        let capabilities = crate::providers::ci_capabilities(&spec.kind);
        if !capabilities.job_bound {
            continue;
        }
        let pools: Vec<usize> =
            desired.pools.iter().enumerate().filter(|(_, pool)| &pool.ci.source == source).map(|(i, _)| i).collect();
        if pools.is_empty() {
            continue;
        }
        let served: FastSet<&str> =
            observation.agents.iter().filter_map(|agent| agent.labels.get(JOB_LABEL)).map(String::as_str).collect();
        let mut planned: FastSet<&str> = FastSet::default();
        for task in &observation.queue.pending {
            let Some(job) = task.labels.get(JOB_LABEL).filter(|job| !job.is_empty()) else { continue };
            if served.contains(job) || !planned.insert(job) {
                continue;
            }
            let taker = pools
                .iter()
                .find(|&&i| pool_matches(capabilities.matching, &desired.pools[i], &task.labels, &task.demands));
            if let Some(&i) = taker {
                jobs[i].push(job.to_owned());
            }
        }
    }
    jobs
}
