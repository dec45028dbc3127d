//! Kubernetes label selectors in their string form (`app=vllm,tier in (a,b),!canary`).
//!
//! This module owns parsing, validating, matching and printing a selector exactly as
//! Kubernetes' `labels.Parse` (k8s.io/apimachinery/pkg/labels/selector.go) does, so a
//! `podSelector` that `kubectl get pods -l '…'` accepts means the same thing here:
//!
//! | form | matches a pod when |
//! |---|---|
//! | `key=value`, `key==value` | the label is present and equal |
//! | `key!=value` | the label is absent or different |
//! | `key in (v1,v2)` | the label is present and one of the values |
//! | `key notin (v1,v2)` | the label is absent or none of the values |
//! | `key` | the label is present (any value) |
//! | `!key` | the label is absent |
//! | `key>3`, `key<3` | the label is present, an integer, and greater / less |
//!
//! Requirements are separated by commas and all must hold (AND). Whitespace may surround
//! tokens. Values may be empty (`a=`, `a in (,b)`); Kubernetes reads `a in ()` as
//! `a in ("")`, and so does this module. Keys are an optional DNS-subdomain prefix of at
//! most 253 characters plus `/`, then a name of at most 63 characters of `[A-Za-z0-9]`
//! at both ends and `-_.` inside; values follow the name rule but may be empty.
//!
//! It must never do I/O, and never decide policy: whether an empty selector (which
//! matches every pod) is acceptable is the caller's call.

use std::collections::BTreeMap;
use std::fmt;

/// Longest label name (the part after an optional `prefix/`) and longest label value.
const MAX_NAME_LEN: usize = 63;
/// Longest DNS-subdomain prefix of a label key.
const MAX_PREFIX_LEN: usize = 253;

/// Examples shown in error messages, one per kind of mistake.
const EXAMPLE_SELECTOR: &str = "app=vllm,tier in (a,b)";
const EXAMPLE_KEY: &str = "app.kubernetes.io/name=vllm";
const EXAMPLE_VALUE: &str = "app=vllm-server";
const EXAMPLE_SET: &str = "tier in (a,b)";
const EXAMPLE_EXACT: &str = "app=vllm";
const EXAMPLE_NOT: &str = "!canary";
const EXAMPLE_ORDER: &str = "gpu-count>1";

/// A label selector string that could not be parsed or holds an invalid key or value.
///
/// Its message names the selector, what is wrong and where, and shows the right form:
/// `bad label selector "app in vllm": expected "(" after "in", found "vllm" at byte 7
/// (write it like: tier in (a,b))`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad label selector {input:?}: {problem} at byte {position} (write it like: {example})")]
pub struct SelectorError {
    /// The whole selector as given.
    pub input: String,
    /// Byte offset into `input` of the offending text (`input.len()` at the end).
    pub position: usize,
    /// What is wrong, quoting the offending text.
    pub problem: String,
    /// A correct selector of the kind the user was writing.
    pub example: &'static str,
}

/// How one requirement relates a label to its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `key=value`: present and equal.
    Equals,
    /// `key==value`: the same as [`Operator::Equals`], kept apart only for printing.
    DoubleEquals,
    /// `key!=value`: absent, or present with another value.
    NotEquals,
    /// `key in (a,b)`: present with one of the values.
    In,
    /// `key notin (a,b)`: absent, or present with none of the values.
    NotIn,
    /// `key`: present with any value.
    Exists,
    /// `!key`: absent.
    DoesNotExist,
    /// `key>3`: present, an integer, and greater than the value.
    GreaterThan,
    /// `key<3`: present, an integer, and less than the value.
    LessThan,
}

impl Operator {
    /// The operator as written between key and value (`""` for the unary ones).
    fn symbol(self) -> &'static str {
        match self {
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::NotEquals => "!=",
            Operator::In => " in ",
            Operator::NotIn => " notin ",
            Operator::GreaterThan => ">",
            Operator::LessThan => "<",
            Operator::Exists | Operator::DoesNotExist => "",
        }
    }
}

/// One `key <op> values` clause of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    key: String,
    operator: Operator,
    /// Sorted and without duplicates (a set, as in Kubernetes); one value for the
    /// exact and order operators, none for the unary ones.
    values: Vec<String>,
    /// The value of `>` / `<`, parsed once.
    bound: Option<i64>,
}

