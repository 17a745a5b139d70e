//! A job's labels are shared when a provider reads its queue through a `LabelInterner`, and not when a plan reads
//! an `--observed` file or a test builds its tasks one by one. The planner may take shortcuts on shared labels
//! (comparing addresses, remembering label sets it met): the plan must be the same however the labels are stored,
//! and each job must count for the first pool that takes it by the CI's rule (`pool_takes`, as the simulated CI
//! hands jobs out).

use proptest::prelude::*;

use ciscale::model::{CiName, CiObservation, Desired, LabelInterner, Labels, Observed, Queue, Task, TaskId};
use ciscale::plan;
use ciscale::plan::matching::pool_takes;

const KEYS: [&str; 5] = ["gpu", "org-id", "platform", "repo", "woodpecker-ci.org/repo-id"];
/// Task values: `""` (ignored by Woodpecker unless a pool requires the key) and `*` (a value like any other on
/// the task side) included.
const VALUES: [&str; 4] = ["a", "b", "", "*"];
const POOL_VALUES: [&str; 3] = ["a", "b", "*"];

/// A pool's labels: (key, value, required `!key`).
type PoolLabels = Vec<(usize, usize, bool)>;

fn config(pools: &[PoolLabels]) -> String {
    let mut text = String::from(
        "id: labels\nci:\n  wp: { kind: woodpecker, server: \"https://ci.example.com\", token: \"${T}\" }\n\
         backends:\n  b: { kind: fake }\npools:\n",
    );
    for (index, labels) in pools.iter().enumerate() {
        let labels: Vec<String> = labels
            .iter()
            .map(|&(key, value, required)| {
                format!("\"{}{}\": \"{}\"", if required { "!" } else { "" }, KEYS[key], POOL_VALUES[value])
            })
            .collect();
        text.push_str(&format!(
            "  - {{ name: p{index}, ci: {{ source: wp, labels: {{ {} }} }}, backend: {{ name: b }}, agent: {{ image: a }}, \
             scale: {{ max: 1000 }} }}\n",
            labels.join(", ")
        ));
    }
    text
}

fn load(text: &str) -> Desired {
    ciscale::config::load_str("labels.yaml", text, &|var| Some(format!("unset-{var}"))).unwrap_or_else(|error| {
        let problems = error.diagnostics().map(|d| d.render_plain()).unwrap_or_default();
        panic!("generated config is valid: {problems}\n{text}")
    })
}

fn observed(tasks: Vec<Task>) -> Observed {
    let queue = Queue { pending: tasks, running: Vec::new() };
    Observed {
        observed_at: "2026-03-02T10:00:00Z".parse().expect("timestamp"),
        ci: [(CiName::new("wp"), CiObservation { agents: Vec::new(), queue })].into(),
        ..Observed::default()
    }
}

fn task(index: usize, labels: Labels) -> Task {
    Task { id: TaskId::new(format!("t{index}")), labels, demands: Vec::new(), agent_id: None }
}

/// The plan as its JSON (everything in it), and the pending jobs it counted per pool.
fn plan_of(desired: &Desired, observed: &Observed) -> (String, Vec<u32>) {
    let plan = plan::plan(desired, observed, observed.observed_at);
    let pending = plan.pools.iter().map(|pool| pool.pending_jobs).collect();
    (serde_json::to_string(&plan).expect("plan JSON"), pending)
}

/// Pending jobs per pool from the outside: each job for the first pool (config order) that takes it.
fn first_takers(desired: &Desired, tasks: &[Task]) -> Vec<u32> {
    let kind = desired.ci.get(&CiName::new("wp")).map(|spec| &spec.kind);
    let mut pending = vec![0u32; desired.pools.len()];
    for task in tasks {
        if let Some(first) = desired.pools.iter().position(|pool| pool_takes(kind, pool, &task.labels, &task.demands)) {
            pending[first] += 1;
        }
    }
    pending
}

fn pools() -> impl Strategy<Value = Vec<PoolLabels>> {
    let label = (0..KEYS.len(), 0..POOL_VALUES.len(), prop::bool::weighted(0.2));
    // One label per key at most (a pool's labels are a map).
    let pool = prop::collection::vec(label, 0..4).prop_map(|mut labels: PoolLabels| {
        labels.sort_by_key(|label| label.0);
        labels.dedup_by_key(|label| label.0);
        labels
    });
    prop::collection::vec(pool, 1..5)
}

