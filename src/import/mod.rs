//! Translations from the tools ciscale replaces into `ciscale.yaml`.

pub mod picus;
