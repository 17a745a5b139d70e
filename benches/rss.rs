//! Daemon memory: peak RSS (VmHWM) of the release `ciscale watch` binary against the in-repo HTTP fakes of
//! Woodpecker, Hetzner Cloud and Azure DevOps (tests/it/fakes), in two set-ups:
//!
//! 1. **Picus mode**: no config file, Picus's environment (`PICUS_PROVIDER_TYPE=hcloud`, a hand-registered agent),
//!    a job every few seconds, so servers are created, the agent is undrained, the job runs, the agent is drained
//!    and the server deleted, again and again (`PICUS_POLL_INTERVAL=1s`, `PICUS_MAX_IDLE_TIME=2s`).
//! 2. **10 pools on 3 backends and 2 CI sources**: a config file with a Woodpecker and an Azure Pipelines source,
//!    two Hetzner projects and the file-backed fake backend; jobs come and go in every pool, so every pool creates
//!    and deletes.
//!
//! Goal (issue #10): at most 13.7 MiB in both (Picus 0.8.2 measured 9.1 MiB on the same fake). Each set-up runs
//! `RSS_SECS` seconds (default 60); the figure is the daemon's own VmHWM from `/proc/<pid>/status`, read just
//! before it is stopped with SIGTERM. Run with `cargo bench --bench rss`.
//!
//! `MALLOC_*` and `TOKIO_*` variables of the bench's environment are passed on to the daemon (e.g.
//! `MALLOC_ARENA_MAX=1`, `TOKIO_WORKER_THREADS=1`), to try allocator and runtime settings without a rebuild.
//!
//! Measured on a quiet 2-core machine with the size-optimised release profile and the one-thread runtime: Picus
//! mode 13.0 MiB, 10 pools 13.5 MiB, twice each (before them: 15.4 and 15.6 MiB; with 3 threads 13.2 and 14.0).
//!
//! A measurement, not a test: it exits non-zero only when the daemon died or did not stop on SIGTERM.

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/fakes/mod.rs"]
mod fakes;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fakes::azure::AzureFake;
use fakes::hcloud::HcloudFake;
use fakes::woodpecker::{FakeWoodpecker, ADMIN_TOKEN};

use ciscale::model::FakeSpec;
use ciscale::providers::fake::FakeWorld;

const HCLOUD_TOKEN: &str = "hcloud-token-rss-bench";
const AZURE_PAT: &str = "azure-pat-rss-bench";

