//! Picus compatibility: turns a Picus set-up's `PICUS_*` environment into the equivalent `ciscale.yaml`.
//!
//! `ciscale watch` with no config file and `PICUS_PROVIDER_TYPE` set runs from this translation, so a Picus
//! docker-compose file works unchanged; `ciscale import picus` prints it so a team can move to a config file.
//! Secrets are never copied into the YAML: it refers to the variables (`${PICUS_WOODPECKER_TOKEN}`), which the
//! config loader reads from the same environment.
//!
//! Picus's semantics are kept where they matter: one agent registered by hand (`PICUS_WOODPECKER_AGENT_ID`) that
//! runs on at most one server, `PICUS_MAX_IDLE_TIME` as the plain idle timeout (no billing-hour logic), Picus's
//! defaults (`cx11` in `nbg1` on the `docker-ce` image, 10s polls, 30m idle), and every `PICUS_AGENT_WOODPECKER_*`
//! variable forwarded to the agent as `WOODPECKER_*`.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

/// The variable that switches Picus mode on.
pub const PROVIDER_TYPE_VAR: &str = "PICUS_PROVIDER_TYPE";
const FORWARD_PREFIX: &str = "PICUS_AGENT_WOODPECKER_";
const FILTER_LABELS_VAR: &str = "PICUS_AGENT_WOODPECKER_FILTER_LABELS";

/// What is wrong with a Picus environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PicusError {
    #[error("`{name}` is not set; Picus mode needs it\nhint: {hint}")]
    Missing { name: &'static str, hint: &'static str },
    #[error("`PICUS_PROVIDER_TYPE` is `{value}`; Picus knows `hcloud` and `aws`")]
    UnknownProvider { value: String },
    #[error("`{FILTER_LABELS_VAR}` entry `{entry}` is not `key=value`\nhint: write e.g. `platform=linux/amd64,backend=docker,repo=*,org-id=*`")]
    BadFilterLabel { entry: String },
}

/// Whether the environment asks for Picus mode.
pub fn is_picus_env(vars: &BTreeMap<String, String>) -> bool {
    vars.get(PROVIDER_TYPE_VAR).is_some_and(|value| !value.trim().is_empty())
}

