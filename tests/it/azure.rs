//! The Azure Pipelines CI source against the in-repo Azure DevOps fake (`fakes/azure.rs`): the conformance suite,
//! the mapping of agents and job requests onto the model, demand and pool matching in the planner, every error
//! mapping, secrecy of the PAT, calls per cycle, the wire format against the published spec, and `watch` of the
//! real binary end to end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ciscale::model::{PoolName, Secret, AZURE_POOL_LABEL, EPHEMERAL_LABEL};
use ciscale::providers::azure_pipelines::{AzurePipelines, AzureSettings, UNREGISTERED_PREFIX};
use ciscale::providers::{CiSource, Error, RegisterAgent};

use crate::conformance::{ci_conformance_self_registering, Online};
use crate::fakes::azure::{azure_spec, AzureFake, BadAuth, Fault, FaultKind, Route};

pub(crate) const PAT: &str = "azp-admin-pat-0123456789abcdef";
pub(crate) const AGENT_PAT: &str = "azp-agent-pat-fedcba9876543210";

fn settings(fake: &AzureFake, pools: &[(&str, &str)]) -> AzureSettings {
    AzureSettings {
        pools: pools.iter().map(|(pool, azure)| (PoolName::new(*pool), (*azure).to_owned())).collect(),
        timeout: Duration::from_secs(5),
        ..AzureSettings::new(fake.org_url(), Secret::new(PAT))
    }
}

fn source(fake: &AzureFake, pools: &[(&str, &str)]) -> AzurePipelines {
    AzurePipelines::new(settings(fake, pools)).expect("client")
}

fn register_request(name: &str, pool: &str) -> RegisterAgent {
    RegisterAgent { name: name.to_owned(), pool: PoolName::new(pool), labels: BTreeMap::new(), for_job: None }
}

/// Every text a failure can show: its message and its Debug form.
fn shown(error: &Error) -> String {
    format!("{error} {error:?}")
}

// ---------------------------------------------------------------------------------------------------------------
// Conformance
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn conformance_with_self_registering_agents() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Conformance Pool");
    let ci: Arc<dyn CiSource> = Arc::new(source(&fake, &[("conformance", "Conformance Pool")]));
    let come_online = |name: String| -> Online<'_> {
        let fake = &fake;
        Box::pin(async move {
            fake.agent_online("Conformance Pool", &name);
        })
    };
    ci_conformance_self_registering(ci, "azure", &come_online).await;
    assert!(fake.agents().is_empty(), "the suite deregistered its agent");
}

// ---------------------------------------------------------------------------------------------------------------
// Agents and job requests onto the model
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn agents_and_requests_map_onto_the_model() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    let idle = fake.agent_online("Linux", "acme-linux-1");
    let busy = fake.agent_online("Linux", "acme-linux-2");
    let offline = fake.agent_online("Linux", "acme-linux-3");
    fake.agent_offline(offline);
    let done = fake.add_request("Linux", &["docker"]);
    fake.assign(done, idle);
    fake.finish(done, "succeeded");
    let running = fake.add_request("Linux", &["Agent.Version -gtVersion 3.0"]);
    fake.assign(running, busy);
    let pending = fake.add_request("Linux", &["docker", "Agent.OS -equals Linux"]);
    let ci = source(&fake, &[("linux", "Linux")]);
    ci.drain(&ciscale::model::AgentId::new(offline.to_string())).await.expect("drain");

    let observed = ci.observe().await.expect("observe");
    let agent = |id: u32| observed.agents.iter().find(|agent| agent.id.as_str() == id.to_string()).expect("listed");

    assert!(!agent(idle).busy && agent(busy).busy, "busy = an assigned, unfinished request");
    assert!(agent(idle).last_contact.is_some(), "online agents are in contact now");
    assert_eq!(agent(offline).last_contact, None, "offline agents are not");
    assert!(agent(offline).no_schedule && !agent(idle).no_schedule, "disabled = drained");
    let finished_at = fake.requests().iter().find(|r| r.id == done).and_then(|r| r.finish_time);
    assert_eq!(agent(idle).last_work, finished_at, "last work = the last completed request's finish time");
    assert_eq!(agent(busy).last_work, None);
    assert_eq!(agent(idle).labels.get(AZURE_POOL_LABEL).map(String::as_str), Some("Linux"));

    // The finished request is history; the assigned one runs on its reserved agent; the other waits.
    assert_eq!(observed.queue.pending.len(), 1, "{:?}", observed.queue);
    assert_eq!(observed.queue.running.len(), 1, "{:?}", observed.queue);
    let waiting = &observed.queue.pending[0];
    assert_eq!(waiting.id.as_str(), pending.to_string());
    assert_eq!(waiting.demands, ["docker", "Agent.OS -equals Linux"]);
    assert_eq!(waiting.labels.get(AZURE_POOL_LABEL), Some("Linux"));
    assert_eq!(waiting.agent_id, None);
    let on_agent = &observed.queue.running[0];
    assert_eq!(on_agent.id.as_str(), running.to_string());
    assert_eq!(on_agent.agent_id.as_ref().map(|id| id.as_str().to_owned()), Some(busy.to_string()));
}

