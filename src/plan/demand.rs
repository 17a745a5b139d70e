//! Demand: which pending jobs each pool could take, counted once each for the first pool (in config order) that
//! matches them, by the CI's own matching rule.

use std::hash::{Hash, Hasher};

use super::fasthash::{FastMap, FxHasher};
use super::matching::{pool_matches, rule_of, WOODPECKER_INTERNAL_PREFIX};
use crate::model::{CiName, Desired, Label, Labels, Matching, Observed, PoolSpec};

/// The matching rule the source's room declares; a source the config does not name matches like the fake.
fn match_rule(desired: &Desired, source: &CiName) -> Matching {
    rule_of(desired.ci.get(source).map(|spec| &spec.kind))
}

/// Pending jobs per pool (indexed like `desired.pools`): each job counts for the first pool in config order
/// that has its source and matches it, never twice.
///
/// Jobs are grouped by what matching can see of them first (see [`LabelProjection`]), so the cost is
/// (jobs × labels) + (distinct groups × pools) rather than (jobs × pools): a queue of 100,000 jobs over 500 repos
/// collapses to a handful of groups when the pools accept any repo. A job whose label set (the shared allocation
/// of an interned queue, see `model::LabelInterner`) was met before is not projected again: its projection is
/// remembered by the set's address ([`SetMemo`]). Equal sets that are not shared (a `--observed` file) are just
/// projected each, with the same result.
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
        let mut kinds = Kinds::default();
        let mut memo = SetMemo::default();
        // Jobs per kind (the projection of their labels) and demands; jobs that demand nothing (every Woodpecker
        // job) are counted by kind alone, without hashing their demands.
        let mut plain: Vec<u32> = Vec::new();
        let mut demanding: FastMap<(u32, &[String]), u32> = FastMap::default();
        // Each job is projected into a scratch buffer (no allocation per job); a kind keeps the projection of
        // its first job.
        let mut scratch: Vec<(u32, &str)> = Vec::new();
        for task in &observation.queue.pending {
            let kind = match memo.get(&task.labels) {
                Some(kind) => kind,
                None => {
                    scratch.clear();
                    let mut hasher = FxHasher::default();
                    projection.project(task.labels.entries(), &mut scratch, &mut hasher);
                    let kind = kinds.find_or_add(hasher.finish(), &scratch);
                    memo.remember(&task.labels, kind);
                    kind
                }
            };
            if task.demands.is_empty() {
                let at = kind as usize;
                if plain.len() <= at {
                    plain.resize(at + 1, 0);
                }
                plain[at] += 1;
            } else {
                *demanding.entry((kind, task.demands.as_slice())).or_default() += 1;
            }
        }
        // Each kind as labels matching can read (keys by name again), once.
        let labels: Vec<Labels> = kinds
            .projections
            .iter()
            .map(|kept| kept.iter().map(|&(key, value)| (projection.key(key), value)).collect())
            .collect();
        let no_demands: &[String] = &[];
        let plain = plain.into_iter().enumerate().map(|(kind, count)| ((kind as u32, no_demands), count));
        // Summation is order-independent, so iterating the hash map here cannot leak into the plan.
        for ((kind, demands), count) in plain.chain(demanding).filter(|&(_, count)| count > 0) {
            let labels = &labels[kind as usize];
            if let Some(&pool_index) =
                pools_of_source.iter().find(|&&i| pool_matches(rule, &desired.pools[i], labels, demands))
            {
                pending[pool_index] = pending[pool_index].saturating_add(count);
            }
        }
    }
    pending
}

/// The distinct projections met so far ("kinds" of jobs, as matching sees them), numbered in order of appearance
/// and found by a hash of the projection, each candidate checked for real equality.
#[derive(Default)]
struct Kinds<'a> {
    projections: Vec<Vec<(u32, &'a str)>>,
    by_hash: FastMap<u64, Vec<u32>>,
}

