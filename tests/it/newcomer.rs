//! A newcomer's first hour, through the binary (issue #13, and #9's CLI items): every error exits 1, wrong inputs
//! are caught with a message that says which and why, offline work needs no secrets, saved plans find their
//! config, and the output is worth keeping. New messages are snapshot-tested (paths and ports filtered).

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::cli::{ciscale, run, stderr, stdout, Sandbox, SECRET};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// stderr with the sandbox folder, loopback ports and timings made stable for a snapshot.
fn stable(text: &str, dir: &Path) -> String {
    let text = text.replace(&dir.display().to_string(), "[DIR]");
    let mut out = String::new();
    let mut rest = text.as_str();
    // `127.0.0.1:<port>` → `127.0.0.1:[PORT]`
    while let Some(at) = rest.find("127.0.0.1:") {
        out.push_str(&rest[..at + "127.0.0.1:".len()]);
        rest = &rest[at + "127.0.0.1:".len()..];
        let digits = rest.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(rest.len());
        out.push_str(if digits > 0 { "[PORT]" } else { "" });
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!(name, text);
    });
}

/// A port nothing listens on: connections to it are refused.
fn refused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&path, text).expect("write");
    path
}

/// A ciscale command in `dir`, with its own lock folder.
fn in_dir(dir: &Path, args: &[&str]) -> Command {
    let mut command = ciscale();
    command.current_dir(dir).env("CISCALE_LOCK_DIR", dir.join("locks")).args(args);
    command
}

// -- 1. every error exits 1 -----------------------------------------------------------------------------------

#[test]
fn usage_errors_exit_1_not_2() {
    // 2 means "changes" to `plan --detailed-exitcode`: a typo must never read as that.
    for args in [&["plan", "--detailed-exitcode", "--bogus"][..], &["frobnicate"], &["plan", "--observed"], &[]] {
        let output = run(ciscale().args(args));
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stderr(&output));
        assert!(stdout(&output).is_empty(), "{args:?}: usage goes to stderr");
    }
    for args in [&["--help"][..], &["plan", "--help"], &["--version"]] {
        let output = run(ciscale().args(args));
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&output).is_empty(), "{args:?}: help is data on stdout");
    }
}

// -- 2. an observation of another config ----------------------------------------------------------------------

#[test]
fn an_observation_of_another_config_is_refused_naming_what_differs() {
    let output = run(ciscale().current_dir(repo()).args([
        "plan",
        "-c",
        "examples/fake.yaml",
        "--observed",
        "examples/woodpecker-hetzner.observed.yaml",
        "--detailed-exitcode",
    ]));
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).is_empty(), "nothing was planned: {}", stdout(&output));
    snapshot("newcomer-observation-mismatch", &stderr(&output));
}

// -- 3. bounds --------------------------------------------------------------------------------------------------

