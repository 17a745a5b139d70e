//! `ciscale trace export` from the GitHub and Forgejo fakes: the jobs of a window with their queue, start and
//! finish times and `runs-on` labels, paging past GitHub's page size and its 1,000-result cap, jobs outside the
//! window and never started left out, located and secret-free errors, and the exported trace replayed by
//! `ciscale simulate` (the round trip).

use std::path::Path;

use ciscale::simulate::trace;
use jiff::Timestamp;

use crate::cli::{ciscale, run, stderr, stdout};
use crate::fakes::github::{FakeGithub, Fault, PastJobSpec, ORG, PAT};
use crate::simulate::simulate_json;

const T0: i64 = 1_772_442_000; // 2026-03-02T09:00:00Z
const WINDOW: [&str; 4] = ["--from", "2026-03-02T00:00:00Z", "--until", "2026-03-03T00:00:00Z"];

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

/// A GitHub source of `scope` (`organization: acme`, `repository: acme/app`) with a Linux pool and a GPU pool on
/// Incus (nothing is created: export and simulate make no backend call).
fn github_config(url: &str, scope: &str) -> String {
    format!(
        r#"id: exp
ci:
  gh: {{ kind: github, endpoint: "{url}", {scope}, token: "${{GH_TOKEN}}" }}
backends:
  lxd: {{ kind: incus }}
pools:
  - name: linux
    ci: {{ source: gh, labels: {{ docker: "" }} }}
    backend: {{ name: lxd, machine: {{ image: github-runner }} }}
    scale: {{ max: 4 }}
  - name: gpu
    ci: {{ source: gh, labels: {{ gpu: "" }} }}
    backend: {{ name: lxd, machine: {{ image: github-runner }} }}
    scale: {{ max: 1 }}
"#
    )
}

fn export(dir: &Path, out: &str) -> std::process::Output {
    export_with(dir, out, &[])
}

fn export_with(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let mut command = ciscale();
    command.current_dir(dir).env("GH_TOKEN", PAT).args(["trace", "export", "-c", "c.yaml"]);
    run(command.args(WINDOW).args(["-o", out]).args(extra))
}

