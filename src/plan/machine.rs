//! Reading a pool's machine attributes, shared by drift detection and the cost estimate.

pub(super) fn first_candidate(value: &str) -> &str {
    value.split(',').next().unwrap_or_default().trim()
}
