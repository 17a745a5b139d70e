//! The Forgejo Actions CI source against the in-repo Forgejo fake: the conformance suite in every scope, the
//! queue (waiting vs running, `runs_on`, handles), registration of one-job runners bound to a job (the tests play
//! `forgejo-runner`), re-registration, pagination, every error mapping and secrecy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ciscale::model::{AgentId, PoolName, Secret};
use ciscale::providers::forgejo::{
    label_name, Forgejo, ForgejoSettings, Scope, HANDLE_ENV, HANDLE_LABEL, LABELS_ENV, TOKEN_ENV, URL_ENV, UUID_ENV,
};
use ciscale::providers::{CiSource, Error, RegisterAgent, TOKEN_ENV_NAME_KEY};
use serde_json::json;

use crate::conformance::ci_conformance_replacing;
use crate::fakes::forgejo::{
    FakeForgejo, Fault, ACME_API, ACME_ID, ACME_WEB, ADMIN_TOKEN, ALICE_APP, ALICE_ID, BOB_LIB, READ_TOKEN, USER_TOKEN,
};

fn acme() -> Scope {
    Scope::Organization("acme".to_owned())
}

fn client(fake: &FakeForgejo, token: &str, scope: Scope) -> Forgejo {
    Forgejo::new(ForgejoSettings::new(fake.url(), Secret::new(token), scope)).expect("client")
}

fn assert_spec_clean(fake: &FakeForgejo) {
    let violations = fake.spec_violations();
    assert!(violations.is_empty(), "traffic that does not match the Forgejo schema:\n{}", violations.join("\n"));
}

fn register_request(name: &str, for_job: Option<&str>) -> RegisterAgent {
    RegisterAgent {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::from([
            ("debian".to_owned(), "docker://node:22-bookworm".to_owned()),
            ("linux".to_owned(), "host".to_owned()),
        ]),
        for_job: for_job.map(str::to_owned),
    }
}

/// Plays `forgejo-runner one-job` with a credential: declares the labels it was given, asks for the job of its
/// handle (or any), and returns the job it got.
fn play_runner(fake: &FakeForgejo, env: &BTreeMap<String, String>, token: &Secret) -> Option<i64> {
    let uuid = &env[UUID_ENV];
    let labels: Vec<&str> =
        env.get(LABELS_ENV).map(|labels| labels.split(',').map(label_name).collect()).unwrap_or_default();
    fake.runner_declare(uuid, token.expose(), &labels).expect("declare");
    fake.runner_fetch(uuid, token.expose(), env.get(HANDLE_ENV).map(String::as_str)).expect("fetch")
}

