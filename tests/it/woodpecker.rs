//! The Woodpecker CI source against the in-repo Woodpecker fake: the conformance suite, the wire format (old
//! servers' `null`s and missing fields), every error mapping, secrecy, the number of calls per cycle, and
//! `ciscale watch` end to end with the fake backend — also under injected faults.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciscale::model::{AgentId, FakeSpec, InstanceState, PoolName, Secret};
use ciscale::providers::fake::FakeWorld;
use ciscale::providers::woodpecker::{Timeouts, Woodpecker};
use ciscale::providers::{CiSource, Error, RegisterAgent};
use serde_json::json;

use crate::conformance::ci_conformance;
use crate::fakes::woodpecker::{FakeWoodpecker, Fault, ADMIN_TOKEN, USER_TOKEN};

fn client(fake: &FakeWoodpecker) -> Woodpecker {
    Woodpecker::new(&fake.url(), Secret::new(ADMIN_TOKEN), None).expect("client")
}

fn assert_spec_clean(fake: &FakeWoodpecker) {
    let violations = fake.spec_violations();
    assert!(violations.is_empty(), "traffic that does not match the Woodpecker spec:\n{}", violations.join("\n"));
}

fn register_request(name: &str) -> RegisterAgent {
    RegisterAgent {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::from([
            ("platform".to_owned(), "linux/amd64".to_owned()),
            ("!gpu".to_owned(), "no".to_owned()),
        ]),
        for_job: None,
    }
}

