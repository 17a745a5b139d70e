//! The GitHub Actions CI source against the in-repo GitHub fake: the conformance suite (App and token, every
//! scope, GitHub Enterprise Server's `/api/v3`), the queue (queued jobs inside queued and in-progress runs), App
//! auth (the JWT checked with the public key, token caching and renewal), conditional requests, rate limits,
//! just-in-time runners, busy refusals, webhooks, the calls an idle cycle costs, secrecy, older servers' answers,
//! and the runner launch wrapper run for real.

use std::sync::Arc;
use std::time::Duration;

use ciscale::model::{AgentId, PoolName, Secret};
use ciscale::providers::github::launch::{self, RunnerRelease};
use ciscale::providers::github::webhook::{self, Event, JobAction, WebhookError, WebhookVerifier};
use ciscale::providers::github::{Auth, GithubActions, GithubSettings, Repositories, RunnerArch, RunnerGroup, Scope};
use ciscale::providers::{CiSource, Error, RegisterAgent, TOKEN_ENV_NAME_KEY};
use reqwest::header::{HeaderMap, HeaderValue};

use crate::conformance::ci_conformance_replacing;
use crate::fakes::github::{
    FakeGithub, Fault, APP_ID, APP_KEY, ENTERPRISE, INSTALLATION_ID, JIT_SECRET_PREFIX, ORG, OTHER_KEY, PAT,
};

fn org() -> Scope {
    Scope::Organization { org: ORG.to_owned() }
}

fn repository(name: &str) -> Scope {
    let (owner, name) = name.split_once('/').expect("owner/name");
    Scope::Repository { owner: owner.to_owned(), name: name.to_owned() }
}

fn app_auth(key: &str) -> Auth {
    Auth::App { app_id: APP_ID.to_string(), installation_id: INSTALLATION_ID, private_key: Secret::new(key) }
}

fn app_settings(fake: &FakeGithub, scope: Scope) -> GithubSettings {
    GithubSettings { endpoint: fake.url(), ..GithubSettings::new(scope, app_auth(APP_KEY)) }
}

fn token_settings(fake: &FakeGithub, scope: Scope) -> GithubSettings {
    GithubSettings { endpoint: fake.url(), ..GithubSettings::new(scope, Auth::Token(Secret::new(PAT))) }
}

fn source(settings: GithubSettings) -> GithubActions {
    GithubActions::new(settings).expect("source")
}

fn assert_spec_clean(fake: &FakeGithub) {
    let violations = fake.spec_violations();
    assert!(violations.is_empty(), "traffic that does not match the GitHub spec:\n{}", violations.join("\n"));
}

fn register_request(name: &str, labels: &[(&str, &str)]) -> RegisterAgent {
    RegisterAgent {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect(),
        for_job: None,
    }
}

fn runner_id(id: &AgentId) -> u64 {
    id.as_str().parse().expect("numeric runner id")
}

// -- the contract ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn conformance_suite_passes_for_an_app_on_an_organisation() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    ci_conformance_replacing(Arc::new(source(app_settings(&fake, org()))), "gh-org").await;
    assert!(fake.runners().is_empty(), "the suite cleans up: {:?}", fake.runners());
    assert!(fake.count("POST /orgs/{org}/actions/runners/generate-jitconfig") >= 2);
    assert!(fake.count("DELETE /orgs/{org}/actions/runners/{runner_id}") >= 1);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn conformance_suite_passes_for_a_token_on_a_repository_of_github_enterprise_server() {
    let fake = FakeGithub::start_with_prefix("/api/v3");
    fake.add_repo("acme/app");
    ci_conformance_replacing(Arc::new(source(token_settings(&fake, repository("acme/app")))), "gh-repo").await;
    assert!(fake.runners().is_empty());
    assert!(fake.count("POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig") >= 2);
    assert_eq!(fake.count("GET /installation/repositories"), 0, "a repository scope lists nothing");
    assert!(fake.request_log().iter().all(|line| line.contains(" /api/v3/")), "{:?}", fake.request_log());
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn conformance_suite_passes_for_an_enterprise() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let settings = GithubSettings {
        repositories: Some(Repositories::Listed(vec!["acme/app".to_owned()])),
        ..token_settings(&fake, Scope::Enterprise { enterprise: ENTERPRISE.to_owned() })
    };
    ci_conformance_replacing(Arc::new(source(settings)), "gh-ent").await;
    assert!(fake.count("POST /enterprises/{enterprise}/actions/runners/generate-jitconfig") >= 2);
    assert_spec_clean(&fake);
}

#[test]
fn settings_that_cannot_work_are_refused_with_a_hint() {
    let fake_url = "http://127.0.0.1:9".to_owned();
    let enterprise =
        GithubSettings::new(Scope::Enterprise { enterprise: "e".to_owned() }, Auth::Token(Secret::new(PAT)));
    let error = GithubActions::new(enterprise).expect_err("no repositories");
    assert!(error.to_string().contains("hint: list `repositories`"), "{error}");

    let installation_with_token = GithubSettings {
        repositories: Some(Repositories::Installation),
        ..GithubSettings::new(org(), Auth::Token(Secret::new(PAT)))
    };
    assert!(matches!(GithubActions::new(installation_with_token), Err(Error::Invalid { .. })));

    let group_on_repository = GithubSettings {
        runner_group: Some(RunnerGroup::Id(3)),
        ..GithubSettings::new(repository("acme/app"), Auth::Token(Secret::new(PAT)))
    };
    assert!(GithubActions::new(group_on_repository).expect_err("group").to_string().contains("runner group"));

    let bad_endpoint = GithubSettings {
        endpoint: "ftp://github".to_owned(),
        ..GithubSettings::new(org(), Auth::Token(Secret::new(PAT)))
    };
    assert!(GithubActions::new(bad_endpoint).expect_err("endpoint").to_string().contains("`endpoint`"));

    let bad_listed = GithubSettings {
        endpoint: fake_url,
        repositories: Some(Repositories::Listed(vec!["no-slash".to_owned()])),
        ..GithubSettings::new(org(), Auth::Token(Secret::new(PAT)))
    };
    assert!(GithubActions::new(bad_listed).expect_err("listed").to_string().contains("`no-slash`"));
}

