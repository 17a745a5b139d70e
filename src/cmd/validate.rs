//! `ciscale validate`: load the config, report every problem at once, touch nothing else.

use clap::Args;

use super::{ConfigArg, Ui};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: ValidateArgs, _ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config)?;
    println!(
        "`{}` is valid: owner `{}`, {} pool(s), {} ci source(s), {} backend(s)",
        args.config.config.display(),
        desired.owner,
        desired.pools.len(),
        desired.ci.len(),
        desired.backends.len()
    );
    Ok(super::EXIT_OK)
}