#[tokio::test]
async fn observation_spans_every_bound_pool_once() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    fake.add_pool("Gpu");
    fake.agent_online("Linux", "a-1");
    fake.agent_online("Gpu", "g-1");
    fake.add_request("Gpu", &[]);
    // Two ciscale pools on one Azure pool read it once.
    let ci = source(&fake, &[("small", "Linux"), ("large", "Linux"), ("gpu", "Gpu")]);
    let observed = ci.observe().await.expect("observe");
    let names: Vec<&str> = observed.agents.iter().map(|agent| agent.name.as_str()).collect();
    assert_eq!(names, ["g-1", "a-1"], "pools in name order (Gpu, Linux)");
    assert_eq!(observed.queue.pending.len(), 1);
    assert_eq!(fake.calls(Route::Agents), 2, "one agents call per distinct Azure pool");
    assert_eq!(fake.calls(Route::JobRequests), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// Demand and pool matching in the planner
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn planner_counts_each_request_for_its_azure_pool_and_demands() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    fake.add_pool("Gpu");
    fake.add_request("Linux", &["docker"]);
    fake.add_request("Linux", &["docker", "Agent.Version -gtVersion 4.0"]);
    fake.add_request("Linux", &["java -equals 17"]);
    fake.add_request("Gpu", &["docker"]);
    fake.add_request("Gpu", &["cuda"]);
    let config = format!(
        r#"id: acme
ci:
  azure: {{ kind: azure-pipelines, organizationUrl: "{url}", pat: "${{PAT}}" }}
backends:
  sim: {{ kind: fake }}
pools:
  - name: linux
    ci: {{ source: azure, azurePool: Linux, capabilities: {{ docker: "" }} }}
    backend: {{ name: sim }}
    scale: {{ max: 10 }}
  - name: gpu
    ci: {{ source: azure, azurePool: Gpu, capabilities: {{ docker: "", cuda: "12" }} }}
    backend: {{ name: sim }}
    scale: {{ max: 10 }}
"#,
        url = fake.org_url()
    );
    let desired = ciscale::config::load_str("ciscale.yaml", &config, &|name| (name == "PAT").then(|| PAT.to_owned()))
        .expect("config");
    let providers = ciscale::providers::connect(&desired).expect("connect");
    let now = jiff::Timestamp::now();
    let observed = ciscale::observe::observe(&desired, &providers, now).await.expect("observe");
    let plan = ciscale::plan::plan(&desired, &observed, now);
    let pending: BTreeMap<&str, u32> =
        plan.pools.iter().map(|status| (status.pool.as_str(), status.pending_jobs)).collect();
    // Linux: two docker requests (the Agent.Version demand is ignored); the java one fits no pool.
    // Gpu: both, although the docker one would fit the earlier `linux` pool by demands: it waits in `Gpu`.
    assert_eq!(pending, BTreeMap::from([("linux", 2), ("gpu", 2)]));
    assert_eq!(plan.summary.create, 4, "{plan:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Registration, drain, deregister
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_hands_out_what_config_sh_needs() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    let ci = source(&fake, &[("linux", "Linux")]);
    let mut request = register_request("acme-linux-1", "linux");
    request.labels.insert(EPHEMERAL_LABEL.to_owned(), "true".to_owned());
    let credential = ci.register(&request).await.expect("register");
    assert_eq!(credential.agent_id.as_str(), format!("{UNREGISTERED_PREFIX}acme-linux-1"));
    assert_eq!(
        credential.env,
        BTreeMap::from([
            ("AZP_AGENT_NAME".to_owned(), "acme-linux-1".to_owned()),
            ("AZP_ONCE".to_owned(), "true".to_owned()),
            ("AZP_POOL".to_owned(), "Linux".to_owned()),
            ("AZP_URL".to_owned(), fake.org_url()),
        ])
    );
    // Without `agentPat` the source's own PAT is all there is.
    assert_eq!(credential.token.expose(), PAT);
    assert!(!format!("{credential:?}").contains(PAT), "the credential's Debug hides the token");
    assert!(fake.agents().is_empty(), "register creates no record: the agent registers itself");

    let with_agent_pat = AzurePipelines::new(AzureSettings {
        agent_pat: Some(Secret::new(AGENT_PAT)),
        ..settings(&fake, &[("linux", "Linux")])
    })
    .expect("client");
    let credential = with_agent_pat.register(&register_request("acme-linux-2", "linux")).await.expect("register");
    assert_eq!(credential.token.expose(), AGENT_PAT, "the scoped agent PAT is handed out, not the admin PAT");
    assert!(!credential.env.contains_key("AZP_ONCE"), "not ephemeral");

    let unbound = ci.register(&register_request("x", "elsewhere")).await;
    assert!(matches!(unbound, Err(Error::Invalid { .. })), "{unbound:?}");
}

#[tokio::test]
async fn a_fresh_process_finds_the_agents_pool_by_asking() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    fake.add_pool("Gpu");
    let agent = fake.agent_online("Gpu", "g-1");
    // No observation before: nothing cached, as in `apply PLANFILE` right after start.
    let ci = source(&fake, &[("linux", "Linux"), ("gpu", "Gpu")]);
    ci.drain(&ciscale::model::AgentId::new(agent.to_string())).await.expect("drain");
    assert!(!fake.agents()[0].enabled);
    ci.deregister(&ciscale::model::AgentId::new(agent.to_string())).await.expect("deregister");
    assert!(fake.agents().is_empty());
    let missing = ci.deregister(&ciscale::model::AgentId::new(agent.to_string())).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    let placeholder = ci.drain(&ciscale::model::AgentId::new(format!("{UNREGISTERED_PREFIX}g-2"))).await;
    assert!(matches!(placeholder, Err(Error::NotFound { .. })), "a placeholder id has no record: {placeholder:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_failure_maps_onto_its_variant_and_never_shows_the_pat() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    let ci = source(&fake, &[("linux", "Linux")]);
    ci.observe().await.expect("a first, healthy observation");
    let mut errors = Vec::new();

    fake.inject(Fault::on(Route::Agents, FaultKind::Status(503), 1));
    let error = ci.observe().await.expect_err("503");
    assert!(matches!(error, Error::Unavailable { .. }) && error.is_transient(), "{error:?}");
    errors.push(error);

    fake.inject(Fault::on(Route::JobRequests, FaultKind::RateLimited { retry_after_secs: 7 }, 1));
    let error = ci.observe().await.expect_err("429");
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait), .. } if wait == Duration::from_secs(7)),
        "{error:?}"
    );
    errors.push(error);

    fake.inject(Fault::on(Route::Agents, FaultKind::Malformed, 1));
    let error = ci.observe().await.expect_err("malformed");
    assert!(matches!(error, Error::Other { .. }), "{error:?}");
    assert!(error.to_string().contains("agents of pool `Linux`"), "the context names the call: {error}");
    errors.push(error);

    fake.inject(Fault::on(Route::Agents, FaultKind::SignInPage, 1));
    let error = ci.observe().await.expect_err("sign-in page");
    assert!(matches!(error, Error::Unauthenticated { .. }), "{error:?}");
    errors.push(error);

    fake.inject(Fault::on(Route::Agent, FaultKind::Status(400), 1));
    fake.agent_online("Linux", "a-1");
    ci.observe().await.expect("observe");
    let id = ciscale::model::AgentId::new(fake.agents()[0].id.to_string());
    let error = ci.drain(&id).await.expect_err("400");
    assert!(matches!(error, Error::Invalid { .. }), "{error:?}");
    errors.push(error);

    let slow = AzurePipelines::new(AzureSettings {
        timeout: Duration::from_millis(200),
        ..settings(&fake, &[("linux", "Linux")])
    })
    .expect("client");
    fake.inject(Fault::on(Route::Pools, FaultKind::Hang(Duration::from_secs(3)), 1));
    let error = slow.observe().await.expect_err("timeout");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("no answer within"), "{error}");
    errors.push(error);

    let missing_pool = source(&fake, &[("x", "NoSuchPool")]).observe().await.expect_err("unknown pool");
    assert!(matches!(&missing_pool, Error::Invalid { message, .. } if message.contains("hint:")), "{missing_pool:?}");
    errors.push(missing_pool);

    for style in [BadAuth::Unauthorized401, BadAuth::SignInPage203] {
        fake.set_bad_auth(style);
        let wrong = AzurePipelines::new(AzureSettings {
            pat: Secret::new("wrong-pat"),
            ..settings(&fake, &[("linux", "Linux")])
        })
        .expect("client");
        let error = wrong.observe().await.expect_err("bad PAT");
        assert!(matches!(error, Error::Unauthenticated { .. }), "{style:?}: {error:?}");
        errors.push(error);
    }

    let nobody_listens = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        AzurePipelines::new(AzureSettings {
            pools: BTreeMap::from([(PoolName::new("linux"), "Linux".to_owned())]),
            ..AzureSettings::new(format!("http://127.0.0.1:{port}/org"), Secret::new(PAT))
        })
        .expect("client")
    };
    let error = nobody_listens.observe().await.expect_err("refused");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    errors.push(error);

    for error in &errors {
        assert!(!shown(error).contains(PAT), "the PAT leaked: {}", shown(error));
    }
    assert!(!format!("{ci:?}").contains(PAT), "Debug of the source");
}