// -- the queue ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn observe_finds_queued_jobs_in_queued_and_in_progress_runs() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.add_repo("acme/lib");
    let busy_runner = fake.add_runner("orgs/acme", "manual-1", &["self-hosted", "Linux", "X64"]);
    let idle_runner = fake.add_runner("orgs/acme", "manual-2", &["self-hosted", "Linux", "X64", "gpu"]);
    // A queued run with two jobs.
    let (_, queued_jobs) = fake.queue_run("acme/app", &[&["self-hosted", "linux"], &["self-hosted", "gpu"]]);
    // A matrix wider than the runners: one job runs, the other waits in the now in-progress run.
    let (_, matrix) = fake.queue_run("acme/lib", &[&["self-hosted"], &["self-hosted"]]);
    fake.take_job(matrix[0], busy_runner);
    // Neither waiting for an approval nor done wants a runner.
    let (_, other) = fake.queue_run("acme/lib", &[&["self-hosted"], &["self-hosted"]]);
    fake.set_job_status(other[0], "waiting");
    fake.set_job_status(other[1], "completed");

    let github = source(app_settings(&fake, org()));
    let observed = github.observe().await.expect("observe");

    let pending: Vec<String> = observed.queue.pending.iter().map(|task| task.id.to_string()).collect();
    let mut expected = vec![queued_jobs[0].to_string(), queued_jobs[1].to_string(), matrix[1].to_string()];
    expected.sort();
    assert_eq!(pending, expected, "the queued job of the in-progress run is demand too");
    let gpu_job =
        observed.queue.pending.iter().find(|task| task.id.as_str() == queued_jobs[1].to_string()).expect("gpu job");
    assert_eq!(gpu_job.demands, ["self-hosted", "gpu"], "demands are the `runs-on` labels, in order");
    assert_eq!(gpu_job.labels.get("repository"), Some("acme/app"));
    assert_eq!(gpu_job.agent_id, None);

    assert_eq!(observed.queue.running.len(), 1);
    assert_eq!(observed.queue.running[0].id.as_str(), matrix[0].to_string());
    assert_eq!(observed.queue.running[0].agent_id, Some(AgentId::new(busy_runner.to_string())));

    let agent = |id: u64| observed.agents.iter().find(|agent| runner_id(&agent.id) == id).expect("listed");
    assert!(agent(busy_runner).busy);
    assert!(agent(busy_runner).last_work.is_some(), "a busy runner works now");
    assert!(!agent(idle_runner).busy);
    assert_eq!(agent(idle_runner).last_work, None, "GitHub keeps no work time; an idle runner has none");
    assert!(agent(idle_runner).last_contact.is_some(), "online is in contact now");
    assert!(!agent(idle_runner).no_schedule);
    assert_eq!(agent(idle_runner).labels.get("gpu").map(String::as_str), Some("custom"));
    assert_eq!(agent(idle_runner).labels.get("self-hosted").map(String::as_str), Some("read-only"));
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn archived_repositories_are_not_polled_and_a_vanished_one_is_skipped() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.add_repo("acme/old");
    fake.archive_repo("acme/old");
    let github = source(app_settings(&fake, org()));
    github.observe().await.expect("observe");
    assert!(fake.request_log().iter().all(|line| !line.contains("/repos/acme/old/")), "{:?}", fake.request_log());

    // Listed by hand but gone from GitHub: a warning, not a failed cycle.
    let listed = GithubSettings {
        repositories: Some(Repositories::Listed(vec!["acme/app".to_owned(), "acme/gone".to_owned()])),
        ..token_settings(&fake, org())
    };
    fake.queue_run("acme/app", &[&["self-hosted"]]);
    let observed = source(listed).observe().await.expect("a missing repository does not fail the cycle");
    assert_eq!(observed.queue.pending.len(), 1);
}

#[tokio::test]
async fn a_token_on_an_organisation_lists_the_organisations_repositories() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.queue_run("acme/app", &[&["self-hosted"]]);
    let observed = source(token_settings(&fake, org())).observe().await.expect("observe");
    assert_eq!(observed.queue.pending.len(), 1);
    assert_eq!(fake.count("GET /orgs/{org}/repos"), 1);
    assert_eq!(fake.count("GET /installation/repositories"), 0);
    assert_spec_clean(&fake);
}

// -- auth -----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_app_jwt_is_signed_rs256_backdated_and_short_lived() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let before = jiff::Timestamp::now().as_second();
    source(app_settings(&fake, org())).observe().await.expect("observe");
    let after = jiff::Timestamp::now().as_second();
    let claims = fake.jwt_claims();
    assert_eq!(claims.len(), 1, "one JWT for one installation token");
    let claims = &claims[0];
    assert_eq!(claims["iss"], serde_json::json!(APP_ID));
    let iat = claims["iat"].as_i64().expect("iat");
    let exp = claims["exp"].as_i64().expect("exp");
    assert!(iat >= before - 60 && iat <= after - 60, "iat is 60 s in the past: {iat} ({before}..{after})");
    assert_eq!(exp - iat, 600, "ten minutes, no more");
    assert_eq!(fake.tokens_minted(), 1);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn a_jwt_signed_with_another_key_is_refused() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let settings = GithubSettings { endpoint: fake.url(), ..GithubSettings::new(org(), app_auth(OTHER_KEY)) };
    let error = source(settings).observe().await.expect_err("refused");
    match &error {
        Error::Unauthenticated { message, .. } => {
            assert!(message.contains("installation token of GitHub App `4242`"), "{message}");
            assert!(message.contains("hint:"), "{message}");
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    assert_eq!(fake.tokens_minted(), 0);
    assert!(!error.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn installation_tokens_are_cached_and_renewed_before_they_expire() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(app_settings(&fake, org()));
    github.observe().await.expect("observe");
    github.observe().await.expect("observe");
    assert_eq!(fake.tokens_minted(), 1, "an hour-long token serves both cycles");

    // Tokens that expire within the renewal margin (5 min) are replaced before use.
    fake.set_token_lifetime(Duration::from_secs(4 * 60));
    let github = source(app_settings(&fake, org()));
    github.observe().await.expect("observe");
    let minted = fake.tokens_minted();
    fake.reset_counts();
    github.observe().await.expect("observe");
    let mints = fake.count("POST /app/installations/{installation_id}/access_tokens");
    let calls = fake.total_requests() - mints;
    assert_eq!(calls, 4, "repositories, queued runs, in-progress runs, runners");
    // Each token is already inside the margin when it arrives: no call is made with one, each gets a fresh one.
    assert_eq!(mints, calls, "a token 4 minutes from expiry is never used: renewed before each call");
    assert_eq!(fake.tokens_minted() as u64, minted as u64 + calls);
    assert_eq!(github.api_stats().token_mints, 2 * calls);

    // A token GitHub stopped taking (revoked, or a clock far off) is replaced and the call made again.
    fake.set_token_lifetime(Duration::from_secs(3600));
    let github = source(app_settings(&fake, org()));
    github.observe().await.expect("observe");
    let minted = fake.tokens_minted();
    fake.expire_tokens();
    github.observe().await.expect("the next cycle recovers on its own");
    assert_eq!(fake.tokens_minted(), minted + 1);
    assert_spec_clean(&fake);
}

// -- conditional requests and the rate limit ------------------------------------------------------------------

#[tokio::test]
async fn an_unchanged_world_is_answered_304_for_free_and_a_change_is_seen_at_once() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.queue_run("acme/app", &[&["self-hosted"]]);
    let github = source(app_settings(&fake, org()));
    let first = github.observe().await.expect("observe");
    fake.reset_counts();
    let second = github.observe().await.expect("observe");
    assert_eq!(second, first, "a 304 reuses the remembered answer");
    // repositories, queued runs, in-progress runs, the queued run's jobs, runners
    assert_eq!(fake.total_requests(), 5);
    assert_eq!(fake.not_modified(), 5, "every call was answered 304");
    assert_eq!(fake.primary_cost(), 0, "304s do not count against the primary limit");
    assert_eq!(github.api_stats().not_modified, 5);

    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "gpu"]]);
    let third = github.observe().await.expect("observe");
    assert!(
        third.queue.pending.iter().any(|task| task.id.as_str() == jobs[0].to_string()),
        "a new job is seen on the next cycle, not hidden by a remembered answer"
    );
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn remembered_answers_of_finished_runs_are_pruned() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted"]]);
    let github = source(app_settings(&fake, org()));
    github.observe().await.expect("observe");
    let with_run = github.remembered_answers();
    fake.set_job_status(jobs[0], "completed");
    github.observe().await.expect("observe");
    github.observe().await.expect("observe");
    assert_eq!(github.remembered_answers(), with_run - 1, "the finished run's jobs are forgotten");
}

