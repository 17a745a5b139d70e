//! Soak run of the daemon: `ciscale watch` against the file-backed fake world with 50 pools, a steady stream of
//! jobs and 20 % of all provider calls failing, for `SOAK_SECS` seconds (default 600).
//!
//! Reports peak and final RSS of the daemon, its CPU time, cycle duration percentiles, how many cycles failed,
//! whether the daemon stayed up and stopped cleanly on SIGTERM, and the reaction time per job:
//!
//! - **job → create call**: from the moment a job is pushed into the queue to the create call that adds an
//!   agent for it. Creates are matched to jobs first come, first served per pool: a create at `t` serves the
//!   oldest job of its pool pushed before `t` that no agent had taken by `t` and no earlier create served. Jobs an
//!   existing agent took without any create (warm capacity, `minIdle`) are counted apart, and creates with no
//!   waiting job (`minIdle` refills) serve nobody. The create call's time is the fake instance's creation time,
//!   which the fake stamps when the (successful) call reaches it.
//!   Of that, **cycle → create call**: from the start of the cycle that made the create (the last one that started
//!   before the call) to the call: observing, planning, registering the agent and the create itself with its
//!   retries. The rest is waiting for a cycle to see the job.
//! - **job → agent serving**: from the push to the moment an agent took the job (the fake CI's `started_at`).
//!
//! `SOAK_EXPLAIN=N` prints, for the N slowest jobs → create call, every cycle between the push and the create:
//! what it started, what waited, and the job's pool as that cycle planned it.
//!
//! Both are read from the fake world, which the bench samples every 100 ms (instances and tasks are short-lived,
//! but live for seconds: nothing is missed). Run with `cargo bench --bench soak` (`SOAK_SECS=60 cargo bench
//! --bench soak` for a short one). A measurement, not a test: it asserts nothing about speed, but exits non-zero
//! if the daemon crashed or did not stop on SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciscale::model::{FakeSpec, InstanceId, TaskId, POOL_LABEL};
use ciscale::providers::fake::{FakeWorld, Fault, FaultKind, Op};
use jiff::Timestamp;

const POOLS: usize = 50;

fn config() -> String {
    let mut text = String::from(
        "id: soak\npollInterval: 1s\nci:\n  sim: { kind: fake, stateFile: world.json, simulate: true }\n\
         backends:\n  sim: { kind: fake, stateFile: world.json }\npools:\n",
    );
    for pool in 0..POOLS {
        text.push_str(&format!(
            "  - name: p{pool}\n    ci: {{ source: sim, labels: {{ pool: p{pool} }} }}\n    \
             backend: {{ name: sim, machine: {{ serverType: small }} }}\n    \
             scale: {{ max: 3, minIdle: {}, idleTimeout: 5s, bootstrapTimeout: 1m }}\n",
            pool % 2
        ));
    }
    text
}

/// (VmRSS, VmHWM) in KiB, and user+system CPU seconds of a process.
fn sample(pid: u32) -> Option<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find(|line| line.starts_with(name)).and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((field("VmRSS:")?, field("VmHWM:")?, ticks / 100.0))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A job the bench pushed: when and for which pool.
struct Job {
    id: TaskId,
    pool: String,
    pushed: Timestamp,
}

/// What the sampler saw of the fake world: every instance's pool and creation time, every job's start.
#[derive(Default)]
struct Seen {
    creates: BTreeMap<InstanceId, (String, Timestamp)>,
    started: BTreeMap<TaskId, Timestamp>,
}

impl Seen {
    fn sample(&mut self, world: &FakeWorld) {
        let state = world.snapshot();
        for instance in &state.instances {
            self.creates
                .entry(instance.id.clone())
                .or_insert_with(|| (instance.labels.get(POOL_LABEL).cloned().unwrap_or_default(), instance.created_at));
        }
        for task in &state.tasks {
            if let Some(started) = task.started_at {
                self.started.entry(task.id.clone()).or_insert(started);
            }
        }
    }
}

/// Reaction times in milliseconds (see the module docs for how creates are matched to jobs).
#[derive(Default)]
struct Reactions {
    to_create: Vec<u64>,
    /// The create calls that served a job, for [`cycle_to_create`].
    serving_creates: Vec<Timestamp>,
    /// (pool, job pushed, create call) of every job served by a create, for `SOAK_EXPLAIN`.
    served: Vec<(String, Timestamp, Timestamp)>,
    to_serving: Vec<u64>,
    /// Taken by an agent that existed already: no create was needed.
    warm: usize,
    /// Never taken before the end of the run.
    unserved: usize,
}

fn millis_between(from: Timestamp, to: Timestamp) -> u64 {
    u64::try_from(to.duration_since(from).as_millis()).unwrap_or(0)
}

