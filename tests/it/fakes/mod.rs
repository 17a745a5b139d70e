//! In-repo HTTP fakes of the services ciscale talks to, and the checks that keep them on the real wire format.

pub mod azure;
pub mod openapi_azure;
