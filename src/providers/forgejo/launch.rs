//! How a Forgejo agent is started by default, as data for the launch step (which apply wires per CI source):
//! one `forgejo-runner one-job` process for one job, fed by the credential [`Forgejo::register`] returned
//! (`FORGEJO_URL`, `FORGEJO_RUNNER_UUID`, `FORGEJO_RUNNER_LABELS`, `FORGEJO_RUNNER_HANDLE` and the token), after
//! which the machine powers itself off.
//!
//! - **Containers (Incus)**: the image is made by `ciscale provision` with [`provision_script`] (installs the
//!   runner binary from `AGENT_URL`, checked against `AGENT_SHA256` when given, and the wrapper); apply pushes the
//!   credential as the usual 0400 env file and execs the wrapper ([`AGENT_COMMAND`]), which moves the token into
//!   a 0400 file of its own for `--token-url file:…`, removes the env file, runs the job and powers off.
//! - **Cloud servers (Hetzner, EC2)**: [`cloud_init`] writes the env file (0400) and the same wrapper; at boot it
//!   downloads the pinned runner release, refuses it unless its SHA-256 matches, runs it as the unprivileged user
//!   [`RUNNER_USER`] (token file owned by that user, 0400), with the cloud metadata endpoint (which serves the
//!   user data, token included) closed to that user.
//!
//! The command line ([`one_job_args`]) is what Forgejo's runner 12.8 and later take (Andreas Ahlenstorf,
//! "Autoscaling Forgejo Runner", 2026; the runner's `internal/app/cmd`): `one-job --url --uuid --token-url
//! --label… --handle --wait`. `--token-url file:PATH` reads the token from a file that holds nothing else
//! (`config.ResolveSecretURL`), which is why the env file is not handed over as it is.
//!
//! No release checksum is built in: none could be checked against the real release files from here, and a
//! wrong one would stop every boot (or, worse, be trusted). The release to run is named with its checksum
//! ([`RunnerRelease`]), by the user or the config that wires this in.
//!
//! [`Forgejo::register`]: super::Forgejo

use std::fmt;

use super::{HANDLE_ENV, LABELS_ENV, TOKEN_ENV, URL_ENV, UUID_ENV};
use crate::model::Secret;
use crate::providers::cloud_config::{CloudConfig, RootFile};

/// The oldest runner with `one-job --handle` (and `--uuid`/`--token-url` without a registration file).
pub const MIN_RUNNER_VERSION: &str = "12.8.0";
/// Where the runner binary is installed.
pub const RUNNER_BINARY: &str = "/usr/local/bin/forgejo-runner";
/// The wrapper the image and the cloud-init install; apply's container launch execs this path.
pub const AGENT_COMMAND: &str = crate::providers::CONTAINER_AGENT_COMMAND;
/// Where a container gets its credential (apply's push, mode 0400).
pub const CONTAINER_ENV_FILE: &str = "/run/ciscale/agent.env";
/// Where a cloud server gets its credential (cloud-init's `write_files`, mode 0400).
pub const CLOUD_ENV_FILE: &str = "/etc/ciscale/agent.env";
/// The token alone, for `--token-url file:…`; mode 0400, removed when the job is done.
pub const TOKEN_FILE: &str = "/run/ciscale/forgejo-runner.token";
/// The unprivileged user the runner runs as on a cloud server.
pub const RUNNER_USER: &str = "forgejo-runner";
/// The link-local address clouds serve instance metadata and user data on.
const METADATA_ADDRESS: &str = "169.254.169.254";

/// Why launch data could not be made. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "runner version `{0}` is not a release version\nhint: write it as `12.10.1` (at least {MIN_RUNNER_VERSION})"
    )]
    Version(String),
    #[error("runner version `{0}` is older than {MIN_RUNNER_VERSION}, the first with `one-job --handle`")]
    TooOld(String),
    #[error("`{0}` is not a SHA-256 digest\nhint: 64 hexadecimal digits, from the release's `.sha256` file")]
    Checksum(String),
    #[error("the credential lacks `{0}`")]
    Missing(&'static str),
    #[error("cannot write the cloud-init document: {0}")]
    Serialize(String),
}

/// A CPU architecture Forgejo publishes runner binaries for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        })
    }
}

/// A pinned runner release: what a cloud server downloads and the digest it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRelease {
    version: String,
    arch: Arch,
    sha256: String,
}

