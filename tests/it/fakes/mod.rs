//! In-repo HTTP fakes of the services ciscale talks to, and the spec checkers that hold them to the specs.
// Helpers are shared by several test modules; not every one uses all of them.
#![allow(dead_code)]

pub mod azure;
pub mod ec2;
pub mod forgejo;
pub mod github;
pub mod hcloud;
pub mod incus_proxy;
pub mod query;
pub mod server;
pub mod spec;
pub mod traffic;
pub mod woodpecker;
