//! Subcommands, one file each: clap arguments plus a thin `run()` that calls the library. What they share lives
//! here: global flags, the terminal (`Ui`: colour, TTY, error reporting), logging set-up, and config loading.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use ciscale::config::{self, ConfigError, Secrets};
use ciscale::model::{Desired, Observed};
use ciscale::providers::{self, Providers};

mod apply;
mod completions;
mod import;
mod man;
mod observe;
mod plan;
mod provision;
mod schema;
mod simulate;
mod trace;
mod validate;
mod version;
mod watch;

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
/// `plan --detailed-exitcode`: the plan has changes.
pub const EXIT_CHANGES: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "ciscale",
    version,
    about = "Keeps self-hosted CI agents at exactly the capacity their job queue needs"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// When to colour the output; `NO_COLOR` turns `auto` off
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true)]
    pub color: ColorChoice,
    /// More log output (-v debug, -vv trace); `CISCALE_LOG` overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// The config file flag every config-reading subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The desired-state file [default: ciscale.yaml]
    #[arg(short, long = "config", env = "CISCALE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file read when none is named.
    pub const DEFAULT: &'static str = "ciscale.yaml";

    /// The file to read: the one named, else `ciscale.yaml` in the current folder.
    pub fn path(&self) -> &Path {
        self.named().unwrap_or(Path::new(Self::DEFAULT))
    }

    /// Named with `-c` or `CISCALE_CONFIG`: then it must exist (no fallback to the Picus environment), and it
    /// wins over the config a plan file names. An empty `CISCALE_CONFIG=` names nothing.
    pub fn is_explicit(&self) -> bool {
        self.named().is_some()
    }

    fn named(&self) -> Option<&Path> {
        self.config.as_deref().filter(|path| !path.as_os_str().is_empty())
    }
}

/// The per-owner lock `apply` and `watch` take, so cron and the daemon never act at the same time.
#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// How long to wait for another ciscale acting for the same owner id to finish (`0s`: give up at once)
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    pub lock_timeout: ciscale::model::GoDuration,
}