fn reactions(jobs: &[Job], seen: &Seen) -> Reactions {
    let mut creates: BTreeMap<&str, Vec<Timestamp>> = BTreeMap::new();
    for (pool, at) in seen.creates.values() {
        creates.entry(pool.as_str()).or_default().push(*at);
    }
    let mut by_pool: BTreeMap<&str, Vec<&Job>> = BTreeMap::new();
    for job in jobs {
        by_pool.entry(job.pool.as_str()).or_default().push(job);
    }
    let mut out = Reactions::default();
    for (pool, pool_jobs) in by_pool {
        let mut served = vec![false; pool_jobs.len()];
        let mut pool_creates = creates.remove(pool).unwrap_or_default();
        pool_creates.sort();
        for created in pool_creates {
            let waiting = pool_jobs.iter().enumerate().position(|(index, job)| {
                !served[index]
                    && job.pushed <= created
                    && seen.started.get(&job.id).is_none_or(|started| *started >= created)
            });
            if let Some(index) = waiting {
                served[index] = true;
                out.to_create.push(millis_between(pool_jobs[index].pushed, created));
                out.serving_creates.push(created);
                out.served.push((pool.to_owned(), pool_jobs[index].pushed, created));
            }
        }
        for (index, job) in pool_jobs.iter().enumerate() {
            match seen.started.get(&job.id) {
                Some(started) => {
                    out.to_serving.push(millis_between(job.pushed, *started));
                    if !served[index] {
                        out.warm += 1;
                    }
                }
                None => out.unserved += 1,
            }
        }
    }
    out.to_create.sort_unstable();
    out.to_serving.sort_unstable();
    out
}

