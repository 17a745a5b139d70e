//! Ownership: the one place that decides what belongs to this deployment, and how the things it makes are named.
//!
//! # Instances
//! An instance is ours iff it carries `ciscale.owner=<id>` (Hetzner label, EC2 tag, Incus `user.ciscale.owner`
//! config key), or it is adopted by id in a start/stop pool. Labels are exact, so deployments `acme` and
//! `acme-arm` never see each other's instances. This rule is unchanged and lives in `index` (`owned_by_pool`).
//!
//! # Agent records
//! CI agent records carry no label ciscale could set before the agent connects (Woodpecker's `POST /api/agents`
//! takes a name only; Azure agents register themselves with the name they are given), so a record is proven ours
//! only by one of:
//! 1. **the link from an instance of ours**: the instance's `ciscale.agent` label names the record's id (written
//!    at create time since this version), or the record has the instance's name (every version);
//! 2. **the name grammar** `{owner}-{pool}-{digest}-{n}` ([`instance_name`]), where `digest` is the first
//!    [`DIGEST_LEN`] hex digits of SHA-256 over `(owner, pool)`. Owner ids and pool names may contain `-`, so
//!    `acme` + `arm-x` and `acme-arm` + `x` spell the same prefix; the digest differs, and a name is ours only
//!    when it parses with *our* owner and the digest of the pool it names ([`parse_name`]). The digest is
//!    checked against the pool written in the name, not against the config, so the records of a pool removed
//!    from the config are still recognised. A person or another deployment produces a matching name only by
//!    copying one (a random match is 1 in 16.7 million);
//! 3. **the config**: a pool's pre-registered agent (Picus mode) and the agents named by `startStop.instances`.
//!    These are drained and undrained, never deregistered (`apply` refuses that as well).
//!
//! Everything else is left alone, however it is named: a hand-registered `acme-runner` and the agents of a
//! deployment `acme-arm` are not `acme`'s. Records whose name starts with `{owner}-` are listed in the plan's
//! notes as "not ours, left alone", so a look-alike is visible rather than silently skipped.
//!
//! # Names: why this grammar
//! Instance names must be valid everywhere: a Hetzner server name and an Incus instance name are RFC 1123
//! hostnames (at most 63 characters of `a-z0-9-`), an EC2 `Name` tag takes anything. The grammar uses only
//! those characters; the config checks that owner id and pool name together leave room for the digest and a
//! six-digit index ([`MAX_OWNER_AND_POOL_LEN`]). The agent record of an instance has the instance's name.
//!
//! # Migration from `{owner}-{pool}-{n}`
//! Instances created by earlier versions keep their names and stay ours by their labels; their agent records
//! are proven ours through the link from the instance of that name (1.), so they are drained, replaced and
//! removed as before. They are not renamed: renaming means replacing, and replacing a serving agent only for its
//! name costs a boot (a paid hour on Hetzner) and nothing else. They go the usual way (scale-down, drift,
//! bootstrap timeout), and every new instance gets a name of the new grammar. A legacy-named record *without* an
//! owned instance (its instance gone while apply was interrupted) cannot be told from another deployment's: it
//! is left alone, with a note saying so.

use sha2::{Digest, Sha256};

use super::digest::to_hex;
use super::fasthash::{FastMap, FastSet};
use crate::model::{Agent, PoolName};

/// Hex digits of the `(owner, pool)` digest in a name.
pub const DIGEST_LEN: usize = 6;

/// The longest owner id and pool name together: `{owner}-{pool}-{digest}-{n}` with an index of up to six digits
/// stays within the 63 characters of an RFC 1123 hostname label (63 - 3 separators - 6 digest - 6 index).
pub const MAX_OWNER_AND_POOL_LEN: usize = 63 - 3 - DIGEST_LEN - 6;

/// The digest of a pool's names: first [`DIGEST_LEN`] hex digits of SHA-256 over `owner`, NUL, `pool` (the
/// separator keeps `(ab, c)` and `(a, bc)` apart; ids cannot contain NUL).
pub fn name_digest(owner: &str, pool: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(owner.as_bytes());
    hasher.update(b"\0");
    hasher.update(pool.as_bytes());
    let mut hex = to_hex(&hasher.finalize());
    hex.truncate(DIGEST_LEN);
    hex
}

/// Name of the `index`-th instance of a pool (index from 1), and of its agent record:
/// `{owner}-{pool}-{digest}-{index}`. Deterministic, so a create retried after a crash finds the instance it
/// already made (create-if-absent). See the module docs for why.
pub fn instance_name(owner: &str, pool: &PoolName, index: u32) -> String {
    format!("{owner}-{pool}-{}-{index}", name_digest(owner, pool.as_str()))
}