impl RunnerRelease {
    pub fn new(version: &str, arch: Arch, sha256: &str) -> Result<Self, LaunchError> {
        let version = version.trim().trim_start_matches('v');
        let parts: Vec<u64> = version
            .split('.')
            .map(|part| part.parse::<u64>().map_err(|_| LaunchError::Version(version.to_owned())))
            .collect::<Result<_, _>>()?;
        if parts.len() != 3 {
            return Err(LaunchError::Version(version.to_owned()));
        }
        if (parts[0], parts[1]) < (12, 8) {
            return Err(LaunchError::TooOld(version.to_owned()));
        }
        let sha256 = sha256.trim().to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(LaunchError::Checksum(sha256));
        }
        Ok(Self { version: version.to_owned(), arch, sha256 })
    }

    /// The release asset (the pattern of Forgejo's release page,
    /// `code.forgejo.org/forgejo/runner/releases/download/v12.10.1/forgejo-runner-12.10.1-linux-amd64`).
    pub fn url(&self) -> String {
        format!(
            "https://code.forgejo.org/forgejo/runner/releases/download/v{v}/forgejo-runner-{v}-linux-{arch}",
            v = self.version,
            arch = self.arch
        )
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The runner's arguments (after the binary) for a credential's env: `one-job --url U --uuid I --token-url
/// file:T --wait [--handle H] [--label L]…`. The same order the wrapper builds.
pub fn one_job_args(
    env: &std::collections::BTreeMap<String, String>,
    token_file: &str,
) -> Result<Vec<String>, LaunchError> {
    let get = |key: &'static str| env.get(key).filter(|value| !value.is_empty());
    let url = get(URL_ENV).ok_or(LaunchError::Missing(URL_ENV))?;
    let uuid = get(UUID_ENV).ok_or(LaunchError::Missing(UUID_ENV))?;
    let mut args = vec![
        "one-job".to_owned(),
        "--url".to_owned(),
        url.clone(),
        "--uuid".to_owned(),
        uuid.clone(),
        "--token-url".to_owned(),
        format!("file:{token_file}"),
        "--wait".to_owned(),
    ];
    if let Some(handle) = get(HANDLE_ENV) {
        args.extend(["--handle".to_owned(), handle.clone()]);
    }
    for label in get(LABELS_ENV).map(|labels| labels.split(',')).into_iter().flatten() {
        args.extend(["--label".to_owned(), label.to_owned()]);
    }
    Ok(args)
}

/// Where the wrapper finds things and how it ends; [`WrapperPaths::CONTAINER`] and [`WrapperPaths::CLOUD`] are
/// the real ones (tests point them elsewhere).
#[derive(Debug, Clone)]
pub struct WrapperPaths {
    pub env_file: String,
    pub token_file: String,
    pub runner: String,
    /// Run the runner as this user (the token file is handed to it); `None`: as the wrapper's user.
    pub user: Option<String>,
    /// The command that ends the machine once the job is done.
    pub poweroff: String,
}

impl WrapperPaths {
    /// An Incus container: root inside an unprivileged container; `poweroff -f` ends it (and deletes an ephemeral
    /// one), also on busybox images without an init that would handle a plain `poweroff`.
    pub fn container() -> Self {
        Self {
            env_file: CONTAINER_ENV_FILE.to_owned(),
            token_file: TOKEN_FILE.to_owned(),
            runner: RUNNER_BINARY.to_owned(),
            user: None,
            poweroff: "poweroff -f".to_owned(),
        }
    }

    /// A cloud server: the runner runs as [`RUNNER_USER`]; a clean `poweroff` stops the server, which the
    /// planner then deletes.
    pub fn cloud() -> Self {
        Self {
            env_file: CLOUD_ENV_FILE.to_owned(),
            token_file: TOKEN_FILE.to_owned(),
            runner: RUNNER_BINARY.to_owned(),
            user: Some(RUNNER_USER.to_owned()),
            poweroff: "poweroff".to_owned(),
        }
    }
}

/// Single quotes for the shell: the paths are ciscale's constants, but a test's temporary directory may hold
/// anything.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The wrapper script (POSIX sh): reads the env file line by line (values are taken literally, never evaluated),
/// removes it, writes the token alone into the token file (mode 0400), runs the one job, removes the token file
/// and powers off. Exits with the runner's status when the poweroff command returns.
pub fn agent_wrapper(paths: &WrapperPaths) -> String {
    let (run_as, hand_over) = match &paths.user {
        Some(user) => (format!("runuser -u {} -- ", quoted(user)), format!("chown {} \"$token_file\"\n", quoted(user))),
        None => (String::new(), String::new()),
    };
    format!(
        r#"#!/bin/sh
# Written by ciscale: one forgejo-runner for one job, then this machine goes.
set -eu
env_file={env_file}
token_file={token_file}
url= uuid= handle= labels= token=
while IFS= read -r line || [ -n "$line" ]; do
    key=${{line%%=*}}
    value=${{line#*=}}
    case $key in
        {URL_ENV}) url=$value ;;
        {UUID_ENV}) uuid=$value ;;
        {HANDLE_ENV}) handle=$value ;;
        {LABELS_ENV}) labels=$value ;;
        {TOKEN_ENV}) token=$value ;;
    esac
