//! In-repo HTTP fakes of the services ciscale talks to, and the OpenAPI checker that holds them to the specs.

pub mod hcloud;
pub mod openapi;