/// The `ciscale.yaml` equivalent of a Picus environment. Every value it needs from the environment is either copied
/// (plain settings) or referenced as `${VAR}` (secrets), so loading it with the same environment gives Picus's
/// behaviour.
pub fn config_from_env(vars: &BTreeMap<String, String>) -> Result<String, PicusError> {
    let get = |name: &str| vars.get(name).map(|value| value.trim()).filter(|value| !value.is_empty());
    let require = |name: &'static str, hint: &'static str| get(name).ok_or(PicusError::Missing { name, hint });

    let provider = require(PROVIDER_TYPE_VAR, "set it to `hcloud` or `aws`")?;
    let server = require("PICUS_WOODPECKER_SERVER", "the URL of the Woodpecker server, e.g. `https://ci.example.com`")?;
    require("PICUS_WOODPECKER_TOKEN", "a Woodpecker admin token (it reads `/api/queue/info`)")?;
    let agent_id = require(
        "PICUS_WOODPECKER_AGENT_ID",
        "the id of the agent registered in Woodpecker (Settings → Agents) whose secret the agent uses",
    )?;

    let mut root = Mapping::new();
    let (owner, backend) = match provider {
        "hcloud" => {
            require("PICUS_HCLOUD_TOKEN", "a Hetzner Cloud API token with read/write access")?;
            let id = get("PICUS_HCLOUD_ID").unwrap_or("picus-test");
            let mut backend = Mapping::new();
            insert(&mut backend, "kind", "hcloud");
            insert(&mut backend, "token", "${PICUS_HCLOUD_TOKEN}");
            // Picus deletes a server as soon as it has been idle for PICUS_MAX_IDLE_TIME, whatever the paid hour.
            (owner_id(id), backend)
        }
        "aws" => {
            let mut backend = Mapping::new();
            insert(&mut backend, "kind", "aws");
            if let Some(region) = get("AWS_REGION") {
                insert(&mut backend, "region", region);
            }
            ("picus".to_owned(), backend)
        }
        other => return Err(PicusError::UnknownProvider { value: other.to_owned() }),
    };
    insert(&mut root, "id", owner.as_str());
    insert(&mut root, "pollInterval", get("PICUS_POLL_INTERVAL").unwrap_or("10s"));

    let mut woodpecker = Mapping::new();
    insert(&mut woodpecker, "kind", "woodpecker");
    insert(&mut woodpecker, "server", &escape(server));
    insert(&mut woodpecker, "token", "${PICUS_WOODPECKER_TOKEN}");
    root.insert("ci".into(), Value::Mapping(single("woodpecker", woodpecker)));
    root.insert("backends".into(), Value::Mapping(single(provider, backend)));

    let mut pool = Mapping::new();
    insert(&mut pool, "name", "picus");
    let mut ci = Mapping::new();
    insert(&mut ci, "source", "woodpecker");
    ci.insert("labels".into(), Value::Mapping(filter_labels(get(FILTER_LABELS_VAR))?));
    pool.insert("ci".into(), Value::Mapping(ci));

    let mut binding = Mapping::new();
    insert(&mut binding, "name", provider);
    let mut agent = Mapping::new();
    if provider == "hcloud" {
        let mut machine = Mapping::new();
        insert(&mut machine, "serverType", &escape(get("PICUS_HCLOUD_SERVER_TYPE").unwrap_or("cx11")));
        insert(&mut machine, "location", &escape(get("PICUS_HCLOUD_LOCATION").unwrap_or("nbg1")));
        insert(&mut machine, "image", "docker-ce");
        if let Some(keys) = get("PICUS_HCLOUD_SSH_KEYS") {
            insert(&mut machine, "sshKeys", &escape(keys));
        }
        binding.insert("machine".into(), Value::Mapping(machine));

        insert(
            &mut agent,
            "image",
            &escape(get("PICUS_AGENT_IMAGE").unwrap_or("woodpeckerci/woodpecker-agent:latest")),
        );
        let (plain, secret) = forwarded_env(vars);
        if !plain.is_empty() {
            agent.insert("env".into(), Value::Mapping(plain));
        }
        if !secret.is_empty() {
            agent.insert("secretEnv".into(), Value::Mapping(secret));
        }
        let mut preregistered = Mapping::new();
        insert(&mut preregistered, "id", &escape(agent_id));
        agent.insert("preregistered".into(), Value::Mapping(preregistered));
    } else {
        // The EC2 instance has its agent installed already: ciscale only starts and stops it.
        let instance = require("PICUS_AWS_INSTANCE_ID", "the id of the EC2 instance that runs the Woodpecker agent")?;
        let mut adopted = Mapping::new();
        insert(&mut adopted, "id", &escape(instance));
        insert(&mut adopted, "agentId", &escape(agent_id));
        let mut start_stop = Mapping::new();
        start_stop.insert("instances".into(), Value::Sequence(vec![Value::Mapping(adopted)]));
        binding.insert("startStop".into(), Value::Mapping(start_stop));
    }
    pool.insert("backend".into(), Value::Mapping(binding));
    if !agent.is_empty() {
        pool.insert("agent".into(), Value::Mapping(agent));
    }

    let mut scale = Mapping::new();
    scale.insert("max".into(), Value::Number(1.into()));
    insert(&mut scale, "idleTimeout", get("PICUS_MAX_IDLE_TIME").unwrap_or("30m"));
    scale.insert("billingAware".into(), Value::Bool(false));
    pool.insert("scale".into(), Value::Mapping(scale));
    root.insert("pools".into(), Value::Sequence(vec![Value::Mapping(pool)]));

    let yaml = serde_yaml::to_string(&Value::Mapping(root)).unwrap_or_default();
    Ok(format!(
        "# Generated from the Picus environment (PICUS_PROVIDER_TYPE={provider}); secrets stay in the environment.\n{yaml}"
    ))
}