#[tokio::test]
async fn conformance_suite_passes_in_every_scope() {
    let fake = FakeForgejo::start();
    let scopes = [
        (ADMIN_TOKEN, Scope::Instance),
        (USER_TOKEN, acme()),
        (USER_TOKEN, Scope::Repository { owner: "alice".to_owned(), repo: "app".to_owned() }),
        (USER_TOKEN, Scope::User),
    ];
    for (token, scope) in scopes {
        ci_conformance_replacing(Arc::new(client(&fake, token, scope.clone())), "fj").await;
        assert!(fake.runners().is_empty(), "{scope:?}: the suite cleans up: {:?}", fake.runners());
    }
    assert!(fake.count("POST /api/v1/orgs/acme/actions/runners") >= 2);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn the_queue_is_the_scopes_waiting_jobs_with_their_runs_on_and_handle() {
    let fake = FakeForgejo::start();
    let (web, web_handle) = fake.add_job(ACME_WEB, "build", &["debian", "gpu"]);
    let (api, _) = fake.add_job(ACME_API, "test", &["debian"]);
    let (blocked, _) = fake.add_blocked_job(ACME_API, "deploy", &["debian"]);
    fake.add_job(ALICE_APP, "lint", &["debian"]);
    fake.add_job(BOB_LIB, "bob", &["debian"]);

    // A runner of ours takes `api`; the queue shows it running on that runner.
    let forgejo = client(&fake, USER_TOKEN, acme());
    let api_handle = fake.job(api).handle;
    let credential = forgejo.register(&register_request("fj-linux-1", Some(&api_handle))).await.expect("register");
    assert_eq!(play_runner(&fake, &credential.env, &credential.token), Some(api));

    let observed = forgejo.observe().await.expect("observe");
    let pending: Vec<&str> = observed.queue.pending.iter().map(|task| task.id.as_str()).collect();
    assert_eq!(pending, [web.to_string()], "only acme's waiting jobs; blocked and other owners' jobs are not listed");
    assert_eq!(observed.queue.pending[0].demands, ["debian", "gpu"], "runs-on, in the job's order");
    assert_eq!(observed.queue.pending[0].labels.get(HANDLE_LABEL), Some(web_handle.as_str()));
    assert_eq!(observed.queue.running.len(), 1);
    assert_eq!(observed.queue.running[0].id.as_str(), api.to_string());
    assert_eq!(observed.queue.running[0].agent_id.as_ref(), Some(&credential.agent_id));
    let agent = observed.agents.iter().find(|agent| agent.id == credential.agent_id).expect("our runner");
    assert!(agent.busy, "it runs its job");
    assert_eq!(agent.labels.get(HANDLE_LABEL), Some(&api_handle));
    assert!(agent.labels.contains_key("debian") && agent.labels.contains_key("linux"), "{:?}", agent.labels);
    assert!(agent.last_contact.is_some());

    // The blocked job becomes waiting once it can run.
    fake.unblock(blocked);
    let observed = forgejo.observe().await.expect("observe");
    assert!(observed.queue.pending.iter().any(|task| task.id.as_str() == blocked.to_string()));
    // The instance scope sees every repository's jobs.
    let all = client(&fake, ADMIN_TOKEN, Scope::Instance).observe().await.expect("observe");
    assert_eq!(all.queue.pending.len() + all.queue.running.len(), 5);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn a_runner_registered_for_a_job_takes_that_job_and_goes_when_it_is_done() {
    let fake = FakeForgejo::start();
    // An older job waits first and matches the same labels: the bound runner must still take its own.
    let (older, _) = fake.add_job(ACME_WEB, "older", &["debian"]);
    let (ours, handle) = fake.add_job(ACME_WEB, "ours", &["debian"]);
    let forgejo = client(&fake, USER_TOKEN, acme());
    let credential = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("register");

    let record = fake.runner_named("fj-linux-1").pop().expect("the runner record");
    assert!(record.ephemeral, "a one-job runner");
    assert_eq!(record.owner_id, ACME_ID, "registered in the scope");
    assert_eq!(record.description, format!("ciscale pool=linux job={handle}"));
    assert_eq!(credential.agent_id, AgentId::new(record.id.to_string()));
    assert_eq!(credential.token.expose(), record.token);
    assert_eq!(
        credential.env,
        BTreeMap::from([
            (URL_ENV.to_owned(), fake.url()),
            (UUID_ENV.to_owned(), record.uuid.clone()),
            (HANDLE_ENV.to_owned(), handle.clone()),
            (LABELS_ENV.to_owned(), "debian:docker://node:22-bookworm,linux:host".to_owned()),
            (TOKEN_ENV_NAME_KEY.to_owned(), TOKEN_ENV.to_owned()),
        ])
    );

    // Before the runner starts: a record without labels, not in contact, not busy.
    let observed = forgejo.observe().await.expect("observe");
    let agent = observed.agents.iter().find(|agent| agent.id == credential.agent_id).expect("listed");
    assert!(!agent.busy && agent.last_contact.is_none());
    assert_eq!(agent.labels, BTreeMap::from([(HANDLE_LABEL.to_owned(), handle.clone())]));

    assert_eq!(play_runner(&fake, &credential.env, &credential.token), Some(ours), "its own job, not the older one");
    assert_eq!(fake.job(older).runner_id, None);
    // Its token fetches nothing more.
    assert_eq!(fake.runner_fetch(&record.uuid, &record.token, None).expect("fetch"), None);

    fake.runner_finish(ours);
    let observed = forgejo.observe().await.expect("observe");
    assert!(observed.agents.iter().all(|agent| agent.id != credential.agent_id), "Forgejo deleted the runner");
    assert!(observed.queue.running.is_empty());
    assert_eq!(observed.queue.pending.len(), 1, "the older job still waits");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn register_of_an_existing_name_replaces_it_unless_it_is_busy() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, USER_TOKEN, acme());
    let (job, handle) = fake.add_job(ACME_WEB, "build", &["debian"]);
    let first = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("register");
    let second = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("again");
    assert_ne!(second.agent_id, first.agent_id, "a new record");
    let named = fake.runner_named("fj-linux-1");
    assert_eq!(named.len(), 1, "the old record is gone: {named:?}");
    assert_eq!(named[0].token, second.token.expose(), "the new one holds the handed-out token");
    // The old token is dead.
    assert!(fake.runner_declare(&first.env[UUID_ENV], first.token.expose(), &["debian"]).is_err());

    // Duplicates someone made by hand under that name go too (names are not unique in Forgejo).
    fake.add_runner("fj-linux-1", "hand-made", ACME_ID, 0);
    let third = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("again");
    assert_eq!(fake.runner_named("fj-linux-1").len(), 1);

    // Once it runs its job, it is never cut off.
    assert_eq!(play_runner(&fake, &third.env, &third.token), Some(job));
    match forgejo.register(&register_request("fj-linux-1", Some(&handle))).await {
        Err(Error::AlreadyExists { what }) => assert!(what.contains("running a job"), "{what}"),
        other => panic!("register over a busy runner: {other:?}"),
    }
    let named = fake.runner_named("fj-linux-1");
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].id.to_string(), third.agent_id.as_str(), "the busy runner is still there");
    assert_spec_clean(&fake);
}