impl Requirement {
    /// The label key (`app`, `app.kubernetes.io/name`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How the key relates to the values.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values, sorted and without duplicates; empty for `key` and `!key`.
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Whether this requirement holds for a pod with these labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let label = labels.get(&self.key);
        let listed = |v: &String| self.values.binary_search(v).is_ok();
        match self.operator {
            Operator::Equals | Operator::DoubleEquals | Operator::In => label.is_some_and(listed),
            Operator::NotEquals | Operator::NotIn => !label.is_some_and(listed),
            Operator::Exists => label.is_some(),
            Operator::DoesNotExist => label.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let (Some(label), Some(bound)) = (label, self.bound) else {
                    return false;
                };
                match label.parse::<i64>() {
                    Ok(n) if self.operator == Operator::GreaterThan => n > bound,
                    Ok(n) => n < bound,
                    Err(_) => false,
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == Operator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        f.write_str(self.operator.symbol())?;
        match self.operator {
            Operator::Exists | Operator::DoesNotExist => Ok(()),
            Operator::In | Operator::NotIn => write!(f, "({})", self.values.join(",")),
            _ => f.write_str(&self.values.join(",")),
        }
    }
}

/// A parsed, validated label selector: requirements that must all hold.
///
/// `Display` prints the canonical form Kubernetes prints: requirements sorted by key,
/// set values sorted, no spaces except around `in`/`notin`; parsing it gives the same
/// selector back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses a selector string with Kubernetes' `labels.Parse` syntax.
    ///
    /// An empty or all-whitespace string gives the empty selector, which matches every
    /// pod. A trailing comma, an unclosed `(`, an unknown operator, an invalid key or value
    /// is an error that says where and shows the right form.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let mut requirements = Parser::new(s).parse()?;
        // Sorted by key for a deterministic canonical form; stable, so two requirements
        // on one key keep the order they were written in.
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Selector { requirements })
    }

    /// Whether every requirement holds for a pod with these labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector has no requirements, and so matches every pod.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// What the lexer recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Ident,
    In,
    NotIn,
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    End,
}

/// One token with its text and byte offset in the input.
#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    tok: Tok,
    text: &'a str,
    pos: usize,
}

impl Token<'_> {
    /// The token's kind where a value is expected: `in` and `notin` are plain words there
    /// (`x in (in,notin)` is valid), as in Kubernetes' parser.
    fn as_value(self) -> Tok {
        match self.tok {
            Tok::In | Tok::NotIn => Tok::Ident,
            t => t,
        }
    }

    /// The token quoted for an error message.
    fn shown(self) -> String {
        if self.tok == Tok::End {
            "the end".to_owned()
        } else {
            format!("{:?}", self.text)
        }
    }
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Splits the input into tokens: special symbols (`==` and `!=` taken greedily), and
/// words, which run up to the next special symbol or whitespace.
fn lex(s: &str) -> Vec<Token<'_>> {
    let bytes = s.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && is_whitespace(bytes[i]) {
            i += 1;
        }
        let Some(&b) = bytes.get(i) else {
            tokens.push(Token {
                tok: Tok::End,
                text: "",
                pos: s.len(),
            });
            return tokens;
        };
        let start = i;
        let tok = if is_special(b) {
            let next = bytes.get(i + 1).copied();
            let (tok, len) = match (b, next) {
                (b'=', Some(b'=')) => (Tok::DoubleEq, 2),
                (b'!', Some(b'=')) => (Tok::NotEq, 2),
                (b'=', _) => (Tok::Eq, 1),
                (b'!', _) => (Tok::Not, 1),
                (b'(', _) => (Tok::Open, 1),
                (b')', _) => (Tok::Close, 1),
                (b',', _) => (Tok::Comma, 1),
                (b'>', _) => (Tok::Gt, 1),
                _ => (Tok::Lt, 1),
            };
            i += len;
            tok
        } else {
            // Special symbols and whitespace are ASCII, so `i` stays on a char boundary.
            while i < bytes.len() && !is_special(bytes[i]) && !is_whitespace(bytes[i]) {
                i += 1;
            }
            match &s[start..i] {
                "in" => Tok::In,
                "notin" => Tok::NotIn,
                _ => Tok::Ident,
            }
        };
        tokens.push(Token {
            tok,
            text: &s[start..i],
            pos: start,
        });
    }
}

