//! How a GitHub runner is started on each kind of backend, as data the executor uses: the pinned runner release,
//! the script that installs it, the wrapper that starts it with its just-in-time config, and the cloud-init
//! document for cloud servers.
//!
//! - **Containers (Incus)**: `ciscale provision` builds an image with [`install_script`] (the runner in
//!   [`RUNNER_HOME`], owned by the unprivileged [`RUNNER_USER`], and the wrapper at [`AGENT_COMMAND`]). Per
//!   instance ciscale pushes the agent env file (mode 0400) to [`ENV_FILE`] and execs the wrapper.
//! - **Clouds (Hetzner, EC2)**: the user data ([`cloud_user_data`]) writes the env file (0400, root), installs the
//!   pinned release after checking its SHA-256, keeps the runner user away from the cloud metadata endpoint (it
//!   serves the user data, which holds the config) and starts the wrapper as a systemd unit.
//!
//! The wrapper hands the config to `run.sh` in `ACTIONS_RUNNER_INPUT_JITCONFIG` ([`JIT_CONFIG_ENV`]), which the
//! runner reads as its `--jitconfig` argument and then removes from its environment, so jobs never see it. It is
//! not passed as `--jitconfig <config>`: a command line can be read by every local user in `/proc/*/cmdline`. The
//! runner takes exactly one job and exits; the wrapper then powers the instance off (an ephemeral Incus container
//! is deleted by that; a cloud server is deleted by the next plan, as its runner is gone).

use super::matching::RunnerArch;
use crate::model::Secret;
use crate::providers::cloud_config::{CloudConfig, RootFile};

/// The variable the runner reads its just-in-time config from (any `run.sh` argument can be given as
/// `ACTIONS_RUNNER_INPUT_<NAME>`).
pub const JIT_CONFIG_ENV: &str = "ACTIONS_RUNNER_INPUT_JITCONFIG";
/// The unprivileged user the runner and its jobs run as (the runner refuses to run as root by default).
pub const RUNNER_USER: &str = "runner";
/// Where the runner is installed.
pub const RUNNER_HOME: &str = "/opt/actions-runner";
/// The wrapper the executor starts in a container (the same path `apply` execs for every CI).
pub const AGENT_COMMAND: &str = "/usr/local/bin/ciscale-agent";
/// The agent env file the executor pushes into a container (the same path `apply` pushes to for every CI).
pub const ENV_FILE: &str = "/run/ciscale/agent.env";
/// The env key of the duplicate token the executor writes for its own wrapper; the GitHub wrapper drops it, so
/// the config reaches the runner only under [`JIT_CONFIG_ENV`] (which the runner scrubs before any job runs).
pub const DUPLICATE_TOKEN_ENV: &str = "CISCALE_AGENT_TOKEN";
/// The link-local address clouds serve instance metadata (and user data) on.
pub const METADATA_ADDRESS: &str = "169.254.169.254";

/// A release of `actions/runner`, pinned by its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerRelease {
    pub version: &'static str,
    pub arch: RunnerArch,
    /// SHA-256 of the `.tar.gz`, as the release notes list it.
    pub sha256: &'static str,
}

/// The pinned runner releases. Checksums from the v2.329.0 release notes (github.com/actions/runner/releases),
/// cross-checked against several independent pins of the same files; nothing is downloaded in the tests. Bump
/// both together: GitHub stops sending jobs to runners that fall too far behind, and a runner that is merely old
/// updates itself before its first job (which delays it).
pub const RUNNER_RELEASES: [RunnerRelease; 2] = [
    RunnerRelease {
        version: "2.329.0",
        arch: RunnerArch::X64,
        sha256: "194f1e1e4bd02f80b7e9633fc546084d8d4e19f3928a324d512ea53430102e1d",
    },
    RunnerRelease {
        version: "2.329.0",
        arch: RunnerArch::Arm64,
        sha256: "56768348b3d643a6a29d4ad71e9bdae0dc0ef1eb01afe0f7a8ee097b039bfaaf",
    },
];

impl RunnerRelease {
    /// The pinned release for `arch` (none for 32-bit ARM).
    pub fn for_arch(arch: RunnerArch) -> Option<&'static RunnerRelease> {
        RUNNER_RELEASES.iter().find(|release| release.arch == arch)
    }

    /// `actions-runner-linux-x64-2.329.0.tar.gz`.
    pub fn file_name(&self) -> String {
        let arch = match self.arch {
            RunnerArch::X64 => "x64",
            RunnerArch::Arm64 => "arm64",
            RunnerArch::Arm => "arm",
        };
        format!("actions-runner-linux-{arch}-{}.tar.gz", self.version)
    }

    pub fn url(&self) -> String {
        format!("https://github.com/actions/runner/releases/download/v{}/{}", self.version, self.file_name())
    }
}

/// The wrapper at [`AGENT_COMMAND`]. Its paths can be overridden by `CISCALE_AGENT_ENV`, `CISCALE_RUNNER_HOME`,
/// `CISCALE_RUNNER_USER` and `CISCALE_POWEROFF` (for tests; ciscale sets none of them). The env file is read
/// line by line and each value exported verbatim (`KEY=value`, everything after the first `=`): it is never
/// sourced, so no value is ever evaluated by the shell.
pub const WRAPPER_SCRIPT: &str = r#"#!/bin/sh
# Written by ciscale: starts the GitHub Actions runner with its just-in-time config, once.
set -eu
env_file="${CISCALE_AGENT_ENV:-/run/ciscale/agent.env}"
runner_home="${CISCALE_RUNNER_HOME:-/opt/actions-runner}"
runner_user="${CISCALE_RUNNER_USER:-runner}"
poweroff_command="${CISCALE_POWEROFF:-poweroff}"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        '' | '#'*) continue ;;
    esac
    export "${line%%=*}=${line#*=}"
