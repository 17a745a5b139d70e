//! Config loading: valid configs map to the exact `Desired`, the examples validate, malformed configs give
//! located messages (snapshots of the plain rendering), secrets never leak, and the committed schema is fresh.

use std::path::{Path, PathBuf};

use ciscale::config::{self, ConfigError};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Fake values for every variable the examples reference.
fn example_env(name: &str) -> Option<String> {
    Some(format!("test-{}", name.to_lowercase()))
}

#[test]
fn every_example_validates() {
    let mut count = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(repo_path("examples"))
        .expect("examples folder")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        // `<name>.observed.yaml` beside each example is its recorded observation, not a config.
        .filter(|path| !path.to_string_lossy().ends_with(".observed.yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("read example");
        let name = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        match config::load_str(&name, &text, &example_env) {
            Ok(desired) => assert!(!desired.pools.is_empty(), "{name} has no pools"),
            Err(ConfigError::Invalid(diagnostics)) => {
                panic!("{name} is invalid:\n{}", diagnostics.render_plain())
            }
            Err(other) => panic!("{name}: {other}"),
        }
        count += 1;
    }
    assert!(count >= 4, "expected at least 4 examples, found {count}");
}

/// The environment the fixtures run with: some variables set, `EMPTY_TOKEN` set but empty, `HCLOUD_TOKEN` and
/// `API_HOST` deliberately not.
fn fixture_env(name: &str) -> Option<String> {
    match name {
        "WOODPECKER_TOKEN" | "AZP_TOKEN" | "GIT_TOKEN" | "FORGEJO_TOKEN" => Some(format!("secret-value-of-{name}")),
        "EMPTY_TOKEN" => Some(String::new()),
        _ => None,
    }
}

#[test]
fn malformed_configs_give_located_messages() {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::glob!("../fixtures/config", "*.yaml", |path| {
            let text = std::fs::read_to_string(path).expect("read fixture");
            let name = format!("{}", path.file_name().unwrap().to_string_lossy());
            let error = config::load_str(&name, &text, &fixture_env).expect_err("fixture must be invalid");
            let diagnostics = error.diagnostics().expect("located problems, not an I/O error");
            let plain = diagnostics.render_plain();
            // Every problem is located: `file:line:col: error: ...`.
            for problem in diagnostics.problems() {
                assert!(problem.location.is_some(), "{name}: unlocated problem `{}`", problem.message);
            }
            assert!(!plain.contains("secret-value-of"), "{name}: a secret leaked:\n{plain}");
            insta::assert_snapshot!(plain);
        });
    });
}

