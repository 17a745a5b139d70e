//! `ciscale man`: the man page (roff), generated from the clap definitions:
//! `ciscale man > /usr/local/share/man/man1/ciscale.1`.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};

#[derive(Debug, Args)]
pub struct ManArgs {}

pub fn run(_args: ManArgs) -> anyhow::Result<u8> {
    // Upper-case title, as man pages have it (`.TH CISCALE 1`).
    let page = clap_mangen::Man::new(super::Cli::command()).title("CISCALE");
    let mut roff = Vec::new();
    page.render(&mut roff).context("could not render the man page")?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&roff).and_then(|()| stdout.flush()).context("could not write the man page")?;
    Ok(super::EXIT_OK)
}