#[tokio::test]
async fn the_rate_limit_budget_is_kept_from_the_headers() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.set_rate_limit(12_500, 12_500);
    let github = GithubActions::new(GithubSettings { conditional_requests: false, ..app_settings(&fake, org()) })
        .expect("source");
    assert_eq!(github.rate_budget(), None, "nothing known before the first call");
    github.observe().await.expect("observe");
    let budget = github.rate_budget().expect("budget");
    assert_eq!(budget.limit, 12_500);
    assert_eq!(budget.remaining, fake.rate_remaining());
    assert_eq!(budget.remaining, 12_500 - fake.primary_cost());
    assert_eq!(budget.resource.as_deref(), Some("core"));
}

#[tokio::test]
async fn an_exhausted_budget_stops_every_call_until_the_reset() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(token_settings(&fake, org()));
    fake.set_rate_limit(5000, 0);
    let error = github.observe().await.expect_err("limited");
    let Error::RateLimited { retry_after: Some(wait), .. } = error else {
        panic!("expected RateLimited with a wait, got {error:?}");
    };
    assert!(wait > Duration::from_secs(3000) && wait <= Duration::from_secs(3600), "until the reset: {wait:?}");
    let sent = fake.total_requests();
    let again = github.observe().await;
    assert!(matches!(again, Err(Error::RateLimited { .. })), "{again:?}");
    assert_eq!(fake.total_requests(), sent, "no request is sent while the limit lasts");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn secondary_limits_wait_as_long_as_github_asks_or_a_minute() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.fail_next(Fault::SecondaryLimit { status: 403, retry_after_secs: Some(30) });
    let github = source(token_settings(&fake, org()));
    let error = github.observe().await.expect_err("secondary limit");
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait), .. } if wait == Duration::from_secs(30)),
        "{error:?}"
    );
    let sent = fake.total_requests();
    assert!(matches!(github.observe().await, Err(Error::RateLimited { .. })));
    assert_eq!(fake.total_requests(), sent, "blocked locally for those 30 s");

    let github = source(token_settings(&fake, org()));
    fake.fail_next(Fault::SecondaryLimit { status: 429, retry_after_secs: None });
    let error = github.observe().await.expect_err("secondary limit");
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait), .. } if wait == Duration::from_secs(60)),
        "without Retry-After GitHub asks for at least a minute: {error:?}"
    );

    // A 403 that is not a limit is a permission problem, with a hint.
    let github = source(token_settings(&fake, org()));
    fake.fail_next(Fault::Status(403));
    let error = github.observe().await.expect_err("forbidden");
    assert!(matches!(&error, Error::Unauthenticated { message, .. } if message.contains("hint:")), "{error:?}");
}

#[tokio::test]
async fn server_errors_and_bad_answers_fail_the_cycle_cleanly() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(token_settings(&fake, org()));
    fake.fail_next(Fault::Status(502));
    assert!(matches!(github.observe().await, Err(Error::Unavailable { .. })));
    fake.fail_next(Fault::MalformedJson);
    let error = github.observe().await.expect_err("malformed");
    assert!(matches!(error, Error::Other { .. }), "{error:?}");
    assert!(error.to_string().contains("unexpected answer to"), "{error}");
    github.observe().await.expect("the next cycle works");

    let slow =
        GithubActions::new(GithubSettings { timeout: Duration::from_millis(200), ..token_settings(&fake, org()) })
            .expect("source");
    fake.fail_next(Fault::Delay(Duration::from_secs(2)));
    let error = slow.observe().await.expect_err("timeout");
    assert!(matches!(&error, Error::Unavailable { message, .. } if message.contains("no answer within")), "{error:?}");
}

#[tokio::test]
async fn older_servers_answers_are_read_safely() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.queue_run("acme/app", &[&["self-hosted"]]);
    // No `total_count`, a runner without `busy`, `status` or `labels`, a job without `status` or `labels`.
    fake.serve_raw_once(
        "GET /orgs/{org}/actions/runners",
        serde_json::json!({ "runners": [{ "id": 5, "name": "old-runner" }] }),
    );
    fake.serve_raw_once(
        "GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs",
        serde_json::json!({ "jobs": [{ "id": 9 }, { "id": 10, "status": "queued", "labels": null }] }),
    );
    let observed = source(token_settings(&fake, org())).observe().await.expect("observe");
    let old = observed.agents.iter().find(|agent| agent.name == "old-runner").expect("listed");
    assert!(old.busy, "a runner that does not say is treated as busy: never removed");
    assert_eq!(old.last_contact, None);
    assert!(old.labels.is_empty());
    assert_eq!(observed.queue.pending.len(), 1, "the job without a status is left out");
    assert!(observed.queue.pending[0].demands.is_empty(), "no labels: matches no runner");
}