#[test]
fn all_problems_of_a_file_are_reported_at_once() {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/config/many-problems.yaml")).unwrap();
    let error = config::load_str("many-problems.yaml", &text, &fixture_env).unwrap_err();
    let problems = error.diagnostics().unwrap().problems();
    assert!(problems.len() >= 4, "only {} problems reported", problems.len());
    // In source order, on distinct lines.
    let lines: Vec<usize> = problems.iter().map(|problem| problem.location.as_ref().unwrap().line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

const FULL: &str = r#"
id: acme                      # owner id
pollInterval: 20s
ci:
  woodpecker:
    kind: woodpecker
    server: https://ci.example.com
    token: ${WOODPECKER_TOKEN}
  azure:
    kind: azure-pipelines
    organizationUrl: https://dev.azure.com/acme
    pat: ${AZP_TOKEN}
  sim:
    kind: fake
    stateFile: world.json
    simulate: true
backends:
  hetzner:
    kind: hcloud
    token: ${HCLOUD_TOKEN}
    endpoint: http://127.0.0.1:4000
    createRate: 10/m
    createBurst: 3
    changeTimeout: 10m
  ec2: { kind: aws, region: eu-central-1, endpoint: http://127.0.0.1:5000, createRate: 1/30s }
  lxd: { kind: incus, socket: /var/lib/incus/unix.socket, project: ci }
  sim: { kind: fake, stateFile: /tmp/world.json }
pools:
  - name: linux-amd64
    ci:
      source: woodpecker
      labels: { platform: linux/amd64, "!gpu": "yes", repo: "*" }
    backend:
      name: hetzner
      machine: { serverType: "cx22,cx32", image: docker-ce, location: "fsn1,nbg1", disk: 40 }
    agent:
      image: woodpeckerci/woodpecker-agent:v3
      env: { WOODPECKER_MAX_WORKFLOWS: "1" }
      secretEnv: { GIT_TOKEN: "${GIT_TOKEN}" }
    scale:
      min: 0
      max: 5
      minIdle: 1
      jobsPerAgent: 2
      idleTimeout: 30m
      ephemeral: false
      bootstrapTimeout: 10m
      billingMargin: 7m
      breakerThreshold: 3
      breakerCooldown: 2m
  - name: azure
    ci:
      source: azure
      azurePool: Default
      capabilities: { docker: "", node: "20" }
    backend:
      name: lxd
    scale: { max: 3, ephemeral: true }
  - name: picus
    ci: { source: woodpecker }
    backend:
      name: ec2
      startStop:
        instances:
          - id: i-0abc
            agentId: "7"
          - id: i-0def
            agentName: picus-agent
          - id: i-0123
  - name: cheap
    ci: { source: woodpecker }
    backend: { name: hetzner }
    scale: { billingAware: false }
images:
  azure-agent: { backend: lxd, base: "images:debian/12", scripts: [provision/docker.sh, /abs/x.sh], keep: 2 }
"#;

fn full_env(name: &str) -> Option<String> {
    Some(format!("secret-value-of-{name}"))
}

#[test]
fn a_full_config_maps_to_the_expected_desired() {
    use std::collections::BTreeMap;

    use ciscale::model::*;

    let desired = config::load_str("conf/ciscale.yaml", FULL, &full_env).unwrap_or_else(|error| match error {
        ConfigError::Invalid(diagnostics) => panic!("{}", diagnostics.render_plain()),
        other => panic!("{other}"),
    });
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
    };
    let secret = |name: &str| Secret::new(format!("secret-value-of-{name}"));
    let minutes = |count: u64| GoDuration::from_secs(count * 60);

    assert_eq!(desired.owner, "acme");
    assert_eq!(desired.poll_interval, GoDuration::from_secs(20));
    assert!(desired.config_hash.starts_with("sha256:"));

    let expected_ci = BTreeMap::from([
        (
            CiName::new("azure"),
            CiSourceSpec {
                kind: CiKind::AzurePipelines {
                    organization_url: "https://dev.azure.com/acme".into(),
                    pat: secret("AZP_TOKEN"),
                    agent_pat: None,
                },
            },
        ),
        (
            CiName::new("sim"),
            CiSourceSpec {
                // Relative to the config file's folder.
                kind: CiKind::Fake(FakeSpec {
                    state_file: Some(PathBuf::from("conf/world.json")),
                    simulate: true,
                    jobs: None,
                }),
            },
        ),
        (
            CiName::new("woodpecker"),
            CiSourceSpec {
                kind: CiKind::Woodpecker {
                    server: "https://ci.example.com".into(),
                    token: secret("WOODPECKER_TOKEN"),
                    grpc_address: None,
                },
            },
        ),
    ]);
    assert_eq!(desired.ci, expected_ci);

    let expected_backends = BTreeMap::from([
        (
            BackendName::new("ec2"),
            BackendSpec {
                kind: BackendKind::Aws {
                    region: Some("eu-central-1".into()),
                    endpoint: Some("http://127.0.0.1:5000".into()),
                },
                billing: Billing::PerSecond,
                // The burst defaults to the rate's count.
                create_limit: Some(CreateLimit {
                    rate: CreateRate { count: 1, per: std::time::Duration::from_secs(30) },
                    burst: 1,
                }),
                change_timeout: None,
            },
        ),
        (
            BackendName::new("hetzner"),
            BackendSpec {
                kind: BackendKind::Hcloud {
                    token: secret("HCLOUD_TOKEN"),
                    endpoint: Some("http://127.0.0.1:4000".into()),
                },
                billing: Billing::Hourly,
                create_limit: Some(CreateLimit {
                    rate: CreateRate { count: 10, per: std::time::Duration::from_secs(60) },
                    burst: 3,
                }),
                change_timeout: Some(minutes(10)),
            },
        ),
        (
            BackendName::new("lxd"),
            BackendSpec {
                kind: BackendKind::Incus {
                    socket: Some("/var/lib/incus/unix.socket".into()),
                    project: Some("ci".into()),
                },
                billing: Billing::PerSecond,
                create_limit: None,
                change_timeout: None,
            },
        ),
        (
            BackendName::new("sim"),
            BackendSpec {
                kind: BackendKind::Fake(FakeSpec {
                    state_file: Some(PathBuf::from("/tmp/world.json")),
                    simulate: false,
                    jobs: None,
                }),
                billing: Billing::PerSecond,
                create_limit: None,
                change_timeout: None,
            },
        ),
    ]);
    assert_eq!(desired.backends, expected_backends);

    let expected_pools = vec![
        PoolSpec {
            name: PoolName::new("linux-amd64"),
            ci: CiBinding {
                source: CiName::new("woodpecker"),
                labels: map(&[("platform", "linux/amd64"), ("!gpu", "yes"), ("repo", "*")]),
                capabilities: BTreeMap::new(),
            },
            backend: BackendBinding {
                backend: BackendName::new("hetzner"),
                mode: InstanceMode::Create,
                // A YAML number in a string map is kept as its text.
                machine: map(&[
                    ("serverType", "cx22,cx32"),
                    ("image", "docker-ce"),
                    ("location", "fsn1,nbg1"),
                    ("disk", "40"),
                ]),
            },
            agent: AgentSpec {
                image: Some("woodpeckerci/woodpecker-agent:v3".into()),
                env: map(&[("WOODPECKER_MAX_WORKFLOWS", "1")]),
                secret_env: BTreeMap::from([("GIT_TOKEN".to_owned(), secret("GIT_TOKEN"))]),
                preregistered: None,
            },
            scale: ScalePolicy {
                min: 0,
                max: 5,
                min_idle: 1,
                jobs_per_agent: 2,
                idle_timeout: minutes(30),
                ephemeral: false,
                bootstrap_timeout: minutes(10),
                billing_margin: Some(minutes(7)),
                schedule: Vec::new(),
                breaker_threshold: 3,
                breaker_cooldown: minutes(2),
            },
        },
        PoolSpec {
            name: PoolName::new("azure"),
            ci: CiBinding {
                source: CiName::new("azure"),
                labels: map(&[("azure-pool", "Default")]),
                capabilities: map(&[("docker", ""), ("node", "20")]),
            },
            backend: BackendBinding {
                backend: BackendName::new("lxd"),
                mode: InstanceMode::Create,
                machine: BTreeMap::new(),
            },
            agent: AgentSpec { image: None, env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            // Per-second billing: no billing margin.
            scale: ScalePolicy { max: 3, ephemeral: true, billing_margin: None, ..ScalePolicy::default() },
        },
        PoolSpec {
            name: PoolName::new("picus"),
            ci: CiBinding { source: CiName::new("woodpecker"), labels: BTreeMap::new(), capabilities: BTreeMap::new() },
            backend: BackendBinding {
                backend: BackendName::new("ec2"),
                mode: InstanceMode::StartStop {
                    instances: vec![
                        AdoptedInstance { id: InstanceId::new("i-0abc"), agent: Some(AgentRef::Id(AgentId::new("7"))) },
                        AdoptedInstance {
                            id: InstanceId::new("i-0def"),
                            agent: Some(AgentRef::Name("picus-agent".into())),
                        },
                        AdoptedInstance { id: InstanceId::new("i-0123"), agent: None },
                    ],
                },
                machine: BTreeMap::new(),
            },
            agent: AgentSpec { image: None, env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            // `max` defaults to the number of adopted instances.
            scale: ScalePolicy { max: 3, billing_margin: None, ..ScalePolicy::default() },
        },
        PoolSpec {
            name: PoolName::new("cheap"),
            ci: CiBinding { source: CiName::new("woodpecker"), labels: BTreeMap::new(), capabilities: BTreeMap::new() },
            backend: BackendBinding {
                backend: BackendName::new("hetzner"),
                mode: InstanceMode::Create,
                machine: BTreeMap::new(),
            },
            agent: AgentSpec { image: None, env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            // Hourly backend, but billing-aware teardown switched off.
            scale: ScalePolicy { billing_margin: None, ..ScalePolicy::default() },
        },
    ];
    assert_eq!(desired.pools, expected_pools);

    let expected_images = BTreeMap::from([(
        "azure-agent".to_owned(),
        ImageSpec {
            backend: BackendName::new("lxd"),
            base: "images:debian/12".into(),
            scripts: vec![PathBuf::from("conf/provision/docker.sh"), PathBuf::from("/abs/x.sh")],
            keep: 2,
            agent_url: None,
        },
    )]);
    assert_eq!(desired.images, expected_images);
}

#[test]
fn defaults_fill_an_almost_empty_pool() {
    use ciscale::model::{GoDuration, ScalePolicy};

    let text = "id: x\nci: { w: { kind: woodpecker, server: s, token: t } }\nbackends: { h: { kind: hcloud, token: t } }\npools: [{ name: p, ci: { source: w }, backend: { name: h } }]\n";
    let desired = config::load_str("ciscale.yaml", text, &|_| None).unwrap();
    assert_eq!(desired.poll_interval, GoDuration::from_secs(10));
    assert_eq!(desired.pools[0].scale, ScalePolicy::default());
    assert!(desired.images.is_empty());
}

/// A config with secrets in every position where an error could quote them.
const SECRETS_IN_ERRORS: &str = r#"id: acme
ci:
  woodpecker: { kind: woodpecker, server: https://ci.example.com, token: [literal-token-hunter2] }
  azure: { kind: azure-pipelines, organizationUrl: https://dev.azure.com/acme, pat: "${AZP_TOKEN}" }
backends:
  hetzner: { kind: hcloud, token: inline-hcloud-hunter3, biling: hourly }
pools:
  - name: linux
    ci: { source: azure, azurePool: Default }
    backend: { name: hetzner }
    agent:
      secretEnv:
        GIT_TOKEN: { nested: literal-git-hunter4 }
        OK_TOKEN: ${GIT_TOKEN}
    scale: { max: 0 }
"#;

#[test]
fn secret_values_never_appear_in_errors() {
    let env = |name: &str| Some(format!("env-secret-of-{name}"));
    let error = config::load_str("ciscale.yaml", SECRETS_IN_ERRORS, &env).unwrap_err();
    let diagnostics = error.diagnostics().unwrap();
    // The errors are there: the type errors on the secret fields, the typo next to an inline secret, `max`.
    let plain = diagnostics.render_plain();
    assert!(plain.contains("ciscale.yaml:3:"), "{plain}");
    assert!(plain.contains("expected a string for `token` in ci source `woodpecker`, found a list"), "{plain}");
    assert!(plain.contains("expected a string for `GIT_TOKEN`"), "{plain}");
    assert!(plain.contains("unknown key `biling`"), "{plain}");

    let mut graphical = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut graphical, diagnostics)
        .unwrap();
    // The graphical rendering shows source lines: the erroneous lines are there, their secret values are not.
    assert!(graphical.contains("biling"), "{graphical}");
    assert!(graphical.contains("token: ***"), "{graphical}");
    let debug = format!("{error:?}");
    for rendering in [&plain, &graphical, &debug, &error.to_string()] {
        for secret in ["hunter2", "hunter3", "hunter4", "env-secret-of"] {
            assert!(!rendering.contains(secret), "`{secret}` leaked into:\n{rendering}");
        }
    }
}

#[test]
fn secrets_are_redacted_in_debug_output_of_desired() {
    let desired = config::load_str("ciscale.yaml", FULL, &full_env).unwrap();
    let debug = format!("{desired:?}");
    assert!(!debug.contains("secret-value-of"), "{debug}");
    assert!(debug.contains("Secret(***)"));
}

#[test]
fn graphical_rendering_points_into_the_source() {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/config/unknown-key.yaml")).unwrap();
    let error = config::load_str("unknown-key.yaml", &text, &fixture_env).unwrap_err();
    let report = miette::Report::new(error);
    let mut graphical = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut graphical, report.as_ref())
        .unwrap();
    assert!(graphical.contains("invalid config `unknown-key.yaml`: 3 problems"), "{graphical}");
    assert!(graphical.contains("[unknown-key.yaml:13:7]"), "{graphical}");
    assert!(graphical.contains("maxx: 3"), "{graphical}");
    assert!(graphical.contains("did you mean `max`?"), "{graphical}");
}

#[test]
fn load_file_reads_the_environment_and_reports_io_errors() {
    let missing = repo_path("tests/fixtures/config/does-not-exist.yaml");
    let error = config::load_file(&missing).unwrap_err();
    assert!(matches!(error, ConfigError::Io { .. }));
    assert!(error.to_string().contains("does-not-exist.yaml"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ciscale.yaml");
    std::fs::write(
        &path,
        "id: x\nci: { s: { kind: fake, stateFile: w.json } }\nbackends: { b: { kind: fake } }\npools: []\n",
    )
    .unwrap();
    let desired = config::load_file(&path).unwrap();
    match &desired.ci[&ciscale::model::CiName::new("s")].kind {
        ciscale::model::CiKind::Fake(fake) => {
            assert_eq!(fake.state_file.as_deref(), Some(dir.path().join("w.json").as_path()))
        }
        other => panic!("unexpected kind {other:?}"),
    }
}

#[test]
fn committed_schema_is_up_to_date() {
    let path = repo_path("schemas/ciscale.schema.json");
    let generated = config::schema_json();
    if std::env::var_os("CISCALE_UPDATE_SCHEMA").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "schemas/ciscale.schema.json is stale; regenerate it with \
         `CISCALE_UPDATE_SCHEMA=1 cargo test --test it config::committed_schema_is_up_to_date` and commit it"
    );
    // It is a real schema of the config, with the secret markers editors and the checker rely on.
    let schema: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    assert!(generated.contains("\"writeOnly\": true"));
}

#[test]
fn odd_yaml_is_an_error_never_a_panic() {
    let inputs = [
        "",
        "just a string",
        "- a\n- b\n",
        "id: a\n---\nid: b\n",
        "base: &anchor { a: 1 }\nother: *anchor\n",
        "labels: { !gpu: yes }\n",
        "? [a, b]\n: c\n",
        "id: \"unterminated\n",
        "\tid: tab\n",
        "id: acme\nci: ~\nbackends: []\npools: {}\n",
        "id: ${\n",
    ];
    for input in inputs {
        let error = config::load_str("odd.yaml", input, &|_| None).expect_err(input);
        let diagnostics = error.diagnostics().expect("located problems");
        assert!(!diagnostics.problems().is_empty(), "{input:?}");
        assert!(diagnostics.render_plain().starts_with("odd.yaml:"), "{input:?}");
    }
}

#[test]
fn a_preregistered_agent_is_read_by_id_or_name() {
    let text = r#"
id: picus
ci:
  woodpecker: { kind: woodpecker, server: https://ci.example.com, token: "${WOODPECKER_TOKEN}" }
backends:
  hetzner: { kind: hcloud, token: "${HCLOUD_TOKEN}" }
pools:
  - name: by-id
    ci: { source: woodpecker }
    backend: { name: hetzner }
    agent: { preregistered: { id: "7" } }
  - name: by-name
    ci: { source: woodpecker }
    backend: { name: hetzner }
    agent: { preregistered: { name: picus-agent } }
"#;
    let desired = config::load_str("picus.yaml", text, &|_| Some("x".to_owned())).expect("valid");
    assert_eq!(desired.pools[0].agent.preregistered, Some(ciscale::model::AgentRef::Id("7".into())));
    assert_eq!(desired.pools[1].agent.preregistered, Some(ciscale::model::AgentRef::Name("picus-agent".into())));
    assert_eq!(desired.pools[0].scale.max, 1);
}