/// For each create call, the time since the start of the last cycle that started before it (`starts` sorted).
fn cycle_to_create(creates: &[Timestamp], starts: &[Timestamp]) -> Vec<u64> {
    let mut out: Vec<u64> = creates
        .iter()
        .filter_map(|created| {
            let before = starts.partition_point(|start| start <= created);
            before.checked_sub(1).map(|index| millis_between(starts[index], *created))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The cycles from a job's push to the create that served it, for the `count` slowest (see the module docs).
fn explain(reaction: &Reactions, reports: &[serde_json::Value], count: usize) {
    let mut slowest: Vec<&(String, Timestamp, Timestamp)> = reaction.served.iter().collect();
    slowest.sort_by_key(|(_, pushed, created)| std::cmp::Reverse(millis_between(*pushed, *created)));
    for (pool, pushed, created) in slowest.into_iter().take(count) {
        println!("job of {pool} pushed {pushed}: create call after {} ms", millis_between(*pushed, *created));
        for report in reports {
            let Some(started) = report["started_at"].as_str().and_then(|at| at.parse::<Timestamp>().ok()) else {
                continue;
            };
            if started < *pushed - jiff::SignedDuration::from_secs(1) || started > *created {
                continue;
            }
            let status =
                report["pools"].as_array().and_then(|pools| pools.iter().find(|status| status["pool"] == *pool));
            println!(
                "  cycle {} at {:+} ms, {} ms: started {} in_flight {} waiting {} held_back {} error {} | {pool}: {}",
                report["cycle"],
                started.duration_since(*pushed).as_millis(),
                report["duration_ms"],
                report["started"],
                report["in_flight"],
                report["waiting"].as_u64().unwrap_or(0),
                report["held_back"].as_u64().unwrap_or(0),
                report.get("error").map_or("-".to_owned(), ToString::to_string),
                status.map_or("not planned".to_owned(), ToString::to_string)
            );
        }
    }
}

fn percentiles(sorted: &[u64]) -> String {
    format!(
        "p50 {} p95 {} p99 {} max {}",
        percentile(sorted, 0.5),
        percentile(sorted, 0.95),
        percentile(sorted, 0.99),
        sorted.last().copied().unwrap_or(0)
    )
}

fn main() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ciscale.yaml"), config()).expect("write config");
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open world");
    world.set_price("small", ciscale::model::Price { hourly: 0.01, currency: "EUR".to_owned() });
    // Every 5th provider call fails: 20 % faults, spread over every operation.
    world.inject(Fault::every_nth(Op::Any, FaultKind::Unavailable5xx, 5, u32::MAX));

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .args(["watch", "--json", "-q", "-c", "ciscale.yaml"])
        .env("CISCALE_LOCK_DIR", dir.path().join("locks"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ciscale watch");
    let pid = daemon.id();
    let reports = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = {
        let reports = reports.clone();
        let stdout = daemon.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(report) = serde_json::from_str(&line) {
                    reports.lock().expect("reports").push(report);
                }
            }
        })
    };

    // The sampler: every 100 ms, what the world holds.
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let world = world.clone();
        let stop = stop_sampling.clone();
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.sample(&world);
                std::thread::sleep(Duration::from_millis(100));
            }
            seen.sample(&world);
            seen
        })
    };

    let started = Instant::now();
    let mut pushed: Vec<Job> = Vec::new();
    let mut rss_at_one_minute = None;
    let mut peak_hwm = 0;
    let mut jobs = 0u64;
    let mut crashed = None;
    while started.elapsed() < Duration::from_secs(secs) {
        // A few jobs a second, for pools in turn, each running 1-4 s.
        for _ in 0..3 {
            let pool = format!("p{}", jobs as usize % POOLS);
            // Stamped before the push: the daemon cannot see the job any earlier.
            let at = Timestamp::now();
            let id = world
                .push_task_for(BTreeMap::from([("pool".to_owned(), pool.clone())]), Duration::from_secs(1 + jobs % 4));
            pushed.push(Job { id, pool, pushed: at });
            jobs += 1;
        }
        if let Some((rss, hwm, _)) = sample(pid) {
            peak_hwm = peak_hwm.max(hwm);
            if rss_at_one_minute.is_none() && started.elapsed() >= Duration::from_secs(60.min(secs / 2)) {
                rss_at_one_minute = Some(rss);
            }
        }
        if let Ok(Some(status)) = daemon.try_wait() {
            crashed = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let end_sample = sample(pid);
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.join().expect("sampler");

    let stop_started = Instant::now();
    drop(Command::new("kill").args(["-TERM", &pid.to_string()]).status());
    let mut stopped = None;
    while stop_started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(status)) = daemon.try_wait() {
            stopped = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if stopped.is_none() {
        drop(daemon.kill());
    }
    drop(reader.join());

    let reports = reports.lock().expect("reports");
    let mut durations: Vec<u64> = reports.iter().filter_map(|r| r["duration_ms"].as_u64()).collect();
    durations.sort_unstable();
    // Time between the starts of consecutive cycles.
    let starts: Vec<Timestamp> = reports.iter().filter_map(|r| r["started_at"].as_str()?.parse().ok()).collect();
    let mut gaps: Vec<u64> = starts.windows(2).map(|pair| millis_between(pair[0], pair[1])).collect();
    gaps.sort_unstable();
    let failed_cycles = reports.iter().filter(|r| r.get("error").is_some()).count();
    let failed_changes: u64 = reports.iter().filter_map(|r| r["failed"].as_u64()).sum();
    let applied_changes: u64 = reports.iter().filter_map(|r| r["applied"].as_u64()).sum();
    let state = world.snapshot();

    println!("soak: {secs}s, {POOLS} pools, 20% injected provider faults, {jobs} jobs pushed");
    println!(
        "cycles: {} ({} failed to observe), changes applied {applied_changes}, failed {failed_changes}",
        reports.len(),
        failed_cycles
    );
    println!(
        "cycle duration ms: p50 {} p90 {} p99 {} max {}",
        percentile(&durations, 0.5),
        percentile(&durations, 0.9),
        percentile(&durations, 0.99),
        durations.last().copied().unwrap_or(0)
    );
    println!("cycle start to next cycle start ms: {}", percentiles(&gaps));
    let reaction = reactions(&pushed, &seen);
    println!(
        "job -> create call ms ({} jobs waited for a create): {}",
        reaction.to_create.len(),
        percentiles(&reaction.to_create)
    );
    println!(
        "  of which cycle start -> create call ms: {}",
        percentiles(&cycle_to_create(&reaction.serving_creates, &starts))
    );
    println!(
        "job -> agent serving ms ({} jobs taken, {} of them by an agent that existed already; {} never taken): {}",
        reaction.to_serving.len(),
        reaction.warm,
        reaction.unserved,
        percentiles(&reaction.to_serving)
    );
    // The goals at 20 % faults, for a poll interval of 1 s (the config above).
    let (cycle_p99, create_p99) = (percentile(&durations, 0.99), percentile(&reaction.to_create, 0.99));
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "goals: cycle p99 {cycle_p99} ms <= 2 x poll interval (2000 ms): {}; job -> create call p99 {create_p99} ms \
         <= poll interval + 1 s (2000 ms): {}",
        verdict(cycle_p99 <= 2000),
        verdict(create_p99 <= 2000)
    );
    if let Some(count) = std::env::var("SOAK_EXPLAIN").ok().and_then(|n| n.parse().ok()) {
        explain(&reaction, &reports, count);
    }
    let pools_seen: BTreeSet<&str> = seen.creates.values().map(|(pool, _)| pool.as_str()).collect();
    println!("instances created: {} in {} pools", seen.creates.len(), pools_seen.len());
    if let Some((rss, hwm, cpu)) = end_sample {
        println!(
            "daemon RSS: {:.1} MiB at ~1 min, {:.1} MiB at the end, peak {:.1} MiB; CPU time {cpu:.1}s ({:.1}% of one core)",
            rss_at_one_minute.unwrap_or(rss) as f64 / 1024.0,
            rss as f64 / 1024.0,
            hwm.max(peak_hwm) as f64 / 1024.0,
            cpu * 100.0 / secs as f64
        );
    }
    let active = state.instances.iter().filter(|instance| instance.state.is_active()).count();
    println!(
        "world at the end: {active} active instances, {} agents, {} jobs left",
        state.agents.len(),
        state.tasks.len()
    );
    match (crashed, stopped) {
        (Some(status), _) => {
            println!("CRASHED: the daemon exited by itself with {status}");
            std::process::exit(1);
        }
        (None, Some(status)) if status.success() => {
            println!("stopped cleanly on SIGTERM in {} ms", stop_started.elapsed().as_millis());
        }
        (None, other) => {
            println!("did NOT stop cleanly on SIGTERM: {other:?}");
            std::process::exit(1);
        }
    }
}
