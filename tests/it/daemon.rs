//! `watch` as a daemon: create throttling and circuit breakers, `Retry-After` between cycles, SIGHUP reloads,
//! API economy (calls per cycle whatever the pool count), shell completions and the man page.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Lines, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ciscale::apply::ApplyOptions;
use ciscale::model::{BackendName, CiName, Desired, GoDuration};
use ciscale::providers::fake::{FakeWorld, Fault, FaultKind, Op};
use ciscale::providers::Providers;
use ciscale::watch::metrics::{self, Metrics};
use ciscale::watch::{self, CycleReport, WatchOptions};

use crate::cli::{ciscale, run, stderr, stdout, Sandbox};

fn linux() -> BTreeMap<String, String> {
    BTreeMap::from([("platform".to_owned(), "linux".to_owned())])
}

fn load(yaml: &str) -> Desired {
    ciscale::config::load_str("daemon.yaml", yaml, &|_| None).expect("valid config")
}

fn providers(world: &FakeWorld) -> Providers {
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(world.ci()));
    providers
}

/// Runs `cycles` cycles of the loop with a short poll interval and returns their reports.
async fn run_cycles(
    desired: &Desired,
    providers: &Providers,
    cycles: u64,
    metrics: Option<&Arc<Metrics>>,
) -> Vec<CycleReport> {
    let options = WatchOptions {
        cycles: Some(cycles),
        // The backoff after failed cycles stays short: the tests count cycles, not seconds.
        max_backoff: Duration::from_millis(50),
        apply: ApplyOptions { poll: Duration::from_millis(1), ..ApplyOptions::default() },
    };
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let mut desired = desired.clone();
    desired.poll_interval = GoDuration(Duration::from_millis(10));
    let mut reports = Vec::new();
    watch::run(&desired, providers, &options, &cancel, |report| {
        if let Some(metrics) = metrics {
            metrics.record_cycle(report);
        }
        reports.push(report.clone());
    })
    .await;
    reports
}

fn notes(report: &CycleReport) -> Vec<String> {
    report.pools.iter().flat_map(|status| status.notes.clone()).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Throttling
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_create_rate_holds_creates_back_for_later_cycles() {
    // Five jobs want five agents; the backend allows a burst of 2 and then one create an hour.
    let desired = load(
        r#"
id: rate
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake, createRate: 1/h, createBurst: 2 } }
pools:
  - { name: linux, ci: { source: sim, labels: { platform: linux } }, backend: { name: sim }, scale: { max: 5 } }
"#,
    );
    let world = FakeWorld::new();
    for _ in 0..5 {
        world.push_task(linux());
    }
    let reports = run_cycles(&desired, &providers(&world), 3, None).await;

    assert_eq!(world.calls(Op::Create), 2, "the burst, then nothing within the hour");
    assert_eq!(reports[0].planned.create, 2, "the report counts what is applied: {:?}", reports[0]);
    assert_eq!(reports[0].held_back, 3);
    assert_eq!(reports[1].held_back, 3, "still wanted, still held back");
    assert_eq!(reports[1].applied, 0);
    let note = notes(&reports[1]).join("\n");
    assert!(note.contains("3 creates held back by backend `sim`'s create rate 1/h (burst 2)"), "{note}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_stops_creating_after_failed_creates_and_says_so() {
    let desired = load(
        r#"
id: breaker
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake } }
pools:
  - name: linux
    ci: { source: sim, labels: { platform: linux } }
    backend: { name: sim }
    scale: { max: 2, breakerThreshold: 2, breakerCooldown: 1h }
