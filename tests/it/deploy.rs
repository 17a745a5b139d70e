//! The shipped systemd unit works as its header says: the user it runs as can read the config the install steps
//! create — checked by running the real binary with that user's credentials (`setpriv`), after applying the modes
//! and groups read from the unit's own install comment. A negative control shows what the unit looked like
//! before: a dynamic user without the group cannot read a 0640 config. (`systemd-analyze verify` of the unit is
//! `daemon::the_systemd_unit_is_hardened_and_verifies`.)

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use crate::cli::{run, stderr, stdout};

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ciscale.service"))
        .expect("deploy/ciscale.service")
}

/// `true` when the test may run; `false` (with a loud note) only when the user asked to skip.
fn systemd_tools_present(tools: &[&str]) -> bool {
    let missing: Vec<&&str> =
        tools.iter().filter(|tool| Command::new(tool).arg("--version").output().is_err()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CISCALE_SKIP_SYSTEMD").is_ok_and(|value| value == "1") {
        eprintln!("SKIPPED: {missing:?} not installed (CISCALE_SKIP_SYSTEMD=1)");
        return false;
    }
    panic!("{missing:?} not found: install the `systemd` and `util-linux` packages, or set CISCALE_SKIP_SYSTEMD=1");
}

/// `key=value` settings of the unit's `[Service]` section (every value of keys given more than once).
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings.entry(key.to_owned()).or_default().push(value.to_owned());
        }
    }
    settings
}

/// One `install` step of the unit's header comment: mode, group and target, for a file or a directory (`-d`).
#[derive(Debug)]
struct InstallStep {
    directory: bool,
    mode: u32,
    group: Option<String>,
    target: String,
}

fn install_steps(unit: &str) -> Vec<InstallStep> {
    let mut steps = Vec::new();
    for line in unit.lines() {
        let Some(command) = line.trim_start_matches('#').trim().strip_prefix("install ") else { continue };
        let command = command.split("  #").next().unwrap_or_default();
        let command = command.split("&&").next().unwrap_or_default();
        let words: Vec<&str> = command.split_whitespace().collect();
        let (mut directory, mut mode, mut group, mut operands) = (false, 0o755, None, Vec::new());
        let mut index = 0;
        while index < words.len() {
            match words[index] {
                "-d" => directory = true,
                "-m" => {
                    index += 1;
                    mode = u32::from_str_radix(words[index], 8).expect("octal mode");
                }
                "-g" => {
                    index += 1;
                    group = Some(words[index].to_owned());
                }
                operand => operands.push(operand),
            }
            index += 1;
        }
        let target = operands.last().map(|target| (*target).to_owned()).unwrap_or_default();
        steps.push(InstallStep { directory, mode, group, target });
    }
    steps
}

#[test]
fn the_units_user_can_read_the_config_the_install_steps_create() {
    if !systemd_tools_present(&["setpriv"]) {
        return;
    }
    if !is_root() {
        panic!("this test switches users with `setpriv` and must run as root (CI does)");
    }
    let unit = unit_text();
    let settings = service_settings(&unit);
    assert_eq!(settings.get("DynamicUser").map(Vec::as_slice), Some(&["yes".to_owned()][..]), "{settings:?}");
    assert!(!settings.contains_key("User"), "a dynamic user owns no file: {settings:?}");
    let groups: Vec<String> = settings
        .get("SupplementaryGroups")
        .into_iter()
        .flatten()
        .flat_map(|value| value.split_whitespace())
        .map(str::to_owned)
        .collect();

    let steps = install_steps(&unit);
    let config_dir =
        steps.iter().find(|step| step.directory && step.target == "/etc/ciscale").expect("a step makes /etc/ciscale");
    let config = steps
        .iter()
        .find(|step| !step.directory && step.target == "/etc/ciscale/")
        .expect("a step installs ciscale.yaml");

    // Stand-ins for names that exist only on the target host: a free gid per group, a dynamic-range uid.
    const DYNAMIC_UID: u32 = 61_234;
    let gid_of = |name: &str| 64_000 + name.bytes().map(u32::from).sum::<u32>() % 500;
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod root");
    let etc = root.path().join("etc/ciscale");
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::set_permissions(root.path().join("etc"), std::fs::Permissions::from_mode(0o755)).expect("chmod etc");
    let file = etc.join("ciscale.yaml");
    std::fs::write(
        &file,
        "id: deploy\nci: { sim: { kind: fake } }\nbackends: { sim: { kind: fake } }\npools: [{ name: p, ci: { source: sim }, backend: { name: sim } }]\n",
    )
    .expect("config");
    for (path, step) in [(&etc, config_dir), (&file, config)] {
        let gid = step.group.as_deref().map(gid_of);
        std::os::unix::fs::chown(path, Some(0), gid.or(Some(0))).expect("chown");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(step.mode)).expect("chmod");
    }

    let as_service = |with_groups: &[u32]| {
        let mut command = Command::new("setpriv");
        command.args([format!("--reuid={DYNAMIC_UID}"), format!("--regid={DYNAMIC_UID}")]);
        if with_groups.is_empty() {
            command.arg("--clear-groups");
        } else {
            command
                .arg(format!("--groups={}", with_groups.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")));
        }
        command.arg(env!("CARGO_BIN_EXE_ciscale")).arg("validate").arg("-c").arg(&file).env("NO_COLOR", "1");
        run(command)
    };
    let unit_groups: Vec<u32> = groups.iter().map(|name| gid_of(name)).collect();
    let read = as_service(&unit_groups);
    assert!(read.status.success(), "the unit's user (groups {groups:?}) cannot read the config:\n{}", stderr(&read));
    assert!(stdout(&read).contains("is valid"), "{}", stdout(&read));

    // The control: a dynamic user without the group (the unit as it was) is refused, and says why.
    let refused = as_service(&[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("permission denied"), "{}", stderr(&refused));
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}