/// (id, at, duration in seconds, demands) of each line.
fn lines(trace: &trace::Trace) -> Vec<(String, String, i64, Vec<String>)> {
    trace
        .jobs
        .iter()
        .map(|job| {
            (job.id.clone().unwrap_or_default(), job.at.to_string(), job.duration.as_secs(), job.demands.clone())
        })
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

#[test]
fn github_export_reads_workflow_jobs_with_their_times_and_runs_on_and_the_trace_replays() {
    assert_eq!(Timestamp::from_second(T0).expect("t0").to_string(), "2026-03-02T09:00:00Z");
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.add_repo("acme/lib");
    let linux = ["self-hosted", "linux", "docker"];
    let gpu = ["self-hosted", "gpu"];
    // build waits 30 s for a runner and runs 5 min; test is queued when build is done (its `needs`) and runs 5 min.
    let (build_run, _) = fake.add_past_run(
        "acme/app",
        T0,
        &[PastJobSpec::ran(&linux, T0, T0 + 30, T0 + 330), PastJobSpec::ran(&gpu, T0 + 330, T0 + 340, T0 + 640)],
    );
    // Cancelled while queued (GitHub still gives it a `started_at`), skipped, still queued and still running: not
    // in the trace.
    let skipped =
        PastJobSpec { conclusion: "skipped", ..PastJobSpec::cancelled_while_queued(&linux, T0 + 3600, T0 + 3600) };
    fake.add_past_run(
        "acme/lib",
        T0 + 3600,
        &[
            PastJobSpec::cancelled_while_queued(&linux, T0 + 3600, T0 + 3900),
            skipped,
            PastJobSpec::queued(&linux, T0 + 3600),
            PastJobSpec::running(&linux, T0 + 3600, T0 + 3610),
        ],
    );
    // A re-run: both attempts ran on runners and both are in the trace.
    let (rerun, _) = fake.add_past_run(
        "acme/lib",
        T0 + 7200,
        &[
            PastJobSpec { conclusion: "failure", ..PastJobSpec::ran(&linux, T0 + 7200, T0 + 7205, T0 + 7265) },
            PastJobSpec::ran(&linux, T0 + 7400, T0 + 7401, T0 + 7461).attempt(2),
        ],
    );
    // Created late the day before: one job queued before the window (left out), one inside it (kept).
    let (late_run, _) = fake.add_past_run(
        "acme/app",
        T0 - 10 * 3600,
        &[
            PastJobSpec::ran(&linux, T0 - 10 * 3600, T0 - 10 * 3600 + 5, T0 - 10 * 3600 + 65),
            PastJobSpec::ran(&linux, T0 - 8 * 3600, T0 - 8 * 3600 + 2, T0 - 8 * 3600 + 122),
        ],
    );
    // Two days before, and at the window's end (excluded: the window is [from, until)).
    fake.add_past_run(
        "acme/app",
        T0 - 2 * 86_400,
        &[PastJobSpec::ran(&linux, T0 - 2 * 86_400, T0 - 2 * 86_400 + 1, T0 - 2 * 86_400 + 60)],
    );
    fake.add_past_run(
        "acme/app",
        T0 + 15 * 3600,
        &[PastJobSpec::ran(&linux, T0 + 15 * 3600, T0 + 15 * 3600 + 1, T0 + 15 * 3600 + 60)],
    );
    // Live work of `watch`'s kind shares the fake: a queued job created now is outside the window.
    fake.queue_run("acme/app", &[&linux]);

    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "c.yaml", &github_config(&fake.url(), &format!("organization: {ORG}")));
    let output = export(dir.path(), "gh.jsonl");
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(!log.contains(PAT) && !stdout(&output).contains(PAT), "no token in the output");
    let exported = trace::read_file(&dir.path().join("gh.jsonl")).expect("a valid trace");
    assert_eq!(
        lines(&exported),
        vec![
            (format!("acme/app#{late_run}/job-{}", late_run + 3), "2026-03-02T01:00:00Z".into(), 120, strings(&linux)),
            (
                format!("acme/app#{build_run}/job-{}", build_run + 1),
                "2026-03-02T09:00:00Z".into(),
                300,
                strings(&linux)
            ),
            (format!("acme/app#{build_run}/job-{}", build_run + 3), "2026-03-02T09:05:30Z".into(), 300, strings(&gpu)),
            (format!("acme/lib#{rerun}/job-{}", rerun + 1), "2026-03-02T11:00:00Z".into(), 60, strings(&linux)),
            (
                format!("acme/lib#{rerun}/job-{} (attempt 2)", rerun + 3),
                "2026-03-02T11:03:20Z".into(),
                60,
                strings(&linux)
            ),
        ],
        "queued at `created_at`, run from `started_at` to `completed_at`, asking for `runs-on`"
    );
    assert!(exported.jobs.iter().all(|job| job.labels.get("repository").is_some_and(|repo| repo.starts_with("acme/"))));
    assert!(log.contains("ci source `gh`: 5 jobs"), "{log}");
    assert!(log.contains("3 that never started left out") && log.contains("1 still running left out"), "{log}");
    assert!(fake.spec_violations().is_empty(), "{:#?}", fake.spec_violations());
    // Runs were listed from a day before the window, every attempt's jobs read.
    let requests = fake.request_log();
    let run_lists: Vec<&String> = requests.iter().filter(|line| line.contains("/actions/runs?")).collect();
    assert_eq!(run_lists.len(), 2, "one list per repository: {requests:#?}");
    assert!(
        run_lists.iter().all(|line| line.contains("created=2026-03-01T00%3A00%3A00Z..2026-03-02T23%3A59%3A59Z")),
        "{run_lists:#?}"
    );
    assert!(requests.iter().filter(|line| line.contains("/jobs?")).all(|line| line.contains("filter=all")));

    // The round trip: the trace replays on the same config, the GPU job on the GPU pool, the rest on Linux.
    let value = simulate_json(dir.path(), "gh.jsonl");
    let jobs: Vec<(String, u64)> = value["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .map(|pool| (pool["pool"].as_str().unwrap_or_default().to_owned(), pool["jobs"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(jobs, vec![("linux".to_owned(), 4), ("gpu".to_owned(), 1)]);
}

/// `acme/app` on a GitHub fake whose rate limit a long history cannot exhaust.
fn big_repo() -> FakeGithub {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.set_rate_limit(100_000, 100_000);
    fake
}

/// `count` runs of `acme/app` from T0, `apart` seconds apart, each of one `self-hosted, linux` job that a runner
/// takes `waits` seconds after its run is created and that runs for `runs_for` seconds.
fn add_runs_of_one_job(fake: &FakeGithub, count: i64, apart: i64, waits: i64, runs_for: i64) {
    for n in 0..count {
        let at = T0 + apart * n;
        let job = PastJobSpec::ran(&["self-hosted", "linux"], at, at + waits, at + waits + runs_for);
        fake.add_past_run("acme/app", at, &[job]);
    }
}

/// `ciscale trace export` of `acme/app`'s history; it must succeed, and its trace must read back.
fn export_repo(fake: &FakeGithub) -> trace::Trace {
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "c.yaml", &github_config(&fake.url(), "repository: acme/app"));
    let output = export(dir.path(), "gh.jsonl");
    assert!(output.status.success(), "{}", stderr(&output));
    trace::read_file(&dir.path().join("gh.jsonl")).expect("a valid trace")
}

