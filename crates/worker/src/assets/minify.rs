//! Conservative whitespace and comment stripping of the page's own files, done
//! once per file when it is loaded: comments go, runs of whitespace become one
//! space or one line break, or nothing where no token needs them. Names,
//! strings, template literals and regular expressions are left exactly as
//! they are, and a line break stays wherever JavaScript's automatic semicolon
//! insertion could depend on it. The files in the repository stay readable;
//! a first visit's bytes shrink by a third (docs/BENCHMARKS.md, "Bytes per
//! page load"). Every browser test in web/test runs the stripped files
//! (`pageload.test.mjs` imports each module on its own path), and the unit
//! tests below pin the cases that need care.
//!
//! Not a parser: a `/` right after `)`, `]` or `}` is read as division, so a
//! regular expression literal there (`if (x) /re/.test(s)`) would lose its
//! spaces. The page has none; write `if (x) { /re/... }` if ever needed.
//!
//! Why our own and not a crate: the `minifier` crate (0.3, rustdoc's former
//! minifier) makes the page's modules no smaller (6,810 against 6,837 B
//! after brotli) and joins `a` and `++b` on two lines into `a++b`, changing
//! what automatic semicolon insertion reads; full parsers (swc, oxc) would
//! cost more compile time than this crate. Comment and whitespace removal by
//! a tokenizer that knows strings, templates and regular expressions is all
//! the page needs.

/// `src` (JavaScript) without comments and needless whitespace.
pub fn js(src: &str) -> String {
    let s = src.as_bytes();
    let mut out = Out::default();
    // What a `}` closes: a block or object (false), or a template literal's
    // `${` (true), after which the template's text goes on.
    let mut braces: Vec<bool> = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match c {
            b' ' | b'\t' | b'\r' => {
                out.space(false);
                i += 1;
            }
            b'\n' => {
                out.space(true);
                i += 1;
            }
            b'/' if s.get(i + 1) == Some(&b'/') => {
                while i < s.len() && s[i] != b'\n' {
                    i += 1;
                }
                out.space(false);
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                let end = find(s, i + 2, b"*/").map_or(s.len(), |e| e + 2);
                out.space(s[i..end].contains(&b'\n'));
                i = end;
            }
            b'\'' | b'"' => {
                let end = quoted(s, i, c);
                out.token(&s[i..end]);
                i = end;
            }
            b'`' => {
                let end = template(s, i + 1);
                if s[end - 1] == b'{' {
                    braces.push(true);
                }
                out.token(&s[i..end]);
                i = end;
            }
            b'}' if braces.last() == Some(&true) => {
                braces.pop();
                let end = template(s, i + 1);
                if s[end - 1] == b'{' {
                    braces.push(true);
                }
                out.token(&s[i..end]);
                i = end;
            }
            b'/' if out.regex_may_follow() => {
                let end = regex(s, i);
                out.token(&s[i..end]);
                i = end;
            }
            _ if is_word(c) => {
                let mut end = i + 1;
                while end < s.len() && is_word(s[end]) {
                    end += 1;
                }
                out.token(&s[i..end]);
                i = end;
            }
            _ => {
                match c {
                    b'{' => braces.push(false),
                    b'}' => {
                        braces.pop();
                    }
                    _ => {}
                }
                out.token(&s[i..=i]);
                i += 1;
            }
        }
    }
    out.finish()
}

/// `src` (CSS) without comments and needless whitespace.
pub fn css(src: &str) -> String {
    let s = src.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut space = false;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                space = true;
                i += 1;
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                i = find(s, i + 2, b"*/").map_or(s.len(), |e| e + 2);
                space = true;
            }
            _ => {
                // A space separates selectors' parts and values' words (and
                // `calc(a + b)` needs it); next to these it never matters.
                let last = out.last().copied();
                if space
                    && last.is_some_and(|l| !b"{};,:>(".contains(&l))
                    && !b"{};,>)".contains(&c)
                {
                    out.push(b' ');
                }
                space = false;
                let end = if c == b'"' || c == b'\'' { quoted(s, i, c) } else { i + 1 };
                out.extend_from_slice(&s[i..end]);
                i = end;
            }
        }
    }
    out.push(b'\n');
    String::from_utf8(out).expect("cut only at ASCII bytes")
}

/// `src` (HTML) without comments, indentation or blank lines: line breaks stay,
/// so text keeps its spaces. An inline `<style>` is stripped as CSS. (The
/// page's HTML has no `<pre>` or `<textarea>`, whose text this would change.)
pub fn html(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        rest = rest[start..].find("-->").map_or("", |e| &rest[start + e + 3..]);
    }
    out.push_str(rest);
    let mut lines = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while !rest.is_empty() {
        let (text, style, after) = match (rest.find("<style>"), rest.find("</style>")) {
            (Some(a), Some(b)) if a < b => (&rest[..a + 7], Some(&rest[a + 7..b]), &rest[b..]),
            _ => (rest, None, ""),
        };
        for line in text.split_inclusive('\n') {
            let line = line.trim_start();
            if !line.is_empty() {
                lines.push_str(line);
            }
        }
        if let Some(style) = style {
            lines.push_str(css(style).trim_end());
        }
        rest = after;
    }
    lines
}

/// The output with at most one pending separator before the next token.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    /// Whitespace or a comment came since the last token: `Some(true)` when it
    /// held a line break.
    pending: Option<bool>,
    /// The last token, when it was a word (name, keyword or number).
    last_word: Vec<u8>,
}

