//! `ciscale observe`: ask every provider once and write the observation, for `plan --observed`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{ConfigArg, Ui};

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Write to this file instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// JSON instead of YAML
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ObserveArgs, _ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config, ciscale::config::Secrets::Needed)?;
    let observed = super::observe_live(&desired, &super::connect(&desired)?).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&observed).map(|json| json + "\n")?
    } else {
        serde_yaml::to_string(&observed)?
    };
    match &args.output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("could not write `{}`", path.display()))?;
            eprintln!("wrote the observation to `{}`", path.display());
        }
        None => print!("{text}"),
    }
    Ok(super::EXIT_OK)
}
