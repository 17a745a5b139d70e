//! `ciscale import incus-azure-pipelines`: turns an incus-azure-pipelines config into an equivalent ciscale
//! config.
//!
//! The source format (YAML): `metricsPort`, `daemon`, and `pools`, each with `name` (the Azure agent pool, also
//! the container name prefix), `agentCount`, `agentPrefix`, `env`, `azure: {pat, url}` and `incus: {projectName,
//! image, maxCores, maxRamInGb, tmpfsSizeInGb, vm, diskSizeInGb, startupGracePeriod}`.
//!
//! The mapping:
//! - each pool keeps exactly `agentCount` ephemeral agents: `scale: {min: N, max: N, ephemeral: true}`;
//! - one `azure-pipelines` CI source per distinct organization URL (and PAT: two PATs for one URL stay two
//!   sources), its PAT written as a `${VAR}` reference — the PAT itself is never written anywhere; the caller
//!   tells the user which variable to set;
//! - one `incus` backend per Incus project;
//! - machine keys as the Incus backend reads them: `image`, `cpu` (the tool's `maxCores`; note: it set the soft
//!   `limits.cpu.allowance: N00%`, `cpu` is the hard `limits.cpu: N`), `memory: NGiB`, `tmpfsSize: NGiB`, and
//!   `nesting: "true"` and `hostShutdownAction: force-stop`, which the tool always set;
//! - `env` → the agent's plain `env`; `startupGracePeriod` → `bootstrapTimeout`.
//!
//! What has no equivalent is reported as a note (and written as a comment): `metricsPort`, `vm`/`diskSizeInGb`,
//! `agentPrefix` (ciscale names agents after their instances), `daemon`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use crate::model::GoDuration;

