//! `ciscale man`: the man page (roff), generated from the clap definitions:
//! `ciscale man > /usr/local/share/man/man1/ciscale.1`.
//!
//! One page for the whole tool: clap_mangen's own SUBCOMMANDS section points at `ciscale-plan(1)` pages that are
//! never installed, so the commands and their options are rendered here instead, followed by ENVIRONMENT and
//! EXIT STATUS (what a script and an operator need most).

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};

#[derive(Debug, Args)]
pub struct ManArgs {}

/// Variables ciscale reads, and what for.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("CISCALE_CONFIG", "The config file when no -c is given (default: ciscale.yaml in the current folder)."),
    ("CISCALE_LOG", "A tracing filter for the log on stderr, e.g. ciscale=debug; wins over -v and -q."),
    ("CISCALE_LOG_FORMAT", "json: log lines as JSON (for log shippers)."),
    (
        "CISCALE_LOCK_DIR",
        "Where apply and watch take their per-owner lock; the daemon and cron must use the same one. Default: \
         $XDG_RUNTIME_DIR/ciscale, else /tmp/ciscale.",
    ),
    ("NO_COLOR", "Any non-empty value turns colour off when --color is auto."),
    ("HCLOUD_ENDPOINT", "The Hetzner Cloud API URL when a hcloud backend sets no endpoint (tests, proxies)."),
    (
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL_EC2",
        "The standard AWS credential and endpoint chain for aws backends.",
    ),
    (
        "PICUS_*",
        "With no config file and PICUS_PROVIDER_TYPE set (and no -c or CISCALE_CONFIG), ciscale runs a Picus set-up \
         from its variables.",
    ),
    (
        "Variables named in the config",
        "Every ${VAR} in ciscale.yaml is read from the environment. Secrets (tokens, PATs, secretEnv) are needed by \
         apply, watch, observe and provision; validate and plan --observed only warn when they are unset.",
    ),
];

/// Exit codes, for every command.
const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success (plan without --detailed-exitcode: also when there are changes)."),
    (
        "1",
        "Any error: invalid arguments or config, a provider that could not be reached, a stale or foreign plan \
         file, a change that failed, apply not confirmed, the lock held by another ciscale, watch --cycles whose \
         last cycle failed.",
    ),
    ("2", "Only plan --detailed-exitcode: the plan has changes."),
];

pub fn run(_args: ManArgs) -> anyhow::Result<u8> {
    let mut command = super::Cli::command();
    command.build();
    // Upper-case title, as man pages have it (`.TH CISCALE 1`).
    let page = clap_mangen::Man::new(command.clone()).title("CISCALE");
    let mut roff = Vec::new();
    let render = |roff: &mut Vec<u8>| -> std::io::Result<()> {
        page.render_title(roff)?;
        page.render_name_section(roff)?;
        page.render_synopsis_section(roff)?;
        page.render_description_section(roff)?;
        page.render_options_section(roff)?;
        roff.extend_from_slice(commands_section(&command).as_bytes());
        roff.extend_from_slice(list_section("ENVIRONMENT", ENVIRONMENT).as_bytes());
        roff.extend_from_slice(list_section("EXIT STATUS", EXIT_STATUS).as_bytes());
        page.render_version_section(roff)
    };
    render(&mut roff).context("could not render the man page")?;
    // Each section rendered on its own repeats clap_mangen's two-line preamble; the page needs it once.
    let text = String::from_utf8_lossy(&roff).into_owned();
    let preamble = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    let roff = match text.split_once(preamble) {
        Some((before, after)) => format!("{before}{preamble}{}", after.replace(preamble, "")).into_bytes(),
        None => roff,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&roff).and_then(|()| stdout.flush()).context("could not write the man page")?;
    Ok(super::EXIT_OK)
}

/// Text safe in a roff line: backslashes and hyphens escaped, a leading `.` or `'` defused.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn bold(text: &str) -> String {
    format!("\\fB{}\\fR", escape(text))
}

fn list_section(title: &str, items: &[(&str, &str)]) -> String {
    let mut out = if title.contains(' ') { format!(".SH \"{title}\"\n") } else { format!(".SH {title}\n") };
    for (name, text) in items {
        out.push_str(&format!(".TP\n{}\n{}\n", bold(name), escape(text)));
    }
    out
}

/// COMMANDS: every subcommand (and `import`'s formats) with its usage line, what it does, and its own options.
fn commands_section(cli: &clap::Command) -> String {
    let mut out = String::from(".SH COMMANDS\n");
    let mut commands: Vec<(String, &clap::Command)> = Vec::new();
    for sub in cli.get_subcommands().filter(|sub| !sub.is_hide_set() && sub.get_name() != "help") {
        if sub.has_subcommands() {
            for nested in sub.get_subcommands().filter(|nested| !nested.is_hide_set() && nested.get_name() != "help") {
                commands.push((format!("{} {}", sub.get_name(), nested.get_name()), nested));
            }
        } else {
            commands.push((sub.get_name().to_owned(), sub));
        }
    }
    for (name, command) in commands {
        let positionals: Vec<String> = command
            .get_positionals()
            .map(|arg| {
                let value = arg
                    .get_value_names()
                    .and_then(|names| names.first())
                    .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string);
                if arg.is_required_set() {
                    value
                } else {
                    format!("[{value}]")
                }
            })
            .collect();
        let usage =
            format!("ciscale {name} [OPTIONS]{}", positionals.iter().map(|p| format!(" {p}")).collect::<String>());
        out.push_str(&format!(".TP\n{}\n", bold(&usage)));
        if let Some(about) = command.get_about() {
            out.push_str(&format!("{}\n", escape(&about.to_string())));
        }
        let options: Vec<&clap::Arg> = command
            .get_arguments()
            .filter(|arg| !arg.is_hide_set() && !arg.is_global_set())
            .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
            .collect();
        if options.is_empty() {
            continue;
        }
        out.push_str(".RS\n");
        for arg in options {
            let value = arg.get_value_names().and_then(|names| names.first()).map(ToString::to_string);
            let flag = match (arg.get_short(), arg.get_long(), &value) {
                (_, None, Some(value)) => format!("\\fI{}\\fR", escape(value)),
                (short, Some(long), value) => {
                    let short = short.map(|short| format!("{}, ", bold(&format!("-{short}")))).unwrap_or_default();
                    let value = match value {
                        Some(value) if arg.get_action().takes_values() => format!("=\\fI{}\\fR", escape(value)),
                        _ => String::new(),
                    };
                    format!("{short}{}{value}", bold(&format!("--{long}")))
                }
                _ => escape(arg.get_id().as_str()),
            };
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let env = arg.get_env().map(|env| format!(" [env: {}]", env.to_string_lossy())).unwrap_or_default();
            out.push_str(&format!(".TP\n{flag}\n{}\n", escape(&format!("{help}{env}"))));
        }
        out.push_str(".RE\n");
    }
    out
}