// -- what an idle cycle costs ---------------------------------------------------------------------------------

/// Requests and primary-limit cost of one idle cycle (after a first one), for an organisation of `repositories`.
async fn idle_cycle(repositories: usize, conditional: bool) -> (u64, u64) {
    let fake = FakeGithub::start();
    for index in 0..repositories {
        fake.add_repo(&format!("acme/repo-{index:03}"));
    }
    let github = GithubActions::new(GithubSettings { conditional_requests: conditional, ..app_settings(&fake, org()) })
        .expect("source");
    github.observe().await.expect("first cycle");
    fake.reset_counts();
    github.observe().await.expect("idle cycle");
    assert_spec_clean(&fake);
    (fake.total_requests(), fake.primary_cost())
}

#[tokio::test]
async fn idle_cycles_cost_for_1_and_50_repositories() {
    let mut table = String::from("repositories | requests per idle cycle | primary cost with ETags | without ETags\n");
    for repositories in [1usize, 50] {
        let (requests, cost_with) = idle_cycle(repositories, true).await;
        let (requests_without, cost_without) = idle_cycle(repositories, false).await;
        // ⌈N/100⌉ repository pages + 2·N run lists + one runner page.
        let expected = repositories.div_ceil(100) as u64 + 2 * repositories as u64 + 1;
        assert_eq!(requests, expected, "{repositories} repositories");
        assert_eq!(requests_without, expected);
        assert_eq!(cost_with, 0, "an idle cycle is all 304s");
        assert_eq!(cost_without, expected, "without ETags every request costs");
        table.push_str(&format!("{repositories} | {requests} | {cost_with} | {cost_without}\n"));
    }
    eprintln!("{table}");
}