/// Why a file could not be converted. Messages never hold a PAT.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a valid incus-azure-pipelines config: {0}")]
    Parse(String),
    #[error("pool {index}: {message}")]
    Pool { index: usize, message: String },
    #[error("the config has no pools\nhint: incus-azure-pipelines configs list them under `pools:`")]
    NoPools,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceConfig {
    #[serde(default)]
    pools: Vec<SourcePool>,
    #[serde(default)]
    metrics_port: Option<u32>,
    #[serde(default)]
    daemon: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourcePool {
    name: String,
    agent_count: u32,
    #[serde(default)]
    agent_prefix: Option<String>,
    azure: SourceAzure,
    incus: SourceIncus,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct SourceAzure {
    pat: String,
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceIncus {
    #[serde(default)]
    project_name: Option<String>,
    image: String,
    #[serde(default)]
    max_cores: Option<u32>,
    #[serde(default)]
    max_ram_in_gb: Option<u32>,
    #[serde(default)]
    tmpfs_size_in_gb: Option<u32>,
    #[serde(default)]
    vm: Option<bool>,
    #[serde(default)]
    disk_size_in_gb: Option<u32>,
    /// A Go duration string (`5m`) or nanoseconds.
    #[serde(default)]
    startup_grace_period: Option<Value>,
}

/// A converted config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The ciscale config (YAML), ready for stdout.
    pub config: String,
    /// Environment variables the config reads, with the pools whose PAT each must hold.
    pub env: BTreeMap<String, Vec<String>>,
    /// What did not carry over, for stderr.
    pub notes: Vec<String>,
}

/// The owner id of an imported config (the `ciscale.owner` label and instance name prefix).
pub const IMPORTED_ID: &str = "incus-azure";

/// Converts the text of an incus-azure-pipelines config.
pub fn convert(text: &str) -> Result<Imported, ImportError> {
    // Read loosely first, to know the PATs: a parse error message must not quote one.
    let loose: Value = serde_yaml::from_str(text).map_err(|error| ImportError::Parse(error.to_string()))?;
    let pats: Vec<String> = loose
        .get("pools")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|pool| pool.get("azure")?.get("pat")?.as_str().map(str::to_owned))
        .filter(|pat| !pat.is_empty())
        .collect();
    let redact = |message: String| pats.iter().fold(message, |message, pat| message.replace(pat.as_str(), "***"));
    let source: SourceConfig =
        serde_yaml::from_value(loose.clone()).map_err(|error| ImportError::Parse(redact(error.to_string())))?;
    if source.pools.is_empty() {
        return Err(ImportError::NoPools);
    }

    let mut notes = Vec::new();
    if let Some(port) = source.metrics_port {
        notes.push(format!(
            "`metricsPort: {port}` is not carried over: ciscale's `watch` serves metrics where its own config says"
        ));
    }
    if source.daemon.is_some() {
        notes.push("`daemon` settings are not carried over: `watch` reconciles every `pollInterval`".to_owned());
    }

    // CI sources per (url, pat), backends per project, pool names made ciscale-safe and unique.
    let mut sources: Vec<(String, String)> = Vec::new();
    let mut projects: Vec<Option<String>> = Vec::new();
    let mut pool_names: Vec<String> = Vec::new();
    for (index, pool) in source.pools.iter().enumerate() {
        let fail = |message: String| ImportError::Pool { index: index + 1, message };
        if pool.agent_count == 0 {
            return Err(fail(format!("`{}`: `agentCount` must be at least 1", pool.name)));
        }
        if pool.incus.image.trim().is_empty() {
            return Err(fail(format!("`{}`: `incus.image` is empty", pool.name)));
        }
        if pool.azure.url.trim().is_empty() {
            return Err(fail(format!("`{}`: `azure.url` is empty", pool.name)));
        }
        let key = (pool.azure.url.trim_end_matches('/').to_owned(), pool.azure.pat.clone());
        if !sources.contains(&key) {
            sources.push(key);
        }
        let project = pool.incus.project_name.clone().filter(|project| !project.is_empty());
        if !projects.contains(&project) {
            projects.push(project);
        }
        let mut name = pool_name(&pool.name);
        let base = name.clone();
        let mut suffix = 2;
        while pool_names.contains(&name) {
            let tail = format!("-{suffix}");
            name = format!("{}{tail}", &base[..base.len().min(30 - tail.len())]);
            suffix += 1;
        }
        pool_names.push(name);
    }
    let source_name = |index: usize| {
        if sources.len() == 1 {
            "azure".to_owned()
        } else {
            format!("azure-{}", index + 1)
        }
    };
    let pat_var = |index: usize| {
        if sources.len() == 1 {
            "AZP_PAT".to_owned()
        } else {
            format!("AZP_PAT_{}", index + 1)
        }
    };
    let backend_name = |project: &Option<String>| match project {
        None => "incus".to_owned(),
        Some(project) => format!("incus-{}", pool_name(project)),
    };

    let mut out = String::new();
    out.push_str("# Converted from an incus-azure-pipelines config by `ciscale import incus-azure-pipelines`.\n");
    out.push_str(
        "# Every pool keeps exactly `agentCount` ephemeral agents (min = max); PATs are read from the environment.\n",
    );
    out.push_str(&format!("id: {IMPORTED_ID}\n"));
    out.push_str("pollInterval: 10s\n");
    out.push_str("ci:\n");
    let mut env: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (index, (url, _)) in sources.iter().enumerate() {
        out.push_str(&format!("  {}:\n", source_name(index)));
        out.push_str("    kind: azure-pipelines\n");
        out.push_str(&format!("    organizationUrl: {}\n", quoted(url)));
        out.push_str(&format!("    pat: \"${{{}}}\"\n", pat_var(index)));
        env.insert(pat_var(index), Vec::new());
    }
    out.push_str("backends:\n");
    for project in &projects {
        out.push_str(&format!("  {}:\n", backend_name(project)));
        out.push_str("    kind: incus\n");
        if let Some(project) = project {
            out.push_str(&format!("    project: {}\n", quoted(project)));
        }
    }
    out.push_str("pools:\n");
    for (index, pool) in source.pools.iter().enumerate() {
        let key = (pool.azure.url.trim_end_matches('/').to_owned(), pool.azure.pat.clone());
        let source_index = sources.iter().position(|known| known == &key).unwrap_or_default();
        let project = pool.incus.project_name.clone().filter(|project| !project.is_empty());
        if let Some(pools) = env.get_mut(&pat_var(source_index)) {
            pools.push(pool.name.clone());
        }
        out.push_str(&format!("  - name: {}\n", pool_names[index]));
        out.push_str(&format!(
            "    ci: {{ source: {}, azurePool: {} }}\n",
            source_name(source_index),
            quoted(&pool.name)
        ));
        out.push_str("    backend:\n");
        out.push_str(&format!("      name: {}\n", backend_name(&project)));
        out.push_str("      machine:\n");
        out.push_str(&format!("        image: {}\n", quoted(&pool.incus.image)));
        if let Some(cores) = pool.incus.max_cores.filter(|cores| *cores > 0) {
            out.push_str(&format!(
                "        cpu: \"{cores}\"  # was the soft limit `limits.cpu.allowance: {}%`\n",
                u64::from(cores) * 100
            ));
        }
        if let Some(ram) = pool.incus.max_ram_in_gb.filter(|ram| *ram > 0) {
            out.push_str(&format!("        memory: {ram}GiB\n"));
        }
        if let Some(tmpfs) = pool.incus.tmpfs_size_in_gb.filter(|tmpfs| *tmpfs > 0) {
            out.push_str(&format!("        tmpfsSize: {tmpfs}GiB\n"));
        }
        out.push_str("        nesting: \"true\"\n");
        out.push_str("        hostShutdownAction: force-stop\n");
        if !pool.env.is_empty() {
            out.push_str("    agent:\n      env:\n");
            for (key, value) in &pool.env {
                out.push_str(&format!("        {}: {}\n", quoted(key), quoted(value)));
            }
        }
        let count = pool.agent_count;
        let grace = match &pool.incus.startup_grace_period {
            None => None,
            Some(value) => match go_duration(value) {
                Some(duration) => Some(duration),
                None => {
                    notes.push(format!("pool `{}`: `startupGracePeriod` is not a duration; left out", pool.name));
                    None
                }
            },
        };
        match grace {
            Some(grace) => out.push_str(&format!(
                "    scale: {{ min: {count}, max: {count}, ephemeral: true, bootstrapTimeout: {grace} }}\n"
            )),
            None => out.push_str(&format!("    scale: {{ min: {count}, max: {count}, ephemeral: true }}\n")),
        }
        if pool.incus.vm == Some(true) {
            notes.push(format!(
                "pool `{}`: `vm: true` is not carried over: the incus backend runs system containers",
                pool.name
            ));
        }
        if pool.incus.disk_size_in_gb.is_some_and(|size| size > 0) {
            notes.push(format!("pool `{}`: `diskSizeInGb` (VM disks) is not carried over", pool.name));
        }
        if pool.agent_prefix.is_some() {
            notes.push(format!(
                "pool `{}`: `agentPrefix` is not carried over: agents are named after their instances \
                 (`{IMPORTED_ID}-{}-N`)",
                pool.name, pool_names[index]
            ));
        }
    }
    for note in &notes {
        out.push_str(&format!("# note: {note}\n"));
    }
    Ok(Imported { config: out, env, notes })
}

/// A ciscale pool name (1 to 30 of `a-z`, `0-9`, `-`) from an Azure pool name.
fn pool_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    out.truncate(30);
    let out = out.trim_end_matches('-').to_owned();
    if out.is_empty() {
        "pool".to_owned()
    } else {
        out
    }
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Go's `time.Duration` as the tool's YAML holds it: a string (`5m`) or integer nanoseconds.
fn go_duration(value: &Value) -> Option<GoDuration> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64().map(|nanos| GoDuration(std::time::Duration::from_nanos(nanos))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_become_ciscale_safe() {
        assert_eq!(pool_name("Linux_Agents"), "linux-agents");
        assert_eq!(pool_name("--a..b--"), "a-b");
        assert_eq!(pool_name("___"), "pool");
        assert_eq!(pool_name(&"x".repeat(40)).len(), 30);
    }

    #[test]
    fn durations_as_strings_or_nanoseconds() {
        assert_eq!(go_duration(&Value::from("5m")), Some(GoDuration::from_secs(300)));
        assert_eq!(go_duration(&Value::from(60_000_000_000_u64)), Some(GoDuration::from_secs(60)));
        assert_eq!(go_duration(&Value::from("soon")), None);
    }

    #[test]
    fn a_parse_error_never_quotes_a_pat() {
        let text = "pools:\n  - name: a\n    agentCount: \"many\"\n    azure: { pat: sekrit-pat-value, url: https://x }\n    incus: { image: i }\n";
        let error = convert(text).expect_err("agentCount is not a number");
        assert!(!error.to_string().contains("sekrit-pat-value"), "{error}");
        let text = "pools:\n  - name: a\n    agentCount: 1\n    azure: { pat: [sekrit-pat-value], url: https://x }\n    incus: { image: i }\n";
        let error = convert(text).expect_err("pat is not a string");
        assert!(!error.to_string().contains("sekrit"), "{error}");
    }
}
