//! The Hetzner Cloud backend against the in-repo Hetzner fake: the conformance suite, pagination, capacity
//! fallback, error mapping, secrecy, API calls per cycle, the wire format checked against the OpenAPI spec, and the
//! `ciscale` binary end to end (watch through a job's whole life; kill -9 mid-create and rerun).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::Method;
use ciscale::apply::{agent_env_file, cloud_init, AGENT_ENV_PATH, METADATA_ADDRESS};
use ciscale::model::{
    AgentId, AgentSpec, FakeSpec, InstanceId, InstanceState, PoolName, Secret, OWNER_LABEL, POOL_LABEL,
};
use ciscale::providers::fake::FakeWorld;
use ciscale::providers::hcloud::{Hcloud, HcloudSettings};
use ciscale::providers::{AgentCredential, Backend, CreateInstance, Error, ListInstances};

use crate::conformance::{backend_conformance_on, Patience};
use crate::fakes::hcloud::{FaultKind, HcloudFake};
use crate::fakes::spec::Spec;

/// The project token; recognisable, so a leak anywhere is found by a substring search.
const TOKEN: &str = "hc-t0ken-must-not-leak-8a7f";
/// A secret of the pool's agent env.
const AGENT_SECRET: &str = "agent-s3cret-must-not-leak-19";
const OWNER: &str = "hc";

fn backend_with_timeout(fake: &HcloudFake, timeout: Duration) -> Hcloud {
    let settings = HcloudSettings { token: Secret::new(TOKEN), endpoint: fake.endpoint().to_owned(), timeout };
    Hcloud::new(settings).expect("a backend")
}

fn backend(fake: &HcloudFake) -> Hcloud {
    backend_with_timeout(fake, Duration::from_secs(10))
}

fn machine(server_type: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("serverType".to_owned(), server_type.to_owned()),
        ("location".to_owned(), "fsn1".to_owned()),
        ("image".to_owned(), "docker-ce".to_owned()),
    ])
}

fn request(name: &str, machine: BTreeMap<String, String>) -> CreateInstance {
    CreateInstance {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::from([
            (OWNER_LABEL.to_owned(), OWNER.to_owned()),
            (POOL_LABEL.to_owned(), "linux".to_owned()),
        ]),
        machine,
        user_data: None,
        attempt: None,
    }
}

fn owned() -> ListInstances {
    ListInstances { owner: OWNER.to_owned(), adopted: Vec::new(), images: Vec::new() }
}

/// Every exchange the fake saw is what the spec describes: known method and path, declared query parameters,
/// request and response bodies matching their schemas.
fn assert_spec_conform(fake: &HcloudFake) {
    let spec = Spec::load("hcloud.json");
    let exchanges = fake.exchanges();
    assert!(!exchanges.is_empty(), "nothing to check");
    for exchange in exchanges {
        let query: Vec<(&str, &str)> =
            exchange.query.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        spec.check_request(&exchange.method, &exchange.path, &query, exchange.request_body.as_ref())
            .unwrap_or_else(|problem| panic!("client request: {problem}"));
        if let Some(body) = &exchange.response_body {
            spec.check_response(&exchange.method, &exchange.path, exchange.status, Some(body))
                .unwrap_or_else(|problem| panic!("fake response: {problem}"));
        }
    }
}

// -- the contract -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn conformance_against_the_fake_and_the_spec() {
    let fake = HcloudFake::start(TOKEN).await;
    let hcloud = Arc::new(backend(&fake));
    let patience = Patience { attempts: 10, interval: Duration::from_millis(5) };
    backend_conformance_on(hcloud.clone(), OWNER, patience, &machine("cx22")).await;
    assert!(fake.servers().is_empty(), "the suite cleans up: {:?}", fake.servers());
    assert_eq!(hcloud.capabilities(), ciscale::providers::Capabilities { exec: false, keeps_stopped: true });
    // The suite used list, get, create, both actions and delete: all of them on the wire as the spec says.
    for (method, path) in [("GET", "/servers"), ("POST", "/servers"), ("DELETE", "/servers/1000")] {
        assert!(fake.count(method, path) > 0, "{method} {path} was called");
    }
    assert_spec_conform(&fake);
}

