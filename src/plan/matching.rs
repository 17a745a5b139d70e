//! Which pending jobs a pool's agents could take: the CI servers' own matching rules, re-implemented so the
//! planner counts demand per pool exactly as the CI will hand jobs out.

use std::collections::BTreeMap;

/// Task labels under this prefix are set by Woodpecker itself and never take part in matching.
pub(super) const WOODPECKER_INTERNAL_PREFIX: &str = "woodpecker-ci.org/";

/// Woodpecker's rule (server/rpc `createFilterFunc`): the agent takes the task iff
/// - every agent label `!key: value` (a *required* label) is carried by the task with exactly that value, and
/// - every task label with a non-empty value, except internal `woodpecker-ci.org/*` ones, exists on the agent
///   (as `key` or `!key`) with the value `*` or exactly the task's value.
pub fn woodpecker_matches(agent_labels: &BTreeMap<String, String>, task_labels: &BTreeMap<String, String>) -> bool {
    // Required labels are checked before internal labels are stripped, as Woodpecker does.
    let required_present = agent_labels.iter().all(|(key, value)| match key.strip_prefix('!') {
        Some(required) => task_labels.get(required) == Some(value),
        None => true,
    });
    if !required_present {
        return false;
    }
    task_labels.iter().all(|(key, task_value)| {
        if task_value.is_empty() || key.starts_with(WOODPECKER_INTERNAL_PREFIX) {
            return true;
        }
        let agent_value = agent_labels.get(key).or_else(|| agent_labels.get(&format!("!{key}")));
        matches!(agent_value, Some(value) if value == "*" || value == task_value)
    })
}

/// Azure Pipelines demands: `name` needs the capability to exist, `name -equals value` needs its value to be
/// `value`. Other operators (`-gtVersion`, ...) are only checked for existence, and `Agent.Version` demands are
/// ignored (every agent the pool runs is recent enough by construction). Azure compares capability names and
/// `-equals` values case-insensitively, so we do too.
pub fn azure_matches(capabilities: &BTreeMap<String, String>, demands: &[String]) -> bool {
    demands.iter().all(|demand| {
        let demand = demand.trim();
        if demand.is_empty() || demand.to_ascii_lowercase().starts_with("agent.version") {
            return true;
        }
        let mut parts = demand.splitn(3, char::is_whitespace);
        let name = parts.next().unwrap_or_default();
        let operator = parts.next();
        let expected = parts.next().map(str::trim);
        let capability = capabilities.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value);
        match (capability, operator) {
            (None, _) => false,
            (Some(value), Some(op)) if op.eq_ignore_ascii_case("-equals") => {
                value.eq_ignore_ascii_case(expected.unwrap_or_default())
            }
            (Some(_), _) => true,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn woodpecker_exact_wildcard_and_missing() {
        let agent = labels(&[("platform", "linux/amd64"), ("repo", "*")]);
        assert!(woodpecker_matches(&agent, &labels(&[("platform", "linux/amd64"), ("repo", "a/b")])));
        assert!(!woodpecker_matches(&agent, &labels(&[("platform", "linux/arm64")])));
        assert!(!woodpecker_matches(&agent, &labels(&[("gpu", "yes")])));
        // Empty task values and internal labels are ignored.
        assert!(woodpecker_matches(&agent, &labels(&[("gpu", ""), ("woodpecker-ci.org/org-id", "3")])));
        assert!(woodpecker_matches(&agent, &BTreeMap::new()));
    }

    #[test]
    fn woodpecker_required_labels() {
        let agent = labels(&[("!gpu", "yes"), ("platform", "*")]);
        assert!(woodpecker_matches(&agent, &labels(&[("gpu", "yes"), ("platform", "linux/amd64")])));
        assert!(!woodpecker_matches(&agent, &labels(&[("platform", "linux/amd64")])));
        assert!(!woodpecker_matches(&agent, &labels(&[("gpu", "no")])));
        // A required label also serves as the agent's own value for the task-side rule.
        let wildcard_required = labels(&[("!gpu", "*")]);
        assert!(woodpecker_matches(&wildcard_required, &labels(&[("gpu", "*")])));
        assert!(!woodpecker_matches(&wildcard_required, &labels(&[("gpu", "yes")])));
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
}
