//! Converters from the tools ciscale replaces into ciscale configs (`ciscale import <FORMAT> [FILE]`). Each format is
//! one module turning the other tool's settings into ciscale YAML; the command only reads and prints.

pub mod incus_azure_pipelines;
pub mod picus;
