//! The Hetzner Cloud backend: servers of one project, owned through the `ciscale.owner` label.
//!
//! Calls per cycle: one paginated `GET /servers?label_selector=ciscale.owner=<owner>` for every pool of the
//! project (plus one `GET /servers/{id}` per adopted server), and `GET /server_types` once per process for the
//! price list (prices change rarely; a failed price read is retried on the next cycle, never fails one).
//!
//! Machine attributes a pool may set (comma lists are ordered fallback candidates):
//! `serverType` (required), `location`, `image` (required), `sshKeys`, `networks`, `firewalls` (ids).
//! A create tries every (server type × location) pair in that order, server type first, and moves on when
//! Hetzner reports no capacity (`resource_unavailable`, `placement_error`, ...).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use hcloud::models;
use jiff::Timestamp;
use reqwest::Method;
use tokio::sync::OnceCell;

use crate::model::{BackendObservation, Instance, InstanceId, InstanceState, Price, Secret, OWNER_LABEL};
use crate::providers::{Backend, Capabilities, CreateInstance, Error, ListInstances, Result};

mod api;

use api::{is_capacity, Api, Failure, Unreadable, PROVIDER};

/// Hetzner's public API root.
pub const DEFAULT_ENDPOINT: &str = "https://api.hetzner.cloud/v1";
/// The environment variable Hetzner's own tools (hcloud CLI, terraform provider) read the API root from.
pub const ENDPOINT_ENV: &str = "HCLOUD_ENDPOINT";
/// Per-request timeout: Hetzner answers in well under a second; 30 s covers a slow create without letting a
/// hung connection hold a cycle for ever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest page Hetzner serves.
const PER_PAGE: u32 = 50;
/// Hetzner refuses user data above 32 KiB.
const MAX_USER_DATA: usize = 32 * 1024;
/// A safety stop for a paginating server that never ends (50 × 1000 servers is beyond any project's limit).
const MAX_PAGES: u32 = 1000;

/// Machine attribute keys (as written in the config's `machine:`).
pub const SERVER_TYPE: &str = "serverType";
pub const LOCATION: &str = "location";
pub const IMAGE: &str = "image";
pub const SSH_KEYS: &str = "sshKeys";
pub const NETWORKS: &str = "networks";
pub const FIREWALLS: &str = "firewalls";

/// How to reach one Hetzner project.
#[derive(Debug, Clone)]
pub struct HcloudSettings {
    pub token: Secret,
    /// API root, e.g. [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    pub timeout: Duration,
}

impl HcloudSettings {
    /// The endpoint a config asks for: its `endpoint` field, else `HCLOUD_ENDPOINT` (passed in, so the caller
    /// decides where the environment is read), else Hetzner's.
    pub fn new(token: Secret, configured: Option<&str>, from_env: Option<&str>) -> Self {
        let endpoint =
            configured.or(from_env.filter(|value| !value.trim().is_empty())).unwrap_or(DEFAULT_ENDPOINT).to_owned();
        Self { token, endpoint, timeout: DEFAULT_TIMEOUT }
    }
}

/// A Hetzner Cloud project as a [`Backend`]. Cheap to share behind an `Arc`; `Debug` never shows the token.
#[derive(Debug)]
pub struct Hcloud {
    api: Api,
    /// Hourly price per server type, read once per process.
    prices: OnceCell<BTreeMap<String, Price>>,
}

