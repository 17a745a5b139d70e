//! The README, followed as a newcomer would: the plan it shows is the real output, the two set-up commands open
//! the development section, every walkthrough config validates without secrets and plans offline against its
//! recorded observation (and is the example file it says it is), and the Woodpecker walkthrough's steps — plan,
//! apply, watch, see it worked, undo — run in the fake world with the same pools.
//!
//! When one of these fails after a deliberate change (a new plan format, new instance names), update the README
//! to what the binary now does: that is the point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ciscale::model::{FakeSpec, InstanceState};
use ciscale::providers::fake::FakeWorld;

use crate::cli::{ciscale, run, stderr, stdout};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The body of the first fenced block after `marker`.
fn block_after(text: &str, marker: &str) -> String {
    let start = text.find(marker).unwrap_or_else(|| panic!("README has no `{marker}`"));
    let rest = &text[start..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("```").expect("closing fence")].to_owned()
}

/// The walkthrough configs, by name (`<!-- walkthrough: NAME -->` above each).
fn walkthroughs() -> BTreeMap<String, String> {
    let text = readme();
    let mut found = BTreeMap::new();
    for (at, _) in text.match_indices("<!-- walkthrough: ") {
        let name = text[at + "<!-- walkthrough: ".len()..].split(" -->").next().expect("marker end").to_owned();
        found.insert(name, block_after(&text[at..], "-->"));
    }
    found
}

/// Secrets the examples name, removed: the offline steps must work without them.
fn without_secrets(mut command: std::process::Command) -> std::process::Command {
    for name in ["WOODPECKER_TOKEN", "HCLOUD_TOKEN", "GIT_TOKEN", "AZP_TOKEN", "FORGEJO_TOKEN"] {
        command.env_remove(name);
    }
    command
}