/// A name of this deployment's grammar, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedName<'a> {
    pub pool: &'a str,
    pub index: u32,
}

/// Reads `name` as one of `owner`'s names: `Some` only when it has the shape `{owner}-{pool}-{digest}-{n}` and
/// the digest is the one of `(owner, pool)`.
pub fn parse_name<'a>(owner: &str, name: &'a str) -> Option<OwnedName<'a>> {
    let (owned, digest) = name_shape(owner, name)?;
    (name_digest(owner, owned.pool) == digest).then_some(owned)
}

/// [`parse_name`] with the digests of the pools seen so far kept in `digests` (one SHA-256 per pool rather than
/// per name: a plan reads every instance's and record's name, and every name of a pool has the same digest).
pub(super) fn parse_name_cached<'a>(
    owner: &str,
    name: &'a str,
    digests: &mut FastMap<&'a str, String>,
) -> Option<OwnedName<'a>> {
    let (owned, digest) = name_shape(owner, name)?;
    let want = digests.entry(owned.pool).or_insert_with(|| name_digest(owner, owned.pool));
    (want.as_str() == digest).then_some(owned)
}

/// `{owner}-{pool}-{digest}-{n}` taken apart, the digest not checked yet.
fn name_shape<'a>(owner: &str, name: &'a str) -> Option<(OwnedName<'a>, &'a str)> {
    let rest = name.strip_prefix(owner)?.strip_prefix('-')?;
    let (rest, index) = rest.rsplit_once('-')?;
    // `instance_name` never writes a leading zero, so `01` is somebody else's.
    if index.is_empty() || index.starts_with('0') || !index.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    let (pool, digest) = rest.rsplit_once('-')?;
    if pool.is_empty() || digest.len() != DIGEST_LEN {
        return None;
    }
    Some((OwnedName { pool, index }, digest))
}

/// Whether a record someone might mistake for ours is worth a "not ours, left alone" note: its name starts with
/// `{owner}-`, so an earlier ciscale would have taken it (and a reader might expect this one to).
pub(super) fn looks_like_ours(owner: &str, name: &str) -> bool {
    name.strip_prefix(owner).is_some_and(|rest| rest.starts_with('-'))
}

/// How old an agent record is, for the "create in flight" window: from the CI's creation time when it reports
/// one (Woodpecker `created`, Azure `createdOn`), else from its last contact (a record that talked to the CI
/// that long ago was alive then). With neither, the age is unknown and the record is treated as past the window
/// (see `pool::records`): `max` still holds, because the next create of the pool reuses its name.
pub(super) fn record_since(agent: &Agent) -> Option<jiff::Timestamp> {
    agent.created_at.or(agent.last_contact)
}

/// Hands out names for a pool's creates: first the names of its own stale agent records (`reusable`, lowest
/// index first: if such a record's instance was only listed late, the create finds it rather than making a
/// second one), then `{owner}-{pool}-{digest}-{n}` with the lowest `n` whose name no observed instance (any
/// backend, any state), agent record (any CI source) or work in flight uses.
pub(super) struct NameAllocator<'a> {
    /// `{owner}-{pool}-{digest}-`, hashed once per pool rather than once per candidate name.
    prefix: String,
    used: &'a FastSet<&'a str>,
    reusable: std::vec::IntoIter<&'a str>,
    next_index: u32,
}

impl<'a> NameAllocator<'a> {
    pub fn new(owner: &'a str, pool: &'a PoolName, used: &'a FastSet<&'a str>, reusable: Vec<&'a str>) -> Self {
        let prefix = format!("{owner}-{pool}-{}-", name_digest(owner, pool.as_str()));
        Self { prefix, used, reusable: reusable.into_iter(), next_index: 1 }
    }

