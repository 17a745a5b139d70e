//! `ciscale provision` for Incus: build an image from a base image and scripts, publish it, move its alias.
//!
//! Expected flow (each step named in errors):
//! 1. remove builders a killed earlier run left behind (labelled `user.ciscale.builder=<image>`);
//! 2. create and start a builder container from `base` (a local alias, or `images:<alias>` from the public
//!    simplestreams server); when `agentUrl` points at the host's loopback, a `proxy` device makes that same
//!    address reach the host from inside (the builder has no other network);
//! 3. push each script (mode 0500, under `/run/ciscale-provision/`) and run it, in order, with `AGENT_URL` and
//!    `CISCALE_IMAGE` in its environment; a script exiting non-zero stops the build, naming it and its code;
//! 4. stop the builder and publish it (`POST /1.0/images`, properties `ciscale.image=<name>`);
//! 5. point the alias at the new image in one call (`PUT /1.0/images/aliases/NAME`, or create it): an instance
//!    created at any moment finds either the old or the new image, never none;
//! 6. delete images of this name beyond `keep`, newest kept, never the one the alias points at.
//!
//! The builder is deleted at the end whatever happened.

use std::collections::BTreeMap;
use std::path::PathBuf;

use hyper::Method;
use serde_json::{json, Value};

use super::client::{encode, Call};
use super::{Incus, LABEL_KEY_PREFIX};
use crate::model::{ImageSpec, InstanceId, OWNER_LABEL};
use crate::providers::{Backend as _, Error, Exec, PushFile};

/// Image property naming the ciscale image an Incus image was built as (finds the versions to prune).
pub const IMAGE_PROPERTY: &str = "ciscale.image";
/// Config key (without `user.`) marking a builder container with the image it builds.
pub const BUILDER_LABEL: &str = "ciscale.builder";
/// Where scripts are pushed inside the builder (a tmpfs: nothing of them ends up in the image).
const SCRIPT_DIR: &str = "/run/ciscale-provision";
/// The public simplestreams server behind the `images:` prefix.
const IMAGES_REMOTE: &str = "https://images.linuxcontainers.org";

/// What a provision run needs besides the spec.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The image's name: the alias that is moved.
    pub name: String,
    pub owner: String,
    pub spec: ImageSpec,
    /// URL of the CI agent tarball, given to scripts as `AGENT_URL`.
    pub agent_url: Option<String>,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub alias: String,
    pub fingerprint: String,
    /// The image the alias pointed at before, if any.
    pub previous: Option<String>,
    /// Fingerprints deleted by the keep-count.
    pub pruned: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("provisioning `{image}` failed at `{step}`")]
    Step {
        image: String,
        step: String,
        #[source]
        source: Error,
    },
    #[error("script `{script}` exited with code {code}\nhint: run it by hand in `incus launch {base}` to see why")]
    Script { script: String, code: i32, base: String },
    #[error("cannot read script `{path}`: {source}")]
    ReadScript { path: PathBuf, source: std::io::Error },
}

/// Progress of a run, for the command's spinner or log lines.
pub trait ProvisionProgress: Send + Sync {
    fn step(&self, message: &str);
}

impl<F: Fn(&str) + Send + Sync> ProvisionProgress for F {
    fn step(&self, message: &str) {
        self(message)
    }
}

/// Builds and publishes one image (see the module docs).
pub async fn provision(
    incus: &Incus,
    request: &ProvisionRequest,
    progress: &dyn ProvisionProgress,
) -> Result<Provisioned, ProvisionError> {
    let name = &request.name;
    let step_error =
        |step: &str, source: Error| ProvisionError::Step { image: name.clone(), step: step.to_owned(), source };
    // Read scripts first: a typo in a path fails before anything is created.
    let mut scripts = Vec::new();
    for path in &request.spec.scripts {
        let content =
            std::fs::read(path).map_err(|source| ProvisionError::ReadScript { path: path.clone(), source })?;
        scripts.push((path.clone(), content));
    }

    progress.step("removing leftover builders");
    remove_builders(incus, name).await.map_err(|e| step_error("remove leftover builders", e))?;

    let builder = format!("ciscale-build-{}-{}", sanitize(name), jiff::Timestamp::now().as_second());
    progress.step(&format!("creating builder `{builder}` from `{}`", request.spec.base));
    let result = build(incus, request, &builder, &scripts, progress).await;
    progress.step("deleting builder");
    if let Err(error) = delete_instance(incus, &builder).await {
        tracing::warn!(builder = %builder, %error, "could not delete the builder; the next provision run removes it");
    }
    result
}