/// A job has one runner: registering a second name for a job that has a runner is refused, nothing is made, and
/// the job can still get a runner once the first is gone.
#[tokio::test]
async fn a_job_that_has_a_runner_gets_no_second_one() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, USER_TOKEN, acme());
    let (_, handle) = fake.add_job(ACME_WEB, "build", &["debian"]);
    let first = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("register");
    match forgejo.register(&register_request("fj-linux-2", Some(&handle))).await {
        Err(Error::AlreadyExists { what }) => assert!(what.contains(&handle) && what.contains("fj-linux-1"), "{what}"),
        other => panic!("a second runner for one job: {other:?}"),
    }
    assert!(fake.runner_named("fj-linux-2").is_empty(), "nothing registered: {:?}", fake.runners());
    // Another job is not held up; and once the first runner is gone, the job can have a new one.
    let (_, other) = fake.add_job(ACME_WEB, "test", &["debian"]);
    forgejo.register(&register_request("fj-linux-3", Some(&other))).await.expect("another job");
    forgejo.deregister(&first.agent_id).await.expect("deregister");
    forgejo.register(&register_request("fj-linux-2", Some(&handle))).await.expect("after the first is gone");
    assert_eq!(fake.runners().len(), 2);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn busy_is_active_or_in_contact_while_its_job_runs() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, USER_TOKEN, acme());
    let (job, handle) = fake.add_job(ACME_WEB, "build", &["debian"]);
    let ours = forgejo.register(&register_request("fj-linux-1", Some(&handle))).await.expect("register");
    fake.runner_declare(&ours.env[UUID_ENV], ours.token.expose(), &["debian"]).expect("declare");
    // A runner registered by hand takes the job before ours asks for it.
    let other = fake.add_runner("static-1", "", ACME_ID, 0);
    fake.runner_declare(&other.uuid, &other.token, &["debian"]).expect("declare");
    assert_eq!(fake.runner_fetch(&other.uuid, &other.token, None).expect("fetch"), Some(job));

    let busy = |observed: &ciscale::model::CiObservation, id: &str| {
        observed.agents.iter().find(|agent| agent.id.as_str() == id).map(|agent| agent.busy)
    };
    let observed = forgejo.observe().await.expect("observe");
    assert_eq!(busy(&observed, &other.id.to_string()), Some(true), "it reports on its task: active");
    assert_eq!(
        busy(&observed, ours.agent_id.as_str()),
        Some(true),
        "in contact while the job it was made for runs: kept, as a busy agent would be"
    );
    assert_eq!(
        observed.queue.running[0].agent_id.as_ref(),
        Some(&ours.agent_id),
        "Forgejo does not say which runner runs a job: the one made for its handle is named"
    );
    // The other runner has not reported for a while: idle, and busy no more.
    fake.set_runner_seen(other.id, 5, 30);
    let observed = forgejo.observe().await.expect("observe");
    assert_eq!(busy(&observed, &other.id.to_string()), Some(false));
    // Ours out of contact: not busy, whatever its job does.
    fake.set_runner_seen(ours.agent_id.as_str().parse().expect("id"), 120, 120);
    let observed = forgejo.observe().await.expect("observe");
    assert_eq!(busy(&observed, ours.agent_id.as_str()), Some(false));
    assert_eq!(observed.queue.running[0].agent_id, None, "an offline runner runs nothing");
    // Back in contact, and the job is done: ours is idle.
    fake.set_runner_seen(ours.agent_id.as_str().parse().expect("id"), 1, 120);
    fake.runner_finish(job);
    let observed = forgejo.observe().await.expect("observe");
    assert_eq!(busy(&observed, ours.agent_id.as_str()), Some(false));
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn only_the_scopes_own_runners_are_observed() {
    let fake = FakeForgejo::start();
    let global = fake.add_runner("global-1", "", 0, 0);
    let org = fake.add_runner("acme-1", "", ACME_ID, 0);
    let repo = fake.add_runner("web-1", "", 0, ACME_WEB);
    let user = fake.add_runner("alice-1", "", ALICE_ID, 0);
    let ids = |observed: ciscale::model::CiObservation| -> Vec<String> {
        observed.agents.into_iter().map(|agent| agent.id.to_string()).collect()
    };
    let admin = client(&fake, ADMIN_TOKEN, Scope::Instance).observe().await.expect("observe");
    assert_eq!(
        ids(admin),
        [global.id.to_string()],
        "the admin list holds every runner; only global ones are the instance's"
    );
    let observed = client(&fake, USER_TOKEN, acme()).observe().await.expect("observe");
    assert_eq!(ids(observed), [org.id.to_string()]);
    let observed = client(&fake, USER_TOKEN, Scope::Repository { owner: "acme".into(), repo: "web".into() })
        .observe()
        .await
        .expect("observe");
    assert_eq!(ids(observed), [repo.id.to_string()]);
    let observed = client(&fake, USER_TOKEN, Scope::User).observe().await.expect("observe");
    assert_eq!(ids(observed), [user.id.to_string()]);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn an_idle_cycle_is_two_calls_and_runners_are_read_page_by_page() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, ADMIN_TOKEN, Scope::Instance);
    forgejo.observe().await.expect("observe");
    assert_eq!(
        fake.counts(),
        BTreeMap::from([
            ("GET /api/v1/admin/actions/runners".to_owned(), 1),
            ("GET /api/v1/admin/actions/runners/jobs".to_owned(), 1),
        ]),
        "an empty queue (`null`) and no runner: one call each"
    );

    for index in 0..120 {
        fake.add_runner(&format!("r-{index}"), "", 0, 0);
    }
    fake.reset_counts();
    assert_eq!(forgejo.observe().await.expect("observe").agents.len(), 120);
    assert_eq!(fake.count("GET /api/v1/admin/actions/runners"), 3, "pages of 50");

    // A server that caps pages lower: `X-Total-Count` says there is more.
    fake.set_max_response_items(20);
    fake.reset_counts();
    assert_eq!(forgejo.observe().await.expect("observe").agents.len(), 120);
    assert_eq!(fake.count("GET /api/v1/admin/actions/runners"), 6);

    // Without the count, `Link` says whether a next page exists.
    fake.drop_total_count();
    fake.reset_counts();
    assert_eq!(forgejo.observe().await.expect("observe").agents.len(), 120);
    assert_eq!(fake.count("GET /api/v1/admin/actions/runners"), 6);

    // Without either, a short page is the last: with pages of 50 nothing is lost.
    fake.set_max_response_items(50);
    fake.drop_link();
    fake.reset_counts();
    assert_eq!(forgejo.observe().await.expect("observe").agents.len(), 120);
    assert_eq!(fake.count("GET /api/v1/admin/actions/runners"), 3);
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn older_servers_and_odd_fields_are_read() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, ADMIN_TOKEN, Scope::Instance);
    // Before Forgejo 15 there is no handle; a nil `runs_on` is null; a status may be one this source does not know.
    fake.serve_raw_once(
        "GET /api/v1/admin/actions/runners/jobs",
        json!([
            {"id": 1, "name": "old", "runs_on": ["debian"], "status": "waiting"},
            {"id": 2, "runs_on": null, "status": "waiting", "needs": null},
            {"id": 3, "runs_on": ["debian"], "status": "queued-in-the-future"},
            {"id": 4, "runs_on": ["debian"]}
        ]),
    );
    fake.serve_raw_once(
        "GET /api/v1/admin/actions/runners",
        json!([{"id": 9, "name": "bare", "labels": null}, {"id": 10}]),
    );
    let observed = forgejo.observe().await.expect("observe");
    let pending: Vec<&str> = observed.queue.pending.iter().map(|task| task.id.as_str()).collect();
    assert_eq!(pending, ["1", "2"], "unknown or missing statuses are left out");
    assert!(observed.queue.pending[0].labels.is_empty(), "no handle");
    assert!(observed.queue.pending[1].demands.is_empty(), "null runs-on: no label");
    assert_eq!(observed.agents.len(), 2);
    assert!(observed.agents.iter().all(|agent| !agent.busy && agent.last_contact.is_none()));

    // A job without an id is refused as a whole, naming the call.
    fake.serve_raw_once("GET /api/v1/admin/actions/runners/jobs", json!([{"status": "waiting"}]));
    match forgejo.observe().await {
        Err(error @ Error::Other { .. }) => {
            assert!(error.to_string().contains("`GET /api/v1/admin/actions/runners/jobs`"), "{error}")
        }
        other => panic!("a job without an id: {other:?}"),
    }
}

