//! The oracle over random histories. `CISCALE_ORACLE_CASES` sets the number of histories (10,000 by default,
//! what CI runs); a failure prints the minimised history and, for the plan that broke a promise, the violations,
//! the changes, the truth and the observation.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRunner};

use super::scenario::{self, ConfigChange, PoolDraft, PoolMode, Promise, RefStyle, Scenario, Step, POOL_NAMES};
use super::world::BusySign;

/// Histories per run: `CISCALE_ORACLE_CASES`, else 10,000.
fn cases() -> u32 {
    std::env::var("CISCALE_ORACLE_CASES").ok().and_then(|value| value.parse().ok()).unwrap_or(10_000)
}

fn mask() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(u32::MAX), 1 => any::<u32>()]
}

fn pool_draft(create_only: bool) -> impl Strategy<Value = PoolDraft> {
    let mode = if create_only {
        Just(PoolMode::Create).boxed()
    } else {
        prop_oneof![
            6 => Just(PoolMode::Create),
            1 => (any::<bool>(), 0..3u8).prop_map(|(by_id, look)| PoolMode::Preregistered { by_id, look }),
            1 => (1..=2u8, prop_oneof![Just(RefStyle::SameName), Just(RefStyle::ByName), Just(RefStyle::ById)], 0..2u8, any::<bool>())
                .prop_map(|(adopted, refs, look, running)| PoolMode::StartStop { adopted, refs, look, running }),
        ]
        .boxed()
    };
    (
        0..POOL_NAMES.len(),
        0..2usize,
        0..=1u32,
        1..=3u32,
        0..=1u32,
        prop_oneof![Just(1u32), Just(5), Just(30)],
        prop_oneof![Just(2u32), Just(10)],
        (mode, prop::bool::weighted(0.2)),
    )
        .prop_map(
            |(name, platform, min, max, min_idle, idle_timeout_min, bootstrap_timeout_min, (mode, ephemeral))| {
                // Validation's bounds: a pre-registered agent serves one instance; an adopted pool has its instances.
                let max = match &mode {
                    PoolMode::Create => max,
                    PoolMode::Preregistered { .. } => 1,
                    PoolMode::StartStop { adopted, .. } => max.min(u32::from(*adopted)),
                };
                PoolDraft {
                    name,
                    platform,
                    min: min.min(max),
                    max,
                    min_idle,
                    idle_timeout_min,
                    bootstrap_timeout_min,
                    // Ephemeral agents are made by the pool; pre-registered and adopted ones are not.
                    ephemeral: ephemeral && mode == PoolMode::Create,
                    mode,
                }
            },
        )
}

fn cycle() -> impl Strategy<Value = Step> {
    (
        prop_oneof![2 => Just(0usize), 1 => Just(1usize)],
        prop_oneof![4 => Just(None), 1 => (0..8u8).prop_map(Some)],
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(who, crash, late, slow)| Step::Cycle { who, crash, late, slow })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, 1..=3u8).prop_map(|(platform, count)| Step::Jobs { platform, count }),
        5 => cycle(),
        3 => mask().prop_map(|mask| Step::CheckIn { mask }),
        3 => mask().prop_map(|mask| Step::TakeJobs { mask }),
        2 => any::<u8>().prop_map(|skip| Step::DrainedTakesJob { skip }),
        2 => mask().prop_map(|mask| Step::FinishJobs { mask }),
        2 => (prop_oneof![2 => Just(0usize), 1 => Just(1usize)], prop::bool::weighted(0.2))
            .prop_map(|(who, late)| Step::Finish { who, late }),
        3 => prop_oneof![Just(1i64), Just(3), Just(11), Just(31), Just(61)].prop_map(|minutes| Step::Advance { minutes }),
        2 => (0..7u8, any::<u8>(), any::<bool>(), 0..2usize)
            .prop_map(|(look, pick, standalone, platform)| Step::HandRegister { look, pick, standalone, platform }),
        2 => prop_oneof![
            1 => any::<u8>().prop_map(ConfigChange::RemovePool),
            2 => any::<u8>().prop_map(ConfigChange::BumpImage),
            1 => any::<u8>().prop_map(ConfigChange::LowerMax),
            1 => any::<u8>().prop_map(ConfigChange::RaiseMax),
        ]
        .prop_map(Step::Config),
        2 => Just(Step::SavePlan),
        2 => Just(Step::ApplySaved),
    ]
}