async fn build(
    incus: &Incus,
    request: &ProvisionRequest,
    builder: &str,
    scripts: &[(PathBuf, Vec<u8>)],
    progress: &dyn ProvisionProgress,
) -> Result<Provisioned, ProvisionError> {
    let name = &request.name;
    let step_error =
        |step: &str, source: Error| ProvisionError::Step { image: name.clone(), step: step.to_owned(), source };
    let client = incus.client();
    let timeout = incus.operation_timeout();

    let body = builder_body(request, builder);
    client
        .send_and_wait(Call::json(Method::POST, "/1.0/instances", &body), timeout * 5)
        .await
        .map_err(|e| step_error("create builder", e))?;

    let id = InstanceId::new(builder);
    let mut env = BTreeMap::from([("CISCALE_IMAGE".to_owned(), name.clone())]);
    if let Some(url) = &request.agent_url {
        env.insert("AGENT_URL".to_owned(), url.clone());
    }
    for (index, (path, content)) in scripts.iter().enumerate() {
        let script = path.display().to_string();
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("script");
        let target = format!("{SCRIPT_DIR}/{index:02}-{}", sanitize(file_name));
        progress.step(&format!("running `{script}`"));
        let file = PushFile {
            path: target.clone(),
            content: crate::model::Secret::new(String::from_utf8_lossy(content).into_owned()),
            mode: 0o500,
            uid: 0,
            gid: 0,
        };
        retry_transient(|| incus.push_file(&id, &file))
            .await
            .map_err(|e| step_error(&format!("push `{script}`"), e))?;
        let exec = Exec { command: vec![target], env: env.clone(), wait: true };
        let output =
            retry_transient(|| incus.exec(&id, &exec)).await.map_err(|e| step_error(&format!("run `{script}`"), e))?;
        match output.exit_code {
            Some(0) => {}
            code => {
                return Err(ProvisionError::Script {
                    script,
                    code: code.unwrap_or(-1),
                    base: request.spec.base.clone(),
                })
            }
        }
    }

    progress.step("stopping builder");
    incus.stop(&id).await.map_err(|e| step_error("stop builder", e))?;

    progress.step("publishing image");
    let publish = json!({
        "source": { "type": "instance", "name": builder },
        "public": false,
        "properties": {
            IMAGE_PROPERTY: name,
            "ciscale.owner": request.owner,
            "description": format!("ciscale image `{name}` built from `{}`", request.spec.base),
        },
    });
    let published = client
        .send_and_wait(Call::json(Method::POST, "/1.0/images", &publish), timeout * 10)
        .await
        .map_err(|e| step_error("publish", e))?;
    let fingerprint = published
        .get("fingerprint")
        .and_then(Value::as_str)
        .ok_or_else(|| step_error("publish", malformed("the publish operation returned no fingerprint")))?
        .to_owned();

    progress.step(&format!("moving alias `{name}`"));
    let previous = move_alias(incus, name, &fingerprint).await.map_err(|e| step_error("move alias", e))?;

    progress.step("pruning old images");
    let pruned = prune(incus, name, &fingerprint, request.spec.keep).await.map_err(|e| step_error("prune", e))?;
    Ok(Provisioned { alias: name.clone(), fingerprint, previous, pruned })
}

/// A fresh builder can still be busy with its create operation for a moment under load: retry transient
/// errors a few times (bounded) before failing the build.
async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(error) if error.is_transient() && attempt < 5 => {
                attempt += 1;
                tracing::debug!(%error, attempt, "transient incus error; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            result => return result,
        }
    }
}

fn builder_body(request: &ProvisionRequest, builder: &str) -> Value {
    let source = match request.spec.base.split_once(':') {
        Some(("images", alias)) => json!({
            "type": "image", "mode": "pull", "protocol": "simplestreams", "server": IMAGES_REMOTE, "alias": alias,
        }),
        _ => json!({ "type": "image", "alias": request.spec.base }),
    };
    let mut devices = serde_json::Map::new();
    if let Some(port) = request.agent_url.as_deref().and_then(loopback_port) {
        // The builder's own loopback has nothing on it: make the host's loopback service appear there.
        devices.insert(
            "ciscale-agent-url".into(),
            json!({
                "type": "proxy",
                "listen": format!("tcp:127.0.0.1:{port}"),
                "connect": format!("tcp:127.0.0.1:{port}"),
                "bind": "instance",
            }),
        );
    }
    json!({
        "name": builder,
        "type": "container",
        "ephemeral": false,
        "start": true,
        "source": source,
        "config": {
            format!("{LABEL_KEY_PREFIX}{BUILDER_LABEL}"): request.name,
            format!("{LABEL_KEY_PREFIX}{OWNER_LABEL}-builder"): request.owner,
        },
        "devices": devices,
    })
}