#[test]
fn absurd_numbers_are_too_large_with_the_bound_and_why() {
    let sandbox = Sandbox::new("{ max: 4294967295, minIdle: 99999999999999999999, jobsPerAgent: 2 }");
    let output = run(sandbox.command(&["validate"]));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(!text.contains("expected a whole number"), "{text}");
    snapshot("newcomer-too-large", &stable(&text, sandbox.dir.path()));

    // A poll interval of 1ms hammered the APIs at ~375 cycles a second: the fake's floor is 100ms.
    let config =
        std::fs::read_to_string(sandbox.config()).expect("config").replace("pollInterval: 1s", "pollInterval: 1ms");
    std::fs::write(sandbox.config(), config.replace("max: 4294967295, minIdle: 99999999999999999999", "max: 2"))
        .expect("write");
    let output = run(sandbox.command(&["validate"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("`pollInterval` 1ms is too short for backend `sim` (fake): at least 100ms"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn every_duplicate_key_is_reported_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        "ciscale.yaml",
        "id: a\nid: b\nci: { sim: { kind: fake } }\nbackends: { sim: { kind: fake } }\npools:\n  - name: p\n    ci: { source: sim }\n    backend: { name: sim }\n    scale: { max: 2, max: 3 }\n",
    );
    let output = run(ciscale().arg("validate").arg("-c").arg(&config));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("ciscale.yaml:2:1: error: duplicate key `id`"), "{text}");
    assert!(text.contains("ciscale.yaml:9:22: error: duplicate key `max`"), "{text}");
}

// -- 4. a saved plan knows its config ----------------------------------------------------------------------------

/// A fake world config in `dir/<name>` (no `ciscale.yaml` in `dir`, so only the plan file can name it).
fn sub_config(dir: &Path, name: &str, max: u32) -> std::path::PathBuf {
    write(
        dir,
        name,
        &format!(
            "id: planfile\npollInterval: 1s\nci:\n  sim: {{ kind: fake, stateFile: world.json, simulate: true }}\nbackends:\n  sim: {{ kind: fake, stateFile: world.json }}\npools:\n  - name: p\n    ci: {{ source: sim }}\n    backend: {{ name: sim }}\n    scale: {{ min: 1, max: {max} }}\n"
        ),
    )
}

#[test]
fn apply_of_a_saved_plan_finds_the_config_the_plan_was_made_from() {
    let dir = tempfile::tempdir().expect("dir");
    sub_config(dir.path(), "conf/x.yaml", 2);
    let planned = run(in_dir(dir.path(), &["plan", "-c", "conf/x.yaml", "--out", "p.json"]));
    assert!(planned.status.success(), "{}", stderr(&planned));
    assert!(stdout(&planned).contains("run `ciscale apply p.json` to carry it out"), "{}", stdout(&planned));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("p.json")).expect("plan file")).expect("JSON");
    let recorded = file["config_path"].as_str().expect("the plan file names its config");
    assert!(Path::new(recorded).is_absolute() && recorded.ends_with("conf/x.yaml"), "{recorded}");

    // The hint works as printed: no `-c`, no `ciscale.yaml` here.
    let applied = run(in_dir(dir.path(), &["apply", "p.json"]));
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    assert!(stdout(&applied).contains("Apply complete: 1 done"), "{}", stdout(&applied));

    // An explicit `-c` wins over the plan file's config, and must then be that config.
    sub_config(dir.path(), "other.yaml", 3);
    assert!(run(in_dir(dir.path(), &["plan", "-c", "conf/x.yaml", "--out", "q.json"])).status.success());
    let refused = run(in_dir(dir.path(), &["apply", "-c", "other.yaml", "q.json"]));
    assert_eq!(refused.status.code(), Some(1));
    snapshot("newcomer-plan-file-other-config", &stable(&stderr(&refused), dir.path()));
}

// -- 5. secrets: offline commands warn, online ones fail ------------------------------------------------------------

#[test]
fn offline_commands_need_no_secrets_online_ones_do() {
    let root = repo();
    let without = |args: &[&str]| {
        let mut command = ciscale();
        command
            .current_dir(root)
            .args(args)
            .env_remove("WOODPECKER_TOKEN")
            .env_remove("HCLOUD_TOKEN")
            .env_remove("GIT_TOKEN");
        command.env("CISCALE_LOCK_DIR", std::env::temp_dir().join("ciscale-newcomer-locks"));
        run(command)
    };
    let validated = without(&["validate", "-c", "examples/woodpecker-hetzner.yaml"]);
    assert_eq!(validated.status.code(), Some(0), "{}", stderr(&validated));
    snapshot("newcomer-offline-secret-warnings", &stderr(&validated));

    let planned = without(&[
        "plan",
        "-c",
        "examples/woodpecker-hetzner.yaml",
        "--observed",
        "examples/woodpecker-hetzner.observed.yaml",
    ]);
    assert_eq!(planned.status.code(), Some(0), "{}", stderr(&planned));
    assert!(stdout(&planned).contains("Plan: "), "{}", stdout(&planned));
    assert!(
        stderr(&planned).contains("warning: environment variable `HCLOUD_TOKEN` is not set"),
        "{}",
        stderr(&planned)
    );

    for online in [
        &["observe", "-c", "examples/woodpecker-hetzner.yaml"][..],
        &["apply", "-c", "examples/woodpecker-hetzner.yaml"],
    ] {
        let output = without(online);
        assert_eq!(output.status.code(), Some(1), "{online:?}");
        let text = stderr(&output);
        assert!(text.contains("error: environment variable `HCLOUD_TOKEN` is not set"), "{online:?}: {text}");
        assert!(!text.contains("or remove the reference"), "{online:?}: {text}");
    }
}