impl Out {
    fn space(&mut self, newline: bool) {
        self.pending = Some(self.pending.unwrap_or(false) || newline);
    }

    fn token(&mut self, t: &[u8]) {
        if let (Some(newline), Some(&last)) = (self.pending.take(), self.buf.last()) {
            let next = t[0];
            if newline && !b"{;,([".contains(&last) && !b"})],;.".contains(&next) {
                // Automatic semicolon insertion may hang on it: keep it.
                self.buf.push(b'\n');
            } else if is_word(last) && is_word(next)
                || last == next && b"+-".contains(&last)
                || last == b'/' && b"/*".contains(&next)
                || last.is_ascii_digit() && next == b'.'
            {
                self.buf.push(b' ');
            }
        }
        self.last_word = if is_word(t[0]) { t.to_vec() } else { Vec::new() };
        self.buf.extend_from_slice(t);
    }

    /// Whether a `/` here starts a regular expression rather than dividing:
    /// at the start, after an operator or opening punctuation, or after a
    /// keyword that takes an expression.
    fn regex_may_follow(&self) -> bool {
        const KEYWORDS: &[&[u8]] = &[
            b"return",
            b"typeof",
            b"instanceof",
            b"in",
            b"of",
            b"new",
            b"delete",
            b"void",
            b"throw",
            b"case",
            b"do",
            b"else",
            b"yield",
            b"await",
        ];
        match self.buf.last() {
            None => true,
            Some(&c) if is_word(c) => KEYWORDS.contains(&self.last_word.as_slice()),
            Some(&c) => !b")]}".contains(&c),
        }
    }

    fn finish(mut self) -> String {
        self.buf.push(b'\n');
        String::from_utf8(self.buf).expect("cut only at ASCII bytes")
    }
}

/// Letters, digits, `_`, `$`, `\` (escapes in names) and any non-ASCII byte.
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'\\' || c >= 0x80
}

fn find(s: &[u8], from: usize, what: &[u8]) -> Option<usize> {
    s.get(from..)?.windows(what.len()).position(|w| w == what).map(|p| from + p)
}

/// The end (past the closing quote) of the string opening at `start`.
fn quoted(s: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// The end of a template literal's text from `from`: past its closing
/// backtick, or past the `${` of its next substitution.
fn template(s: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'`' => return i + 1,
            b'$' if s.get(i + 1) == Some(&b'{') => return i + 2,
            _ => i += 1,
        }
    }
    s.len()
}

/// The end of the regular expression literal at `start`, flags included.
fn regex(s: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    let mut class = false;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 1,
            b'[' => class = true,
            b']' => class = false,
            b'/' if !class => break,
            b'\n' => break,
            _ => {}
        }
        i += 1;
    }
    i += 1;
    while i < s.len() && is_word(s[i]) {
        i += 1;
    }
    i.min(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_drops_comments_and_indentation_but_keeps_what_parsing_needs() {
        let src = "// head\nconst a = 1; /* note */\nfunction f(x) {\n  return x + +a; // tail\n}\nlet b = a\n++b\nreturn\n/x\\/y[/]/g.test(s)\n";
        assert_eq!(
            js(src),
            "const a=1;function f(x){return x+ +a;}\nlet b=a\n++b\nreturn\n/x\\/y[/]/g.test(s)\n"
        );
    }

    #[test]
    fn js_leaves_strings_templates_and_regexes_alone() {
        let src = "const u = 'http://a  b'; const t = `x  ${ { a: 1 }.a }  // y ${`in ${ 2 }`}`;\nconst r = s.replace(/[\\s,]/g, ''), d = n / 2 / 3;\n";
        assert_eq!(
            js(src),
            "const u='http://a  b';const t=`x  ${{a:1}.a}  // y ${`in ${2}`}`;const r=s.replace(/[\\s,]/g,''),d=n/2/3;\n"
        );
    }

    #[test]
    fn js_keeps_spaces_between_words_and_signs() {
        assert_eq!(
            js("a - -b; x = y / /re/.source; 1 .toString(); new Foo\n"),
            "a- -b;x=y/ /re/.source;1 .toString();new Foo\n"
        );
        assert_eq!(js("if (x) return typeof y === 'z'\n"), "if(x)return typeof y==='z'\n");
    }

    #[test]
    fn css_drops_comments_and_spaces_around_punctuation() {
        let src = "/* c */\n:root {\n  --a: #fff; /* x */\n}\n@media (prefers-color-scheme: dark) and (min-width: 1px) {\n  a > b:hover, .c { width: calc(1px + 2%); content: \"a  b\"; }\n}\n";
        assert_eq!(
            css(src),
            ":root{--a:#fff;}@media (prefers-color-scheme:dark) and (min-width:1px){a>b:hover,.c{width:calc(1px + 2%);content:\"a  b\";}}\n"
        );
    }

    #[test]
    fn html_drops_comments_and_indentation_and_strips_its_style() {
        let src = "<head>\n  <!-- a\n  comment -->\n  <style>\n    a { color: red; }\n  </style>\n</head>\n\n<p>one\n  two</p>\n";
        assert_eq!(html(src), "<head>\n<style>a{color:red;}</style>\n</head>\n<p>one\ntwo</p>\n");
    }
}
