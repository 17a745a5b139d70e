//! The `ciscale` binary: parse arguments, set up logging and colour, dispatch to a subcommand, map the outcome
//! to an exit code. Every subcommand lives in its own file under `cmd/`.
//!
//! Exit codes: 0 success, 1 any error (usage errors included: clap's own 2 would read as "changes" to a script
//! using `plan --detailed-exitcode`), 2 only from `plan --detailed-exitcode` when the plan has changes.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // `--help` and `--version` come through here too: they print on stdout and succeed.
            let code = if error.use_stderr() { cmd::EXIT_ERROR } else { cmd::EXIT_OK };
            // Printing can only fail on a closed stream, and there is nobody left to tell then.
            drop(error.print());
            return ExitCode::from(code);
        }
    };
    let ui = cmd::Ui::from_args(&cli.global);
    cmd::init_logging(&cli.global, cli.command.default_log_level());

    // One thread: every subcommand waits on APIs far more than it computes (a plan of a large fleet takes
    // milliseconds; `simulate` runs its compared configs on threads of its own), and a runtime with a worker per
    // core would make the daemon's memory grow with the host it runs on: each worker brings a stack and a malloc
    // arena (about 0.3 MiB each, measured with `cargo bench --bench rss`).
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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
