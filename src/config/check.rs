//! Structure: parses the YAML with positions (marked-yaml) and walks it against the JSON schema generated from
//! the raw types, reporting every unknown key (with "did you mean"), wrong type, missing key and unknown `kind`
//! at its place. The output is the document as typed JSON (numbers as numbers, every string-typed scalar as a
//! string, nothing interpolated yet) plus where each value came from, for the semantic checks that follow.
//!
//! Driving the walk from the schema keeps one source of truth: a field added to `raw.rs` is checked, located and
//! documented in the schema with no second list to update.

use std::collections::{BTreeMap, BTreeSet};

use marked_yaml::{LoadError, LoaderOptions, Node};
use serde_json::{Map, Value};

use super::diag::{backticked, did_you_mean, Problems, SourceMap, Span};

/// Where a value is: its key (when it has one) and the value itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeSpans {
    pub key: Option<Span>,
    pub value: Span,
}

/// A string-typed scalar that may need interpolation or redaction.
#[derive(Debug, Clone)]
pub(crate) struct StringAt {
    pub pointer: String,
    pub span: Span,
    /// A secret field (`writeOnly` in the schema).
    pub secret: bool,
}

/// The structurally checked document.
pub(crate) struct Checked {
    /// Typed by the schema, before interpolation. Parts with problems are left out.
    pub document: Value,
    /// JSON pointer → where it came from.
    pub spans: BTreeMap<String, NodeSpans>,
    /// Every string value (interpolation candidates and secrets).
    pub strings: Vec<StringAt>,
    /// JSON pointers at or under which a structural problem was reported.
    pub broken: BTreeSet<String>,
    /// Whole extents of secret fields holding something other than a string (to blank in snippets).
    pub secret_nodes: Vec<Span>,
}

impl Checked {
    /// A problem was reported at or under `pointer`: the section cannot be converted.
    pub(crate) fn is_broken(&self, pointer: &str) -> bool {
        self.broken.iter().any(|broken| {
            broken == pointer || (broken.starts_with(pointer) && broken[pointer.len()..].starts_with('/'))
        })
    }

    /// The keys of the mapping at `pointer` as written, including entries whose values have problems (so a
    /// reference to a broken ci source is not also called unknown).
    pub(crate) fn child_keys(&self, pointer: &str) -> Vec<String> {
        let prefix = format!("{pointer}/");
        self.spans
            .keys()
            .filter_map(|key| key.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(|rest| rest.replace("~1", "/").replace("~0", "~"))
            .collect()
    }

    pub(crate) fn value_span(&self, pointer: &str) -> Option<Span> {
        self.spans.get(pointer).map(|spans| spans.value)
    }

    /// The key's span when the value has a key, else the value's.
    pub(crate) fn key_span(&self, pointer: &str) -> Option<Span> {
        self.spans.get(pointer).map(|spans| spans.key.unwrap_or(spans.value))
    }
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// RFC 6901 JSON pointer of a path.
pub(crate) fn pointer(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        out.push('/');
        match seg {
            Seg::Key(key) => out.push_str(&key.replace('~', "~0").replace('/', "~1")),
            Seg::Index(index) => out.push_str(&index.to_string()),
        }
    }
    out
}

/// Reports every key that appears twice in one mapping, each with where it was first defined. marked-yaml stops
/// at the first duplicate; this walks yaml-rust2's event stream instead, so a file with three duplicates gets
/// three problems at once, like every other problem. A syntax error ends the walk quietly: [`parse`] reports it.
pub(crate) fn duplicate_keys(src: &SourceMap<'_>, problems: &mut Problems) {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;

    enum Frame {
        Mapping { seen: BTreeMap<String, Span>, at_key: bool },
        Sequence,
    }
    struct Walk<'s, 't> {
        src: &'s SourceMap<'t>,
        stack: Vec<Frame>,
        found: Vec<(String, Span, Span)>,
    }
    impl Walk<'_, '_> {
        /// A node finished; in a mapping it was a key or a value, alternately.
        fn node_done(&mut self, key: Option<(String, Span)>) {
            if let Some(Frame::Mapping { seen, at_key }) = self.stack.last_mut() {
                if *at_key {
                    if let Some((name, span)) = key {
                        match seen.get(&name) {
                            Some(first) => self.found.push((name, span, *first)),
                            None => {
                                seen.insert(name, span);
                            }
                        }
                    }
                }
                *at_key = !*at_key;
            }
        }
    }
    impl MarkedEventReceiver for Walk<'_, '_> {
        fn on_event(&mut self, event: Event, mark: Marker) {
            match event {
                Event::Scalar(value, ..) => {
                    let offset = self.src.byte_offset(mark.index());
                    let (line, column) = self.src.line_column(offset);
                    let len = self.src.scalar_len(offset, &value);
                    self.node_done(Some((value, Span { line, column, offset, len })));
                }
                Event::Alias(_) => self.node_done(None),
                Event::MappingStart(..) => self.stack.push(Frame::Mapping { seen: BTreeMap::new(), at_key: true }),
                Event::SequenceStart(..) => self.stack.push(Frame::Sequence),
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                    self.node_done(None);
                }
                _ => {}
            }
        }
    }

