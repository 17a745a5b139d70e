//! Picus drop-in: a Picus docker-compose environment, unchanged, drives ciscale with Picus's behaviour.

use std::collections::BTreeMap;
use std::process::Command;

use ciscale::import::picus::config_from_env;
use ciscale::model::{AgentRef, InstanceMode};

const WOODPECKER_TOKEN: &str = "wp-admin-token-picus-123";
const AGENT_SECRET: &str = "agent-shared-secret-picus-456";
const HCLOUD_TOKEN: &str = "hcloud-token-picus-789";

/// The environment of Picus's README docker-compose example (hcloud).
fn compose_env() -> BTreeMap<String, String> {
    [
        ("PICUS_WOODPECKER_SERVER", "https://woodpecker.example.com"),
        ("PICUS_WOODPECKER_TOKEN", WOODPECKER_TOKEN),
        ("PICUS_WOODPECKER_AGENT_ID", "1"),
        ("PICUS_AGENT_WOODPECKER_SERVER", "woodpecker.example.com:443"),
        ("PICUS_AGENT_WOODPECKER_AGENT_SECRET", AGENT_SECRET),
        ("PICUS_AGENT_WOODPECKER_FILTER_LABELS", "platform=linux/amd64,backend=docker,repo=*,org-id=*"),
        ("PICUS_AGENT_WOODPECKER_BACKEND", "docker"),
        ("PICUS_AGENT_WOODPECKER_GRPC_SECURE", "true"),
        ("PICUS_PROVIDER_TYPE", "hcloud"),
        ("PICUS_HCLOUD_TOKEN", HCLOUD_TOKEN),
        ("PICUS_HCLOUD_SERVER_TYPE", "cx21"),
        ("PICUS_HCLOUD_LOCATION", "nbg1"),
        ("PICUS_HCLOUD_SSH_KEYS", "me@example.com"),
        ("PICUS_HCLOUD_ID", "my-woodpecker-instance"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[test]
fn picus_hcloud_environment_becomes_an_equivalent_config() {
    let env = compose_env();
    let yaml = config_from_env(&env).expect("complete Picus environment");
    for secret in [WOODPECKER_TOKEN, AGENT_SECRET, HCLOUD_TOKEN] {
        assert!(!yaml.contains(secret), "secret copied into the YAML:\n{yaml}");
    }
    let desired = ciscale::config::load_str("picus.yaml", &yaml, &|name| env.get(name).cloned())
        .unwrap_or_else(|error| panic!("generated config is invalid: {error:?}\n{yaml}"));
    assert_eq!(desired.owner, "my-woodpecker-instance");
    assert_eq!(desired.poll_interval.to_string(), "10s");
    let pool = &desired.pools[0];
    assert_eq!(pool.scale.max, 1);
    assert_eq!(pool.scale.idle_timeout.to_string(), "30m");
    assert_eq!(pool.scale.billing_margin, None, "PICUS_MAX_IDLE_TIME means exactly the idle time");
    assert_eq!(pool.agent.preregistered, Some(AgentRef::Id("1".into())));
    assert_eq!(pool.agent.image.as_deref(), Some("woodpeckerci/woodpecker-agent:latest"));
    assert_eq!(pool.ci.labels.get("platform").map(String::as_str), Some("linux/amd64"));
    assert_eq!(pool.ci.labels.get("org-id").map(String::as_str), Some("*"));
    assert_eq!(pool.agent.env.get("WOODPECKER_SERVER").map(String::as_str), Some("woodpecker.example.com:443"));
    assert_eq!(pool.agent.env.get("WOODPECKER_BACKEND").map(String::as_str), Some("docker"));
    assert_eq!(pool.agent.env.get("WOODPECKER_GRPC_SECURE").map(String::as_str), Some("true"));
    assert_eq!(
        pool.agent.secret_env.get("WOODPECKER_AGENT_SECRET").map(|secret| secret.expose()),
        Some(AGENT_SECRET),
        "forwarded as a secret"
    );
    assert!(!pool.agent.env.contains_key("WOODPECKER_AGENT_SECRET"));
    let machine = &pool.backend.machine;
    assert_eq!(machine.get("serverType").map(String::as_str), Some("cx21"));
    assert_eq!(machine.get("location").map(String::as_str), Some("nbg1"));
    assert_eq!(machine.get("image").map(String::as_str), Some("docker-ce"));
    assert_eq!(machine.get("sshKeys").map(String::as_str), Some("me@example.com"));
}

#[test]
fn picus_defaults_apply_when_optional_variables_are_absent() {
    let mut env = compose_env();
    for optional in
        ["PICUS_HCLOUD_SERVER_TYPE", "PICUS_HCLOUD_LOCATION", "PICUS_HCLOUD_ID", "PICUS_AGENT_WOODPECKER_FILTER_LABELS"]
    {
        env.remove(optional);
    }
    env.insert("PICUS_MAX_IDLE_TIME".to_owned(), "5m".to_owned());
    let yaml = config_from_env(&env).expect("complete");
    let desired = ciscale::config::load_str("picus.yaml", &yaml, &|name| env.get(name).cloned()).expect("valid");
    let pool = &desired.pools[0];
    assert_eq!(desired.owner, "picus-test");
    assert_eq!(pool.backend.machine.get("serverType").map(String::as_str), Some("cx11"));
    assert_eq!(pool.backend.machine.get("location").map(String::as_str), Some("nbg1"));
    assert_eq!(pool.scale.idle_timeout.to_string(), "5m");
    assert_eq!(pool.ci.labels.get("repo").map(String::as_str), Some("*"), "a default agent's labels");
}

#[test]
fn picus_aws_environment_starts_and_stops_the_named_instance() {
    let env: BTreeMap<String, String> = [
        ("PICUS_WOODPECKER_SERVER", "https://woodpecker.example.com"),
        ("PICUS_WOODPECKER_TOKEN", WOODPECKER_TOKEN),
        ("PICUS_WOODPECKER_AGENT_ID", "4"),
        ("PICUS_PROVIDER_TYPE", "aws"),
        ("PICUS_AWS_INSTANCE_ID", "i-1234567890abcdef0"),
        ("AWS_REGION", "eu-central-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let yaml = config_from_env(&env).expect("complete");
    let desired = ciscale::config::load_str("picus.yaml", &yaml, &|name| env.get(name).cloned()).expect("valid");
    let pool = &desired.pools[0];
    let InstanceMode::StartStop { instances } = &pool.backend.mode else {
        panic!("aws Picus mode adopts the instance: {:?}", pool.backend.mode);
    };
    assert_eq!(instances[0].id.as_str(), "i-1234567890abcdef0");
    assert_eq!(instances[0].agent, Some(AgentRef::Id("4".into())));
    assert_eq!(pool.scale.max, 1);
}

/// The drop-in itself: no config file, only Picus's variables; offline, so the plan comes from an observation.
#[test]
fn ciscale_runs_from_the_picus_environment_without_a_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("state.yaml"),
        r#"observed_at: '2026-01-01T12:00:00Z'
backends:
  hcloud: { instances: [] }
ci:
  woodpecker:
    agents:
    - { id: '1', name: picus-agent, no_schedule: true }
    queue:
      pending:
      - id: '42'
        labels: { platform: linux/amd64, backend: docker, repo: acme/app, org-id: '3' }
"#,
    )
    .expect("write observation");
    let output = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .env_clear()
        .env("NO_COLOR", "1")
        .envs(compose_env())
        .args(["plan", "--observed", "state.yaml", "--detailed-exitcode"])
        .output()
        .expect("ciscale runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
    let first = ciscale::plan::instance_name("my-woodpecker-instance", &ciscale::model::PoolName::new("picus"), 1);
    assert!(stdout.contains(&format!("+ create {first}")), "{stdout}");
    for secret in [WOODPECKER_TOKEN, AGENT_SECRET, HCLOUD_TOKEN] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "secret leaked");
    }

    let mut incomplete = compose_env();
    incomplete.remove("PICUS_WOODPECKER_AGENT_ID");
    let output = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .env_clear()
        .envs(incomplete)
        .args(["plan", "--observed", "state.yaml"])
        .output()
        .expect("ciscale runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("`PICUS_WOODPECKER_AGENT_ID` is not set"));
}

#[test]
fn import_picus_prints_a_config_that_validates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .env_clear()
        .envs(compose_env())
        .args(["import", "picus"])
        .output()
        .expect("ciscale runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let yaml = String::from_utf8_lossy(&output.stdout).into_owned();
    for secret in [WOODPECKER_TOKEN, AGENT_SECRET, HCLOUD_TOKEN] {
        assert!(!yaml.contains(secret), "secret in the printed config:\n{yaml}");
    }
    std::fs::write(dir.path().join("ciscale.yaml"), &yaml).expect("write");
    let validated = Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .env_clear()
        .envs(compose_env())
        .args(["validate"])
        .output()
        .expect("ciscale runs");
    assert!(validated.status.success(), "{}\n{yaml}", String::from_utf8_lossy(&validated.stderr));
}

/// Picus mode end to end: Picus's own environment, no config file, `watch` against the Woodpecker and Hetzner
/// fakes. Job appears → a server is created with the forwarded agent env → the hand-registered agent is undrained
/// → the job runs and finishes → after `PICUS_MAX_IDLE_TIME` the agent is drained and the server deleted, while the
/// agent record (registered by hand) stays.
#[test]
fn watch_in_picus_mode_creates_and_deletes_the_server_around_a_job() {
    use crate::fakes::hcloud::HcloudFake;
    use crate::fakes::woodpecker::{FakeWoodpecker, ADMIN_TOKEN};
    use std::time::Duration;

    let woodpecker = FakeWoodpecker::start();
    let agent_id = woodpecker.add_agent("picus-agent");
    let (hetzner, _runtime) = HcloudFake::start_in_background(HCLOUD_TOKEN);
    let dir = tempfile::tempdir().expect("temp dir");

    let mut env = compose_env();
    env.insert("PICUS_WOODPECKER_SERVER".to_owned(), woodpecker.url());
    env.insert("PICUS_WOODPECKER_TOKEN".to_owned(), ADMIN_TOKEN.to_owned());
    env.insert("PICUS_WOODPECKER_AGENT_ID".to_owned(), agent_id.to_string());
    env.insert("PICUS_HCLOUD_SERVER_TYPE".to_owned(), "cx22".to_owned());
    env.insert("PICUS_POLL_INTERVAL".to_owned(), "1s".to_owned());
    env.insert("PICUS_MAX_IDLE_TIME".to_owned(), "2s".to_owned());
    env.insert("HCLOUD_ENDPOINT".to_owned(), hetzner.endpoint().to_owned());
    let _trace = picus_trace(dir.path(), &env);
    let watch = spawn_watch(dir.path(), &env);
    let task = woodpecker.add_task(&[("platform", "linux/amd64"), ("backend", "docker")]);
    wait_until("a server for the job", &|| !hetzner.servers().is_empty());
    let server = hetzner.servers().remove(0);
    let first = ciscale::plan::instance_name("my-woodpecker-instance", &ciscale::model::PoolName::new("picus"), 1);
    assert_eq!(server.name, first);
    assert_eq!(server.server_type, "cx22");
    assert_eq!(server.labels.get("ciscale.owner").map(String::as_str), Some("my-woodpecker-instance"));
    let link = server.labels.get(ciscale::model::AGENT_LABEL).cloned();
    assert_eq!(link, Some(agent_id.to_string()), "the server names the pre-registered agent it runs");
    let user_data = server.user_data.clone().unwrap_or_default();
    assert!(
        user_data.contains("WOODPECKER_AGENT_SECRET=") && user_data.contains(AGENT_SECRET),
        "shared secret forwarded"
    );
    assert!(user_data.contains("WOODPECKER_SERVER=woodpecker.example.com:443"), "agent env forwarded");
    assert!(!user_data.contains(ADMIN_TOKEN), "the admin token never leaves the ciscale host");
    wait_until("the agent undrained", &|| {
        woodpecker.agent_by_name("picus-agent").is_some_and(|agent| !agent.no_schedule)
    });

    woodpecker.start_task(&task, agent_id);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hetzner.servers().len(), 1, "a busy agent's server stays");
    woodpecker.finish_task(&task);
    let now = jiff::Timestamp::now().as_second();
    woodpecker.set_agent_times(agent_id, now, now);

    wait_until("the server deleted after the idle time", &|| hetzner.servers().is_empty());
    let agent = woodpecker.agent_by_name("picus-agent").expect("the hand-registered agent stays");
    assert!(agent.no_schedule, "drained before its server went");
    assert!(woodpecker.spec_violations().is_empty(), "{:?}", woodpecker.spec_violations());

    let stderr = stop(watch);
    for secret in [ADMIN_TOKEN, AGENT_SECRET, HCLOUD_TOKEN] {
        assert!(!stderr.contains(secret), "secret in the logs");
    }
}

/// Picus's AWS mode end to end: the Picus environment unchanged, an existing (stopped) EC2 instance in moto and
/// the Woodpecker fake. Job → the instance is started and its agent undrained → job done → after the idle time the
/// agent is drained and the instance stopped (never terminated); the agent record stays.
#[test]
fn watch_in_picus_aws_mode_starts_and_stops_the_named_instance() {
    use crate::fakes::woodpecker::{FakeWoodpecker, ADMIN_TOKEN};
    use aws_sdk_ec2::types::InstanceStateName;
    use std::time::Duration;

    let Some(moto) = crate::aws::moto() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = crate::aws::sdk_client(&moto);
    let instance = runtime.block_on(crate::aws::launch_plain_instance(&client, "picus-builder"));
    let state = |id: &str| runtime.block_on(crate::aws::moto_state(&client, id));

    let woodpecker = FakeWoodpecker::start();
    let agent_id = woodpecker.add_agent("picus-builder");
    let dir = tempfile::tempdir().expect("temp dir");
    let env: BTreeMap<String, String> = [
        ("PICUS_WOODPECKER_SERVER", woodpecker.url().as_str()),
        ("PICUS_WOODPECKER_TOKEN", ADMIN_TOKEN),
        ("PICUS_WOODPECKER_AGENT_ID", agent_id.to_string().as_str()),
        ("PICUS_AGENT_WOODPECKER_FILTER_LABELS", "platform=linux/amd64,repo=*,org-id=*"),
        ("PICUS_PROVIDER_TYPE", "aws"),
        ("PICUS_AWS_INSTANCE_ID", instance.as_str()),
        ("PICUS_POLL_INTERVAL", "1s"),
        ("PICUS_MAX_IDLE_TIME", "2s"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_ENDPOINT_URL", moto.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let _trace = picus_trace(dir.path(), &env);
    let watch = spawn_watch(dir.path(), &env);

    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state(&instance), InstanceStateName::Stopped, "no job, no start");
    let task = woodpecker.add_task(&[("platform", "linux/amd64")]);
    wait_until("the instance started", &|| state(&instance) == InstanceStateName::Running);
    wait_until("the agent undrained", &|| {
        woodpecker.agent_by_name("picus-builder").is_some_and(|agent| !agent.no_schedule)
    });

    woodpecker.start_task(&task, agent_id);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state(&instance), InstanceStateName::Running, "a busy agent's instance keeps running");
    woodpecker.finish_task(&task);
    let now = jiff::Timestamp::now().as_second();
    woodpecker.set_agent_times(agent_id, now, now);

    wait_until("the instance stopped after the idle time", &|| state(&instance) == InstanceStateName::Stopped);
    let agent = woodpecker.agent_by_name("picus-builder").expect("the agent record stays");
    assert!(agent.no_schedule, "drained before its instance stopped");

    assert!(!stop(watch).contains(ADMIN_TOKEN), "token in the logs");
}

/// `ciscale watch --json` in `dir` with exactly this environment (nothing inherited), logs captured.
fn spawn_watch(dir: &std::path::Path, env: &BTreeMap<String, String>) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .env("CISCALE_LOCK_DIR", dir.join("locks"))
        .env("NO_COLOR", "1")
        .env(crate::safety::ledger::TRACE_ENV, dir.join("plan-trace.jsonl"))
        .args(["watch", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ciscale watch")
}

/// The safety oracle judges every plan the Picus-mode `watch` in `dir` makes, with the config the Picus
/// environment stands for (written beside the trace under another name than `ciscale.yaml`, which would end Picus
/// mode), when the returned guard goes.
fn picus_trace(dir: &std::path::Path, env: &BTreeMap<String, String>) -> crate::safety::ledger::PlanTrace {
    let yaml = ciscale::import::picus::config_from_env(env).expect("a complete Picus environment");
    let config = dir.join("picus-as-config.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let trace = crate::safety::ledger::PlanTrace::new(dir, config)
        .forbid(&[AGENT_SECRET, crate::fakes::woodpecker::ADMIN_TOKEN]);
    env.iter().fold(trace, |trace, (name, value)| trace.env_var(name, value))
}

/// SIGTERM, then the daemon's stderr once it exited cleanly.
fn stop(watch: std::process::Child) -> String {
    drop(Command::new("kill").args(["-TERM", &watch.id().to_string()]).status());
    let output = watch.wait_with_output().expect("watch stops");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// Polls `done` until it holds; bounded, so a broken build fails instead of hanging.
fn wait_until(what: &str, done: &dyn Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
