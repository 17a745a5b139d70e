//! `ciscale apply`: carry out a saved plan (refusing a stale one) or plan afresh and ask before acting.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use ciscale::apply::{self, ApplyOptions, Outcome, Progress};
use ciscale::config::Secrets;
use ciscale::plan::{self, render, Change};

use super::plan::PlanFile;
use super::{hinted, ConfigArg, Ui, EXIT_ERROR, EXIT_OK};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// A plan saved by `ciscale plan --out` (its config is the one it was made from, unless `-c` names one);
    /// without it, ciscale plans now and asks before acting
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
    // A plan file names the config it was made from; a config named with `-c` (or `CISCALE_CONFIG`) wins, and
    // must then be that same config (the hash check below).
    let saved = args.plan_file.as_deref().map(read_plan_file).transpose()?;
    let recorded = saved.as_ref().and_then(|file| file.config_path.clone());
    let config = match (&recorded, args.config.is_explicit()) {
        (Some(recorded), false) => ConfigArg { config: Some(recorded.clone()) },
        _ => args.config.clone(),
    };
    let desired = super::load_config(&config, Secrets::Needed)?;
    let _lock = args.lock.acquire(&desired).await?;
    let providers = super::connect(&desired)?;

    // Changes of a saved plan that are no longer safe, with why.
    let mut refused: Vec<(Change, plan::PreconditionFailed)> = Vec::new();
    let plan = match (saved, &args.plan_file) {
        (Some(saved), Some(path)) => {
            let saved = saved.plan;
            if saved.config_hash != desired.config_hash {
                let made_from =
                    recorded.as_ref().map(|recorded| format!(" (`{}`)", recorded.display())).unwrap_or_default();
                let hint = match &recorded {
                    Some(recorded) if args.config.is_explicit() && recorded.as_path() != config.path() => format!(
                        "drop `-c` to apply it with `{}`, or make a new plan with `ciscale plan -c {} --out FILE`",
                        recorded.display(),
                        config.path().display()
                    ),
                    _ => "the config changed since: run `ciscale plan --out FILE` again".to_owned(),
                };
                return Err(hinted(
                    format!(
                        "the plan in `{}` was made from a different config{made_from} than `{}`",
                        path.display(),
                        config.path().display()
                    ),
                    hint,
                ));
            }
            // Not refused as a whole when the world moved on: each change is checked for what makes it safe now
            // (see `plan::preconditions`), and only those that are no longer safe are left out.
            let observed = super::observe_live(&desired, &providers).await?;
            if plan::fingerprint(&observed) != saved.observed_fingerprint {
                eprintln!("the instances or agents changed since the plan was made: checking each change against them");
            }
            let checks = plan::preconditions(&saved.changes, &desired, &observed, observed.observed_at);
            let mut safe = saved.clone();
            safe.changes.clear();
            for (change, check) in saved.changes.into_iter().zip(checks) {
                match check {
                    Ok(()) => safe.changes.push(change),
                    Err(failed) => refused.push((change, failed)),
                }
            }
            safe
        }
        _ => {
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
    for (change, failed) in &refused {
        eprintln!("error: {} {} is no longer safe: {failed}", change.action.verb(), describe(change));
    }
    if !plan.has_changes() {
        if refused.is_empty() {
            println!("No changes.");
            return Ok(EXIT_OK);
        }
        println!("Apply complete: 0 done, 0 failed, 0 skipped, {} no longer safe.", refused.len());
        return Err(stale_hint());
    }

    let cancel = ciscale::watch::shutdown_signal();
    let options = ApplyOptions { concurrency: args.concurrency.map_or(0, usize::from), ..ApplyOptions::default() };
    let progress = Reporter::new(ui, plan.changes.len());
    let report = apply::apply(&plan, &desired, &providers, &options, &progress, &cancel).await;
    progress.clear();

    let failed = report.failed();
    let no_longer_safe =
        if args.plan_file.is_some() { format!(", {} no longer safe", refused.len()) } else { String::new() };
    println!(
        "Apply complete: {} done, {} failed, {} skipped{no_longer_safe}.",
        report.succeeded(),
        failed,
        report.skipped()
    );
    for (change, outcome) in &report.outcomes {
        if let Outcome::Failed { step, error } = outcome {
            eprintln!("error: {} {} failed at `{step}`: {error}", change.action.verb(), describe(change));
        }
    }
    if !refused.is_empty() {
        return Err(stale_hint());
    }
    Ok(if failed > 0 { EXIT_ERROR } else { EXIT_OK })
}

fn stale_hint() -> anyhow::Error {
    hinted(
        "some changes of the saved plan were left out: the world changed since it was made",
        "run `ciscale plan --out FILE` again, or `ciscale apply` without a plan file",
    )
}

fn read_plan_file(path: &Path) -> anyhow::Result<PlanFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("could not read the plan file `{}`", path.display()))?;
    let file: PlanFile = serde_json::from_str(&text).map_err(|error| {
        hinted(
            format!("{}:{}:{}: not a ciscale plan file: {error}", path.display(), error.line(), error.column()),
            "write one with `ciscale plan --out FILE`",
        )
    })?;
    if file.plan.format_version != plan::FORMAT_VERSION {
        return Err(hinted(
            format!(
                "the plan file `{}` has format {}, this ciscale reads format {}",
                path.display(),
                file.plan.format_version,
                plan::FORMAT_VERSION
            ),
            "make the plan with the same ciscale version that applies it",
        ));
    }
    Ok(file)
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

