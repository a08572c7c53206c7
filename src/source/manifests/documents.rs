//! A manifest file's text cut into documents, and the cheap checks made on
//! each document before a parser sees it.
//!
//! YAML files are split on lines that start with the `---` (or `...`)
//! marker at column 0 followed by a space, a tab or the end of the line.
//! serde_yaml_ng's multi-document deserializer is not used because it stops
//! at the first syntax error and loses every later document of the file. The
//! split is exact, not a heuristic: YAML forbids such a line inside any
//! scalar, so it always ends a document. Documents made only of blank lines,
//! comments and `%` directives are dropped.
//!
//! A `.json` file is a stream of JSON values (usually exactly one); after a
//! JSON syntax error the rest of that file is one last document, since JSON
//! has no marker to resynchronise on.
//!
//! Documents borrow the file's text: splitting copies nothing, so hashing
//! the documents of a changed file (to re-parse only those that changed)
//! costs one pass over it.
//!
//! [`exceeds_depth`] bounds nesting before parsing, in one linear pass: a
//! parser handed 100,000 nested `[` spends seconds to minutes on them.

use std::borrow::Cow;

/// One document of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Document<'a> {
    /// 0-based line of the file the document starts on.
    pub first_line: usize,
    /// The document started with a `---` marker, which `body` leaves out.
    pub marker: bool,
    /// The document's text, after its marker if any.
    pub body: &'a str,
}

impl Document<'_> {
    /// The text to parse: a leading marker is replaced by spaces, so that
    /// what follows it on its line keeps its column.
    pub fn text(&self) -> Cow<'_, str> {
        if self.marker {
            Cow::Owned(format!("   {}", self.body))
        } else {
            Cow::Borrowed(self.body)
        }
    }

    /// Decodes the text with `parse`; an error's line numbers are made the
    /// file's (not the document's) by shifting them, in linear time.
    pub fn decode<T, E: ToString>(
        &self,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<T, String> {
        parse(&self.text()).map_err(|e| shift_line_numbers(&e.to_string(), self.first_line))
    }
}

/// Adds `offset` to every `line N` in a parser's error message.
pub fn shift_line_numbers(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (head, tail) = rest.split_at(at + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Whether `line` (without its line break) is a `---` or `...` marker line.
pub fn is_document_marker(line: &str) -> bool {
    ["---", "..."].iter().any(|marker| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    })
}

/// Whether a YAML line carries no content: blank, a comment, or a directive.
fn is_blank_yaml_line(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%')
}

/// Splits YAML text into its non-empty documents.
pub fn split_yaml(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut current = Document {
        first_line: 0,
        marker: false,
        body: "",
    };
    let mut start = 0;
    let mut content = false;
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_document_marker(bare) {
            current.body = &text[start..offset];
            if content {
                documents.push(current);
            }
            current = Document {
                first_line: line_no,
                marker: true,
                body: "",
            };
            start = offset + 3;
            content = !is_blank_yaml_line(&bare[3..]);
        } else {
            content |= !is_blank_yaml_line(bare);
        }
        offset += line.len();
    }
    if content {
        current.body = &text[start..];
        documents.push(current);
    }
    documents
}

/// Splits JSON text into its top-level values. After a syntax error the rest
/// of the text is one last document, which fails to parse with that error.
pub fn split_json(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde::de::IgnoredAny>();
    let (mut start, mut first_line) = (0, 0);
    let mut push = |start: usize, end: usize, first_line: &mut usize| {
        let body = &text[start..end];
        documents.push(Document {
            first_line: *first_line,
            marker: false,
            body,
        });
        *first_line += body.matches('\n').count();
    };
    loop {
        match stream.next() {
            None => break,
            Some(Ok(_)) => {
                let end = stream.byte_offset();
                push(start, end, &mut first_line);
                start = end;
            }
            Some(Err(_)) => {
                push(start, text.len(), &mut first_line);
                break;
            }
        }
    }
    documents
}

