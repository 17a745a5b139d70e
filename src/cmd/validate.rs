//! `ciscale validate`: load the config, report every problem at once, touch nothing else.

use clap::Args;

use super::{ConfigArg, Ui};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: ValidateArgs, _ui: &Ui) -> anyhow::Result<u8> {
    // Validation never uses a secret's value: a pull-request pipeline can run it without production secrets.
    let desired = super::load_config(&args.config, ciscale::config::Secrets::Unused)?;
    println!(
        "`{}` is valid: owner `{}`, {} pool(s), {} ci source(s), {} backend(s)",
        args.config.path().display(),
        desired.owner,
        desired.pools.len(),
        desired.ci.len(),
        desired.backends.len()
    );
    Ok(super::EXIT_OK)
}
