//! `ciscale simulate`: answers known by hand, determinism, skipping idle stretches changes nothing, bad traces,
//! compare and `--policy picus`, the SVG, and the planner's matching rule used by the simulated CI.

use std::collections::BTreeMap;
use std::path::Path;

use ciscale::model::{Desired, Labels, Observed, Task, TaskId};
use ciscale::plan::matching::pool_takes;
use ciscale::simulate::report::{RunReport, Summary};
use ciscale::simulate::trace::{self, Trace};
use ciscale::simulate::{self, models, Candidate, Request};
use jiff::Timestamp;

use crate::cli::{ciscale, run, stderr, stdout};

/// One Woodpecker pool on EC2 (billed per second), priced at 0.10 USD/h, polled every 10 s.
fn ec2_config(scale: &str) -> String {
    format!(
        r#"id: sim
pollInterval: 10s
ci:
  wp: {{ kind: woodpecker, server: "https://ci.example.com", token: "${{WOODPECKER_TOKEN}}" }}
backends:
  ec2: {{ kind: aws, region: eu-central-1, simulation: {{ bootTime: 45s, prices: {{ "*": 0.10 USD }} }} }}
pools:
  - name: linux
    ci: {{ source: wp, labels: {{ platform: linux/amd64 }} }}
    backend: {{ name: ec2, machine: {{ instanceType: t3.large, ami: ami-1 }} }}
    scale: {scale}
"#
    )
}

fn load(name: &str, yaml: &str) -> Candidate {
    let loaded = ciscale::config::load_str_with_simulation(name, yaml, &|var| Some(format!("unset-{var}")))
        .unwrap_or_else(|error| {
            panic!("{name} is valid: {}", error.diagnostics().map(|d| d.render_plain()).unwrap_or_default())
        });
    Candidate { name: name.to_owned(), desired: loaded.desired, simulation: loaded.simulation }
}

fn ts(text: &str) -> Timestamp {
    text.parse().expect("timestamp")
}

fn jobs(lines: &[&str]) -> Trace {
    trace::parse_jsonl("test.jsonl", &lines.join("\n")).expect("valid trace")
}

fn request(candidates: Vec<Candidate>, trace: Trace, picus: bool) -> Request {
    let (from, until) = simulate::default_window(&trace).expect("a window");
    Request {
        candidates,
        picus,
        trace,
        from,
        until,
        seed: 1,
        flags: BTreeMap::new(),
        series: false,
        skip_idle: true,
        give_up_after: simulate::GIVE_UP_AFTER,
    }
}

fn total(run: &RunReport) -> Summary {
    run.total().summary()
}

const ONE_JOB_OFF_TICK: &str =
    r#"{"at": "2026-03-02T09:14:05Z", "duration": "7m30s", "labels": {"platform": "linux/amd64", "repo": "acme/app"}}"#;
const ONE_JOB_ON_TICK: &str =
    r#"{"at": "2026-03-02T09:14:10Z", "duration": "7m30s", "labels": {"platform": "linux/amd64", "repo": "acme/app"}}"#;

#[test]
fn one_job_on_an_empty_pool_waits_one_boot_time_plus_at_most_one_poll() {
    // Cycles run every 10 s from the window's start (midnight). A job arriving at 09:14:05 is seen by the cycle
    // at 09:14:10, whose create boots for 45 s: the agent takes the job at 09:14:55, 50 s after it arrived.
    let off_tick = simulate::run_all(&request(
        vec![load("cold.yaml", &ec2_config("{ max: 2 }"))],
        jobs(&[ONE_JOB_OFF_TICK]),
        false,
    ));
    let summary = total(&off_tick[0]);
    assert_eq!(summary.jobs, 1);
    assert_eq!(summary.wait_max_s, Some(50.0), "5 s to the next cycle + 45 s boot");

    // On a tick, exactly the boot time.
    let on_tick = simulate::run_all(&request(
        vec![load("cold.yaml", &ec2_config("{ max: 2 }"))],
        jobs(&[ONE_JOB_ON_TICK]),
        false,
    ));
    let summary = total(&on_tick[0]);
    assert_eq!(summary.wait_max_s, Some(45.0));
    // The agent: created 09:14:10, busy 09:14:55-09:22:25, idle 30 min → drained by the cycle at 09:52:30,
    // deleted by the next one at 09:52:40. Up 38 min 30 s, billed per second at 0.10 USD/h.
    assert_eq!(summary.busy_hours, 0.125);
    assert_eq!(summary.agent_hours, round4(38.5 / 60.0));
    assert_eq!(summary.creates, 1);
    assert_eq!(summary.cost.get("USD").copied(), Some(round4(38.5 / 60.0 * 0.10)));
    assert_eq!(on_tick[0].total().deletes, 1);
}

#[test]
fn min_idle_removes_the_wait_and_costs_one_agent_all_day() {
    let cold = load("cold.yaml", &ec2_config("{ max: 2 }"));
    let warm = load("warm.yaml", &ec2_config("{ max: 2, minIdle: 1 }"));
    let runs = simulate::run_all(&request(vec![cold, warm], jobs(&[ONE_JOB_ON_TICK]), false));
    let (cold, warm) = (total(&runs[0]), total(&runs[1]));
    assert_eq!(warm.wait_max_s, Some(0.0), "the warm agent takes the job the moment it arrives");
    // The warm agent lives from the first cycle (midnight) to the end of the window (the next midnight): 24 h.
    // While it runs the job, `minIdle` wants a second one: created by the cycle at 09:14:10 (the job arrived on
    // that tick and was taken at once), it stays idle and is the longest idle of the two once the job ends, so it
    // is drained at 09:44:10 (30 min idle) and deleted at 09:44:20: 30 min 10 s.
    let second = (30.0 * 60.0 + 10.0) / 3600.0;
    assert_eq!(warm.agent_hours, round4(24.0 + second));
    assert_eq!(warm.busy_hours, 0.125);
    assert_eq!(warm.creates, 2);
    assert_eq!(warm.cost.get("USD").copied(), Some(round4((24.0 + second) * 0.10)));
    // What the wait cost: the warm agent's idle day against the cold agent's 38.5 minutes.
    let extra = warm.cost["USD"] - cold.cost["USD"];
    assert!((extra - (24.0 + second - 38.5 / 60.0) * 0.10).abs() < 1e-3, "extra cost {extra}");
}