// ---------------------------------------------------------------------------------------------------------------
// Calls per cycle
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idle_cycle_costs_two_calls_per_azure_pool() {
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    fake.add_pool("Gpu");
    fake.agent_online("Linux", "a-1");
    let ci = source(&fake, &[("linux", "Linux"), ("gpu", "Gpu")]);
    ci.observe().await.expect("first cycle");
    assert_eq!(fake.total_calls(), 6, "the first cycle also looks each pool's id up once");
    fake.reset_calls();
    for _ in 0..5 {
        ci.observe().await.expect("idle cycle");
    }
    assert_eq!(fake.calls(Route::Pools), 0, "pool ids are cached");
    assert_eq!(fake.total_calls(), 5 * 4, "2 calls per pool per cycle, 2 pools");
}

/// A `Write` target the log lines of one test go to.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_nearly_used_up_rate_limit_budget_is_warned_about() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    let ci = source(&fake, &[("linux", "Linux")]);
    fake.set_rate_limit_headers(150, 200);
    ci.observe().await.expect("observe with plenty of budget");
    let text =
        || String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned();
    assert!(!text().contains("rate-limit budget"), "no warning with 75 % left: {}", text());
    fake.set_rate_limit_headers(5, 200);
    ci.observe().await.expect("a low budget still answers");
    assert!(text().contains("rate-limit budget is nearly used up"), "{}", text());
    assert!(!text().contains(PAT));
}

