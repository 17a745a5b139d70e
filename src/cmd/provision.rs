//! `ciscale provision`: build every image the config's `images:` section names (or the ones asked for).

use std::io::IsTerminal as _;

use clap::Args;

use ciscale::model::BackendKind;
use ciscale::providers::incus::provision::{self, ProvisionRequest};
use ciscale::providers::incus::Incus;

use super::{hinted, ConfigArg, Ui, EXIT_OK};

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only these images (default: all of them)
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
}

pub async fn run(args: ProvisionArgs, ui: &Ui) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config, ciscale::config::Secrets::Needed)?;
    if desired.images.is_empty() {
        return Err(hinted(
            format!("`{}` has no `images:` section: there is nothing to provision", args.config.path().display()),
            "add one, e.g. `images: { azure-agent: { backend: lxd, base: \"images:debian/12\", scripts: [provision/agent.sh] } }`, \
             and point the pools' `machine.image` at its name",
        ));
    }
    if let Some(unknown) = args.images.iter().find(|name| !desired.images.contains_key(*name)) {
        return Err(hinted(
            format!("image `{unknown}` is not in the config"),
            format!("the config's images are: {}", desired.images.keys().cloned().collect::<Vec<_>>().join(", ")),
        ));
    }
    for (name, spec) in &desired.images {
        if !args.images.is_empty() && !args.images.contains(name) {
            continue;
        }
        let incus = match desired.backends.get(&spec.backend).map(|backend| &backend.kind) {
            Some(BackendKind::Incus { socket, project }) => Incus::new(socket.as_deref(), project.as_deref()),
            Some(other) => {
                return Err(hinted(
                    format!("image `{name}`: `provision` builds images on incus backends, not `{}`", other.name()),
                    "point the image's `backend` at an incus backend",
                ))
            }
            None => return Err(hinted(format!("image `{name}`: backend `{}` is not configured", spec.backend), "")),
        };
        let request = ProvisionRequest {
            name: name.clone(),
            owner: desired.owner.clone(),
            spec: spec.clone(),
            agent_url: spec.agent_url.clone(),
        };
        // A spinner on a terminal (publishing takes a while and Incus reports no byte counts for it); plain log
        // lines otherwise.
        let spinner = (ui.stderr_is_tty && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        let progress = |message: &str| match &spinner {
            Some(bar) => bar.set_message(format!("{name}: {message}")),
            None => eprintln!("{name}: {message}"),
        };
        let result = provision::provision(&incus, &request, &progress).await;
        if let Some(bar) = &spinner {
            bar.finish_and_clear();
        }
        let built = result?;
        println!(
            "image `{}` → {}{}{}",
            built.alias,
            &built.fingerprint[..built.fingerprint.len().min(12)],
            built.previous.map(|p| format!(" (was {})", &p[..p.len().min(12)])).unwrap_or_default(),
            if built.pruned.is_empty() { String::new() } else { format!(", pruned {}", built.pruned.len()) }
        );
    }
    Ok(EXIT_OK)
}