impl Hcloud {
    pub fn new(settings: HcloudSettings) -> Result<Self> {
        let endpoint = settings.endpoint.trim();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!(
                    "endpoint `{endpoint}` is not an http(s) URL\nhint: e.g. `{DEFAULT_ENDPOINT}` (set in the \
                     backend's `endpoint` or `{ENDPOINT_ENV}`)"
                ),
            });
        }
        Ok(Self { api: Api::new(endpoint, settings.token, settings.timeout)?, prices: OnceCell::new() })
    }

    pub fn endpoint(&self) -> &str {
        self.api.endpoint()
    }

    async fn list_owned(&self, owner: &str) -> Result<Vec<models::Server>> {
        let selector = format!("{OWNER_LABEL}={owner}");
        let mut servers = Vec::new();
        let mut page = 1;
        loop {
            let query =
                [("label_selector", selector.clone()), ("page", page.to_string()), ("per_page", PER_PAGE.to_string())];
            let response: models::ListServersResponse = self
                .api
                .send(Method::GET, "/servers", &query, None)
                .await
                .map_err(|failure| failure.into_error("servers"))?;
            servers.extend(response.servers);
            match response.meta.pagination.next_page {
                Some(next) if next > page && page < i64::from(MAX_PAGES) => page = next,
                _ => break,
            }
        }
        Ok(servers)
    }

    async fn server(&self, id: &InstanceId) -> Result<models::Server> {
        let numeric = server_id(id)?;
        let response: models::GetServerResponse = self
            .api
            .send(Method::GET, &format!("/servers/{numeric}"), &[], None)
            .await
            .map_err(|failure| failure.into_error(&format!("server `{id}`")))?;
        response.server.map(|server| *server).ok_or_else(|| Error::NotFound { what: format!("server `{id}`") })
    }

    async fn price_list(&self) -> Result<BTreeMap<String, Price>> {
        let mut prices = BTreeMap::new();
        let mut page = 1;
        loop {
            let query = [("page", page.to_string()), ("per_page", PER_PAGE.to_string())];
            let response: models::ListServerTypesResponse = self
                .api
                .send(Method::GET, "/server_types", &query, None)
                .await
                .map_err(|failure| failure.into_error("server types"))?;
            for server_type in response.server_types {
                // Prices differ a little per location; the list is for the plan's estimate, so the first does.
                if let Some(hourly) =
                    server_type.prices.first().and_then(|price| price.price_hourly.gross.trim().parse::<f64>().ok())
                {
                    prices.insert(server_type.name, Price { hourly, currency: "EUR".to_owned() });
                }
            }
            match response.meta.pagination.next_page {
                Some(next) if next > page && page < i64::from(MAX_PAGES) => page = next,
                _ => break,
            }
        }
        Ok(prices)
    }

    async fn action(&self, id: &InstanceId, action: &str) -> Result<()> {
        let numeric = server_id(id)?;
        let _: models::PowerOnServerResponse = self
            .api
            .send(Method::POST, &format!("/servers/{numeric}/actions/{action}"), &[], None)
            .await
            .map_err(|failure| failure.into_error(&format!("server `{id}`")))?;
        Ok(())
    }
}

#[async_trait]
impl Backend for Hcloud {
    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { exec: false, keeps_stopped: true }
    }

    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        let mut instances = Vec::new();
        for server in self.list_owned(&request.owner).await? {
            instances.push(to_instance(server)?);
        }
        for id in &request.adopted {
            if instances.iter().any(|instance| &instance.id == id) {
                continue;
            }
            match self.server(id).await {
                Ok(server) => instances.push(to_instance(server)?),
                // An adopted server that is gone is left out: the plan reports its absence.
                Err(Error::NotFound { .. }) => tracing::warn!(server = %id, "adopted server not found"),
                Err(error) => return Err(error),
            }
        }
        let prices = match self.prices.get_or_try_init(|| self.price_list()).await {
            Ok(prices) => prices.clone(),
            Err(error) => {
                tracing::warn!(%error, "cannot read hcloud prices; the plan's cost line misses them this cycle");
                BTreeMap::new()
            }
        };
        Ok(BackendObservation { instances, prices, missing_images: Vec::new() })
    }

    async fn create(&self, request: &CreateInstance) -> Result<Instance> {
        let machine = Machine::from_request(request)?;
        let mut refused = Vec::new();
        for (server_type, location) in machine.candidates() {
            let body = models::CreateServerRequest {
                name: request.name.clone(),
                server_type: server_type.to_owned(),
                location: location.map(str::to_owned),
                image: machine.image.clone(),
                labels: Some(request.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>()),
                ssh_keys: (!machine.ssh_keys.is_empty()).then(|| machine.ssh_keys.clone()),
                networks: (!machine.networks.is_empty()).then(|| machine.networks.clone()),
                firewalls: (!machine.firewalls.is_empty()).then(|| {
                    machine.firewalls.iter().map(|id| models::CreateServerRequestFirewalls { firewall: *id }).collect()
                }),
                user_data: request.user_data.as_ref().map(|data| data.expose().to_owned()),
                start_after_create: Some(true),
                ..models::CreateServerRequest::default()
            };
            let candidate = match location {
                Some(location) => format!("{server_type} in {location}"),
                None => server_type.to_owned(),
            };
            match self.api.send::<models::CreateServerResponse>(Method::POST, "/servers", &[], Some(&body)).await {
                Ok(response) => {
                    if !refused.is_empty() {
                        tracing::info!(server = %request.name, %candidate, "created on a fallback candidate");
                    }
                    return to_instance(*response.server);
                }
                Err(Failure::Api(failure, _)) if is_capacity(&failure) => {
                    tracing::info!(server = %request.name, %candidate, code = %failure.code, "no capacity; trying the next candidate");
                    refused.push(format!("{candidate} ({})", failure.code));
                }
                Err(failure) => return Err(failure.into_error(&format!("server `{}`", request.name))),
            }
        }
        Err(Error::Capacity {
            provider: PROVIDER.to_owned(),
            message: format!("no candidate could take server `{}`: {}", request.name, refused.join(", ")),
        })
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        to_instance(self.server(id).await?)
    }

    async fn start(&self, id: &InstanceId) -> Result<()> {
        // Hetzner refuses some actions in the wrong state; one read makes start idempotent.
        let server = self.server(id).await?;
        match server.status {
            models::server::Status::Running
            | models::server::Status::Starting
            | models::server::Status::Initializing => Ok(()),
            _ => self.action(id, "poweron").await,
        }
    }

    async fn stop(&self, id: &InstanceId) -> Result<()> {
        let server = self.server(id).await?;
        match server.status {
            models::server::Status::Off | models::server::Status::Stopping => Ok(()),
            // A graceful ACPI shutdown: the agent container gets SIGTERM and can hand its job back.
            _ => self.action(id, "shutdown").await,
        }
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let numeric = server_id(id)?;
        self.api
            .send::<serde_json::Value>(Method::DELETE, &format!("/servers/{numeric}"), &[], None)
            .await
            .map_err(|failure| failure.into_error(&format!("server `{id}`")))?;
        Ok(())
    }
}