/// Label sets (key, value) and the jobs that carry them (by set), so sets repeat as in real queues.
fn queue() -> impl Strategy<Value = (Vec<Vec<(usize, usize)>>, Vec<(usize, bool)>)> {
    let set = prop::collection::vec((0..KEYS.len(), 0..VALUES.len()), 0..5);
    prop::collection::vec(set, 1..8).prop_flat_map(|sets| {
        let count = sets.len();
        (Just(sets), prop::collection::vec((0..count, any::<bool>()), 0..60))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Three stores of the same queue: every job's labels on their own, all through one interner (as a provider
    /// reads a queue), and a mix of both (some jobs sharing, others not). One plan for all three.
    #[test]
    fn interning_never_changes_the_plan(pools in pools(), (sets, jobs) in queue()) {
        let desired = load(&config(&pools));
        let pairs = |set: usize| sets[set].iter().map(|&(key, value)| (KEYS[key], VALUES[value]));
        let own: Vec<Task> = jobs.iter().enumerate().map(|(i, &(set, _))| task(i, pairs(set).collect())).collect();
        let mut interner = LabelInterner::new();
        let shared: Vec<Task> =
            jobs.iter().enumerate().map(|(i, &(set, _))| task(i, interner.labels(pairs(set)))).collect();
        let mut interner = LabelInterner::new();
        let mixed: Vec<Task> = jobs
            .iter()
            .enumerate()
            .map(|(i, &(set, share))| task(i, if share { interner.labels(pairs(set)) } else { pairs(set).collect() }))
            .collect();
        let takers = first_takers(&desired, &own);
        let expected = plan_of(&desired, &observed(own));
        prop_assert_eq!(&expected.1, &takers, "each job counted for the first pool that takes it");
        prop_assert_eq!(&plan_of(&desired, &observed(shared)), &expected, "interned");
        prop_assert_eq!(&plan_of(&desired, &observed(mixed)), &expected, "mixed");
    }
}

/// Queues longer than the planner's memory of label sets is kept for (it stops remembering sets in a queue where
/// few repeat): thousands of distinct sets before or after thousands of jobs of three shared sets. Counted from
/// the outside: pool `a` takes `platform: a` jobs, pool `b` takes `platform: b` jobs of repo `r1` only.
#[test]
fn long_queues_of_distinct_and_repeated_sets_count_the_same_shared_or_not() {
    let desired = load(
        "id: labels\nci:\n  wp: { kind: woodpecker, server: \"https://ci.example.com\", token: \"${T}\" }\n\
         backends:\n  b: { kind: fake }\npools:\n\
         \x20 - { name: a, ci: { source: wp, labels: { platform: a, repo: \"*\" } }, backend: { name: b }, agent: { image: a }, scale: { max: 10 } }\n\
         \x20 - { name: b, ci: { source: wp, labels: { platform: b, repo: r1 } }, backend: { name: b }, agent: { image: a }, scale: { max: 10 } }\n",
    );
    let distinct = |n: usize| {
        let platform = ["a", "b", "c"][n % 3];
        let repo = if n % 2 == 0 { "r1" } else { "r2" };
        [("platform", platform.to_owned()), ("repo", repo.to_owned()), ("woodpecker-ci.org/repo-id", n.to_string())]
    };
    let repeated = |n: usize| [("platform", ["a", "b", "b"][n % 3].to_owned()), ("repo", "r1".to_owned())];
    // Per pool: `distinct` jobs 0..6000 go to `a` when n % 3 == 0 and to `b` when n % 3 == 1 and n is even;
    // `repeated` jobs 0..6000 go to `a` a third of the time, to `b` otherwise.
    let expected = vec![2000 + 2000, 1000 + 4000];
    for distinct_first in [true, false] {
        let order: Vec<(bool, usize)> = if distinct_first {
            (0..6000).map(|n| (true, n)).chain((0..6000).map(|n| (false, n))).collect()
        } else {
            (0..6000).map(|n| (false, n)).chain((0..6000).map(|n| (true, n))).collect()
        };
        let labels = |interner: Option<&mut LabelInterner>, (is_distinct, n): (bool, usize)| {
            let pairs: Vec<(&str, String)> = if is_distinct { distinct(n).to_vec() } else { repeated(n).to_vec() };
            match interner {
                Some(interner) => interner.labels(pairs),
                None => pairs.into_iter().collect(),
            }
        };
        let own: Vec<Task> = order.iter().enumerate().map(|(i, &job)| task(i, labels(None, job))).collect();
        let mut interner = LabelInterner::new();
        let shared: Vec<Task> =
            order.iter().enumerate().map(|(i, &job)| task(i, labels(Some(&mut interner), job))).collect();
        let (own_plan, own_pending) = plan_of(&desired, &observed(own));
        let (shared_plan, shared_pending) = plan_of(&desired, &observed(shared));
        assert_eq!(own_pending, expected, "distinct first: {distinct_first}");
        assert_eq!(shared_pending, expected, "distinct first: {distinct_first}");
        assert!(shared_plan == own_plan, "the same plan (distinct first: {distinct_first})");
    }
}
