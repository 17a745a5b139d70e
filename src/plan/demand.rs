//! Demand: which pending jobs each pool could take, counted once each for the first pool (in config order) that
//! matches them, by the CI's own matching rule.

use std::collections::BTreeMap;

use super::fasthash::{FastMap, FastSet};
use super::matching::{azure_matches, azure_pool_matches, woodpecker_matches, WOODPECKER_INTERNAL_PREFIX};
use crate::model::{CiKind, CiName, Desired, Observed, PoolSpec, Task};

/// Which matching rule a CI source speaks. The fake speaks both (labels and demands).
#[derive(Clone, Copy)]
enum MatchRule {
    Woodpecker,
    Azure,
    Both,
}

fn match_rule(desired: &Desired, source: &CiName) -> MatchRule {
    match desired.ci.get(source).map(|spec| &spec.kind) {
        Some(CiKind::Woodpecker { .. }) => MatchRule::Woodpecker,
        Some(CiKind::AzurePipelines { .. }) => MatchRule::Azure,
        Some(CiKind::Fake(_)) | None => MatchRule::Both,
    }
}

fn pool_matches(rule: MatchRule, pool: &PoolSpec, labels: &BTreeMap<String, String>, demands: &[String]) -> bool {
    match rule {
        MatchRule::Woodpecker => woodpecker_matches(&pool.ci.labels, labels),
        MatchRule::Azure => {
            azure_pool_matches(pool.ci.azure_pool.as_deref(), labels) && azure_matches(&pool.ci.capabilities, demands)
        }
        MatchRule::Both => woodpecker_matches(&pool.ci.labels, labels) && azure_matches(&pool.ci.capabilities, demands),
    }
}

/// Pending jobs per pool (indexed like `desired.pools`): each job counts for the first pool in config order
/// that has its source and matches it, never twice.
///
/// Jobs are grouped by what matching can see of them first (see [`LabelProjection`]), so the cost is
/// (jobs × labels) + (distinct groups × pools) rather than (jobs × pools): a queue of 100,000 jobs over 500 repos
/// collapses to a handful of groups when the pools accept any repo.
pub(super) fn assign_pending(desired: &Desired, observed: &Observed) -> Vec<u32> {
    let mut pending = vec![0u32; desired.pools.len()];
    for (source, observation) in &observed.ci {
        let pools_of_source: Vec<usize> =
            desired.pools.iter().enumerate().filter(|(_, pool)| &pool.ci.source == source).map(|(i, _)| i).collect();
        if pools_of_source.is_empty() || observation.queue.pending.is_empty() {
            continue;
        }
        let rule = match_rule(desired, source);
        let projection = LabelProjection::new(pools_of_source.iter().map(|&i| &desired.pools[i]));
        // Grouped by a hash of the projection, each bucket checked for real equality (no allocation per job).
        let mut groups: FastMap<u64, Vec<(&Task, u32)>> = FastMap::default();
        for task in &observation.queue.pending {
            let bucket = groups.entry(projection.hash(task)).or_default();
            match bucket.iter_mut().find(|(representative, _)| projection.same(representative, task)) {
                Some((_, count)) => *count += 1,
                None => bucket.push((task, 1)),
            }
        }
        // Summation is order-independent, so iterating the hash map here cannot leak into the plan.
        for (representative, count) in groups.into_values().flatten() {
            let labels: BTreeMap<String, String> = projection
                .project(&representative.labels)
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            let demands = representative.demands.as_slice();
            if let Some(&pool_index) =
                pools_of_source.iter().find(|&&i| pool_matches(rule, &desired.pools[i], &labels, demands))
            {
                pending[pool_index] = pending[pool_index].saturating_add(count);
            }
        }
    }
    pending
}

/// Reduces a task's labels to what Woodpecker matching against a given set of pools can tell apart, without
/// changing any match result:
/// - a key some pool requires (`!key`) keeps its exact value, whatever it is;
/// - otherwise internal `woodpecker-ci.org/*` keys and empty values are dropped (matching ignores them);
/// - a key some pool names with a concrete value keeps its value; a key every pool names only as `*` (or not at
///   all) keeps its presence but not its value (`*`), since only presence can change the outcome.
struct LabelProjection<'a> {
    required: FastSet<&'a str>,
    exact: FastSet<&'a str>,
}

impl<'a> LabelProjection<'a> {
    fn new(pools: impl Iterator<Item = &'a PoolSpec>) -> Self {
        let mut required = FastSet::default();
        let mut exact = FastSet::default();
        for pool in pools {
            // Azure requests carry their pool's name, which matching compares exactly.
            if pool.ci.azure_pool.is_some() {
                exact.insert(crate::model::AZURE_POOL_LABEL);
            }
            for (key, value) in &pool.ci.labels {
                match key.strip_prefix('!') {
                    Some(required_key) => {
                        required.insert(required_key);
                    }
                    None if value != "*" => {
                        exact.insert(key.as_str());
                    }
                    None => {}
                }
            }
        }
        Self { required, exact }
    }

    fn project<'t>(&'t self, labels: &'t BTreeMap<String, String>) -> impl Iterator<Item = (&'t str, &'t str)> + 't {
        labels.iter().filter_map(|(key, value)| {
            let key = key.as_str();
            if self.required.contains(key) {
                return Some((key, value.as_str()));
            }
            if value.is_empty() || key.starts_with(WOODPECKER_INTERNAL_PREFIX) {
                return None;
            }
            Some((key, if self.exact.contains(key) { value.as_str() } else { "*" }))
        })
    }

    fn hash(&self, task: &Task) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = super::fasthash::FxHasher::default();
        for pair in self.project(&task.labels) {
            pair.hash(&mut hasher);
        }
        task.demands.hash(&mut hasher);
        hasher.finish()
    }

    fn same(&self, a: &Task, b: &Task) -> bool {
        a.demands == b.demands && self.project(&a.labels).eq(self.project(&b.labels))
    }
}