/// `PICUS_AGENT_WOODPECKER_X` → `WOODPECKER_X`, as Picus forwards them. Anything that looks like a credential goes
/// to `secretEnv` as a reference to the Picus variable; the rest is copied.
fn forwarded_env(vars: &BTreeMap<String, String>) -> (Mapping, Mapping) {
    let (mut plain, mut secret) = (Mapping::new(), Mapping::new());
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(FORWARD_PREFIX) else {
            continue;
        };
        let agent_key = format!("WOODPECKER_{rest}");
        if ["SECRET", "TOKEN", "PASSWORD", "KEY"].iter().any(|word| rest.contains(word)) {
            insert(&mut secret, &agent_key, &format!("${{{name}}}"));
        } else {
            insert(&mut plain, &agent_key, &escape(value));
        }
    }
    (plain, secret)
}

/// Woodpecker filter labels (`k=v,k=v`); without them, the labels every Woodpecker agent has by default, so the pool
/// takes the jobs a default agent would.
fn filter_labels(text: Option<&str>) -> Result<Mapping, PicusError> {
    let mut labels = Mapping::new();
    let Some(text) = text else {
        for key in ["platform", "backend", "repo", "org-id"] {
            insert(&mut labels, key, "*");
        }
        return Ok(labels);
    };
    for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        match entry.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => insert(&mut labels, key.trim(), &escape(value.trim())),
            _ => return Err(PicusError::BadFilterLabel { entry: entry.to_owned() }),
        }
    }
    Ok(labels)
}

/// Picus's id names Hetzner resources (RFC 1123); ciscale's owner id is stricter (`[a-z0-9-]`, at most 30).
fn owner_id(id: &str) -> String {
    let cleaned: String =
        id.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let trimmed = cleaned.trim_matches('-');
    let short: String = trimmed.chars().take(30).collect();
    let short = short.trim_end_matches('-').to_owned();
    if short.is_empty() {
        "picus".to_owned()
    } else {
        short
    }
}

/// A copied value must be read back as it is: the config loader reads `${VAR}` from the environment, flags
/// `$VAR`, and reads `$$` as `$`.
fn escape(value: &str) -> String {
    value.replace('$', "$$")
}

fn insert(map: &mut Mapping, key: &str, value: &str) {
    map.insert(Value::String(key.to_owned()), Value::String(value.to_owned()));
}

fn single(key: &str, value: Mapping) -> Mapping {
    let mut map = Mapping::new();
    map.insert(Value::String(key.to_owned()), Value::Mapping(value));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn owner_ids_are_made_valid() {
        assert_eq!(owner_id("my-woodpecker-instance"), "my-woodpecker-instance");
        assert_eq!(owner_id("My_Woodpecker.Instance"), "my-woodpecker-instance");
        assert_eq!(owner_id("a-very-long-picus-installation-name-indeed"), "a-very-long-picus-installation");
        assert_eq!(owner_id("---"), "picus");
    }

    #[test]
    fn filter_labels_parse_and_reject_garbage() {
        let labels = filter_labels(Some("platform=linux/amd64, repo=*")).expect("valid");
        assert_eq!(labels.get("platform").and_then(Value::as_str), Some("linux/amd64"));
        assert_eq!(labels.get("repo").and_then(Value::as_str), Some("*"));
        assert_eq!(filter_labels(Some("platform")), Err(PicusError::BadFilterLabel { entry: "platform".to_owned() }));
        assert_eq!(filter_labels(None).expect("defaults").len(), 4);
    }

    #[test]
    fn missing_required_variables_are_named() {
        let error = config_from_env(&vars(&[("PICUS_PROVIDER_TYPE", "hcloud")])).unwrap_err();
        assert!(matches!(error, PicusError::Missing { name: "PICUS_WOODPECKER_SERVER", .. }), "{error:?}");
        let error = config_from_env(&vars(&[
            ("PICUS_PROVIDER_TYPE", "gcp"),
            ("PICUS_WOODPECKER_SERVER", "https://ci"),
            ("PICUS_WOODPECKER_TOKEN", "t"),
            ("PICUS_WOODPECKER_AGENT_ID", "1"),
        ]))
        .unwrap_err();
        assert_eq!(error, PicusError::UnknownProvider { value: "gcp".to_owned() });
    }

    #[test]
    fn copied_values_cannot_smuggle_references() {
        assert_eq!(escape("a${HOME}b"), "a$${HOME}b");
        assert_eq!(escape("$HOME costs $5"), "$$HOME costs $$5");
    }
}