/// Whether `text` (one YAML or JSON document) may nest deeper than `limit`
/// collections. One linear pass, stopping at the first level over the
/// limit. It over-estimates rather than under-estimates: flow collections
/// (`[`, `{`) outside quoted scalars and comments, plus block levels (the
/// indentation stack and compact `- ` / `? ` entries on a line), counted
/// together. Block scalars (`|`, `>`) are skipped, quoted scalars only
/// start where a scalar can start, so text inside them is not counted.
pub fn exceeds_depth(text: &str, limit: usize) -> bool {
    let b = text.as_bytes();
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    // Indentation of the line that opened a block scalar, while in one.
    let mut block_scalar: Option<usize> = None;
    let mut i = 0;
    while i < b.len() {
        // A line start, outside flow collections: indentation and compact entries.
        let line_end = memchr(b, i, b'\n');
        let indent = b[i..line_end].iter().take_while(|&&c| c == b' ').count();
        let first = i + indent;
        let blank = first >= line_end || matches!(b[first], b'\r' | b'#');
        if let Some(opener) = block_scalar {
            if blank || indent > opener {
                i = line_end + 1;
                continue;
            }
            block_scalar = None;
        }
        if blank {
            i = line_end + 1;
            continue;
        }
        let mut j = first;
        if flow == 0 {
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let mut compact = 0;
            while j + 1 < line_end
                && matches!(b[j], b'-' | b'?')
                && matches!(b[j + 1], b' ' | b'\t')
            {
                compact += 1;
                j += 2;
                while j < line_end && b[j] == b' ' {
                    j += 1;
                }
            }
            if indents.len() + compact > limit {
                return true;
            }
        }
        // The rest of the line (quoted scalars may run on over later lines).
        let mut scalar_start = true;
        let mut last_token = j;
        while j < b.len() && b[j] != b'\n' {
            let c = b[j];
            match c {
                b'#' if j == first || matches!(b[j - 1], b' ' | b'\t') => {
                    j = memchr(b, j, b'\n');
                    break;
                }
                b'"' | b'\'' if scalar_start => {
                    j = skip_quoted(b, j);
                    last_token = j.saturating_sub(1);
                    scalar_start = false;
                    continue;
                }
                b'[' | b'{' if scalar_start => {
                    flow += 1;
                    if flow + indents.len() > limit {
                        return true;
                    }
                }
                b']' | b'}' if flow > 0 => flow -= 1,
                _ => {}
            }
            if !matches!(c, b' ' | b'\t' | b'\r') {
                last_token = j;
            }
            scalar_start = match c {
                b' ' | b'\t' => scalar_start,
                b'[' | b'{' | b',' => true,
                b':' | b'-' | b'?' => j + 1 < b.len() && matches!(b[j + 1], b' ' | b'\t' | b'\n'),
                _ => false,
            };
            j += 1;
        }
        if flow == 0 && opens_block_scalar(&b[first.min(last_token)..=last_token.min(b.len() - 1)])
        {
            block_scalar = Some(indent);
        }
        i = j + 1;
    }
    false
}

/// Whether a line's content ends in a block scalar indicator (`|`, `>-`, `|2+`...).
fn opens_block_scalar(line: &[u8]) -> bool {
    let end = line
        .iter()
        .rposition(|c| !c.is_ascii_digit() && !matches!(c, b'+' | b'-'))
        .map_or(0, |p| p + 1);
    let Some(indicator_at) = end.checked_sub(1) else {
        return false;
    };
    matches!(line[indicator_at], b'|' | b'>')
        && (indicator_at == 0 || matches!(line[indicator_at - 1], b' ' | b'\t'))
}

/// The position of the next `c` at or after `from`, or the end.
fn memchr(b: &[u8], from: usize, c: u8) -> usize {
    b[from..]
        .iter()
        .position(|&x| x == c)
        .map_or(b.len(), |p| from + p)
}

/// The position just after the quoted scalar opening at `at`.
fn skip_quoted(b: &[u8], at: usize) -> usize {
    let quote = b[at];
    let mut j = at + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if quote == b'"' => j += 2,
            c if c == quote => {
                // '' is an escaped quote inside a single-quoted scalar.
                if quote == b'\'' && b.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else {
                    return j + 1;
                }
            }
            _ => j += 1,
        }
    }
    b.len()
}

#[cfg(test)]
#[path = "documents_tests.rs"]
mod tests;
