//! `ciscale schema`: the JSON schema of `ciscale.yaml`, for editors and CI linters.

use clap::Args;

#[derive(Debug, Args)]
pub struct SchemaArgs {}

pub fn run(_args: SchemaArgs) -> anyhow::Result<u8> {
    print!("{}", ciscale::config::schema_json());
    Ok(super::EXIT_OK)
}
