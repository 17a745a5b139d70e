//! `ciscale watch`: the daemon. Observe, plan and apply every poll interval; SIGTERM finishes in-flight steps.

use std::io::Write as _;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use ciscale::watch::metrics::{self, Metrics};
use ciscale::watch::{self, WatchOptions};

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
    /// Stop after this many cycles (for trials and tests); default: run until SIGTERM
    #[arg(long, value_name = "N")]
    pub cycles: Option<u64>,
}

pub async fn run(args: WatchArgs, _ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config)?;
    let _lock = args.lock.acquire(&desired).await?;
    let mut providers = super::connect(&desired)?;
    let mut metrics = None;
    if let Some(spec) = &desired.metrics {
        let allowed_silence = desired.poll_interval.0.max(std::time::Duration::from_secs(1)) * spec.unhealthy_after;
        let shared = Arc::new(Metrics::new(allowed_silence));
        let bound = metrics::serve(spec.listen, shared.clone())
            .await
            .with_context(|| format!("could not listen on `{}` for metrics", spec.listen))?;
        tracing::info!(%bound, "serving /metrics and /healthz");
        providers = metrics::instrument(&providers, &shared);
        metrics = Some(shared);
    }
    let cancel = watch::shutdown_signal();
    let options = WatchOptions { cycles: args.cycles, ..WatchOptions::default() };
    tracing::info!(owner = %desired.owner, pools = desired.pools.len(), interval = %desired.poll_interval, "watching");
    // Incus backends wake the loop on their lifecycle events; the interval stays as the safety net.
    let triggers = watch::triggers::from_config(&desired);
    watch::run_with_triggers(&desired, &providers, &options, &cancel, triggers, |report| {
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
            tracing::info!(
                cycle = report.cycle,
                applied = report.applied,
                failed = report.failed,
                ms = report.duration_ms,
                "cycle done"
            );
        }
    })
    .await;
    tracing::info!("stopped");
    Ok(EXIT_OK)
}