#[test]
fn github_export_pages_past_a_hundred_runs_and_a_hundred_jobs() {
    let fake = big_repo();
    let linux = ["self-hosted", "linux"];
    // 150 runs of one job, a minute apart, and one run of 120 jobs.
    add_runs_of_one_job(&fake, 150, 60, 10, 30);
    let wide: Vec<PastJobSpec> =
        (0..120).map(|n| PastJobSpec::ran(&linux, T0 + 20_000, T0 + 20_000 + n, T0 + 20_100 + n)).collect();
    fake.add_past_run("acme/app", T0 + 20_000, &wide);

    let exported = export_repo(&fake);
    assert_eq!(exported.jobs.len(), 270);
    assert_eq!(exported.jobs.iter().filter(|job| job.duration.as_secs() == 30).count(), 150);
    assert_eq!(exported.jobs.iter().filter(|job| job.duration.as_secs() == 100).count(), 120);
    let requests = fake.request_log();
    assert!(requests.iter().any(|line| line.contains("/actions/runs?") && line.contains("page=2")), "{requests:#?}");
    assert!(requests.iter().any(|line| line.contains("/jobs?") && line.contains("page=2")), "{requests:#?}");
    assert_eq!(
        requests.iter().filter(|line| line.contains("/jobs?")).count(),
        152,
        "one page per small run, two for the wide one"
    );
    assert!(fake.spec_violations().is_empty(), "{:#?}", fake.spec_violations());
}

#[test]
fn github_export_splits_a_window_with_more_runs_than_github_lists() {
    let fake = big_repo();
    // 1,050 runs in the window: GitHub would list only 1,000 of them for one `created` range.
    add_runs_of_one_job(&fake, 1050, 30, 5, 60);
    let exported = export_repo(&fake);
    assert_eq!(exported.jobs.len(), 1050, "none lost to the cap");
    let mut ats: Vec<i64> = exported.jobs.iter().map(|job| job.at.as_second()).collect();
    ats.dedup();
    assert_eq!(ats.len(), 1050, "none twice");
    let ranges: std::collections::BTreeSet<String> = fake
        .request_log()
        .iter()
        .filter(|line| line.contains("/actions/runs?"))
        .filter_map(|line| {
            line.split("created=").nth(1).map(|rest| rest.split('&').next().unwrap_or_default().to_owned())
        })
        .collect();
    assert!(ranges.len() >= 3, "the whole range, then its halves: {ranges:#?}");
    // What it cost: the whole range (capped at once), its two halves (the first empty, the second capped), the
    // quarters of the second (360 and 690 runs: 4 + 7 pages), and one jobs call per run.
    assert_eq!(fake.count("GET /repos/{owner}/{repo}/actions/runs"), 1 + 2 + 4 + 7);
    assert_eq!(fake.count("GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs"), 1050);
    assert!(fake.spec_violations().is_empty(), "{:#?}", fake.spec_violations());
}

