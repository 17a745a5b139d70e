//! `ciscale watch`: the daemon. Observe, plan and apply every poll interval; SIGTERM finishes in-flight steps;
//! SIGHUP reloads the config (an invalid one is logged and the running one stays).

use std::io::Write as _;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use ciscale::model::Desired;
use ciscale::providers::Providers;
use ciscale::watch::metrics::{self, Metrics};
use ciscale::watch::webhooks::Webhooks;
use ciscale::watch::{self, Reloaded, WatchOptions};
use tokio::sync::mpsc;

use super::{ConfigArg, Ui, EXIT_OK};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print one JSON line per cycle on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub lock: super::LockArgs,
    /// Stop after this many cycles (for trials and tests) and exit 1 if the last one failed; default: run until
    /// SIGTERM
    #[arg(long, value_name = "N")]
    pub cycles: Option<u64>,
}

pub async fn run(args: WatchArgs, _ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config, ciscale::config::Secrets::Needed)?;
    let _lock = args.lock.acquire(&desired).await?;
    let mut providers = super::connect(&desired)?;
    let mut metrics = None;
    let mut webhooks = None;
    let mut webhook_triggers = None;
    if let Some(spec) = &desired.metrics {
        let allowed_silence = desired.poll_interval.0.max(std::time::Duration::from_secs(1)) * spec.unhealthy_after;
        let shared = Arc::new(Metrics::new(allowed_silence));
        providers = metrics::instrument(&providers, &shared);
        // The one listener also takes the CI sources' webhook deliveries, which wake the loop like Incus events.
        let (routes, triggers) = Webhooks::new(&providers.ci, shared.clone());
        let bound = metrics::serve_with(spec.listen, shared.clone(), Some(routes.clone()))
            .await
            .with_context(|| format!("could not listen on `{}` for metrics", spec.listen))?;
        let receiving: Vec<String> = routes.receiving().iter().map(|name| format!("/webhooks/{name}")).collect();
        if receiving.is_empty() {
            tracing::info!(%bound, "serving /metrics and /healthz");
        } else {
            tracing::info!(%bound, "serving /metrics, /healthz and {}", receiving.join(", "));
        }
        metrics = Some(shared);
        webhooks = Some(routes);
        webhook_triggers = Some(triggers);
    } else {
        warn_unreceived_webhooks(&providers);
    }
    let cancel = watch::shutdown_signal();
    let options = WatchOptions { cycles: args.cycles, inspect: plan_trace()?, ..WatchOptions::default() };
    tracing::info!(owner = %desired.owner, pools = desired.pools.len(), interval = %desired.poll_interval, "watching");
    // Incus backends wake the loop on their lifecycle events; the interval stays as the safety net.
    let mut triggers = watch::triggers::from_config(&desired);
    triggers.extend(webhook_triggers);
    let reloads = listen_for_reloads(args.config.clone(), &desired, metrics.clone(), webhooks);
    // With `--cycles`, the exit code says how the last cycle went (a trial or a test wants to know); a daemon
    // stopped by SIGTERM exits 0.
    let mut last_failed = None;
    // What the last logged cycle saw: a quiet cycle that sees the same is logged at debug, not info, so the
    // journal holds changes rather than one identical line every few seconds.
    let mut last_seen: Option<String> = None;
    watch::run_reloadable(desired, providers, &options, &cancel, triggers, reloads, |report| {
        last_failed = Some(report.error.is_some() || report.failed > 0);
        if let Some(metrics) = &metrics {
            metrics.record_cycle(report);
        }
        if args.json {
            if let Ok(line) = serde_json::to_string(report) {
                let mut stdout = std::io::stdout().lock();
                // A closed stdout (a pipe whose reader left) must not stop the daemon.
                drop(writeln!(stdout, "{line}").and_then(|()| stdout.flush()));
            }
        } else if let Some(error) = &report.error {
            tracing::warn!(cycle = report.cycle, "cycle failed: {error}");
        } else {
            let seen = serde_json::to_string(&(&report.planned, &report.pools)).unwrap_or_default();
            let quiet =
                report.started == 0 && report.applied == 0 && report.failed == 0 && last_seen.as_ref() == Some(&seen);
            if quiet {
                tracing::debug!(cycle = report.cycle, ms = report.duration_ms, "cycle done, nothing changed");
            } else {
                let pools = report
                    .pools
                    .iter()
                    .map(|pool| {
                        format!(
                            "{}: jobs {} pending, {} running; agents {} active, {} desired",
                            pool.pool, pool.pending_jobs, pool.running_jobs, pool.active, pool.desired
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::info!(
                    cycle = report.cycle,
                    started = report.started,
                    in_flight = report.in_flight,
                    applied = report.applied,
                    failed = report.failed,
                    ms = report.duration_ms,
                    pools,
                    "cycle done"
                );
            }
            last_seen = Some(seen);
        }
    })
    .await;
    tracing::info!("stopped");
    match last_failed {
        Some(true) if args.cycles.is_some() => Err(super::hinted(
            "the last cycle failed",
            "see the log above (with `--json`: the last line's `error` and `failed`)",
        )),
        _ => Ok(EXIT_OK),
    }
}

/// On every SIGHUP: read and validate the config again and hand it to the loop, which switches at its next cycle.
/// `None` where there is no SIGHUP (or its handler cannot be installed): the config then stays as started.
fn listen_for_reloads(
    config: ConfigArg,
    running: &Desired,
    metrics: Option<Arc<Metrics>>,
    webhooks: Option<Arc<Webhooks>>,
) -> Option<mpsc::Receiver<Reloaded>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before the first cycle, so a HUP from then on reloads instead of ending the process.
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "could not listen for SIGHUP; config reloads are unavailable");
                return None;
            }
        };
        let (sender, receiver) = mpsc::channel(4);
        let (owner, listen) = (running.owner.clone(), running.metrics.as_ref().map(|spec| spec.listen));
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!(config = %config.path().display(), "SIGHUP: reloading the config");
                match reload(&config, &owner, listen, metrics.as_ref(), webhooks.as_deref()) {
                    Ok(reloaded) => {
                        if sender.send(reloaded).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::error!(
                        "config reload failed; the running config stays in effect:\n{}",
                        error_text(&error)
                    ),
                }
            }
        });
        Some(receiver)
    }
    #[cfg(not(unix))]
    {
        let _ = (config, running, metrics, webhooks);
        None
    }
}

