//! Azure DevOps `distributedtask` wire types (only the fields ciscale reads) and their mapping onto the model.
//!
//! Everything here is lenient where Azure is: missing or `null` fields are `None`, unknown fields are ignored,
//! a date that does not parse is treated as absent rather than failing the whole observation. Only a body that is
//! not the expected shape at all (not JSON, `value` not a list, an agent without an `id`) is an error.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Deserialize;

use crate::model::{Agent, AgentId, Labels, Task, TaskId, AZURE_POOL_LABEL};

/// Azure's list envelope: `{"count": N, "value": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub(crate) struct List<T> {
    #[serde(default = "Vec::new", deserialize_with = "null_as_empty")]
    pub value: Vec<T>,
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// `TaskAgentPool` (the fields we need).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WirePool {
    pub id: u32,
    pub name: String,
}

/// `TaskAgentReference`: how job requests name agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireAgentRef {
    pub id: u32,
}

/// `TaskAgent`, as listed with `includeAssignedRequest=true&includeLastCompletedRequest=true`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireAgent {
    pub id: u32,
    pub name: String,
    /// `false`: disabled, the pool gives it no jobs (ciscale's drain).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// `online` or `offline`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub assigned_request: Option<WireJobRequest>,
    #[serde(default)]
    pub last_completed_request: Option<WireJobRequest>,
    #[serde(default)]
    pub version: Option<String>,
    /// Optional like every `TaskAgent` field in the spec; without it the planner falls back to the last contact.
    #[serde(default)]
    pub created_on: Option<String>,
}

/// A demand as the job request lists it. The undocumented `jobrequests` endpoint sends plain strings
/// (`"Agent.Version -gtVersion 2.163.1"`, `"docker"`); the spec's `Demand` object (`{name, value}`) is read too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum WireDemand {
    Text(String),
    Object {
        name: String,
        #[serde(default)]
        value: Option<String>,
    },
}

impl WireDemand {
    /// The demand in the text form `azure_matches` reads: `name` or `name -equals value`.
    pub fn to_text(&self) -> String {
        match self {
            WireDemand::Text(text) => text.trim().to_owned(),
            WireDemand::Object { name, value: Some(value) } if !value.is_empty() => format!("{name} -equals {value}"),
            WireDemand::Object { name, .. } => name.clone(),
        }
    }
}

/// `TaskAgentJobRequest` (the fields we need).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireJobRequest {
    /// An int64 in the spec; kept as a JSON number of any size.
    pub request_id: serde_json::Number,
    /// `null` until the request finished (`succeeded`, `failed`, `canceled`, ...).
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub finish_time: Option<String>,
    #[serde(default)]
    pub assign_time: Option<String>,
    /// Read by the job history only (trace export).
    #[serde(default)]
    pub queue_time: Option<String>,
    #[serde(default)]
    pub receive_time: Option<String>,
    #[serde(default)]
    pub reserved_agent: Option<WireAgentRef>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub demands: Vec<WireDemand>,
}

impl WireJobRequest {
    /// Still waiting or running: no result and no finish time.
    pub fn is_unfinished(&self) -> bool {
        self.result.is_none() && parse_time(self.finish_time.as_deref()).is_none()
    }

    /// Its demands as text (`name` or `name -operator value`), blank ones left out.
    pub(super) fn demand_texts(&self) -> Vec<String> {
        self.demands.iter().map(WireDemand::to_text).filter(|demand| !demand.is_empty()).collect()
    }

    /// An agent holds it: a reserved agent, or at least a real assign time.
    pub fn is_assigned(&self) -> bool {
        self.reserved_agent.is_some() || parse_time(self.assign_time.as_deref()).is_some()
    }

    /// The request as a queue task; `labels`: its pool's (every request of a pool shares the one set).
    pub(super) fn to_task(&self, labels: &Labels) -> Task {
        Task {
            id: TaskId::new(self.request_id.to_string()),
            labels: labels.clone(),
            demands: self.demand_texts(),
            agent_id: self.reserved_agent.as_ref().map(|agent| AgentId::new(agent.id.to_string())),
        }
    }
}

/// Azure dates: RFC 3339 with up to 7 fractional digits, sometimes without an offset (then UTC), and
/// `0001-01-01T00:00:00` for "never". Anything unreadable or before 1970 is absent.
pub(crate) fn parse_time(text: Option<&str>) -> Option<Timestamp> {
    let text = text?.trim();
    if text.is_empty() {
        return None;
    }
    let parsed = text.parse::<Timestamp>().ok().or_else(|| {
        let civil: jiff::civil::DateTime = text.parse().ok()?;
        civil.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|zoned| zoned.timestamp())
    })?;
    (parsed > Timestamp::UNIX_EPOCH).then_some(parsed)
}

