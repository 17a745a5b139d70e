//! `ciscale apply`: carry out a saved plan (refusing a stale one) or plan afresh and ask before acting.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use ciscale::apply::{self, ApplyOptions, Outcome, Progress};
use ciscale::plan::{self, render, Change, Plan};

use super::{hinted, ConfigArg, Ui, EXIT_ERROR, EXIT_OK};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// A plan saved by `ciscale plan --out`; without it, ciscale plans now and asks before acting
    #[arg(value_name = "PLANFILE")]
    pub plan_file: Option<PathBuf>,
    /// Do not ask for confirmation (cron, CI)
    #[arg(long)]
    pub auto_approve: bool,
    #[command(flatten)]
    pub lock: super::LockArgs,
    /// How many changes run at the same time on each backend account (default: 4 on clouds, 8 on Incus)
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: Option<u16>,
}

pub async fn run(args: ApplyArgs, ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config)?;
    let _lock = args.lock.acquire(&desired).await?;
    let providers = super::connect(&desired)?;

    let plan = match &args.plan_file {
        Some(path) => {
            let saved = read_plan_file(path)?;
            if saved.config_hash != desired.config_hash {
                return Err(hinted(
                    format!("the plan in `{}` was made from a different config than `{}`", path.display(), args.config.config.display()),
                    "run `ciscale plan --out FILE` again with the current config",
                ));
            }
            let observed = super::observe_live(&desired, &providers).await?;
            if plan::fingerprint(&observed) != saved.observed_fingerprint {
                return Err(hinted(
                    format!("the plan in `{}` is stale: the instances or agents changed since it was made", path.display()),
                    "run `ciscale plan --out FILE` again, or `ciscale apply` without a plan file",
                ));
            }
            saved
        }
        None => {
            let observed = super::observe_live(&desired, &providers).await?;
            let plan = plan::plan(&desired, &observed, observed.observed_at);
            print!("{}", render::render_human(&plan, &render::RenderOptions { color: ui.stdout_color }));
            if !plan.has_changes() {
                return Ok(EXIT_OK);
            }
            if !args.auto_approve {
                confirm(ui).await?;
            }
            plan
        }
    };
    if !plan.has_changes() {
        println!("No changes.");
        return Ok(EXIT_OK);
    }

    let cancel = ciscale::watch::shutdown_signal();
    let options = ApplyOptions { concurrency: args.concurrency.map_or(0, usize::from), ..ApplyOptions::default() };
    let progress = Reporter::new(ui, plan.changes.len());
    let report = apply::apply(&plan, &desired, &providers, &options, &progress, &cancel).await;
    progress.clear();

    let failed = report.failed();
    println!("Apply complete: {} done, {} failed, {} skipped.", report.succeeded(), failed, report.skipped());
    for (change, outcome) in &report.outcomes {
        if let Outcome::Failed { step, error } = outcome {
            eprintln!("error: {} {} failed at `{step}`: {error}", change.action.verb(), describe(change));
        }
    }
    Ok(if failed > 0 { EXIT_ERROR } else { EXIT_OK })
}

fn read_plan_file(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("could not read the plan file `{}`", path.display()))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|error| {
        hinted(
            format!("{}:{}:{}: not a ciscale plan file: {error}", path.display(), error.line(), error.column()),
            "write one with `ciscale plan --out FILE`",
        )
    })?;
    if plan.format_version != plan::FORMAT_VERSION {
        return Err(hinted(
            format!("the plan file `{}` has format {}, this ciscale reads format {}", path.display(), plan.format_version, plan::FORMAT_VERSION),
            "make the plan with the same ciscale version that applies it",
        ));
    }
    Ok(plan)
}

/// Terraform's confirmation: only the word `yes` goes ahead. Without a terminal nobody can answer, so that is an
/// error rather than a silent no.
async fn confirm(ui: &Ui) -> anyhow::Result<()> {
    if !ui.stdin_is_tty {
        return Err(hinted(
            "no terminal to confirm the plan on",
            "pass `--auto-approve` to apply without confirmation, or save a plan with `ciscale plan --out FILE` and apply that",
        ));
    }
    eprint!("\nDo you want to perform these actions?\n  Only 'yes' will be accepted to approve.\n\n  Enter a value: ");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .context("the confirmation prompt failed")?
    .context("could not read the answer")?;
    if answer.trim() != "yes" {
        return Err(hinted("apply cancelled", "answer `yes` to go ahead"));
    }
    Ok(())
}

fn describe(change: &Change) -> String {
    match (&change.instance, &change.agent) {
        (Some(instance), _) => format!("`{}`", instance.name),
        (None, Some(agent)) => format!("agent `{}`", agent.name),
        (None, None) => format!("in pool `{}`", change.pool),
    }
}

/// Progress on stderr: one bar per change on a terminal, plain lines otherwise (logs, CI).
struct Reporter {
    bars: Option<(MultiProgress, Mutex<Vec<(String, ProgressBar)>>)>,
    color: bool,
}

impl Reporter {
    fn new(ui: &Ui, _changes: usize) -> Self {
        let bars = ui.stderr_is_tty.then(|| (MultiProgress::new(), Mutex::new(Vec::new())));
        Self { bars, color: ui.stderr_color }
    }

    fn key(change: &Change) -> String {
        format!("{} {}", change.action.symbol(), describe(change))
    }

    fn bar_for(&self, change: &Change) -> Option<ProgressBar> {
        let (_, bars) = self.bars.as_ref()?;
        let key = Self::key(change);
        let bars = bars.lock().ok()?;
        bars.iter().find(|(name, _)| *name == key).map(|(_, bar)| bar.clone())
    }

    fn clear(&self) {
        if let Some((multi, _)) = &self.bars {
            drop(multi.clear());
        }
    }
}

impl Progress for Reporter {
    fn start(&self, change: &Change) {
        match &self.bars {
            Some((multi, bars)) => {
                let bar = multi.add(ProgressBar::new_spinner());
                let template = if self.color { "{spinner:.cyan} {prefix} {msg}" } else { "{spinner} {prefix} {msg}" };
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style);
                }
                bar.set_prefix(Self::key(change));
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                if let Ok(mut bars) = bars.lock() {
                    bars.push((Self::key(change), bar));
                }
            }
            None => eprintln!("{}: {}...", Self::key(change), change.action.verb()),
        }
    }

    fn step(&self, change: &Change, step: &str) {
        match self.bar_for(change) {
            Some(bar) => bar.set_message(step.to_owned()),
            None if self.bars.is_none() => eprintln!("{}: {step}", Self::key(change)),
            None => {}
        }
    }

    fn finish(&self, change: &Change, outcome: &Outcome) {
        let text = match outcome {
            Outcome::Done => "done".to_owned(),
            Outcome::Failed { step, .. } => format!("failed at `{step}`"),
            Outcome::Skipped { why } => format!("skipped: {why}"),
        };
        match self.bar_for(change) {
            Some(bar) => bar.finish_with_message(text),
            None => eprintln!("{}: {text}", Self::key(change)),
        }
    }
}
