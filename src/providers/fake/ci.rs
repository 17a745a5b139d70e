//! The fake CI: a Woodpecker-like server with per-agent tokens, `no_schedule` and a queue.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::model::{AgentId, CiObservation, Secret};
use crate::providers::{AgentCredential, CiCapabilities, CiSource, CloudLaunch, Error, Launch, RegisterAgent, Result};

use super::state::{sha256_hex, FakeAgent, WorldState};
use super::{FakeWorld, Op};

/// The fake world's [`CiSource`] (kind `fake`).
#[derive(Debug, Clone)]
pub struct FakeCi {
    world: FakeWorld,
}

impl FakeCi {
    pub(super) fn new(world: FakeWorld) -> Self {
        Self { world }
    }

    pub fn world(&self) -> &FakeWorld {
        &self.world
    }
}

fn not_found(id: &AgentId) -> Error {
    Error::NotFound { what: format!("agent `{id}`") }
}

fn find<'state>(state: &'state mut WorldState, id: &AgentId) -> Result<&'state mut FakeAgent> {
    state.agent_mut(id).ok_or_else(|| not_found(id))
}

/// Issues a fresh token for an agent: handed out once, only its digest is kept.
fn issue_token(state: &mut WorldState, agent: &AgentId) -> Secret {
    state.counters.tokens += 1;
    Secret::new(format!("fake-token-{agent}-{}", state.counters.tokens))
}

/// Woodpecker-like: long-lived, drainable agents with tokens of their own; on a cloud server Woodpecker's agent
/// image, so demos and tests on cloud backends boot something real.
pub const CI_CAPABILITIES: CiCapabilities = CiCapabilities {
    drain: true,
    per_agent_credentials: true,
    single_job: false,
    job_bound: false,
    matching: crate::model::Matching::LabelFilterAndDemands,
    launch: Launch {
        agent: "fake CI",
        container_command: crate::providers::CONTAINER_AGENT_COMMAND,
        token_env: None,
        cloud: CloudLaunch::Docker {
            default_image: Some(crate::providers::woodpecker::AGENT_IMAGE),
            needs: "any agent image",
        },
    },
};

#[async_trait]
impl CiSource for FakeCi {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> CiCapabilities {
        CI_CAPABILITIES
    }

    async fn observe(&self) -> Result<CiObservation> {
        let simulate = self.world.simulates();
        let feed = if simulate { self.world.job_feed() } else { None };
        self.world
            .call(Op::CiObserve, |state| {
                if let Some(feed) = &feed {
                    state.feed_jobs(feed);
                }
                if simulate {
                    state.simulate();
                }
                Ok(CiObservation { agents: state.agents_model(), queue: state.queue_model() })
            })
            .await
    }

    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        self.world
            .call(Op::Register, |state| {
                let agent_id = match state.agents.iter().find(|agent| agent.name == request.name) {
                    Some(existing) => existing.id.clone(),
                    None => {
                        state.counters.agents += 1;
                        let id = AgentId::new(state.counters.agents.to_string());
                        state.agents.push(FakeAgent {
                            id: id.clone(),
                            name: request.name.clone(),
                            pool: Some(request.pool.clone()),
                            no_schedule: false,
                            last_contact: None,
                            last_work: None,
                            labels: request.labels.clone(),
                            token_sha256: String::new(),
                            jobs_done: 0,
                            created_at: Some(state.now()),
                        });
                        id
                    }
                };
                state.record(Op::Register.key(), &request.name, None);
                let token = issue_token(state, &agent_id);
                find(state, &agent_id)?.token_sha256 = sha256_hex(token.expose().as_bytes());
                Ok(AgentCredential {
                    agent_id,
                    token,
                    env: BTreeMap::from([("CI_SERVER".to_owned(), "fake://".to_owned())]),
                })
            })
            .await
    }

    async fn drain(&self, id: &AgentId) -> Result<()> {
        self.world
            .call(Op::Drain, |state| {
                let name = find(state, id)?.name.clone();
                state.record(Op::Drain.key(), &name, None);
                find(state, id)?.no_schedule = true;
                Ok(())
            })
            .await
    }

    async fn undrain(&self, id: &AgentId) -> Result<()> {
        self.world
            .call(Op::Undrain, |state| {
                find(state, id)?.no_schedule = false;
                Ok(())
            })
            .await
    }

    async fn deregister(&self, id: &AgentId) -> Result<()> {
        self.world
            .call(Op::Deregister, |state| {
                if let Some(name) = state.agent_mut(id).map(|agent| agent.name.clone()) {
                    state.record(Op::Deregister.key(), &name, None);
                }
                let before = state.agents.len();
                state.agents.retain(|agent| &agent.id != id);
                if state.agents.len() == before {
                    return Err(not_found(id));
                }
                // The CI gives a job whose agent vanished to another agent.
                for task in state.tasks.iter_mut().filter(|task| task.agent_id.as_ref() == Some(id)) {
                    task.agent_id = None;
                    task.started_at = None;
                }
                Ok(())
            })
            .await
    }
}