/// Loads, validates and connects a new config. What a running daemon cannot change (its owner id, which its lock
/// is held for; the metrics address it listens on) is refused or kept with a warning.
fn reload(
    config: &ConfigArg,
    owner: &str,
    listen: Option<std::net::SocketAddr>,
    metrics: Option<&Arc<Metrics>>,
    webhooks: Option<&Webhooks>,
) -> anyhow::Result<Reloaded> {
    let desired = super::load_config(config, ciscale::config::Secrets::Needed)?;
    if desired.owner != owner {
        return Err(super::hinted(
            format!("the new config's `id` is `{}`, the running one acts for `{owner}`", desired.owner),
            "a running `watch` keeps its owner id (it holds that owner's lock): restart it to change `id`",
        ));
    }
    let new_listen = desired.metrics.as_ref().map(|spec| spec.listen);
    if new_listen != listen {
        tracing::warn!("`metrics.listen` changed; the metrics endpoint moves on the next restart");
    }
    let mut providers = super::connect(&desired)?;
    if let Some(metrics) = metrics {
        providers = metrics::instrument(&providers, metrics);
    }
    let mut triggers = watch::triggers::from_config(&desired);
    match webhooks {
        // Deliveries go to the new sources from now on; the loop takes their wake-ups with the new config's
        // triggers (it drops the old ones when it switches).
        Some(webhooks) => triggers.push(webhooks.replace(&providers.ci)),
        None => warn_unreceived_webhooks(&providers),
    }
    Ok(Reloaded { desired, providers, triggers })
}

/// Without `metrics.listen` nothing listens for webhooks: say so for each source that expects them (polling
/// still finds its jobs, only later).
fn warn_unreceived_webhooks(providers: &Providers) {
    for (name, source) in &providers.ci {
        if source.webhook_max_body().is_some() {
            tracing::warn!(
                source = %name,
                "ci source `{name}` takes webhooks, but `watch` has no listener for them; polling finds its jobs \
                 every `pollInterval`\n  hint: set `metrics: {{ listen: ADDRESS:PORT }}` and point the webhook at \
                 http(s)://HOST/webhooks/{name}"
            );
        }
    }
}

/// An error as plain text for a log line: config problems one `file:line:col: error: ...` line each, other errors
/// with their causes and hint.
fn error_text(error: &anyhow::Error) -> String {
    if let Some(diagnostics) = error.downcast_ref::<ciscale::config::ConfigError>().and_then(|e| e.diagnostics()) {
        return super::render_config_error(diagnostics, false).trim_end().to_owned();
    }
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    if let Some(hint) = super::hint_of(error) {
        text.push_str("\n  hint: ");
        text.push_str(&hint);
    }
    text
}

/// `CISCALE_PLAN_TRACE=FILE`: append one JSON line per cycle — the config hash, the observation and the plan — to
/// FILE. For tests (the safety oracle judges every plan an end-to-end run made, across restarts of the daemon)
/// and for replaying a cycle offline (`plan --observed`). Observations and plans hold no secrets.
fn plan_trace() -> anyhow::Result<Option<watch::PlanInspector>> {
    let Some(path) = std::env::var_os("CISCALE_PLAN_TRACE").filter(|path| !path.is_empty()) else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open the plan trace `{}` (`CISCALE_PLAN_TRACE`)", path.display()))?;
    // A process killed mid-line leaves the file without its last newline: end that torn line, so this process's
    // first line stays whole.
    let torn = last_byte(&path).is_some_and(|last| last != b'\n');
    if torn {
        std::io::Write::write_all(&mut &file, b"\n")
            .with_context(|| format!("cannot write the plan trace `{}`", path.display()))?;
    }
    let file = std::sync::Mutex::new(file);
    Ok(Some(watch::PlanInspector::new(move |desired, observed, plan| {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            config_hash: &'a str,
            observed: &'a ciscale::model::Observed,
            plan: &'a ciscale::plan::Plan,
        }
        let line = Line { config_hash: &desired.config_hash, observed, plan };
        if let (Ok(mut text), Ok(mut file)) = (serde_json::to_string(&line), file.lock()) {
            text.push('\n');
            // One write per line, so lines of a killed process are whole or absent; a failed write only loses the
            // trace, never the cycle.
            if let Err(error) = std::io::Write::write_all(&mut *file, text.as_bytes()) {
                tracing::warn!(error = %error, path = %path.display(), "could not write the plan trace");
            }
        }
    })))
}

fn last_byte(path: &std::path::Path) -> Option<u8> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(std::io::SeekFrom::End(-1)).ok()?;
    let mut byte = [0u8];
    file.read_exact(&mut byte).ok()?;
    Some(byte[0])
}
