//! Which pending jobs a pool's agents could take: the CI servers' own matching rules, re-implemented so the
//! planner counts demand per pool exactly as the CI will hand jobs out.

use std::collections::BTreeMap;

use crate::model::{CiKind, Labels, Matching, PoolSpec, AZURE_POOL_LABEL};

/// Whether the pool's agents may take a job with these labels and demands, by the source's rule: the one place
/// the planner asks, for every CI.
pub fn pool_matches(rule: Matching, pool: &PoolSpec, labels: &Labels, demands: &[String]) -> bool {
    let offered = &pool.ci;
    match rule {
        Matching::LabelFilter => woodpecker_matches(&offered.labels, labels),
        Matching::PoolDemands => {
            azure_pool_matches(offered.labels.get(AZURE_POOL_LABEL).map(String::as_str), labels)
                && azure_matches(&offered.capabilities, demands)
        }
        Matching::LabelSet { case_insensitive } => label_set_matches(&offered.labels, demands, case_insensitive),
        Matching::LabelFilterAndDemands => {
            woodpecker_matches(&offered.labels, labels) && azure_matches(&offered.capabilities, demands)
        }
    }
}

/// `runs-on` (Forgejo, GitHub Actions): every demanded label is the name of an offered label (a pool's labels are
/// `name: how`). ciscale's own keys (`ciscale.*`) are no runner labels. As Forgejo (`ActionRunJob.ItRunsOn`, see
/// `providers::forgejo::runs_on_matches`): a job that demands nothing, or a pool that offers no label, never
/// matches.
pub fn label_set_matches(offered: &BTreeMap<String, String>, demands: &[String], case_insensitive: bool) -> bool {
    let names = || offered.keys().filter(|name| !name.starts_with("ciscale."));
    if demands.is_empty() || names().next().is_none() {
        return false;
    }
    demands.iter().all(|demand| {
        names().any(|name| if case_insensitive { name.eq_ignore_ascii_case(demand) } else { name == demand })
    })
}

/// Task labels under this prefix are set by Woodpecker itself and never take part in matching.
pub(super) const WOODPECKER_INTERNAL_PREFIX: &str = "woodpecker-ci.org/";

/// Task label naming the repository (`owner/name`); the server puts it on every task.
pub const WOODPECKER_REPO_LABEL: &str = "repo";
/// Task label naming the repository's organisation id; the server puts it on every task.
pub const WOODPECKER_ORG_LABEL: &str = "org-id";

/// Whether the agents of `pool` take a job with these task labels and demands, by the matching rule of the
/// pool's CI source kind (`ci`: its spec's kind; `None` when the config does not name it, which matches as the
/// fake CI does). `ciscale simulate` hands jobs to agents with it, playing the CI, by the same rule the planner
/// counts a pool's demand with ([`pool_matches`]).
pub fn pool_takes(ci: Option<&CiKind>, pool: &PoolSpec, labels: &Labels, demands: &[String]) -> bool {
    pool_matches(rule_of(ci), pool, labels, demands)
}

/// The matching rule a CI source's room declares; a source the config does not name (`None`) matches like the
/// fake CI.
pub fn rule_of(ci: Option<&CiKind>) -> Matching {
    ci.map_or(Matching::LabelFilterAndDemands, |kind| crate::providers::ci_capabilities(kind).matching)
}

/// Woodpecker's rule (`pipeline.MatchLabels`, used by server/scheduler/filter.go): the agent takes the task iff
/// - every agent label `!key: value` (a *required* label) is carried by the task with exactly that value, and
/// - every task label with a non-empty value, except internal `woodpecker-ci.org/*` ones, exists on the agent
///   (as `key` or `!key`) with the value `*` or exactly the task's value.
///
/// `agent_labels` are the labels ciscale gives the pool's agents (`WOODPECKER_AGENT_LABELS`). The agent's
/// filter holds more than those, and every real task carries `repo` and `org-id`, so they matter: the agent
/// adds `repo=*` unless its labels name `repo`, and the server sets `org-id=*` over anything the agent says for
/// a global agent (one made by `POST /api/agents`, as ciscale's are). Without them no pool would match a real
/// task. The agent's other defaults (`hostname`, `platform`, `backend`) depend on the machine; a pool that
/// selects on them names them in its labels.
pub fn woodpecker_matches(agent_labels: &BTreeMap<String, String>, task_labels: &Labels) -> bool {
    // Required labels are checked before internal labels are stripped, as Woodpecker does.
    let required_present = agent_labels.iter().all(|(key, value)| match key.strip_prefix('!') {
        Some(required) => task_labels.get(required) == Some(value.as_str()),
        None => true,
    });
    if !required_present {
        return false;
    }
    task_labels.iter().all(|(key, task_value)| {
        if task_value.is_empty() || key.starts_with(WOODPECKER_INTERNAL_PREFIX) {
            return true;
        }
        let agent_value = if key == WOODPECKER_ORG_LABEL {
            Some("*")
        } else {
            agent_labels
                .get(key)
                .map(String::as_str)
                .or_else(|| (key == WOODPECKER_REPO_LABEL).then_some("*"))
                .or_else(|| agent_labels.get(&format!("!{key}")).map(String::as_str))
        };
        matches!(agent_value, Some(value) if value == "*" || value == task_value)
    })
}