// ---------------------------------------------------------------------------------------------------------------
// Wire format against the published spec
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_and_fake_speak_the_published_spec() {
    let spec = azure_spec();
    let fake = AzureFake::start(PAT);
    fake.add_pool("Linux");
    let ci = source(&fake, &[("linux", "Linux")]);
    // Everything the client does: lookup, observe with busy/idle/finished agents, register, drain, undrain,
    // deregister, a fresh process's probe, and error answers.
    let busy = fake.agent_online("Linux", "a-1");
    let idle = fake.agent_online("Linux", "a-2");
    let finished = fake.add_request("Linux", &["docker"]);
    fake.assign(finished, idle);
    fake.finish(finished, "succeeded");
    let running = fake.add_request("Linux", &[]);
    fake.assign(running, busy);
    fake.add_request("Linux", &["docker", "Agent.Version -gtVersion 3.0"]);
    ci.observe().await.expect("observe");
    ci.register(&register_request("a-1", "linux")).await.expect("register");
    let idle_id = ciscale::model::AgentId::new(idle.to_string());
    ci.drain(&idle_id).await.expect("drain");
    ci.undrain(&idle_id).await.expect("undrain");
    source(&fake, &[("linux", "Linux")]).drain(&idle_id).await.expect("fresh drain");
    ci.deregister(&idle_id).await.expect("deregister");
    assert!(ci.deregister(&idle_id).await.is_err());

    let exchanges = fake.exchanges();
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    for exchange in &exchanges {
        assert_ne!(exchange.route, Route::Unknown, "the client called an unknown path: {exchange:?}");
        if exchange.route == Route::JobRequests {
            // `jobrequests` is not in the spec (it is undocumented): its items are checked against the spec's
            // `TaskAgentJobRequest` except where the real service differs from it — `demands` are strings, and
            // `result` is `null` while a request is unfinished.
            assert!(!spec.covers(&exchange.method, &exchange.path), "jobrequests appeared in the spec");
            let items = exchange.response_body.as_ref().and_then(|body| body.get("value")).and_then(|v| v.as_array());
            for item in items.expect("a jobrequests list") {
                let mut item = item.clone();
                assert!(item.get("result").is_some(), "unfinished requests carry `result: null` explicitly");
                let object = item.as_object_mut().expect("object");
                object.remove("demands");
                if object.get("result").is_some_and(|result| result.is_null()) {
                    object.remove("result");
                }
                let problems = spec.validate(&spec.definition("TaskAgentJobRequest"), &item);
                assert!(problems.is_empty(), "jobrequests item {item}: {problems:?}");
            }
        } else if let Err(problem) = spec.check(exchange) {
            panic!("not what the spec says:\n{problem}");
        }
        *checked.entry(format!("{} {:?} {}", exchange.method, exchange.route, exchange.status)).or_default() += 1;
    }
    for expected in [
        "GET Pools 200",
        "GET Agents 200",
        "GET JobRequests 200",
        "PATCH Agent 200",
        "DELETE Agent 200",
        "GET Agent 200",
        "GET Agent 404",
    ] {
        assert!(checked.contains_key(expected), "no `{expected}` exchange was checked: {checked:?}");
    }
}

