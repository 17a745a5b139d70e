//! The note ciscale writes into the `description` of every runner it registers: `ciscale pool=<pool>
//! job=<handle>`. Forgejo stores the description as given and lists it with the runner, so any later
//! observation — by this process, a restarted one or another host — can tell which job a runner was made for
//! without keeping state of its own. That is what makes a runner bound to a running job busy (see the module
//! docs), and what pairs a running job with its runner.
//!
//! The marker is a statement, not a proof: anyone who can register runners in the scope can write the same
//! text. It is only ever used to *keep* a runner (busy) or to name which runner runs a job, never to delete one.

use crate::model::PoolName;

/// The first word of the marker.
const PREFIX: &str = "ciscale";

/// What a runner's description says, when ciscale wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Marker {
    pub pool: Option<String>,
    /// The handle of the job the runner was made for.
    pub job: Option<String>,
}

/// The description of a runner registered for `pool`, bound to the job `handle` when there is one. `handle` is
/// checked by [`valid_handle`] beforehand; the pool name loses any whitespace (pool names from the config have
/// none), so the marker stays one line of `key=value` words.
pub(super) fn describe(pool: &PoolName, handle: Option<&str>) -> String {
    let pool: String = pool.as_str().chars().filter(|c| !c.is_whitespace()).collect();
    let mut text = format!("{PREFIX} pool={pool}");
    if let Some(handle) = handle {
        text.push_str(" job=");
        text.push_str(handle);
    }
    text
}

/// Reads a description back; `None` unless it is a ciscale marker (first word `ciscale`). Unknown `key=value`
/// words are skipped, so a newer ciscale may add some.
pub(super) fn parse(description: &str) -> Option<Marker> {
    let mut words = description.split_whitespace();
    if words.next()? != PREFIX {
        return None;
    }
    let mut marker = Marker::default();
    for word in words {
        match word.split_once('=') {
            Some(("pool", pool)) if !pool.is_empty() => marker.pool = Some(pool.to_owned()),
            Some(("job", job)) if valid_handle(job) => marker.job = Some(job.to_owned()),
            _ => {}
        }
    }
    Some(marker)
}

/// Forgejo's job handles are UUIDs (`gouuid.New().String()` in `ActionRunJob.PrepareNextAttempt`). Anything
/// made of ASCII letters, digits, `-`, `_` and `.` (at most 128 of them) is accepted; it ends up in a
/// description and on a command line, so nothing else is.
pub(crate) fn valid_handle(handle: &str) -> bool {
    !handle.is_empty()
        && handle.len() <= 128
        && handle.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_reads_back_what_it_says() {
        let handle = "33ba7d51-59c6-44f8-9d2b-1b94f4033973";
        let text = describe(&PoolName::new("linux"), Some(handle));
        assert_eq!(text, format!("ciscale pool=linux job={handle}"));
        assert_eq!(parse(&text), Some(Marker { pool: Some("linux".to_owned()), job: Some(handle.to_owned()) }));
        let unbound = describe(&PoolName::new("linux"), None);
        assert_eq!(parse(&unbound), Some(Marker { pool: Some("linux".to_owned()), job: None }));
    }

    #[test]
    fn other_descriptions_are_not_markers() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("A superb runner"), None);
        assert_eq!(parse("ciscale-like runner pool=x job=y"), None, "the first word must be exactly ciscale");
        // Ours, with words a future version may add, and a job value that is no handle.
        assert_eq!(
            parse("ciscale pool=a owner=acme job=$(reboot)"),
            Some(Marker { pool: Some("a".to_owned()), job: None })
        );
    }

    #[test]
    fn handles_are_uuid_like_words() {
        assert!(valid_handle("33ba7d51-59c6-44f8-9d2b-1b94f4033973"));
        for bad in ["", "a b", "x;y", "$(id)", "a\nb", &"a".repeat(129)] {
            assert!(!valid_handle(bad), "{bad:?}");
        }
    }
}
