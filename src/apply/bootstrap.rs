//! What an agent needs to start: its credential and environment, as one `KEY=value` env file. The file is pushed
//! into container instances (mode 0400) or handed to a cloud instance as user data; the real cloud-init comes
//! with the cloud backends, this is the payload it will carry.

use std::collections::BTreeMap;

use crate::model::{AgentSpec, CiKind, Secret};
use crate::providers::AgentCredential;

/// Where the credential file goes inside a container instance.
pub const CREDENTIAL_PATH: &str = "/run/ciscale/agent.env";
/// Permission bits of the credential file: readable by its owner (root) only.
pub const CREDENTIAL_MODE: u32 = 0o400;
/// The wrapper started inside a container instance; it reads [`CREDENTIAL_PATH`] and runs the CI's agent.
pub const AGENT_COMMAND: &str = "/usr/local/bin/ciscale-agent";
/// The env key holding the agent's own token.
pub const TOKEN_ENV: &str = "CISCALE_AGENT_TOKEN";
/// The env key holding the agent's CI-side id.
pub const AGENT_ID_ENV: &str = "CISCALE_AGENT_ID";

/// Why an env file could not be written. Never holds a value: values may be secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("agent env key `{key}` is not a valid variable name\nhint: use letters, digits and `_`, not starting with a digit")]
    InvalidKey { key: String },
    #[error("value of agent env `{key}` contains a line break or NUL, which an env file cannot hold")]
    InvalidValue { key: String },
}

/// The agent's env file: the pool's plain `env`, the CI's connection env, the pool's `secret_env` and the
/// agent's own id and token, one `KEY=value` a line, sorted by key. On a clash the later source wins (a secret
/// overrides a plain value; nobody overrides the token).
pub fn bootstrap_env(agent: &AgentSpec, credential: &AgentCredential) -> Result<Secret, BootstrapError> {
    agent_env_file(agent, credential, None)
}

/// The env key the CI's own agent reads its token from, when it is not [`TOKEN_ENV`]: the agent container of a
/// cloud instance is the CI's stock image, with no ciscale wrapper to translate.
pub fn native_token_env(kind: &CiKind) -> Option<&'static str> {
    match kind {
        CiKind::Woodpecker { .. } => Some("WOODPECKER_AGENT_SECRET"),
        CiKind::AzurePipelines { .. } => Some("AZP_TOKEN"),
        CiKind::Fake(_) => None,
    }
}

/// [`bootstrap_env`], plus the agent's token under `native_token_env` too (see [`native_token_env`]). The pool's
/// `secret_env` may set that key itself (a pre-shared agent secret) and then wins.
pub fn agent_env_file(
    agent: &AgentSpec,
    credential: &AgentCredential,
    native_token_env: Option<&str>,
) -> Result<Secret, BootstrapError> {
    let mut entries: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in &agent.env {
        entries.insert(key, value);
    }
    for (key, value) in &credential.env {
        entries.insert(key, value);
    }
    if let Some(key) = native_token_env {
        entries.insert(key, credential.token.expose());
    }
    for (key, value) in &agent.secret_env {
        entries.insert(key, value.expose());
    }
    entries.insert(AGENT_ID_ENV, credential.agent_id.as_str());
    entries.insert(TOKEN_ENV, credential.token.expose());

    let mut text = String::new();
    for (key, value) in entries {
        let valid_key = key.chars().next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(BootstrapError::InvalidKey { key: key.to_owned() });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(BootstrapError::InvalidValue { key: key.to_owned() });
        }
        text.push_str(key);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    Ok(Secret::new(text))
}