#[test]
fn a_github_api_error_fails_the_export_with_a_located_secret_free_message() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.add_past_run("acme/app", T0, &[PastJobSpec::ran(&["self-hosted"], T0, T0 + 1, T0 + 60)]);
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "c.yaml", &github_config(&fake.url(), "repository: acme/app"));

    // The run list answers 502: the export fails, naming the source and the call.
    fake.fail_next(Fault::Status(502));
    let output = export(dir.path(), "gh.jsonl");
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("ci source `gh`"), "{log}");
    assert!(log.contains("workflow runs of `acme/app`") && log.contains("502"), "{log}");
    assert!(!log.contains(PAT) && !stdout(&output).contains(PAT), "{log}");
    assert!(!dir.path().join("gh.jsonl").exists(), "no partial trace is written");

    // A run's jobs refused (403, a token without Actions: read): the message names the run and what to grant.
    fake.fail_next(Fault::Delay(std::time::Duration::ZERO)); // the run list passes
    fake.fail_next(Fault::Status(403));
    let output = export(dir.path(), "gh.jsonl");
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("ci source `gh`") && log.contains("the jobs of run ") && log.contains("403"), "{log}");
    assert!(log.contains("hint:") && log.contains("Actions: read"), "{log}");
    assert!(!log.contains(PAT), "{log}");

    // A rate limit longer than the export may wait: it stops, says how long GitHub asks to wait and what would
    // wait it out.
    fake.fail_next(Fault::SecondaryLimit { status: 403, retry_after_secs: Some(120) });
    let output = export_with(dir.path(), "gh.jsonl", &["--rate-limit-wait", "1m"]);
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("ci source `gh` is rate limited for 120s") && log.contains("hint:"), "{log}");
    assert!(log.contains("a `--rate-limit-wait` of at least 120s"), "{log}");
    assert!(!log.contains(PAT), "{log}");
    assert!(!dir.path().join("gh.jsonl").exists(), "no partial trace is written");
}

#[test]
fn a_rate_limit_that_lifts_within_the_wait_is_waited_out_and_the_export_reads_on() {
    let fake = big_repo();
    add_runs_of_one_job(&fake, 20, 60, 10, 30);
    let dir = tempfile::tempdir().expect("temp dir");
    write(dir.path(), "c.yaml", &github_config(&fake.url(), "repository: acme/app"));
    // The first requests pass (repository, run list, a few runs' jobs); then GitHub asks for a second's pause in
    // the middle of the jobs, while other calls are in flight beside the refused one.
    for _ in 0..4 {
        fake.fail_next(Fault::Delay(std::time::Duration::ZERO));
    }
    fake.fail_next(Fault::SecondaryLimit { status: 403, retry_after_secs: Some(1) });
    let output = export(dir.path(), "gh.jsonl");
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert_eq!(log.matches("github rate limit reached: waiting 1s").count(), 1, "said once: {log}");
    let exported = trace::read_file(&dir.path().join("gh.jsonl")).expect("a valid trace");
    assert_eq!(exported.jobs.len(), 20, "nothing lost to the limit");
    assert_eq!(
        fake.count("GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs"),
        21,
        "every run's jobs read once, and the refused call once more"
    );
    assert!(!log.contains(PAT), "{log}");
}

