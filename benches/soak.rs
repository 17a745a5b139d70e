//! Soak run of the daemon: `ciscale watch` against the file-backed fake world with 50 pools, a steady stream of
//! jobs and 20 % of all provider calls failing, for `SOAK_SECS` seconds (default 600).
//!
//! Reports peak and final RSS of the daemon, its CPU time, cycle duration percentiles, how many cycles failed and
//! whether the daemon stayed up and stopped cleanly on SIGTERM. Run with `cargo bench --bench soak`
//! (`SOAK_SECS=60 cargo bench --bench soak` for a short one). A measurement, not a test: it asserts nothing about
//! speed, but exits non-zero if the daemon crashed or did not stop on SIGTERM.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciscale::model::FakeSpec;
use ciscale::providers::fake::{FakeWorld, Fault, FaultKind, Op};

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

fn main() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ciscale.yaml"), config()).expect("write config");
    let world = FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
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

    let started = Instant::now();
    let mut rss_at_one_minute = None;
    let mut peak_hwm = 0;
    let mut jobs = 0u64;
    let mut crashed = None;
    while started.elapsed() < Duration::from_secs(secs) {
        // A few jobs a second, for pools in turn, each running 1-4 s.
        for _ in 0..3 {
            let pool = jobs as usize % POOLS;
            world.push_task_for(
                BTreeMap::from([("pool".to_owned(), format!("p{pool}"))]),
                Duration::from_secs(1 + jobs % 4),
            );
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