done < "$env_file"
rm -f "$env_file"
if [ -z "$url" ] || [ -z "$uuid" ] || [ -z "$token" ]; then
    echo "ciscale: $env_file lacks the runner's url, uuid or token" >&2
    exit 1
fi
mkdir -p "$(dirname "$token_file")"
(umask 0277 && printf '%s' "$token" > "$token_file")
token=
{hand_over}set -- one-job --url "$url" --uuid "$uuid" --token-url "file:$token_file" --wait
if [ -n "$handle" ]; then
    set -- "$@" --handle "$handle"
fi
set -f
old_ifs=$IFS
IFS=,
for label in $labels; do
    set -- "$@" --label "$label"
done
IFS=$old_ifs
set +f
status=0
{run_as}{runner} "$@" || status=$?
rm -f "$token_file"
{poweroff} || true
exit "$status"
"#,
        env_file = quoted(&paths.env_file),
        token_file = quoted(&paths.token_file),
        runner = quoted(&paths.runner),
        poweroff = paths.poweroff,
    )
}

/// The `ciscale provision` script of a Forgejo image: installs the runner from `AGENT_URL` (checked against
/// `AGENT_SHA256` when set) and the container wrapper at [`AGENT_COMMAND`].
pub fn provision_script() -> String {
    format!(
        r#"#!/bin/sh
# Written by ciscale: a Forgejo runner image (forgejo-runner {MIN_RUNNER_VERSION} or later from AGENT_URL).
set -eu
: "${{AGENT_URL:?AGENT_URL names the forgejo-runner binary to install}}"
download=$(mktemp)
if command -v curl >/dev/null 2>&1; then curl -fsSL --retry 5 -o "$download" "$AGENT_URL"; else wget -qO "$download" "$AGENT_URL"; fi
if [ -n "${{AGENT_SHA256:-}}" ]; then
    echo "$AGENT_SHA256  $download" | sha256sum -c -
fi
install -m 0755 "$download" {RUNNER_BINARY}
rm -f "$download"
{RUNNER_BINARY} one-job --help >/dev/null
mkdir -p "$(dirname {AGENT_COMMAND})"
cat > {AGENT_COMMAND} <<'CISCALE_WRAPPER'
{wrapper}CISCALE_WRAPPER
chmod 0755 {AGENT_COMMAND}
"#,
        wrapper = agent_wrapper(&WrapperPaths::container()),
    )
}

