//! `ciscale completions <SHELL>`: a shell completion script, generated from the clap definitions (so it cannot
//! fall behind the real flags).

use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for, e.g. `bash`: `ciscale completions bash > /etc/bash_completion.d/ciscale`
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<u8> {
    let mut command = super::Cli::command();
    clap_complete::generate(args.shell, &mut command, "ciscale", &mut std::io::stdout().lock());
    Ok(super::EXIT_OK)
}
