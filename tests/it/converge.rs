//! Plan → apply → plan on the fake providers: whatever the queue and pool settings, applying the plan and planning
//! again converges to `No changes.` (a scale-up in one round; drain-then-delete takes its second round), never
//! passes `max`, and never repeats a create.

use std::collections::BTreeMap;

use proptest::prelude::*;

use ciscale::apply::{self, ApplyOptions, NoProgress};
use ciscale::model::{BackendName, CiName, Desired};
use ciscale::plan::{self, Action};
use ciscale::providers::fake::FakeWorld;
use ciscale::providers::Providers;

#[derive(Debug, Clone)]
struct PoolCase {
    label: &'static str,
    min: u32,
    max: u32,
    min_idle: u32,
    jobs_per_agent: u32,
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    (prop::sample::select(vec!["linux", "arm", "gpu"]), 0u32..=1, 1u32..=4, 0u32..=2, 1u32..=3).prop_map(
        |(label, min, max, min_idle, jobs_per_agent)| PoolCase {
            label,
            min: min.min(max),
            max,
            min_idle: min_idle.min(max),
            jobs_per_agent,
        },
    )
}

fn config(pools: &[PoolCase]) -> String {
    let mut text = String::from("id: prop\nci:\n  sim: { kind: fake }\nbackends:\n  sim: { kind: fake }\npools:\n");
    for (index, pool) in pools.iter().enumerate() {
        text.push_str(&format!(
            "  - name: p{index}\n    ci: {{ source: sim, labels: {{ platform: {} }} }}\n    backend: {{ name: sim, machine: {{ serverType: small }} }}\n    agent: {{ image: a }}\n    scale: {{ min: {}, max: {}, minIdle: {}, jobsPerAgent: {}, idleTimeout: 0s }}\n",
            pool.label, pool.min, pool.max, pool.min_idle, pool.jobs_per_agent
        ));
    }
    text
}

fn load(text: &str) -> Desired {
    ciscale::config::load_str("prop.yaml", text, &|_| None).expect("generated config is valid")
}

fn providers(world: &FakeWorld) -> Providers {
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), std::sync::Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), std::sync::Arc::new(world.ci()));
    providers
}

async fn observe_and_plan(desired: &Desired, providers: &Providers, world: &FakeWorld) -> plan::Plan {
    let now = world.snapshot().now.unwrap_or_else(jiff::Timestamp::now);
    let observed = ciscale::observe::observe(desired, providers, now).await.expect("fake observation");
    plan::plan(desired, &observed, observed.observed_at)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn applying_the_plan_converges(
        pools in prop::collection::vec(pool_case(), 1..=3),
        tasks in prop::collection::vec(prop::sample::select(vec!["linux", "arm", "gpu", "windows"]), 0..8),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let desired = load(&config(&pools));
            let world = FakeWorld::new();
            world.set_now("2026-01-01T12:00:00Z".parse().expect("timestamp"));
            for platform in &tasks {
                world.push_task(BTreeMap::from([("platform".to_owned(), (*platform).to_owned())]));
            }
            let providers = providers(&world);
            let options = ApplyOptions { poll: std::time::Duration::from_millis(1), ..ApplyOptions::default() };
            let (_never, cancel) = tokio::sync::watch::channel(false);

            let mut created = std::collections::BTreeSet::new();
            let mut rounds = 0;
            loop {
                let plan = observe_and_plan(&desired, &providers, &world).await;
                if !plan.has_changes() {
                    break;
                }
                rounds += 1;
                prop_assert!(rounds <= 3, "no convergence after 3 rounds; still planning:\n{}",
                    plan::render::render_human(&plan, &plan::render::RenderOptions { color: false }));
                for change in plan.changes.iter().filter(|change| change.action == Action::Create) {
                    let name = change.instance.as_ref().map(|instance| instance.name.clone()).unwrap_or_default();
                    prop_assert!(created.insert(name.clone()), "`{name}` created twice");
                }
                let report = apply::apply(&plan, &desired, &providers, &options, &NoProgress, &cancel).await;
                prop_assert_eq!(report.failed(), 0, "{:?}", report.outcomes);

                for (index, pool) in pools.iter().enumerate() {
                    let active = world.snapshot().instances.iter()
                        .filter(|instance| instance.state.is_active())
                        .filter(|instance| instance.labels.get("ciscale.pool").map(String::as_str) == Some(&format!("p{index}")))
                        .count();
                    prop_assert!(active <= pool.max as usize, "pool p{index}: {active} active > max {}", pool.max);
                }
            }
            Ok(())
        })?;
    }
}
