//! Run search: the filter and sort grammar of `ListExperiments` (and the HTTP
//! API's `filter` and `order_by`), parsed into typed values the index evaluates.
//!
//! ```text
//! filter    := condition ("and" condition)*
//! condition := field op value
//! field     := id | name | owner | namespace | framework | task | external_id
//!            | created_at | updated_at            (milliseconds since the epoch)
//!            | params.<key>                        (metadata; nested objects by dots)
//!            | metrics.<key>.<last|min|max|count|last_step>
//! op        := = | != | < | <= | > | >= | ~ (contains, any case) | ^= (starts with)
//! value     := number | "text" | 'text' | true | false | null
//! order_by  := field [ASC | DESC]
//! ```
//!
//! Keys with spaces or other characters go in backticks: ``params.`batch size` ``.
//! A metric key's aggregate follows its last dot (`metrics.val/loss.last`). Words
//! (`and`, `asc`, `desc`, `true`...) are case-insensitive. Text in double or single
//! quotes escapes its quote and `\` with a backslash.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A bad filter or sort key, naming the offending token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at {token:?} (position {at})")]
pub struct ParseError {
    pub token: String,
    pub at: usize,
    pub reason: String,
}

/// A metric summary's aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Agg {
    Last,
    Min,
    Max,
    Count,
    LastStep,
}

impl Agg {
    pub const ALL: [Agg; 5] = [Agg::Last, Agg::Min, Agg::Max, Agg::Count, Agg::LastStep];

    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "last" => Agg::Last,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "count" => Agg::Count,
            "last_step" => Agg::LastStep,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Agg::Last => "last",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Count => "count",
            Agg::LastStep => "last_step",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// What a condition or sort key looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Field {
    Id,
    Name,
    Owner,
    Namespace,
    Framework,
    Task,
    ExternalId,
    CreatedAt,
    UpdatedAt,
    Param(String),
    Metric(String, Agg),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Id => f.write_str("id"),
            Field::Name => f.write_str("name"),
            Field::Owner => f.write_str("owner"),
            Field::Namespace => f.write_str("namespace"),
            Field::Framework => f.write_str("framework"),
            Field::Task => f.write_str("task"),
            Field::ExternalId => f.write_str("external_id"),
            Field::CreatedAt => f.write_str("created_at"),
            Field::UpdatedAt => f.write_str("updated_at"),
            Field::Param(k) => write!(f, "params.{k}"),
            Field::Metric(k, a) => write!(f, "metrics.{k}.{}", a.name()),
        }
    }
}

/// A value in a condition, and what a field holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Number(f64),
    Text(String),
}

impl Value {
    /// A total order across kinds: null < booleans < numbers < text, numbers by
    /// `total_cmp`. Used for sorting and page tokens.
    pub fn total_cmp(&self, other: &Value) -> Ordering {
        fn rank(v: &Value) -> u8 {
            match v {
                Value::Null => 0,
                Value::Bool(_) => 1,
                Value::Number(_) => 2,
                Value::Text(_) => 3,
            }
        }
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Number(a), Value::Number(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.cmp(b),
            _ => rank(self).cmp(&rank(other)),
        }
    }

    /// A JSON metadata value as a comparable value (objects and arrays as their
    /// JSON text).
    pub fn of_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => n.as_f64().map_or(Value::Null, Value::Number),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        }
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Contains, ignoring case (text only).
    Contains,
    /// Starts with (text only).
    Prefix,
}

