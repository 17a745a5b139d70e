//! Demand: which pending jobs each pool could take, counted once each for the first pool (in config order) that
//! matches them, by the CI's own matching rule.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use super::fasthash::{FastMap, FxHasher};
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
        let mut projection = LabelProjection::new(pools_of_source.iter().map(|&i| &desired.pools[i]));
        // Grouped by a hash of the projection, each bucket checked for real equality. Each job is projected once,
        // into a scratch buffer (no allocation per job); a group keeps the projection of its first job.
        let mut groups: FastMap<u64, Vec<Group<'_>>> = FastMap::default();
        let mut scratch: Vec<(u32, &str)> = Vec::new();
        for task in &observation.queue.pending {
            scratch.clear();
            let mut hasher = FxHasher::default();
            projection.project(&task.labels, &mut scratch, &mut hasher);
            task.demands.hash(&mut hasher);
            let bucket = groups.entry(hasher.finish()).or_default();
            match bucket.iter_mut().find(|group| group.labels == scratch && group.demands == task.demands.as_slice()) {
                Some(group) => group.count += 1,
                None => bucket.push(Group { labels: scratch.clone(), demands: &task.demands, count: 1 }),
            }
        }
        // Summation is order-independent, so iterating the hash map here cannot leak into the plan.
        for Group { labels, demands, count } in groups.into_values().flatten() {
            let labels: BTreeMap<String, String> =
                labels.into_iter().map(|(key, value)| (projection.key(key).to_owned(), value.to_owned())).collect();
            if let Some(&pool_index) =
                pools_of_source.iter().find(|&&i| pool_matches(rule, &desired.pools[i], &labels, demands))
            {
                pending[pool_index] = pending[pool_index].saturating_add(count);
            }
        }
    }
    pending
}

/// Pending jobs that look the same to matching: the projection of their labels (keys by their number in the
/// [`LabelProjection`]), their demands, how many.
struct Group<'t> {
    labels: Vec<(u32, &'t str)>,
    demands: &'t [String],
    count: u32,
}

/// What the pools say about a label key (see [`LabelProjection`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRole {
    /// Some pool requires it (`!key`): the exact value matters, even an empty one.
    Required,
    /// Some pool names it with a concrete value: its value matters.
    Exact,
    /// No pool requires it or names a value for it: only its presence matters (and only with a non-empty value).
    Presence,
    /// Woodpecker's own (`woodpecker-ci.org/*`) and not required: matching never looks at it.
    Internal,
}

/// A task label key as the projection knows it: its number (so a group compares keys as numbers) and its role.
#[derive(Clone, Copy)]
struct KeyInfo {
    id: u32,
    role: KeyRole,
}

/// Reduces a task's labels to what Woodpecker matching against a given set of pools can tell apart, without
/// changing any match result:
/// - a key some pool requires (`!key`) keeps its exact value, whatever it is;
/// - otherwise internal `woodpecker-ci.org/*` keys and empty values are dropped (matching ignores them);
/// - a key some pool names with a concrete value keeps its value; a key every pool names only as `*` (or not at
///   all) keeps its presence but not its value (`*`), since only presence can change the outcome.
///
/// Every pending job goes through it, and jobs of one queue carry the same few keys in the same order: so the
/// key at each position is first compared with the key seen at that position last time (one short string
/// comparison), and only a key not seen there is looked up (hashed) in the table of keys met so far.
struct LabelProjection<'a> {
    known: FastMap<&'a str, KeyInfo>,
    /// Key by number, for the groups' labels.
    names: Vec<&'a str>,
    /// The key last met at each label position.
    last: Vec<(&'a str, KeyInfo)>,
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
        let mut projection = Self { known: FastMap::default(), names: Vec::new(), last: Vec::new() };
        for (key, role) in roles {
            projection.add(key, role);
        }
        projection
    }

    fn add(&mut self, key: &'a str, role: KeyRole) -> KeyInfo {
        let info = KeyInfo { id: self.names.len() as u32, role };
        self.names.push(key);
        self.known.insert(key, info);
        info
    }

    /// The key numbered `id`.
    fn key(&self, id: u32) -> &'a str {
        self.names[id as usize]
    }

    fn info(&mut self, position: usize, key: &'a str) -> KeyInfo {
        if let Some((last, info)) = self.last.get(position) {
            if *last == key {
                return *info;
            }
        }
        let info = match self.known.get(key) {
            Some(info) => *info,
            None if key.starts_with(WOODPECKER_INTERNAL_PREFIX) => self.add(key, KeyRole::Internal),
            None => self.add(key, KeyRole::Presence),
        };
        if position < self.last.len() {
            self.last[position] = (key, info);
        } else {
            self.last.push((key, info));
        }
        info
    }

    /// Appends the projection of `labels` to `into`, in the labels' (key) order, and feeds it to `hasher` as it
    /// goes (equal projections hash alike; the group's hash needs no second pass).
    fn project(&mut self, labels: &'a BTreeMap<String, String>, into: &mut Vec<(u32, &'a str)>, hasher: &mut FxHasher) {
        for (position, (key, value)) in labels.iter().enumerate() {
            let info = self.info(position, key.as_str());
            let value = value.as_str();
            let kept = match info.role {
                KeyRole::Required => value,
                _ if value.is_empty() => continue,
                KeyRole::Internal => continue,
                KeyRole::Exact if key.starts_with(WOODPECKER_INTERNAL_PREFIX) => continue,
                KeyRole::Exact => value,
                KeyRole::Presence => "*",
            };
            into.push((info.id, kept));
            hasher.write_u32(info.id);
            kept.hash(hasher);
        }
    }
}