#[test]
fn the_spec_checker_catches_a_wrong_body() {
    let spec = Spec::load("hcloud.json");
    let missing_fields = serde_json::json!({ "server": { "id": 1, "name": "x" } });
    assert!(spec.check_response("GET", "/servers/1", 200, Some(&missing_fields)).is_err());
    let wrong_request = serde_json::json!({ "name": "x", "server_type": 5, "image": "docker-ce" });
    assert!(spec.check_request("POST", "/servers", &[], Some(&wrong_request)).is_err());
    assert!(spec.check_request("GET", "/servers", &[("no_such_parameter", "1")], None).is_err());
    assert!(spec.check_request("PATCH", "/servers/1", &[], None).is_err());
    assert_eq!(spec.template("/servers/42/actions/poweron").as_deref(), Some("/servers/{id}/actions/poweron"));
}

#[tokio::test]
async fn observe_reads_every_page_in_one_listing_and_prices_once() {
    let fake = HcloudFake::start(TOKEN).await;
    for index in 0..120 {
        fake.insert_server(&format!("hc-linux-{index}"), &[(OWNER_LABEL, OWNER), (POOL_LABEL, "linux")]);
    }
    for index in 0..7 {
        fake.insert_server(&format!("other-{index}"), &[(OWNER_LABEL, "someone-else")]);
    }
    fake.insert_server("unlabelled", &[]);
    let hcloud = backend(&fake);

    let observation = hcloud.observe(&owned()).await.expect("observe");
    assert_eq!(observation.instances.len(), 120);
    assert!(observation.instances.iter().all(|instance| instance.owner() == Some(OWNER)));
    let first = observation.instances.iter().find(|instance| instance.name == "hc-linux-0").expect("listed");
    assert_eq!(first.state, InstanceState::Running);
    assert_eq!(first.attributes.get("serverType").map(String::as_str), Some("cx22"));
    assert_eq!(first.attributes.get("location").map(String::as_str), Some("fsn1"));
    assert_eq!(first.attributes.get("image").map(String::as_str), Some("ubuntu-24.04"));
    let cx22 = observation.prices.get("cx22").expect("priced");
    assert!((cx22.hourly - 0.006).abs() < 1e-9 && cx22.currency == "EUR", "{cx22:?}");
    assert_eq!(fake.count("GET", "/servers"), 3, "120 servers in pages of 50");
    for exchange in fake.exchanges().iter().filter(|exchange| exchange.path == "/servers") {
        assert_eq!(exchange.query.get("label_selector").map(String::as_str), Some("ciscale.owner=hc"));
        assert_eq!(exchange.query.get("per_page").map(String::as_str), Some("50"));
    }
    assert_eq!(fake.count("GET", "/server_types"), 1);

    hcloud.observe(&owned()).await.expect("observe again");
    assert_eq!(fake.count("GET", "/server_types"), 1, "prices are read once per process");
    assert_eq!(fake.count("GET", "/servers"), 6);
    assert_spec_conform(&fake);
}

#[tokio::test]
async fn adopted_servers_are_read_by_id_and_a_missing_one_is_left_out() {
    let fake = HcloudFake::start(TOKEN).await;
    let adopted = fake.insert_server("picus-agent", &[]);
    let hcloud = backend(&fake);
    let request = ListInstances {
        owner: OWNER.to_owned(),
        adopted: vec![InstanceId::new(adopted.to_string()), InstanceId::new("999999")],
        images: Vec::new(),
    };
    let observation = hcloud.observe(&request).await.expect("observe");
    assert_eq!(observation.instances.len(), 1);
    assert_eq!(observation.instances[0].name, "picus-agent");
    assert_eq!(fake.count("GET", &format!("/servers/{adopted}")), 1);
}

