//! `ciscale version`.

use clap::Args;

#[derive(Debug, Args)]
pub struct VersionArgs {}

pub fn run(_args: VersionArgs) -> anyhow::Result<u8> {
    println!("ciscale {}", env!("CARGO_PKG_VERSION"));
    Ok(super::EXIT_OK)
}
