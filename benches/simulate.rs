//! Simulation benchmark: a 30-day trace of about 100,000 jobs over 10 pools (the `office-week` profile at 70
//! times its volume, seeded), on Hetzner (hourly billing, capacity errors) polled every 10 s.
//! Prints the jobs, the cycles planned, and the best wall time of 3 runs. Goal: under 10 s in release.
//!
//! Run with `cargo bench --bench simulate`. Plain `Instant`, no harness: the number that matters is one run.
//! `SIM_NO_SKIP=1` cycles through every poll tick and plans the whole config each time, instead of skipping idle
//! stretches and planning only the pools that can have changed (to see what that buys). `SIM_RUNS=1` runs once
//! (e.g. under `perf record`).

use std::time::{Duration, Instant};

use ciscale::simulate::synthetic::{templates_for, Profile, Synthetic};
use ciscale::simulate::{self, models, Candidate, Request};

const POOLS: usize = 10;
const DAYS: u32 = 30;
const VOLUME: f64 = 70.0;
const RUNS: usize = 3;

fn config() -> String {
    let mut yaml = String::from(
        r#"id: bench
pollInterval: 10s
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  hz: { kind: hcloud, token: "${T}", simulation: { capacityErrors: 0.02 } }
pools:
"#,
    );
    for pool in 0..POOLS {
        yaml.push_str(&format!(
            "  - name: pool{pool}\n    ci: {{ source: wp, labels: {{ platform: linux/p{pool} }} }}\n    \
             backend: {{ name: hz, machine: {{ serverType: \"cx22,cx32\", image: docker-ce }} }}\n    \
             scale: {{ max: 12, minIdle: {}, idleTimeout: 10m }}\n",
            pool % 2
        ));
    }
    yaml
}

fn main() {
    let yaml = config();
    let loaded = ciscale::config::load_str_with_simulation("bench.yaml", &yaml, &|_| Some("unused".to_owned()))
        .unwrap_or_else(|error| panic!("the bench config is valid: {error}"));
    let candidate = Candidate { name: "bench".into(), desired: loaded.desired, simulation: loaded.simulation };
    let (templates, skipped) = templates_for(&candidate.desired, None);
    assert!(skipped.is_empty(), "every pool gets jobs");
    let synthetic = Synthetic { days: DAYS, volume: VOLUME, ..Synthetic::new(Profile::OfficeWeek, 42) };
    let trace = synthetic.generate(&templates);
    let request = Request {
        candidates: vec![candidate],
        picus: false,
        trace,
        from: synthetic.start,
        until: synthetic.until(),
        seed: 42,
        flags: models::flag_overrides(&[], &[], &[]).unwrap_or_default(),
        series: false,
        skip_idle: std::env::var_os("SIM_NO_SKIP").is_none(),
        give_up_after: simulate::GIVE_UP_AFTER,
    };
    let mut best = Duration::MAX;
    let mut last = None;
    let runs: usize = std::env::var("SIM_RUNS").ok().and_then(|runs| runs.parse().ok()).unwrap_or(RUNS).max(1);
    for _ in 0..runs {
        let clock = Instant::now();
        let reports = simulate::run_all(&request);
        best = best.min(clock.elapsed());
        last = reports.into_iter().next();
    }
    let Some(run) = last else {
        return;
    };
    let total = run.total().summary();
    println!(
        "simulate: {} jobs, {} pools, {} days, {} cycles (of {} poll ticks), {} planner calls: best of {} {:.2} s (goal < 10 s)",
        request.trace.jobs.len(),
        POOLS,
        DAYS,
        run.cycles,
        u64::from(DAYS) * 86_400 / 10,
        run.plans,
        runs,
        best.as_secs_f64()
    );
    println!(
        "  result: wait p50 {:?} s, p95 {:?} s, agent hours {:.1}, busy hours {:.1}, creates {}, cost {:?}",
        total.wait_p50_s, total.wait_p95_s, total.agent_hours, total.busy_hours, total.creates, total.cost
    );
}