#[test]
fn picus_runs_one_agent_and_queues_the_second_job() {
    // Two jobs at once. ciscale with max 2 creates two agents: both wait the boot time. Picus has one agent: the
    // second job waits for the first (45 s boot + 10 min job).
    let both = [
        r#"{"at": "2026-03-02T09:14:10Z", "duration": "10m", "labels": {"platform": "linux/amd64"}}"#,
        r#"{"at": "2026-03-02T09:14:10Z", "duration": "10m", "labels": {"platform": "linux/amd64"}}"#,
    ];
    let runs = simulate::run_all(&request(vec![load("two.yaml", &ec2_config("{ max: 2 }"))], jobs(&both), true));
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].name, "picus");
    let (ours, picus) = (total(&runs[0]), total(&runs[1]));
    assert_eq!((ours.wait_p50_s, ours.wait_max_s), (Some(45.0), Some(45.0)));
    assert_eq!((picus.wait_p50_s, picus.wait_max_s), (Some(45.0), Some(645.0)));
    assert_eq!((ours.creates, picus.creates), (2, 1));
    // Picus keeps its agent 30 min after the last job whatever the billing; so do we here (idleTimeout 30m).
    assert_eq!(picus.busy_hours, round4(20.0 / 60.0));
}

fn round4(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
}

/// Configs that exercise every time-based rule: hourly billing with its paid-hour keep, schedule windows,
/// ephemeral containers with Incus events and a container create that holds the cycle, adopted instances that
/// are started and stopped, capacity errors with the circuit breaker.
fn rule_zoo() -> Vec<Candidate> {
    let hourly = r#"id: zoo
pollInterval: 15s
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  hz: { kind: hcloud, token: "${T}", simulation: { bootTime: 20s-70s, capacityErrors: 0.3 } }
pools:
  - name: amd
    ci: { source: wp, labels: { platform: linux/amd64 } }
    backend: { name: hz, machine: { serverType: "cx22,cx32", location: "fsn1,nbg1", image: docker-ce } }
    scale:
      max: 3
      idleTimeout: 7m
      bootstrapTimeout: 3m
      breakerThreshold: 2
      breakerCooldown: 2m
      schedule: [ { name: office, cron: "* 8-16 * * 1-5", timezone: Europe/Berlin, minIdle: 1 } ]
  - name: arm
    ci: { source: wp, labels: { platform: linux/arm64 } }
    backend: { name: hz, machine: { serverType: cax11 } }
    scale: { max: 2, idleTimeout: 2m, billingMargin: 10m }
"#;
    let incus = r#"id: zoo
pollInterval: 10s
ci:
  az: { kind: azure-pipelines, organizationUrl: "https://dev.azure.com/acme", pat: "${T}" }
backends:
  lxd: { kind: incus, simulation: { bootTime: 1s-3s, capacityErrors: 0.1 } }
pools:
  - name: docker
    ci: { source: az, azurePool: Default, capabilities: { docker: "" } }
    backend: { name: lxd, machine: { image: agent } }
    scale: { max: 3, minIdle: 1, ephemeral: true }
"#;
    let start_stop = r#"id: zoo
pollInterval: 10s
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  ec2: { kind: aws, simulation: { prices: { "*": 0.05 USD } } }
pools:
  - name: builder
    ci: { source: wp, labels: { platform: linux/amd64 } }
    backend:
      name: ec2
      startStop: { instances: [ { id: i-1, agentName: one }, { id: i-2, agentName: two } ] }
    scale: { idleTimeout: 4m }
"#;
    vec![load("hourly.yaml", hourly), load("incus.yaml", incus), load("start-stop.yaml", start_stop)]
}

#[test]
fn skipping_idle_stretches_gives_the_same_result_as_cycling_through_them() {
    use simulate::synthetic::Profile::{NightlyBurst, OfficeWeek};
    // Two weekdays of office hours, or two nights of bursts: every rule fires many times.
    for (candidate, profile) in rule_zoo().into_iter().zip([OfficeWeek, NightlyBurst, OfficeWeek]) {
        {
            let mut synthetic = simulate::synthetic::Synthetic::new(profile, 5);
            synthetic.days = 2;
            synthetic.volume = 1.5;
            let (templates, _) = simulate::synthetic::templates_for(&candidate.desired, None);
            let trace = synthetic.generate(&templates);
            assert!(trace.jobs.len() > 40, "{}: a trace with work", candidate.name);
            let mut skipping = request(vec![candidate.clone()], trace, true);
            skipping.from = synthetic.start;
            skipping.until = synthetic.until();
            let cycling = Request { skip_idle: false, ..skipping.clone() };
            let (fast, slow) = (simulate::run_all(&skipping), simulate::run_all(&cycling));
            for (fast, slow) in fast.iter().zip(&slow) {
                let context = format!("{} {} ({profile})", candidate.name, fast.name);
                assert_eq!(fast.json(), slow.json(), "{context}");
                assert_eq!(fast.render(), slow.render(), "{context}");
                assert!(
                    fast.cycles * 2 < slow.cycles,
                    "{context}: skipping planned {} of {} cycles",
                    fast.cycles,
                    slow.cycles
                );
            }
        }
    }
}