/// One Azure agent as the model's [`Agent`].
///
/// - `busy`: it has an assigned, unfinished request.
/// - `no_schedule`: it is disabled (`enabled: false`), which is how ciscale drains.
/// - `last_contact`: Azure keeps no heartbeat time, only a live status (an online agent holds an open
///   long-poll connection). An `online` agent is in contact at `observed_at`; an `offline` one (or one with no
///   status) is `None`. So the planner's bootstrap rule replaces an instance whose agent is offline once the
///   instance is older than the pool's `bootstrapTimeout` (the grace period), unless the agent is busy; a fresh
///   instance whose agent has not come online yet is left alone until then.
/// - `last_work`: the finish time of its last completed request (the idle timeout counts from there).
/// - labels: `azure-pool` (the Azure pool it is in) and `agent-version` when known.
/// - `created_at`: `createdOn`.
pub(crate) fn agent_to_model(agent: &WireAgent, pool_name: &str, observed_at: Timestamp) -> Agent {
    let online = agent.status.as_deref().is_some_and(|status| status.eq_ignore_ascii_case("online"));
    let mut labels = BTreeMap::from([(AZURE_POOL_LABEL.to_owned(), pool_name.to_owned())]);
    if let Some(version) = agent.version.as_deref().filter(|version| !version.is_empty()) {
        labels.insert("agent-version".to_owned(), version.to_owned());
    }
    Agent {
        id: AgentId::new(agent.id.to_string()),
        name: agent.name.clone(),
        busy: agent.assigned_request.as_ref().is_some_and(WireJobRequest::is_unfinished),
        no_schedule: agent.enabled == Some(false),
        last_contact: online.then_some(observed_at),
        last_work: agent.last_completed_request.as_ref().and_then(|request| parse_time(request.finish_time.as_deref())),
        labels,
        created_at: parse_time(agent.created_on.as_deref()),
    }
}

/// Unfinished requests of one pool, split into (pending, running): pending = not assigned to an agent yet,
/// running = assigned (its agent is the reserved agent). Finished requests (the endpoint returns recent history
/// too) are dropped.
pub(crate) fn requests_to_queue(requests: &[WireJobRequest], pool_name: &str) -> (Vec<Task>, Vec<Task>) {
    let mut pending = Vec::new();
    let mut running = Vec::new();
    // The pool's one label set, stored once for all its requests.
    let labels = Labels::from([(AZURE_POOL_LABEL, pool_name)]);
    for request in requests.iter().filter(|request| request.is_unfinished()) {
        if request.is_assigned() {
            running.push(request.to_task(&labels));
        } else {
            pending.push(request.to_task(&labels));
        }
    }
    (pending, running)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn dates_in_azure_forms() {
        assert_eq!(parse_time(Some("2024-05-01T10:00:00.1234567Z")), Some(at("2024-05-01T10:00:00.1234567Z")));
        assert_eq!(parse_time(Some("2024-05-01T10:00:00")), Some(at("2024-05-01T10:00:00Z")), "no offset is UTC");
        assert_eq!(parse_time(Some("0001-01-01T00:00:00")), None, "Azure's `never`");
        assert_eq!(parse_time(Some("yesterday")), None);
        assert_eq!(parse_time(Some("")), None);
        assert_eq!(parse_time(None), None);
    }

    #[test]
    fn null_and_missing_fields_are_absent_not_errors() {
        let agents: List<WireAgent> = serde_json::from_str(
            r#"{"count": 2, "value": [
                {"id": 1, "name": "a", "enabled": null, "status": null, "assignedRequest": null,
                 "lastCompletedRequest": {"requestId": 9, "result": "succeeded", "finishTime": null}},
                {"id": 2, "name": "b", "status": "Online", "assignedRequest":
                    {"requestId": 10, "result": null, "demands": null, "reservedAgent": {"id": 2}}}
            ]}"#,
        )
        .expect("agents");
        let now = at("2024-05-01T10:00:00Z");
        let first = agent_to_model(&agents.value[0], "P", now);
        assert!(!first.busy && !first.no_schedule && first.last_contact.is_none() && first.last_work.is_none());
        let second = agent_to_model(&agents.value[1], "P", now);
        assert!(second.busy, "an unfinished assigned request");
        assert_eq!(second.last_contact, Some(now), "status compares case-insensitively");

        let empty: List<WireJobRequest> = serde_json::from_str(r#"{"count": 0, "value": null}"#).expect("null list");
        assert!(empty.value.is_empty());
        let requests: List<WireJobRequest> = serde_json::from_str(
            r#"{"value": [
                {"requestId": 1, "result": null, "demands": null},
                {"requestId": 2, "result": null, "assignTime": "0001-01-01T00:00:00", "reservedAgent": null},
                {"requestId": 3, "result": null, "assignTime": "2024-05-01T09:00:00.5Z"},
                {"requestId": 4, "result": "canceled", "finishTime": "2024-05-01T09:00:00Z"},
                {"requestId": 5, "finishTime": "2024-05-01T09:00:00Z"}
            ]}"#,
        )
        .expect("requests");
        let (pending, running) = requests_to_queue(&requests.value, "P");
        let ids = |tasks: &[Task]| tasks.iter().map(|task| task.id.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(&pending), ["1", "2"], "Azure's zero date is no assignment");
        assert_eq!(ids(&running), ["3"], "assigned without a reserved agent still runs");
        assert_eq!(running[0].agent_id, None);
        assert!(serde_json::from_str::<List<WireAgent>>(r#"{"value": [{"name": "no id"}]}"#).is_err());
    }

    #[test]
    fn demands_as_text_or_objects() {
        let demands: Vec<WireDemand> = serde_json::from_str(
            r#"["docker", " Agent.Version -gtVersion 3.0 ", {"name": "Agent.OS", "value": "Linux"}, {"name": "java"}, {"name": "node", "value": null}]"#,
        )
        .expect("demands");
        let texts: Vec<String> = demands.iter().map(WireDemand::to_text).collect();
        assert_eq!(texts, ["docker", "Agent.Version -gtVersion 3.0", "Agent.OS -equals Linux", "java", "node"]);
    }
}
