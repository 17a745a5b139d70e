//! What an agent needs to start: its credential and environment, as one `KEY=value` env file. The file is pushed
//! into container instances (mode 0400) or handed to a cloud instance as user data; the real cloud-init comes
//! with the cloud backends, this is the payload it will carry.

use std::collections::BTreeMap;

use crate::model::{AgentSpec, Secret};
use crate::providers::{AgentCredential, TOKEN_ENV_NAME_KEY};

/// Where the credential file goes inside a container instance.
pub const CREDENTIAL_PATH: &str = "/run/ciscale/agent.env";
/// Permission bits of the credential file: readable by its owner (root) only.
pub const CREDENTIAL_MODE: u32 = 0o400;
/// The wrapper started inside a container instance; it reads [`CREDENTIAL_PATH`] and runs the CI's agent.
pub const AGENT_COMMAND: &str = crate::providers::CONTAINER_AGENT_COMMAND;
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

/// [`bootstrap_env`], plus the agent's token under the name the CI's own agent reads it from: `native_token_env`,
/// else the one the CI source announced in the credential ([`TOKEN_ENV_NAME_KEY`]; Woodpecker:
/// `WOODPECKER_AGENT_SECRET`). The agent container of a cloud instance is the CI's stock image, with no ciscale
/// wrapper to translate. The pool's `secret_env` may set that key itself (a pre-shared agent secret) and then wins.
pub fn agent_env_file(
    agent: &AgentSpec,
    credential: &AgentCredential,
    native_token_env: Option<&str>,
) -> Result<Secret, BootstrapError> {
    let mut entries: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in &agent.env {
        entries.insert(key, value);
    }
    for (key, value) in credential.env.iter().filter(|(key, _)| key.as_str() != TOKEN_ENV_NAME_KEY) {
        entries.insert(key, value);
    }
    let native_token_env = native_token_env.or(credential.env.get(TOKEN_ENV_NAME_KEY).map(String::as_str));
    // A pre-registered agent (Picus mode) has no token of its own: its shared secret is in `secret_env`.
    let token = Some(credential.token.expose()).filter(|token| !token.is_empty());
    if let (Some(key), Some(token)) = (native_token_env, token) {
        entries.insert(key, token);
    }
    for (key, value) in &agent.secret_env {
        entries.insert(key, value.expose());
    }
    entries.insert(AGENT_ID_ENV, credential.agent_id.as_str());
    if let Some(token) = token {
        entries.insert(TOKEN_ENV, token);
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AgentId;

    #[test]
    fn token_is_also_written_under_the_name_the_ci_agent_reads() {
        let credential = AgentCredential {
            agent_id: AgentId::new("7"),
            token: Secret::new("tok"),
            env: BTreeMap::from([
                (TOKEN_ENV_NAME_KEY.to_owned(), "WOODPECKER_AGENT_SECRET".to_owned()),
                ("WOODPECKER_SERVER".to_owned(), "ci:9000".to_owned()),
            ]),
        };
        let agent = AgentSpec { image: None, env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None };
        let file = bootstrap_env(&agent, &credential).expect("env file");
        let lines: Vec<&str> = file.expose().lines().collect();
        assert!(lines.contains(&"WOODPECKER_AGENT_SECRET=tok"), "{lines:?}");
        assert!(lines.contains(&"CISCALE_AGENT_TOKEN=tok"), "{lines:?}");
        assert!(lines.contains(&"WOODPECKER_SERVER=ci:9000"), "{lines:?}");
    }
}
