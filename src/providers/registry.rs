//! Turns the config's `ci:` and `backends:` sections into live provider handles.

use std::sync::Arc;

use super::fake::{FakeWorld, JobFeed};
use super::{Backend, CiCapabilities, CiSource, Providers, Result};
use crate::model::{BackendKind, CiKind, CiName, Desired, FakeSpec, AZURE_POOL_LABEL};
use crate::simulate::synthetic::Profile;

/// Connects to every provider the config names. No network call is made here: the first call is the first
/// observation, so a `plan --observed` never needs this at all.
pub fn connect(desired: &Desired) -> Result<Providers> {
    // A fake backend and a fake CI must share one world, or the fake CI could not see the instances its agents
    // run on. File-backed worlds share through their file (each handle keeps its own `simulate`); in-memory ones
    // share one handle, which simulates if any in-memory fake asks for it.
    let in_memory_simulates = fake_specs(desired).any(|spec| spec.state_file.is_none() && spec.simulate);
    let mut in_memory: Option<FakeWorld> = None;
    let mut world_for = |spec: &FakeSpec| -> Result<FakeWorld> {
        if spec.state_file.is_some() {
            return FakeWorld::open(spec);
        }
        let shared = FakeSpec { state_file: None, simulate: in_memory_simulates, jobs: None };
        Ok(match &in_memory {
            Some(world) => world.clone(),
            None => in_memory.insert(FakeWorld::open(&shared)?).clone(),
        })
    };

    let mut providers = Providers::default();
    for (name, spec) in &desired.backends {
        let backend: Arc<dyn Backend> = match &spec.kind {
            BackendKind::Fake(fake) => Arc::new(world_for(fake)?.backend()),
            BackendKind::Hcloud { token, endpoint } => {
                let from_env = std::env::var(super::hcloud::ENDPOINT_ENV).ok();
                let settings =
                    super::hcloud::HcloudSettings::new(token.clone(), endpoint.as_deref(), from_env.as_deref());
                Arc::new(super::hcloud::Hcloud::new(settings)?)
            }
            BackendKind::Aws { region, endpoint } => Arc::new(super::aws::Ec2::new(super::aws::Ec2Settings {
                region: region.clone(),
                endpoint: endpoint.clone(),
                ..Default::default()
            })),
            BackendKind::Incus { socket, project } => {
                Arc::new(super::incus::Incus::new(socket.as_deref(), project.as_deref()))
            }
        };
        providers.backends.insert(name.clone(), backend);
    }
    for (name, spec) in &desired.ci {
        let source: Arc<dyn CiSource> = match &spec.kind {
            CiKind::Fake(fake) => {
                let world = world_for(fake)?;
                if let Some(feed) = &fake.jobs {
                    world.set_job_feed(job_feed(desired, name, feed));
                }
                Arc::new(world.ci())
            }
            CiKind::Forgejo { server, token, scope, runner_url, runner_release } => {
                Arc::new(forgejo(server, token, scope, runner_url.as_deref(), runner_release.as_ref())?)
            }
            CiKind::Woodpecker { server, token, grpc_address } => {
                Arc::new(super::woodpecker::Woodpecker::new(server, token.clone(), grpc_address.as_deref())?)
            }
            CiKind::Github(github) => Arc::new(super::github::GithubActions::new(
                super::github::GithubSettings::from_spec(github, &desired.owner),
            )?),
            CiKind::AzurePipelines { organization_url, pat, agent_pat } => {
                Arc::new(super::azure_pipelines::AzurePipelines::new(super::azure_pipelines::AzureSettings {
                    agent_pat: agent_pat.clone(),
                    // The source reads only the Azure pools its own pools are bound to.
                    pools: desired
                        .pools
                        .iter()
                        .filter(|pool| &pool.ci.source == name)
                        .filter_map(|pool| Some((pool.name.clone(), pool.ci.labels.get(AZURE_POOL_LABEL)?.clone())))
                        .collect(),
                    ..super::azure_pipelines::AzureSettings::new(organization_url.clone(), pat.clone())
                })?)
            }
        };
        providers.ci.insert(name.clone(), source);
    }
    Ok(providers)
}

/// The feed of a fake CI: the configured synthetic profile, with one job template per pool of that source.
fn job_feed(desired: &Desired, source: &CiName, feed: &crate::model::JobFeed) -> JobFeed {
    let (templates, skipped) = crate::simulate::synthetic::templates_for(desired, Some(source));
    if !skipped.is_empty() {
        tracing::warn!(ci = %source, pools = ?skipped, "fake ci: no made-up job fits these pools; they get none");
    }
    // The config checked the name; an unknown one (a hand-built `Desired`) falls back to the demo.
    let profile = feed.profile.parse::<Profile>().unwrap_or(Profile::Demo);
    JobFeed { profile, seed: feed.seed, templates }
}

fn fake_specs(desired: &Desired) -> impl Iterator<Item = &FakeSpec> {
    let backends = desired.backends.values().filter_map(|spec| match &spec.kind {
        BackendKind::Fake(fake) => Some(fake),
        _ => None,
    });
    let ci = desired.ci.values().filter_map(|spec| match &spec.kind {
        CiKind::Fake(fake) => Some(fake),
        _ => None,
    });
    backends.chain(ci)
}

/// What a configured CI source can do and how its agents launch, known from the config alone (the planner and
/// config validation have no live source): each room's own `CAPABILITIES`, which its [`CiSource::capabilities`]
/// also returns.
pub fn ci_capabilities(kind: &CiKind) -> CiCapabilities {
    match kind {
        CiKind::Woodpecker { .. } => super::woodpecker::CAPABILITIES,
        CiKind::AzurePipelines { .. } => super::azure_pipelines::CAPABILITIES,
        CiKind::Github(_) => super::github::CAPABILITIES,
        CiKind::Forgejo { .. } => super::forgejo::CAPABILITIES,
        CiKind::Fake(_) => super::fake::CI_CAPABILITIES,
    }
}

/// The Forgejo source of a config entry (validated by the config already; re-checked here, never trusted).
fn forgejo(
    server: &str,
    token: &crate::model::Secret,
    scope: &crate::model::ForgejoScope,
    runner_url: Option<&str>,
    runner_release: Option<&crate::model::RunnerReleaseSpec>,
) -> Result<super::forgejo::Forgejo> {
    use super::forgejo::{launch, Forgejo, ForgejoSettings, Scope};
    let scope = match scope {
        crate::model::ForgejoScope::Instance => Scope::Instance,
        crate::model::ForgejoScope::Organization(org) => Scope::Organization(org.clone()),
        crate::model::ForgejoScope::Repository { owner, repo } => {
            Scope::Repository { owner: owner.clone(), repo: repo.clone() }
        }
        crate::model::ForgejoScope::User => Scope::User,
    };
    let invalid = |message: String| super::Error::Invalid { provider: "forgejo".to_owned(), message };
    let runner_release = runner_release
        .map(|release| {
            let arch = match release.arch.as_str() {
                "amd64" => launch::Arch::Amd64,
                "arm64" => launch::Arch::Arm64,
                other => return Err(invalid(format!("runner arch `{other}` is neither `amd64` nor `arm64`"))),
            };
            launch::RunnerRelease::new(&release.version, arch, &release.sha256)
                .map_err(|error| invalid(error.to_string()))
        })
        .transpose()?;
    Forgejo::new(ForgejoSettings {
        runner_url: runner_url.map(str::to_owned),
        runner_release,
        ..ForgejoSettings::new(server, token.clone(), scope)
    })
}