/// `(VmHWM, VmRSS, Threads, RssAnon, RssFile)` of a process, memory in KiB.
fn status(pid: u32) -> Option<(u64, u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines().find(|line| line.starts_with(name)).and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?, field("Threads:")?, field("RssAnon:")?, field("RssFile:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// SIGTERM, then wait (bounded) for a clean exit.
fn stop(mut child: Child) -> bool {
    drop(Command::new("kill").args(["-TERM", &child.id().to_string()]).status());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child.kill());
    false
}

struct Measured {
    peak_kib: u64,
    rss_kib: u64,
    threads: u64,
    /// Of `rss_kib`: heap, stacks and written data, and the binary's (and libraries') pages read from disk.
    anon_kib: u64,
    file_kib: u64,
    clean_stop: bool,
    /// What the daemon did meanwhile, so a figure from an idle daemon is not mistaken for one under work.
    activity: String,
}

/// Runs `drive` once a second for `secs` while the daemon runs, then reads its memory and stops it.
fn measure(mut child: Child, secs: u64, mut drive: impl FnMut(u64)) -> Measured {
    let pid = child.id();
    let started = Instant::now();
    let mut tick = 0;
    let mut last = (0, 0, 0, 0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        drive(tick);
        tick += 1;
        if let Ok(Some(exit)) = child.try_wait() {
            println!("CRASHED: the daemon exited by itself with {exit}");
            std::process::exit(1);
        }
        last = status(pid).unwrap_or(last);
        std::thread::sleep(Duration::from_secs(1));
    }
    let (peak_kib, rss_kib, threads, anon_kib, file_kib) = status(pid).unwrap_or(last);
    Measured { peak_kib, rss_kib, threads, anon_kib, file_kib, clean_stop: stop(child), activity: String::new() }
}

fn daemon(dir: &std::path::Path, env: &BTreeMap<String, String>, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .env("CISCALE_LOCK_DIR", dir.join("locks"))
        .env("NO_COLOR", "1")
        .envs(std::env::vars().filter(|(name, _)| name.starts_with("MALLOC_") || name.starts_with("TOKIO_")))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ciscale watch")
}

fn picus_mode(secs: u64) -> Measured {
    let woodpecker = FakeWoodpecker::start();
    let agent_id = woodpecker.add_agent("picus-agent");
    let (hetzner, _runtime) = HcloudFake::start_in_background(HCLOUD_TOKEN);
    let dir = tempfile::tempdir().expect("temp dir");
    let env: BTreeMap<String, String> = [
        ("PICUS_WOODPECKER_SERVER", woodpecker.url().as_str()),
        ("PICUS_WOODPECKER_TOKEN", ADMIN_TOKEN),
        ("PICUS_WOODPECKER_AGENT_ID", agent_id.to_string().as_str()),
        ("PICUS_AGENT_WOODPECKER_SERVER", "woodpecker.example.com:443"),
        ("PICUS_AGENT_WOODPECKER_AGENT_SECRET", "agent-secret-rss-bench"),
        ("PICUS_AGENT_WOODPECKER_FILTER_LABELS", "platform=linux/amd64,repo=*,org-id=*"),
        ("PICUS_PROVIDER_TYPE", "hcloud"),
        ("PICUS_HCLOUD_TOKEN", HCLOUD_TOKEN),
        ("PICUS_HCLOUD_SERVER_TYPE", "cx22"),
        ("PICUS_HCLOUD_ID", "rss-bench"),
        ("PICUS_POLL_INTERVAL", "1s"),
        ("PICUS_MAX_IDLE_TIME", "2s"),
        ("HCLOUD_ENDPOINT", hetzner.endpoint()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    let child = daemon(dir.path(), &env, &["watch"]);
    // One job at a time: pushed, taken once its server exists, finished two seconds later; the server then idles
    // for PICUS_MAX_IDLE_TIME and is deleted before the next job comes.
    let mut job: Option<(String, u64)> = None;
    let mut jobs = 0;
    let mut measured = measure(child, secs, |tick| match &job {
        None if hetzner.servers().is_empty() => {
            job = Some((woodpecker.add_task(&[("platform", "linux/amd64")]), tick));
            jobs += 1;
        }
        Some((task, since)) if woodpecker.pending().iter().any(|pending| &pending.id == task) => {
            if !hetzner.servers().is_empty() && tick > *since {
                woodpecker.start_task(task, agent_id);
            }
        }
        Some((task, since)) if tick >= since + 3 => {
            if woodpecker.running().iter().any(|running| &running.id == task) {
                woodpecker.finish_task(task);
            }
            job = None;
        }
        _ => {}
    });
    measured.activity = format!(
        "{jobs} jobs, {} servers created, {} deleted",
        hetzner.count("POST", "/servers"),
        hetzner.exchanges().iter().filter(|exchange| exchange.method == "DELETE").count()
    );
    measured
}

fn many_pools(secs: u64) -> Measured {
    let woodpecker = FakeWoodpecker::start();
    // The CI's own agent, which "runs" the jobs the bench takes off the queue again.
    let somebody = woodpecker.add_agent("someone-elses-agent");
    let azure = AzureFake::start(AZURE_PAT);
    let (hetzner_a, _runtime_a) = HcloudFake::start_in_background(HCLOUD_TOKEN);
    let (hetzner_b, _runtime_b) = HcloudFake::start_in_background(HCLOUD_TOKEN);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = format!(
        "id: rss\npollInterval: 1s\nci:\n  wp: {{ kind: woodpecker, server: \"{}\", token: \"${{WP_TOKEN}}\" }}\n  \
         azure: {{ kind: azure-pipelines, organizationUrl: \"{}\", pat: \"${{AZP_TOKEN}}\" }}\nbackends:\n  \
         hetzner-a: {{ kind: hcloud, token: \"${{HCLOUD_TOKEN}}\", endpoint: \"{}\" }}\n  \
         hetzner-b: {{ kind: hcloud, token: \"${{HCLOUD_TOKEN}}\", endpoint: \"{}\" }}\n  \
         sim: {{ kind: fake, stateFile: world.json }}\npools:\n",
        woodpecker.url(),
        azure.org_url(),
        hetzner_a.endpoint(),
        hetzner_b.endpoint()
    );
    let scale = "scale: { max: 2, idleTimeout: 5s, bootstrapTimeout: 8s }";
    for index in 0..6 {
        let backend = if index % 2 == 0 { "hetzner-a" } else { "hetzner-b" };
        config.push_str(&format!(
            "  - {{ name: wp{index}, ci: {{ source: wp, labels: {{ platform: p{index} }} }}, backend: {{ name: {backend}, \
             machine: {{ serverType: cx22, image: docker-ce, location: fsn1 }} }}, {scale} }}\n"
        ));
    }
    for index in 0..4 {
        azure.add_pool(&format!("pool{index}"));
        config.push_str(&format!(
            "  - {{ name: az{index}, ci: {{ source: azure, azurePool: pool{index} }}, backend: {{ name: sim }}, \
             agent: {{ image: azure-agent }}, {scale} }}\n"
        ));
    }
    std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
    let env: BTreeMap<String, String> =
        [("WP_TOKEN", ADMIN_TOKEN), ("AZP_TOKEN", AZURE_PAT), ("HCLOUD_TOKEN", HCLOUD_TOKEN)]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
    let child = daemon(dir.path(), &env, &["watch", "-c", "ciscale.yaml"]);
    // Every second a job in the next pool; each leaves the queue 4 s later. Pools create for them, then delete
    // what no agent ever registered on (bootstrap timeout) or what idles.
    let mut woodpecker_jobs: Vec<(String, u64)> = Vec::new();
    let mut azure_jobs: Vec<(u64, u64)> = Vec::new();
    let mut measured = measure(child, secs, |tick| {
        let pool = tick % 10;
        if pool < 6 {
            woodpecker_jobs.push((woodpecker.add_task(&[("platform", &format!("p{pool}"))]), tick));
        } else {
            azure_jobs.push((azure.add_request(&format!("pool{}", pool - 6), &[]), tick));
        }
        woodpecker_jobs.retain(|(task, pushed)| {
            let done = tick >= pushed + 4;
            if done {
                woodpecker.start_task(task, somebody);
                woodpecker.finish_task(task);
            }
            !done
        });
        azure_jobs.retain(|(request, pushed)| {
            let done = tick >= pushed + 4;
            if done {
                azure.finish(*request, "canceled");
            }
            !done
        });
    });
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .map(|world| world.snapshot().counters.instances)
            .unwrap_or_default();
    measured.activity = format!(
        "servers created: {} + {} on the two Hetzner projects, {world} containers on the fake backend",
        hetzner_a.count("POST", "/servers"),
        hetzner_b.count("POST", "/servers")
    );
    measured
}

fn main() {
    let secs: u64 = std::env::var("RSS_SECS").ok().and_then(|text| text.parse().ok()).unwrap_or(60);
    let mut clean = true;
    for (name, run) in
        [("picus mode (hcloud)", picus_mode as fn(u64) -> Measured), ("10 pools, 3 backends, 2 ci sources", many_pools)]
    {
        let measured = run(secs);
        println!(
            "{name}: peak RSS {:.1} MiB (VmHWM), {:.1} MiB at the end ({:.1} anonymous, {:.1} file-backed), {} \
             threads; {secs}s ({}); {}",
            mib(measured.peak_kib),
            mib(measured.rss_kib),
            mib(measured.anon_kib),
            mib(measured.file_kib),
            measured.threads,
            measured.activity,
            if measured.clean_stop { "stopped cleanly on SIGTERM" } else { "did NOT stop cleanly on SIGTERM" }
        );
        clean &= measured.clean_stop;
    }
    if !clean {
        std::process::exit(1);
    }
}