#[tokio::test]
async fn errors_map_onto_the_provider_error_kinds() {
    let fake = FakeForgejo::start();
    let admin = client(&fake, ADMIN_TOKEN, Scope::Instance);

    match client(&fake, "not-a-token", Scope::Instance).observe().await {
        Err(Error::Unauthenticated { message, .. }) => {
            assert!(message.contains("refused") && message.contains("401"), "{message}");
            assert!(message.contains("hint:") && message.contains("read:admin"), "{message}");
        }
        other => panic!("401: {other:?}"),
    }
    match client(&fake, USER_TOKEN, Scope::Instance).observe().await {
        Err(Error::Unauthenticated { message, .. }) => {
            assert!(message.contains("may not manage the runners of the instance"), "{message}");
            assert!(message.contains("user should be the site admin"), "Forgejo's message is quoted: {message}");
            assert!(message.contains("site administrator"), "{message}");
        }
        other => panic!("403: {other:?}"),
    }
    let read_only = client(&fake, READ_TOKEN, acme());
    read_only.observe().await.expect("a read token may list");
    match read_only.register(&register_request("fj-1", None)).await {
        Err(Error::Unauthenticated { message, .. }) => {
            assert!(message.contains("[write:organization]"), "{message}");
            assert!(message.contains("write:organization` permissions"), "hint: {message}");
        }
        other => panic!("403 on register: {other:?}"),
    }
    match client(&fake, USER_TOKEN, Scope::Organization("nobody".into())).observe().await {
        Err(Error::Invalid { message, .. }) => {
            assert!(message.contains("organisation `nobody`") && message.contains("Forgejo 15"), "{message}")
        }
        other => panic!("404 on a list: {other:?}"),
    }
    assert!(matches!(admin.deregister(&AgentId::new("999")).await, Err(Error::NotFound { .. })));
    assert!(matches!(admin.deregister(&AgentId::new("unregistered:x")).await, Err(Error::NotFound { .. })));
    assert!(matches!(admin.drain(&AgentId::new("1")).await, Err(Error::Unsupported { .. })));
    assert!(matches!(admin.undrain(&AgentId::new("1")).await, Err(Error::Unsupported { .. })));

    fake.fail_next(Fault::Status(422));
    match admin.register(&register_request("fj-1", None)).await {
        Err(Error::Invalid { message, .. }) => assert!(message.contains("422"), "{message}"),
        other => panic!("422: {other:?}"),
    }
    fake.fail_next(Fault::RateLimited { retry_after_secs: 7 });
    match admin.observe().await {
        Err(Error::RateLimited { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(7))),
        other => panic!("429: {other:?}"),
    }
    for code in [500, 502, 503] {
        fake.fail_next(Fault::Status(code));
        match admin.observe().await {
            Err(Error::Unavailable { message, .. }) => assert!(message.contains(&code.to_string()), "{message}"),
            other => panic!("{code}: {other:?}"),
        }
    }
    fake.fail_next(Fault::MalformedJson);
    match admin.observe().await {
        Err(error @ Error::Other { .. }) => {
            assert!(error.to_string().contains("`GET /api/v1/admin/actions/runners/jobs`"), "{error}")
        }
        other => panic!("malformed JSON: {other:?}"),
    }
    // Register refuses what it cannot hand to the runner, before any call.
    let before = fake.total_requests();
    let mut bad = register_request("fj-1", Some("$(reboot)"));
    assert!(matches!(admin.register(&bad).await, Err(Error::Invalid { .. })));
    bad.for_job = None;
    bad.labels.insert("a,b".to_owned(), "host".to_owned());
    assert!(matches!(admin.register(&bad).await, Err(Error::Invalid { .. })));
    assert_eq!(fake.total_requests(), before);

    let mut impatient = ForgejoSettings::new(fake.url(), Secret::new(ADMIN_TOKEN), Scope::Instance);
    impatient.timeout = Duration::from_millis(300);
    fake.fail_next(Fault::Delay(Duration::from_secs(2)));
    match Forgejo::new(impatient).expect("client").observe().await {
        Err(Error::Unavailable { message, .. }) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("timeout: {other:?}"),
    }

    let port = fake.addr.port();
    drop(fake);
    let gone = Forgejo::new(ForgejoSettings::new(
        format!("http://127.0.0.1:{port}"),
        Secret::new(ADMIN_TOKEN),
        Scope::Instance,
    ))
    .expect("client");
    assert!(matches!(gone.observe().await, Err(Error::Unavailable { .. })));

    for server in ["forgejo.example.com", "ftp://forgejo.example.com", "http://"] {
        let settings = ForgejoSettings::new(server, Secret::new("x"), Scope::Instance);
        assert!(matches!(Forgejo::new(settings), Err(Error::Invalid { .. })), "{server}");
    }
    let empty_org =
        ForgejoSettings::new("https://forgejo.example.com", Secret::new("x"), Scope::Organization(" ".into()));
    assert!(matches!(Forgejo::new(empty_org), Err(Error::Invalid { .. })));
    let mut bad_runner_url = ForgejoSettings::new("https://forgejo.example.com", Secret::new("x"), Scope::User);
    bad_runner_url.runner_url = Some("forgejo.internal".into());
    assert!(matches!(Forgejo::new(bad_runner_url), Err(Error::Invalid { .. })));
}