    let text = src.text();
    let found = std::panic::catch_unwind(|| {
        let mut walk = Walk { src, stack: Vec::new(), found: Vec::new() };
        // A scan error is reported by `parse`, with the same position.
        drop(Parser::new_from_str(text).load(&mut walk, false));
        walk.found
    })
    .unwrap_or_default();
    for (name, at, first) in found {
        problems.push_related(
            Some(at),
            format!("duplicate key `{name}`"),
            Some(format!(
                "each key may appear once per mapping (the first `{name}` is on line {}); remove or rename one",
                first.line
            )),
            Some((first, "first defined here")),
        );
    }
}

/// Parses the YAML. A syntax error is reported (located) and ends the check: nothing after it can be trusted.
/// Duplicate keys are [`duplicate_keys`]'s to report; here the later value wins, as in most YAML readers.
pub(crate) fn parse(src: &SourceMap<'_>, problems: &mut Problems) -> Option<Node> {
    // No coercion of quoted scalars: `max: "5"` is a string, as in every other YAML tool.
    let options = LoaderOptions::default().prevent_coercion(true).error_on_duplicate_keys(false);
    let text = src.text();
    // marked-yaml asserts on event orders it does not expect; a malformed file must be an error, never a panic.
    let parsed = std::panic::catch_unwind(|| marked_yaml::parse_yaml_with_options(0, text, options));
    let error = match parsed {
        Ok(Ok(node)) => return Some(node),
        Ok(Err(error)) => error,
        Err(_) => {
            problems.push(None, "the YAML parser failed on this file", Some("check the YAML syntax".to_owned()));
            return None;
        }
    };
    let marker_span =
        |marker: &marked_yaml::Marker| src.span_at(marker, src.line_len(src.byte_offset(marker.character())));
    match error {
        // Not raised with `error_on_duplicate_keys(false)`; `duplicate_keys` reported them anyway.
        LoadError::DuplicateKey(_) => None,
        LoadError::ScanError(marker, scan) => {
            problems.push(Some(marker_span(&marker)), format!("invalid YAML: {}", scan.info()), None);
            None
        }
        LoadError::TopLevelMustBeMapping(marker) => {
            problems.push(
                Some(marker_span(&marker)),
                "the config must be a mapping of keys (`id:`, `ci:`, `backends:`, `pools:`)",
                None,
            );
            None
        }
        LoadError::UnexpectedAnchor(marker) => {
            problems.push(
                Some(marker_span(&marker)),
                "YAML anchors and aliases are not supported",
                Some("repeat the value instead".to_owned()),
            );
            None
        }
        LoadError::UnexpectedTag(marker) => {
            problems.push(
                Some(marker_span(&marker)),
                "YAML tags (`!tag`) are not supported",
                Some("a key or value starting with `!` must be quoted, e.g. `\"!gpu\": \"yes\"`".to_owned()),
            );
            None
        }
        LoadError::MappingKeyMustBeScalar(marker) => {
            problems.push(Some(marker_span(&marker)), "mapping keys must be plain values, not lists or mappings", None);
            None
        }
        LoadError::TopLevelMustBeSequence(marker) => {
            problems.push(Some(marker_span(&marker)), "unexpected YAML structure", None);
            None
        }
    }
}