#[test]
fn empty_and_unbraced_secrets_are_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let config = |token: &str| {
        format!(
            "id: secrets\nci:\n  wp: {{ kind: woodpecker, server: \"http://127.0.0.1:9\", token: \"{token}\" }}\nbackends:\n  sim: {{ kind: fake }}\npools:\n  - name: p\n    ci: {{ source: wp }}\n    backend: {{ name: sim }}\n"
        )
    };
    write(dir.path(), "ciscale.yaml", &config("${E2E_SECRET}"));
    // Set but empty: online an error, offline (the value is never used) a warning.
    let online = run(in_dir(dir.path(), &["apply", "--auto-approve"]).env("E2E_SECRET", ""));
    assert_eq!(online.status.code(), Some(1), "{}", stderr(&online));
    assert!(
        stderr(&online).contains("error: the admin token of ci source `wp` is empty: `E2E_SECRET` is set but empty"),
        "{}",
        stderr(&online)
    );
    let offline = run(in_dir(dir.path(), &["validate"]).env("E2E_SECRET", ""));
    assert_eq!(offline.status.code(), Some(0), "{}", stderr(&offline));
    assert!(stderr(&offline).contains("warning: the admin token of ci source `wp` is empty"), "{}", stderr(&offline));

    // `$VAR` without braces is sent as the literal text: an error wherever it is, even offline.
    write(dir.path(), "ciscale.yaml", &config("$E2E_SECRET"));
    let unbraced = run(in_dir(dir.path(), &["validate"]));
    assert_eq!(unbraced.status.code(), Some(1), "{}", stderr(&unbraced));
    snapshot("newcomer-unbraced-secret", &stderr(&unbraced));
}

// -- 6. errors keep their cause -----------------------------------------------------------------------------------

#[test]
fn config_errors_say_why_the_file_cannot_be_read() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = run(in_dir(dir.path(), &["validate"]));
    assert_eq!(missing.status.code(), Some(1));
    let folder = run(in_dir(dir.path(), &["validate", "-c", "."]));
    assert_eq!(folder.status.code(), Some(1));
    snapshot("newcomer-config-missing-and-folder", &format!("{}{}", stderr(&missing), stderr(&folder)));
    // Permission denied is checked as the systemd unit's user in tests/it/deploy.rs.
}

#[test]
fn a_mistyped_c_is_an_error_even_with_picus_variables() {
    let dir = tempfile::tempdir().expect("dir");
    let picus: [(&str, &str); 5] = [
        ("PICUS_PROVIDER_TYPE", "hcloud"),
        ("PICUS_WOODPECKER_SERVER", "http://127.0.0.1:9"),
        ("PICUS_WOODPECKER_TOKEN", "t"),
        ("PICUS_HCLOUD_TOKEN", "t"),
        ("PICUS_WOODPECKER_AGENT_ID", "1"),
    ];
    let mut typo = in_dir(dir.path(), &["validate", "-c", "ciscale.ymal"]);
    typo.envs(picus);
    let output = run(typo);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("cannot read config `ciscale.ymal`: no such file"), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("hint: `PICUS_*` variables stand in for a config only when none is named"),
        "{}",
        stderr(&output)
    );
    // With nothing named, the Picus environment still stands in (Picus's compose file runs unchanged).
    let mut implicit = in_dir(dir.path(), &["validate"]);
    implicit.envs(picus);
    let output = run(implicit);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn network_errors_name_every_failing_provider_its_url_and_the_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let (woodpecker, hetzner) = (refused_port(), refused_port());
    write(
        dir.path(),
        "ciscale.yaml",
        &format!(
            "id: net\nci:\n  wp: {{ kind: woodpecker, server: \"http://127.0.0.1:{woodpecker}\", token: \"${{E2E_SECRET}}\" }}\nbackends:\n  hetzner: {{ kind: hcloud, token: \"${{E2E_SECRET}}\", endpoint: \"http://127.0.0.1:{hetzner}/v1\" }}\npools:\n  - name: p\n    ci: {{ source: wp }}\n    backend: {{ name: hetzner }}\n"
        ),
    );
    let output = run(in_dir(dir.path(), &["plan"]));
    assert_eq!(output.status.code(), Some(1));
    let text = stable(&stderr(&output), dir.path());
    assert!(text.contains(&"connection refused".to_string()), "{text}");
    snapshot("newcomer-network-errors", &text);
}

