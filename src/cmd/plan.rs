//! `ciscale plan`: observe (or read an observation), plan, show the plan; optionally save it for `apply`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use ciscale::plan::{self, render};

use super::{ConfigArg, Ui, EXIT_CHANGES, EXIT_OK};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Plan against an observation file (from `ciscale observe -o`) instead of the live providers: no network
    #[arg(long, value_name = "FILE")]
    pub observed: Option<PathBuf>,
    /// Save the plan for `ciscale apply FILE`
    #[arg(long, value_name = "PLANFILE")]
    pub out: Option<PathBuf>,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
    /// Exit 0 when there are no changes, 2 when there are, 1 on error
    #[arg(long)]
    pub detailed_exitcode: bool,
}

pub async fn run(args: PlanArgs, ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config)?;
    let observed = match &args.observed {
        Some(path) => super::read_observed(path)?,
        None => super::observe_live(&desired, &super::connect(&desired)?).await?,
    };
    // The observation's own time is "now": an offline plan is the same plan on every machine, every day.
    let plan = plan::plan(&desired, &observed, observed.observed_at);

    if let Some(out) = &args.out {
        let json = render::render_json(&plan);
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