"#,
    );
    let world = FakeWorld::new();
    world.push_task(linux());
    world.push_task(linux());
    // No capacity, for ever: capacity errors are not retried within an apply, so each create fails once.
    world.inject(Fault::new(Op::Create, FaultKind::Capacity, u32::MAX));
    let shared = Arc::new(Metrics::new(Duration::from_secs(3600)));
    let address = metrics::serve("127.0.0.1:0".parse().expect("address"), shared.clone()).await.expect("listen");
    let reports = run_cycles(&desired, &metrics::instrument(&providers(&world), &shared), 3, Some(&shared)).await;

    assert_eq!(reports[0].failed_by_action.get("create"), Some(&2), "{:?}", reports[0]);
    assert_eq!(reports[0].circuits_open, [ciscale::model::PoolName::new("linux")]);
    assert_eq!(world.calls(Op::Create), 2, "no create once the circuit is open");
    for report in &reports[1..] {
        assert_eq!(report.held_back, 2, "{report:?}");
        let note = notes(report).join("\n");
        assert!(
            note.contains("circuit open after 2 failed creates in a row: 2 creates held back; retrying at "),
            "{note}"
        );
    }

    let text = tokio::task::spawn_blocking(move || scrape(address)).await.expect("scrape");
    assert!(text.lines().any(|line| line == r#"ciscale_circuit_open{pool="linux"} 1"#), "{text}");
    assert!(text.lines().any(|line| line == "ciscale_creates_held_back_total 4"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_observation_delays_the_next_cycle_by_its_retry_after() {
    let desired = load(
        r#"
id: limited
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake } }
pools:
  - { name: linux, ci: { source: sim }, backend: { name: sim } }
"#,
    );
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::CiObserve, FaultKind::RateLimited { retry_after: Some(Duration::from_secs(7)) }, 1));
    let mut options = WatchOptions { cycles: Some(1), ..WatchOptions::default() };
    options.max_backoff = Duration::from_secs(300);
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let mut reports = Vec::new();
    watch::run(&desired, &providers(&world), &options, &cancel, |report| reports.push(report.clone())).await;
    let report = &reports[0];
    assert!(report.error.as_deref().is_some_and(|error| error.contains("rate limited")), "{report:?}");
    assert_eq!(report.retry_after_secs, Some(7.0));
    assert!(report.next_in_secs >= 7.0, "waits at least the Retry-After: {report:?}");
}

