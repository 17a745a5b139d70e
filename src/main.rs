//! The `ciscale` binary: parse arguments, set up logging and colour, dispatch to a subcommand, map the outcome
//! to an exit code. Every subcommand lives in its own file under `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    let ui = cmd::Ui::from_args(&cli.global);
    cmd::init_logging(&cli.global, cli.command.default_log_level());

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::from(cmd::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli.command.run(&ui)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            ui.report(&error);
            ExitCode::from(cmd::EXIT_ERROR)
        }
    }
}
