//! `ciscale import <FORMAT> [FILE]`: convert another tool's config into a ciscale config on stdout; what to set
//! and what did not carry over goes to stderr. One subcommand per format.

use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use ciscale::import::incus_azure_pipelines;

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub format: ImportFormat,
}

#[derive(Debug, Subcommand)]
pub enum ImportFormat {
    /// An incus-azure-pipelines config (YAML)
    #[command(name = "incus-azure-pipelines")]
    IncusAzurePipelines(FileArg),
    /// A Picus set-up, read from its `PICUS_*` environment variables (as in its docker-compose file)
    Picus,
}

#[derive(Debug, Args)]
pub struct FileArg {
    /// The file to convert; `-` or nothing reads stdin
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl FileArg {
    fn read(&self) -> anyhow::Result<(String, String)> {
        match &self.file {
            Some(path) if path.as_os_str() != "-" => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
                Ok((path.display().to_string(), text))
            }
            _ => {
                // On a terminal, an import waiting for input looks like a hang: say what it waits for.
                if std::io::stdin().is_terminal() {
                    eprintln!("reading the config from standard input (end it with Ctrl-D), or pass it as FILE");
                }
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
                Ok(("stdin".to_owned(), text))
            }
        }
    }
}

pub fn run(args: ImportArgs) -> anyhow::Result<u8> {
    match args.format {
        ImportFormat::IncusAzurePipelines(file) => {
            let (name, text) = file.read()?;
            let imported = incus_azure_pipelines::convert(&text).with_context(|| format!("cannot convert `{name}`"))?;
            print!("{}", imported.config);
            for (variable, pools) in &imported.env {
                eprintln!(
                    "hint: set `{variable}` to the PAT of pool(s) {} (the `azure.pat` in `{name}`); the config reads \
                     it from the environment and never stores it",
                    pools.iter().map(|pool| format!("`{pool}`")).collect::<Vec<_>>().join(", ")
                );
            }
            for note in &imported.notes {
                eprintln!("note: {note}");
            }
            Ok(super::EXIT_OK)
        }
        ImportFormat::Picus => {
            let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            let yaml =
                ciscale::import::picus::config_from_env(&vars).context("cannot convert the Picus environment")?;
            print!("{yaml}");
            eprintln!(
                "hint: the config reads the secrets from the same `PICUS_*` variables; keep them set where ciscale runs"
            );
            Ok(super::EXIT_OK)
        }
    }
}