#[test]
fn every_job_the_planner_counts_for_a_pool_is_one_its_agents_take() {
    // The simulated CI hands jobs to agents with `pool_takes`; the planner counts demand with its own code.
    // Over many label sets: the pool the planner counts a job for is the first pool that takes it.
    let yaml = r#"id: m
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
  az: { kind: azure-pipelines, organizationUrl: "https://dev.azure.com/acme", pat: "${T}" }
backends:
  b: { kind: aws }
pools:
  - { name: gpu, ci: { source: wp, labels: { "!gpu": "yes", platform: "*" } }, backend: { name: b } }
  - { name: amd, ci: { source: wp, labels: { platform: linux/amd64, repo: "*" } }, backend: { name: b } }
  - { name: acme, ci: { source: wp, labels: { platform: "*", repo: acme/app } }, backend: { name: b } }
  - { name: any, ci: { source: az, azurePool: Default }, backend: { name: b }, agent: { image: azp-agent } }
  - { name: win, ci: { source: az, azurePool: Default, capabilities: { Agent.OS: Windows_NT, docker: "" } }, backend: { name: b }, agent: { image: azp-agent } }
"#;
    let desired: Desired = load("m.yaml", yaml).desired;
    let label_sets: Vec<Labels> = [
        vec![("platform", "linux/amd64"), ("repo", "x/y")],
        vec![("platform", "linux/amd64"), ("repo", "acme/app")],
        vec![("platform", "linux/arm64"), ("repo", "acme/app")],
        vec![("platform", "linux/arm64"), ("repo", "x/y")],
        vec![("gpu", "yes"), ("platform", "linux/amd64")],
        vec![("gpu", "no"), ("platform", "linux/amd64")],
        vec![("platform", "linux/amd64"), ("woodpecker-ci.org/x", "1"), ("org-id", "3")],
        vec![("azure-pool", "Default")],
        vec![("azure-pool", "other")],
    ]
    .iter()
    .map(|pairs| pairs.iter().copied().collect())
    .collect();
    let demand_sets: Vec<Vec<String>> = vec![
        vec![],
        vec!["docker".into()],
        vec!["Agent.OS -equals Windows_NT".into(), "docker".into()],
        vec!["java".into()],
    ];
    for source in desired.ci.keys() {
        let mut observed = Observed { observed_at: ts("2026-03-02T00:00:00Z"), ..Observed::default() };
        let mut expected = vec![0u32; desired.pools.len()];
        let mut pending = Vec::new();
        for labels in &label_sets {
            for demands in &demand_sets {
                let first = desired.pools.iter().position(|pool| {
                    &pool.ci.source == source
                        && pool_takes(desired.ci.get(source).map(|s| &s.kind), pool, labels, demands)
                });
                if let Some(first) = first {
                    expected[first] += 1;
                }
                pending.push(Task {
                    id: TaskId::new(format!("t{}", pending.len())),
                    labels: labels.clone(),
                    demands: demands.clone(),
                    agent_id: None,
                });
            }
        }
        observed.ci.entry(source.clone()).or_default().queue.pending = pending;
        let plan = ciscale::plan::plan(&desired, &observed, observed.observed_at);
        let counted: Vec<u32> = plan.pools.iter().map(|status| status.pending_jobs).collect();
        assert_eq!(counted, expected, "source `{source}`");
        assert!(expected.iter().filter(|count| **count > 0).count() >= 2, "the sets reach several pools: {expected:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Through the binary
// ---------------------------------------------------------------------------------------------------------------

/// `ciscale simulate -c c.yaml --trace TRACE --json` in `dir`; it must succeed, and its report is returned.
pub(crate) fn simulate_json(dir: &Path, trace: &str) -> serde_json::Value {
    let output = run(ciscale().current_dir(dir).args(["simulate", "-c", "c.yaml", "--trace", trace, "--json"]));
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).expect("JSON")
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn same_inputs_and_seed_give_byte_identical_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write(dir.path(), "a.yaml", &ec2_config("{ max: 3, idleTimeout: 5m }"));
    let other = write(dir.path(), "b.yaml", &ec2_config("{ max: 1 }"));
    let simulate = |seed: &str, svg: &str| {
        let output = run(ciscale().current_dir(dir.path()).args([
            "simulate",
            "-c",
            "a.yaml",
            "--compare",
            "b.yaml",
            "--policy",
            "picus",
            "--synthetic",
            "nightly-burst",
            "--days",
            "3",
            "--seed",
            seed,
            "--boot-time",
            "30s-2m",
            "--capacity-errors",
            "ec2=10%",
            "--svg",
            svg,
        ]));
        assert!(output.status.success(), "{}", stderr(&output));
        let chart = std::fs::read_to_string(dir.path().join(svg)).expect("svg written");
        (stdout(&output), chart)
    };
    let (first, first_chart) = simulate("7", "one.svg");
    let (second, second_chart) = simulate("7", "two.svg");
    assert_eq!(first, second);
    assert_eq!(first_chart, second_chart);
    let (other_seed, _) = simulate("8", "three.svg");
    assert_ne!(first, other_seed, "the seed matters");
    let _ = (config, other);
}

#[test]
fn bad_trace_lines_are_reported_with_file_and_line_all_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "c.yaml", &ec2_config("{ max: 2 }"));
    let trace = [
        ONE_JOB_ON_TICK,
        r#"{"at": "2026-03-02 09:14", "duration": "7m"}"#,
        "",
        r#"{"at": "2026-03-02T09:14:10Z", "duration": "ten minutes"}"#,
        r#"{"at": "2026-03-02T09:14:10Z", "duration": "1m", "label": {"a": "b"}}"#,
        "oops",
    ]
    .join("\n");
    write(dir.path(), "jobs.jsonl", &trace);
    let output = run(ciscale().current_dir(dir.path()).args(["simulate", "-c", "c.yaml", "--trace", "jobs.jsonl"]));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    for line in [
        "jobs.jsonl:2: `at`",
        "jobs.jsonl:4: `duration`",
        "jobs.jsonl:5: unknown field `label`",
        "jobs.jsonl:6: not a JSON",
    ] {
        assert!(text.contains(line), "`{line}` in:\n{text}");
    }
    assert!(!text.contains("jobs.jsonl:1:") && !text.contains("jobs.jsonl:3:"), "{text}");
    assert!(stdout(&output).is_empty());
}