#[tokio::test]
async fn conformance_suite_passes_against_the_fake() {
    let fake = FakeWoodpecker::start();
    ci_conformance(Arc::new(client(&fake)), "wp").await;
    assert!(fake.agents().is_empty(), "the suite cleans up: {:?}", fake.agents());
    assert!(fake.count("PATCH /api/agents/{agent_id}") >= 2, "drain and undrain went through PATCH");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn observe_reads_queue_agents_busy_and_times() {
    let fake = FakeWoodpecker::start();
    let busy_id = fake.add_agent("ci-linux-1");
    let idle_id = fake.add_agent("ci-linux-2");
    let never_id = fake.add_agent("ci-linux-3");
    let running = fake.add_task(&[("platform", "linux/amd64")]);
    fake.start_task(&running, busy_id);
    fake.add_task(&[("platform", "linux/arm64")]);
    fake.set_agent_times(idle_id, 1_700_000_100, 1_700_000_000);

    let observed = client(&fake).observe().await.expect("observe");
    assert_eq!(observed.queue.pending.len(), 1);
    assert_eq!(observed.queue.pending[0].labels.get("platform"), Some("linux/arm64"));
    assert_eq!(observed.queue.pending[0].labels.get("repo"), Some("acme/app"));
    assert_eq!(observed.queue.running.len(), 1);
    assert_eq!(observed.queue.running[0].agent_id, Some(AgentId::new(busy_id.to_string())));
    assert_eq!(observed.queue.pending[0].agent_id, None);

    let agent = |id: i64| observed.agents.iter().find(|agent| agent.id.as_str() == id.to_string()).expect("listed");
    assert!(agent(busy_id).busy);
    assert!(!agent(idle_id).busy);
    assert_eq!(agent(idle_id).last_work.map(|t| t.as_second()), Some(1_700_000_000));
    assert_eq!(agent(idle_id).last_contact.map(|t| t.as_second()), Some(1_700_000_100));
    assert_eq!(agent(never_id).last_work, None, "0 means never");
    assert_eq!(agent(never_id).last_contact, None, "0 means never");
    assert_eq!(agent(never_id).name, "ci-linux-3");
    assert_spec_clean(&fake);
}

#[tokio::test]
async fn observe_accepts_null_arrays_and_missing_fields_of_older_servers() {
    let fake = FakeWoodpecker::start();
    fake.serve_raw_once("GET /api/queue/info", json!({ "pending": null, "running": null, "stats": {} }));
    fake.serve_raw_once("GET /api/agents", json!([{ "id": 4, "name": "old" }]));
    let observed = client(&fake).observe().await.expect("observe an old server");
    assert!(observed.queue.pending.is_empty() && observed.queue.running.is_empty());
    assert_eq!(observed.agents.len(), 1);
    let old = &observed.agents[0];
    assert_eq!((old.id.as_str(), old.name.as_str(), old.busy, old.no_schedule), ("4", "old", false, false));
    assert_eq!((old.last_contact, old.last_work), (None, None));

    // Even older: no `running` key at all, numeric task ids, `null` labels, `null` agent list.
    fake.serve_raw_once("GET /api/queue/info", json!({ "pending": [{ "id": 12, "labels": null }] }));
    fake.serve_raw_once("GET /api/agents", json!(null));
    let observed = client(&fake).observe().await.expect("observe an older server");
    assert_eq!(observed.queue.pending.len(), 1);
    assert_eq!(observed.queue.pending[0].id.as_str(), "12");
    assert!(observed.agents.is_empty());
}

#[tokio::test]
async fn agents_are_read_page_by_page() {
    let fake = FakeWoodpecker::start();
    for index in 0..120 {
        fake.add_agent(&format!("agent-{index}"));
    }
    fake.reset_counts();
    let observed = client(&fake).observe().await.expect("observe");
    assert_eq!(observed.agents.len(), 120);
    // 50 + 50 + 20: three pages, plus the queue.
    assert_eq!(fake.count("GET /api/agents"), 3);
    assert_eq!(fake.total_requests(), 4);
}

#[tokio::test]
async fn an_idle_cycle_is_two_calls() {
    let fake = FakeWoodpecker::start();
    fake.add_agent("ci-linux-1");
    let wp = client(&fake);
    wp.observe().await.expect("warm up");
    fake.reset_counts();
    wp.observe().await.expect("observe");
    assert_eq!(
        fake.counts(),
        BTreeMap::from([("GET /api/agents".to_owned(), 1), ("GET /api/queue/info".to_owned(), 1)])
    );
}

#[tokio::test]
async fn register_hands_out_the_agents_own_token_and_connection_env() {
    let fake = FakeWoodpecker::start();
    let wp = client(&fake);
    let credential = wp.register(&register_request("ci-linux-1")).await.expect("register");
    let record = fake.agent_by_name("ci-linux-1").expect("agent record created");
    assert_eq!(credential.agent_id.as_str(), record.id.to_string());
    assert_eq!(credential.token.expose(), record.token, "the agent's own token");
    assert_ne!(credential.token.expose(), ADMIN_TOKEN, "never the admin token");
    assert_eq!(credential.env.get("WOODPECKER_SERVER").map(String::as_str), Some("127.0.0.1:9000"));
    assert_eq!(credential.env.get("WOODPECKER_AGENT_LABELS").map(String::as_str), Some("!gpu=no,platform=linux/amd64"));
    assert_eq!(
        credential.env.get(ciscale::providers::TOKEN_ENV_NAME_KEY).map(String::as_str),
        Some("WOODPECKER_AGENT_SECRET")
    );
    assert!(credential.env.values().all(|value| !value.contains(&record.token)), "the env is secret-free");
    assert!(!format!("{credential:?}").contains(&record.token), "Debug hides the token");

    // Create-if-absent: the same record and token again, nothing new.
    let again = wp.register(&register_request("ci-linux-1")).await.expect("register again");
    assert_eq!(again.agent_id, credential.agent_id);
    assert_eq!(again.token.expose(), credential.token.expose());
    assert_eq!(fake.agents().len(), 1);

    // Drain keeps the agent's name (the server's PATCH overwrites it with the body's).
    wp.drain(&credential.agent_id).await.expect("drain");
    let drained = fake.agent_by_name("ci-linux-1").expect("name kept");
    assert!(drained.no_schedule);
    assert_spec_clean(&fake);

    let custom = Woodpecker::new(&fake.url(), Secret::new(ADMIN_TOKEN), Some("grpc.example.com:443")).expect("client");
    let other = custom.register(&register_request("ci-linux-2")).await.expect("register");
    assert_eq!(other.env.get("WOODPECKER_SERVER").map(String::as_str), Some("grpc.example.com:443"));
}

#[tokio::test]
async fn register_of_an_existing_agent_without_a_visible_token_replaces_it_unless_busy() {
    let fake = FakeWoodpecker::start();
    let wp = client(&fake);
    let idle = fake.add_agent("ci-linux-1");
    // A server that hides tokens in its list: the idle record is deleted and made anew.
    fake.serve_raw_once("GET /api/agents", json!([{ "id": idle, "name": "ci-linux-1", "token": "" }]));
    let credential = wp.register(&register_request("ci-linux-1")).await.expect("register");
    assert_ne!(credential.agent_id.as_str(), idle.to_string(), "a new record");
    assert_eq!(fake.agents().len(), 1);
    assert_eq!(fake.count("DELETE /api/agents/{agent_id}"), 1);

    let busy = fake.agent_by_name("ci-linux-1").expect("agent").id;
    let task = fake.add_task(&[]);
    fake.start_task(&task, busy);
    fake.serve_raw_once("GET /api/agents", json!([{ "id": busy, "name": "ci-linux-1" }]));
    let refused = wp.register(&register_request("ci-linux-1")).await;
    assert!(matches!(refused, Err(Error::AlreadyExists { .. })), "a busy agent is never replaced: {refused:?}");
    assert!(fake.agents().iter().any(|agent| agent.id == busy), "the busy agent is still there");
}

#[tokio::test]
async fn errors_map_onto_the_provider_error_kinds() {
    let fake = FakeWoodpecker::start();
    let wp = client(&fake);

    let wrong = Woodpecker::new(&fake.url(), Secret::new("not-the-token"), None).expect("client");
    match wrong.observe().await {
        Err(Error::Unauthenticated { message, .. }) => assert!(message.contains("refused"), "{message}"),
        other => panic!("401: {other:?}"),
    }
    let user = Woodpecker::new(&fake.url(), Secret::new(USER_TOKEN), None).expect("client");
    match user.observe().await {
        Err(Error::Unauthenticated { message, .. }) => {
            assert!(message.contains("not an admin token") && message.contains("`GET /api/queue/info`"), "{message}")
        }
        other => panic!("403: {other:?}"),
    }

    fake.fail_next(Fault::RateLimited { retry_after_secs: 7 });
    match wp.observe().await {
        Err(Error::RateLimited { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(7))),
        other => panic!("429: {other:?}"),
    }
    for code in [500, 502, 503] {
        fake.fail_next(Fault::Status(code));
        match wp.observe().await {
            Err(Error::Unavailable { message, .. }) => assert!(message.contains(&code.to_string()), "{message}"),
            other => panic!("{code}: {other:?}"),
        }
    }
    fake.fail_next(Fault::MalformedJson);
    match wp.observe().await {
        Err(error @ Error::Other { .. }) => {
            assert!(error.to_string().contains("`GET /api/queue/info`"), "names the endpoint: {error}")
        }
        other => panic!("malformed JSON: {other:?}"),
    }

    let impatient = Woodpecker::with_timeouts(
        &fake.url(),
        Secret::new(ADMIN_TOKEN),
        None,
        Timeouts { connect: Duration::from_millis(500), total: Duration::from_millis(300) },
    )
    .expect("client");
    fake.fail_next(Fault::Delay(Duration::from_secs(2)));
    match impatient.observe().await {
        Err(Error::Unavailable { message, .. }) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("timeout: {other:?}"),
    }

    let missing = AgentId::new("999");
    assert!(matches!(wp.deregister(&missing).await, Err(Error::NotFound { .. })));
    assert!(matches!(wp.drain(&missing).await, Err(Error::NotFound { .. })));
    assert!(matches!(wp.undrain(&AgentId::new("not-a-number")).await, Err(Error::NotFound { .. })));

    // Nobody listening: unavailable, not a crash.
    let port = fake.addr.port();
    drop(fake);
    let gone = Woodpecker::new(&format!("http://127.0.0.1:{port}"), Secret::new(ADMIN_TOKEN), None).expect("client");
    assert!(matches!(gone.observe().await, Err(Error::Unavailable { .. })));

    assert!(matches!(Woodpecker::new("ci.example.com", Secret::new("x"), None), Err(Error::Invalid { .. })));
    assert!(matches!(Woodpecker::new("ftp://ci.example.com", Secret::new("x"), None), Err(Error::Invalid { .. })));
}

#[tokio::test]
async fn no_token_in_errors_or_debug_output() {
    let fake = FakeWoodpecker::start();
    let wp = client(&fake);
    assert!(!format!("{wp:?}").contains(ADMIN_TOKEN), "{wp:?}");
    let mut errors = Vec::new();
    for fault in [
        Fault::Status(500),
        Fault::RateLimited { retry_after_secs: 1 },
        Fault::MalformedJson,
        Fault::Status(401),
        Fault::Status(403),
        Fault::Status(400),
    ] {
        fake.fail_next(fault);
        errors.push(wp.observe().await.expect_err("injected"));
    }
    errors.push(wp.deregister(&AgentId::new("42")).await.expect_err("missing"));
    let credential = wp.register(&register_request("ci-linux-1")).await.expect("register");
    for error in &errors {
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(!shown.contains(ADMIN_TOKEN), "admin token in {shown}");
            assert!(!shown.contains(credential.token.expose()), "agent token in {shown}");
        }
    }
    assert!(!format!("{credential:?}").contains(credential.token.expose()));
}