#[tokio::test]
async fn create_falls_back_to_the_next_server_type_and_location() {
    let fake = HcloudFake::start(TOKEN).await;
    fake.set_unavailable("cx22", "*");
    fake.set_unavailable("cx32", "fsn1");
    let hcloud = backend(&fake);
    let mut machine = machine("cx22,cx32");
    machine.insert("location".to_owned(), "fsn1,nbg1".to_owned());
    machine.insert("sshKeys".to_owned(), "deploy,ops".to_owned());
    machine.insert("networks".to_owned(), "17".to_owned());
    machine.insert("firewalls".to_owned(), "38,39".to_owned());
    let created = hcloud.create(&request("hc-linux-1", machine)).await.expect("created on a fallback");
    assert_eq!(created.attributes.get("serverType").map(String::as_str), Some("cx32"));
    assert_eq!(created.attributes.get("location").map(String::as_str), Some("nbg1"));
    assert_eq!(created.state, InstanceState::Pending);
    let tried: Vec<(String, String)> = fake
        .exchanges()
        .iter()
        .filter(|exchange| exchange.method == "POST")
        .filter_map(|exchange| {
            let body = exchange.request_body.as_ref()?;
            Some((body["server_type"].as_str()?.to_owned(), body["location"].as_str()?.to_owned()))
        })
        .collect();
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(tried, [pair("cx22", "fsn1"), pair("cx22", "nbg1"), pair("cx32", "fsn1"), pair("cx32", "nbg1")]);
    let servers = fake.servers();
    assert_eq!(servers.len(), 1, "one server, no half-created leftovers");
    assert_eq!(servers[0].ssh_keys, ["deploy", "ops"]);
    assert_eq!(servers[0].networks, [17]);
    assert_eq!(servers[0].firewalls, [38, 39]);
    assert_eq!(servers[0].labels.get(OWNER_LABEL).map(String::as_str), Some(OWNER));
    assert_spec_conform(&fake);

    fake.set_unavailable("cx32", "*");
    let refused = hcloud.create(&request("hc-linux-2", self::machine("cx22,cx32"))).await;
    match refused {
        Err(Error::Capacity { message, .. }) => {
            assert!(message.contains("cx22 in fsn1 (resource_unavailable)") && message.contains("cx32"), "{message}")
        }
        other => panic!("no capacity anywhere: {other:?}"),
    }
}

// -- errors ------------------------------------------------------------------------------------------------------

fn assert_no_token(text: &str) {
    assert!(!text.contains(TOKEN), "the token leaked: {text}");
}