#[test]
fn compare_and_picus_print_side_by_side_and_json_keys_are_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "warm.yaml", &ec2_config("{ max: 3, minIdle: 1, idleTimeout: 5m }"));
    write(dir.path(), "cold.yaml", &ec2_config("{ max: 3, idleTimeout: 5m }"));
    let args =
        ["simulate", "-c", "warm.yaml", "--compare", "cold.yaml", "--policy", "picus", "--synthetic", "office-week"];
    let output = run(ciscale().current_dir(dir.path()).args(args));
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let table = text.split("(changes against").next().unwrap_or_default();
    let header =
        table.lines().find(|line| line.contains("warm.yaml") && line.contains("cold.yaml") && line.contains("picus"));
    assert!(header.is_some(), "one column per run:\n{text}");
    assert!(text.contains("(changes against `warm.yaml`)"), "{text}");
    assert!(text.lines().any(|line| line.starts_with("wait p95") && line.contains(" %)")), "deltas:\n{text}");

    let json = run(ciscale().current_dir(dir.path()).args(args).arg("--json"));
    let value: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON");
    let runs = value["runs"].as_array().expect("runs");
    assert_eq!(
        runs.iter().map(|run| run["name"].as_str().unwrap_or("")).collect::<Vec<_>>(),
        ["warm.yaml", "cold.yaml", "picus"]
    );
    let keys = |object: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = object.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        keys
    };
    let summary_keys = [
        "agent_hours",
        "busy_hours",
        "cost",
        "creates",
        "jobs",
        "wait_max_s",
        "wait_p50_s",
        "wait_p95_s",
        "wait_p99_s",
    ];
    let mut pool_keys: Vec<&str> = summary_keys.to_vec();
    pool_keys.push("pool");
    pool_keys.sort();
    for run in runs {
        assert_eq!(keys(&run["total"]), summary_keys);
        for pool in run["pools"].as_array().expect("pools") {
            assert_eq!(keys(pool), pool_keys);
        }
    }
    // A single run is `{"pools": [...], "total": {...}}` and nothing else.
    let single = run(ciscale().current_dir(dir.path()).args([
        "simulate",
        "-c",
        "cold.yaml",
        "--synthetic",
        "office-week",
        "--json",
    ]));
    let value: serde_json::Value = serde_json::from_str(&stdout(&single)).expect("JSON");
    assert_eq!(keys(&value), ["pools", "total"]);
    // The warm pool waits less and costs more than the cold one; Picus (one agent) waits longest at p95.
    let p95 = |index: usize| runs[index]["total"]["wait_p95_s"].as_f64().unwrap_or(f64::NAN);
    let cost = |index: usize| runs[index]["total"]["cost"]["USD"].as_f64().unwrap_or(f64::NAN);
    assert!(p95(0) <= p95(1) && p95(1) <= p95(2), "p95 {} {} {}", p95(0), p95(1), p95(2));
    assert!(cost(0) > cost(1), "warm costs more: {} {}", cost(0), cost(1));
}