#[test]
fn forgejo_has_no_readable_history_an_export_of_every_source_skips_it_and_naming_it_fails_with_a_hint() {
    const FJ_TOKEN: &str = "fj-export-token-0123456789abcdef0123456789ab";
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.add_past_run("acme/app", T0, &[PastJobSpec::ran(&["self-hosted", "docker"], T0, T0 + 20, T0 + 80)]);
    let dir = tempfile::tempdir().expect("temp dir");
    // Forgejo is never called: its server need not exist.
    let config = format!(
        r#"id: exp
ci:
  gh: {{ kind: github, endpoint: "{url}", repository: acme/app, token: "${{GH_TOKEN}}" }}
  fj: {{ kind: forgejo, server: "http://127.0.0.1:9", token: "${{FJ_TOKEN}}", organization: acme }}
backends:
  lxd: {{ kind: incus }}
pools:
  - name: linux
    ci: {{ source: gh, labels: {{ docker: "" }} }}
    backend: {{ name: lxd, machine: {{ image: github-runner }} }}
  - name: debian
    ci: {{ source: fj, labels: {{ debian: "docker://node:22-bookworm" }} }}
    backend: {{ name: lxd, machine: {{ image: forgejo-runner }} }}
"#,
        url = fake.url()
    );
    write(dir.path(), "c.yaml", &config);
    let export = |extra: &[&str]| {
        run(ciscale()
            .current_dir(dir.path())
            .env("GH_TOKEN", PAT)
            .env("FJ_TOKEN", FJ_TOKEN)
            .args(["trace", "export", "-c", "c.yaml"])
            .args(WINDOW)
            .args(extra))
    };

    // Every source: GitHub's jobs are written, Forgejo is skipped with a warning that says why.
    let output = export(&["-o", "all.jsonl"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains("warning: ci source `fj` skipped") && log.contains("runs-on") && log.contains("hint:"),
        "{log}"
    );
    assert!(log.contains("ci source `gh`: 1 jobs"), "{log}");
    let exported = trace::read_file(&dir.path().join("all.jsonl")).expect("a valid trace");
    assert_eq!(exported.jobs.len(), 1);
    assert_eq!(
        exported.jobs[0].ci.as_ref().map(ToString::to_string).as_deref(),
        Some("gh"),
        "two sources: each line names its own"
    );

    // Forgejo named: the export fails and says why and what to do instead, without the token.
    let output = export(&["--source", "fj"]);
    assert!(!output.status.success());
    let log = stderr(&output);
    assert!(log.contains("ci source `fj`") && log.contains("queued") && log.contains("hint:"), "{log}");
    assert!(!log.contains(FJ_TOKEN) && !log.contains(PAT), "{log}");
    assert!(stdout(&output).is_empty(), "no trace on stdout");

    // The GitHub part replays on the two-source config.
    let value = simulate_json(dir.path(), "all.jsonl");
    assert_eq!(value["total"]["jobs"], 1);
}

#[test]
fn github_export_reads_a_server_that_ignores_the_created_filter_newest_first() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let docker = ["self-hosted", "docker"];
    let (old, _) = fake.add_past_run(
        "acme/app",
        T0 - 3 * 86_400,
        &[PastJobSpec::ran(&docker, T0 - 3 * 86_400, T0 - 3 * 86_400 + 1, T0 - 3 * 86_400 + 61)],
    );
    fake.add_past_run("acme/app", T0, &[PastJobSpec::ran(&docker, T0, T0 + 10, T0 + 70)]);
    fake.add_past_run("acme/app", T0 + 60, &[PastJobSpec::ran(&docker, T0 + 60, T0 + 65, T0 + 185)]);
    // The first (filtered) list answers with every run, as a server without the filter would (the old run is
    // three days before the range asked for); the fake then serves unfiltered lists as they are.
    fake.serve_raw_once(
        "GET /repos/{owner}/{repo}/actions/runs",
        serde_json::json!({"total_count": 3, "workflow_runs": [{"id": old, "created_at": Timestamp::from_second(T0 - 3 * 86_400).expect("t").to_string()}]}),
    );
    let exported = export_repo(&fake);
    let durations: Vec<(String, i64)> =
        exported.jobs.iter().map(|job| (job.at.to_string(), job.duration.as_secs())).collect();
    assert_eq!(durations, vec![("2026-03-02T09:00:00Z".to_owned(), 60), ("2026-03-02T09:01:00Z".to_owned(), 120)]);
    let run_lists: Vec<String> =
        fake.request_log().into_iter().filter(|line| line.contains("/actions/runs?")).collect();
    assert_eq!(run_lists.len(), 2, "one filtered list, then one unfiltered: no splitting {run_lists:#?}");
    assert!(!run_lists[1].contains("created="), "{run_lists:#?}");
    assert_eq!(
        fake.count("GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs"),
        2,
        "the old run's jobs are not read"
    );
}
