//! The cloud-config document a cloud server (Hetzner, EC2) gets as user data: files root writes, then commands.
//! Apply's agent-container bootstrap ([`crate::apply::cloud_init`]) and the GitHub and Forgejo runner set-ups each
//! fill one in.
//!
//! Quoting is by construction: the document is written by a YAML serialiser, never by pasting text, so a file's
//! content (scripts, env files holding secrets) reaches the server byte for byte.

use serde::Serialize;

use crate::model::Secret;

#[derive(Serialize)]
pub struct CloudConfig {
    pub write_files: Vec<RootFile>,
    /// Each command as its argument vector (cloud-init runs a list without a shell).
    pub runcmd: Vec<Vec<String>>,
}

/// A file owned by `root:root`: everything ciscale writes on a server is root's (the secrets among them are made
/// readable to no one else by their mode).
#[derive(Serialize)]
pub struct RootFile {
    path: String,
    owner: &'static str,
    permissions: &'static str,
    content: String,
}

impl RootFile {
    /// `permissions` in octal as cloud-init takes it: `"0400"`.
    pub fn new(path: impl Into<String>, permissions: &'static str, content: String) -> Self {
        Self { path: path.into(), owner: "root:root", permissions, content }
    }
}

impl CloudConfig {
    /// The user data: `#cloud-config` and the document. It holds secrets (env files), so it is one. The error is
    /// the serialiser's, which never quotes the values it was given.
    pub fn user_data(&self) -> Result<Secret, String> {
        let yaml = serde_yaml::to_string(self).map_err(|error| error.to_string())?;
        Ok(Secret::new(format!("#cloud-config\n{yaml}")))
    }
}