/// Recursive-descent parser over the token list, following Kubernetes' grammar:
///
/// ```text
/// selector    ::= "" | requirement ("," requirement)*
/// requirement ::= "!" KEY | KEY | KEY ("="|"=="|"!="|">"|"<") VALUE | KEY ("in"|"notin") "(" values ")"
/// values      ::= VALUE ("," VALUE)*        (VALUE may be empty)
/// ```
struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token<'a>>,
    next: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            tokens: lex(input),
            next: 0,
        }
    }

    fn peek(&self) -> Token<'a> {
        self.tokens[self.next]
    }

    fn bump(&mut self) -> Token<'a> {
        let t = self.tokens[self.next];
        if t.tok != Tok::End {
            self.next += 1;
        }
        t
    }

    fn error(&self, position: usize, problem: String, example: &'static str) -> SelectorError {
        SelectorError {
            input: self.input.to_owned(),
            position,
            problem,
            example,
        }
    }

    fn parse(mut self) -> Result<Vec<Requirement>, SelectorError> {
        let mut requirements = Vec::new();
        let first = self.peek();
        match first.as_value() {
            Tok::End => return Ok(requirements),
            Tok::Ident | Tok::Not => {}
            _ => {
                return Err(self.error(
                    first.pos,
                    format!("expected a label key or \"!\", found {}", first.shown()),
                    EXAMPLE_SELECTOR,
                ))
            }
        }
        loop {
            requirements.push(self.requirement()?);
            let sep = self.bump();
            match sep.tok {
                Tok::End => return Ok(requirements),
                Tok::Comma => {
                    let after = self.peek();
                    if !matches!(after.as_value(), Tok::Ident | Tok::Not) {
                        let hint = if after.tok == Tok::End {
                            " (remove the trailing comma)"
                        } else {
                            ""
                        };
                        return Err(self.error(
                            after.pos,
                            format!(
                                "expected a requirement after \",\", found {}{hint}",
                                after.shown()
                            ),
                            EXAMPLE_SELECTOR,
                        ));
                    }
                }
                _ => {
                    return Err(self.error(
                        sep.pos,
                        format!(
                            "expected \",\" or the end after a requirement, found {}",
                            sep.shown()
                        ),
                        EXAMPLE_SELECTOR,
                    ))
                }
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let mut key_tok = self.bump();
        let negated = key_tok.tok == Tok::Not;
        if negated {
            key_tok = self.bump();
        }
        if key_tok.as_value() != Tok::Ident {
            let example = if negated {
                EXAMPLE_NOT
            } else {
                EXAMPLE_SELECTOR
            };
            return Err(self.error(
                key_tok.pos,
                format!("expected a label key, found {}", key_tok.shown()),
                example,
            ));
        }
        self.check_key(key_tok)?;
        let key = key_tok.text.to_owned();
        let next = self.peek();
        if matches!(next.tok, Tok::End | Tok::Comma) {
            let operator = if negated {
                Operator::DoesNotExist
            } else {
                Operator::Exists
            };
            return Ok(Requirement {
                key,
                operator,
                values: Vec::new(),
                bound: None,
            });
        }
        if negated {
            return Err(self.error(
                next.pos,
                format!(
                    "\"!{key}\" takes no operator or value, found {}; \
                     use {key}!=value or {key} notin (…) to exclude values",
                    next.shown()
                ),
                EXAMPLE_NOT,
            ));
        }
        let op_tok = self.bump();
        let operator = match op_tok.tok {
            Tok::Eq => Operator::Equals,
            Tok::DoubleEq => Operator::DoubleEquals,
            Tok::NotEq => Operator::NotEquals,
            Tok::In => Operator::In,
            Tok::NotIn => Operator::NotIn,
            Tok::Gt => Operator::GreaterThan,
            Tok::Lt => Operator::LessThan,
            _ => {
                return Err(self.error(
                    op_tok.pos,
                    format!(
                    "expected an operator (=, ==, !=, in, notin, >, <) after key {key:?}, found {}",
                    op_tok.shown()
                ),
                    EXAMPLE_SELECTOR,
                ))
            }
        };
        let mut values = match operator {
            Operator::In | Operator::NotIn => self.set_values(op_tok.text.trim())?,
            _ => vec![self.exact_value(op_tok)?],
        };
        let bound = match operator {
            Operator::GreaterThan | Operator::LessThan => {
                let (text, pos) = (values[0].as_str(), op_tok.pos + op_tok.text.len());
                Some(text.parse::<i64>().map_err(|_| {
                    self.error(
                        pos,
                        format!(
                            "{:?} needs a whole number after {:?}, found {text:?}",
                            key, op_tok.text
                        ),
                        EXAMPLE_ORDER,
                    )
                })?)
            }
            _ => None,
        };
        values.sort();
        values.dedup();
        Ok(Requirement {
            key,
            operator,
            values,
            bound,
        })
    }

    /// The single value after `=`, `==`, `!=`, `>` or `<`; empty when the requirement
    /// ends right after the operator (`a=`).
    fn exact_value(&mut self, op_tok: Token<'a>) -> Result<String, SelectorError> {
        let t = self.peek();
        match t.as_value() {
            Tok::End | Tok::Comma => Ok(String::new()),
            Tok::Ident => {
                self.bump();
                self.check_value(t)?;
                Ok(t.text.to_owned())
            }
            _ => Err(self.error(
                t.pos,
                format!(
                    "expected a value after {:?}, found {}",
                    op_tok.text,
                    t.shown()
                ),
                EXAMPLE_EXACT,
            )),
        }
    }

    /// The values of `in (…)` / `notin (…)`. Empty entries are the empty value:
    /// `(,b)`, `(a,,b)`, `(a,)` and `()` all hold `""`, as in Kubernetes.
    fn set_values(&mut self, op: &str) -> Result<Vec<String>, SelectorError> {
        let open = self.bump();
        if open.tok != Tok::Open {
            return Err(self.error(
                open.pos,
                format!("expected \"(\" after {op:?}, found {}", open.shown()),
                EXAMPLE_SET,
            ));
        }
        let mut values = Vec::new();
        // Whether the last thing read was a value (so a "," or ")" may follow).
        let mut after_value = false;
        loop {
            let t = self.bump();
            match (t.as_value(), after_value) {
                (Tok::Ident, false) => {
                    self.check_value(t)?;
                    values.push(t.text.to_owned());
                    after_value = true;
                }
                (Tok::Comma, false) => values.push(String::new()),
                (Tok::Comma, true) => after_value = false,
                (Tok::Close, false) => {
                    values.push(String::new());
                    return Ok(values);
                }
                (Tok::Close, true) => return Ok(values),
                (Tok::End, _) => {
                    return Err(self.error(
                        t.pos,
                        format!("unclosed \"(\" after {op:?}: expected \")\""),
                        EXAMPLE_SET,
                    ))
                }
                (Tok::Ident, true) => {
                    return Err(self.error(
                        t.pos,
                        format!(
                            "expected \",\" or \")\" between values, found {}",
                            t.shown()
                        ),
                        EXAMPLE_SET,
                    ))
                }
                _ => {
                    return Err(self.error(
                        t.pos,
                        format!("expected a value, \",\" or \")\", found {}", t.shown()),
                        EXAMPLE_SET,
                    ))
                }
            }
        }
    }

    fn check_key(&self, t: Token<'_>) -> Result<(), SelectorError> {
        match validate_key(t.text) {
            Ok(()) => Ok(()),
            Err(why) => Err(self.error(
                t.pos,
                format!("invalid label key {:?}: {why}", t.text),
                EXAMPLE_KEY,
            )),
        }
    }

    fn check_value(&self, t: Token<'_>) -> Result<(), SelectorError> {
        match validate_value(t.text) {
            Ok(()) => Ok(()),
            Err(why) => Err(self.error(
                t.pos,
                format!("invalid label value {:?}: {why}", t.text),
                EXAMPLE_VALUE,
            )),
        }
    }
}

/// `[A-Za-z0-9]` at both ends, `[-A-Za-z0-9_.]` inside, non-empty.
fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A DNS-1123 subdomain: dot-separated labels of lowercase alphanumerics and `-`,
/// each starting and ending with an alphanumeric.
fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let b = label.as_bytes();
        match (b.first(), b.last()) {
            (Some(first), Some(last)) => {
                let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
                ok(first) && ok(last) && b.iter().all(|c| ok(c) || *c == b'-')
            }
            _ => false,
        }
    })
}