impl Op {
    /// Whether `have` satisfies `self want`. Values of different kinds never
    /// compare (a number never equals text), except that `!=` holds for them.
    pub fn holds(self, have: &Value, want: &Value) -> bool {
        use Value::*;
        match self {
            Op::Contains => match (have, want) {
                (Text(h), Text(w)) => h.to_lowercase().contains(&w.to_lowercase()),
                _ => false,
            },
            Op::Prefix => match (have, want) {
                (Text(h), Text(w)) => h.starts_with(w.as_str()),
                _ => false,
            },
            _ => {
                let ord = match (have, want) {
                    (Number(a), Number(b)) => a.partial_cmp(b),
                    (Text(a), Text(b)) => Some(a.cmp(b)),
                    (Bool(a), Bool(b)) => Some(a.cmp(b)),
                    (Null, Null) => Some(Ordering::Equal),
                    _ => None,
                };
                match (self, ord) {
                    (Op::Ne, None) => true,
                    (_, None) => false,
                    (Op::Eq, Some(o)) => o.is_eq(),
                    (Op::Ne, Some(o)) => o.is_ne(),
                    (Op::Lt, Some(o)) => o.is_lt(),
                    (Op::Le, Some(o)) => o.is_le(),
                    (Op::Gt, Some(o)) => o.is_gt(),
                    (Op::Ge, Some(o)) => o.is_ge(),
                    (Op::Contains | Op::Prefix, _) => false,
                }
            }
        }
    }
}

/// One condition of a filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub field: Field,
    pub op: Op,
    pub value: Value,
}

/// A sort key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderBy {
    pub field: Field,
    pub descending: bool,
}

/// A parsed search.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Search {
    pub conditions: Vec<Condition>,
    /// Sort keys; the id breaks remaining ties. Empty: newest first.
    pub order_by: Vec<OrderBy>,
}

