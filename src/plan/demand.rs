//! Demand: which pending jobs each pool could take, counted once each for the first pool (in config order) that
//! matches them, by the CI's own matching rule.

use std::collections::BTreeMap;

use super::fasthash::FastMap;
use super::matching::{pool_matches, rule_of, WOODPECKER_INTERNAL_PREFIX};
use crate::model::{CiName, Desired, Matching, Observed, PoolSpec};

/// The matching rule the source's room declares; a source the config does not name matches like the fake.
fn match_rule(desired: &Desired, source: &CiName) -> Matching {
    rule_of(desired.ci.get(source).map(|spec| &spec.kind))
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
        // Grouped by a hash of the projection, each bucket checked for real equality. Each job is projected once,
        // into a scratch buffer (no allocation per job); a group keeps the projection of its first job.
        let mut groups: FastMap<u64, Vec<Group<'_>>> = FastMap::default();
        let mut scratch: Vec<(&str, &str)> = Vec::new();
        for task in &observation.queue.pending {
            scratch.clear();
            scratch.extend(projection.project(&task.labels));
            let bucket = groups.entry(group_hash(&scratch, &task.demands)).or_default();
            match bucket.iter_mut().find(|group| group.labels == scratch && group.demands == task.demands.as_slice()) {
                Some(group) => group.count += 1,
                None => bucket.push(Group { labels: scratch.clone(), demands: &task.demands, count: 1 }),
            }
        }
        // Summation is order-independent, so iterating the hash map here cannot leak into the plan.
        for Group { labels, demands, count } in groups.into_values().flatten() {
            let labels: BTreeMap<String, String> =
                labels.into_iter().map(|(key, value)| (key.to_owned(), value.to_owned())).collect();
            if let Some(&pool_index) =
                pools_of_source.iter().find(|&&i| pool_matches(rule, &desired.pools[i], &labels, demands))
            {
                pending[pool_index] = pending[pool_index].saturating_add(count);
            }
        }
    }
    pending
}

/// Pending jobs that look the same to matching: the projection of their labels, their demands, how many.
struct Group<'t> {
    labels: Vec<(&'t str, &'t str)>,
    demands: &'t [String],
    count: u32,
}

fn group_hash(labels: &[(&str, &str)], demands: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = super::fasthash::FxHasher::default();
    labels.hash(&mut hasher);
    demands.hash(&mut hasher);
    hasher.finish()
}

/// What the pools say about a label key (see [`LabelProjection`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRole {
    /// Some pool requires it (`!key`): the exact value matters, even an empty one.
    Required,
    /// Some pool names it with a concrete value: its value matters.
    Exact,
}

/// Reduces a task's labels to what Woodpecker matching against a given set of pools can tell apart, without
/// changing any match result:
/// - a key some pool requires (`!key`) keeps its exact value, whatever it is;
/// - otherwise internal `woodpecker-ci.org/*` keys and empty values are dropped (matching ignores them);
/// - a key some pool names with a concrete value keeps its value; a key every pool names only as `*` (or not at
///   all) keeps its presence but not its value (`*`), since only presence can change the outcome.
///
/// One lookup per label (the key's role), as every pending job goes through it.
struct LabelProjection<'a> {
    roles: FastMap<&'a str, KeyRole>,
}

impl<'a> LabelProjection<'a> {
    fn new(pools: impl Iterator<Item = &'a PoolSpec>) -> Self {
        let mut roles: FastMap<&'a str, KeyRole> = FastMap::default();
        // Required wins over exact: its value is kept whatever it is.
        let mut mark = |key: &'a str, role: KeyRole| {
            let known = roles.entry(key).or_insert(role);
            if role == KeyRole::Required {
                *known = KeyRole::Required;
            }
        };
        for pool in pools {
            for (key, value) in &pool.ci.labels {
                match key.strip_prefix('!') {
                    Some(required_key) => mark(required_key, KeyRole::Required),
                    None if value != "*" => mark(key.as_str(), KeyRole::Exact),
                    None => {}
                }
            }
        }
        Self { roles }
    }

    fn project<'t>(&'t self, labels: &'t BTreeMap<String, String>) -> impl Iterator<Item = (&'t str, &'t str)> + 't {
        labels.iter().filter_map(|(key, value)| {
            let key = key.as_str();
            let role = self.roles.get(key).copied();
            if role == Some(KeyRole::Required) {
                return Some((key, value.as_str()));
            }
            if value.is_empty() || key.starts_with(WOODPECKER_INTERNAL_PREFIX) {
                return None;
            }
            Some((key, if role == Some(KeyRole::Exact) { value.as_str() } else { "*" }))
        })
    }
}
