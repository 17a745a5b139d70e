//! `ciscale plan`: observe (or read an observation), plan, show the plan; optionally save it for `apply`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use ciscale::config::Secrets;
use ciscale::model::{Desired, Observed};
use ciscale::plan::{self, render, Plan};

use super::{hinted, ConfigArg, Ui, EXIT_CHANGES, EXIT_OK};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Plan against an observation file (from `ciscale observe -o`) instead of the live providers: no network,
    /// and no secrets needed
    #[arg(long, value_name = "FILE")]
    pub observed: Option<PathBuf>,
    /// Save the plan for `ciscale apply FILE` (it records which config it was made from)
    #[arg(long, value_name = "PLANFILE")]
    pub out: Option<PathBuf>,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
    /// Exit 0 when there are no changes, 2 when there are, 1 on error
    #[arg(long)]
    pub detailed_exitcode: bool,
}

/// A saved plan: the plan's JSON with the config file it was made from beside it, so `ciscale apply PLANFILE`
/// finds that config without `-c`. The plan's own fields stay at the top level (a plan file is the plan JSON
/// with one more key), so tools reading `plan --json` read plan files too.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanFile {
    #[serde(flatten)]
    pub plan: Plan,
    /// The config file, absolute; absent for a plan made from the Picus environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
}

pub async fn run(args: PlanArgs, ui: &Ui) -> anyhow::Result<u8> {
    // An offline plan never uses a secret's value.
    let secrets = if args.observed.is_some() { Secrets::Unused } else { Secrets::Needed };
    let desired = super::load_config(&args.config, secrets)?;
    let observed = match &args.observed {
        Some(path) => {
            let observed = super::read_observed(path)?;
            check_covers(&desired, &observed, path, args.config.path())?;
            observed
        }
        None => super::observe_live(&desired, &super::connect(&desired)?).await?,
    };
    // The observation's own time is "now": an offline plan is the same plan on every machine, every day.
    let plan = plan::plan(&desired, &observed, observed.observed_at);

    if let Some(out) = &args.out {
        // Absolute, so `apply` finds it from any folder. A config from the Picus environment has no file.
        let config_path = args.config.path().exists().then(|| std::path::absolute(args.config.path())).transpose()?;
        let file = PlanFile { plan: plan.clone(), config_path };
        let mut json = serde_json::to_string_pretty(&file).context("could not write the plan as JSON")?;
        json.push('\n');
        std::fs::write(out, json).with_context(|| format!("could not write the plan file `{}`", out.display()))?;
    }
    if args.json {
        print!("{}", render::render_json(&plan));
    } else {
        print!("{}", render::render_human(&plan, &render::RenderOptions { color: ui.stdout_color }));
        if let Some(out) = &args.out {
            println!("\nSaved the plan to `{}`; run `ciscale apply {}` to carry it out.", out.display(), out.display());
        }
    }
    Ok(if args.detailed_exitcode && plan.has_changes() { EXIT_CHANGES } else { EXIT_OK })
}

/// An observation planned against must be of this config's providers, all of them and no others: a backend the
/// observation lacks would read as "no instances" and plan creates for it.
fn check_covers(desired: &Desired, observed: &Observed, observed_path: &Path, config: &Path) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    for name in desired.backends.keys().filter(|name| !observed.backends.contains_key(*name)) {
        missing.push(format!("backend `{name}`"));
    }
    for name in desired.ci.keys().filter(|name| !observed.ci.contains_key(*name)) {
        missing.push(format!("ci source `{name}`"));
    }
    for name in observed.backends.keys().filter(|name| !desired.backends.contains_key(*name)) {
        extra.push(format!("backend `{name}`"));
    }
    for name in observed.ci.keys().filter(|name| !desired.ci.contains_key(*name)) {
        extra.push(format!("ci source `{name}`"));
    }
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("it has nothing for {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("it has {} that the config does not name", extra.join(", ")));
    }
    Err(hinted(
        format!(
            "the observation `{}` is not of the config `{}`: {}",
            observed_path.display(),
            config.display(),
            parts.join("; ")
        ),
        format!(
            "plan with the config the observation was made from, or observe again: `ciscale observe -c {} -o {}`",
            config.display(),
            observed_path.display()
        ),
    ))
}
