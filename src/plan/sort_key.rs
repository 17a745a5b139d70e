//! Sorting by strings that mostly share a prefix, with one number compared per comparison instead of a `memcmp`.
//!
//! The planner sorts ids and names every plan: instance ids of one backend (`srv-…`, `i-0…`), the members of a
//! pool (`{owner}-{pool}-…`), the targets of the changes. Such strings agree on their first bytes, so every
//! comparison of two of them was a call to `memcmp` that read past the shared part. A [`SortKey`] skips the
//! prefix the whole set shares and packs the next eight bytes into a `u64`.
//!
//! The promise: sorting by `(key.of(s), s)` orders exactly as sorting by `s` does. A smaller key means a smaller
//! string; equal keys say nothing, and the strings themselves decide (they may differ after those eight bytes,
//! or one may be a prefix of the other).

/// The sort key of one set of strings: how many leading bytes they all share.
#[derive(Clone, Copy, Debug)]
pub(super) struct SortKey {
    shared: usize,
}

impl SortKey {
    /// The key for sorting `texts` (and any string that starts with the prefix they all share).
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut texts = texts.into_iter();
        let Some(first) = texts.next() else {
            return Self { shared: 0 };
        };
        let mut shared = first.as_bytes();
        for text in texts {
            let common = shared.iter().zip(text.as_bytes()).take_while(|(a, b)| a == b).count();
            shared = &shared[..common];
            if shared.is_empty() {
                break;
            }
        }
        Self { shared: shared.len() }
    }

    /// The eight bytes after the shared prefix, big-endian, zero-padded. Only for strings of the set this key
    /// was made for (a shorter string would lose bytes it does not share).
    pub fn of(self, text: &str) -> u64 {
        let rest = text.as_bytes().get(self.shared..).unwrap_or_default();
        // Eight bytes at once where there are eight; byte by byte otherwise (a copy of a length known only at run
        // time is a call to `memcpy`, which cost more than the comparisons this key saves).
        match rest.first_chunk::<8>() {
            Some(word) => u64::from_be_bytes(*word),
            None => rest.iter().enumerate().fold(0, |key, (at, byte)| key | u64::from(*byte) << (56 - 8 * at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SortKey;

    /// Sorts `words` by `(key, word)` and by `word` alone: the same order.
    fn agrees(words: &[String]) {
        let key = SortKey::new(words.iter().map(String::as_str));
        let mut by_string = words.to_vec();
        by_string.sort();
        let mut by_key: Vec<(u64, &str)> = words.iter().map(|word| (key.of(word), word.as_str())).collect();
        by_key.sort_unstable();
        assert_eq!(by_key.iter().map(|(_, word)| *word).collect::<Vec<_>>(), by_string, "words: {words:?}");
    }

    #[test]
    fn sorting_by_key_then_string_is_sorting_by_string() {
        // Prefixes of each other, NUL bytes where the key pads with zeros, bytes above 0x7f, ties in the first
        // eight bytes after a long shared prefix.
        let odd = ["", "a", "a\0", "a\0\0b", "ab", "ü", "\u{7f}", "zzzzzzzzz", "zzzzzzzz", "zzzzzzzz\0"];
        agrees(&odd.iter().map(|word| word.to_string()).collect::<Vec<_>>());
        let ids: Vec<String> = (0..400).map(|n| format!("srv-{}", n * 7919 % 1000)).collect();
        agrees(&ids);
        let names: Vec<String> = (0..300).map(|n| format!("ci-pool-a1b2c3-{}{}", n % 17, "x".repeat(n % 11))).collect();
        agrees(&names);
        agrees(&["same".to_owned(), "same".to_owned(), "same".to_owned()]);
        agrees(&[]);
    }

    #[test]
    fn the_shared_prefix_is_skipped() {
        let key = SortKey::new(["srv-12", "srv-13", "srv-9"]);
        assert_eq!(key.of("srv-12"), u64::from_be_bytes(*b"12\0\0\0\0\0\0"));
        assert_eq!(SortKey::new(["abc"]).of("abc"), 0, "a lone string shares all of itself");
    }
}
