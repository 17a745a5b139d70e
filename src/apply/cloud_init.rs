//! The cloud-init user data that turns a fresh cloud server (Hetzner, EC2) into a CI agent, for CI sources whose
//! launch is an agent container ([`crate::providers::CloudLaunch::Docker`]; the image is the pool's or the CI's
//! default): install Docker if the image lacks it, block the cloud metadata endpoint for containers, and run the
//! agent container from the env file [`super::agent_env_file`] wrote.
//!
//! Quoting is by construction, not by escaping: the document is serialised as YAML by a YAML serialiser, the env
//! values reach Docker through `--env-file` (which takes everything after the first `=` literally, so spaces,
//! quotes and `$` survive; line breaks are refused earlier), and the only value on a command line, the image
//! reference, is checked against Docker's reference grammar and single-quoted. Secrets live only in the env file
//! section: mode 0600, root-owned, removed once the container is created (Docker keeps the env in the container's
//! config, so the restart policy does not need the file).

use crate::model::Secret;
use crate::providers::cloud_config::{CloudConfig, RootFile};

/// The image [`cloud_init`] runs when given none: Woodpecker's. Apply never relies on it: it passes the pool's
/// `agent.image` or the default of the pool's CI source ([`crate::providers::CloudLaunch::Docker`]).
pub const DEFAULT_AGENT_IMAGE: &str = crate::providers::woodpecker::AGENT_IMAGE;
/// Where the env file is written on the server (removed after `docker run`).
pub const AGENT_ENV_PATH: &str = "/etc/ciscale/agent.env";
/// The name of the agent container.
pub const AGENT_CONTAINER: &str = "ciscale-agent";
/// The link-local address clouds serve instance metadata (and user data, which holds the agent token) on.
pub const METADATA_ADDRESS: &str = "169.254.169.254";

const START_SCRIPT_PATH: &str = "/usr/local/sbin/ciscale-agent-start";
const BLOCK_SCRIPT_PATH: &str = "/usr/local/sbin/ciscale-metadata-block";
const BLOCK_UNIT_PATH: &str = "/etc/systemd/system/ciscale-metadata-block.service";

/// Why user data could not be written. Never holds a value: values may be secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudInitError {
    #[error(
        "agent image `{image}` is not a valid image reference\nhint: e.g. `woodpeckerci/woodpecker-agent:v3` or \
         `registry.example.com/agent@sha256:...`"
    )]
    InvalidImage { image: String },
    #[error("cannot write the cloud-init document: {0}")]
    Serialize(String),
}

/// The cloud-config document that runs `image` with the env file `env_file` (as [`super::bootstrap_env`] writes
/// it). `image` of `None` is [`DEFAULT_AGENT_IMAGE`].
pub fn cloud_init(image: Option<&str>, env_file: &Secret) -> Result<Secret, CloudInitError> {
    let image = image.map(str::trim).filter(|image| !image.is_empty()).unwrap_or(DEFAULT_AGENT_IMAGE);
    if !is_image_reference(image) {
        return Err(CloudInitError::InvalidImage { image: image.to_owned() });
    }
    let quoted_image = format!("'{image}'");
    let start_script = format!(
        r#"#!/bin/sh
# Written by ciscale: runs the CI agent container. Runs once, from cloud-init.
set -eu
if ! command -v docker >/dev/null 2>&1; then
    curl -fsSL --retry 5 https://get.docker.com | sh
fi
systemctl daemon-reload
systemctl enable ciscale-metadata-block.service
systemctl start ciscale-metadata-block.service
systemctl enable --now docker
# Again, now that Docker has (re)built its chains: the rule must be in place before the agent runs.
{BLOCK_SCRIPT_PATH}
attempt=0
until docker pull {quoted_image}; do
    attempt=$((attempt + 1))
    [ "$attempt" -lt 10 ] || exit 1
    sleep 10
done
docker rm -f {AGENT_CONTAINER} >/dev/null 2>&1 || true
docker run --detach --name {AGENT_CONTAINER} --restart always \
    --env-file {AGENT_ENV_PATH} \
    --volume /var/run/docker.sock:/var/run/docker.sock \
    {quoted_image}
rm -f {AGENT_ENV_PATH}
"#
    );
    // DOCKER-USER is the chain Docker leaves to the administrator and never flushes; creating it before Docker
    // starts (the unit runs before docker.service at boot) closes the window in which a restarted container
    // could reach the metadata service.
    let block_script = format!(
        r#"#!/bin/sh
# Written by ciscale: containers (build steps) must not read this server's user data, which holds the agent token.
set -eu
iptables -N DOCKER-USER 2>/dev/null || true
iptables -C DOCKER-USER -d {METADATA_ADDRESS}/32 -j REJECT 2>/dev/null \
    || iptables -I DOCKER-USER -d {METADATA_ADDRESS}/32 -j REJECT
"#
    );
    let block_unit = format!(
        "[Unit]\nDescription=ciscale: block the cloud metadata endpoint for containers\nBefore=docker.service\n\
         \n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={BLOCK_SCRIPT_PATH}\n\n[Install]\n\
         WantedBy=multi-user.target\n"
    );
    let document = CloudConfig {
        write_files: vec![
            RootFile::new(AGENT_ENV_PATH, "0600", env_file.expose().to_owned()),
            RootFile::new(BLOCK_SCRIPT_PATH, "0755", block_script),
            RootFile::new(BLOCK_UNIT_PATH, "0644", block_unit),
            RootFile::new(START_SCRIPT_PATH, "0700", start_script),
        ],
        runcmd: vec![vec![START_SCRIPT_PATH.to_owned()]],
    };
    document.user_data().map_err(CloudInitError::Serialize)
}

/// Docker's image reference grammar, loosely: `[registry[:port]/]path[:tag][@digest]` out of letters, digits and
/// `. _ - / : @ +`. Enough to keep quotes, spaces, `$` and line breaks off the command line.
fn is_image_reference(image: &str) -> bool {
    !image.is_empty()
        && image.len() <= 512
        && !image.starts_with(['-', '.', '/', ':', '@'])
        && image.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_are_checked() {
        for good in ["woodpeckerci/woodpecker-agent:v3", "localhost:5000/a/b@sha256:abcdef", "agent"] {
            assert!(is_image_reference(good), "{good}");
        }
        for bad in ["", "a b", "a'b", "a;rm -rf /", "$(id)", "-rm", "a\nb"] {
            assert!(!is_image_reference(bad), "{bad:?}");
        }
    }
}
