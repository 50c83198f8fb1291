//! The `fetch_logs` filters: doublestar globs with the syntax and meaning of the Go library
//! upstream's agent uses (`bmatcuk/doublestar` v1), matched against paths relative to a log
//! directory.
//!
//! - `*` any run of characters within one path component (also a leading `.`);
//! - `?` one character within a component;
//! - `[abc]`, `[a-z]`, `[^a-z]` a character class (`^` negates; `\` escapes inside);
//! - `{a,b/c}` alternatives, nested, possibly spanning components;
//! - `**` as a whole component: zero or more components; as the last component: one or more
//!   (everything below, as upstream's glob finds it);
//! - `\c` the character `c`.
//!
//! Filters are normalized as Go's `filepath.Join(dir, filter)` would: empty and `.`
//! components are dropped (so a leading `/` is just part of the join). A `..` component is
//! refused: a filter never reaches outside its log directory. Patterns are checked when parsed;
//! a malformed one is an error naming it, as upstream's `ErrBadPattern`.

use std::fmt;

/// Most patterns one filter may expand to through `{…}` alternatives.
pub const MAX_ALTERNATIVES: usize = 256;
/// Longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

/// Why a filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log filter '{filter}': {reason}")]
pub struct PatternError {
    /// The filter as given (cut to 200 characters).
    pub filter: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn bad(filter: &str, reason: &'static str) -> PatternError {
    PatternError {
        filter: filter.chars().take(200).collect(),
        reason,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `*`
    Any,
    /// `?`
    One,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**` as a whole component.
    DoubleStar,
    Component(Vec<Token>),
}

/// One filter after `{…}` expansion: a sequence of path components.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    text: String,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

impl Pattern {
    /// Parses one filter into the patterns its alternatives expand to (at least one).
    pub fn parse(filter: &str) -> Result<Vec<Pattern>, PatternError> {
        if filter.len() > MAX_FILTER_LEN {
            return Err(bad(filter, "it is longer than 4096 bytes"));
        }
        if filter.chars().any(|c| c == '\0') {
            return Err(bad(filter, "it holds a NUL character"));
        }
        let mut expanded = Vec::new();
        expand(filter, filter, &mut expanded)?;
        expanded
            .iter()
            .map(|text| Pattern::from_expanded(filter, text))
            .collect()
    }

    fn from_expanded(filter: &str, text: &str) -> Result<Pattern, PatternError> {
        let mut segments = Vec::new();
        for comp in split_unescaped(text, '/') {
            if comp.is_empty() || comp == "." {
                continue;
            }
            if comp == ".." {
                return Err(bad(
                    filter,
                    "a '..' component would reach outside the log directory",
                ));
            }
            if comp == "**" {
                // `**/**` means what `**` means; one keeps matching linear.
                if segments.last() != Some(&Segment::DoubleStar) {
                    segments.push(Segment::DoubleStar);
                }
                continue;
            }
            segments.push(Segment::Component(tokens(filter, comp)?));
        }
        if segments.is_empty() {
            return Err(bad(
                filter,
                "it names the log directory itself, not files in it",
            ));
        }
        Ok(Pattern {
            segments,
            text: text.to_string(),
        })
    }

    /// The pattern's components when none holds a wildcard (a plain path), for upstream's
    /// rule that a filter naming a directory means everything below it.
    pub fn literal_path(&self) -> Option<Vec<String>> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Component(tokens) => tokens
                    .iter()
                    .map(|t| match t {
                        Token::Literal(c) => Some(*c),
                        _ => None,
                    })
                    .collect::<Option<String>>(),
                Segment::DoubleStar => None,
            })
            .collect()
    }

    /// This pattern followed by `**/*`.
    pub fn everything_below(&self) -> Pattern {
        let mut segments = self.segments.clone();
        segments.push(Segment::DoubleStar);
        segments.push(Segment::Component(vec![Token::Any]));
        Pattern {
            segments,
            text: format!("{}/**/*", self.text),
        }
    }

    /// Whether the path made of `components` (relative to the log directory) matches.
    pub fn matches<S: AsRef<str>>(&self, components: &[S]) -> bool {
        let comps: Vec<Vec<char>> = components
            .iter()
            .map(|c| c.as_ref().chars().collect())
            .collect();
        // memo[s][c]: whether segments[s..] match comps[c..]; filled on demand.
        let width = comps.len() + 1;
        let mut memo: Vec<Option<bool>> = vec![None; (self.segments.len() + 1) * width];
        self.match_from(0, 0, &comps, &mut memo, width)
    }

    fn match_from(
        &self,
        s: usize,
        c: usize,
        comps: &[Vec<char>],
        memo: &mut Vec<Option<bool>>,
        width: usize,
    ) -> bool {
        let key = s * width + c;
        if let Some(Some(known)) = memo.get(key) {
            return *known;
        }
        let rest = comps.len() - c;
        let result = match self.segments.get(s) {
            None => rest == 0,
            Some(Segment::DoubleStar) if s + 1 == self.segments.len() => rest >= 1,
            Some(Segment::DoubleStar) => {
                (c..comps.len()).any(|from| self.match_from(s + 1, from, comps, memo, width))
            }
            Some(Segment::Component(tokens)) => {
                rest >= 1
                    && comps
                        .get(c)
                        .is_some_and(|name| component_matches(tokens, name))
                    && self.match_from(s + 1, c + 1, comps, memo, width)
            }
        };
        if let Some(slot) = memo.get_mut(key) {
            *slot = Some(result);
        }
        result
    }
}

/// Splits on `sep` where it is not escaped by `\`.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, ch) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch == sep {
            parts.push(&text[start..i]);
            start = i + ch.len_utf8();
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Expands the first unescaped `{…}` of `text` (recursively); appends the results to `out`.
fn expand(filter: &str, text: &str, out: &mut Vec<String>) -> Result<(), PatternError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut escaped = false;
    let mut open = None;
    for (k, &(_, ch)) in chars.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch == '{' {
            open = Some(k);
            break;
        }
    }
    let Some(open) = open else {
        if out.len() >= MAX_ALTERNATIVES {
            return Err(bad(
                filter,
                "its {…} alternatives expand to more than 256 patterns",
            ));
        }
        out.push(text.to_string());
        return Ok(());
    };
    // Find the matching '}' and the top-level commas.
    let mut depth = 0usize;
    let mut escaped = false;
    let mut commas = Vec::new();
    let mut close = None;
    for (k, &(_, ch)) in chars.iter().enumerate().skip(open + 1) {
        if escaped {
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch == '{' {
            depth += 1;
        } else if ch == '}' {
            if depth == 0 {
                close = Some(k);
                break;
            }
            depth -= 1;
        } else if ch == ',' && depth == 0 {
            commas.push(k);
        }
    }
    let Some(close) = close else {
        return Err(bad(filter, "a '{' has no matching '}'"));
    };
    let byte = |k: usize| chars.get(k).map_or(text.len(), |&(b, _)| b);
    let head = &text[..byte(open)];
    let tail = &text[byte(close) + 1..];
    let mut bounds = vec![open];
    bounds.extend(&commas);
    bounds.push(close);
    for pair in bounds.windows(2) {
        if let [from, to] = pair {
            let alt = &text[byte(*from) + 1..byte(*to)];
            expand(filter, &format!("{head}{alt}{tail}"), out)?;
        }
    }
    Ok(())
}

fn tokens(filter: &str, comp: &str) -> Result<Vec<Token>, PatternError> {
    let chars: Vec<char> = comp.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&ch) = chars.get(i) {
        i += 1;
        match ch {
            '\\' => match chars.get(i) {
                Some(&c) => {
                    out.push(Token::Literal(c));
                    i += 1;
                }
                None => return Err(bad(filter, "it ends with a lone '\\'")),
            },
            '*' => {
                if out.last() != Some(&Token::Any) {
                    out.push(Token::Any);
                }
            }
            '?' => out.push(Token::One),
            '[' => {
                let (token, next) = class(filter, &chars, i)?;
                out.push(token);
                i = next;
            }
            c => out.push(Token::Literal(c)),
        }
    }
    Ok(out)
}

/// Parses a class whose content starts at `chars[start]` (after the `[`); returns the token
/// and the index after the `]`.
fn class(filter: &str, chars: &[char], start: usize) -> Result<(Token, usize), PatternError> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let unclosed = || bad(filter, "a '[' has no matching ']'");
    let read_char = |i: &mut usize| -> Result<char, PatternError> {
        match chars.get(*i) {
            None => Err(unclosed()),
            Some('\\') => {
                *i += 1;
                let c = chars.get(*i).copied().ok_or_else(unclosed)?;
                *i += 1;
                Ok(c)
            }
            Some(&c) => {
                *i += 1;
                Ok(c)
            }
        }
    };
    loop {
        match chars.get(i) {
            None => return Err(unclosed()),
            Some(']') => {
                if ranges.is_empty() {
                    return Err(bad(filter, "a character class is empty"));
                }
                return Ok((Token::Class { negated, ranges }, i + 1));
            }
            Some('-') => return Err(bad(filter, "a character class has a '-' without a start")),
            Some(_) => {
                let low = read_char(&mut i)?;
                let mut high = low;
                if chars.get(i) == Some(&'-') && chars.get(i + 1) != Some(&']') {
                    i += 1;
                    if chars.get(i) == Some(&'-') {
                        return Err(bad(filter, "a character range ends with '-'"));
                    }
                    high = read_char(&mut i)?;
                } else if chars.get(i) == Some(&'-') {
                    return Err(bad(filter, "a character range has no end"));
                }
                ranges.push((low, high));
            }
        }
    }
}

fn token_matches(token: &Token, c: char) -> bool {
    match token {
        Token::Literal(l) => *l == c,
        Token::One => true,
        Token::Any => true,
        Token::Class { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated
        }
    }
}

/// Wildcard matching of one component, linear backtracking to the last `*`.
fn component_matches(tokens: &[Token], name: &[char]) -> bool {
    let (mut t, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match tokens.get(t) {
            Some(Token::Any) => {
                star = Some((t, n));
                t += 1;
            }
            Some(tok) if name.get(n).is_some_and(|&c| token_matches(tok, c)) => {
                t += 1;
                n += 1;
            }
            _ => match star {
                Some((st, sn)) => {
                    t = st + 1;
                    n = sn + 1;
                    star = Some((st, sn + 1));
                }
                None => return false,
            },
        }
    }
    tokens
        .get(t..)
        .unwrap_or_default()
        .iter()
        .all(|t| *t == Token::Any)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(filter: &str, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').collect();
        Pattern::parse(filter)
            .unwrap()
            .iter()
            .any(|p| p.matches(&comps))
    }

    #[test]
    fn the_default_filter_matches_every_file_at_any_depth() {
        for path in ["a", ".hidden", "a/b", "a/b/c.log", "x/.y/z"] {
            assert!(m("**/*", path), "{path}");
            assert!(m("**", path), "{path}");
        }
    }

    #[test]
    fn star_and_question_stay_within_a_component() {
        assert!(m("*.log", "a.log"));
        assert!(m("*.log", ".log"));
        assert!(m("*.log", ".x.log"));
        assert!(!m("*.log", "d/a.log"));
        assert!(m("*/*.log", "d/a.log"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(!m("a?c", "a/c"));
        assert!(m("***", "abc"), "runs of stars are one star");
        assert!(m("a**b", "aXYb"), "'**' inside a component is a star");
        assert!(!m("a**b", "aX/Yb"));
        assert!(m("*", "x"));
        assert!(!m("*", "x/y"));
        assert!(m("é?", "éü"), "characters, not bytes");
    }

    #[test]
    fn doublestar_spans_components() {
        assert!(m("**/*.log", "a.log"), "zero components");
        assert!(m("**/*.log", "x/y/a.log"));
        assert!(!m("**/*.log", "x/y/a.txt"));
        assert!(m("nginx/**/*.log", "nginx/a.log"));
        assert!(m("nginx/**/*.log", "nginx/x/y/a.log"));
        assert!(!m("nginx/**/*.log", "other/a.log"));
        assert!(m("a/**/b/**/c", "a/b/c"));
        assert!(m("a/**/b/**/c", "a/x/b/y/z/c"));
        assert!(!m("a/**/b/**/c", "a/x/c"));
        // A trailing ** is everything below, not the directory itself.
        assert!(m("nginx/**", "nginx/a"));
        assert!(m("nginx/**", "nginx/a/b"));
        assert!(!m("nginx/**", "nginx"));
        assert!(m("**/**/**/x", "x"));
    }

    #[test]
    fn classes() {
        assert!(m("[abc].log", "b.log"));
        assert!(!m("[abc].log", "d.log"));
        assert!(m("[a-c]", "b"));
        assert!(!m("[a-c]", "d"));
        assert!(m("[^a-c]", "d"));
        assert!(!m("[^a-c]", "a"));
        assert!(m("[!a]", "!"), "only '^' negates, as upstream's library");
        assert!(m("[\\]]", "]"));
        assert!(m("[a\\-z]", "-"));
        assert!(m("[0-9][0-9]", "42"));
        for bad in ["[", "[]", "[a", "[-a]", "[a--]", "[a-]", "x\\"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn alternatives() {
        assert!(m("{a,b}.log", "a.log"));
        assert!(m("{a,b}.log", "b.log"));
        assert!(!m("{a,b}.log", "c.log"));
        assert!(m("{nginx/*.log,agent/current}", "agent/current"));
        assert!(m("{nginx/*.log,agent/current}", "nginx/x.log"));
        assert!(m("x{,.1}", "x"));
        assert!(m("x{,.1}", "x.1"));
        assert!(m("{a,{b,c}d}", "cd"));
        assert!(m("\\{a,b}", "{a,b}"), "an escaped brace is a character");
        assert!(Pattern::parse("{a,b").is_err());
        // 2^9 = 512 alternatives: refused, not expanded.
        let many = "{a,b}".repeat(9);
        let e = Pattern::parse(&many).unwrap_err();
        assert!(e.to_string().contains("256"), "{e}");
        assert_eq!(Pattern::parse(&"{a,b}".repeat(8)).unwrap().len(), 256);
    }

    #[test]
    fn escapes() {
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a\\?", "a?"));
        assert!(!m("a\\?", "ab"));
    }

    #[test]
    fn normalization_and_refusals() {
        assert!(
            m("/nginx/a.log", "nginx/a.log"),
            "a leading / is part of the join"
        );
        assert!(m("./nginx//a.log", "nginx/a.log"));
        assert!(m("nginx/", "nginx"));
        for hostile in ["../etc/shadow", "a/../../b", "..", "{..,a}/x", "**/../x"] {
            let e = Pattern::parse(hostile).unwrap_err();
            assert!(e.to_string().contains(".."), "{hostile}: {e}");
        }
        for empty in ["", "/", ".", "./"] {
            assert!(Pattern::parse(empty).is_err(), "{empty:?}");
        }
        assert!(Pattern::parse("a\0b").is_err());
        assert!(Pattern::parse(&"a".repeat(5000)).is_err());
        assert!(!m("a", "a/b"), "a pattern matches whole paths");
        assert!(!m("a/b", "a"));
    }

    #[test]
    fn literal_paths_and_everything_below() {
        let p = &Pattern::parse("nginx").unwrap()[0];
        assert_eq!(p.literal_path(), Some(vec!["nginx".to_string()]));
        let below = p.everything_below();
        assert!(below.matches(&["nginx", "a.log"]));
        assert!(below.matches(&["nginx", "x", "a.log"]));
        assert!(!below.matches(&["nginx"]));
        assert_eq!(
            Pattern::parse("a\\*").unwrap()[0].literal_path(),
            Some(vec!["a*".into()])
        );
        assert_eq!(Pattern::parse("a*").unwrap()[0].literal_path(), None);
        assert_eq!(Pattern::parse("**/a").unwrap()[0].literal_path(), None);
    }

    #[test]
    fn hostile_patterns_stay_fast() {
        // Many stars against a long non-matching name: linear backtracking, no blow-up.
        let p = &Pattern::parse(&format!("{}b", "a*".repeat(50))).unwrap()[0];
        assert!(!p.matches(&["a".repeat(2000)]));
        // Many ** against a deep path: memoized.
        let p = &Pattern::parse("**/x/".repeat(30).trim_end_matches('/')).unwrap()[0];
        let deep: Vec<String> = (0..200).map(|i| format!("d{i}")).collect();
        assert!(!p.matches(&deep));
    }
}