/// A short warm-up (jobs, a cycle of each deployment, agents checking in and taking jobs) that shrinking can drop.
fn warm_up() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..2usize).prop_map(|platform| Step::Jobs { platform, count: 2 }),
        (0..2usize).prop_map(|who| Step::Cycle { who, crash: None, late: false, slow: false }),
        Just(Step::CheckIn { mask: u32::MAX }),
        Just(Step::TakeJobs { mask: u32::MAX }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        0..scenario::OWNER_PAIRS.len(),
        prop::collection::vec(pool_draft(false), 1..=3),
        prop::collection::vec(pool_draft(true), 0..=2),
        prop_oneof![Just(BusySign::Both), Just(BusySign::Flag), Just(BusySign::Task)],
        any::<bool>(),
        prop::collection::vec(warm_up(), 0..=6),
        prop::collection::vec(step(), 0..=20),
    )
        .prop_map(|(owners, ours, theirs, busy_sign, keeps_terminated, warm, steps)| Scenario {
            owners,
            ours,
            theirs,
            busy_sign,
            keeps_terminated,
            steps: warm.into_iter().chain(steps).collect(),
        })
}

/// The promises judged: `CISCALE_ORACLE_PROMISES` (a comma-separated list of `ours`, `busy`, `max`, `late`), else
/// all. Narrowing helps to find the smallest history that breaks one promise while another is known broken.
fn promises() -> Vec<Promise> {
    match std::env::var("CISCALE_ORACLE_PROMISES") {
        Ok(list) if !list.trim().is_empty() => {
            let words: Vec<&str> = list.split(',').map(str::trim).collect();
            for word in &words {
                assert!(
                    Promise::ALL.iter().any(|promise| promise.word() == *word),
                    "CISCALE_ORACLE_PROMISES: unknown promise `{word}` (known: ours, busy, max, late)"
                );
            }
            Promise::ALL.into_iter().filter(|promise| words.contains(&promise.word())).collect()
        }
        _ => Promise::ALL.to_vec(),
    }
}

/// Every plan of `cases()` random histories keeps the promises (and the final plan of each is deterministic).
#[test]
fn every_plan_keeps_the_promises() {
    let config = Config {
        cases: cases(),
        // The named regression tests keep the counterexamples worth keeping; no files are written.
        failure_persistence: None,
        max_shrink_iters: 4096,
        // The histories need no cryptographic randomness; ChaCha cost a sixth of the run.
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    };
    let promises = promises();
    let mut runner = TestRunner::new(config);
    let total = std::cell::Cell::new(scenario::Judged::default());
    let result = runner.run(&scenario(), |scenario| {
        match scenario::run(&scenario, &promises) {
            Ok(judged) => {
                let sum = total.get();
                total.set(scenario::Judged {
                    plans: sum.plans + judged.plans,
                    late_applies: sum.late_applies + judged.late_applies,
                });
            }
            Err(failure) => return Err(TestCaseError::fail(failure.report)),
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    // A generator that stopped producing plans (or saved plans applied late) would pass vacuously.
    let total = total.get();
    eprintln!(
        "judged {} plans and {} saved plans applied late over {} histories",
        total.plans,
        total.late_applies,
        cases()
    );
    assert!(total.plans >= cases() as usize, "only {} plans judged over {} histories", total.plans, cases());
    if promises.contains(&Promise::LateApply) {
        assert!(
            total.late_applies >= (cases() as usize).div_ceil(100),
            "only {} saved plans applied late",
            total.late_applies
        );
    }
}

/// The generators build configs directly (see `scenario`); the config loader must read their YAML to the same
/// `Desired` (apart from the hash, which the loader takes over the document), or the oracle would judge configs
/// nobody can write.
#[test]
fn loads_like_the_config_loader() {
    let mut runner = TestRunner::new(Config { cases: 64, failure_persistence: None, ..Config::default() });
    let result = runner.run(&scenario(), |scenario| {
        for (yaml, built) in scenario::configs(&scenario) {
            let loaded = ciscale::config::load_str("safety.yaml", &yaml, &|_| Some("secret".to_owned()))
                .map_err(|error| TestCaseError::fail(format!("{error:?}\n{yaml}")))?;
            let loaded = ciscale::model::Desired { config_hash: built.config_hash.clone(), ..loaded };
            prop_assert_eq!(&loaded, &built, "{}", yaml);
        }
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}