#[tokio::test]
async fn a_rotation_polls_500_repositories_within_the_secondary_limit() {
    let fake = FakeGithub::start();
    let names: Vec<String> = (0..500).map(|index| format!("acme/repo-{index:03}")).collect();
    for name in &names {
        fake.add_repo(name);
    }
    let github = source(GithubSettings { repositories_per_observe: Some(60), ..app_settings(&fake, org()) });
    let mut per_cycle = Vec::new();
    let mut log = Vec::new();
    for _ in 0..9 {
        fake.reset_counts();
        github.observe().await.expect("observe");
        // The installation token is minted once, in the first cycle; it is not a polling cost.
        let cycle: Vec<String> =
            fake.request_log().into_iter().filter(|line| !line.contains("/access_tokens")).collect();
        per_cycle.push(cycle.len() as u64);
        log.extend(cycle);
    }
    // Every repository was polled exactly once (queued and in-progress runs) in one rotation of 9 cycles.
    for name in &names {
        let polls = log.iter().filter(|line| line.starts_with(&format!("GET /repos/{name}/actions/runs?"))).count();
        assert_eq!(polls, 2, "{name} in one rotation");
    }
    let runs_per_cycle = per_cycle.iter().max().copied().unwrap_or_default();
    eprintln!("500 repositories, 60 per cycle: requests per cycle {per_cycle:?}");
    // 5 repository pages at the start of a rotation + 120 run lists + 1 runner page.
    assert_eq!(per_cycle[0], 5 + 120 + 1);
    assert!(per_cycle[1..8].iter().all(|requests| *requests == 121), "{per_cycle:?}");
    assert_eq!(per_cycle[8], 2 * 20 + 1, "the last 20");
    // At one cycle per 10 s: 720 run-list requests a minute, under the 900 points a minute of the secondary limit.
    assert!(runs_per_cycle * 6 <= 900, "{runs_per_cycle} a cycle");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn busy_repositories_are_polled_every_cycle_and_quiet_ones_in_turn() {
    let fake = FakeGithub::start();
    let names: Vec<String> = (0..10).map(|index| format!("acme/repo-{index}")).collect();
    for name in &names {
        fake.add_repo(name);
    }
    let github = source(GithubSettings { repositories_per_observe: Some(3), ..app_settings(&fake, org()) });
    // A job queued in a quiet repository is found within one rotation (4 cycles of 3).
    fake.queue_run("acme/repo-8", &[&["self-hosted"]]);
    let mut found_at = None;
    for cycle in 0..4 {
        let observed = github.observe().await.expect("observe");
        if !observed.queue.pending.is_empty() && found_at.is_none() {
            found_at = Some(cycle);
        }
    }
    assert_eq!(found_at, Some(2), "repo-8 is in the third batch of three");
    // From then on it is polled every cycle, as long as it has a queued job.
    fake.reset_counts();
    for _ in 0..3 {
        let observed = github.observe().await.expect("observe");
        assert_eq!(observed.queue.pending.len(), 1, "a busy repository never drops out of the queue");
    }
    let polls = |log: &[String], name: &str| {
        log.iter().filter(|line| line.starts_with(&format!("GET /repos/{name}/actions/runs?status=queued"))).count()
    };
    assert_eq!(polls(&fake.request_log(), "acme/repo-8"), 3);

    // A webhook names a quiet repository: it is polled on the next cycle, whatever the rotation.
    fake.reset_counts();
    let (_, jobs) = fake.queue_run("acme/repo-0", &[&["self-hosted"]]);
    let payload = fake.workflow_job_payload(jobs[0], "queued");
    let body = serde_json::to_vec(&payload).expect("body");
    let verifier = WebhookVerifier::new(Secret::new("hook-secret")).expect("verifier");
    let delivery = verifier
        .receive(&delivery_headers(&webhook::sign(&Secret::new("hook-secret"), &body), "workflow_job"), &body)
        .expect("delivery");
    let Event::WorkflowJob(event) = delivery.event else {
        panic!("a workflow_job event");
    };
    github.note_workflow_job(&event);
    let observed = github.observe().await.expect("observe");
    assert!(observed.queue.pending.iter().any(|task| task.id.as_str() == jobs[0].to_string()));
    assert_eq!(polls(&fake.request_log(), "acme/repo-0"), 1);
    assert_spec_clean(&fake);
}

// -- runners --------------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_makes_a_just_in_time_runner_with_implicit_and_pool_labels() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let group = fake.add_runner_group("ciscale");
    let github = source(GithubSettings {
        runner_group: Some(RunnerGroup::Name("CISCALE".to_owned())),
        owner: Some("acme".to_owned()),
        ..app_settings(&fake, org())
    });
    // The pool's labels by their keys (`linux` is the implicit `Linux` already); ciscale's own keys stay home.
    let request = register_request("acme-linux-1", &[("gpu", ""), ("linux", ""), ("ciscale.ephemeral", "true")]);
    let credential = github.register(&request).await.expect("register");
    let runner = fake.runner_by_name("acme-linux-1").expect("registered");
    assert_eq!(credential.agent_id.as_str(), runner.id.to_string());
    assert_eq!(runner.labels, ["self-hosted", "Linux", "X64", "gpu", "ciscale-owner:acme"]);
    assert_eq!(runner.group_id, group, "the group named in the settings, looked up by name");
    assert!(runner.ephemeral);
    assert_eq!(Some(credential.token.expose()), runner.jit_config.as_deref(), "the JIT config is the credential");
    assert_eq!(
        credential.env.get(TOKEN_ENV_NAME_KEY).map(String::as_str),
        Some(launch::JIT_CONFIG_ENV),
        "the runner reads it from ACTIONS_RUNNER_INPUT_JITCONFIG"
    );
    assert_eq!(credential.env.len(), 1, "nothing else: the config holds the URL and the name");

    // A group looked up once serves every later registration.
    github.register(&register_request("acme-linux-2", &[])).await.expect("register");
    assert_eq!(fake.count("GET /orgs/{org}/actions/runner-groups"), 1);

    let missing = source(GithubSettings {
        runner_group: Some(RunnerGroup::Name("nope".to_owned())),
        ..app_settings(&fake, org())
    });
    let error = missing.register(&register_request("x", &[])).await.expect_err("no such group");
    assert!(error.to_string().contains("`Default`") && error.to_string().contains("`ciscale`"), "{error}");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn a_runner_takes_one_job_and_is_gone_with_it() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(app_settings(&fake, org()));
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "linux", "x64"]]);
    let credential = github.register(&register_request("acme-linux-1", &[])).await.expect("register");
    let id = runner_id(&credential.agent_id);

    let observed = github.observe().await.expect("observe");
    let agent = observed.agents.iter().find(|agent| agent.id == credential.agent_id).expect("listed");
    assert_eq!(agent.last_contact, None, "registered, not yet started: offline");

    fake.connect_runner(id);
    fake.take_job(jobs[0], id);
    let observed = github.observe().await.expect("observe");
    assert!(observed.agents.iter().any(|agent| agent.id == credential.agent_id && agent.busy));
    assert_eq!(observed.queue.running[0].agent_id.as_ref(), Some(&credential.agent_id));
    assert!(observed.queue.pending.is_empty());

    fake.finish_job(jobs[0]);
    let observed = github.observe().await.expect("observe");
    assert!(observed.agents.is_empty(), "a just-in-time runner goes with its job");
    assert!(observed.queue.running.is_empty() && observed.queue.pending.is_empty());
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn register_replaces_an_idle_leftover_but_never_a_busy_runner() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(app_settings(&fake, org()));
    let first = github.register(&register_request("acme-linux-1", &[])).await.expect("register");
    let again = github.register(&register_request("acme-linux-1", &[])).await.expect("register again");
    assert_ne!(again.agent_id, first.agent_id);
    assert_eq!(fake.runners().len(), 1, "the leftover was replaced");

    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted"]]);
    let id = runner_id(&again.agent_id);
    fake.connect_runner(id);
    fake.take_job(jobs[0], id);
    let error = github.register(&register_request("acme-linux-1", &[])).await.expect_err("busy");
    assert!(matches!(&error, Error::AlreadyExists { what } if what.contains("running a job")), "{error:?}");
    assert!(fake.runner_by_name("acme-linux-1").is_some_and(|runner| runner.id == id && runner.busy), "untouched");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn a_busy_runner_is_never_removed() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let github = source(app_settings(&fake, org()));
    let credential = github.register(&register_request("acme-linux-1", &[])).await.expect("register");
    let id = runner_id(&credential.agent_id);
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted"]]);
    fake.connect_runner(id);
    fake.take_job(jobs[0], id);

    let error = github.deregister(&credential.agent_id).await.expect_err("busy");
    match &error {
        Error::Invalid { message, .. } => {
            assert!(message.contains("is running a job") && message.contains("422"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(fake.runner_by_name("acme-linux-1").is_some(), "GitHub kept it");
    assert!(matches!(github.drain(&credential.agent_id).await, Err(Error::Unsupported { .. })));
    assert!(!github.capabilities().drain && github.capabilities().single_job);

    let missing = github.deregister(&AgentId::new("999999")).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    let not_a_number = github.deregister(&AgentId::new("runner-x")).await;
    assert!(matches!(not_a_number, Err(Error::NotFound { .. })), "{not_a_number:?}");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn a_runner_without_any_label_is_refused_before_calling_github() {
    let fake = FakeGithub::start();
    let github = source(GithubSettings { platform: None, ..app_settings(&fake, org()) });
    let error = github.register(&register_request("bare", &[])).await.expect_err("no label");
    assert!(error.to_string().contains("at least one"), "{error}");
    assert_eq!(fake.count("POST /orgs/{org}/actions/runners/generate-jitconfig"), 0);
    let labelled = github.runner_labels(&register_request("x", &[("gpu", "")]));
    assert_eq!(labelled, ["gpu"], "without a platform only the pool's labels");
}

// -- webhooks -------------------------------------------------------------------------------------------------

fn delivery_headers(signature: &str, event: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(webhook::SIGNATURE_HEADER, HeaderValue::from_str(signature).expect("header"));
    headers.insert(webhook::EVENT_HEADER, HeaderValue::from_str(event).expect("header"));
    headers.insert(webhook::DELIVERY_HEADER, HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
    headers
}

#[tokio::test]
async fn webhook_deliveries_are_verified_before_they_are_read() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let runner = fake.add_runner("orgs/acme", "r1", &["self-hosted", "gpu"]);
    let (run_id, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "gpu"]]);
    let secret = Secret::new("It's a Secret to Everybody");
    let verifier = WebhookVerifier::new(secret.clone()).expect("verifier");

    let queued = serde_json::to_vec(&fake.workflow_job_payload(jobs[0], "queued")).expect("json");
    let delivery = verifier
        .receive(&delivery_headers(&webhook::sign(&secret, &queued), "workflow_job"), &queued)
        .expect("a good signature");
    assert_eq!(delivery.id.as_deref(), Some("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
    let Event::WorkflowJob(event) = delivery.event else {
        panic!("workflow_job");
    };
    assert_eq!(event.action, JobAction::Queued);
    assert_eq!((event.job_id, event.run_id), (jobs[0], run_id));
    assert_eq!(event.repository, "acme/app");
    assert_eq!(event.labels, ["self-hosted", "gpu"]);
    assert!(event.wakes_loop());
    let task = event.task();
    assert_eq!(task.demands, ["self-hosted", "gpu"]);
    assert_eq!(task.id.as_str(), jobs[0].to_string());

    fake.take_job(jobs[0], runner);
    for (action, wakes) in [("in_progress", false), ("completed", true), ("waiting", false)] {
        let body = serde_json::to_vec(&fake.workflow_job_payload(jobs[0], action)).expect("json");
        let delivery = verifier
            .receive(&delivery_headers(&webhook::sign(&secret, &body), "workflow_job"), &body)
            .expect("verified");
        let Event::WorkflowJob(event) = delivery.event else {
            panic!("workflow_job");
        };
        assert_eq!(event.wakes_loop(), wakes, "{action}");
        if action != "waiting" {
            assert_eq!(event.runner_id, Some(runner), "{action}");
        }
    }

    // Forged: signed with another secret; tampered: the body changed after signing.
    let forged = webhook::sign(&Secret::new("guess"), &queued);
    assert_eq!(verifier.receive(&delivery_headers(&forged, "workflow_job"), &queued), Err(WebhookError::BadSignature));
    let mut tampered = queued.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert_eq!(
        verifier.receive(&delivery_headers(&webhook::sign(&secret, &queued), "workflow_job"), &tampered),
        Err(WebhookError::BadSignature)
    );
    // Missing.
    let mut unsigned = delivery_headers("x", "workflow_job");
    unsigned.remove(webhook::SIGNATURE_HEADER);
    assert_eq!(verifier.receive(&unsigned, &queued), Err(WebhookError::MissingSignature));
    // Oversized: refused before the signature is even computed.
    let small = verifier.clone().with_max_body(1024);
    assert_eq!(
        small.receive(&delivery_headers(&webhook::sign(&secret, &queued), "workflow_job"), &queued),
        Err(WebhookError::TooLarge { size: queued.len(), limit: 1024 })
    );
    // Signed but not GitHub's shape: a clear error, nothing half-read.
    let junk = br#"{"action": "queued"}"#;
    let error = verifier
        .receive(&delivery_headers(&webhook::sign(&secret, junk), "workflow_job"), junk)
        .expect_err("no workflow_job");
    assert!(matches!(error, WebhookError::Payload { .. }) && error.status() == 400, "{error:?}");
    // Other events pass through as such.
    let ping = br#"{"zen": "Keep it logically awesome."}"#;
    let delivery = verifier.receive(&delivery_headers(&webhook::sign(&secret, ping), "ping"), ping).expect("ping");
    assert_eq!(delivery.event, Event::Ping);
    let push = verifier.receive(&delivery_headers(&webhook::sign(&secret, ping), "push"), ping).expect("push");
    assert_eq!(push.event, Event::Other("push".to_owned()));
    assert!(!format!("{verifier:?}").contains("Everybody"), "the secret is not in Debug");
    assert_spec_clean(&fake);
}

// -- secrecy --------------------------------------------------------------------------------------------------

#[tokio::test]
async fn secrets_never_appear_in_errors_or_debug_output() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let app = source(app_settings(&fake, org()));
    let token = source(token_settings(&fake, org()));
    let credential = app.register(&register_request("acme-linux-1", &[])).await.expect("register");
    app.observe().await.expect("observe");
    let key_body: String = APP_KEY.lines().nth(1).expect("a key line").to_owned();
    let jit = credential.token.expose().to_owned();

    let mut texts = vec![
        format!("{app:?}"),
        format!("{token:?}"),
        format!("{credential:?}"),
        format!("{:?}", app_settings(&fake, org())),
        format!("{:?}", token_settings(&fake, org())),
    ];
    // Every kind of failure, through both credentials.
    for fault in [Fault::Status(401), Fault::Status(403), Fault::Status(404), Fault::Status(500), Fault::MalformedJson]
    {
        for github in [&app, &token] {
            fake.fail_next(fault.clone());
            if let Err(error) = github.observe().await {
                texts.push(error.to_string());
                texts.push(format!("{error:?}"));
            }
        }
    }
    let busy_error = {
        let id = runner_id(&credential.agent_id);
        let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted"]]);
        fake.connect_runner(id);
        fake.take_job(jobs[0], id);
        app.deregister(&credential.agent_id).await.expect_err("busy")
    };
    texts.push(format!("{busy_error:?}"));
    let refused = source(GithubSettings { endpoint: fake.url(), ..GithubSettings::new(org(), app_auth(OTHER_KEY)) })
        .observe()
        .await
        .expect_err("refused");
    texts.push(format!("{refused:?}"));
    let bad_key = GithubActions::new(GithubSettings::new(
        org(),
        app_auth("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----"),
    ))
    .expect_err("bad key");
    texts.push(format!("{bad_key:?}"));

    let minted: Vec<String> = (1..=fake.tokens_minted()).map(|n| format!("ghs_fake{n:016x}")).collect();
    for text in &texts {
        assert!(!text.contains(PAT), "the token leaked: {text}");
        assert!(!text.contains(&key_body), "the private key leaked: {text}");
        assert!(!text.contains(&jit), "the JIT config leaked: {text}");
        assert!(!text.contains(JIT_SECRET_PREFIX), "a runner credential leaked: {text}");
        assert!(!text.contains("eyJ"), "a JWT leaked: {text}");
        for token in &minted {
            assert!(!text.contains(token.as_str()), "an installation token leaked: {text}");
        }
    }
    assert!(texts.len() > 12, "the failures were provoked: {}", texts.len());
}

// -- the launch wrapper, run for real -------------------------------------------------------------------------

#[test]
fn the_wrapper_hands_the_config_to_run_sh_in_its_environment_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("runner");
    std::fs::create_dir(&home).expect("runner home");
    let seen = dir.path().join("seen");
    let run_sh = home.join("run.sh");
    std::fs::write(&run_sh, format!("#!/bin/sh\n{{ echo \"args=$#\"; env; }} > '{}'\nexit 3\n", seen.display()))
        .expect("stub run.sh");
    let wrapper = dir.path().join("ciscale-agent");
    std::fs::write(&wrapper, launch::WRAPPER_SCRIPT).expect("wrapper");
    for path in [&run_sh, &wrapper] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    // A config with the characters a shell would mangle if the file were sourced.
    let config = "eyJydW5uZXIiOiJ4In0= $HOME `id` \"q' ;x";
    let env_file = dir.path().join("agent.env");
    std::fs::write(
        &env_file,
        format!(
            "ACTIONS_RUNNER_INPUT_JITCONFIG={config}\nCISCALE_AGENT_TOKEN={config}\nCISCALE_AGENT_ID=12\nPOOL_SETTING=a=b\n"
        ),
    )
    .expect("env file");
    let powered_off = dir.path().join("powered-off");
    let status = std::process::Command::new(&wrapper)
        .env("CISCALE_AGENT_ENV", &env_file)
        .env("CISCALE_RUNNER_HOME", &home)
        .env("CISCALE_RUNNER_USER", "root")
        .env("CISCALE_POWEROFF", format!("touch {}", powered_off.display()))
        .status()
        .expect("run the wrapper");
    assert_eq!(status.code(), Some(3), "the runner's exit status is the wrapper's");
    assert!(!env_file.exists(), "the credential file is gone once read");
    assert!(powered_off.exists(), "the instance powers off after its one job");
    let seen = std::fs::read_to_string(&seen).expect("run.sh ran");
    assert!(seen.contains("args=0"), "no argument: the config is not on the command line\n{seen}");
    assert!(
        seen.lines().any(|line| line == format!("ACTIONS_RUNNER_INPUT_JITCONFIG={config}")),
        "the config arrives verbatim\n{seen}"
    );
    assert!(seen.lines().any(|line| line == "POOL_SETTING=a=b"), "{seen}");
    assert!(!seen.contains("CISCALE_AGENT_TOKEN"), "the duplicate is dropped\n{seen}");
}

#[test]
fn the_install_and_cloud_scripts_are_valid_shell_and_cloud_config() {
    let release = RunnerRelease::for_arch(RunnerArch::X64).expect("x64");
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |name: &str, script: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, script).expect("script");
        let status = std::process::Command::new("sh").arg("-n").arg(&path).status().expect("sh -n");
        assert!(status.success(), "{name} is not valid sh:\n{script}");
    };
    check("wrapper", launch::WRAPPER_SCRIPT);
    check("install", &launch::install_script(release));

    let env_file = Secret::new("ACTIONS_RUNNER_INPUT_JITCONFIG=abc\n");
    let user_data = launch::cloud_user_data(release, &env_file).expect("user data");
    let text = user_data.expose();
    assert!(text.starts_with("#cloud-config\n"));
    let document: serde_yaml::Value = serde_yaml::from_str(text).expect("YAML");
    let files = document["write_files"].as_sequence().expect("write_files");
    let env = files.iter().find(|file| file["path"].as_str() == Some(launch::ENV_FILE)).expect("the env file");
    assert_eq!(env["permissions"].as_str(), Some("0400"), "root only, read once by the wrapper");
    assert_eq!(env["content"].as_str(), Some("ACTIONS_RUNNER_INPUT_JITCONFIG=abc\n"));
    for file in files {
        let content = file["content"].as_str().expect("content");
        if content.starts_with("#!/bin/sh") {
            check("from-cloud-init", content);
        }
    }
    let blocker = files
        .iter()
        .filter_map(|file| file["content"].as_str())
        .find(|content| content.contains(launch::METADATA_ADDRESS))
        .expect("the metadata block");
    assert!(blocker.contains("--uid-owner runner"), "{blocker}");
    let commands = document["runcmd"].as_sequence().expect("runcmd");
    assert_eq!(
        commands
            .last()
            .and_then(|command| command.as_sequence())
            .and_then(|command| command.last())
            .and_then(|part| part.as_str()),
        Some(launch::AGENT_COMMAND),
        "the wrapper starts last, after install and the metadata block"
    );
    assert!(!format!("{user_data:?}").contains("abc"));
}

