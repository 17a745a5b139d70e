//! The `ciscale` binary as users run it: exit codes, stdout/stderr split, prompts, plan files, the watch loop
//! and its shutdown, all against the file-backed fake world so separate processes share one state.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ciscale::model::{FakeSpec, InstanceState};
use ciscale::providers::fake::FakeWorld;

/// A secret only the config's environment knows; it must never show up in any output.
pub(crate) const SECRET: &str = "s3cr3t-e2e-value-4242";

pub(crate) fn ciscale() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ciscale"));
    command.env_remove("CISCALE_LOG").env_remove("CISCALE_CONFIG").env("NO_COLOR", "1").env("E2E_SECRET", SECRET);
    command.stdin(Stdio::null());
    command
}

pub(crate) fn run(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    let output = command.borrow_mut().output().expect("the ciscale binary runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "secret leaked:\n{stdout}\n{stderr}");
    output
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A scratch folder with a config whose fake CI and fake backend share `world.json`.
pub(crate) struct Sandbox {
    /// Every plan a `watch` of this sandbox made is judged by the safety oracle when the sandbox goes (declared
    /// before `dir`: dropped while the trace still exists).
    trace: crate::safety::ledger::PlanTrace,
    pub(crate) dir: tempfile::TempDir,
}

impl Sandbox {
    pub(crate) fn new(scale: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // The fake CI's per-agent tokens all start `fake-token-`.
        let trace = crate::safety::ledger::PlanTrace::new(dir.path(), dir.path().join("ciscale.yaml"))
            .forbid(&[SECRET, "fake-token-"]);
        let sandbox = Self { trace, dir };
        sandbox.write_config(scale);
        sandbox
    }

    /// (Re)writes `ciscale.yaml` with this `scale:` for the pool.
    pub(crate) fn write_config(&self, scale: &str) {
        let config = format!(
            r#"id: e2e
pollInterval: 1s
ci:
  sim: {{ kind: fake, stateFile: world.json, simulate: true }}
backends:
  sim: {{ kind: fake, stateFile: world.json }}
pools:
  - name: linux
    ci: {{ source: sim, labels: {{ platform: linux }} }}
    backend: {{ name: sim, machine: {{ serverType: small }} }}
    agent: {{ image: "agent:1", secretEnv: {{ TOKEN: "${{E2E_SECRET}}" }} }}
    scale: {scale}
"#
        );
        std::fs::write(self.path("ciscale.yaml"), config).expect("write config");
        self.trace.remember();
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.path("ciscale.yaml")
    }

    pub(crate) fn world(&self) -> FakeWorld {
        FakeWorld::open(&FakeSpec { state_file: Some(self.path("world.json")), simulate: false, jobs: None })
            .expect("open world")
    }

    pub(crate) fn push_linux_task(&self) {
        // Jobs that finish as soon as an agent takes them keep the whole life cycle within a few poll intervals.
        self.world().push_task_for(BTreeMap::from([("platform".to_owned(), "linux".to_owned())]), Duration::ZERO);
    }

    pub(crate) fn active_instances(&self) -> usize {
        self.world().snapshot().instances.iter().filter(|instance| instance.state.is_active()).count()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = ciscale();
        // Each sandbox locks on its own: tests run concurrently with the same owner id.
        command.current_dir(self.dir.path()).env("CISCALE_LOCK_DIR", self.path("locks"));
        self.trace.env(&mut command);
        command.args(args).arg("-c").arg(self.config());
        command
    }
}

#[test]
fn version_and_schema_print_to_stdout() {
    let version = run(ciscale().arg("version"));
    assert!(version.status.success());
    assert_eq!(stdout(&version).trim(), format!("ciscale {}", env!("CARGO_PKG_VERSION")));

    let schema = run(ciscale().arg("schema"));
    assert!(schema.status.success());
    let parsed: serde_json::Value = serde_json::from_str(&stdout(&schema)).expect("schema is JSON");
    assert!(parsed.get("properties").and_then(|p| p.get("pools")).is_some(), "schema describes `pools`");
}

#[test]
fn offline_plan_of_the_readme_example_is_deterministic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plan = || {
        run(ciscale()
            .current_dir(root)
            .env("WOODPECKER_TOKEN", "x")
            .env("HCLOUD_TOKEN", "y")
            .env("GIT_TOKEN", "z")
            .args([
                "plan",
                "-c",
                "examples/woodpecker-hetzner.yaml",
                "--observed",
                "examples/woodpecker-hetzner.observed.yaml",
            ]))
    };
    let (first, second) = (plan(), plan());
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(stdout(&first), stdout(&second));
    let text = stdout(&first);
    assert!(text.contains("Plan: ") || text.contains("No changes."), "{text}");
    assert!(text.contains("Cost: "), "{text}");
}

#[test]
fn detailed_exitcode_tells_changes_from_none() {
    let sandbox = Sandbox::new("{ max: 2, idleTimeout: 0s }");
    let quiet = run(sandbox.command(&["plan", "--detailed-exitcode"]));
    assert_eq!(quiet.status.code(), Some(0), "{}", stderr(&quiet));
    assert!(stdout(&quiet).contains("No changes."));

    sandbox.push_linux_task();
    let busy = run(sandbox.command(&["plan", "--detailed-exitcode"]));
    assert_eq!(busy.status.code(), Some(2), "{}", stderr(&busy));
    assert!(stdout(&busy).contains("Plan: 1 to create, 0 to start, 0 to stop, 0 to delete."), "{}", stdout(&busy));

    let json = run(sandbox.command(&["plan", "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("plan JSON");
    assert_eq!(plan["format_version"], 1);
    assert_eq!(plan["summary"]["create"], 1);
}

#[test]
fn invalid_config_exits_1_with_a_located_error() {
    let sandbox = Sandbox::new("{ max: 2, idleTimout: 0s }");
    let output = run(sandbox.command(&["validate"]));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("ciscale.yaml:12:"), "{text}");
    assert!(text.contains("idleTimout") && text.contains("idleTimeout"), "did you mean: {text}");
    assert!(stdout(&output).is_empty(), "errors go to stderr");
}

#[test]
fn apply_without_a_terminal_needs_auto_approve() {
    let sandbox = Sandbox::new("{ max: 2 }");
    sandbox.push_linux_task();
    let output = run(sandbox.command(&["apply"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("hint: pass `--auto-approve`"), "{}", stderr(&output));
    assert_eq!(sandbox.active_instances(), 0, "nothing was created");
}

#[test]
fn plan_apply_plan_converges_to_no_changes() {
    let sandbox = Sandbox::new("{ max: 3, idleTimeout: 30m }");
    sandbox.push_linux_task();
    sandbox.push_linux_task();

    let applied = run(sandbox.command(&["apply", "--auto-approve"]));
    assert!(applied.status.success(), "{}\n{}", stdout(&applied), stderr(&applied));
    assert!(stdout(&applied).contains("Apply complete: 2 done, 0 failed"), "{}", stdout(&applied));
    assert_eq!(sandbox.active_instances(), 2);

    let again = run(sandbox.command(&["plan", "--detailed-exitcode"]));
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
    assert!(stdout(&again).contains("No changes."));
}

#[test]
fn saved_plan_applies_once_and_is_refused_when_stale() {
    let sandbox = Sandbox::new("{ max: 2 }");
    sandbox.push_linux_task();
    let planned = run(sandbox.command(&["plan", "--out", "tfplan.json"]));
    assert!(planned.status.success(), "{}", stderr(&planned));
    let saved = std::fs::read_to_string(sandbox.path("tfplan.json")).expect("plan file written");
    assert!(!saved.contains(SECRET));

    // Someone else acts first: the instance the plan would create exists now.
    let first = run(sandbox.command(&["apply", "--auto-approve"]));
    assert!(first.status.success(), "{}", stderr(&first));
    let stale = run(sandbox.command(&["apply", "tfplan.json"]));
    assert_eq!(stale.status.code(), Some(1));
    assert!(stderr(&stale).contains("is no longer safe: an instance named"), "{}", stderr(&stale));
    assert!(stderr(&stale).contains("hint: "), "{}", stderr(&stale));
    assert!(stdout(&stale).contains("1 no longer safe"), "{}", stdout(&stale));
    assert_eq!(sandbox.active_instances(), 1, "the stale plan created nothing");
}

#[test]
fn saved_plan_from_another_config_is_refused() {
    let sandbox = Sandbox::new("{ max: 2 }");
    sandbox.push_linux_task();
    assert!(run(sandbox.command(&["plan", "--out", "tfplan.json"])).status.success());
    let config = std::fs::read_to_string(sandbox.config()).expect("config");
    std::fs::write(sandbox.config(), config.replace("max: 2", "max: 3")).expect("rewrite config");
    let output = run(sandbox.command(&["apply", "tfplan.json"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("different config"), "{}", stderr(&output));
}

#[test]
fn corrupt_plan_file_is_a_located_error() {
    let sandbox = Sandbox::new("{ max: 2 }");
    std::fs::write(sandbox.path("bad.json"), "{\n  \"format_version\": 1,\n  oops\n}").expect("write");
    let output = run(sandbox.command(&["apply", "bad.json"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("bad.json:3:"), "{}", stderr(&output));
}

#[test]
fn observe_writes_what_plan_reads() {
    let sandbox = Sandbox::new("{ max: 2 }");
    sandbox.push_linux_task();
    let observed = run(sandbox.command(&["observe", "-o", "state.yaml"]));
    assert!(observed.status.success(), "{}", stderr(&observed));
    let offline = run(sandbox.command(&["plan", "--observed", "state.yaml", "--detailed-exitcode"]));
    assert_eq!(offline.status.code(), Some(2), "{}", stderr(&offline));
    assert!(stdout(&offline).contains("1 to create"));
}

#[test]
fn watch_runs_a_job_through_its_whole_life() {
    // Job appears → agent created → job runs → idle → drained → deleted, cycle after cycle.
    let sandbox = Sandbox::new("{ max: 2, idleTimeout: 0s }");
    sandbox.push_linux_task();
    let output = run(sandbox.command(&["watch", "--json", "--cycles", "6"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let cycles: Vec<serde_json::Value> =
        stdout(&output).lines().map(|line| serde_json::from_str(line).expect("JSON line")).collect();
    assert_eq!(cycles.len(), 6);
    let total = |key: &str| cycles.iter().map(|cycle| cycle["planned"][key].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(total("create"), 1, "{cycles:?}");
    assert_eq!(total("drain"), 1, "{cycles:?}");
    assert_eq!(total("delete"), 1, "{cycles:?}");
    let world = sandbox.world().snapshot();
    assert!(
        world.instances.iter().all(|instance| instance.state == InstanceState::Terminated),
        "{:?}",
        world.instances
    );
    assert!(world.agents.is_empty(), "agent record removed: {:?}", world.agents);
    assert!(world.tasks.is_empty(), "the job ran and finished: {:?}", world.tasks);
}

#[test]
fn watch_stops_cleanly_on_sigterm() {
    let sandbox = Sandbox::new("{ max: 2 }");
    let mut child = sandbox
        .command(&["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first cycle").expect("readable");
    assert!(first.contains("\"cycle\":1"), "{first}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "watch did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn every_malformed_config_exits_1_with_file_line_col() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("fixtures folder")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fixtures: {files:?}");
    for file in files {
        let output = run(ciscale().arg("validate").arg("-c").arg(&file).env_remove("UNSET_FOR_TEST"));
        let name = file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        assert_eq!(output.status.code(), Some(1), "{name}: {}", stderr(&output));
        let text = stderr(&output);
        let located = text.lines().any(|line| {
            line.split(':').collect::<Vec<_>>().windows(3).any(|parts| {
                parts[0].ends_with(&name) && parts[1].parse::<u32>().is_ok() && parts[2].parse::<u32>().is_ok()
            })
        });
        assert!(located, "{name}: no `file:line:col` in\n{text}");
        assert!(stdout(&output).is_empty(), "{name}: errors belong on stderr");
    }
}

/// Runs ciscale under `script`, which gives it a real pseudo-terminal, and answers the prompt with `answer`.
fn apply_on_a_terminal(sandbox: &Sandbox, answer: &str) -> Output {
    let binary = env!("CARGO_BIN_EXE_ciscale");
    let command = format!("{binary} apply -c {}", sandbox.config().display());
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .current_dir(sandbox.dir.path())
        // The sandbox's own lock dir, as every other run of it: tests share the owner id.
        .env("CISCALE_LOCK_DIR", sandbox.path("locks"))
        .env("NO_COLOR", "1")
        .env("E2E_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("`script` (util-linux) runs");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{answer}\n").as_bytes()).expect("answer the prompt");
    }
    child.wait_with_output().expect("script finishes")
}

#[test]
fn apply_on_a_terminal_asks_and_only_yes_goes_ahead() {
    if Command::new("script").arg("--version").output().is_err() {
        panic!("`script` from util-linux is needed for the terminal test: apt-get install bsdutils");
    }
    let sandbox = Sandbox::new("{ max: 2 }");
    sandbox.push_linux_task();

    let refused = apply_on_a_terminal(&sandbox, "y");
    let screen = String::from_utf8_lossy(&refused.stdout);
    assert!(!screen.contains(SECRET));
    assert!(screen.contains("Only 'yes' will be accepted"), "{screen}");
    assert_ne!(refused.status.code(), Some(0), "{screen}");
    assert_eq!(sandbox.active_instances(), 0, "`y` is not `yes`");

    let accepted = apply_on_a_terminal(&sandbox, "yes");
    let screen = String::from_utf8_lossy(&accepted.stdout);
    assert_eq!(accepted.status.code(), Some(0), "{screen}");
    assert!(screen.contains("Apply complete: 1 done, 0 failed"), "{screen}");
    assert_eq!(sandbox.active_instances(), 1);
}

#[test]
fn apply_refuses_to_act_while_watch_holds_the_owner_lock() {
    let sandbox = Sandbox::new("{ max: 2 }");
    let mut watch = sandbox
        .command(&["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    lines.next().expect("a first cycle").expect("readable");

    sandbox.push_linux_task();
    let refused = run(sandbox.command(&["apply", "--auto-approve"]));
    drop(watch.kill());
    drop(watch.wait());
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let text = stderr(&refused);
    assert!(text.contains("another ciscale is acting for owner `e2e`"), "{text}");
    assert!(text.contains(&format!("pid {}", watch.id())), "names the holder: {text}");
    assert!(text.contains("hint: "), "{text}");

    // The lock dies with its holder: no stale lock after a kill.
    let after = run(sandbox.command(&["apply", "--auto-approve"]));
    assert!(after.status.success(), "{}", stderr(&after));
}