#[test]
fn the_plan_at_the_top_is_the_real_output() {
    let text = readme();
    let shown = block_after(&text, "This is a plan");
    let output = run(ciscale().current_dir(repo()).args([
        "plan",
        "-c",
        "examples/fake.yaml",
        "--observed",
        "examples/fake.observed.yaml",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(shown, stdout(&output), "the README's plan is not what the command prints: update the README");
}

#[test]
fn the_development_section_opens_with_the_two_set_up_commands() {
    let text = readme();
    let section = &text[text.find("\n## Development\n").expect("a development section")..];
    let first = block_after(section, "## Development");
    let commands: Vec<&str> = first.lines().filter(|line| !line.trim().is_empty() && !line.starts_with('#')).collect();
    assert_eq!(
        commands,
        ["cargo run -q -- plan -c examples/fake.yaml --observed examples/fake.observed.yaml", "scripts/test"],
        "{first}"
    );
}

#[test]
fn every_walkthrough_validates_without_secrets_and_plans_offline() {
    let found = walkthroughs();
    assert_eq!(
        found.keys().map(String::as_str).collect::<Vec<_>>(),
        ["aws-startstop", "azure-incus", "woodpecker-hetzner"],
        "one walkthrough per example"
    );
    let text = readme();
    for (name, config) in &found {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write");
        let observed = repo().join(format!("examples/{name}.observed.yaml"));
        std::fs::copy(&observed, dir.path().join(format!("{name}.observed.yaml"))).expect("copy observation");

        // Step: `ciscale validate -c ciscale.yaml` — no secrets set, only warnings.
        assert!(text.contains("ciscale validate -c ciscale.yaml"), "the README says to validate");
        let mut validate = without_secrets(ciscale());
        validate.current_dir(dir.path()).args(["validate", "-c", "ciscale.yaml"]);
        let validated = run(validate);
        assert_eq!(validated.status.code(), Some(0), "{name}: {}", stderr(&validated));
        assert!(stderr(&validated).contains("warning: environment variable"), "{name}: {}", stderr(&validated));

        // Step: `ciscale plan -c ciscale.yaml --observed examples/NAME.observed.yaml`.
        let step = format!("ciscale plan -c ciscale.yaml --observed examples/{name}.observed.yaml");
        assert!(text.contains(&step), "the README's {name} walkthrough plans offline with `{step}`");
        let mut plan = without_secrets(ciscale());
        plan.current_dir(dir.path()).args([
            "plan",
            "-c",
            "ciscale.yaml",
            "--observed",
            &format!("{name}.observed.yaml"),
        ]);
        let planned = run(plan);
        assert_eq!(planned.status.code(), Some(0), "{name}: {}", stderr(&planned));
        assert!(stdout(&planned).contains("Plan: ") || stdout(&planned).contains("No changes."), "{name}");
    }
}

#[test]
fn walkthroughs_that_name_an_example_are_that_example() {
    // Same meaning (the config hash ignores comments, layout and flow style), so the example's snapshot-tested
    // plan is the walkthrough's plan.
    let env = |name: &str| Some(format!("value-of-{name}"));
    for (name, config) in walkthroughs().into_iter().filter(|(name, _)| name != "woodpecker-hetzner") {
        let example = std::fs::read_to_string(repo().join(format!("examples/{name}.yaml"))).expect("example");
        let from_readme = ciscale::config::load_str("README.md", &config, &env).expect("README config");
        let from_example = ciscale::config::load_str("example.yaml", &example, &env).expect("example config");
        assert_eq!(
            from_readme.config_hash, from_example.config_hash,
            "README's {name} walkthrough drifted from examples/{name}.yaml"
        );
    }
}

/// The Woodpecker walkthrough's config with its CI and backend swapped for one file-backed fake world (same
/// names, same pools), as `ciscale.yaml` in `dir`.
fn fake_world_config(dir: &Path) -> PathBuf {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&walkthroughs()["woodpecker-hetzner"]).expect("the walkthrough config is YAML");
    let fake = |simulate: bool| -> serde_yaml::Value {
        serde_yaml::from_str(&format!("{{ kind: fake, stateFile: world.json, simulate: {simulate} }}")).expect("yaml")
    };
    config["ci"]["woodpecker"] = fake(true);
    config["backends"]["hetzner"] = fake(false);
    config["pollInterval"] = serde_yaml::Value::String("1s".to_owned());
    let path = dir.join("ciscale.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    path
}

#[test]
fn the_woodpecker_walkthrough_runs_in_the_fake_world() {
    let text = readme();
    let dir = tempfile::tempdir().expect("dir");
    let config = fake_world_config(dir.path());
    let world = || {
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("world")
    };
    // A step as the README writes it, plus what a test needs on top (`--json --cycles N` instead of Ctrl-C).
    let step_with = |args: &[&str], extra: &[&str]| {
        let shown = format!("ciscale {}", args.join(" "));
        assert!(text.contains(&shown), "the walkthrough does not say `{shown}`");
        let mut command = ciscale();
        command.current_dir(dir.path()).env("CISCALE_LOCK_DIR", dir.path().join("locks")).args(args).args(extra);
        run(command)
    };
    let step = |args: &[&str]| step_with(args, &[]);
    assert!(config.exists());

    // 3. plan, then apply: `minIdle: 1` makes one warm agent before any job waits.
    let planned = step(&["plan", "-c", "ciscale.yaml"]);
    assert!(stdout(&planned).contains("Plan: 1 to create"), "{}", stdout(&planned));
    let applied = step(&["apply", "-c", "ciscale.yaml", "--auto-approve"]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(
        stderr(&applied).contains("create complete after") && stderr(&applied).contains("[id="),
        "{}",
        stderr(&applied)
    );

    // 4. keep it running: a job arrives and the warm agent takes it; another agent is made warm.
    let labels =
        BTreeMap::from([("platform".to_owned(), "linux/amd64".to_owned()), ("repo".to_owned(), "acme/app".to_owned())]);
    world().push_task_for(labels, Duration::from_secs(3600));
    let watched = step_with(&["watch", "-c", "ciscale.yaml"], &["--json", "--cycles", "3"]);
    assert!(watched.status.success(), "{}", stderr(&watched));

    // 5. see that it works: the job runs on an agent, the servers carry the owner label, the plan is settled.
    let snapshot = world().snapshot();
    assert!(snapshot.tasks.iter().any(|task| task.agent_id.is_some()), "the job was taken: {:?}", snapshot.tasks);
    let active: Vec<_> = snapshot.instances.iter().filter(|instance| instance.state.is_active()).collect();
    assert_eq!(active.len(), 2, "one busy agent and one warm one: {active:?}");
    assert!(active.iter().all(|instance| instance.labels.get("ciscale.owner").map(String::as_str) == Some("acme")));
    let settled = step(&["plan", "-c", "ciscale.yaml"]);
    assert!(stdout(&settled).contains("agents 2 active (1 busy, 1 idle), 2 desired"), "{}", stdout(&settled));

    // 6. undo: `pools: []`, apply twice: drained, then deleted — the busy agent only once its job is done.
    world().update(|state| state.tasks.clear());
    let emptied = std::fs::read_to_string(&config).expect("config");
    let emptied = format!("{}pools: []\n", &emptied[..emptied.find("pools:").expect("pools")]);
    std::fs::write(&config, emptied).expect("write");
    for _ in 0..2 {
        let undone = step(&["apply", "-c", "ciscale.yaml", "--auto-approve"]);
        assert!(undone.status.success(), "{}", stderr(&undone));
    }
    let snapshot = world().snapshot();
    assert!(
        snapshot.instances.iter().all(|instance| instance.state == InstanceState::Terminated),
        "{:?}",
        snapshot.instances
    );
    assert!(snapshot.agents.is_empty(), "agent records removed: {:?}", snapshot.agents);
}