/// The cloud-config of a cloud server that runs one Forgejo job: the env file (mode 0400, root) from
/// `env_file` (the credential as apply writes it), and a boot script that creates [`RUNNER_USER`], closes the
/// metadata endpoint to it, installs Docker when a label asks for `docker://`, downloads `release` and refuses
/// it unless its SHA-256 matches, then runs the wrapper.
pub fn cloud_init(release: &RunnerRelease, env_file: &Secret) -> Result<Secret, LaunchError> {
    const BOOT_SCRIPT: &str = "/usr/local/sbin/ciscale-forgejo-boot";
    let boot = format!(
        r#"#!/bin/sh
# Written by ciscale: prepares this server for one Forgejo job. Runs once, from cloud-init.
set -eu
id -u {RUNNER_USER} >/dev/null 2>&1 || useradd --system --create-home --shell /usr/sbin/nologin {RUNNER_USER}
# The user data (the runner's token) must stay out of the job's reach.
iptables -C OUTPUT -m owner --uid-owner {RUNNER_USER} -d {METADATA_ADDRESS}/32 -j REJECT 2>/dev/null \
    || iptables -I OUTPUT -m owner --uid-owner {RUNNER_USER} -d {METADATA_ADDRESS}/32 -j REJECT
if grep -q '^{LABELS_ENV}=.*:docker' {CLOUD_ENV_FILE}; then
    command -v docker >/dev/null 2>&1 || curl -fsSL --retry 5 https://get.docker.com | sh
    usermod -aG docker {RUNNER_USER}
fi
download=$(mktemp)
curl -fsSL --retry 5 -o "$download" '{url}'
echo '{sha256}  '"$download" | sha256sum -c -
install -m 0755 "$download" {RUNNER_BINARY}
rm -f "$download"
exec {AGENT_COMMAND}
"#,
        url = release.url(),
        sha256 = release.sha256(),
    );
    let document = CloudConfig {
        write_files: vec![
            RootFile::new(CLOUD_ENV_FILE, "0400", env_file.expose().to_owned()),
            RootFile::new(AGENT_COMMAND, "0755", agent_wrapper(&WrapperPaths::cloud())),
            RootFile::new(BOOT_SCRIPT, "0700", boot),
        ],
        runcmd: vec![vec![BOOT_SCRIPT.to_owned()]],
    };
    document.user_data().map_err(LaunchError::Serialize)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn env() -> BTreeMap<String, String> {
        BTreeMap::from([
            (URL_ENV.to_owned(), "https://forgejo.example.com".to_owned()),
            (UUID_ENV.to_owned(), "d4637a60-7fea-4075-a81c-7e4ae01bdf0d".to_owned()),
            (HANDLE_ENV.to_owned(), "33ba7d51-59c6-44f8-9d2b-1b94f4033973".to_owned()),
            (LABELS_ENV.to_owned(), "debian:docker://node:22-bookworm,linux:host".to_owned()),
        ])
    }

    #[test]
    fn releases_are_pinned_with_a_digest_and_new_enough() {
        let release = RunnerRelease::new("v12.10.1", Arch::Amd64, &SHA.to_uppercase()).expect("release");
        assert_eq!(
            release.url(),
            "https://code.forgejo.org/forgejo/runner/releases/download/v12.10.1/forgejo-runner-12.10.1-linux-amd64"
        );
        assert_eq!(release.sha256(), SHA);
        assert_eq!(RunnerRelease::new("12.7.3", Arch::Amd64, SHA), Err(LaunchError::TooOld("12.7.3".into())));
        assert!(matches!(RunnerRelease::new("latest", Arch::Arm64, SHA), Err(LaunchError::Version(_))));
        assert!(matches!(RunnerRelease::new("12.10", Arch::Arm64, SHA), Err(LaunchError::Version(_))));
        assert!(matches!(RunnerRelease::new("12.10.1", Arch::Arm64, "abc"), Err(LaunchError::Checksum(_))));
    }

    #[test]
    fn the_command_line_binds_the_job_and_names_every_label() {
        let args = one_job_args(&env(), TOKEN_FILE).expect("args");
        assert_eq!(
            args.join(" "),
            "one-job --url https://forgejo.example.com --uuid d4637a60-7fea-4075-a81c-7e4ae01bdf0d --token-url \
             file:/run/ciscale/forgejo-runner.token --wait --handle 33ba7d51-59c6-44f8-9d2b-1b94f4033973 --label \
             debian:docker://node:22-bookworm --label linux:host"
        );
        let mut unbound = env();
        unbound.remove(HANDLE_ENV);
        unbound.remove(LABELS_ENV);
        assert!(!one_job_args(&unbound, TOKEN_FILE).expect("args").contains(&"--handle".to_owned()));
        unbound.remove(UUID_ENV);
        assert_eq!(one_job_args(&unbound, TOKEN_FILE), Err(LaunchError::Missing(UUID_ENV)));
    }

    /// Runs the real wrapper with a stub runner that records what it was given: the argv must be
    /// [`one_job_args`]'s, the token must be in a 0400 file of its own while the job runs, and the env file and
    /// the token file must be gone afterwards.
    #[test]
    fn the_wrapper_runs_the_one_job_with_the_token_in_a_file_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let token = "e1f3d26e034687a2b6856c4c6c3d87a469ff3bea";
        let mut env_text: String = env().iter().map(|(key, value)| format!("{key}={value}\n")).collect();
        // Values are taken literally: nothing here may be evaluated.
        env_text.push_str(&format!("{TOKEN_ENV}={token}\nOTHER=$(touch {})\n", path("evaluated")));
        std::fs::write(path("agent.env"), env_text).expect("env file");
        let stub = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {args}\nstat -c %a {token_file} > {mode}\ncat {token_file} > {seen}\nexit 3\n",
            args = path("args"),
            token_file = path("run/token"),
            mode = path("mode"),
            seen = path("seen"),
        );
        std::fs::write(path("runner"), stub).expect("stub");
        std::fs::set_permissions(path("runner"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let script = agent_wrapper(&WrapperPaths {
            env_file: path("agent.env"),
            token_file: path("run/token"),
            runner: path("runner"),
            user: None,
            poweroff: format!("touch {}", path("powered-off")),
        });
        let status = std::process::Command::new("sh").arg("-c").arg(&script).status().expect("sh");
        assert_eq!(status.code(), Some(3), "the runner's exit status comes back");

        let args = std::fs::read_to_string(path("args")).expect("args");
        let expected = one_job_args(&env(), &path("run/token")).expect("args");
        assert_eq!(args.lines().collect::<Vec<_>>(), expected);
        assert_eq!(std::fs::read_to_string(path("mode")).expect("mode").trim(), "400");
        assert_eq!(std::fs::read_to_string(path("seen")).expect("seen"), token, "the file holds the token alone");
        assert!(!dir.path().join("agent.env").exists(), "the env file is removed");
        assert!(!dir.path().join("run/token").exists(), "the token file is removed");
        assert!(dir.path().join("powered-off").exists());
        assert!(!dir.path().join("evaluated").exists(), "env values are never evaluated");
    }

    #[test]
    fn the_wrapper_refuses_an_env_file_without_a_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env_path = dir.path().join("agent.env");
        std::fs::write(&env_path, "FORGEJO_URL=https://x\nFORGEJO_RUNNER_UUID=u\n").expect("env");
        let script = agent_wrapper(&WrapperPaths {
            env_file: env_path.display().to_string(),
            token_file: dir.path().join("token").display().to_string(),
            runner: "/bin/false".to_owned(),
            user: None,
            poweroff: "true".to_owned(),
        });
        let output = std::process::Command::new("sh").arg("-c").arg(&script).output().expect("sh");
        assert_eq!(output.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&output.stderr).contains("lacks the runner's url, uuid or token"));
    }

    #[test]
    fn scripts_are_valid_shell() {
        for script in
            [provision_script(), agent_wrapper(&WrapperPaths::container()), agent_wrapper(&WrapperPaths::cloud())]
        {
            let output = std::process::Command::new("sh").arg("-n").arg("-c").arg(&script).output().expect("sh");
            assert!(output.status.success(), "{}\n{script}", String::from_utf8_lossy(&output.stderr));
        }
        assert!(provision_script().contains("sha256sum -c"));
    }

    #[test]
    fn cloud_init_pins_the_release_and_runs_unprivileged() {
        let release = RunnerRelease::new("12.10.1", Arch::Arm64, SHA).expect("release");
        let token = "e1f3d26e034687a2b6856c4c6c3d87a469ff3bea";
        let env_file = Secret::new(format!("{TOKEN_ENV}={token}\n{URL_ENV}=https://x\n"));
        let document = cloud_init(&release, &env_file).expect("cloud-init");
        let text = document.expose();
        assert!(text.starts_with("#cloud-config\n"));
        let parsed: serde_yaml::Value = serde_yaml::from_str(text).expect("YAML");
        let files = parsed["write_files"].as_sequence().expect("write_files");
        let file = |path: &str| {
            files.iter().find(|file| file["path"].as_str() == Some(path)).unwrap_or_else(|| panic!("{path} is written"))
        };
        assert_eq!(file(CLOUD_ENV_FILE)["permissions"].as_str(), Some("0400"));
        let boot = file("/usr/local/sbin/ciscale-forgejo-boot")["content"].as_str().expect("boot");
        assert!(boot.contains(&release.url()) && boot.contains(&format!("echo '{SHA}  '")), "{boot}");
        assert!(boot.contains("sha256sum -c -"));
        assert!(boot.contains(&format!("--uid-owner {RUNNER_USER} -d {METADATA_ADDRESS}/32 -j REJECT")));
        let wrapper = file(AGENT_COMMAND)["content"].as_str().expect("wrapper");
        assert!(wrapper.contains(&format!("runuser -u '{RUNNER_USER}' -- '{RUNNER_BINARY}'")), "{wrapper}");
        // The token is in the env file's content and nowhere else in the document.
        assert_eq!(text.matches(token).count(), 1);
        assert!(!format!("{document:?}").contains(token));
    }
}
