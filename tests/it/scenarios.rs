//! Snapshot tests of the planner: every folder under `tests/scenarios/` (config + observation + optional
//! `now.txt`) and every example config with its `examples/<name>.observed.yaml` is planned, and the human plan
//! and the JSON plan are compared with the snapshots under `tests/snapshots/`.

use std::path::{Path, PathBuf};

use ciscale::model::Observed;
use ciscale::plan::{self, render};
use jiff::Timestamp;

const DEFAULT_NOW: &str = "2026-01-01T12:00:00Z";

/// Secrets in scenario configs are `${VAR}` references; every variable resolves to this.
fn test_env(_name: &str) -> Option<String> {
    Some("test-secret".to_owned())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

fn plan_files(name: &str, config_path: &Path, observed_path: &Path, now: Timestamp) -> (String, String) {
    let desired = ciscale::config::load_str(&config_path.display().to_string(), &read(config_path), &test_env)
        .unwrap_or_else(|error| panic!("{name}: config does not load: {error:?}"));
    let observed: Observed = serde_yaml::from_str(&read(observed_path))
        .unwrap_or_else(|error| panic!("{name}: observation does not parse: {error}"));
    let plan = plan::plan(&desired, &observed, now);
    let human = render::render_human(&plan, &render::RenderOptions { color: false });
    assert!(!human.contains("test-secret"), "{name}: a secret leaked into the plan");
    assert!(!human.contains('\u{1b}'), "{name}: escape codes without color");
    let json = render::render_json(&plan);
    // The JSON is the plan file format: it must read back to the same plan.
    let reread: plan::Plan = serde_json::from_str(&json).unwrap_or_else(|error| panic!("{name}: {error}"));
    assert_eq!(reread, plan, "{name}: plan JSON does not round-trip");
    (human, json)
}

fn snapshot(name: &str, human: &str, json: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../snapshots");
    settings.set_prepend_module_to_snapshot(false);
    settings.add_filter(r#""ciscale_version": "[^"]+""#, r#""ciscale_version": "[version]""#);
    settings.bind(|| {
        insta::assert_snapshot!(format!("{name}.human"), human);
        insta::assert_snapshot!(format!("{name}.json"), json);
    });
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn scenarios() {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(repo_path("tests/scenarios"))
        .expect("tests/scenarios exists")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir())
        .collect();
    folders.sort();
    assert!(folders.len() >= 32, "expected at least 32 scenarios, found {}", folders.len());
    for folder in folders {
        let name = folder.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        let now_text = std::fs::read_to_string(folder.join("now.txt")).unwrap_or_else(|_| DEFAULT_NOW.to_owned());
        let now: Timestamp = now_text.trim().parse().unwrap_or_else(|error| panic!("{name}: bad now.txt: {error}"));
        let (human, json) = plan_files(&name, &folder.join("ciscale.yaml"), &folder.join("observed.yaml"), now);
        snapshot(&format!("scenario-{name}"), &human, &json);
    }
}

/// Every example config has an observation next to it, and its plan is snapshot-tested (planned at the
/// observation's own time).
#[test]
fn examples() {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo_path("examples"))
        .expect("examples exists")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let file = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            file.ends_with(".yaml") && !file.ends_with(".observed.yaml")
        })
        .collect();
    configs.sort();
    assert!(!configs.is_empty(), "no example configs found");
    for config in configs {
        let stem = config.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_owned();
        let observed_path = config.with_file_name(format!("{stem}.observed.yaml"));
        assert!(observed_path.exists(), "example `{stem}` has no {}", observed_path.display());
        let observed: Observed = serde_yaml::from_str(&read(&observed_path)).expect("example observation parses");
        let (human, json) = plan_files(&stem, &config, &observed_path, observed.observed_at);
        snapshot(&format!("example-{stem}"), &human, &json);
    }
}