impl Search {
    /// The sort keys to apply: the given ones, or newest first.
    pub fn order(&self) -> Vec<OrderBy> {
        if self.order_by.is_empty() {
            vec![OrderBy {
                field: Field::CreatedAt,
                descending: true,
            }]
        } else {
            self.order_by.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Number(f64),
    Op(Op),
}

struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn err(&self, at: usize, token: &str, reason: &str) -> ParseError {
        ParseError {
            token: token.to_owned(),
            at,
            reason: reason.to_owned(),
        }
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.text[self.at..].chars().next() {
            if !c.is_whitespace() {
                break;
            }
            self.at += c.len_utf8();
        }
    }

    /// The next token and where it starts.
    fn next(&mut self) -> Result<Option<(usize, Tok, &'a str)>, ParseError> {
        self.skip_space();
        let start = self.at;
        let rest = &self.text[start..];
        let Some(c) = rest.chars().next() else {
            return Ok(None);
        };
        let (tok, len) = match c {
            '"' | '\'' => {
                let mut out = String::new();
                let mut chars = rest.char_indices().skip(1);
                let mut end = None;
                while let Some((i, ch)) = chars.next() {
                    match ch {
                        '\\' => match chars.next() {
                            Some((_, e)) => out.push(e),
                            None => break,
                        },
                        ch if ch == c => {
                            end = Some(i + 1);
                            break;
                        }
                        ch => out.push(ch),
                    }
                }
                let Some(len) = end else {
                    return Err(self.err(start, rest, "unterminated text"));
                };
                (Tok::Quoted(out), len)
            }
            '=' => (Tok::Op(Op::Eq), 1),
            '~' => (Tok::Op(Op::Contains), 1),
            '!' if rest.starts_with("!=") => (Tok::Op(Op::Ne), 2),
            '^' if rest.starts_with("^=") => (Tok::Op(Op::Prefix), 2),
            '<' if rest.starts_with("<=") => (Tok::Op(Op::Le), 2),
            '<' if rest.starts_with("<>") => (Tok::Op(Op::Ne), 2),
            '<' => (Tok::Op(Op::Lt), 1),
            '>' if rest.starts_with(">=") => (Tok::Op(Op::Ge), 2),
            '>' => (Tok::Op(Op::Gt), 1),
            _ => {
                // A word: a field path (with backquoted parts) or a number.
                let mut len = 0;
                let mut in_ticks = false;
                for (i, ch) in rest.char_indices() {
                    if ch == '`' {
                        in_ticks = !in_ticks;
                    } else if !in_ticks && (ch.is_whitespace() || "=!<>~^\"'".contains(ch)) {
                        break;
                    }
                    len = i + ch.len_utf8();
                }
                if in_ticks {
                    return Err(self.err(start, rest, "unterminated backquote"));
                }
                let word = &rest[..len];
                let number = (word
                    .starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.')
                    && !word.contains('`'))
                .then(|| word.parse::<f64>().ok())
                .flatten()
                .filter(|n| n.is_finite());
                match number {
                    Some(n) => (Tok::Number(n), len),
                    None => (Tok::Word(word.to_owned()), len),
                }
            }
        };
        self.at = start + len;
        Ok(Some((start, tok, &rest[..len])))
    }
}

/// Splits a dotted path into parts, honouring backquotes.
fn path_parts(path: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut in_ticks = false;
    for ch in path.chars() {
        match ch {
            '`' => in_ticks = !in_ticks,
            '.' if !in_ticks => parts.push(String::new()),
            ch => {
                if let Some(last) = parts.last_mut() {
                    last.push(ch);
                }
            }
        }
    }
    parts
}

/// Parses a field path.
pub fn parse_field(word: &str, at: usize) -> Result<Field, ParseError> {
    let bad = |reason: &str| ParseError {
        token: word.to_owned(),
        at,
        reason: reason.to_owned(),
    };
    let parts = path_parts(word);
    let head = parts[0].to_ascii_lowercase();
    let plain = parts.len() == 1;
    Ok(match head.as_str() {
        "id" if plain => Field::Id,
        "name" if plain => Field::Name,
        "owner" if plain => Field::Owner,
        "namespace" if plain => Field::Namespace,
        "framework" if plain => Field::Framework,
        "task" if plain => Field::Task,
        "external_id" if plain => Field::ExternalId,
        "created_at" if plain => Field::CreatedAt,
        "updated_at" if plain => Field::UpdatedAt,
        "params" | "param" | "metadata" if !plain => {
            let key = parts[1..].join(".");
            if key.is_empty() {
                return Err(bad("a params field needs a key, e.g. params.lr"));
            }
            Field::Param(key)
        }
        "metrics" | "metric" if parts.len() >= 3 => {
            let agg = parts[parts.len() - 1].as_str();
            let Some(agg) = Agg::parse(agg) else {
                return Err(bad(
                    "a metrics field ends in .last, .min, .max, .count or .last_step",
                ));
            };
            let key = parts[1..parts.len() - 1].join(".");
            if key.is_empty() {
                return Err(bad("a metrics field needs a key, e.g. metrics.loss.last"));
            }
            Field::Metric(key, agg)
        }
        "metrics" | "metric" => {
            return Err(bad(
                "a metrics field is metrics.<key>.<last|min|max|count|last_step>",
            ));
        }
        _ => {
            return Err(bad(
                "unknown field (id, name, owner, namespace, framework, task, external_id, \
                 created_at, updated_at, params.<key>, metrics.<key>.<aggregate>)",
            ));
        }
    })
}

/// Parses a filter (empty: everything).
pub fn parse_filter(text: &str) -> Result<Vec<Condition>, ParseError> {
    let mut lex = Lexer { text, at: 0 };
    let mut out = Vec::new();
    loop {
        let Some((at, tok, raw)) = lex.next()? else {
            if out.is_empty() {
                return Ok(out);
            }
            return Err(lex.err(text.len(), "", "a condition is missing after `and`"));
        };
        let Tok::Word(word) = tok else {
            return Err(lex.err(at, raw, "expected a field"));
        };
        let field = parse_field(&word, at)?;
        let (at, op) = match lex.next()? {
            Some((at, Tok::Op(op), _)) => (at, op),
            Some((at, _, raw)) => {
                return Err(lex.err(at, raw, "expected an operator after the field"));
            }
            None => {
                return Err(lex.err(at, &word, "expected an operator after the field"));
            }
        };
        let Some((vat, value, raw)) = lex.next()? else {
            return Err(lex.err(at, &text[at..], "expected a value after the operator"));
        };
        let value = match value {
            Tok::Number(n) => Value::Number(n),
            Tok::Quoted(s) => Value::Text(s),
            Tok::Word(w) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Tok::Word(w) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Tok::Word(w) if w.eq_ignore_ascii_case("null") => Value::Null,
            _ => {
                return Err(lex.err(
                    vat,
                    raw,
                    "expected a number, quoted text, true, false or null",
                ));
            }
        };
        if matches!(op, Op::Contains | Op::Prefix) && !matches!(value, Value::Text(_)) {
            return Err(lex.err(vat, raw, "~ and ^= take quoted text"));
        }
        out.push(Condition { field, op, value });
        match lex.next()? {
            None => return Ok(out),
            Some((_, Tok::Word(w), _)) if w.eq_ignore_ascii_case("and") => {}
            Some((at, _, raw)) => return Err(lex.err(at, raw, "expected `and`")),
        }
    }
}

/// Parses one sort key: a field, optionally followed by ASC or DESC.
pub fn parse_order_by(text: &str) -> Result<OrderBy, ParseError> {
    let mut lex = Lexer { text, at: 0 };
    let Some((at, Tok::Word(word), _)) = lex.next()? else {
        return Err(lex.err(0, text, "expected a field to sort by"));
    };
    let field = parse_field(&word, at)?;
    let descending = match lex.next()? {
        None => false,
        Some((_, Tok::Word(w), _)) if w.eq_ignore_ascii_case("asc") => false,
        Some((_, Tok::Word(w), _)) if w.eq_ignore_ascii_case("desc") => true,
        Some((at, _, raw)) => return Err(lex.err(at, raw, "expected ASC or DESC")),
    };
    if let Some((at, _, raw)) = lex.next()? {
        return Err(lex.err(at, raw, "unexpected text after the direction"));
    }
    Ok(OrderBy { field, descending })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_into_typed_conditions() {
        let c = parse_filter(
            r#"name ~ "res\"net" AND params.lr = 3e-4 and metrics.val/loss.last < 0.2 and params.`batch size` >= 64 and owner != 'a\'b' and created_at > -1"#,
        )
        .unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!(c[0].field, Field::Name);
        assert_eq!(c[0].op, Op::Contains);
        assert_eq!(c[0].value, Value::Text("res\"net".into()));
        assert_eq!(c[1].field, Field::Param("lr".into()));
        assert_eq!(c[1].value, Value::Number(0.0003));
        assert_eq!(c[2].field, Field::Metric("val/loss".into(), Agg::Last));
        assert_eq!(c[3].field, Field::Param("batch size".into()));
        assert_eq!(c[4].value, Value::Text("a'b".into()));
        assert_eq!(c[5].value, Value::Number(-1.0));
        assert!(parse_filter("").unwrap().is_empty());
        assert_eq!(
            parse_filter("metrics.a.b.c.max > 1").unwrap()[0].field,
            Field::Metric("a.b.c".into(), Agg::Max)
        );
    }

    #[test]
    fn bad_filters_name_the_offending_token() {
        for (text, token) in [
            ("nmae = 1", "nmae"),
            ("name = ", "= "),
            ("name 1", "1"),
            ("name = 1 or owner = 2", "or"),
            ("metrics.loss.avg < 1", "metrics.loss.avg"),
            ("name ~ 3", "3"),
            ("name = \"open", "\"open"),
            ("name = 1 and", ""),
            ("params. = 1", "params."),
        ] {
            let err = parse_filter(text).unwrap_err();
            assert_eq!(err.token, token, "{text}: {err}");
        }
    }

    #[test]
    fn sort_keys_parse() {
        assert_eq!(
            parse_order_by("metrics.val/loss.last DESC").unwrap(),
            OrderBy {
                field: Field::Metric("val/loss".into(), Agg::Last),
                descending: true
            }
        );
        assert!(!parse_order_by("created_at").unwrap().descending);
        assert_eq!(
            parse_order_by("created_at sideways").unwrap_err().token,
            "sideways"
        );
    }

    #[test]
    fn operators_compare_like_kinds_only() {
        let n = Value::Number;
        assert!(Op::Lt.holds(&n(1.0), &n(2.0)));
        assert!(!Op::Eq.holds(&n(1.0), &Value::Text("1".into())));
        assert!(Op::Ne.holds(&n(1.0), &Value::Text("1".into())));
        assert!(Op::Contains.holds(
            &Value::Text("ResNet-50".into()),
            &Value::Text("resnet".into())
        ));
        assert!(!Op::Prefix.holds(&Value::Text("ResNet".into()), &Value::Text("res".into())));
    }
}