done < "$env_file"
rm -f "$env_file"
# The config goes to the runner once, under the name it reads and then scrubs.
unset CISCALE_AGENT_TOKEN
if [ -z "${ACTIONS_RUNNER_INPUT_JITCONFIG:-}" ]; then
    echo "ciscale-agent: no ACTIONS_RUNNER_INPUT_JITCONFIG in $env_file" >&2
    $poweroff_command
    exit 1
fi
cd "$runner_home"
status=0
if [ "$(id -u)" = 0 ] && [ "$runner_user" != root ]; then
    runuser -u "$runner_user" -- ./run.sh || status=$?
else
    ./run.sh || status=$?
fi
# One job, then the instance goes.
$poweroff_command
exit "$status"
"#;

/// The script that installs `release` and the wrapper on a Debian/Ubuntu machine (run as root, by `ciscale
/// provision` in a container image or by cloud-init on a server). It fails, installing nothing, when the download
/// does not match the pinned checksum.
pub fn install_script(release: &RunnerRelease) -> String {
    format!(
        r#"#!/bin/sh
# Written by ciscale: installs the GitHub Actions runner {version} and ciscale's wrapper.
set -eu
if ! command -v curl >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates
fi
id {user} >/dev/null 2>&1 || useradd --create-home --shell /bin/sh {user}
archive="$(mktemp)"
curl -fsSL --retry 5 -o "$archive" '{url}'
echo '{sha256}  '"$archive" | sha256sum -c -
mkdir -p {home}
tar -xzf "$archive" -C {home}
rm -f "$archive"
{home}/bin/installdependencies.sh
chown -R {user}:{user} {home}
mkdir -p "$(dirname {command})"
cat > {command} <<'CISCALE_WRAPPER'
{wrapper}CISCALE_WRAPPER
chmod 0755 {command}
"#,
        version = release.version,
        user = RUNNER_USER,
        url = release.url(),
        sha256 = release.sha256,
        home = RUNNER_HOME,
        command = AGENT_COMMAND,
        wrapper = WRAPPER_SCRIPT,
    )
}

/// Keeps the runner user (and so every job) away from the cloud metadata endpoint, which serves the user data.
fn metadata_block_script() -> String {
    format!(
        r#"#!/bin/sh
# Written by ciscale: jobs run as `{user}` and must not read the user data (it holds the runner's config).
set -eu
if command -v iptables >/dev/null 2>&1; then
    iptables -I OUTPUT -d {address} -m owner --uid-owner {user} -j REJECT
else
    nft add table inet ciscale
    nft add chain inet ciscale output '{{ type filter hook output priority 0; }}'
    nft add rule inet ciscale output meta skuid {user} ip daddr {address} reject
fi
"#,
        user = RUNNER_USER,
        address = METADATA_ADDRESS,
    )
}

const INSTALL_PATH: &str = "/usr/local/sbin/ciscale-runner-install";
const BLOCK_PATH: &str = "/usr/local/sbin/ciscale-metadata-block";

/// The cloud-config document that makes a fresh Debian/Ubuntu server run one GitHub runner: `env_file` is the
/// agent env file (it holds the runner's config; written 0400 for root, read and deleted by the wrapper).
pub fn cloud_user_data(release: &RunnerRelease, env_file: &Secret) -> Result<Secret, String> {
    let command = |parts: &[&str]| parts.iter().map(|part| (*part).to_owned()).collect::<Vec<_>>();
    let document = CloudConfig {
        write_files: vec![
            RootFile::new(ENV_FILE, "0400", env_file.expose().to_owned()),
            RootFile::new(INSTALL_PATH, "0700", install_script(release)),
            RootFile::new(BLOCK_PATH, "0700", metadata_block_script()),
        ],
        runcmd: vec![
            command(&[INSTALL_PATH]),
            command(&[BLOCK_PATH]),
            command(&["systemd-run", "--unit", "ciscale-runner", "--collect", AGENT_COMMAND]),
        ],
    };
    document.user_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_pinned_per_architecture() {
        let x64 = RunnerRelease::for_arch(RunnerArch::X64).expect("x64");
        assert_eq!(
            x64.url(),
            "https://github.com/actions/runner/releases/download/v2.329.0/actions-runner-linux-x64-2.329.0.tar.gz"
        );
        assert!(RunnerRelease::for_arch(RunnerArch::Arm64).expect("arm64").file_name().contains("-arm64-"));
        assert!(RunnerRelease::for_arch(RunnerArch::Arm).is_none());
        for release in RUNNER_RELEASES {
            assert_eq!(release.sha256.len(), 64);
            assert!(release.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn the_install_script_checks_the_download_before_unpacking_it() {
        let release = RunnerRelease::for_arch(RunnerArch::X64).expect("x64");
        let script = install_script(release);
        let check = script.find("sha256sum -c").expect("checksum");
        let unpack = script.find("tar -xzf").expect("unpack");
        assert!(check < unpack, "checked before unpacked");
        assert!(script.contains(release.sha256) && script.contains(&release.url()));
        assert!(script.contains(WRAPPER_SCRIPT), "the wrapper is installed verbatim");
    }
}