/// A pool's machine attributes, parsed.
#[derive(Debug)]
struct Machine {
    server_types: Vec<String>,
    locations: Vec<String>,
    image: String,
    ssh_keys: Vec<String>,
    networks: Vec<i64>,
    firewalls: Vec<i64>,
}

impl Machine {
    fn from_request(request: &CreateInstance) -> Result<Self> {
        let invalid = |message: String| Error::Invalid { provider: PROVIDER.to_owned(), message };
        let list = |key: &str| -> Vec<String> {
            request
                .machine
                .get(key)
                .map(|value| {
                    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
                })
                .unwrap_or_default()
        };
        let ids = |key: &str| -> Result<Vec<i64>> {
            list(key)
                .into_iter()
                .map(|item| {
                    item.parse::<i64>().map_err(|_| {
                        invalid(format!("machine `{key}` entry `{item}` is not a numeric id\nhint: use the ids Hetzner shows for your {key}"))
                    })
                })
                .collect()
        };
        let server_types = list(SERVER_TYPE);
        if server_types.is_empty() {
            return Err(invalid(format!("machine `{SERVER_TYPE}` is missing\nhint: e.g. `{SERVER_TYPE}: cx22,cx32`")));
        }
        let image = list(IMAGE).into_iter().next().ok_or_else(|| {
            invalid(format!("machine `{IMAGE}` is missing\nhint: e.g. `{IMAGE}: docker-ce` or `ubuntu-24.04`"))
        })?;
        if let Some(data) = &request.user_data {
            if data.expose().len() > MAX_USER_DATA {
                return Err(invalid(format!(
                    "user data of server `{}` is {} bytes; Hetzner takes at most {MAX_USER_DATA}",
                    request.name,
                    data.expose().len()
                )));
            }
        }
        Ok(Self {
            server_types,
            locations: list(LOCATION),
            image,
            ssh_keys: list(SSH_KEYS),
            networks: ids(NETWORKS)?,
            firewalls: ids(FIREWALLS)?,
        })
    }

    /// Every (server type, location) pair, server type first; no location lets Hetzner choose.
    fn candidates(&self) -> Vec<(&str, Option<&str>)> {
        let mut candidates = Vec::new();
        for server_type in &self.server_types {
            if self.locations.is_empty() {
                candidates.push((server_type.as_str(), None));
            }
            for location in &self.locations {
                candidates.push((server_type.as_str(), Some(location.as_str())));
            }
        }
        candidates
    }
}

fn server_id(id: &InstanceId) -> Result<u64> {
    id.as_str().parse::<u64>().map_err(|_| Error::NotFound { what: format!("server `{id}` (not a Hetzner server id)") })
}

fn to_state(status: models::server::Status) -> InstanceState {
    use models::server::Status;
    match status {
        Status::Initializing | Status::Starting | Status::Rebuilding | Status::Migrating => InstanceState::Pending,
        Status::Running => InstanceState::Running,
        Status::Stopping => InstanceState::Stopping,
        Status::Off => InstanceState::Stopped,
        Status::Deleting => InstanceState::Deleting,
        Status::Unknown => InstanceState::Unknown,
    }
}

fn to_instance(server: models::Server) -> Result<Instance> {
    let created_at: Timestamp = server.created.parse().map_err(|error: jiff::Error| Error::Other {
        provider: PROVIDER.to_owned(),
        source: Box::new(Unreadable {
            request: format!("server {}", server.id),
            detail: format!("`created` is not a timestamp: {error}"),
        }),
    })?;
    let mut attributes = BTreeMap::from([
        (SERVER_TYPE.to_owned(), server.server_type.name.clone()),
        (LOCATION.to_owned(), server.location.name.clone()),
    ]);
    if let Some(image) = &server.image {
        // Snapshots have no name; their id is what a pool's `image` names then.
        attributes.insert(IMAGE.to_owned(), image.name.clone().unwrap_or_else(|| image.id.to_string()));
    }
    Ok(Instance {
        id: InstanceId::new(server.id.to_string()),
        name: server.name,
        state: to_state(server.status),
        created_at,
        labels: server.labels.into_iter().collect(),
        attributes,
    })
}
