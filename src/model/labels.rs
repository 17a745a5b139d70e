//! A job's labels ([`Labels`]) and the interner that lets the jobs of one queue share them ([`LabelInterner`]).
//!
//! A queue holds up to hundreds of thousands of jobs but only a few distinct label keys, values and label sets.
//! As `BTreeMap<String, String>` every job carried its own B-tree node and a string per key and value; as
//! [`Labels`] a job holds one pointer to an immutable, sorted slice of shared strings, and a provider that parses
//! a queue through a [`LabelInterner`] stores each distinct key, value and label set once. Cloning a job's labels
//! is a reference count bump.
//!
//! Nothing here is global: an interner lives while one observation is parsed and is dropped with it, so a
//! long-running `watch` holds only the strings of the queues it currently knows.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One label: key and value, each shared.
pub type Label = (Arc<str>, Arc<str>);

/// A job's labels: key/value pairs sorted by key, each key once, in one shared allocation. Equality, hashing and
/// order are by content, as for the `BTreeMap<String, String>` it replaces, and so is its JSON/YAML form (a map).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Arc<[Label]>);

impl Labels {
    /// Builds from shared pairs: sorted by key, a later duplicate key replacing an earlier one (as inserting
    /// into a map does).
    fn from_pairs(mut pairs: Vec<Label>) -> Self {
        sort_last_wins(&mut pairs);
        Self(pairs.into())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| k.as_ref().cmp(key)).ok().map(|at| &*self.0[at].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(key, value)| (&**key, &**value))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels in key order with their shared strings: two keys (or values) in the same allocation are equal,
    /// so a reader may compare pointers before content (the planner does; it must not rely on it).
    pub fn entries(&self) -> &[Label] {
        &self.0
    }