fn scrape(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------------
// API economy
// ---------------------------------------------------------------------------------------------------------------

fn pools_config(pools: usize) -> Desired {
    let mut yaml = "id: economy\nci: { sim: { kind: fake } }\nbackends: { sim: { kind: fake } }\npools:\n".to_owned();
    for index in 0..pools {
        yaml.push_str(&format!(
            "  - {{ name: pool-{index}, ci: {{ source: sim, labels: {{ platform: p{index} }} }}, backend: {{ name: sim }}, scale: {{ max: 2 }} }}\n"
        ));
    }
    load(&yaml)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_backend_and_one_ci_observation_per_idle_cycle_whatever_the_pool_count() {
    for pools in [1, 10, 50] {
        let desired = pools_config(pools);
        assert_eq!(desired.pools.len(), pools);
        let world = FakeWorld::new();
        let shared = Arc::new(Metrics::new(Duration::from_secs(3600)));
        let reports = run_cycles(&desired, &metrics::instrument(&providers(&world), &shared), 3, Some(&shared)).await;
        assert!(reports.iter().all(|report| report.error.is_none() && report.planned.create == 0), "{reports:?}");

        // Every call the fakes saw, by operation: nothing but the two observations, once per cycle each.
        let calls = world.snapshot().calls;
        let expected = BTreeMap::from([("backend.observe".to_owned(), 3), ("ci.observe".to_owned(), 3)]);
        assert_eq!(calls, expected, "{pools} pool(s)");
        // The instrumented providers count the same.
        let text = shared.encode();
        for line in [
            r#"ciscale_api_calls_total{provider="sim",kind="fake",operation="observe",result="ok"} 6"#,
            "ciscale_cycles_total 3",
        ] {
            assert!(text.lines().any(|seen| seen == line), "{pools} pool(s): no `{line}` in\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_cycle_still_observes_each_provider_once() {
    // 10 pools with work: creates add their own calls, but the observation stays one per provider and cycle.
    let desired = pools_config(10);
    let world = FakeWorld::new();
    for index in 0..10 {
        world.push_task(BTreeMap::from([("platform".to_owned(), format!("p{index}"))]));
    }
    let reports = run_cycles(&desired, &providers(&world), 2, None).await;
    assert_eq!(reports[0].planned.create, 10, "{:?}", reports[0]);
    assert_eq!(world.calls(Op::BackendObserve), 2);
    assert_eq!(world.calls(Op::CiObserve), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// SIGHUP
// ---------------------------------------------------------------------------------------------------------------

struct Watching {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Watching {
    fn start(sandbox: &Sandbox) -> Self {
        let log = std::fs::File::create(sandbox.path("watch.log")).expect("log file");
        let mut child = sandbox
            .command(&["watch", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start watch");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    fn next_cycle(&mut self) -> serde_json::Value {
        let line = self.lines.next().expect("another cycle").expect("readable");
        serde_json::from_str(&line).expect("a JSON cycle report")
    }

    fn signal(&self, name: &str) {
        let sent =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(sent.success());
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

fn desired_agents(cycle: &serde_json::Value) -> u64 {
    cycle["pools"][0]["desired"].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn sighup_reloads_a_valid_config_and_keeps_the_last_good_one_otherwise() {
    let sandbox = Sandbox::new("{ max: 1 }");
    for _ in 0..3 {
        // Jobs that run for an hour keep the demand at three for the whole test.
        sandbox.world().push_task_for(linux(), Duration::from_secs(3600));
    }
    let mut watching = Watching::start(&sandbox);
    let first = watching.next_cycle();
    assert_eq!(desired_agents(&first), 1, "{first}");
    assert_eq!(first["planned"]["create"], 1, "{first}");

    sandbox.write_config("{ max: 3 }");
    watching.signal("HUP");
    // The cycle running when the signal came may still use the old config; the reload starts the next one.
    let reloaded = (0..10)
        .map(|_| watching.next_cycle())
        .find(|cycle| desired_agents(cycle) == 3)
        .expect("a cycle planned with the new `max` within 10 cycles");
    assert_eq!(reloaded["planned"]["create"], 2, "{reloaded}");
    assert_eq!(sandbox.active_instances(), 3, "the new config was acted on");

    // An invalid config: logged with its location, the loop goes on with `max: 3`.
    sandbox.write_config("{ max: 1, idleTimout: 0s }");
    watching.signal("HUP");
    let log = || std::fs::read_to_string(sandbox.path("watch.log")).unwrap_or_default();
    let mut last = reloaded["cycle"].as_u64().expect("cycle number");
    for _ in 0..10 {
        if log().contains("config reload failed") {
            break;
        }
        last = watching.next_cycle()["cycle"].as_u64().expect("cycle number");
    }
    for _ in 0..2 {
        let cycle = watching.next_cycle();
        assert_eq!(cycle["cycle"].as_u64(), Some(last + 1), "the loop goes on: {cycle}");
        last += 1;
        assert_eq!(desired_agents(&cycle), 3, "still the last good config: {cycle}");
        assert_eq!(
            cycle["planned"]["delete"].as_u64().unwrap_or(0) + cycle["planned"]["drain"].as_u64().unwrap_or(0),
            0
        );
    }
    assert_eq!(sandbox.active_instances(), 3);

    watching.signal("TERM");
    let status = watching.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let text = log();
    assert!(!text.contains(crate::cli::SECRET), "secret leaked: {text}");
    assert!(text.contains("config reloaded"), "{text}");
    assert!(text.contains("config reload failed; the running config stays in effect"), "{text}");
    assert!(text.contains("ciscale.yaml:12:"), "names the place: {text}");
    assert!(text.contains("idleTimout") && text.contains("idleTimeout"), "names the problem: {text}");
}

// ---------------------------------------------------------------------------------------------------------------
// Completions and man page
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn bash_completions_know_the_subcommands() {
    let output = run(ciscale().args(["completions", "bash"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let script = stdout(&output);
    assert!(script.contains("complete -F"), "a bash completion script: {script}");
    for word in ["plan", "apply", "watch", "--detailed-exitcode", "--lock-timeout"] {
        assert!(script.contains(word), "mentions `{word}`");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let output = run(ciscale().args(["completions", shell]));
        assert!(output.status.success() && output.stdout.len() > 100, "{shell}: {}", stderr(&output));
    }
    let unknown = run(ciscale().args(["completions", "tcsh"]));
    assert_eq!(unknown.status.code(), Some(1), "clap refuses an unknown shell (a usage error: exit 1)");
}

#[test]
fn the_man_page_is_roff_generated_from_the_cli() {
    let output = run(ciscale().arg("man"));
    assert!(output.status.success(), "{}", stderr(&output));
    let page = stdout(&output);
    assert!(page.lines().any(|line| line.starts_with(".TH CISCALE 1 ")), "a roff title line: {page}");
    assert!(page.contains("\n.SH NAME\n") && page.contains("\n.SH SYNOPSIS\n"), "roff sections: {page}");
    // roff escapes hyphens.
    for word in ["plan", "watch", "completions", "Keeps self\\-hosted CI agents"] {
        assert!(page.contains(word), "mentions `{word}`: {page}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Deployment files
// ---------------------------------------------------------------------------------------------------------------

fn repo_file(relative: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn the_picus_compose_file_runs_on_its_picus_variables_alone() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&repo_file("deploy/docker-compose.picus.yml")).expect("YAML");
    let service = &compose["services"]["picus"];
    assert_eq!(service["image"].as_str(), Some("ciscale"));
    assert_eq!(service["command"].as_str(), Some("watch"));
    let environment: Vec<(String, String)> = service["environment"]
        .as_sequence()
        .expect("a list of NAME=value")
        .iter()
        .filter_map(|entry| entry.as_str()?.split_once('=').map(|(name, value)| (name.to_owned(), value.to_owned())))
        .collect();
    assert!(environment.iter().all(|(name, _)| name.starts_with("PICUS_")), "Picus's own variables: {environment:?}");

    // Nothing but those variables and no config file, as in the container (its working folder is where the
    // config would be mounted; no `-c` and no `CISCALE_CONFIG`, or a missing file would be an error).
    let scratch = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .env_clear()
        .envs(environment)
        .current_dir(scratch.path())
        .args(["validate"])
        .output()
        .expect("runs");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("owner `my-woodpecker-instance`, 1 pool(s)"), "{}", stdout(&output));
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = repo_file("deploy/ciscale.service");
    let directives: Vec<&str> = unit.lines().map(str::trim).filter(|line| !line.starts_with('#')).collect();
    for expected in [
        "ExecStart=/usr/local/bin/ciscale watch --config /etc/ciscale/ciscale.yaml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RuntimeDirectory=ciscale",
        "Environment=CISCALE_LOCK_DIR=/run/ciscale",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(directives.contains(&expected), "`{expected}` missing from the unit");
    }
    assert!(directives.iter().any(|line| line.starts_with("TimeoutStopSec=")), "a stop timeout");

    // systemd's own check, where systemd is installed: the unit with this build's binary and its man page.
    let Ok(analyze) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: only the directives were checked");
        return;
    };
    assert!(analyze.status.success());
    let scratch = tempfile::tempdir().expect("temp dir");
    let man_dir = scratch.path().join("man/man1");
    std::fs::create_dir_all(&man_dir).expect("man dir");
    let page = run(ciscale().arg("man"));
    std::fs::write(man_dir.join("ciscale.1"), &page.stdout).expect("man page");
    let local = unit.replace("/usr/local/bin/ciscale", env!("CARGO_BIN_EXE_ciscale"));
    let unit_path = scratch.path().join("ciscale.service");
    std::fs::write(&unit_path, local).expect("unit");
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", scratch.path().join("man"))
        .output()
        .expect("systemd-analyze runs");
    assert!(verified.status.success(), "{}{}", stdout(&verified), stderr(&verified));
    assert!(stderr(&verified).trim().is_empty(), "no warnings: {}", stderr(&verified));
}