/// Azure Pipelines demands, as the job request lists them (`name` or `name -operator value`): `name` needs the
/// capability to exist, `name -equals value` needs its value to be `value` (the value may contain spaces:
/// `Agent.OS -equals Windows NT`). Other operators (`-gtVersion`, ...) are only checked for existence, and
/// demands on the capability `Agent.Version` are ignored (every agent the pool runs is recent enough by
/// construction). Azure compares capability names and `-equals` values case-insensitively, so we do too.
pub fn azure_matches(capabilities: &BTreeMap<String, String>, demands: &[String]) -> bool {
    demands.iter().all(|demand| {
        let Some((name, operator, expected)) = split_demand(demand) else {
            return true;
        };
        if name.eq_ignore_ascii_case("Agent.Version") {
            return true;
        }
        let capability = capabilities.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value);
        match (capability, operator) {
            (None, _) => false,
            (Some(value), Some(op)) if op.eq_ignore_ascii_case("-equals") => value.eq_ignore_ascii_case(expected),
            (Some(_), _) => true,
        }
    })
}

/// `name [-operator [value...]]`, split on runs of whitespace; the value is the rest of the line, trimmed.
/// `None` for a blank demand.
fn split_demand(demand: &str) -> Option<(&str, Option<&str>, &str)> {
    let demand = demand.trim();
    let (name, rest) = demand.split_once(char::is_whitespace).unwrap_or((demand, ""));
    if name.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    if rest.is_empty() {
        return Some((name, None, ""));
    }
    let (operator, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((name, Some(operator), value.trim()))
}

/// A job request waiting in an Azure agent pool (task label [`AZURE_POOL_LABEL`]) can only be taken by agents
/// of that pool, whatever its demands: pool names compare case-insensitively, as Azure's do. A task without the
/// label (the fake CI's) is not restricted.
pub fn azure_pool_matches(pool: Option<&str>, task_labels: &Labels) -> bool {
    match task_labels.get(AZURE_POOL_LABEL) {
        Some(task_pool) => pool.is_some_and(|pool| pool.eq_ignore_ascii_case(task_pool)),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn task(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().copied().collect()
    }

    #[test]
    fn woodpecker_exact_wildcard_and_missing() {
        let agent = labels(&[("platform", "linux/amd64"), ("repo", "*")]);
        assert!(woodpecker_matches(&agent, &task(&[("platform", "linux/amd64"), ("repo", "a/b")])));
        assert!(!woodpecker_matches(&agent, &task(&[("platform", "linux/arm64")])));
        assert!(!woodpecker_matches(&agent, &task(&[("gpu", "yes")])));
        // Empty task values and internal labels are ignored.
        assert!(woodpecker_matches(&agent, &task(&[("gpu", ""), ("woodpecker-ci.org/org-id", "3")])));
        assert!(woodpecker_matches(&agent, &Labels::default()));
    }

    #[test]
    fn woodpecker_required_labels() {
        let agent = labels(&[("!gpu", "yes"), ("platform", "*")]);
        assert!(woodpecker_matches(&agent, &task(&[("gpu", "yes"), ("platform", "linux/amd64")])));
        assert!(!woodpecker_matches(&agent, &task(&[("platform", "linux/amd64")])));
        assert!(!woodpecker_matches(&agent, &task(&[("gpu", "no")])));
        // A required label also serves as the agent's own value for the task-side rule.
        let wildcard_required = labels(&[("!gpu", "*")]);
        assert!(woodpecker_matches(&wildcard_required, &task(&[("gpu", "*")])));
        assert!(!woodpecker_matches(&wildcard_required, &task(&[("gpu", "yes")])));
    }

    #[test]
    fn woodpecker_server_labels_of_real_tasks() {
        // Every real task carries `repo` and `org-id`; a pool that names neither still takes it, as the agent
        // defaults `repo=*` and the server enforces `org-id=*` on global agents.
        let real = task(&[("repo", "acme/app"), ("org-id", "7"), ("platform", "linux/amd64")]);
        assert!(woodpecker_matches(&labels(&[("platform", "linux/amd64")]), &real));
        // The agent's own `repo` label replaces the default...
        assert!(!woodpecker_matches(&labels(&[("repo", "acme/other"), ("platform", "*")]), &real));
        assert!(woodpecker_matches(&labels(&[("repo", "acme/app"), ("platform", "*")]), &real));
        // ...but `org-id` is the server's: an agent label cannot narrow it.
        assert!(woodpecker_matches(&labels(&[("org-id", "1"), ("platform", "*")]), &real));
        // A required `!repo` still requires it, on top of the default wildcard.
        assert!(!woodpecker_matches(&labels(&[("!repo", "acme/other"), ("platform", "*")]), &real));
        assert!(woodpecker_matches(&labels(&[("!repo", "acme/app"), ("platform", "*")]), &real));
        // Anything else the task names still has to be there.
        let gpu_task = task(&[("repo", "a/b"), ("gpu", "1")]);
        assert!(!woodpecker_matches(&labels(&[("platform", "linux/amd64")]), &gpu_task));
    }

    #[test]
    fn azure_demands() {
        let caps = labels(&[("docker", ""), ("Agent.OS", "Linux"), ("java", "17")]);
        assert!(azure_matches(&caps, &[]));
        assert!(azure_matches(&caps, &["docker".into()]));
        assert!(azure_matches(&caps, &["agent.os -equals linux".into()]));
        assert!(!azure_matches(&caps, &["Agent.OS -equals Windows_NT".into()]));
        assert!(!azure_matches(&caps, &["node".into()]));
        assert!(azure_matches(&caps, &["Agent.Version -gtVersion 3.220.0".into()]));
        assert!(azure_matches(&caps, &["java -gtVersion 11".into()]));
        assert!(!azure_matches(&caps, &["docker".into(), "node".into()]));
    }

    #[test]
    fn azure_demand_spacing_and_values_with_spaces() {
        let caps = labels(&[("Agent.OS", "Windows NT"), ("docker", "")]);
        // Runs of whitespace between the parts, and around the demand.
        assert!(azure_matches(&caps, &["  Agent.OS   -equals   Windows NT ".into()]));
        assert!(!azure_matches(&caps, &["Agent.OS  -equals  Linux".into()]));
        // `-equals` with no value needs an empty capability value.
        assert!(azure_matches(&caps, &["docker -equals".into()]));
        assert!(!azure_matches(&caps, &["Agent.OS -equals".into()]));
        // Only the capability `Agent.Version` is ignored, not every name that starts like it.
        assert!(azure_matches(&caps, &["AGENT.VERSION -gtVersion 9.9.9".into()]));
        assert!(!azure_matches(&caps, &["Agent.VersionSuffix".into()]));
        // A blank demand asks for nothing.
        assert!(azure_matches(&caps, &["   ".into()]));
    }

    #[test]
    fn label_sets_as_forgejo_and_github_match_runs_on() {
        let offered = labels(&[("debian", "docker://node:22"), ("gpu", ""), ("ciscale.ephemeral", "true")]);
        let demands = |list: &[&str]| list.iter().map(|label| (*label).to_owned()).collect::<Vec<_>>();
        assert!(label_set_matches(&offered, &demands(&["debian", "gpu"]), false));
        assert!(!label_set_matches(&offered, &demands(&["debian", "arm64"]), false));
        assert!(!label_set_matches(&offered, &demands(&["Debian"]), false), "Forgejo compares exactly");
        assert!(label_set_matches(&offered, &demands(&["Debian"]), true), "GitHub ignores case");
        assert!(!label_set_matches(&offered, &demands(&["ciscale.ephemeral"]), false), "ciscale's keys are no labels");
        assert!(!label_set_matches(&offered, &[], false), "no runs-on: runs nowhere");
        assert!(!label_set_matches(&labels(&[("ciscale.x", "")]), &demands(&["debian"]), false));
    }

    #[test]
    fn azure_pool_label_restricts_to_that_pool() {
        let in_default = task(&[(AZURE_POOL_LABEL, "Default")]);
        assert!(azure_pool_matches(Some("default"), &in_default));
        assert!(!azure_pool_matches(Some("gpu"), &in_default));
        assert!(!azure_pool_matches(None, &in_default));
        assert!(azure_pool_matches(Some("gpu"), &Labels::default()), "unlabelled tasks are not restricted");
    }
}