/// The provisioning script the GitHub example's image is built with is exactly what the room installs: the
/// pinned release, its checksum and the wrapper (`CISCALE_UPDATE_EXAMPLES=1` rewrites it).
#[test]
fn the_examples_provisioning_script_is_the_rooms_install_script() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/provision/github-runner.sh");
    let release = RunnerRelease::for_arch(RunnerArch::X64).expect("x64");
    let script = launch::install_script(release);
    if std::env::var_os("CISCALE_UPDATE_EXAMPLES").is_some() {
        std::fs::write(&path, &script).expect("write the example script");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == script,
        "examples/provision/github-runner.sh is stale; rewrite it with `CISCALE_UPDATE_EXAMPLES=1 cargo test --test it \
         github::the_examples_provisioning_script`"
    );
}

// -- the config ---------------------------------------------------------------------------------------------------

/// A `kind: github` config against the fake: it loads into the exact spec (implicit labels on the pool), the
/// registry connects it, the planner's match counts the jobs its runners can take, and the connected source
/// registers runners with the pool's labels and the owner label.
#[tokio::test]
async fn a_github_config_is_connected_and_matched_end_to_end() {
    use ciscale::model::{CiKind, CiName, GithubAuth, GithubScope, GithubSpec, PoolName};
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.queue_run("acme/app", &[&["self-hosted", "linux", "docker"], &["self-hosted", "gpu"], &["ubuntu-latest"]]);
    let text = format!(
        "id: gh\nci:\n  github:\n    kind: github\n    endpoint: {}\n    organization: {ORG}\n    app:\n      appId: {APP_ID}\n      \
         installationId: {INSTALLATION_ID}\n      privateKey: ${{GITHUB_APP_KEY}}\n    webhookSecret: ${{GITHUB_WEBHOOK_SECRET}}\nbackends:\n  f: {{ kind: fake }}\npools:\n  \
         - name: linux\n    ci: {{ source: github, labels: {{ docker: \"\" }} }}\n    backend: {{ name: f }}\n",
        fake.url()
    );
    let env = |name: &str| match name {
        "GITHUB_APP_KEY" => Some(APP_KEY.to_owned()),
        "GITHUB_WEBHOOK_SECRET" => Some("hook-secret".to_owned()),
        _ => None,
    };
    let desired = ciscale::config::load_str("github.yaml", &text, &env).expect("loads");
    let CiKind::Github(spec) = &desired.ci[&CiName::new("github")].kind else {
        panic!("a github source: {:?}", desired.ci);
    };
    assert_eq!(
        spec,
        &GithubSpec {
            endpoint: Some(fake.url()),
            scope: GithubScope::Organization(ORG.to_owned()),
            auth: GithubAuth::App {
                app_id: APP_ID.to_string(),
                installation_id: INSTALLATION_ID,
                private_key: Secret::new(APP_KEY),
            },
            runner_group: None,
            repositories: None,
            repositories_per_cycle: None,
            webhook_secret: Some(Secret::new("hook-secret")),
            arm64: false,
        }
    );
    let pool = desired.pool(&PoolName::new("linux")).expect("pool");
    let offered: Vec<&str> = pool.ci.labels.keys().map(String::as_str).collect();
    assert_eq!(offered, ["Linux", "X64", "docker", "self-hosted"], "the implicit labels are offered too");
    assert!(!format!("{desired:?}").contains("PRIVATE KEY"), "the key is a secret");

    let providers = ciscale::providers::connect(&desired).expect("connect");
    let github = providers.ci[&CiName::new("github")].clone();
    assert_eq!(github.kind(), "github");
    assert_eq!(github.capabilities(), ciscale::providers::github::CAPABILITIES);
    assert_eq!(ciscale::providers::ci_capabilities(&desired.ci[&CiName::new("github")].kind), github.capabilities());

    // The plan counts the one job the pool's runners can take (not the GPU one, not the GitHub-hosted one).
    let observed = ciscale::observe::observe(&desired, &providers, jiff::Timestamp::now()).await.expect("observe");
    assert_eq!(observed.ci[&CiName::new("github")].queue.pending.len(), 3);
    let plan = ciscale::plan::plan(&desired, &observed, jiff::Timestamp::now());
    let creates = plan.changes.iter().filter(|change| matches!(change.action, ciscale::plan::Action::Create)).count();
    assert_eq!(creates, 1, "one runner for the one matching job: {plan:?}");

    let name = "gh-linux-b37072-1";
    let request = RegisterAgent {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: pool.ci.labels.clone(),
        for_job: None,
    };
    github.register(&request).await.expect("register");
    let runner = fake.runner_by_name(name).expect("registered");
    assert_eq!(runner.labels, ["self-hosted", "Linux", "X64", "docker", "ciscale-owner:gh"]);

    // Webhooks through the connected source (as `watch`'s listener calls it: tests/it/webhooks.rs): a signed
    // `queued` delivery wakes the loop, a forged one is refused with 401, and a source without a secret takes none
    // (404).
    assert_eq!(github.webhook_max_body(), Some(webhook::DEFAULT_MAX_BODY));
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "docker"]]);
    let body = serde_json::to_vec(&fake.workflow_job_payload(jobs[0], "queued")).expect("json");
    let signed = delivery_headers(&webhook::sign(&Secret::new("hook-secret"), &body), "workflow_job");
    let notice = github.receive_webhook(&signed, &body).expect("a signed delivery");
    assert!(notice.wake, "a queued job wakes the loop");
    assert_eq!(notice.reason, "workflow_job queued in `acme/app`");
    let forged = delivery_headers(&webhook::sign(&Secret::new("guess"), &body), "workflow_job");
    let refused = github.receive_webhook(&forged, &body).expect_err("forged");
    assert_eq!(refused.status, 401);
    assert!(!refused.to_string().contains("hook-secret"), "{refused}");
    let plain = source(token_settings(&fake, org()));
    assert_eq!(plain.webhook_max_body(), None);
    assert_eq!(plain.receive_webhook(&signed, &body).expect_err("no secret").status, 404);
    assert_spec_clean(&fake);
}