    pub fn next(&mut self) -> String {
        if let Some(name) = self.reusable.next() {
            return name.to_owned();
        }
        loop {
            let name = format!("{}{}", self.prefix, self.next_index);
            self.next_index += 1;
            if !self.used.contains(name.as_str()) {
                return name;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_carry_the_digest_of_owner_and_pool() {
        let name = instance_name("acme", &PoolName::new("linux"), 3);
        assert_eq!(name, format!("acme-linux-{}-3", name_digest("acme", "linux")));
        assert_eq!(parse_name("acme", &name), Some(OwnedName { pool: "linux", index: 3 }));
    }

    #[test]
    fn prefix_sharing_deployments_do_not_read_each_others_names() {
        // `acme` + pool `arm-linux` and `acme-arm` + pool `linux` spell the same prefix.
        let theirs = instance_name("acme-arm", &PoolName::new("linux"), 1);
        let ours = instance_name("acme", &PoolName::new("arm-linux"), 1);
        assert_ne!(theirs, ours);
        assert_eq!(parse_name("acme", &theirs), None);
        assert_eq!(parse_name("acme-arm", &ours), None);
        assert_eq!(parse_name("acme-arm", &theirs), Some(OwnedName { pool: "linux", index: 1 }));
    }

    #[test]
    fn hand_made_and_legacy_names_are_not_ours() {
        for name in ["acme-runner", "acme-linux-1", "acme-linux-abcdef-1", "acme--1", "acme", "", "acme-linux-"] {
            assert_eq!(parse_name("acme", name), None, "{name}");
        }
        let digest = name_digest("acme", "linux");
        assert_eq!(parse_name("acme", &format!("acme-linux-{digest}-01")), None, "leading zero");
        assert_eq!(parse_name("acme", &format!("acme-linux-{digest}-0")), None, "index 0");
        assert_eq!(parse_name("acme", &format!("acme-linux-{}-1", digest.to_uppercase())), None);
        assert!(looks_like_ours("acme", "acme-runner"));
        assert!(!looks_like_ours("acme", "acmerunner"));
    }

    #[test]
    fn a_cached_digest_reads_names_as_the_uncached_one_does() {
        let mut digests = FastMap::default();
        let digest = name_digest("acme", "linux");
        let names = [
            instance_name("acme", &PoolName::new("linux"), 1),
            format!("acme-linux-{}-2", "0".repeat(DIGEST_LEN)),
            instance_name("acme", &PoolName::new("linux"), 2),
            instance_name("acme-arm", &PoolName::new("linux"), 1),
            instance_name("acme", &PoolName::new("arm-linux"), 7),
            format!("acme-linux-{}-1", digest.to_uppercase()),
            "acme-linux-1".to_owned(),
        ];
        let read: Vec<_> = names.iter().map(|name| parse_name_cached("acme", name, &mut digests)).collect();
        assert_eq!(
            read,
            [
                Some(OwnedName { pool: "linux", index: 1 }),
                None,
                Some(OwnedName { pool: "linux", index: 2 }),
                None,
                Some(OwnedName { pool: "arm-linux", index: 7 }),
                None,
                None
            ]
        );
        assert_eq!(digests.get("linux"), Some(&digest), "one digest per pool, kept");
    }

    #[test]
    fn the_longest_names_fit_a_hostname() {
        let owner = "o".repeat(24);
        let pool = PoolName::new("p".repeat(MAX_OWNER_AND_POOL_LEN - 24));
        assert_eq!(instance_name(&owner, &pool, 999_999).len(), 63);
    }

    #[test]
    fn allocator_reuses_stale_names_first_then_the_lowest_free() {
        let pool = PoolName::new("linux");
        let taken = instance_name("acme", &pool, 1);
        let stale = instance_name("acme", &pool, 4);
        let used: FastSet<&str> = [taken.as_str(), stale.as_str()].into_iter().collect();
        let mut names = NameAllocator::new("acme", &pool, &used, vec![stale.as_str()]);
        assert_eq!(names.next(), stale);
        assert_eq!(names.next(), instance_name("acme", &pool, 2));
        assert_eq!(names.next(), instance_name("acme", &pool, 3));
        assert_eq!(names.next(), instance_name("acme", &pool, 5));
    }

    proptest! {
        /// Every name we make reads back as ours, with its pool and index, fits a hostname, and a deployment
        /// whose id swallows the first part of our pool name (`acme` + `arm-x` against `acme-arm` + `x`) does not
        /// read it as its own.
        #[test]
        fn names_round_trip(owner in "[a-z0-9][a-z0-9-]{0,20}", head in "[a-z0-9]{1,8}",
                            tail in "[a-z0-9][a-z0-9-]{0,12}", index in 1u32..1_000_000) {
            let pool = format!("{head}-{tail}");
            let name = instance_name(&owner, &PoolName::new(pool.clone()), index);
            prop_assert_eq!(parse_name(&owner, &name), Some(OwnedName { pool: &pool, index }));
            prop_assert!(name.len() <= 63);
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            let neighbour = format!("{owner}-{head}");
            prop_assert_eq!(parse_name(&neighbour, &name), None);
            prop_assert_ne!(instance_name(&neighbour, &PoolName::new(tail.clone()), index), name);
        }
    }
}