#[test]
fn a_huge_retry_after_is_a_rate_limit_not_a_panic() {
    // Answers every request with a 429 asking to wait 1e30 seconds (`Duration::from_secs_f64` panics on it).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0_u8; 4096];
            drop(stream.read(&mut request));
            drop(stream.write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1e30\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"));
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "ciscale.yaml",
        &format!(
            "id: limited\nci:\n  wp: {{ kind: woodpecker, server: \"http://127.0.0.1:{port}\", token: \"${{E2E_SECRET}}\" }}\nbackends:\n  sim: {{ kind: fake }}\npools:\n  - name: p\n    ci: {{ source: wp }}\n    backend: {{ name: sim }}\n"
        ),
    );
    let output = run(in_dir(dir.path(), &["plan"]));
    assert_eq!(output.status.code(), Some(1), "a panic exits 101: {}", stderr(&output));
    assert!(stderr(&output).contains("rate limited by woodpecker, retry after 86400s"), "{}", stderr(&output));
}

#[test]
fn watch_with_cycles_exits_1_when_its_last_cycle_failed() {
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "ciscale.yaml",
        &format!(
            "id: failing\npollInterval: 1s\nci:\n  wp: {{ kind: woodpecker, server: \"http://127.0.0.1:{}\", token: \"${{E2E_SECRET}}\" }}\nbackends:\n  sim: {{ kind: fake }}\npools:\n  - name: p\n    ci: {{ source: wp }}\n    backend: {{ name: sim }}\n",
            refused_port()
        ),
    );
    let output = run(in_dir(dir.path(), &["watch", "--cycles", "1", "--json"]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let line: serde_json::Value = serde_json::from_str(stdout(&output).trim()).expect("one JSON line");
    assert!(line["error"].as_str().is_some_and(|error| error.contains("connection refused")), "{line}");
    assert!(stderr(&output).contains("error: the last cycle failed"), "{}", stderr(&output));

    // A cycle that works exits 0.
    let sandbox = Sandbox::new("{ max: 2 }");
    let fine = run(sandbox.command(&["watch", "--cycles", "1"]));
    assert_eq!(fine.status.code(), Some(0), "{}", stderr(&fine));
}

#[test]
fn a_planted_lock_symlink_is_refused_and_its_target_untouched() {
    let sandbox = Sandbox::new("{ max: 2 }");
    let locks = sandbox.path("locks");
    std::fs::create_dir(&locks).expect("locks");
    let victim = sandbox.path("victim");
    std::fs::write(&victim, "precious").expect("victim");
    std::os::unix::fs::symlink(&victim, locks.join("e2e.lock")).expect("plant");
    let output = run(sandbox.command(&["apply", "--auto-approve"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("refusing the lock file"), "{}", stderr(&output));
    assert!(stderr(&output).contains("symbolic link"), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious");
}

#[test]
fn the_config_hash_covers_plain_variables() {
    let dir = tempfile::tempdir().expect("dir");
    write(
        dir.path(),
        "ciscale.yaml",
        "id: hashed\npollInterval: 1s\nci:\n  sim: { kind: fake, stateFile: world.json, simulate: true }\nbackends:\n  sim: { kind: fake, stateFile: world.json }\npools:\n  - name: p\n    ci: { source: sim }\n    backend: { name: sim, machine: { serverType: \"${SERVER_TYPE}\" } }\n    scale: { min: 1, max: 2 }\n",
    );
    let planned = run(in_dir(dir.path(), &["plan", "--out", "p.json"]).env("SERVER_TYPE", "small"));
    assert!(planned.status.success(), "{}", stderr(&planned));
    let applied = run(in_dir(dir.path(), &["apply", "p.json"]).env("SERVER_TYPE", "large"));
    assert_eq!(applied.status.code(), Some(1), "a plan for `small` must not create `large`: {}", stdout(&applied));
    assert!(stderr(&applied).contains("was made from a different config"), "{}", stderr(&applied));
    // A changed secret does not make the plan stale.
    let applied = run(in_dir(dir.path(), &["apply", "p.json"]).env("SERVER_TYPE", "small").env("E2E_SECRET", "other"));
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
}

#[test]
fn an_azure_pool_on_a_cloud_needs_its_own_agent_image() {
    let output = run(ciscale()
        .arg("validate")
        .arg("-c")
        .arg(repo().join("tests/fixtures/config/azure-on-cloud.yaml"))
        .env("AZP_TOKEN", "x"));
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("azure-on-cloud.yaml:12:11: error: pool `on-hetzner` runs Azure Pipelines agents"), "{text}");
    assert!(text.contains("pool `on-ec2`") && !text.contains("pool `on-incus`"), "{text}");
}

// -- 9. output a user can keep ------------------------------------------------------------------------------------

/// `ciscale <args>` under `script` (a real pseudo-terminal), with `input` typed into it.
fn on_a_terminal(dir: &Path, args: &str, input: &str) -> Output {
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_ciscale"));
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .current_dir(dir)
        .env("CISCALE_LOCK_DIR", dir.join("locks"))
        .env("NO_COLOR", "1")
        .env("E2E_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("`script` (util-linux) runs");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("type");
    let output = child.wait_with_output().expect("script finishes");
    assert!(!String::from_utf8_lossy(&output.stdout).contains(SECRET));
    output
}

#[test]
fn apply_on_a_terminal_keeps_one_line_per_finished_change_with_its_id() {
    let sandbox = Sandbox::new("{ min: 2, max: 2 }");
    let output = on_a_terminal(sandbox.dir.path(), &format!("apply -c {}", sandbox.config().display()), "yes\n");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{screen}");
    let instances = sandbox.world().snapshot().instances;
    assert_eq!(instances.len(), 2, "{screen}");
    for instance in &instances {
        let kept = format!("+ `{}`: create complete after ", instance.name);
        let line = screen.lines().find(|text| text.contains(&kept));
        assert!(
            line.is_some_and(|text| text.contains(&format!("[id={}]", instance.id))),
            "no kept line for {} with its id:\n{screen}",
            instance.name
        );
    }
    assert!(screen.contains("Apply complete: 2 done, 0 failed"), "{screen}");
}

#[test]
fn the_plan_says_which_numbers_are_jobs_and_which_agents_and_shows_a_block_once() {
    let sandbox = Sandbox::new("{ min: 3, max: 3 }");
    let output = run(sandbox.command(&["plan"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("pool `linux`: jobs 0 pending, 0 running; agents 0 active (0 busy, 0 idle), 3 desired"),
        "{text}"
    );
    assert_eq!(text.matches("+ machine.serverType = small").count(), 1, "{text}");
    let first = ciscale::plan::instance_name("e2e", &"linux".into(), 1);
    assert_eq!(text.matches(&format!("(attributes as for {first})")).count(), 2, "{text}");
    // Creates for no job name the rule that wants them.
    assert!(text.contains("(desired 3 for `min` 3, max 3)"), "{text}");
    sandbox.write_config("{ minIdle: 1, max: 2 }");
    let warm = stdout(&run(sandbox.command(&["plan"])));
    assert!(warm.contains("(desired 1: 0 for jobs + `minIdle` 1, max 2)"), "{warm}");
}

#[test]
fn the_man_page_has_environment_and_exit_status_and_no_missing_pages() {
    let output = run(ciscale().arg("man"));
    assert!(output.status.success());
    let page = stdout(&output);
    assert!(page.contains(".SH ENVIRONMENT") && page.contains("CISCALE_LOCK_DIR"), "{page}");
    assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
    assert!(page.contains("\\fBciscale import picus [OPTIONS]\\fR"), "every command is on the one page");
    assert!(!page.contains("ciscale\\-plan(1)") && !page.contains("ciscale-plan(1)"), "no pages that do not exist");
}

#[test]
fn provision_without_images_says_so() {
    let sandbox = Sandbox::new("{ max: 2 }");
    let output = run(sandbox.command(&["provision"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("has no `images:` section: there is nothing to provision"), "{}", stderr(&output));
}

#[test]
fn import_without_a_file_on_a_terminal_says_it_reads_standard_input() {
    let dir = tempfile::tempdir().expect("dir");
    // Ctrl-D ends the (empty) input.
    let output = on_a_terminal(dir.path(), "import incus-azure-pipelines", "\u{4}");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(screen.contains("reading the config from standard input (end it with Ctrl-D)"), "{screen}");
    // Not on a terminal (a pipe): no such line, the data is read silently.
    let piped = run(ciscale().args(["import", "incus-azure-pipelines"]));
    assert!(!stderr(&piped).contains("reading the config from standard input"), "{}", stderr(&piped));
}