/// `arch: arm64`: the pool offers `ARM64` (not `X64`), so a job for ARM runners is planned for and one for x86 is
/// not, and cloud servers download the ARM64 runner release. A Debian-style `aarch64` is refused with the name
/// GitHub uses.
#[tokio::test]
async fn an_arm64_source_offers_arm64_and_downloads_the_arm64_runner() {
    use ciscale::model::{CiName, PoolName};
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    fake.queue_run("acme/app", &[&["self-hosted", "ARM64"], &["self-hosted", "X64"]]);
    let config = |arch: &str| {
        format!(
            "id: gh\nci:\n  github: {{ kind: github, endpoint: \"{}\", repository: acme/app, token: \"${{GITHUB_TOKEN}}\", \
             arch: {arch} }}\nbackends:\n  f: {{ kind: fake }}\npools:\n  - {{ name: arm, ci: {{ source: github }}, \
             backend: {{ name: f }} }}\n",
            fake.url()
        )
    };
    let env = |name: &str| (name == "GITHUB_TOKEN").then(|| PAT.to_owned());
    let desired = ciscale::config::load_str("github.yaml", &config("arm64"), &env).expect("loads");
    let pool = desired.pool(&PoolName::new("arm")).expect("pool");
    let offered: Vec<&str> = pool.ci.labels.keys().map(String::as_str).collect();
    assert_eq!(offered, ["ARM64", "Linux", "self-hosted"]);

    let providers = ciscale::providers::connect(&desired).expect("connect");
    let observed = ciscale::observe::observe(&desired, &providers, jiff::Timestamp::now()).await.expect("observe");
    let plan = ciscale::plan::plan(&desired, &observed, jiff::Timestamp::now());
    let creates = plan.changes.iter().filter(|change| matches!(change.action, ciscale::plan::Action::Create)).count();
    assert_eq!(creates, 1, "one runner, for the ARM64 job only: {plan:?}");
    let github = providers.ci[&CiName::new("github")].clone();
    let user_data = github.cloud_user_data(&Secret::new("RUNNER_JIT=x")).expect("user data");
    assert!(user_data.expose().contains("actions-runner-linux-arm64-"), "the arm64 release is downloaded");
    assert!(!user_data.expose().contains("-linux-x64-"));

    let error = ciscale::config::load_str("github.yaml", &config("aarch64"), &env).expect_err("aarch64 is refused");
    let text = error.diagnostics().expect("a located problem").render_plain();
    assert!(text.contains("github.yaml:3:") && text.contains("`arch: aarch64`"), "{text}");
    assert!(text.contains("hint: write `arm64`"), "{text}");
}
