//! Azure Pipelines' job history, for `ciscale trace export`: the job requests of each Azure agent pool the config
//! binds, with their queue, receive and finish times and their demands.
//!
//! `GET pools/{id}/jobrequests?completedRequestCount=N` lists the pool's unfinished requests and its `N` most
//! recently finished ones (the endpoint is undocumented; Azure keeps a pool's recent history only, so an export of
//! a busy pool reaches back as far as `N` requests do — [`COMPLETED_REQUESTS`]). A request's wait is `queueTime` →
//! `receiveTime` (the agent picked it up; `assignTime` when there is none), its run `receiveTime` → `finishTime`.

use reqwest::Method;

use super::wire::{parse_time, List, WireJobRequest};
use super::AzurePipelines;
use crate::model::AZURE_POOL_LABEL;
use crate::providers::{HistoryRequest, PastJob, Result};

/// How many finished requests per pool are asked for: a month of a busy pool, in one answer of a few MB.
pub const COMPLETED_REQUESTS: u32 = 10_000;

impl AzurePipelines {
    pub(super) async fn job_history(&self, request: &HistoryRequest) -> Result<Vec<PastJob>> {
        let mut jobs = Vec::new();
        for name in self.azure_pools() {
            let pool_id = self.pool_id(name).await?.to_string();
            let what = format!("job history of pool `{name}`");
            let count = COMPLETED_REQUESTS.to_string();
            let answer = self
                .http
                .call(
                    Method::GET,
                    &["pools", pool_id.as_str(), "jobrequests"],
                    &[("completedRequestCount", count.as_str())],
                    None,
                    &what,
                    &format!("pool `{name}` (id {pool_id})"),
                )
                .await?;
            let requests: List<WireJobRequest> = answer.json()?;
            for wire in &requests.value {
                let Some(queued_at) = parse_time(wire.queue_time.as_deref()) else {
                    continue; // no queue time: nothing to place in time
                };
                let started_at =
                    parse_time(wire.receive_time.as_deref()).or_else(|| parse_time(wire.assign_time.as_deref()));
                jobs.push(PastJob {
                    id: format!("{name}/{}", wire.request_id),
                    queued_at,
                    started_at,
                    finished_at: parse_time(wire.finish_time.as_deref()),
                    labels: [(AZURE_POOL_LABEL.to_owned(), name.to_owned())].into(),
                    demands: wire.demand_texts(),
                });
            }
        }
        jobs.retain(|job| job.queued_at >= request.from && job.queued_at < request.until);
        jobs.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        Ok(jobs)
    }
}