/// Walks the parsed document against `schema` (the generated JSON schema of [`super::raw::RawConfig`]).
pub(crate) fn check(root: &Node, schema: &Value, src: &SourceMap<'_>, problems: &mut Problems) -> Checked {
    let pool_names = root
        .as_mapping()
        .and_then(|map| map.get_sequence("pools"))
        .map(|pools| {
            pools
                .iter()
                .map(|pool| {
                    pool.as_mapping().and_then(|map| map.get_scalar("name")).map(|name| name.as_str().to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let empty = Map::new();
    let mut walker = Walker {
        defs: schema.get("$defs").and_then(Value::as_object).unwrap_or(&empty),
        src,
        problems,
        pool_names,
        spans: BTreeMap::new(),
        strings: Vec::new(),
        broken: BTreeSet::new(),
        secret_nodes: Vec::new(),
    };
    let mut path = Vec::new();
    let document = walker.walk(root, schema, &mut path, None).unwrap_or(Value::Null);
    Checked {
        document,
        spans: walker.spans,
        strings: walker.strings,
        broken: walker.broken,
        secret_nodes: walker.secret_nodes,
    }
}

struct Walker<'s, 'p> {
    defs: &'s Map<String, Value>,
    src: &'s SourceMap<'s>,
    problems: &'p mut Problems,
    /// Pool names by index, for messages ("in pool `linux`").
    pool_names: Vec<Option<String>>,
    spans: BTreeMap<String, NodeSpans>,
    strings: Vec<StringAt>,
    broken: BTreeSet<String>,
    secret_nodes: Vec<Span>,
}

fn is_null(node: &Node) -> bool {
    node.as_scalar()
        .is_some_and(|scalar| scalar.may_coerce() && matches!(scalar.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

fn schema_types(schema: &Value) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn type_phrase(kind: &str) -> &'static str {
    match kind {
        "string" => "a string",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "`true` or `false`",
        "object" => "a mapping",
        "array" => "a list",
        _ => "a value",
    }
}

impl<'s> Walker<'s, '_> {
    fn resolve(&self, schema: &'s Value) -> &'s Value {
        let mut current = schema;
        // Bounded: a reference cycle in a generated schema is a bug, not a reason to hang.
        for _ in 0..16 {
            let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
                break;
            };
            match reference.strip_prefix("#/$defs/").and_then(|name| self.defs.get(name)) {
                Some(target) => current = target,
                None => break,
            }
        }
        current
    }

    fn node_span(&self, node: &Node) -> Span {
        let start = node.span().start().copied().unwrap_or_else(|| marked_yaml::Marker::new(0, 0, 1, 1));
        let offset = self.src.byte_offset(start.character());
        let len = match node {
            Node::Scalar(scalar) => self.src.scalar_len(offset, scalar.as_str()),
            _ => self.src.line_len(offset),
        };
        self.src.span_at(&start, len)
    }

    fn key_span(&self, key: &marked_yaml::types::MarkedScalarNode) -> Option<Span> {
        key.span().start().map(|start| {
            let offset = self.src.byte_offset(start.character());
            self.src.span_at(start, self.src.scalar_len(offset, key.as_str()))
        })
    }

    // -- describing places in messages ------------------------------------------------------------------------

    /// The named section a path is in (`pool `linux``, `backend `hetzner``) and how many segments name it.
    fn section(&self, path: &[Seg]) -> Option<(usize, String)> {
        match path {
            [Seg::Key(top), Seg::Index(index), ..] if top == "pools" => {
                let name = match self.pool_names.get(*index) {
                    Some(Some(name)) => format!("pool `{name}`"),
                    _ => format!("pool #{}", index + 1),
                };
                Some((2, name))
            }
            [Seg::Key(top), Seg::Key(name), ..] => {
                let what = match top.as_str() {
                    "ci" => "ci source",
                    "backends" => "backend",
                    "images" => "image",
                    _ => return None,
                };
                Some((2, format!("{what} `{name}`")))
            }
            _ => None,
        }
    }

    fn dotted(path: &[Seg]) -> String {
        let mut out = String::new();
        for seg in path {
            match seg {
                Seg::Key(key) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                Seg::Index(index) => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }

    /// `in `scale` of pool `linux``, `in pool `linux``, `in `ci``, or `at the top level`.
    fn place(&self, path: &[Seg]) -> String {
        match self.section(path) {
            Some((len, name)) if path.len() == len => format!("in {name}"),
            Some((len, name)) => format!("in `{}` of {name}", Self::dotted(&path[len..])),
            None if path.is_empty() => "at the top level".to_owned(),
            None => format!("in `{}`", Self::dotted(path)),
        }
    }

    /// What a value is called in messages: `pool `linux``, `` `max` in `scale` of pool `linux` ``, `` `id` ``.
    fn subject(&self, path: &[Seg]) -> String {
        if let Some((len, name)) = self.section(path) {
            if path.len() == len {
                return name;
            }
        }
        // A list item is named with its list: `instances[0]`.
        let leaf_len = if matches!(path.last(), Some(Seg::Index(_))) && path.len() >= 2 { 2 } else { 1 };
        let (parent, leaf) = path.split_at(path.len().saturating_sub(leaf_len));
        let leaf = Self::dotted(leaf);
        if parent.is_empty() {
            format!("`{leaf}`")
        } else {
            format!("`{leaf}` {}", self.place(parent))
        }
    }

    fn found(node: &Node, secret: bool) -> String {
        match node {
            Node::Mapping(_) => "a mapping".to_owned(),
            Node::Sequence(_) => "a list".to_owned(),
            Node::Scalar(_) if is_null(node) => "nothing".to_owned(),
            Node::Scalar(_) if secret => "a value".to_owned(),
            Node::Scalar(scalar) if !scalar.may_coerce() => {
                format!("the quoted string `{}`", scalar.as_str())
            }
            Node::Scalar(scalar) => format!("`{}`", scalar.as_str()),
        }
    }

    // -- reporting --------------------------------------------------------------------------------------------

    fn fail(&mut self, path: &[Seg], span: Option<Span>, message: String, hint: Option<String>) {
        self.broken.insert(pointer(path));
        self.problems.push(span, message, hint);
    }

    fn type_error(&mut self, node: &Node, path: &[Seg], expected: &[&str], secret: bool) {
        let wanted: Vec<&str> = expected.iter().filter(|kind| **kind != "null").map(|kind| type_phrase(kind)).collect();
        let wanted = if wanted.is_empty() { "a value".to_owned() } else { wanted.join(" or ") };
        let message = format!("expected {wanted} for {}, found {}", self.subject(path), Self::found(node, secret));
        let hint = match node.as_scalar() {
            Some(scalar) if !secret && scalar.as_str().contains("${") => {
                Some("`${...}` references work only in string values".to_owned())
            }
            Some(scalar)
                if !scalar.may_coerce()
                    && ((expected.contains(&"integer") && scalar.as_str().parse::<i64>().is_ok())
                        || (expected.contains(&"boolean") && matches!(scalar.as_str(), "true" | "false"))) =>
            {
                Some("remove the quotes".to_owned())
            }
            Some(scalar) if expected.contains(&"boolean") && matches!(scalar.as_str(), "yes" | "no" | "on" | "off") => {
                Some("write `true` or `false`".to_owned())
            }
            _ => None,
        };
        let span = self.node_span(node);
        if secret {
            self.secret_nodes.push(self.node_extent(node));
        }
        self.fail(path, Some(span), message, hint);
    }

    /// The whole text of a node, to its end marker when the parser gave one.
    fn node_extent(&self, node: &Node) -> Span {
        let span = self.node_span(node);
        match node.span().end() {
            Some(end) if !matches!(node, Node::Scalar(_)) => {
                let text = self.src.text();
                let mut end = self.src.byte_offset(end.character()).max(span.offset);
                // A flow collection's end marker sits on its closing bracket; a block one's after trailing space.
                if matches!(text.as_bytes().get(end), Some(b']' | b'}')) {
                    end += 1;
                }
                let extent = text.get(span.offset..end).unwrap_or_default().trim_end();
                Span { len: extent.len(), ..span }
            }
            _ => span,
        }
    }

    // -- the walk ---------------------------------------------------------------------------------------------

    fn walk(&mut self, node: &Node, schema: &'s Value, path: &mut Vec<Seg>, key: Option<Span>) -> Option<Value> {
        let value_span = self.node_span(node);
        self.spans.insert(pointer(path), NodeSpans { key, value: value_span });
        let schema = self.resolve(schema);

        if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
            return self.walk_one_of(node, variants, path, key);
        }
        if let Some(variants) = schema.get("anyOf").and_then(Value::as_array) {
            let nullable = variants.iter().any(|variant| schema_types(self.resolve(variant)).contains(&"null"));
            if nullable && is_null(node) {
                return Some(Value::Null);
            }
            let non_null: Vec<&'s Value> =
                variants.iter().filter(|variant| !schema_types(self.resolve(variant)).contains(&"null")).collect();
            if let [only] = non_null.as_slice() {
                return self.walk(node, only, path, key);
            }
        }

        let types = schema_types(schema);
        let secret = schema.get("writeOnly").and_then(Value::as_bool).unwrap_or(false);
        if is_null(node) {
            if types.contains(&"null") {
                return Some(Value::Null);
            }
            self.type_error(node, path, &types, secret);
            return None;
        }
        match node {
            Node::Mapping(_) if types.contains(&"object") => self.walk_object(node, schema, path, key),
            Node::Sequence(sequence) if types.contains(&"array") => {
                let items = schema.get("items").unwrap_or(&Value::Bool(true));
                let mut out = Vec::new();
                for (index, item) in sequence.iter().enumerate() {
                    path.push(Seg::Index(index));
                    if let Some(value) = self.walk(item, items, path, None) {
                        out.push(value);
                    }
                    path.pop();
                }
                Some(Value::Array(out))
            }
            Node::Scalar(scalar) => self.walk_scalar(node, scalar, schema, &types, path, secret),
            _ => {
                self.type_error(node, path, &types, secret);
                None
            }
        }
    }

    fn walk_scalar(
        &mut self,
        node: &Node,
        scalar: &marked_yaml::types::MarkedScalarNode,
        schema: &Value,
        types: &[&str],
        path: &[Seg],
        secret: bool,
    ) -> Option<Value> {
        if types.contains(&"integer") && scalar.may_coerce() {
            let text = scalar.as_str();
            if let Ok(number) = text.parse::<i64>() {
                return self.check_integer(node, Some(number), schema, path);
            }
            // Digits that overflow every integer: "too large", not "expected a whole number".
            let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
            if !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()) {
                return self.check_integer(node, None, schema, path);
            }
        }
        if types.contains(&"boolean") {
            if let Some(flag) = scalar.as_bool() {
                return Some(Value::Bool(flag));
            }
        }
        if types.contains(&"string") {
            // Any scalar is text here (`serverType: 22` is the string "22"), as YAML users expect.
            let text = scalar.as_str().to_owned();
            self.strings.push(StringAt { pointer: pointer(path), span: self.node_span(node), secret });
            return Some(Value::String(text));
        }
        self.type_error(node, path, types, secret);
        None
    }

    /// A whole number against the schema's bounds. `number` is `None` when the text is a whole number too large
    /// for any machine integer.
    fn check_integer(&mut self, node: &Node, number: Option<i64>, schema: &Value, path: &[Seg]) -> Option<Value> {
        let format = schema.get("format").and_then(Value::as_str).unwrap_or_default();
        let minimum = schema.get("minimum").and_then(Value::as_i64);
        let maximum = schema.get("maximum").and_then(Value::as_i64).or(match format {
            "uint32" => Some(i64::from(u32::MAX)),
            "int32" => Some(i64::from(i32::MAX)),
            "uint64" | "int64" => Some(i64::MAX),
            _ => None,
        });
        let span = Some(self.node_span(node));
        let written = node.as_scalar().map(|scalar| scalar.as_str().to_owned()).unwrap_or_default();
        let negative = number.map_or(written.starts_with('-'), |number| number < 0);
        if negative && format.starts_with('u') {
            let message = format!("{} must not be negative, found {written}", self.subject(path));
            self.fail(path, span, message, None);
            return None;
        }
        let below = |bound: i64| number.map_or(negative, |number| number < bound);
        let above = |bound: i64| number.map_or(!negative, |number| number > bound);
        if let Some(minimum) = minimum.filter(|minimum| below(*minimum)) {
            let message = format!("{} must be at least {minimum}, found {written}", self.subject(path));
            self.fail(path, span, message, None);
            return None;
        }
        if let Some(maximum) = maximum.filter(|maximum| above(*maximum)) {
            let message = format!("{} is too large: at most {maximum}, found {written}", self.subject(path));
            let key = path.iter().rev().find_map(|seg| match seg {
                Seg::Key(key) => Some(key.as_str()),
                Seg::Index(_) => None,
            });
            let hint = key.and_then(super::raw::bound_reason).map(str::to_owned);
            self.fail(path, span, message, hint);
            return None;
        }
        Some(Value::from(number?))
    }

    fn walk_object(&mut self, node: &Node, schema: &'s Value, path: &mut Vec<Seg>, key: Option<Span>) -> Option<Value> {
        let map = node.as_mapping()?;
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let properties =
            schema.get("properties").and_then(Value::as_object).unwrap_or_else(|| EMPTY.get_or_init(Map::new));
        let additional = schema.get("additionalProperties");
        let mut out = Map::new();
        for (entry_key, entry_value) in map.iter() {
            let name = entry_key.as_str();
            let entry_key_span = self.key_span(entry_key);
            path.push(Seg::Key(name.to_owned()));
            if let Some(property) = properties.get(name) {
                if let Some(value) = self.walk(entry_value, property, path, entry_key_span) {
                    out.insert(name.to_owned(), value);
                }
            } else {
                match additional {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = properties.keys().map(String::as_str).collect();
                        let hint = did_you_mean(name, known.iter().copied())
                            .or_else(|| Some(format!("expected one of {}", backticked(known.iter().copied()))));
                        let message = format!("unknown key `{name}` {}", self.place(&path[..path.len() - 1]));
                        self.fail(path, entry_key_span, message, hint);
                    }
                    Some(schema @ Value::Object(_)) => {
                        if let Some(value) = self.walk(entry_value, schema, path, entry_key_span) {
                            out.insert(name.to_owned(), value);
                        }
                    }
                    // No constraint: keep the value as text so it still round-trips.
                    _ => {
                        out.insert(name.to_owned(), Value::String(String::new()));
                    }
                }
            }
            path.pop();
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if map.get_node(name).is_none() {
                    let message = format!("missing key `{name}` {}", self.place(path));
                    let span = Some(key.unwrap_or_else(|| self.node_span(node)));
                    self.fail(path, span, message, None);
                }
            }
        }
        Some(Value::Object(out))
    }

    /// `oneOf`: either a choice of constants (`billing: hourly`) or variants told apart by their `kind` key.
    fn walk_one_of(
        &mut self,
        node: &Node,
        variants: &'s [Value],
        path: &mut Vec<Seg>,
        key: Option<Span>,
    ) -> Option<Value> {
        let constants: Option<Vec<&str>> =
            variants.iter().map(|variant| self.resolve(variant).get("const").and_then(Value::as_str)).collect();
        if let Some(constants) = constants {
            return match node.as_scalar().filter(|_| !is_null(node)) {
                Some(scalar) if constants.contains(&scalar.as_str()) => Some(Value::String(scalar.as_str().to_owned())),
                Some(scalar) => {
                    let hint = did_you_mean(scalar.as_str(), constants.iter().copied())
                        .unwrap_or_else(|| format!("expected one of {}", backticked(constants.iter().copied())));
                    let message = format!("invalid value `{}` for {}", scalar.as_str(), self.subject(path));
                    let span = self.node_span(node);
                    self.fail(path, Some(span), message, Some(hint));
                    None
                }
                None => {
                    self.type_error(node, path, &["string"], false);
                    None
                }
            };
        }

        let kinds: Vec<(&str, &'s Value)> = variants
            .iter()
            .filter_map(|variant| {
                let variant = self.resolve(variant);
                let kind = variant.get("properties")?.get("kind")?.get("const")?.as_str()?;
                Some((kind, variant))
            })
            .collect();
        let kind_names = || backticked(kinds.iter().map(|(kind, _)| *kind));
        let Some(map) = node.as_mapping() else {
            self.type_error(node, path, &["object"], false);
            return None;
        };
        let Some(kind_node) = map.get_node("kind") else {
            let message = format!("missing key `kind` {}", self.place(path));
            let span = Some(key.unwrap_or_else(|| self.node_span(node)));
            self.fail(path, span, message, Some(format!("add `kind:` with one of {}", kind_names())));
            return None;
        };
        let kind = kind_node.as_scalar().map(|scalar| scalar.as_str()).unwrap_or_default();
        match kinds.iter().find(|(name, _)| *name == kind) {
            Some((_, variant)) => self.walk(node, variant, path, key),
            None => {
                // What people call these services, for kinds named after the product rather than the API.
                let alias = match kind.to_ascii_lowercase().as_str() {
                    "hetzner" | "hetzner-cloud" => Some("hcloud"),
                    "ec2" | "amazon" => Some("aws"),
                    "lxd" | "lxc" => Some("incus"),
                    "azure" | "azure-devops" | "azdo" => Some("azure-pipelines"),
                    _ => None,
                }
                .filter(|alias| kinds.iter().any(|(name, _)| name == alias))
                .map(|alias| format!("did you mean `{alias}`?"));
                let hint = alias
                    .or_else(|| did_you_mean(kind, kinds.iter().map(|(kind, _)| *kind)))
                    .map(|guess| format!("{guess} kinds are {}", kind_names()))
                    .unwrap_or_else(|| format!("expected one of {}", kind_names()));
                let span = self.node_span(kind_node);
                let message = format!("unknown kind `{kind}` for {}", self.subject(path));
                path.push(Seg::Key("kind".to_owned()));
                self.fail(path, Some(span), message, Some(hint));
                path.pop();
                None
            }
        }
    }
}