/// Progress on stderr: one spinner per change on a terminal, plain lines otherwise (logs, CI). Every finished
/// change leaves one line behind either way (Terraform's "Creation complete after 3s [id=…]"): what was done, how
/// long it took and the id of what it made or acted on, so the screen is a record worth keeping.
struct Reporter {
    bars: Option<MultiProgress>,
    running: Mutex<Vec<Running>>,
    color: bool,
}

/// A change in flight.
struct Running {
    key: String,
    bar: Option<ProgressBar>,
    started: std::time::Instant,
    /// The instance a create made.
    created: Option<String>,
}

impl Reporter {
    fn new(ui: &Ui, _changes: usize) -> Self {
        Self {
            bars: ui.stderr_is_tty.then(MultiProgress::new),
            running: Mutex::new(Vec::new()),
            color: ui.stderr_color,
        }
    }

    fn key(change: &Change) -> String {
        format!("{} {}", change.action.symbol(), describe(change))
    }

    fn with_running<T>(&self, change: &Change, act: impl FnOnce(&mut Running) -> T) -> Option<T> {
        let key = Self::key(change);
        let mut running = self.running.lock().ok()?;
        running.iter_mut().find(|entry| entry.key == key).map(act)
    }

    fn clear(&self) {
        if let Some(multi) = &self.bars {
            drop(multi.clear());
        }
    }

    /// A line that stays: above the spinners on a terminal, a plain line otherwise.
    fn keep(&self, line: &str) {
        match &self.bars {
            Some(multi) => {
                if multi.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            None => eprintln!("{line}"),
        }
    }
}

/// `[id=…]` of what a finished change made or acted on: the new instance of a create, else the instance or the
/// agent record the change names.
fn ids(change: &Change, created: Option<&str>) -> String {
    let instance =
        created.map(str::to_owned).or_else(|| change.instance.as_ref()?.id.as_ref().map(ToString::to_string));
    match (instance, &change.agent) {
        (Some(instance), Some(agent)) => format!(" [id={instance}, agent={}]", agent.id),
        (Some(instance), None) => format!(" [id={instance}]"),
        (None, Some(agent)) => format!(" [agent={}]", agent.id),
        (None, None) => String::new(),
    }
}

impl Progress for Reporter {
    fn start(&self, change: &Change) {
        let bar = self.bars.as_ref().map(|multi| {
            let bar = multi.add(ProgressBar::new_spinner());
            let template = if self.color { "{spinner:.cyan} {prefix} {msg}" } else { "{spinner} {prefix} {msg}" };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_prefix(Self::key(change));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            eprintln!("{}: {}...", Self::key(change), change.action.verb());
        }
        if let Ok(mut running) = self.running.lock() {
            running.push(Running { key: Self::key(change), bar, started: std::time::Instant::now(), created: None });
        }
    }

    fn step(&self, change: &Change, step: &str) {
        let shown = self.with_running(change, |entry| match &entry.bar {
            Some(bar) => {
                bar.set_message(step.to_owned());
                true
            }
            None => false,
        });
        if shown != Some(true) && self.bars.is_none() {
            eprintln!("{}: {step}", Self::key(change));
        }
    }

    fn created(&self, change: &Change, instance: &ciscale::model::InstanceId) {
        self.with_running(change, |entry| entry.created = Some(instance.to_string()));
    }

    fn finish(&self, change: &Change, outcome: &Outcome) {
        let key = Self::key(change);
        let entry = self.running.lock().ok().and_then(|mut running| {
            let index = running.iter().position(|entry| entry.key == key)?;
            Some(running.remove(index))
        });
        let (elapsed, created) = match &entry {
            Some(entry) => (Some(entry.started.elapsed()), entry.created.as_deref()),
            None => (None, None),
        };
        let after = elapsed
            .map(|elapsed| {
                format!(" after {}", ciscale::model::GoDuration(std::time::Duration::from_secs(elapsed.as_secs())))
            })
            .unwrap_or_default();
        let line = match outcome {
            Outcome::Done => format!("{key}: {} complete{after}{}", change.action.verb(), ids(change, created)),
            Outcome::Failed { step, .. } => format!("{key}: failed at `{step}`{after}{}", ids(change, created)),
            Outcome::Skipped { why } => format!("{key}: skipped: {why}"),
        };
        if let Some(bar) = entry.and_then(|entry| entry.bar) {
            bar.finish_and_clear();
        }
        self.keep(&line);
    }
}