impl<'a> Kinds<'a> {
    fn find_or_add(&mut self, hash: u64, projection: &[(u32, &'a str)]) -> u32 {
        let candidates = self.by_hash.entry(hash).or_default();
        let same = |known: &[(u32, &str)]| {
            known.len() == projection.len()
                && known.iter().zip(projection).all(|(a, b)| {
                    // An interned queue's equal values are one string: compared by address before content.
                    a.0 == b.0 && (std::ptr::eq(a.1, b.1) || a.1 == b.1)
                })
        };
        if let Some(&kind) = candidates.iter().find(|&&kind| same(&self.projections[kind as usize])) {
            return kind;
        }
        let kind = self.projections.len() as u32;
        self.projections.push(projection.to_vec());
        candidates.push(kind);
        kind
    }
}

/// Jobs met so far, by label set: the kind of each set by its address, so a job of an interned queue whose set
/// was seen before costs one pointer hash. Sound without interning: every set lives (borrowed from the
/// observation) while the memo does, so one address is one set; sets that are equal but not shared are only
/// remembered apart.
///
/// It pays only when sets repeat: once it holds [`SetMemo::TRIAL`] sets and fewer jobs repeated a set than there
/// are sets, it is switched off for the rest of the queue (each job is then projected, as without it), so a queue of
/// nearly all distinct sets (or one not interned) does not pay a hash table insert per job for nothing.
#[derive(Default)]
struct SetMemo {
    kinds: FastMap<usize, u32>,
    hits: u32,
    off: bool,
}

impl SetMemo {
    const TRIAL: usize = 4096;

    fn get(&mut self, labels: &Labels) -> Option<u32> {
        if self.off {
            return None;
        }
        let kind = self.kinds.get(&labels.set_address()).copied();
        if kind.is_some() {
            self.hits = self.hits.saturating_add(1);
        }
        kind
    }

    fn remember(&mut self, labels: &Labels, kind: u32) {
        if self.off {
            return;
        }
        self.kinds.insert(labels.set_address(), kind);
        if self.kinds.len() >= Self::TRIAL && (self.hits as usize) < self.kinds.len() {
            self.off = true;
            self.kinds = FastMap::default();
        }
    }
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
    /// Woodpecker's own (`woodpecker-ci.org/*`) and not required: matching never looks at it (even when a pool
    /// names it with a value).
    Internal,
}

/// A task label key as the projection knows it: its number (so projections compare keys as numbers) and its role.
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
/// Every pending job of a label set not met before goes through it, and jobs of one queue carry the same few keys
/// in the same order: so the key at each position is first compared with the key seen at that position last time
/// (by address: an interned queue shares its keys; by content only when the addresses differ), and only a key not
/// seen there is looked up (hashed) in the table of keys met so far. A value is read only when a pool names its
/// key with a concrete value: an empty one is told by its length alone.
struct LabelProjection<'a> {
    known: FastMap<&'a str, KeyInfo>,
    /// Key by number, for the kinds' labels.
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
                    // Matching ignores the task's internal labels unless required, whatever value a pool names.
                    None if key.starts_with(WOODPECKER_INTERNAL_PREFIX) => mark(key.as_str(), KeyRole::Internal),
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
            // Same address and length: the same string (the interned case); else compare what it says.
            if std::ptr::eq(*last, key) || *last == key {
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
    /// goes (equal projections hash alike; the kind's hash needs no second pass).
    fn project(&mut self, labels: &'a [Label], into: &mut Vec<(u32, &'a str)>, hasher: &mut FxHasher) {
        for (position, (key, value)) in labels.iter().enumerate() {
            let info = self.info(position, key);
            let value: &'a str = value;
            let kept = match info.role {
                KeyRole::Required => value,
                _ if value.is_empty() => continue,
                KeyRole::Internal => continue,
                KeyRole::Exact => value,
                KeyRole::Presence => "*",
            };
            into.push((info.id, kept));
            hasher.write_u32(info.id);
            kept.hash(hasher);
        }
    }
}