#[tokio::test]
async fn no_token_in_errors_or_debug_output() {
    let fake = FakeForgejo::start();
    let forgejo = client(&fake, ADMIN_TOKEN, Scope::Instance);
    assert!(!format!("{forgejo:?}").contains(ADMIN_TOKEN), "{forgejo:?}");
    let mut errors = Vec::new();
    for fault in [
        Fault::EchoAuthorization,
        Fault::Status(500),
        Fault::RateLimited { retry_after_secs: 1 },
        Fault::MalformedJson,
        Fault::Status(401),
        Fault::Status(403),
        Fault::Status(404),
        Fault::Status(400),
    ] {
        fake.fail_next(fault);
        errors.push(forgejo.observe().await.expect_err("injected"));
    }
    let (_, handle) = fake.add_job(ACME_WEB, "build", &["debian"]);
    let credential = forgejo.register(&register_request("fj-1", Some(&handle))).await.expect("register");
    fake.fail_next(Fault::EchoAuthorization);
    errors.push(forgejo.register(&register_request("fj-1", None)).await.expect_err("injected"));
    errors.push(forgejo.deregister(&AgentId::new("4242")).await.expect_err("missing"));
    let echoed = errors[0].to_string();
    assert!(echoed.contains("Authorization: token ***"), "the echo is quoted, blanked: {echoed}");
    for error in &errors {
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(!shown.contains(ADMIN_TOKEN), "admin token in {shown}");
            assert!(!shown.contains(credential.token.expose()), "runner token in {shown}");
        }
    }
    assert!(!format!("{credential:?}").contains(credential.token.expose()));
    assert!(!credential.env.values().any(|value| value.contains(credential.token.expose())), "the env is secret-free");
}