#[test]
fn the_spec_check_rejects_what_the_spec_does_not_say() {
    use crate::fakes::azure::Exchange;
    let spec = azure_spec();
    let good = Exchange {
        method: "PATCH".into(),
        path: "/org/_apis/distributedtask/pools/1/agents/5".into(),
        query: vec![("api-version".into(), "7.1".into())],
        request_body: Some(serde_json::json!({"id": 5, "enabled": false})),
        status: 200,
        response_body: Some(serde_json::json!({"id": 5, "name": "a", "enabled": false, "status": "online"})),
        route: Route::Agent,
    };
    assert_eq!(spec.check(&good), Ok(()));
    let bad = [
        Exchange { path: "/org/_apis/distributedtask/pools/x/agents/5".into(), ..good.clone() },
        Exchange { query: vec![], ..good.clone() },
        Exchange {
            query: vec![("api-version".into(), "7.1".into()), ("includeEverything".into(), "true".into())],
            ..good.clone()
        },
        Exchange { request_body: Some(serde_json::json!({"id": "five"})), ..good.clone() },
        Exchange { response_body: Some(serde_json::json!({"id": 5, "status": "sleeping"})), ..good.clone() },
        Exchange { method: "POST".into(), ..good.clone() },
    ];
    for exchange in bad {
        assert!(spec.check(&exchange).is_err(), "accepted: {exchange:?}");
    }
    // A list answer must be wrapped as Azure wraps it, and its items must fit.
    let list = Exchange {
        method: "GET".into(),
        path: "/org/_apis/distributedtask/pools/1/agents".into(),
        query: vec![("api-version".into(), "7.1".into())],
        request_body: None,
        status: 200,
        response_body: Some(
            serde_json::json!({"count": 1, "value": [{"id": 1, "name": "a", "createdOn": "2024-01-01T00:00:00Z"}]}),
        ),
        route: Route::Agents,
    };
    assert_eq!(spec.check(&list), Ok(()));
    let bare = Exchange { response_body: Some(serde_json::json!([{"id": 1}])), ..list.clone() };
    assert!(spec.check(&bare).is_err());
    let bad_date = Exchange {
        response_body: Some(serde_json::json!({"count": 1, "value": [{"id": 1, "createdOn": "yesterday"}]})),
        ..list
    };
    assert!(spec.check(&bad_date).is_err(), "formats are checked");
}

