//! Query strings and path segments as the in-repo HTTP fakes read them.

/// The decoded `key=value` pairs of a query string, in order (a key without `=` has an empty value).
pub fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(key), form_decode(value))
        })
        .collect()
}

/// A query component (`application/x-www-form-urlencoded`): `+` is a space, then `%XX` escapes (so `%2B` stays a
/// plus).
fn form_decode(text: &str) -> String {
    percent_decode(&text.replace('+', " "))
}

/// A path segment: `%XX` escapes only (a `+` in a path is a plus); a malformed escape stays as it is.
pub fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

#[test]
fn escapes_decode_up_to_the_last_character() {
    assert_eq!(url_pairs("a=b%20c&d=%2B+x%41"), [("a".into(), "b c".into()), ("d".into(), "+ xA".into())]);
    assert_eq!(percent_decode("x%4"), "x%4");
    assert_eq!(percent_decode("a+b%2F"), "a+b/");
}