/// Kubernetes' `IsQualifiedName` for a label key: `[prefix/]name`. The error says what is wrong
/// with `key` (without quoting it).
pub fn validate_key(key: &str) -> Result<(), String> {
    const NAME_RULE: &str =
        "must be at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit";
    let name = match key.split_once('/') {
        None => key,
        Some((prefix, name)) => {
            if name.contains('/') {
                return Err(
                    "has more than one '/'; a key is an optional DNS prefix, '/', and a name"
                        .into(),
                );
            }
            if prefix.is_empty() {
                return Err("has an empty prefix before '/'".into());
            }
            if prefix.len() > MAX_PREFIX_LEN {
                return Err(format!("prefix is longer than {MAX_PREFIX_LEN} characters"));
            }
            if !is_dns_subdomain(prefix) {
                return Err(format!(
                    "prefix {prefix:?} must be a DNS subdomain (lowercase letters, digits, '-' and '.')"
                ));
            }
            name
        }
    };
    if name.is_empty() {
        return Err("has an empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name is longer than {MAX_NAME_LEN} characters"));
    }
    if !is_qualified_name(name) {
        return Err(format!("name {name:?} {NAME_RULE}"));
    }
    Ok(())
}

/// Kubernetes' `IsValidLabelValue`: empty, or a qualified name of at most 63 characters.
fn validate_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if !value.is_empty() && !is_qualified_name(value) {
        return Err(
            "must be empty or letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> SelectorError {
        match Selector::parse(s) {
            Ok(parsed) => panic!("{s:?} should be rejected, parsed as {parsed}"),
            Err(e) => e,
        }
    }

    #[test]
    fn equals_matches_only_the_same_value() {
        for s in ["app=vllm", "app==vllm", " app = vllm "] {
            let s = sel(s);
            assert!(s.matches(&labels(&[("app", "vllm")])));
            assert!(!s.matches(&labels(&[("app", "tgi")])));
            assert!(!s.matches(&labels(&[])), "an absent label is not equal");
        }
    }

    #[test]
    fn not_equals_also_matches_when_the_key_is_absent() {
        let s = sel("app!=vllm");
        assert!(!s.matches(&labels(&[("app", "vllm")])));
        assert!(s.matches(&labels(&[("app", "tgi")])));
        assert!(s.matches(&labels(&[("tier", "a")])));
    }

    #[test]
    fn in_matches_any_listed_value() {
        let s = sel("tier in (a,b)");
        assert!(s.matches(&labels(&[("tier", "a")])));
        assert!(s.matches(&labels(&[("tier", "b")])));
        assert!(!s.matches(&labels(&[("tier", "c")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn notin_excludes_listed_values_and_matches_when_absent() {
        let s = sel("tier notin (a,b)");
        assert!(!s.matches(&labels(&[("tier", "a")])));
        assert!(s.matches(&labels(&[("tier", "c")])));
        assert!(s.matches(&labels(&[])));
    }

    #[test]
    fn bare_key_requires_the_label_with_any_value() {
        let s = sel("gpu");
        assert!(s.matches(&labels(&[("gpu", "")])));
        assert!(s.matches(&labels(&[("gpu", "h100")])));
        assert!(!s.matches(&labels(&[("cpu", "x")])));
    }

    #[test]
    fn bang_key_requires_the_label_to_be_absent() {
        let s = sel("!canary");
        assert!(s.matches(&labels(&[("app", "vllm")])));
        assert!(!s.matches(&labels(&[("canary", "")])));
        assert!(sel(" ! canary ").matches(&labels(&[])));
    }

    #[test]
    fn greater_and_less_than_compare_integers_like_kubernetes() {
        let gt = sel("replicas>3");
        assert!(gt.matches(&labels(&[("replicas", "4")])));
        assert!(!gt.matches(&labels(&[("replicas", "3")])));
        assert!(
            !gt.matches(&labels(&[("replicas", "many")])),
            "a non-number never matches"
        );
        assert!(!gt.matches(&labels(&[])), "an absent label never matches");
        let lt = sel("replicas<3");
        assert!(lt.matches(&labels(&[("replicas", "2")])));
        assert!(!lt.matches(&labels(&[("replicas", "3")])));
        assert!(err("replicas>many").to_string().contains("whole number"));
        assert!(err("replicas>").to_string().contains("whole number"));
    }

    #[test]
    fn requirements_are_anded() {
        let s = sel("app=vllm, tier in (a,b), !canary");
        assert!(s.matches(&labels(&[("app", "vllm"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "vllm"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "vllm"), ("tier", "a"), ("canary", "1")])));
        assert!(!s.matches(&labels(&[("tier", "a")])));
        assert!(
            !sel("a=b,a=c").matches(&labels(&[("a", "b")])),
            "two values for one key never both hold"
        );
    }

    #[test]
    fn whitespace_around_tokens_is_ignored() {
        let s = sel("\t app = vllm ,\n tier   in ( a , b ) , ! canary \r\n");
        assert_eq!(s.to_string(), "app=vllm,!canary,tier in (a,b)");
    }

    #[test]
    fn empty_values_are_allowed_in_exact_and_set_forms() {
        let empty = labels(&[("a", "")]);
        assert!(sel("a=").matches(&empty));
        assert!(sel("a=,b").matches(&labels(&[("a", ""), ("b", "x")])));
        assert!(sel("a in (,b)").matches(&empty));
        assert!(sel("a in (b,)").matches(&empty));
        assert!(sel("a in (b,,c)").matches(&empty));
        assert!(!sel("a in (b,c)").matches(&empty));
        assert_eq!(
            sel("a in (b,,c)").requirements()[0].values(),
            ["", "b", "c"]
        );
    }

    #[test]
    fn empty_parentheses_mean_the_empty_value_as_in_kubernetes() {
        // Kubernetes' own doc example "x in (foo,,baz),y,z notin ()" parses, and its
        // parser reads "()" as the set {""}: it does not reject an empty set.
        let s = sel("x in (foo,,baz),y,z notin ()");
        assert!(s.matches(&labels(&[("x", "foo"), ("y", "1")])));
        assert!(s.matches(&labels(&[("x", ""), ("y", "1"), ("z", "set")])));
        assert!(!s.matches(&labels(&[("x", "foo"), ("y", "1"), ("z", "")])));
        assert!(sel("x in ()").matches(&labels(&[("x", "")])));
        assert!(!sel("x in ()").matches(&labels(&[("x", "a")])));
        assert_eq!(sel("x in ()").to_string(), "x in ()");
    }

    #[test]
    fn empty_selector_matches_everything() {
        for s in ["", "   ", "\t\n"] {
            let s = sel(s);
            assert!(s.is_empty());
            assert!(s.matches(&labels(&[])));
            assert!(s.matches(&labels(&[("app", "x")])));
            assert_eq!(s.to_string(), "");
        }
        assert!(!sel("app").is_empty());
    }

    #[test]
    fn in_and_notin_are_ordinary_words_as_keys_and_values() {
        assert!(sel("in=notin").matches(&labels(&[("in", "notin")])));
        assert!(sel("x in (in,notin)").matches(&labels(&[("x", "notin")])));
        assert!(sel("notin notin (in)").matches(&labels(&[])));
    }

    #[test]
    fn prefixed_keys_are_accepted() {
        let s = sel("app.kubernetes.io/name=vllm");
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "vllm")])));
        sel(&format!("{}/{}", "a".repeat(253), "b".repeat(63)));
    }

    #[test]
    fn invalid_keys_are_rejected_with_the_reason() {
        for (s, why) in [
            ("-app=x", "starting and ending"),
            ("app-=x", "starting and ending"),
            ("a$b=x", "letters, digits"),
            ("/name=x", "empty prefix"),
            ("a/b/c=x", "more than one '/'"),
            ("Example.com/name=x", "DNS subdomain"),
            ("ex_ample.com/name=x", "DNS subdomain"),
            ("prefix/=x", "empty name"),
            ("Ä=x", "letters, digits"),
        ] {
            let e = err(s).to_string();
            assert!(e.contains("invalid label key"), "{s}: {e}");
            assert!(e.contains(why), "{s}: {e}");
            assert!(
                e.contains("write it like: app.kubernetes.io/name=vllm"),
                "{s}: {e}"
            );
        }
        let long_name = format!("{}=x", "a".repeat(64));
        assert!(err(&long_name).to_string().contains("longer than 63"));
        let long_prefix = format!("{}/a=x", "a".repeat(254));
        assert!(err(&long_prefix).to_string().contains("longer than 253"));
        sel(&format!("{}=x", "a".repeat(63)));
    }

    #[test]
    fn invalid_values_are_rejected_with_the_reason() {
        for s in [
            "app=-vllm",
            "app=vllm-",
            "app=v/llm",
            "app in (ok,bad!)",
            "app=vllm server",
        ] {
            let e = err(s);
            assert!(!e.problem.is_empty(), "{s}");
        }
        let e = err("app=-vllm").to_string();
        assert!(e.contains("invalid label value \"-vllm\""), "{e}");
        assert!(e.contains("at byte 4"), "{e}");
        assert!(e.contains("write it like: app=vllm-server"), "{e}");
        assert!(err(&format!("app={}", "v".repeat(64)))
            .to_string()
            .contains("longer than 63"));
        sel(&format!("app={}", "v".repeat(63)));
        sel("app=a.b_c-D9");
    }

    #[test]
    fn unbalanced_parentheses_are_rejected() {
        let e = err("tier in (a,b");
        assert!(e.to_string().contains("unclosed \"(\""), "{e}");
        assert_eq!(e.position, "tier in (a,b".len());
        assert!(err("tier in a,b)")
            .to_string()
            .contains("expected \"(\" after \"in\""));
        assert!(err("tier in (a,b))")
            .to_string()
            .contains("expected \",\" or the end"));
        assert!(err("tier in ((a))")
            .to_string()
            .contains("expected a value"));
        assert!(err("tier in (a b)").to_string().contains("between values"));
        assert!(err("tier=(a)")
            .to_string()
            .contains("expected a value after \"=\""));
    }

    #[test]
    fn missing_parenthesis_error_reads_like_the_design_example() {
        assert_eq!(
            err("app in vllm").to_string(),
            "bad label selector \"app in vllm\": expected \"(\" after \"in\", found \"vllm\" \
             at byte 7 (write it like: tier in (a,b))"
        );
    }

    #[test]
    fn trailing_and_doubled_commas_are_rejected() {
        let e = err("app=vllm,");
        assert!(e.to_string().contains("trailing comma"), "{e}");
        assert_eq!(e.position, 9);
        assert!(err("app=vllm,,tier=a")
            .to_string()
            .contains("expected a requirement after \",\""));
        assert!(err(",app=vllm")
            .to_string()
            .contains("expected a label key"));
        assert!(err(",").to_string().contains("expected a label key"));
    }

    #[test]
    fn misplaced_operators_are_rejected() {
        assert!(err("app=vllm=x")
            .to_string()
            .contains("expected \",\" or the end"));
        assert!(err("app vllm").to_string().contains("expected an operator"));
        assert!(err("app ! vllm")
            .to_string()
            .contains("expected an operator"));
        assert!(err("!app=vllm").to_string().contains("takes no operator"));
        assert!(err("!")
            .to_string()
            .contains("expected a label key, found the end"));
        assert!(err("=vllm").to_string().contains("expected a label key"));
        assert!(err("app===x")
            .to_string()
            .contains("expected a value after \"==\""));
        assert!(err("app in").to_string().contains("found the end"));
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for (input, canonical) in [
            ("tier in (b,a,b), app=vllm", "app=vllm,tier in (a,b)"),
            ("z notin (y,x),!canary,gpu", "!canary,gpu,z notin (x,y)"),
            ("a==b, c != d, e>1, f<2", "a==b,c!=d,e>1,f<2"),
            ("a=,b in (,x)", "a=,b in (,x)"),
            ("k=v2,k=v1", "k=v2,k=v1"),
        ] {
            let s = sel(input);
            assert_eq!(s.to_string(), canonical, "{input}");
            let again = sel(&s.to_string());
            assert_eq!(again, s, "{input}");
            assert_eq!(again.to_string(), canonical);
        }
    }

    #[test]
    fn from_str_parses_like_parse() {
        let s: Selector = "app=vllm".parse().unwrap();
        assert_eq!(s, sel("app=vllm"));
        assert!("app in".parse::<Selector>().is_err());
    }
}