// ---------------------------------------------------------------------------------------------------------------
// End to end: `ciscale watch` with the Azure fake and the fake backend
// ---------------------------------------------------------------------------------------------------------------

/// `ciscale watch --json -c ciscale.yaml` of the real binary in `dir`, with both PATs in its environment and its
/// output read on threads (a full pipe would stall it). Killed if dropped while running, so a failing test
/// leaves no daemon behind that keeps creating instances.
pub(crate) struct WatchProcess {
    child: Option<std::process::Child>,
    /// Every plan of this `watch` is judged by the safety oracle once the process is gone.
    _trace: crate::safety::ledger::PlanTrace,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl WatchProcess {
    pub(crate) fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, &[("AZP_ADMIN_PAT", PAT), ("AZP_AGENT_PAT", AGENT_PAT)])
    }

    /// [`WatchProcess::start`] with these variables (the config's secrets) in its environment.
    pub(crate) fn start_with(dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_ciscale"))
            .current_dir(dir)
            .args(["watch", "--json", "-c", "ciscale.yaml"])
            .env_remove("CISCALE_LOG")
            // Its own lock folder: other runs on this host (another engineer's, a second suite) act for `e2e` too.
            .env("CISCALE_LOCK_DIR", dir)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .env(crate::safety::ledger::TRACE_ENV, dir.join("plan-trace.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start watch");
        let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = child.stdout.take().map(|pipe| read_all(Box::new(pipe)));
        let stderr = child.stderr.take().map(|pipe| read_all(Box::new(pipe)));
        Self {
            child: Some(child),
            _trace: crate::safety::ledger::PlanTrace::new(dir, dir.join("ciscale.yaml")).forbid(&[PAT, AGENT_PAT]),
            stdout,
            stderr,
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the running process.
    pub(crate) fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = std::process::Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
        assert!(sent.is_ok_and(|status| status.success()), "kill -{signal}");
    }

    /// `Some(status)` once the process has ended on its own.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// SIGTERM (the graceful stop a service manager sends), then the exit status, stdout and stderr.
    pub(crate) fn terminate(mut self) -> (std::process::ExitStatus, String, String) {
        let mut child = self.child.take().expect("running");
        let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let status = child.wait().expect("watch ends");
        let joined = |reader: Option<std::thread::JoinHandle<String>>| {
            reader.and_then(|reader| reader.join().ok()).unwrap_or_default()
        };
        (status, joined(self.stdout.take()), joined(self.stderr.take()))
    }
}

impl Drop for WatchProcess {
    /// Kills a watch still running; when a test failed, shows what it printed (the failure's best witness).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let joined = |reader: Option<std::thread::JoinHandle<String>>| {
                reader.and_then(|reader| reader.join().ok()).unwrap_or_default()
            };
            let (out, err) = (joined(self.stdout.take()), joined(self.stderr.take()));
            eprintln!("--- watch stdout\n{out}\n--- watch stderr\n{err}");
        }
    }
}