    /// The address of the shared set: the same for clones (and for equal sets of one interner) while they live;
    /// two live sets at one address are one set, so equal. Equal sets need not share an address.
    pub fn set_address(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

/// Stable sort by key, then one entry per key: the last given.
fn sort_last_wins<K: Ord, V>(pairs: &mut Vec<(K, V)>) {
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    // `dedup_by` hands (later, kept): move the later value into the kept entry, then drop the later one.
    pairs.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
}

impl Default for Labels {
    fn default() -> Self {
        Self(Arc::from(Vec::new()))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Self::from_pairs(pairs.into_iter().map(|(k, v)| (Arc::from(k.as_ref()), Arc::from(v.as_ref()))).collect())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted, keys unique.
        Self(map.into_iter().map(|(k, v)| (Arc::from(k), Arc::from(v))).collect())
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    /// Through the map it replaces, so a file reads (and fails, with serde's located errors) exactly as before.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Self::from)
    }
}

/// Shares the strings and label sets of the jobs of one observation: each distinct key, value and label set is
/// stored once, and every job with that set holds a pointer to it. Short-lived by design (one per parsed queue
/// or trace): it grows with what it is given and is dropped with it.
#[derive(Default)]
pub struct LabelInterner {
    strings: HashSet<Arc<str>>,
    sets: HashSet<Labels>,
}

impl LabelInterner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared copy of `text`.
    pub fn string(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.strings.insert(shared.clone());
        shared
    }

    /// The shared label set of these pairs (sorted by key, a later duplicate key winning, as [`Labels`]' own
    /// constructors do).
    pub fn labels<K: AsRef<str>, V: AsRef<str>>(&mut self, pairs: impl IntoIterator<Item = (K, V)>) -> Labels {
        let pairs: Vec<Label> =
            pairs.into_iter().map(|(key, value)| (self.string(key.as_ref()), self.string(value.as_ref()))).collect();
        self.shared_set(Labels::from_pairs(pairs))
    }

    /// The shared copy of `labels` (its strings shared too).
    pub fn intern(&mut self, labels: &Labels) -> Labels {
        if let Some(shared) = self.sets.get(labels) {
            return shared.clone();
        }
        let pairs: Vec<Label> =
            labels.entries().iter().map(|(key, value)| (self.string(key), self.string(value))).collect();
        self.shared_set(Labels(pairs.into()))
    }

    fn shared_set(&mut self, labels: Labels) -> Labels {
        if let Some(shared) = self.sets.get(&labels) {
            return shared.clone();
        }
        self.sets.insert(labels.clone());
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn sorted_by_key_and_a_later_duplicate_wins_like_a_map() {
        let pairs = [("repo", "a/b"), ("platform", "linux/amd64"), ("gpu", ""), ("platform", "linux/arm64")];
        let labels: Labels = pairs.into();
        let expected = map(&pairs);
        assert_eq!(labels.iter().collect::<Vec<_>>(), expected.iter().map(|(k, v)| (&**k, &**v)).collect::<Vec<_>>());
        assert_eq!(labels.len(), 3);
        assert_eq!(labels.get("platform"), Some("linux/arm64"));
        assert_eq!(labels.get("gpu"), Some(""));
        assert!(labels.contains_key("gpu"));
        assert_eq!(labels.get("arch"), None);
        assert!(!labels.contains_key("plat"));
        assert_eq!(labels, Labels::from(expected));
        // Also through the interner.
        assert_eq!(LabelInterner::new().labels(pairs), labels);
        assert!(Labels::default().is_empty());
        assert_eq!(Labels::default().get(""), None);
    }

    #[test]
    fn equality_order_and_hash_are_by_content() {
        use std::hash::{BuildHasher, RandomState};
        let a: Labels = [("k", "v"), ("a", "1")].into();
        let b: Labels = Labels::from(map(&[("a", "1"), ("k", "v")]));
        assert_ne!(a.set_address(), b.set_address());
        assert_eq!(a, b);
        let state = RandomState::new();
        assert_eq!(state.hash_one(&a), state.hash_one(&b));
        let c: Labels = [("a", "1"), ("k", "w")].into();
        assert_ne!(a, c);
        assert_eq!(a.cmp(&c), map(&[("a", "1"), ("k", "v")]).cmp(&map(&[("a", "1"), ("k", "w")])));
        assert_eq!(format!("{a:?}"), format!("{:?}", map(&[("a", "1"), ("k", "v")])));
    }

    #[test]
    fn json_and_yaml_are_the_maps() {
        let pairs = [("woodpecker-ci.org/repo-id", "7"), ("repo", "acme/app"), ("platform", "linux/amd64")];
        let labels: Labels = pairs.into();
        let as_map = map(&pairs);
        let json = serde_json::to_string(&labels).unwrap_or_default();
        assert_eq!(json, serde_json::to_string(&as_map).unwrap_or_default());
        assert_eq!(serde_json::from_str::<Labels>(&json).ok(), Some(labels.clone()));
        let yaml = serde_yaml::to_string(&labels).unwrap_or_default();
        assert_eq!(yaml, serde_yaml::to_string(&as_map).unwrap_or_default());
        assert_eq!(serde_yaml::from_str::<Labels>(&yaml).ok(), Some(labels));
        assert_eq!(serde_json::to_string(&Labels::default()).unwrap_or_default(), "{}");
    }

    #[test]
    fn bad_values_fail_as_the_map_did() {
        let text = "{\"repo\": \"a/b\",\n \"size\": 3}";
        let ours = serde_json::from_str::<Labels>(text).err().map(|error| error.to_string());
        let map = serde_json::from_str::<BTreeMap<String, String>>(text).err().map(|error| error.to_string());
        assert!(ours.is_some(), "a number is no label value");
        assert_eq!(ours, map);
        assert!(ours.unwrap_or_default().contains("line 2"), "located");
    }

    #[test]
    fn interning_shares_strings_and_sets() {
        let mut interner = LabelInterner::new();
        let first = interner.labels([("repo", "acme/app"), ("platform", "linux/amd64")]);
        let second = interner.labels([("platform", "linux/amd64"), ("repo", "acme/app")]);
        assert_eq!(first.set_address(), second.set_address(), "one set, stored once");
        let other = interner.labels([("platform", "linux/arm64"), ("repo", "acme/app")]);
        assert_ne!(other.set_address(), first.set_address());
        // Distinct sets share their equal keys and values.
        let (f, o) = (first.entries(), other.entries());
        assert!(Arc::ptr_eq(&f[0].0, &o[0].0), "key `platform` shared");
        assert!(!Arc::ptr_eq(&f[0].1, &o[0].1));
        assert!(Arc::ptr_eq(&f[1].1, &o[1].1), "value `acme/app` shared");
        assert!(Arc::ptr_eq(&interner.string("repo"), &f[1].0));
        // A set built elsewhere is interned to the shared copy.
        let outside: Labels = [("repo", "acme/app"), ("platform", "linux/amd64")].into();
        assert_eq!(interner.intern(&outside).set_address(), first.set_address());
        let new = interner.intern(&[("repo", "acme/app")].into());
        assert!(Arc::ptr_eq(&new.entries()[0].1, &f[1].1), "a new set's strings are the shared ones");
        // Clones are the same set.
        assert_eq!(first.clone().set_address(), first.set_address());
    }
}