#[tokio::test]
async fn errors_map_onto_the_shared_kinds_without_the_token() {
    let fake = HcloudFake::start(TOKEN).await;
    let hcloud = backend_with_timeout(&fake, Duration::from_millis(700));
    let debug = format!("{hcloud:?}");
    assert!(debug.contains(fake.endpoint()), "{debug}");
    assert_no_token(&debug);
    let mut seen = Vec::new();

    fake.inject(Some(Method::GET), "/servers", FaultKind::Status(503, "unavailable"));
    let error = hcloud.observe(&owned()).await.expect_err("503");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    seen.push(error);

    fake.inject(Some(Method::GET), "/servers", FaultKind::Status(500, "server_error"));
    let error = hcloud.observe(&owned()).await.expect_err("500");
    assert!(matches!(error, Error::Unavailable { .. }) && error.is_transient(), "{error:?}");
    seen.push(error);

    fake.inject(None, "/servers", FaultKind::RateLimited { retry_after_secs: 7, reset_header: false });
    let error = hcloud.observe(&owned()).await.expect_err("429");
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait), .. } if wait == Duration::from_secs(7)),
        "{error:?}"
    );
    seen.push(error);

    fake.inject(None, "/servers", FaultKind::RateLimited { retry_after_secs: 40, reset_header: true });
    let error = hcloud.observe(&owned()).await.expect_err("429 with RateLimit-Reset");
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait), .. } if (35..=40).contains(&wait.as_secs())),
        "{error:?}"
    );
    seen.push(error);

    fake.inject(None, "/servers", FaultKind::Delay(Duration::from_secs(3)));
    let error = hcloud.observe(&owned()).await.expect_err("timeout");
    assert!(matches!(&error, Error::Unavailable { message, .. } if message.contains("timed out")), "{error:?}");
    seen.push(error);

    fake.inject(None, "/servers", FaultKind::Malformed);
    let error = hcloud.observe(&owned()).await.expect_err("malformed JSON");
    assert!(matches!(&error, Error::Other { .. }) && error.to_string().contains("GET /servers"), "{error:?}");
    seen.push(error);

    let created = hcloud.create(&request("hc-linux-1", machine("cx22"))).await.expect("create");
    let error = hcloud.create(&request("hc-linux-1", machine("cx22"))).await.expect_err("same name");
    assert!(matches!(error, Error::AlreadyExists { .. }), "{error:?}");
    seen.push(error);

    fake.inject(Some(Method::POST), "/servers", FaultKind::Status(422, "invalid_input"));
    let error = hcloud.create(&request("hc-linux-2", machine("cx22"))).await.expect_err("invalid");
    assert!(matches!(error, Error::Invalid { .. }), "{error:?}");
    seen.push(error);

    let error = hcloud.create(&request("hc-linux-3", BTreeMap::new())).await.expect_err("no machine");
    assert!(matches!(&error, Error::Invalid { message, .. } if message.contains("serverType")), "{error:?}");
    seen.push(error);

    fake.inject(Some(Method::POST), "/servers/", FaultKind::Status(423, "locked"));
    let error = hcloud.stop(&created.id).await.expect_err("locked");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    seen.push(error);

    hcloud.delete(&created.id).await.expect("delete");
    let error = hcloud.delete(&created.id).await.expect_err("gone");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    seen.push(error);
    let error = hcloud.get(&created.id).await.expect_err("gone");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    seen.push(error);

    let wrong = Hcloud::new(HcloudSettings {
        token: Secret::new("wrong-token"),
        endpoint: fake.endpoint().to_owned(),
        timeout: Duration::from_secs(5),
    })
    .expect("backend");
    let error = wrong.observe(&owned()).await.expect_err("401");
    assert!(matches!(&error, Error::Unauthenticated { message, .. } if message.contains("hint:")), "{error:?}");
    seen.push(error);

    let nowhere = Hcloud::new(HcloudSettings {
        token: Secret::new(TOKEN),
        endpoint: "http://127.0.0.1:9/v1".to_owned(),
        timeout: Duration::from_secs(5),
    })
    .expect("backend");
    let error = nowhere.observe(&owned()).await.expect_err("refused");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    seen.push(error);

    for error in &seen {
        assert_no_token(&error.to_string());
        assert_no_token(&format!("{error:?}"));
    }
}

// -- cloud-init ---------------------------------------------------------------------------------------------------

fn credential() -> AgentCredential {
    AgentCredential {
        agent_id: AgentId::new("7"),
        token: Secret::new("per-agent-token-Zq9"),
        env: BTreeMap::from([("WOODPECKER_SERVER".to_owned(), "ci.example.com:9000".to_owned())]),
    }
}

fn agent(env: &[(&str, &str)], secret_env: &[(&str, &str)]) -> AgentSpec {
    AgentSpec {
        image: Some("woodpeckerci/woodpecker-agent:v3".to_owned()),
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        secret_env: secret_env.iter().map(|(k, v)| ((*k).to_owned(), Secret::new(*v))).collect(),
        preregistered: None,
    }
}

/// The env file inside a rendered cloud-config, and every other part of it.
fn split_cloud_init(user_data: &str) -> (String, String) {
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    let document: serde_json::Value = serde_yaml::from_str(user_data).expect("valid YAML");
    let files = document["write_files"].as_array().expect("write_files");
    let env = files.iter().find(|file| file["path"] == AGENT_ENV_PATH).expect("the env file");
    assert_eq!(env["permissions"], "0600");
    assert_eq!(env["owner"], "root:root");
    let others: Vec<&serde_json::Value> = files.iter().filter(|file| file["path"] != AGENT_ENV_PATH).collect();
    let rest = format!("{} {}", serde_json::to_string(&others).unwrap_or_default(), document["runcmd"]);
    (env["content"].as_str().expect("content").to_owned(), rest)
}