/// The port of an `http://127.0.0.1:PORT/...` or `http://localhost:PORT/...` URL.
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost").then_some(())?;
    port.parse().ok()
}

fn sanitize(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect()
}

fn malformed(message: &str) -> Error {
    Error::Other { provider: "incus".into(), source: message.to_owned().into() }
}

async fn remove_builders(incus: &Incus, name: &str) -> Result<(), Error> {
    let filter = super::client::filter_eq(&format!("config.{LABEL_KEY_PREFIX}{BUILDER_LABEL}"), name);
    let listed = incus
        .client()
        .send(Call::get(format!("/1.0/instances?recursion=1&filter={}", encode(&filter))))
        .await?
        .into_sync();
    for object in listed.as_array().into_iter().flatten() {
        let labelled = object.pointer(&format!("/config/{LABEL_KEY_PREFIX}{BUILDER_LABEL}")).and_then(Value::as_str);
        if let (Some(builder), Some(image)) = (object.get("name").and_then(Value::as_str), labelled) {
            if image == name {
                tracing::info!(builder, "removing a builder left by an interrupted run");
                delete_instance(incus, builder).await?;
            }
        }
    }
    Ok(())
}

async fn delete_instance(incus: &Incus, name: &str) -> Result<(), Error> {
    match incus.delete(&InstanceId::new(name)).await {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Points `alias` at `fingerprint` in one call; returns the previous target.
pub async fn move_alias(incus: &Incus, alias: &str, fingerprint: &str) -> Result<Option<String>, Error> {
    let client = incus.client();
    let path = format!("/1.0/images/aliases/{}", encode(alias));
    let previous = match client.send(Call::get(&path)).await {
        Ok(reply) => reply.into_sync().get("target").and_then(Value::as_str).map(str::to_owned),
        Err(Error::NotFound { .. }) => None,
        Err(error) => return Err(error),
    };
    let description = "managed by ciscale provision";
    if previous.is_some() {
        client
            .send(Call::json(Method::PUT, &path, &json!({ "target": fingerprint, "description": description })))
            .await?;
    } else {
        let body = json!({ "name": alias, "target": fingerprint, "description": description });
        client.send(Call::json(Method::POST, "/1.0/images/aliases", &body)).await?;
    }
    Ok(previous)
}

/// The fingerprint an alias points at, if the alias exists.
pub async fn alias_target(incus: &Incus, alias: &str) -> Result<Option<String>, Error> {
    match incus.client().send(Call::get(format!("/1.0/images/aliases/{}", encode(alias)))).await {
        Ok(reply) => Ok(reply.into_sync().get("target").and_then(Value::as_str).map(str::to_owned)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Fingerprints of the images built as `name`, newest first.
pub async fn versions(incus: &Incus, name: &str) -> Result<Vec<String>, Error> {
    let listed = incus.client().send(Call::get("/1.0/images?recursion=1")).await?.into_sync();
    let mut found: Vec<(String, String)> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|image| {
            image.pointer("/properties").and_then(|p| p.get(IMAGE_PROPERTY)).and_then(Value::as_str) == Some(name)
        })
        .filter_map(|image| {
            let fingerprint = image.get("fingerprint").and_then(Value::as_str)?;
            let created = image.get("created_at").and_then(Value::as_str).unwrap_or_default();
            Some((created.to_owned(), fingerprint.to_owned()))
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    Ok(found.into_iter().map(|(_, fingerprint)| fingerprint).collect())
}

async fn prune(incus: &Incus, name: &str, current: &str, keep: u32) -> Result<Vec<String>, Error> {
    let keep = usize::try_from(keep.max(1)).unwrap_or(usize::MAX);
    let mut pruned = Vec::new();
    for fingerprint in versions(incus, name).await?.into_iter().filter(|f| f != current).skip(keep.saturating_sub(1)) {
        match incus
            .client()
            .send_and_wait(Call::delete(format!("/1.0/images/{fingerprint}")), incus.operation_timeout())
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => pruned.push(fingerprint),
            Err(error) => return Err(error),
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_get_a_proxy_port() {
        assert_eq!(loopback_port("http://127.0.0.1:8080/agent.tar.gz"), Some(8080));
        assert_eq!(loopback_port("http://localhost:9000/a"), Some(9000));
        assert_eq!(loopback_port("https://download.agent.dev/a.tgz"), None);
        assert_eq!(loopback_port("http://10.0.0.1:80/a"), None);
    }
}