/// The test plays the agents: an instance that appears runs `config.sh` (comes online), asks for a job, runs
/// it, and powers off — its ephemeral container is gone, its record stays offline for ciscale to remove.
#[test]
fn watch_refills_a_fixed_ephemeral_pool_and_serves_a_queue_driven_one() {
    use ciscale::model::{FakeSpec, InstanceState, POOL_LABEL};
    use ciscale::providers::fake::FakeWorld;
    use std::time::Instant;

    let fake = AzureFake::start(PAT);
    fake.add_pool("Fixed");
    fake.add_pool("Queue");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"id: e2e
pollInterval: 200ms
ci:
  azure: {{ kind: azure-pipelines, organizationUrl: "{url}", pat: "${{AZP_ADMIN_PAT}}", agentPat: "${{AZP_AGENT_PAT}}" }}
backends:
  sim: {{ kind: fake, stateFile: world.json }}
pools:
  - name: fixed
    ci: {{ source: azure, azurePool: Fixed }}
    backend: {{ name: sim, machine: {{ image: agent }} }}
    scale: {{ min: 2, max: 2, ephemeral: true }}
  - name: queue
    ci: {{ source: azure, azurePool: Queue, capabilities: {{ docker: "" }} }}
    backend: {{ name: sim, machine: {{ image: agent }} }}
    scale: {{ min: 0, max: 3, ephemeral: true }}
"#,
        url = fake.org_url()
    );
    std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open the world");

    let mut watch = WatchProcess::start(dir.path());

    // name → (agent id, the request it runs)
    let mut online: BTreeMap<String, (u32, Option<u64>)> = BTreeMap::new();
    let mut finished_agents: Vec<String> = Vec::new();
    let mut queued = None;
    let mut created: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcome = loop {
        let snapshot = world.snapshot();
        for instance in snapshot.instances.iter().filter(|instance| instance.state == InstanceState::Running) {
            created.insert(instance.name.clone());
            if !online.contains_key(&instance.name) && !finished_agents.contains(&instance.name) {
                let (azure_pool, capabilities) = match instance.labels.get(POOL_LABEL).map(String::as_str) {
                    Some("fixed") => ("Fixed", BTreeMap::new()),
                    _ => ("Queue", BTreeMap::from([("docker".to_owned(), String::new())])),
                };
                let id = fake.agent_online_with(azure_pool, &instance.name, capabilities);
                online.insert(instance.name.clone(), (id, None));
            }
        }
        // Agents run their job to the end, then power off (the container deletes itself), or ask for one.
        for (name, (id, job)) in online.iter_mut() {
            match job {
                Some(request) => {
                    fake.finish(*request, "succeeded");
                    fake.agent_offline(*id);
                    world.update(|state| state.instances.retain(|instance| &instance.name != name));
                    finished_agents.push(name.clone());
                }
                None => *job = fake.take_next(*id),
            }
        }
        online.retain(|name, _| !finished_agents.contains(name));

        // Once the fixed pool is up, the jobs come.
        let fixed_online = online.keys().filter(|name| name.starts_with("e2e-fixed-")).count();
        if queued.is_none() && fixed_online == 2 {
            let fixed = fake.add_request("Fixed", &[]);
            let docker = [fake.add_request("Queue", &["docker"]), fake.add_request("Queue", &["docker"])];
            let gpu = fake.add_request("Queue", &["gpu"]);
            queued = Some((fixed, docker, gpu));
        }

        if let Some((fixed, docker, gpu)) = queued {
            let requests = fake.requests();
            let done = |id: u64| requests.iter().any(|request| request.id == id && !request.is_unfinished());
            let active = |pool: &str| {
                world
                    .snapshot()
                    .instances
                    .iter()
                    .filter(|i| i.state.is_active() && i.labels.get(POOL_LABEL).map(String::as_str) == Some(pool))
                    .count()
            };
            let records_removed = finished_agents.iter().all(|name| fake.agent_named(name).is_none());
            if done(fixed)
                && docker.iter().all(|id| done(*id))
                && !done(gpu)
                && records_removed
                && active("fixed") == 2
                && online.keys().filter(|name| name.starts_with("e2e-fixed-")).count() == 2
                && active("queue") == 0
            {
                break Ok(());
            }
        }
        if Instant::now() > deadline {
            break Err(format!(
                "did not converge: online {online:?}, finished {finished_agents:?}, requests {:?}, instances {:?}",
                fake.requests(),
                world.snapshot().instances
            ));
        }
        if let Some(status) = watch.exited() {
            break Err(format!("watch exited early with {status}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let (status, out, err) = watch.terminate();
    if let Err(why) = outcome {
        panic!("{why}\n--- stdout\n{out}\n--- stderr\n{err}");
    }
    assert_eq!(status.code(), Some(0), "{err}");
    for secret in [PAT, AGENT_PAT] {
        assert!(!out.contains(secret) && !err.contains(secret), "a PAT leaked:\n{out}\n{err}");
    }

    // The fixed pool was refilled after its agent ran its job; the queue pool grew for the two docker jobs only.
    let fixed_created = created.iter().filter(|name| name.starts_with("e2e-fixed-")).count();
    let queue_created = created.iter().filter(|name| name.starts_with("e2e-queue-")).count();
    assert_eq!(fixed_created, 3, "2 at start + 1 replacement: {created:?}");
    assert_eq!(queue_created, 2, "one per docker job, none for the gpu job: {created:?}");

    // Each agent got the scoped agent PAT (never the admin PAT) and what `config.sh` needs, in a 0400 file.
    let pushed = world.snapshot().pushed_files;
    assert_eq!(pushed.len(), 5, "{pushed:?}");
    assert_eq!(world.snapshot().counters.instances, 5, "no instance was created twice");
    let mut digests_checked = 0;
    for file in &pushed {
        let name = file.instance.as_str();
        let instance_name = world
            .snapshot()
            .instances
            .iter()
            .find(|instance| instance.id == file.instance)
            .map(|instance| instance.name.clone());
        assert_eq!(file.mode, 0o400);
        // Instances that powered off are gone from the world; the file's digest is checked for those still there.
        if let Some(instance_name) = instance_name {
            let azure_pool = if instance_name.starts_with("e2e-fixed-") { "Fixed" } else { "Queue" };
            let expected = format!(
                "AZP_AGENT_NAME={instance_name}\nAZP_ONCE=true\nAZP_POOL={azure_pool}\nAZP_URL={}\n\
                 CISCALE_AGENT_ID={UNREGISTERED_PREFIX}{instance_name}\nCISCALE_AGENT_TOKEN={AGENT_PAT}\n",
                fake.org_url()
            );
            assert_eq!(file.sha256, ciscale::providers::fake::sha256_hex(expected.as_bytes()), "credential of {name}");
            digests_checked += 1;
        }
    }
    assert_eq!(digests_checked, 2, "the two fixed agents still running");
}

// ---------------------------------------------------------------------------------------------------------------
// `ciscale import incus-azure-pipelines`
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn import_of_an_incus_azure_pipelines_config_is_equivalent_and_valid() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import/incus-azure-pipelines.yaml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .args(["import", "incus-azure-pipelines"])
        .arg(&fixture)
        .env("NO_COLOR", "1")
        .env_remove("CISCALE_LOG")
        .output()
        .expect("ciscale runs");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    for pat in ["import-test-pat-one-AAAA", "import-test-pat-two-BBBB"] {
        assert!(!stdout.contains(pat) && !stderr.contains(pat), "a PAT was printed:\n{stdout}\n{stderr}");
    }
    let stderr = stderr.replace(&fixture.display().to_string(), "[FIXTURE]");
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!("import-incus-azure-pipelines.yaml", stdout);
        insta::assert_snapshot!("import-incus-azure-pipelines.stderr", stderr);
    });

    // The output is a valid ciscale config once the named variables are set, and means what the tool did.
    let env = |name: &str| matches!(name, "AZP_PAT_1" | "AZP_PAT_2").then(|| format!("value-of-{name}"));
    let desired = ciscale::config::load_str("imported.yaml", &stdout, &env).expect("the imported config validates");
    assert_eq!(desired.ci.len(), 2, "one source per organization (the trailing `/` does not count)");
    assert_eq!(desired.backends.len(), 2, "one backend per incus project");
    let pools: Vec<(&str, u32, u32, bool, Option<&str>)> = desired
        .pools
        .iter()
        .map(|pool| {
            (
                pool.name.as_str(),
                pool.scale.min,
                pool.scale.max,
                pool.scale.ephemeral,
                pool.ci.labels.get(ciscale::model::AZURE_POOL_LABEL).map(String::as_str),
            )
        })
        .collect();
    assert_eq!(
        pools,
        [
            ("linux-small", 4, 4, true, Some("linux-small")),
            ("linux-large", 2, 2, true, Some("Linux_Large")),
            ("other-org", 1, 1, true, Some("other-org")),
        ]
    );
    let small = &desired.pools[0];
    assert_eq!(small.backend.machine.get("memory").map(String::as_str), Some("4GiB"));
    assert_eq!(small.backend.machine.get("tmpfsSize").map(String::as_str), Some("2GiB"));
    assert_eq!(small.backend.machine.get("cpu").map(String::as_str), Some("2"));
    assert_eq!(small.backend.machine.get("nesting").map(String::as_str), Some("true"));
    assert_eq!(small.agent.env.get("DOCKER_BUILDKIT").map(String::as_str), Some("1"));
    assert_eq!(desired.pools[1].scale.bootstrap_timeout, ciscale::model::GoDuration::from_secs(300));
}