#[test]
fn the_svg_is_well_formed_and_carries_every_series() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "a.yaml", &ec2_config("{ max: 3 }"));
    write(dir.path(), "b & <c>.yaml", &ec2_config("{ max: 1 }"));
    let output = run(ciscale().current_dir(dir.path()).args([
        "simulate",
        "-c",
        "a.yaml",
        "--compare",
        "b & <c>.yaml",
        "--policy",
        "picus",
        "--synthetic",
        "nightly-burst",
        "--days",
        "2",
        "--svg",
        "chart.svg",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(dir.path().join("chart.svg")).expect("chart written");
    let document = roxmltree::Document::parse(&text).expect("well-formed XML");
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    for name in ["a.yaml", "b & <c>.yaml", "picus"] {
        for metric in ["queue", "serving", "cost"] {
            let line = root
                .descendants()
                .find(|node| node.attribute("data-run") == Some(name) && node.attribute("data-metric") == Some(metric))
                .unwrap_or_else(|| panic!("a `{metric}` line for `{name}`"));
            assert_eq!(line.tag_name().name(), "polyline");
            let points: Vec<(f64, f64)> = line
                .attribute("points")
                .unwrap_or_default()
                .split_whitespace()
                .map(|pair| {
                    let (x, y) = pair.split_once(',').expect("x,y");
                    (x.parse().expect("x"), y.parse().expect("y"))
                })
                .collect();
            assert!(points.len() > 100, "{name} {metric}: {} points", points.len());
            assert!(points.windows(2).all(|w| w[0].0 <= w[1].0), "time runs left to right");
            let ys: Vec<f64> = points.iter().map(|(_, y)| *y).collect();
            let flat = ys.iter().all(|y| (y - ys[0]).abs() < 1e-9);
            assert!(!flat, "{name} {metric}: the nightly bursts show");
        }
    }
}

#[test]
fn simulation_settings_are_checked_with_their_location() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = ec2_config("{ max: 2 }").replace("bootTime: 45s", "bootTime: soon").replace("0.10 USD", "cheap");
    write(dir.path(), "bad.yaml", &config);
    let output =
        run(ciscale().current_dir(dir.path()).env("WOODPECKER_TOKEN", "x").args(["validate", "-c", "bad.yaml"]));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("bad.yaml:6:") && text.contains("invalid `bootTime` `soon`"), "{text}");
    assert!(text.contains("`cheap` is not a price"), "{text}");
    // Flags are checked too.
    write(dir.path(), "good.yaml", &ec2_config("{ max: 2 }"));
    let output = run(ciscale().current_dir(dir.path()).args([
        "simulate",
        "-c",
        "good.yaml",
        "--synthetic",
        "demo",
        "--boot-time",
        "nowhere=5s",
    ]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("backend `nowhere`, which no config has"), "{}", stderr(&output));
}

#[test]
fn flags_override_the_config_and_the_kind_defaults() {
    let candidate = load("c.yaml", &ec2_config("{ max: 2 }"));
    let flags = models::flag_overrides(&["ec2=1m".to_owned()], &["25%".to_owned()], &["t3.large=0.2USD".to_owned()])
        .expect("valid flags");
    let models = models::models_for(&candidate.desired, &candidate.simulation, &flags);
    let ec2 = &models[&ciscale::model::BackendName::new("ec2")];
    assert_eq!(ec2.boot_time.to_string(), "1m");
    assert_eq!(ec2.capacity_errors, 0.25);
    assert_eq!(ec2.price_of(Some("t3.large")).map(|p| p.hourly), Some(0.2));
    assert_eq!(ec2.price_of(Some("m6i.large")).map(|p| p.hourly), Some(0.10), "the config's `*` price");
}

#[test]
fn a_schedule_window_holds_for_every_second_of_its_minutes() {
    // Found by the skip test: cycles are not on whole minutes, and the window must not flicker within one.
    let yaml = r#"id: w
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  b: { kind: aws }
pools:
  - name: p
    ci: { source: wp, labels: { platform: linux } }
    backend: { name: b }
    scale: { max: 3, schedule: [ { name: office, cron: "* 8-16 * * 1-5", minIdle: 2 } ] }
"#;
    let desired = load("w.yaml", yaml).desired;
    for (at, inside) in [
        ("2026-03-02T08:00:00Z", true),
        ("2026-03-02T08:30:30Z", true),
        ("2026-03-02T16:59:59.9Z", true),
        ("2026-03-02T17:00:00Z", false),
        ("2026-03-02T07:59:59Z", false),
    ] {
        let observed = Observed { observed_at: ts(at), ..Observed::default() };
        let plan = ciscale::plan::plan(&desired, &observed, observed.observed_at);
        assert_eq!(plan.pools[0].window.is_some(), inside, "{at}");
        assert_eq!(plan.summary.create, if inside { 2 } else { 0 }, "{at}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The fake world's job feed (`jobs:` of a fake CI): the demo has work of its own
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_job_feed_queues_the_synthetic_jobs_as_their_time_comes() {
    use ciscale::model::FakeSpec;
    use ciscale::providers::fake::{FakeWorld, JobFeed, FEED_BACKFILL_SECS};
    use ciscale::providers::CiSource as _;
    use simulate::synthetic::{jobs_between, JobTemplate, Profile};

    let templates = vec![JobTemplate {
        pool: "small".into(),
        ci: "sim".into(),
        labels: [("size", "small")].into(),
        demands: Vec::new(),
    }];
    let world = FakeWorld::open(&FakeSpec { state_file: None, simulate: true, jobs: None }).expect("open");
    world.set_job_feed(JobFeed { profile: Profile::Demo, seed: 3, templates: templates.clone() });
    let start = ts("2026-03-02T10:07:00Z");
    world.set_now(start);
    let ci = world.ci();
    let expected = |from: Timestamp, until: Timestamp| jobs_between(Profile::Demo, 3, 1.0, &templates, from, until);

    // The first observation queues the last ten minutes' jobs (one busy stretch of the demo, 10:00-10:04).
    let first = ci.observe().await.expect("observe");
    let backfill = expected(start.checked_sub(jiff::SignedDuration::from_secs(FEED_BACKFILL_SECS)).unwrap(), start);
    assert!(backfill.len() >= 5, "a burst's worth: {}", backfill.len());
    assert_eq!(first.queue.pending.len(), backfill.len());
    assert!(first.queue.pending.iter().all(|task| task.labels == templates[0].labels));

    // Nothing between the busy stretches (10:04-10:10), then the next burst arrives job by job.
    world.set_now(ts("2026-03-02T10:09:59Z"));
    assert_eq!(ci.observe().await.expect("observe").queue.pending.len(), backfill.len(), "the lull");
    world.set_now(ts("2026-03-02T10:12:00Z"));
    let later = ci.observe().await.expect("observe");
    let burst = expected(start, ts("2026-03-02T10:12:00Z"));
    assert!(!burst.is_empty());
    assert_eq!(later.queue.pending.len(), backfill.len() + burst.len());
    // Each job runs as long as the trace says.
    let durations: Vec<u64> = world.snapshot().tasks.iter().map(|task| task.run_for_secs).collect();
    let planned: Vec<u64> = backfill.iter().chain(&burst).map(|job| job.duration.as_secs() as u64).collect();
    assert_eq!(durations, planned);
}

#[test]
fn watching_the_fake_example_shows_agents_created_jobs_taken_and_agents_drained_and_deleted() {
    // `ciscale watch -c examples/fake.yaml` in a fresh folder: the fake CI's feed brings jobs at once.
    let dir = tempfile::tempdir().expect("temp dir");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fake.yaml");
    std::fs::copy(&example, dir.path().join("fake.yaml")).expect("copy the example");
    let watch =
        |cycles: &str| {
            let output = run(ciscale()
                .current_dir(dir.path())
                .env("CISCALE_LOCK_DIR", dir.path().join("locks"))
                .args(["watch", "-c", "fake.yaml", "--cycles", cycles]));
            assert!(output.status.success(), "{}", stderr(&output));
            stderr(&output)
        };
    let log = watch("3");
    let creates = log.lines().filter(|line| line.contains("planned") && line.contains("action=create")).count();
    assert!(creates >= 2, "agents are created for the queued jobs:\n{log}");
    assert!(log.contains("jobs waiting"), "with the plan's reason:\n{log}");
    assert!(
        log.contains("fake ci: job queued") && log.contains("fake ci: job taken"),
        "jobs arrive and are taken:\n{log}"
    );

    // Later, in a lull: the jobs are done and the agents have been idle for an hour.
    let world = ciscale::providers::fake::FakeWorld::open(&ciscale::model::FakeSpec {
        state_file: Some(dir.path().join("fake-world.json")),
        simulate: false,
        jobs: None,
    })
    .expect("open the example's world");
    let an_hour_ago = Timestamp::now().checked_sub(jiff::SignedDuration::from_hours(1)).expect("time");
    world.update(|state| {
        state.tasks.clear();
        for agent in &mut state.agents {
            agent.last_work = Some(an_hour_ago);
        }
        for instance in &mut state.instances {
            instance.created_at = an_hour_ago;
        }
        // The feed has nothing new since "now": only the idle agents matter.
        state.jobs_fed_until = Some(Timestamp::now().checked_add(jiff::SignedDuration::from_hours(1)).expect("time"));
    });
    let log = watch("2");
    assert!(log.lines().any(|line| line.contains("action=drain") && line.contains("idle for 1h")), "drained:\n{log}");
    assert!(
        log.lines().any(|line| line.contains("action=delete") && line.contains("agent drained and idle")),
        "then deleted:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// `ciscale trace export` from the CI fakes
// ---------------------------------------------------------------------------------------------------------------

const T0: i64 = 1_772_442_000; // 2026-03-02T09:00:00Z

/// `trace export` of `c.yaml`'s sources for the trace fakes' day, 2026-03-02.
const EXPORT_ONE_DAY: [&str; 8] =
    ["trace", "export", "-c", "c.yaml", "--from", "2026-03-02T00:00:00Z", "--until", "2026-03-03T00:00:00Z"];

#[test]
fn trace_export_reads_woodpecker_workflows_with_their_labels_and_queue_times() {
    use crate::fakes::woodpecker::{FakeWoodpecker, ADMIN_TOKEN};
    assert_eq!(Timestamp::from_second(T0).expect("t0").to_string(), "2026-03-02T09:00:00Z");
    let fake = FakeWoodpecker::start();
    let app = fake.add_repo("acme/app", 3);
    let lib = fake.add_repo("acme/lib", 3);
    let build = ".woodpecker/build.yaml";
    let test = ".woodpecker/test.yaml";
    let files = [
        (build, "labels:\n  platform: linux/amd64\nsteps:\n  - name: make\n    image: gcc\n"),
        (test, "depends_on: [build]\nlabels:\n  platform: linux/arm64\n  gpu: \"no\"\nsteps: []\n"),
    ];
    // Build runs 09:00:20-09:05:20, test waits for it and runs 09:05:30-09:10:30.
    fake.add_pipeline(app, T0, &[("build", T0 + 20, T0 + 320), ("test", T0 + 330, T0 + 630)], &files);
    // Waited for approval until 10:06:40; the old single-file layout with a top-level `platform`.
    fake.add_pipeline_reviewed(
        app,
        T0 + 3600,
        T0 + 4000,
        &[("woodpecker", T0 + 4010, T0 + 4100)],
        &[(".woodpecker.yaml", "platform: linux/amd64\nsteps: []\n")],
    );
    // Before the window, never started, still running: not in the trace.
    fake.add_pipeline(app, T0 - 2 * 86_400, &[("build", T0 - 2 * 86_400 + 5, T0 - 2 * 86_400 + 60)], &files[..1]);
    fake.add_pipeline(lib, T0 + 100, &[("build", 0, 0)], &files[..1]);
    fake.add_pipeline(lib, T0 + 200, &[("build", T0 + 210, 0)], &files[..1]);

    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"id: exp
ci:
  wp: {{ kind: woodpecker, server: "{url}", token: "${{WP_TOKEN}}" }}
backends:
  hz: {{ kind: hcloud, token: "${{HZ_TOKEN}}" }}
pools:
  - name: amd
    ci: {{ source: wp, labels: {{ platform: linux/amd64 }} }}
    backend: {{ name: hz, machine: {{ serverType: cx22, image: docker-ce }} }}
    scale: {{ max: 2 }}
  - name: arm
    ci: {{ source: wp, labels: {{ platform: linux/arm64, gpu: "*" }} }}
    backend: {{ name: hz, machine: {{ serverType: cax11, image: docker-ce }} }}
"#,
        url = fake.url()
    );
    write(dir.path(), "c.yaml", &config);
    let export = |out: &str| {
        let output = run(ciscale()
            .current_dir(dir.path())
            .env("WP_TOKEN", ADMIN_TOKEN)
            .env("HZ_TOKEN", "unused")
            .args(EXPORT_ONE_DAY)
            .args(["-o", out]));
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(!stderr(&output).contains(ADMIN_TOKEN) && !stdout(&output).contains(ADMIN_TOKEN));
        (trace::read_file(&dir.path().join(out)).expect("a valid trace"), stderr(&output))
    };
    let (exported, log) = export("week.jsonl");
    let lines: Vec<(String, String, i64, Vec<(&str, &str)>)> = exported
        .jobs
        .iter()
        .map(|job| {
            let labels = job.labels.iter().collect();
            (job.id.clone().unwrap_or_default(), job.at.to_string(), job.duration.as_secs(), labels)
        })
        .collect();
    let repo = ("repo", "acme/app");
    assert_eq!(
        lines,
        vec![
            (
                "acme/app#1/build".into(),
                "2026-03-02T09:00:00Z".into(),
                300,
                vec![("org-id", "3"), ("platform", "linux/amd64"), repo]
            ),
            (
                "acme/app#1/test".into(),
                "2026-03-02T09:05:20Z".into(),
                300,
                vec![("gpu", "no"), ("org-id", "3"), ("platform", "linux/arm64"), repo]
            ),
            (
                "acme/app#2/woodpecker".into(),
                "2026-03-02T10:06:40Z".into(),
                90,
                vec![("org-id", "3"), ("platform", "linux/amd64"), repo]
            ),
        ]
    );
    assert!(
        log.contains("ci source `wp`: 3 jobs")
            && log.contains("1 that never started")
            && log.contains("1 still running"),
        "{log}"
    );
    assert!(fake.spec_violations().is_empty(), "{:?}", fake.spec_violations());

    // Real servers send the workflow files as base64 text (Go's `[]byte`), not the spec's array of bytes.
    let base64 = |text: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    // (Pipelines are read newest first: the first config asked for is pipeline 2's.)
    let raw = serde_json::json!([{ "name": ".woodpecker.yaml", "hash": "h", "data": base64("platform: linux/amd64\nsteps: []\n") }]);
    fake.serve_raw_once("GET /api/repos/{repo_id}/pipelines/{number}/config", raw);
    let (again, _) = export("again.jsonl");
    assert_eq!(again, exported);

    // The trace replays: the arm64 job goes to the arm pool, the others to amd.
    let value = simulate_json(dir.path(), "week.jsonl");
    let jobs: Vec<u64> =
        value["pools"].as_array().expect("pools").iter().map(|pool| pool["jobs"].as_u64().unwrap_or(0)).collect();
    assert_eq!(jobs, vec![2, 1]);
}

#[test]
fn trace_export_reads_azure_job_requests_with_their_demands() {
    use crate::fakes::azure::{AzureFake, Route};
    const PAT: &str = "azp-export-pat-0123456789";
    let fake = AzureFake::start(PAT);
    fake.add_pool("Default");
    fake.add_pool("Other");
    let at = |offset: i64| Some(Timestamp::from_second(T0 + offset).expect("time"));
    fake.add_past_request(
        "Default",
        &["docker", "Agent.OS -equals Linux"],
        at(0).unwrap(),
        at(30),
        at(330),
        "succeeded",
    );
    fake.add_past_request("Default", &["docker"], at(600).unwrap(), at(601), at(661), "failed");
    fake.add_past_request(
        "Default",
        &["docker"],
        at(-3 * 86_400).unwrap(),
        at(-3 * 86_400 + 5),
        at(-3 * 86_400 + 65),
        "succeeded",
    );
    fake.add_past_request("Other", &[], at(100).unwrap(), at(110), at(200), "succeeded");
    fake.add_past_request("Default", &["docker"], at(700).unwrap(), None, None, ""); // still queued: never started

    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"id: exp
ci:
  azure: {{ kind: azure-pipelines, organizationUrl: "{url}", pat: "${{AZP_TOKEN}}" }}
backends:
  lxd: {{ kind: incus }}
pools:
  - name: docker
    ci: {{ source: azure, azurePool: Default, capabilities: {{ docker: "", Agent.OS: Linux }} }}
    backend: {{ name: lxd, machine: {{ image: agent }} }}
    scale: {{ max: 2, ephemeral: true }}
"#,
        url = fake.org_url()
    );
    write(dir.path(), "c.yaml", &config);
    let output = run(ciscale().current_dir(dir.path()).env("AZP_TOKEN", PAT).args(EXPORT_ONE_DAY));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stdout(&output).contains(PAT) && !stderr(&output).contains(PAT));
    let exported = trace::parse_jsonl("stdout", &stdout(&output)).expect("a valid trace");
    let lines: Vec<(String, i64, Vec<String>)> =
        exported.jobs.iter().map(|job| (job.at.to_string(), job.duration.as_secs(), job.demands.clone())).collect();
    assert_eq!(
        lines,
        vec![
            ("2026-03-02T09:00:00Z".into(), 300, vec!["docker".into(), "Agent.OS -equals Linux".into()]),
            ("2026-03-02T09:10:00Z".into(), 60, vec!["docker".into()]),
        ],
        "only the bound pool `Default`, in the window, started and finished"
    );
    assert!(exported.jobs.iter().all(|job| job.labels.get("azure-pool") == Some("Default")));
    assert!(stderr(&output).contains("1 that never started"), "{}", stderr(&output));
    // The history is one `jobrequests` call per bound pool, asking for the finished requests too.
    let history: Vec<_> =
        fake.exchanges().into_iter().filter(|exchange| exchange.route == Route::JobRequests).collect();
    assert_eq!(history.len(), 1);
    assert!(history[0].query.iter().any(|(key, value)| key == "completedRequestCount" && value == "10000"));

    // And the trace replays on the config: both jobs run on ephemeral agents.
    write(dir.path(), "azure.jsonl", &stdout(&output));
    let value = simulate_json(dir.path(), "azure.jsonl");
    assert_eq!(value["total"]["jobs"], 2);
}

#[test]
fn the_readme_comparisons_are_what_simulate_prints() {
    // Every `<!-- simulate-check: CONFIG -->` block of the README is the side-by-side table of
    // `ciscale simulate -c CONFIG --synthetic office-week --policy picus`, byte for byte.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let mut checked = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(config) = line.strip_prefix("<!-- simulate-check: ").and_then(|rest| rest.strip_suffix(" -->")) else {
            continue;
        };
        assert_eq!(lines.next(), Some("```text"), "a text block follows the marker of {config}");
        let block: Vec<&str> = lines.by_ref().take_while(|line| *line != "```").collect();
        let output = run(ciscale().current_dir(root).args([
            "simulate",
            "-c",
            config,
            "--synthetic",
            "office-week",
            "--policy",
            "picus",
        ]));
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let table: Vec<&str> = text
            .lines()
            .skip_while(|line| !(line.contains(config) && line.contains("picus") && !line.contains(": ")))
            .take_while(|line| !line.is_empty())
            .collect();
        assert_eq!(table, block, "README block of {config} is stale; it is now:\n{}", table.join("\n"));
        checked += 1;
    }
    assert!(checked >= 2, "the README shows the EC2 and Hetzner comparisons");
}

#[test]
fn hourly_billing_keeps_an_idle_server_to_the_end_of_its_paid_hour_and_bills_started_hours() {
    let yaml = r#"id: sim
pollInterval: 10s
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  hz: { kind: hcloud, token: "${T}", simulation: { bootTime: 45s } }
pools:
  - name: linux
    ci: { source: wp, labels: { platform: linux/amd64 } }
    backend: { name: hz, machine: { serverType: cx22, image: docker-ce } }
    scale: { max: 2, idleTimeout: 10m, billingMargin: 5m }
"#;
    // Created 09:14:10, idle from 09:22:25 (job done): past its 10 min idle timeout at 09:32:25, but kept until
    // 5 min before its paid hour ends (10:09:10), drained then, deleted at 10:09:20: 55 min 10 s, one hour billed.
    let runs = simulate::run_all(&request(vec![load("hourly.yaml", yaml)], jobs(&[ONE_JOB_ON_TICK]), false));
    let summary = total(&runs[0]);
    assert_eq!(summary.agent_hours, round4((55.0 * 60.0 + 10.0) / 3600.0));
    assert_eq!(summary.cost.get("EUR").copied(), Some(0.006), "one started hour of cx22 (bundled list)");
    // A second job at 09:50 finds the kept server at once: no create, no second hour. Idle again from 09:55, it
    // still goes at 10:09:10-10:09:20, the end of its paid hour.
    let second = r#"{"at": "2026-03-02T09:50:00Z", "duration": "5m", "labels": {"platform": "linux/amd64"}}"#;
    let runs = simulate::run_all(&request(vec![load("hourly.yaml", yaml)], jobs(&[ONE_JOB_ON_TICK, second]), false));
    let summary = total(&runs[0]);
    assert_eq!((summary.creates, summary.jobs, summary.wait_p50_s, summary.wait_max_s), (1, 2, Some(0.0), Some(45.0)));
    assert_eq!(summary.agent_hours, round4((55.0 * 60.0 + 10.0) / 3600.0));
    assert_eq!(summary.busy_hours, round4((7.5 + 5.0) / 60.0));
    assert_eq!(summary.cost.get("EUR").copied(), Some(0.006));
    // Picus keeps it 30 minutes after the second job whatever the hour: deleted at 10:25:10, it bills a second hour.
    let runs = simulate::run_all(&request(vec![load("hourly.yaml", yaml)], jobs(&[ONE_JOB_ON_TICK, second]), true));
    let picus = total(&runs[1]);
    assert_eq!((picus.creates, picus.wait_max_s, picus.cost.get("EUR").copied()), (1, Some(45.0), Some(0.012)));
    assert_eq!(picus.agent_hours, round4((71.0 * 60.0) / 3600.0));
}

#[test]
fn without_capacity_nothing_is_created_and_the_breaker_paces_the_attempts() {
    let yaml = ec2_config("{ max: 2, breakerThreshold: 3, breakerCooldown: 10m }")
        .replace("bootTime: 45s", "bootTime: 45s, capacityErrors: 100%");
    let mut full = request(vec![load("full.yaml", &yaml)], jobs(&[ONE_JOB_ON_TICK]), false);
    full.give_up_after = jiff::SignedDuration::from_hours(6);
    let runs = simulate::run_all(&full);
    let run = &runs[0];
    let totals = run.total();
    assert_eq!((totals.creates, totals.summary().jobs), (0, 0), "nothing ran");
    assert_eq!(run.unfinished_jobs, 1);
    // Tried from the job's arrival until the run gives up (6 h after the window): three in a row, then one per
    // 10 min cooldown (the half-open trial).
    assert_eq!(run.until, ts("2026-03-03T06:00:00Z"));
    let hours = run.until.duration_since(ts("2026-03-02T09:14:10Z")).as_secs_f64() / 3600.0;
    let expected = 6.0 * hours + 3.0;
    let failures = totals.create_failures as f64;
    assert!(
        (failures - expected).abs() < 0.02 * expected,
        "{failures} failures in {hours:.0} h, about {expected:.0} expected"
    );
    assert!(run.render().contains("creates failed for lack of capacity"));
}

#[test]
fn a_create_refused_for_capacity_is_tried_again_next_cycle_not_after_the_bootstrap_timeout() {
    // Apply removes the agent record of a create the backend refused, so the planner does not count it as a
    // create in flight (which would hold the job back for the 10 min `bootstrapTimeout`). One job, half the
    // creates refused: over seeds, a job whose create failed once or twice still starts within the boot time
    // plus the backed-off retries (10 s + 20 s + 40 s), never after the bootstrap timeout.
    let yaml = ec2_config("{ max: 2, bootstrapTimeout: 10m, breakerThreshold: 5 }")
        .replace("bootTime: 45s", "bootTime: 45s, capacityErrors: 50%");
    let mut retried = 0;
    for seed in 1..=16 {
        let mut one = request(vec![load("half.yaml", &yaml)], jobs(&[ONE_JOB_ON_TICK]), false);
        one.seed = seed;
        let runs = simulate::run_all(&one);
        let totals = runs[0].total();
        let summary = totals.summary();
        assert_eq!((summary.jobs, summary.creates), (1, 1), "seed {seed}: the job ran on one agent");
        if (1..=2).contains(&totals.create_failures) {
            retried += 1;
            let wait = summary.wait_max_s.unwrap_or_default();
            assert!(
                wait > 45.0 && wait <= 45.0 + 70.0,
                "seed {seed}: {} refusals, waited {wait} s",
                totals.create_failures
            );
        }
    }
    assert!(retried >= 3, "enough seeds had a refused create: {retried}");
}

#[test]
fn an_incus_event_wakes_the_loop_when_an_ephemeral_container_goes() {
    // At most one ephemeral agent, polls every 30 s, containers boot in exactly 1 s. Job 1 arrives on the tick at
    // 09:00:00, whose create holds the cycle for the boot (so the next ticks are at :31 and :01); the agent runs it
    // 09:00:01-09:00:46. Job 2 (09:00:20) waits: `max: 1`.
    let config = |kind: &str| {
        format!(
            r#"id: ev
pollInterval: 30s
ci:
  wp: {{ kind: woodpecker, server: "https://ci.example.com", token: "${{T}}" }}
backends:
  box: {{ kind: {kind}, simulation: {{ bootTime: 1s }} }}
pools:
  - name: eph
    ci: {{ source: wp, labels: {{ platform: linux }} }}
    backend: {{ name: box, machine: {{ image: agent }} }}
    scale: {{ max: 1, ephemeral: true }}
"#
        )
    };
    let trace = jobs(&[
        r#"{"at": "2026-03-02T09:00:00Z", "duration": "45s", "labels": {"platform": "linux"}}"#,
        r#"{"at": "2026-03-02T09:00:20Z", "duration": "45s", "labels": {"platform": "linux"}}"#,
    ]);
    let runs = simulate::run_all(&request(
        vec![load("incus.yaml", &config("incus")), load("fake.yaml", &config("fake"))],
        trace,
        false,
    ));
    // Incus deletes the powered-off container and its event wakes the loop at 09:00:46: the replacement runs job 2
    // at 09:00:47, 27 s after it arrived. The fake backend sends no event: the replacement waits for the next
    // tick (09:01:01) at least.
    assert_eq!(total(&runs[0]).wait_max_s, Some(27.0));
    let without_events = total(&runs[1]).wait_max_s.unwrap_or_default();
    assert!(without_events >= 42.0, "{without_events}");
}

#[test]
fn simulation_settings_do_not_change_the_config_hash() {
    // Saved plans are refused when made from another config; tuning `simulate` must not make them stale.
    let plain = ec2_config("{ max: 2 }").replace(", simulation: { bootTime: 45s, prices: { \"*\": 0.10 USD } }", "");
    assert!(!plain.contains("simulation"));
    let hash = |yaml: &str| load("c.yaml", yaml).desired.config_hash;
    assert_eq!(hash(&plain), hash(&ec2_config("{ max: 2 }")));
    assert_eq!(hash(&ec2_config("{ max: 2 }")), hash(&ec2_config("{ max: 2 }").replace("45s", "2m")));
    assert_ne!(hash(&ec2_config("{ max: 2 }")), hash(&ec2_config("{ max: 3 }")), "the rest still counts");
}