/// Docker's `--env-file` reading: `KEY=value`, the value everything after the first `=`, taken literally.
fn docker_env(file: &str) -> BTreeMap<String, String> {
    file.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[test]
fn cloud_init_snapshot() {
    let env = agent_env_file(
        &agent(&[("WOODPECKER_MAX_WORKFLOWS", "2")], &[("GIT_TOKEN", "fake-git-token")]),
        &credential(),
        Some("WOODPECKER_AGENT_SECRET"),
    )
    .expect("env file");
    let user_data = cloud_init(Some("woodpeckerci/woodpecker-agent:v3"), &env).expect("cloud-init");
    insta::with_settings!({ snapshot_path => "../snapshots" }, {
        insta::assert_snapshot!("hcloud_cloud_init", user_data.expose());
    });
}

#[test]
fn cloud_init_keeps_odd_values_intact_and_the_token_in_the_env_file_only() {
    let odd = [
        ("SPACES", "a value  with spaces "),
        ("QUOTES", r#"it's "quoted" \ backslashed"#),
        ("DOLLARS", "$HOME ${PATH} $(id) `id`"),
        ("YAML", "key: value # not a comment - [x] {y} &a *b !tag |"),
        ("EMPTY", ""),
    ];
    let spec = agent(&odd, &[("SECRET_WITH_SPACE", "s3 cr3t'\"$x")]);
    let env = agent_env_file(&spec, &credential(), Some("WOODPECKER_AGENT_SECRET")).expect("env file");
    let user_data = cloud_init(None, &env).expect("cloud-init");
    let (env_file, rest) = split_cloud_init(user_data.expose());
    let parsed = docker_env(&env_file);
    for (key, value) in odd {
        assert_eq!(parsed.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(parsed.get("SECRET_WITH_SPACE").map(String::as_str), Some("s3 cr3t'\"$x"));
    assert_eq!(parsed.get("WOODPECKER_AGENT_SECRET").map(String::as_str), Some("per-agent-token-Zq9"));
    assert_eq!(parsed.get("CISCALE_AGENT_TOKEN").map(String::as_str), Some("per-agent-token-Zq9"));
    assert_eq!(parsed.get("WOODPECKER_SERVER").map(String::as_str), Some("ci.example.com:9000"));
    for secret in ["per-agent-token-Zq9", "s3 cr3t"] {
        assert!(!rest.contains(secret), "a secret outside the env file: {rest}");
    }
    assert!(rest.contains("--env-file /etc/ciscale/agent.env"), "{rest}");
    assert!(rest.contains("'woodpeckerci/woodpecker-agent:latest'"), "the default image, quoted: {rest}");
    assert!(rest.contains(&format!("DOCKER-USER -d {METADATA_ADDRESS}/32 -j REJECT")), "{rest}");
    assert!(rest.contains("--restart always"), "{rest}");

    // A pre-shared secret set by the user wins over the per-agent token under the native name.
    let preshared = agent(&[], &[("WOODPECKER_AGENT_SECRET", "shared")]);
    let env = agent_env_file(&preshared, &credential(), Some("WOODPECKER_AGENT_SECRET")).expect("env file");
    assert_eq!(docker_env(env.expose()).get("WOODPECKER_AGENT_SECRET").map(String::as_str), Some("shared"));
}

#[test]
fn cloud_init_refuses_line_breaks_and_odd_images_without_showing_values() {
    let spec = agent(&[], &[("MULTI", "line1\nsecret-line2")]);
    let error = agent_env_file(&spec, &credential(), None).expect_err("a line break");
    let text = error.to_string();
    assert!(text.contains("`MULTI`") && text.contains("line break"), "{text}");
    assert!(!text.contains("secret-line2"), "{text}");

    let env = agent_env_file(&agent(&[], &[]), &credential(), None).expect("env file");
    for image in ["agent'; rm -rf / #", "agent:v1\nruncmd", "$(id)", "a b"] {
        let error = cloud_init(Some(image), &env).expect_err("not an image reference");
        assert!(error.to_string().contains("not a valid image reference"), "{error}");
    }
}

// -- the binary ---------------------------------------------------------------------------------------------------

/// A scratch folder with a config: a fake CI (file-backed, simulating, whose agents run on the Hetzner fake) and
/// the Hetzner backend on the fake.
struct Sandbox {
    /// Every plan of this sandbox's `watch` is judged by the safety oracle (dropped before `dir`).
    trace: crate::safety::ledger::PlanTrace,
    dir: tempfile::TempDir,
    fake: HcloudFake,
    _runtime: tokio::runtime::Runtime,
}

impl Sandbox {
    fn new(pools: usize, machine: &str, scale: &str, endpoint_in_config: bool) -> Self {
        let (fake, runtime) = HcloudFake::start_in_background(TOKEN);
        let dir = tempfile::tempdir().expect("temp dir");
        let endpoint = if endpoint_in_config { format!(", endpoint: \"{}\"", fake.endpoint()) } else { String::new() };
        let mut config = format!(
            r#"id: hc
pollInterval: 1s
ci:
  sim: {{ kind: fake, stateFile: world.json, simulate: true }}
backends:
  hetzner: {{ kind: hcloud, token: "${{HCLOUD_TOKEN}}"{endpoint} }}
pools:
"#
        );
        for index in 0..pools {
            let name = if index == 0 { "linux".to_owned() } else { format!("linux{index}") };
            config.push_str(&format!(
                r#"  - name: {name}
    ci: {{ source: sim, labels: {{ platform: {name} }} }}
    backend: {{ name: hetzner, machine: {machine} }}
    agent: {{ image: "woodpeckerci/woodpecker-agent:v3", secretEnv: {{ GIT_TOKEN: "${{AGENT_SECRET}}" }} }}
    scale: {scale}
"#
            ));
        }
        std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
        let sandbox = Self {
            // Without the endpoint in the config, the tests hand it over in `HCLOUD_ENDPOINT`.
            trace: crate::safety::ledger::PlanTrace::new(dir.path(), dir.path().join("ciscale.yaml"))
                .forbid(&[TOKEN, AGENT_SECRET])
                .env_var("HCLOUD_ENDPOINT", fake.endpoint()),
            dir,
            fake,
            _runtime: runtime,
        };
        sandbox.world().set_instances_elsewhere(true);
        sandbox
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
            .env_remove("HCLOUD_ENDPOINT")
            .env("NO_COLOR", "1")
            .env("HCLOUD_TOKEN", TOKEN)
            .env("AGENT_SECRET", AGENT_SECRET)
            .stdin(Stdio::null())
            .args(args)
            .arg("-c")
            .arg(self.path("ciscale.yaml"));
        self.trace.env(&mut command);
        command
    }

    fn push_task(&self, pool: &str, run_for: Duration) {
        self.world().push_task_for(BTreeMap::from([("platform".to_owned(), pool.to_owned())]), run_for);
    }
}

fn checked(output: Output) -> Output {
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!text.contains(TOKEN) && !text.contains(AGENT_SECRET), "a secret leaked:\n{text}");
    output
}

fn stop(mut child: Child) -> Output {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    checked(child.wait_with_output().expect("watch output"))
}

/// Waits (bounded, so a broken build fails instead of hanging) until `done` holds.
fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// API calls an idle `watch` makes per cycle: `cycles` cycles of an idle config cost one listing each, plus the
/// price list once per process.
fn idle_calls(pools: usize) -> (usize, usize) {
    let sandbox = Sandbox::new(pools, "{ serverType: cx22, image: docker-ce }", "{ max: 2 }", false);
    let cycles = 4;
    let output = checked(
        sandbox
            .command(&["watch", "--json", "--cycles", &cycles.to_string()])
            .env("HCLOUD_ENDPOINT", sandbox.fake.endpoint())
            .output()
            .expect("watch runs"),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines = String::from_utf8_lossy(&output.stdout).lines().count();
    assert_eq!(lines, cycles, "one JSON line per cycle");
    let total = sandbox.fake.request_count();
    let listings = sandbox.fake.count("GET", "/servers");
    assert_eq!(sandbox.fake.count("GET", "/server_types"), 1, "prices once per process");
    assert_eq!(total, listings + 1, "nothing else was called: {:?}", sandbox.fake.exchanges());
    (listings, cycles)
}

#[test]
fn an_idle_cycle_costs_one_api_call_for_one_pool_and_for_ten() {
    for pools in [1, 10] {
        let (listings, cycles) = idle_calls(pools);
        eprintln!("{pools} pool(s): {listings} listing calls in {cycles} idle cycles (+1 price list per process)");
        assert_eq!(listings, cycles, "{pools} pools: one listing per cycle, whatever the number of pools");
    }
}

#[test]
fn one_apply_falls_back_to_the_second_server_type() {
    let sandbox =
        Sandbox::new(1, "{ serverType: \"cx22,cx32\", location: fsn1, image: docker-ce }", "{ max: 1 }", true);
    sandbox.fake.set_unavailable("cx22", "fsn1");
    sandbox.push_task("linux", Duration::from_secs(3600));
    let output = checked(sandbox.command(&["apply", "--auto-approve"]).output().expect("apply runs"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let servers = sandbox.fake.servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0].server_type, "cx32");
    assert_eq!(sandbox.fake.count("POST", "/servers"), 2, "cx22 refused, cx32 created, in one apply");
    assert_spec_conform(&sandbox.fake);
}

#[test]
fn watch_runs_a_job_through_a_hetzner_server_life() {
    let sandbox = Sandbox::new(
        1,
        "{ serverType: cx22, location: fsn1, image: docker-ce, sshKeys: deploy }",
        // Hourly billing would keep the idle server for the rest of its paid hour; this test wants it gone.
        "{ max: 2, idleTimeout: 0s, billingAware: false }",
        true,
    );
    let mut child =
        sandbox.command(&["watch", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first cycle").expect("readable");
    assert!(first.contains("\"cycle\":1"), "{first}");
    assert!(sandbox.fake.servers().is_empty(), "nothing to do while the queue is empty");

    let pushed = Instant::now();
    sandbox.push_task("linux", Duration::ZERO);
    eventually("a server is created", Duration::from_secs(60), || sandbox.fake.count("POST", "/servers") > 0);
    let job_to_create = pushed.elapsed();
    eprintln!("job appeared → create call: {} ms (poll interval 1s)", job_to_create.as_millis());

    let server = sandbox.fake.servers().into_iter().next().expect("the server");
    let first = ciscale::plan::instance_name("hc", &ciscale::model::PoolName::new("linux"), 1);
    assert_eq!(server.name, first);
    // The instance names its agent record, so the link survives even if the agent were not named after it.
    assert!(server.labels.contains_key(ciscale::model::AGENT_LABEL), "{:?}", server.labels);
    assert_eq!(server.labels.get(OWNER_LABEL).map(String::as_str), Some("hc"));
    assert_eq!(server.labels.get(POOL_LABEL).map(String::as_str), Some("linux"));
    assert!(server.labels.contains_key("ciscale.agent-hash"), "{:?}", server.labels);
    assert_eq!(
        (server.server_type.as_str(), server.location.as_str(), server.image.as_str()),
        ("cx22", "fsn1", "docker-ce")
    );
    assert_eq!(server.ssh_keys, ["deploy"]);
    let user_data = server.user_data.clone().expect("user data");
    let (env_file, rest) = split_cloud_init(&user_data);
    let env = docker_env(&env_file);
    assert_eq!(env.get("GIT_TOKEN").map(String::as_str), Some(AGENT_SECRET), "the pool's secret env");
    let agent = sandbox.world().snapshot().agents.into_iter().find(|agent| agent.name == first).expect("agent");
    let token = env.get("CISCALE_AGENT_TOKEN").expect("the agent's own token");
    assert_eq!(ciscale::providers::fake::sha256_hex(token.as_bytes()), agent.token_sha256, "its own token");
    assert!(!rest.contains(token.as_str()) && !rest.contains(AGENT_SECRET), "secrets only in the env file");
    assert!(rest.contains("'woodpeckerci/woodpecker-agent:v3'"), "{rest}");

    // The job runs, the queue empties, the idle agent is drained and its server deleted, the record removed.
    eventually("the server is deleted", Duration::from_secs(90), || sandbox.fake.servers().is_empty());
    eventually("the agent record is removed", Duration::from_secs(30), || sandbox.world().snapshot().agents.is_empty());
    let output = stop(child);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let world = sandbox.world().snapshot();
    assert!(world.tasks.is_empty(), "the job ran and finished: {:?}", world.tasks);
    assert_eq!(sandbox.fake.count("POST", "/servers"), 1, "one server for one job");
    assert_eq!(sandbox.fake.count("DELETE", &format!("/servers/{}", server.id)), 1);
    assert_spec_conform(&sandbox.fake);
}

#[test]
fn kill_9_mid_create_then_rerun_leaves_no_duplicate_and_no_orphan() {
    let sandbox = Sandbox::new(1, "{ serverType: cx22, image: docker-ce }", "{ max: 1 }", true);
    sandbox.push_task("linux", Duration::from_secs(3600));
    // The create is done on Hetzner's side but its answer is late: the apply is killed while waiting for it.
    sandbox.fake.inject(Some(Method::POST), "/servers", FaultKind::Delay(Duration::from_secs(20)));
    let mut child = sandbox
        .command(&["apply", "--auto-approve"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("apply");
    eventually("the create call", Duration::from_secs(60), || sandbox.fake.count("POST", "/servers") > 0);
    child.kill().expect("kill -9");
    let _ = child.wait();
    assert_eq!(sandbox.fake.servers().len(), 1);

    for _ in 0..2 {
        let output = checked(sandbox.command(&["apply", "--auto-approve"]).output().expect("apply runs"));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let servers = sandbox.fake.servers();
    assert_eq!(servers.len(), 1, "no duplicate: {servers:?}");
    assert_eq!(sandbox.fake.count("POST", "/servers"), 1, "the rerun did not create again");
    let agents = sandbox.world().snapshot().agents;
    assert_eq!(agents.len(), 1, "no duplicate agent: {agents:?}");
    assert_eq!(agents[0].name, servers[0].name, "no orphan either way");
    let plan = checked(sandbox.command(&["plan", "--detailed-exitcode"]).output().expect("plan runs"));
    assert_eq!(plan.status.code(), Some(0), "converged:\n{}", String::from_utf8_lossy(&plan.stdout));
}

#[test]
fn connect_reads_the_endpoint_from_config_then_env() {
    use ciscale::providers::hcloud::{DEFAULT_ENDPOINT, ENDPOINT_ENV};
    let token = || Secret::new(TOKEN);
    assert_eq!(HcloudSettings::new(token(), None, None).endpoint, DEFAULT_ENDPOINT);
    assert_eq!(HcloudSettings::new(token(), None, Some("http://env/v1")).endpoint, "http://env/v1");
    assert_eq!(HcloudSettings::new(token(), Some("http://cfg/v1"), Some("http://env/v1")).endpoint, "http://cfg/v1");
    assert_eq!(ENDPOINT_ENV, "HCLOUD_ENDPOINT");
    let bad = Hcloud::new(HcloudSettings::new(token(), Some("ftp://x"), None)).expect_err("not http");
    assert!(matches!(bad, Error::Invalid { .. }), "{bad:?}");
}

#[test]
fn watch_converges_with_every_fifth_api_call_failing() {
    let sandbox = Sandbox::new(
        1,
        "{ serverType: cx22, image: docker-ce }",
        "{ max: 2, idleTimeout: 0s, billingAware: false }",
        true,
    );
    // 20 % of Hetzner calls answer 503: cycles fail and retry, steps retry, nothing crashes, nothing is left over.
    sandbox.fake.fail_every(Some(5));
    sandbox.push_task("linux", Duration::ZERO);
    let child = sandbox.command(&["watch"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("watch");
    eventually("a server is created", Duration::from_secs(60), || !sandbox.fake.servers().is_empty());
    eventually("the job ran", Duration::from_secs(60), || sandbox.world().snapshot().tasks.is_empty());
    eventually("the server is deleted", Duration::from_secs(120), || sandbox.fake.servers().is_empty());
    eventually("the agent record is removed", Duration::from_secs(60), || sandbox.world().snapshot().agents.is_empty());
    let output = stop(child);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(sandbox.fake.exchanges().iter().any(|exchange| exchange.status == 503), "faults were injected");
    let creates = sandbox
        .fake
        .exchanges()
        .iter()
        .filter(|e| e.method == "POST" && e.path == "/servers" && e.status == 201)
        .count();
    assert_eq!(creates, 1, "one server for one job, despite the faults");
}