// ---------------------------------------------------------------------------------------------------------------
// `ciscale` end to end: the binary, the Woodpecker fake as CI, the file-backed fake backend
// ---------------------------------------------------------------------------------------------------------------

/// The token only the environment knows; the config says `${WP_TOKEN}`.
const ENV_TOKEN: &str = ADMIN_TOKEN;

struct Sandbox {
    /// Every plan of this sandbox's `watch` is judged by the safety oracle (dropped before `dir`).
    trace: crate::safety::ledger::PlanTrace,
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(fake: &FakeWoodpecker, pools: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = format!(
            r#"id: e2e
pollInterval: 1s
ci:
  wp: {{ kind: woodpecker, server: "{}", token: "${{WP_TOKEN}}" }}
backends:
  sim: {{ kind: fake, stateFile: world.json }}
pools:
"#,
            fake.url()
        );
        for index in 0..pools {
            let name = if index == 0 { "linux".to_owned() } else { format!("linux-{index}") };
            config.push_str(&format!(
                "  - name: {name}\n    ci: {{ source: wp, labels: {{ platform: linux{suffix} }} }}\n    backend: {{ name: sim, machine: {{ serverType: small }} }}\n    scale: {{ max: 2, idleTimeout: 0s }}\n",
                suffix = if index == 0 { String::new() } else { format!("-{index}") },
            ));
        }
        std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
        let trace =
            crate::safety::ledger::PlanTrace::new(dir.path(), dir.path().join("ciscale.yaml")).forbid(&[ENV_TOKEN]);
        Self { trace, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn world(&self) -> FakeWorld {
        FakeWorld::open(&FakeSpec { state_file: Some(self.path("world.json")), simulate: false, jobs: None })
            .expect("open world")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ciscale"));
        command
            .current_dir(self.dir.path())
            // Each sandbox locks on its own: tests run concurrently with the same owner id.
            .env("CISCALE_LOCK_DIR", self.dir.path().join("locks"))
            .env_remove("CISCALE_LOG")
            .env("NO_COLOR", "1")
            .env("WP_TOKEN", ENV_TOKEN)
            .stdin(Stdio::null())
            .args(args)
            .arg("-c")
            .arg(self.path("ciscale.yaml"));
        self.trace.env(&mut command);
        command
    }
}

/// Polls `condition` until it holds; fails the test with `what` if it does not within a generous guard (this
/// is a hang guard, not a timing assertion: every step normally takes one or two poll intervals).
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let guard = Instant::now() + Duration::from_secs(90);
    while !condition() {
        assert!(Instant::now() < guard, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops `watch` with SIGTERM and returns its stdout and stderr; it must exit 0.
fn stop(child: Child) -> (String, String) {
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let output = child.wait_with_output().expect("watch exits");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    assert_eq!(output.status.code(), Some(0), "watch exit\n{stderr}");
    (stdout, stderr)
}

/// The whole life of one job: appears → instance and agent created → runs → finishes → idle → drained →
/// instance deleted → agent record deleted. Returns the watch output.
fn run_one_job_through_watch(fake: &FakeWoodpecker, sandbox: &Sandbox) -> (String, String) {
    let child =
        sandbox.command(&["watch", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("watch");
    let task = fake.add_task(&[("platform", "linux")]);

    wait_until("an agent is registered for the job", || !fake.agents().is_empty());
    let agent = fake.agents().into_iter().next().expect("agent");
    assert!(agent.name.starts_with("e2e-linux"), "agent named like its instance: {}", agent.name);
    wait_until("its instance runs", || {
        sandbox.world().snapshot().instances.iter().any(|i| i.name == agent.name && i.state == InstanceState::Running)
    });
    // The agent connects and takes the job; then the job finishes.
    fake.start_task(&task, agent.id);
    fake.finish_task(&task);

    wait_until("the idle agent is drained", || fake.agent_by_name(&agent.name).is_none_or(|a| a.no_schedule));
    wait_until("the agent record is deleted", || fake.agent_by_name(&agent.name).is_none());
    wait_until("the instance is gone", || {
        sandbox.world().snapshot().instances.iter().all(|i| i.state == InstanceState::Terminated)
    });
    let (stdout, stderr) = stop(child);
    assert!(!stdout.contains(ENV_TOKEN) && !stderr.contains(ENV_TOKEN), "admin token leaked");
    assert!(!stdout.contains(&agent.token) && !stderr.contains(&agent.token), "agent token leaked");
    (stdout, stderr)
}

#[test]
fn watch_runs_a_woodpecker_job_through_its_whole_life() {
    let fake = FakeWoodpecker::start();
    let sandbox = Sandbox::new(&fake, 1);
    let (stdout, _) = run_one_job_through_watch(&fake, &sandbox);
    assert_eq!(fake.count("POST /api/agents"), 1, "one agent registered: {:?}", fake.counts());
    assert!(fake.count("PATCH /api/agents/{agent_id}") >= 1, "drained through PATCH: {:?}", fake.counts());
    assert_eq!(fake.count("DELETE /api/agents/{agent_id}"), 1, "{:?}", fake.counts());
    let world = sandbox.world().snapshot();
    assert_eq!(world.counters.instances, 1, "exactly one instance ever created");
    let cycles: Vec<serde_json::Value> =
        stdout.lines().map(|line| serde_json::from_str(line).expect("JSON line")).collect();
    assert!(cycles.len() >= 3, "{stdout}");
    assert_spec_clean(&fake);
}

#[test]
fn watch_converges_when_every_fifth_request_fails() {
    let fake = FakeWoodpecker::start();
    let sandbox = Sandbox::new(&fake, 1);
    fake.fail_every(
        5,
        vec![Fault::Status(500), Fault::RateLimited { retry_after_secs: 1 }, Fault::MalformedJson, Fault::Status(503)],
    );
    run_one_job_through_watch(&fake, &sandbox);
    // A whole life takes well over ten requests, so at least two of them failed.
    assert!(fake.faults_injected() >= 2, "faults were injected: {}", fake.faults_injected());
    // No orphan either way: no agent record without an instance, no instance without a record.
    assert!(fake.agents().is_empty(), "{:?}", fake.agents());
    let world = sandbox.world().snapshot();
    assert!(world.instances.iter().all(|i| i.state == InstanceState::Terminated), "{:?}", world.instances);
    assert!(world.counters.instances <= 2, "no runaway creates: {}", world.counters.instances);
}

/// Measured, not assumed: the API calls one idle `plan` (one observation) makes, for 1 and for 10 pools.
#[test]
fn one_observation_costs_two_calls_whatever_the_number_of_pools() {
    for pools in [1, 10] {
        let fake = FakeWoodpecker::start();
        let sandbox = Sandbox::new(&fake, pools);
        let output = sandbox.command(&["plan"]).output().expect("plan");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(
            fake.counts(),
            BTreeMap::from([("GET /api/agents".to_owned(), 1), ("GET /api/queue/info".to_owned(), 1)]),
            "{pools} pools"
        );
        eprintln!("woodpecker API calls per idle cycle with {pools} pool(s): {}", fake.total_requests());
    }
}

#[test]
fn watch_survives_an_unreachable_server() {
    // The server is down: each cycle fails, the process keeps going and stops cleanly.
    let fake = FakeWoodpecker::start();
    let sandbox = Sandbox::new(&fake, 1);
    drop(fake);
    let mut child =
        sandbox.command(&["watch", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first cycle").expect("readable");
    let second = lines.next().expect("a second cycle").expect("readable");
    assert!(first.contains("\"cycle\":1") && second.contains("\"cycle\":2"), "{first}\n{second}");
    let (_, stderr) = stop(child);
    assert!(!stderr.contains(ENV_TOKEN));
}

// ---------------------------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------------------------

fn woodpecker_config(labels: &str, grpc: &str) -> String {
    format!(
        "id: acme\nci:\n  wp: {{ kind: woodpecker, server: \"https://ci.example.com\", token: \"${{WP_TOKEN}}\"{grpc} }}\n\
         backends:\n  sim: {{ kind: fake }}\npools:\n  - name: linux\n    ci:\n      source: wp\n      labels:\n{labels}\
         \n    backend: {{ name: sim }}\n"
    )
}

#[test]
fn malformed_filter_labels_are_config_errors() {
    use ciscale::config::{self, ConfigError};
    let labels = "        \"\": a\n        \"!\": b\n        \"a=b\": c\n        \"!!x\": d\n        list: \"x,y\"\n        platform: linux";
    let env = |name: &str| (name == "WP_TOKEN").then(|| "t".to_owned());
    match config::load_str("ciscale.yaml", &woodpecker_config(labels, ""), &env) {
        Err(ConfigError::Invalid(diagnostics)) => {
            let text = diagnostics.render_plain();
            assert_eq!(text.matches("invalid label").count(), 5, "{text}");
            for why in
                ["the key is empty", "`!` needs a key", "cannot hold `=`", "at most one `!`", "values cannot hold `,`"]
            {
                assert!(text.contains(why), "{why}: {text}");
            }
            assert!(text.contains("ciscale.yaml:11:"), "located at the key: {text}");
            assert!(!text.contains("platform"), "the good label is fine: {text}");
        }
        other => panic!("malformed labels must be refused: {other:?}"),
    }

    let desired = config::load_str(
        "ciscale.yaml",
        &woodpecker_config(
            "        platform: linux\n        \"!gpu\": \"yes\"",
            ", grpcAddress: \"grpc.example.com:443\"",
        ),
        &env,
    )
    .expect("valid config");
    match &desired.ci[&ciscale::model::CiName::new("wp")].kind {
        ciscale::model::CiKind::Woodpecker { grpc_address, .. } => {
            assert_eq!(grpc_address.as_deref(), Some("grpc.example.com:443"))
        }
        other => panic!("{other:?}"),
    }
}