impl LockArgs {
    pub async fn acquire(&self, desired: &Desired) -> anyhow::Result<ciscale::watch::lock::OwnerLock> {
        let (dir, owner, timeout) = (ciscale::watch::lock::lock_dir(), desired.owner.clone(), self.lock_timeout.0);
        let lock = tokio::task::spawn_blocking(move || ciscale::watch::lock::OwnerLock::acquire(&dir, &owner, timeout))
            .await
            .context("the lock task failed")?;
        lock.map_err(|error| match error {
            held @ ciscale::watch::lock::LockError::Held { .. } => hinted(
                held.to_string(),
                "wait for it to finish, pass `--lock-timeout 5m` to wait, or stop the other one (cron and `watch` should not both run)",
            ),
            other => match other.hint() {
                Some(hint) => hinted(other.to_string(), hint),
                None => anyhow::Error::new(other),
            },
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what would change and why, and what it costs
    Plan(plan::PlanArgs),
    /// Carry out a plan (a saved plan file, or a fresh one after confirmation)
    Apply(apply::ApplyArgs),
    /// Observe, plan and apply every poll interval until stopped
    Watch(watch::WatchArgs),
    /// Check a config file and report every problem at once
    Validate(validate::ValidateArgs),
    /// Observe the world and write it out (for `plan --observed`)
    Observe(observe::ObserveArgs),
    /// Build the images of the config's `images:` section (Incus) and move their aliases
    Provision(provision::ProvisionArgs),
    /// Print the JSON schema of the config file
    Schema(schema::SchemaArgs),
    /// Print the version
    Version(version::VersionArgs),
    /// Convert another tool's config into a ciscale config (printed on stdout)
    Import(import::ImportArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(completions::CompletionsArgs),
    /// Print the man page (roff)
    Man(man::ManArgs),
    /// Replay a trace of jobs through the config's policy: queue waits, agent hours and cost, before spending money
    Simulate(simulate::SimulateArgs),
    /// Write job traces for `simulate`: from a CI source's history (`export`) or a bundled synthetic one
    Trace(trace::TraceArgs),
}

impl Command {
    /// The daemon reports what it does; one-shot commands stay quiet unless asked (apply shows its own progress).
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Watch(_) => "info",
            _ => "warn",
        }
    }

    pub async fn run(self, ui: &Ui) -> anyhow::Result<u8> {
        match self {
            Command::Plan(args) => plan::run(args, ui).await,
            Command::Apply(args) => apply::run(args, ui).await,
            Command::Watch(args) => watch::run(args, ui).await,
            Command::Validate(args) => validate::run(args, ui),
            Command::Observe(args) => observe::run(args, ui).await,
            Command::Provision(args) => provision::run(args, ui).await,
            Command::Schema(args) => schema::run(args),
            Command::Version(args) => version::run(args),
            Command::Import(args) => import::run(args),
            Command::Completions(args) => completions::run(args),
            Command::Man(args) => man::run(args),
            Command::Simulate(args) => simulate::run(args, ui),
            Command::Trace(args) => trace::run(args, ui).await,
        }
    }
}

/// What the terminal can do: colour on stdout and stderr, and whether a human is there to answer prompts.
#[derive(Debug, Clone)]
pub struct Ui {
    pub stdout_color: bool,
    pub stderr_color: bool,
    pub stderr_is_tty: bool,
    pub stdin_is_tty: bool,
}

impl Ui {
    pub fn from_args(global: &GlobalArgs) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        let decide = |is_tty: bool| match global.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => is_tty && !no_color,
        };
        let stderr_is_tty = std::io::stderr().is_terminal();
        Self {
            stdout_color: decide(std::io::stdout().is_terminal()),
            stderr_color: decide(stderr_is_tty),
            stderr_is_tty,
            stdin_is_tty: std::io::stdin().is_terminal(),
        }
    }

    /// Prints an error chain to stderr: the error, its causes, and a `hint:` where one is known.
    pub fn report(&self, error: &anyhow::Error) {
        if let Some(diagnostics) = error.downcast_ref::<ConfigError>().and_then(ConfigError::diagnostics) {
            eprint!("{}", render_config_error(diagnostics, self.stderr_color));
            return;
        }
        let (red, bold_end) = if self.stderr_color { ("\x1b[1;31m", "\x1b[0m") } else { ("", "") };
        eprintln!("{red}error{bold_end}: {error}");
        for cause in error.chain().skip(1) {
            // A config I/O error says its cause in its own message already.
            if cause.downcast_ref::<std::io::Error>().is_some()
                && error.chain().any(|outer| outer.downcast_ref::<ConfigError>().is_some())
            {
                continue;
            }
            eprintln!("  caused by: {cause}");
        }
        if let Some(hint) = hint_of(error) {
            eprintln!("  hint: {hint}");
        }
    }
}

/// The `hint:` of an error chain: a [`Hinted`] error's, else a config I/O error's.
pub fn hint_of(error: &anyhow::Error) -> Option<String> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Hinted>())
        .and_then(|hinted| hinted.hint.clone())
        .or_else(|| error.chain().find_map(|cause| cause.downcast_ref::<ConfigError>()).and_then(ConfigError::hint))
}

/// An error meant for a human, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Hinted {
    pub message: String,
    pub hint: Option<String>,
}

pub fn hinted(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Hinted { message: message.into(), hint: Some(hint.into()) })
}

