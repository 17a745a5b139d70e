//! Converters from other autoscalers' configs into ciscale configs (`ciscale import <FORMAT> [FILE]`). Each
//! format is one module with a pure `convert(text) -> ciscale YAML`; the command only reads and prints.

pub mod incus_azure_pipelines;