/// `CISCALE_LOG` (an `EnvFilter` directive) wins; otherwise -q/-v pick the level. Logs go to stderr; with
/// `CISCALE_LOG_FORMAT=json` as JSON Lines.
pub fn init_logging(global: &GlobalArgs, default_level: &str) {
    let level = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => default_level,
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("CISCALE_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let json = std::env::var("CISCALE_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let color = match global.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let result = if json { builder.json().try_init() } else { builder.with_ansi(color).try_init() };
    // A second init only happens in tests; the first subscriber stays.
    drop(result);
}

/// Loads the config file. When none is named (`-c`, `CISCALE_CONFIG`) and `ciscale.yaml` does not exist, a Picus
/// environment (`PICUS_PROVIDER_TYPE` set) stands in for it, so a Picus docker-compose set-up runs unchanged; a
/// named file that does not exist is always an error. Warnings (secrets an offline command does not need, ...) go
/// to stderr.
pub fn load_config(arg: &ConfigArg, secrets: Secrets) -> anyhow::Result<Desired> {
    let path = arg.path();
    let vars = || -> std::collections::BTreeMap<String, String> { std::env::vars().collect() };
    if !path.exists() {
        let vars = vars();
        let picus = ciscale::import::picus::is_picus_env(&vars);
        if picus && !arg.is_explicit() {
            tracing::info!(config = %path.display(), "no config file; running in Picus mode from `PICUS_*` variables");
            let yaml = ciscale::import::picus::config_from_env(&vars).map_err(|error| {
                anyhow::anyhow!("no `{}` and the Picus environment is incomplete: {error}", path.display())
            })?;
            let loaded = config::load_str_with("Picus environment", &yaml, &|name| std::env::var(name).ok(), secrets)?;
            print_warnings(loaded.warnings.as_ref());
            return Ok(loaded.desired);
        }
        if picus {
            return Err(hinted(
                format!("cannot read config `{}`: no such file", path.display()),
                "`PICUS_*` variables stand in for a config only when none is named: fix the path, or drop `-c` (and \
                 `CISCALE_CONFIG`) to run in Picus mode",
            ));
        }
    }
    let loaded = config::load_file_with(path, secrets)?;
    print_warnings(loaded.warnings.as_ref());
    Ok(loaded.desired)
}

/// Config warnings on stderr, one `file:line:col: warning: ...` line each with its hint.
fn print_warnings(warnings: Option<&config::Diagnostics>) {
    if let Some(warnings) = warnings {
        eprint!("{}", warnings.render_plain());
    }
}

pub fn connect(desired: &Desired) -> anyhow::Result<Providers> {
    providers::connect(desired).map_err(|error| match error {
        providers::Error::Unsupported { provider, operation } => hinted(
            format!("the `{provider}` {operation} is not available in this build of ciscale"),
            "use `plan --observed FILE` to plan offline, or a `kind: fake` provider to try ciscale out",
        ),
        other => anyhow::Error::new(other).context("could not connect to the providers"),
    })
}

/// Reads an observation written by `ciscale observe` (YAML or JSON).
pub fn read_observed(path: &Path) -> anyhow::Result<Observed> {
    let text = std::fs::read_to_string(path).with_context(|| format!("could not read `{}`", path.display()))?;
    serde_yaml::from_str(&text).map_err(|error| {
        let location = error.location().map(|at| format!(":{}:{}", at.line(), at.column())).unwrap_or_default();
        hinted(
            format!("{}{location}: not a valid observation: {error}", path.display()),
            "write one with `ciscale observe -o FILE`",
        )
    })
}

pub async fn observe_live(desired: &Desired, providers: &Providers) -> anyhow::Result<Observed> {
    let observed = ciscale::observe::observe(desired, providers, jiff::Timestamp::now()).await?;
    Ok(observed)
}

/// Config problems, all at once: on a colour terminal as miette's labelled source snippets, otherwise (logs, CI,
/// tests) one `file:line:col: error: ...` line each with its hint.
fn render_config_error(diagnostics: &config::Diagnostics, color: bool) -> String {
    if color {
        let mut rendered = String::new();
        let handler = miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode());
        if handler.render_report(&mut rendered, diagnostics).is_ok() {
            return rendered;
        }
    }
    diagnostics.render_plain()
}
