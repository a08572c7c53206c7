//! A small Go `text/template` engine with the Sprig and Helm functions the
//! kpr chart uses, so `tests/helm_chart.rs` can render the chart where no
//! `helm` binary exists.
//!
//! It follows Go's and Helm's semantics closely enough that the chart
//! renders byte for byte as Helm renders it (the cross-check test proves it
//! when the Helm SDK for Python is installed), and fails where Go fails:
//! undefined functions at parse time, a field of nil, comparing an int with
//! a float, a non-string where a string function wants one. What it does not
//! know it refuses instead of guessing.
//!
//! Supported: text with `{{- -}}` trimming, comments, pipelines, `$`
//! variables (`:=`, `=`), field chains on maps, parenthesised pipelines,
//! `if`/`else if`/`else`, `with`/`else`, `range` (lists and maps, sorted by
//! key, with `$i, $v :=`), `define`, `template`. Functions: Go's `and`,
//! `or`, `not`, `eq`, `ne`, `len`, `printf` (`%s %v %d %q`); Sprig's
//! `contains`, `default`, `hasPrefix`, `indent`, `join`, `nindent`, `quote`,
//! `replace`, `trimSuffix`, `trunc`; Helm's `include`, `required`, `toYaml`.
//!
//! Data is `serde_json::Value`. Helm reads values files into `float64`
//! numbers; [`numbers_to_float`] does the same, and literals in templates
//! stay integers, so `eq .Values.port 6443` fails here as it does in Helm.

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};

/// The functions the templates may call; anything else is a parse error.
pub const FUNCTIONS: &[&str] = &[
    // Go text/template built-ins.
    "and",
    "eq",
    "len",
    "ne",
    "not",
    "or",
    "printf",
    // Sprig.
    "contains",
    "default",
    "hasPrefix",
    "indent",
    "join",
    "nindent",
    "quote",
    "replace",
    "trimSuffix",
    "trunc",
    // Helm.
    "include",
    "required",
    "toYaml",
];

/// A set of parsed template files and the `define`s they contain.
#[derive(Default)]
pub struct Templates {
    files: BTreeMap<String, Vec<Node>>,
    defines: BTreeMap<String, Vec<Node>>,
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    /// `{{ pipeline }}`: prints the value unless the pipeline declares or
    /// assigns a variable.
    Action(Pipeline),
    If(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
    Template(String, Option<Pipeline>),
}

#[derive(Debug, Clone, Default)]
struct Pipeline {
    /// Variables declared (`:=`) or assigned (`=`) by the pipeline.
    vars: Vec<String>,
    declare: bool,
    commands: Vec<Vec<Operand>>,
    /// The action's source, for error messages.
    source: String,
}

#[derive(Debug, Clone)]
enum Operand {
    Dot,
    /// `.a.b`: fields of dot.
    Field(Vec<String>),
    /// `$x.a.b`.
    Var(String, Vec<String>),
    Func(String),
    /// `(pipeline).a.b`.
    Sub(Box<Pipeline>, Vec<String>),
    Literal(Value),
}

// ---------------------------------------------------------------- lexing --

/// A piece of a template file: literal text or the inside of `{{ }}`.
enum Segment {
    Text(String),
    Action { text: String, line: usize },
}

/// Splits a file into text and actions, applying `{{-` and `-}}` trimming
/// and dropping comments.
fn segments(src: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    let line_of = |rest: &str| src[..src.len() - rest.len()].matches('\n').count() + 1;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_string();
        if trim_next {
            text = text.trim_start_matches(is_space).to_string();
        }
        let mut inner = &rest[start + 2..];
        let line = line_of(inner);
        if inner.starts_with('-') && inner[1..].starts_with(is_space) {
            text = text.trim_end_matches(is_space).to_string();
            inner = &inner[1..];
        }
        out.push(Segment::Text(text));
        let body_start = inner.trim_start_matches(is_space);
        let (body, after) = if body_start.starts_with("/*") {
            let end = body_start
                .find("*/")
                .ok_or(format!("line {line}: unclosed comment"))?;
            let after = &body_start[end + 2..];
            let close = after
                .find("}}")
                .ok_or(format!("line {line}: unclosed comment action"))?;
            if !after[..close]
                .trim_matches(is_space)
                .trim_end_matches('-')
                .is_empty()
            {
                return Err(format!("line {line}: comment ends before the action"));
            }
            (None, &after[..close + 2])
        } else {
            let close = find_close(inner).ok_or(format!("line {line}: unclosed action"))?;
            (Some(&inner[..close]), &inner[..close + 2])
        };
        // `after` ends with "}}"; see whether " -}}" trims what follows.
        let before_close = &after[..after.len() - 2];
        trim_next = before_close.ends_with('-')
            && before_close[..before_close.len() - 1].ends_with(is_space);
        if let Some(body) = body {
            let mut body = body;
            if trim_next {
                body = &body[..body.len() - 1];
            }
            out.push(Segment::Action {
                text: body.trim_matches(is_space).to_string(),
                line,
            });
        }
        let consumed = (after.as_ptr() as usize + after.len()) - rest.as_ptr() as usize;
        rest = &rest[consumed..];
    }
    let mut text = rest.to_string();
    if trim_next {
        text = text.trim_start_matches(is_space).to_string();
    }
    out.push(Segment::Text(text));
    Ok(out)
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Index of the `}}` closing an action, skipping string literals.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if b[i + 1] == b'}' => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// `.name`; `attached` when no space separates it from what precedes
    /// (a chain such as `$x.a` or `(f x).a`).
    Field {
        name: String,
        attached: bool,
    },
    Dot,
    Var(String),
    Ident(String),
    Str(String),
    Number(Value),
    LParen,
    RParen,
    Pipe,
    Declare,
    Assign,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let attached = i > 0 && !is_space(chars[i - 1]);
        match c {
            _ if is_space(c) => i += 1,
            '(' => (tokens.push(Token::LParen), i += 1).1,
            ')' => (tokens.push(Token::RParen), i += 1).1,
            '|' => (tokens.push(Token::Pipe), i += 1).1,
            ',' => (tokens.push(Token::Comma), i += 1).1,
            ':' if chars.get(i + 1) == Some(&'=') => (tokens.push(Token::Declare), i += 2).1,
            '=' => (tokens.push(Token::Assign), i += 1).1,
            '.' if chars.get(i + 1).is_some_and(|c| ident_char(*c)) => {
                let start = i + 1;
                i = start;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                let name = chars[start..i].iter().collect();
                let attached = attached && !matches!(chars[start - 2], '(' | '|');
                tokens.push(Token::Field { name, attached });
            }
            '.' => (tokens.push(Token::Dot), i += 1).1,
            '$' => {
                let start = i;
                i += 1;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Var(chars[start..i].iter().collect()));
            }
            '"' => {
                let mut out = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("unterminated string in {s:?}")),
                        Some('"') => break,
                        Some('\\') => {
                            i += 1;
                            out.push(match chars.get(i) {
                                Some('n') => '\n',
                                Some('t') => '\t',
                                Some('r') => '\r',
                                Some('\\') => '\\',
                                Some('"') => '"',
                                other => return Err(format!("unsupported escape {other:?}")),
                            });
                        }
                        Some(c) => out.push(*c),
                    }
                    i += 1;
                }
                i += 1;
                tokens.push(Token::Str(out));
            }
            '`' => {
                let start = i + 1;
                i = start;
                while i < chars.len() && chars[i] != '`' {
                    i += 1;
                }
                tokens.push(Token::Str(chars[start..i].iter().collect()));
                i += 1;
            }
            _ if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let number = if let Ok(n) = text.parse::<i64>() {
                    Value::from(n)
                } else if let Ok(f) = text.parse::<f64>() {
                    Value::from(f)
                } else {
                    return Err(format!("bad number {text:?}"));
                };
                tokens.push(Token::Number(number));
            }
            _ if ident_char(c) => {
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            _ => return Err(format!("unexpected {c:?} in {s:?}")),
        }
    }
    Ok(tokens)
}

// --------------------------------------------------------------- parsing --

/// How a list of nodes ended.
enum End {
    /// The end of the file.
    Eof,
    /// `{{ end }}`.
    Keyword,
    /// `{{ else }}` or `{{ else if ... }}`: the tokens after `else`.
    Else(Vec<Token>, String),
}

struct Parser {
    segments: std::vec::IntoIter<Segment>,
    defines: BTreeMap<String, Vec<Node>>,
    top_level: bool,
}

impl Parser {
    fn list(&mut self) -> Result<(Vec<Node>, End), String> {
        let mut nodes = Vec::new();
        while let Some(segment) = self.segments.next() {
            let (text, line) = match segment {
                Segment::Text(t) => {
                    if !t.is_empty() {
                        nodes.push(Node::Text(t));
                    }
                    continue;
                }
                Segment::Action { text, line } => (text, line),
            };
            let at = |e: String| format!("line {line}: {{{{ {text} }}}}: {e}");
            let tokens = tokenize(&text).map_err(at)?;
            let keyword = match tokens.first() {
                Some(Token::Ident(k)) => k.as_str(),
                _ => "",
            };
            let rest = tokens.get(1..).unwrap_or_default().to_vec();
            match keyword {
                "end" => return Ok((nodes, End::Keyword)),
                "else" => return Ok((nodes, End::Else(rest, text))),
                "if" | "with" | "range" => {
                    let pipe = pipeline(&rest, &text).map_err(at)?;
                    nodes.push(self.control(keyword, pipe).map_err(at)?);
                }
                "define" => {
                    let [Token::Str(name)] = rest.as_slice() else {
                        return Err(at("define takes one string".into()));
                    };
                    if !self.top_level {
                        return Err(at("define inside a block".into()));
                    }
                    self.top_level = false;
                    let (body, end) = self.list()?;
                    self.top_level = true;
                    if !matches!(end, End::Keyword) {
                        return Err(at("define without end".into()));
                    }
                    self.defines.insert(name.clone(), body);
                }
                "template" => {
                    let Some(Token::Str(name)) = rest.first() else {
                        return Err(at("template takes a string name".into()));
                    };
                    let pipe = if rest.len() > 1 {
                        Some(pipeline(&rest[1..], &text).map_err(at)?)
                    } else {
                        None
                    };
                    nodes.push(Node::Template(name.clone(), pipe));
                }
                "block" | "break" | "continue" => {
                    return Err(at(format!("{keyword} is not supported")))
                }
                _ => nodes.push(Node::Action(pipeline(&tokens, &text).map_err(at)?)),
            }
        }
        Ok((nodes, End::Eof))
    }

    /// Parses an `if`/`with`/`range` body up to its `end`, with `else` and
    /// `else if`/`else with` chains (which share the one `end`).
    fn control(&mut self, keyword: &str, pipe: Pipeline) -> Result<Node, String> {
        let (body, end) = self.list()?;
        let else_body = match end {
            End::Keyword => Vec::new(),
            End::Eof => return Err(format!("{keyword} without end")),
            End::Else(tokens, _) if tokens.is_empty() => {
                let (else_body, end) = self.list()?;
                if !matches!(end, End::Keyword) {
                    return Err(format!("else of {keyword} without end"));
                }
                else_body
            }
            End::Else(tokens, text) => match tokens.first() {
                Some(Token::Ident(k)) if (k == "if" || k == "with") && keyword != "range" => {
                    let k = k.clone();
                    let inner = pipeline(&tokens[1..], &text)?;
                    vec![self.control(&k, inner)?]
                }
                _ => return Err(format!("unexpected {{{{ {text} }}}}")),
            },
        };
        Ok(match keyword {
            "if" => Node::If(pipe, body, else_body),
            "with" => Node::With(pipe, body, else_body),
            _ => Node::Range(pipe, body, else_body),
        })
    }
}

fn pipeline(tokens: &[Token], source: &str) -> Result<Pipeline, String> {
    let mut pipe = Pipeline {
        source: source.to_string(),
        ..Pipeline::default()
    };
    let mut rest = tokens;
    // Declarations: `$a :=`, `$a, $b :=`, `$a =`.
    if let Some(pos) = rest
        .iter()
        .position(|t| matches!(t, Token::Declare | Token::Assign))
    {
        let head = &rest[..pos];
        let is_decl = head.iter().enumerate().all(|(i, t)| match t {
            Token::Var(_) => i % 2 == 0,
            Token::Comma => i % 2 == 1,
            _ => false,
        });
        if is_decl && !head.is_empty() {
            pipe.vars = head
                .iter()
                .filter_map(|t| match t {
                    Token::Var(v) => Some(v.clone()),
                    _ => None,
                })
                .collect();
            pipe.declare = rest[pos] == Token::Declare;
            rest = &rest[pos + 1..];
        }
    }
    let mut command = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match &rest[i] {
            Token::Pipe => {
                if command.is_empty() {
                    return Err("empty command in pipeline".into());
                }
                pipe.commands.push(std::mem::take(&mut command));
                i += 1;
            }
            _ => {
                let (operand, next) = operand(rest, i, source)?;
                command.push(operand);
                i = next;
            }
        }
    }
    if command.is_empty() {
        return Err("missing value".into());
    }
    pipe.commands.push(command);
    Ok(pipe)
}

/// Parses one operand starting at `tokens[i]`, with its attached field
/// chain; returns it and the index after it.
fn operand(tokens: &[Token], mut i: usize, source: &str) -> Result<(Operand, usize), String> {
    let chain = |tokens: &[Token], mut i: usize| {
        let mut fields = Vec::new();
        while let Some(Token::Field {
            name,
            attached: true,
        }) = tokens.get(i)
        {
            fields.push(name.clone());
            i += 1;
        }
        (fields, i)
    };
    let op = match &tokens[i] {
        Token::Dot => (Operand::Dot, i + 1),
        Token::Field { name, .. } => {
            let (mut fields, next) = chain(tokens, i + 1);
            fields.insert(0, name.clone());
            (Operand::Field(fields), next)
        }
        Token::Var(v) => {
            let (fields, next) = chain(tokens, i + 1);
            (Operand::Var(v.clone(), fields), next)
        }
        Token::Str(s) => (Operand::Literal(Value::String(s.clone())), i + 1),
        Token::Number(n) => (Operand::Literal(n.clone()), i + 1),
        Token::Ident(name) => match name.as_str() {
            "true" => (Operand::Literal(Value::Bool(true)), i + 1),
            "false" => (Operand::Literal(Value::Bool(false)), i + 1),
            "nil" => (Operand::Literal(Value::Null), i + 1),
            _ if FUNCTIONS.contains(&name.as_str()) => (Operand::Func(name.clone()), i + 1),
            _ => return Err(format!("function {name:?} not defined")),
        },
        Token::LParen => {
            let start = i + 1;
            let mut depth = 1;
            i = start;
            while depth > 0 {
                match tokens.get(i) {
                    None => return Err("unclosed parenthesis".into()),
                    Some(Token::LParen) => depth += 1,
                    Some(Token::RParen) => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
            let inner = pipeline(&tokens[start..i - 1], source)?;
            let (fields, next) = chain(tokens, i);
            (Operand::Sub(Box::new(inner), fields), next)
        }
        other => return Err(format!("unexpected {other:?}")),
    };
    Ok(op)
}

// ------------------------------------------------------------- execution --

impl Templates {
    /// Parses one file; its `define`s become available to every file.
    pub fn add_file(&mut self, name: &str, src: &str) -> Result<(), String> {
        let mut parser = Parser {
            segments: segments(src)
                .map_err(|e| format!("{name}: {e}"))?
                .into_iter(),
            defines: BTreeMap::new(),
            top_level: true,
        };
        let (nodes, end) = parser.list().map_err(|e| format!("{name}: {e}"))?;
        if !matches!(end, End::Eof) {
            return Err(format!("{name}: unexpected end or else"));
        }
        self.defines.extend(parser.defines);
        self.files.insert(name.to_string(), nodes);
        Ok(())
    }

    /// Renders a file with `data` as dot, as Helm does: `<no value>` (a
    /// missing map key) prints as nothing.
    pub fn render_file(&self, name: &str, data: &Value) -> Result<String, String> {
        let nodes = self
            .files
            .get(name)
            .ok_or_else(|| format!("no template file {name}"))?;
        let out = Exec::new(self, data)
            .run(nodes, data)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(out.replace("<no value>", ""))
    }

    fn render_define(&self, name: &str, data: &Value) -> Result<String, String> {
        let nodes = self
            .defines
            .get(name)
            .ok_or_else(|| format!("no template {name:?}"))?;
        Exec::new(self, data)
            .run(nodes, data)
            .map_err(|e| format!("in template {name:?}: {e}"))
    }
}

struct Exec<'t> {
    templates: &'t Templates,
    vars: Vec<(String, Value)>,
    out: String,
}

impl<'t> Exec<'t> {
    fn new(templates: &'t Templates, root: &Value) -> Self {
        Exec {
            templates,
            vars: vec![("$".to_string(), root.clone())],
            out: String::new(),
        }
    }

    fn run(mut self, nodes: &[Node], dot: &Value) -> Result<String, String> {
        self.list(nodes, dot)?;
        Ok(self.out)
    }

    fn list(&mut self, nodes: &[Node], dot: &Value) -> Result<(), String> {
        for node in nodes {
            self.node(node, dot)?;
        }
        Ok(())
    }

    fn node(&mut self, node: &Node, dot: &Value) -> Result<(), String> {
        match node {
            Node::Text(t) => self.out.push_str(t),
            Node::Action(pipe) => {
                let v = self.pipeline(pipe, dot)?;
                if pipe.vars.is_empty() {
                    self.out.push_str(&go_print(&v));
                }
            }
            Node::If(pipe, then, otherwise) | Node::With(pipe, then, otherwise) => {
                let mark = self.vars.len();
                let v = self.pipeline(pipe, dot)?;
                let with = matches!(node, Node::With(..));
                if truth(&v) {
                    self.list(then, if with { &v } else { dot })?;
                } else {
                    self.list(otherwise, dot)?;
                }
                self.vars.truncate(mark);
            }
            Node::Range(pipe, body, otherwise) => {
                let mark = self.vars.len();
                let mut inner = pipe.clone();
                inner.vars.clear();
                let v = self.pipeline(&inner, dot)?;
                let items: Vec<(Value, Value)> = match &v {
                    Value::Array(a) => a
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (Value::from(i as i64), x.clone()))
                        .collect(),
                    // Go ranges over a map in key order.
                    Value::Object(m) => sorted(m)
                        .map(|(k, x)| (Value::String(k.clone()), x.clone()))
                        .collect(),
                    Value::Null => Vec::new(),
                    other => return Err(format!("range can't iterate over {}", go_print(other))),
                };
                if items.is_empty() {
                    self.list(otherwise, dot)?;
                }
                for (key, item) in items {
                    match pipe.vars.as_slice() {
                        [] => {}
                        [v] => self.vars.push((v.clone(), item.clone())),
                        [k, v] => {
                            self.vars.push((k.clone(), key));
                            self.vars.push((v.clone(), item.clone()));
                        }
                        _ => return Err("too many range variables".into()),
                    }
                    self.list(body, &item)?;
                    self.vars.truncate(mark);
                }
            }
            Node::Template(name, pipe) => {
                let data = match pipe {
                    Some(p) => self.pipeline(p, dot)?,
                    None => Value::Null,
                };
                let text = self.templates.render_define(name, &data)?;
                self.out.push_str(&text);
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, pipe: &Pipeline, dot: &Value) -> Result<Value, String> {
        let mut value = None;
        for command in &pipe.commands {
            value = Some(
                self.command(command, dot, value)
                    .map_err(|e| format!("{{{{ {} }}}}: {e}", pipe.source))?,
            );
        }
        let value = value.unwrap_or(Value::Null);
        match (pipe.vars.as_slice(), pipe.declare) {
            ([], _) => {}
            ([name], true) => self.vars.push((name.clone(), value.clone())),
            ([name], false) => {
                let slot = self
                    .vars
                    .iter_mut()
                    .rev()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| format!("undefined variable {name}"))?;
                slot.1 = value.clone();
            }
            _ => return Err(format!("{}: too many variables", pipe.source)),
        }
        Ok(value)
    }

    fn command(
        &mut self,
        command: &[Operand],
        dot: &Value,
        piped: Option<Value>,
    ) -> Result<Value, String> {
        if let Operand::Func(name) = &command[0] {
            return self.call(name, &command[1..], dot, piped);
        }
        if command.len() > 1 || piped.is_some() {
            return Err("can't give argument to non-function".into());
        }
        self.operand(&command[0], dot)
    }

    fn operand(&mut self, op: &Operand, dot: &Value) -> Result<Value, String> {
        match op {
            Operand::Dot => Ok(dot.clone()),
            Operand::Field(path) => walk(dot, path),
            Operand::Var(name, path) => {
                let v = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| format!("undefined variable {name}"))?;
                walk(&v, path)
            }
            Operand::Func(name) => self.call(name, &[], dot, None),
            Operand::Sub(pipe, path) => {
                let v = self.pipeline(pipe, dot)?;
                walk(&v, path)
            }
            Operand::Literal(v) => Ok(v.clone()),
        }
    }

    fn call(
        &mut self,
        name: &str,
        operands: &[Operand],
        dot: &Value,
        piped: Option<Value>,
    ) -> Result<Value, String> {
        // `and` and `or` stop at the first operand that decides (Go 1.18).
        if name == "and" || name == "or" {
            let count = operands.len() + usize::from(piped.is_some());
            if count < 1 {
                return Err(format!("{name}: wrong number of args"));
            }
            let mut last = Value::Null;
            for (i, op) in operands.iter().enumerate() {
                last = self.operand(op, dot)?;
                let decided = if name == "and" {
                    !truth(&last)
                } else {
                    truth(&last)
                };
                if decided || (i + 1 == count) {
                    return Ok(last);
                }
            }
            return Ok(piped.unwrap_or(last));
        }
        let mut args = operands
            .iter()
            .map(|op| self.operand(op, dot))
            .collect::<Result<Vec<_>, _>>()?;
        args.extend(piped);
        let want = |n: usize| {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!("{name}: wants {n} args, got {}", args.len()))
            }
        };
        Ok(match name {
            "not" => {
                want(1)?;
                Value::Bool(!truth(&args[0]))
            }
            "eq" | "ne" => {
                want(2)?;
                let equal = go_eq(&args[0], &args[1])?;
                Value::Bool(equal == (name == "eq"))
            }
            "len" => {
                want(1)?;
                Value::from(match &args[0] {
                    Value::String(s) => s.len(),
                    Value::Array(a) => a.len(),
                    Value::Object(m) => m.len(),
                    other => return Err(format!("len of {}", go_print(other))),
                } as i64)
            }
            "printf" => {
                let format = string(args.first(), "printf format")?;
                Value::String(sprintf(format, &args[1..])?)
            }
            "contains" => {
                want(2)?;
                let (sub, s) = (string(args.first(), name)?, string(args.get(1), name)?);
                Value::Bool(s.contains(sub))
            }
            "hasPrefix" => {
                want(2)?;
                let (prefix, s) = (string(args.first(), name)?, string(args.get(1), name)?);
                Value::Bool(s.starts_with(prefix))
            }
            "trimSuffix" => {
                want(2)?;
                let (suffix, s) = (string(args.first(), name)?, string(args.get(1), name)?);
                Value::String(s.strip_suffix(suffix).unwrap_or(s).to_string())
            }
            "replace" => {
                want(3)?;
                let old = string(args.first(), name)?;
                let new = string(args.get(1), name)?;
                Value::String(string(args.get(2), name)?.replace(old, new))
            }
            "trunc" => {
                want(2)?;
                let n = int(&args[0], name)?;
                let s = string(args.get(1), name)?;
                let len = s.len() as i64;
                Value::String(if n < 0 && len + n > 0 {
                    s[(len + n) as usize..].to_string()
                } else if n >= 0 && len > n {
                    s[..n as usize].to_string()
                } else {
                    s.to_string()
                })
            }
            "default" => {
                if args.is_empty() || args.len() > 2 {
                    return Err("default: wants 1 or 2 args".into());
                }
                match args.get(1) {
                    Some(given) if !empty(given) => given.clone(),
                    _ => args[0].clone(),
                }
            }
            "required" => {
                want(2)?;
                let msg = string(args.first(), name)?;
                match &args[1] {
                    Value::Null => return Err(msg.to_string()),
                    Value::String(s) if s.is_empty() => return Err(msg.to_string()),
                    v => v.clone(),
                }
            }
            "quote" => Value::String(
                args.iter()
                    .filter(|a| !a.is_null())
                    .map(|a| go_quote(&str_val(a)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            "join" => {
                want(2)?;
                let sep = string(args.first(), name)?;
                let items: Vec<String> = match &args[1] {
                    Value::Array(a) => a.iter().filter(|x| !x.is_null()).map(str_val).collect(),
                    Value::Null => Vec::new(),
                    other => vec![str_val(other)],
                };
                Value::String(items.join(sep))
            }
            "indent" | "nindent" => {
                want(2)?;
                let n = int(&args[0], name)?;
                let pad = " ".repeat(n.max(0) as usize);
                let s = string(args.get(1), name)?;
                let indented = format!("{pad}{}", s.replace('\n', &format!("\n{pad}")));
                Value::String(if name == "nindent" {
                    format!("\n{indented}")
                } else {
                    indented
                })
            }
            "include" => {
                want(2)?;
                let template = string(args.first(), name)?;
                Value::String(self.templates.render_define(template, &args[1])?)
            }
            "toYaml" => {
                want(1)?;
                Value::String(to_yaml(&args[0])?)
            }
            other => return Err(format!("function {other:?} not implemented")),
        })
    }
}

fn sorted(m: &Map<String, Value>) -> impl Iterator<Item = (&String, &Value)> {
    let mut entries: Vec<_> = m.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries.into_iter()
}

/// `.a.b` on a value: a missing map key is nil; a field of nil is an error.
fn walk(v: &Value, path: &[String]) -> Result<Value, String> {
    let mut cur = v.clone();
    for key in path {
        cur = match cur {
            Value::Object(m) => m.get(key).cloned().unwrap_or(Value::Null),
            Value::Null => return Err(format!("nil pointer evaluating interface {{}}.{key}")),
            other => {
                return Err(format!(
                    "can't evaluate field {key} in {}",
                    go_print(&other)
                ))
            }
        };
    }
    Ok(cur)
}

/// Go's template truth: false, 0, nil and empty strings, lists and maps are false.
fn truth(v: &Value) -> bool {
    !empty(v)
}

/// Sprig's `empty`.
fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
    }
}

/// Go's `eq` on basic kinds: integers and floats are different kinds.
fn go_eq(a: &Value, b: &Value) -> Result<bool, String> {
    match (a, b) {
        (Value::String(x), Value::String(y)) => Ok(x == y),
        (Value::Bool(x), Value::Bool(y)) => Ok(x == y),
        (Value::Number(x), Value::Number(y)) if x.is_f64() == y.is_f64() => {
            Ok(x.as_f64() == y.as_f64())
        }
        (Value::Null, Value::Null) => Ok(true),
        _ => Err(format!(
            "incompatible types for comparison: {} and {}",
            go_print(a),
            go_print(b)
        )),
    }
}

fn string<'v>(v: Option<&'v Value>, what: &str) -> Result<&'v str, String> {
    match v {
        Some(Value::String(s)) => Ok(s),
        other => Err(format!("{what}: wants a string, got {other:?}")),
    }
}

fn int(v: &Value, what: &str) -> Result<i64, String> {
    match v {
        Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or_default()),
        other => Err(format!("{what}: wants an int, got {other:?}")),
    }
}

/// Sprig's `strval`: strings as they are, the rest as Go's `%v`.
fn str_val(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => go_print(other),
    }
}

/// Go's `%v` of a value held in an `interface{}`.
pub fn go_print(v: &Value) -> String {
    match v {
        Value::Null => "<no value>".into(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_i64() {
            Some(i) if !n.is_f64() => i.to_string(),
            _ => go_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::Array(a) => format!("[{}]", a.iter().map(go_print).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => format!(
            "map[{}]",
            sorted(m)
                .map(|(k, v)| format!("{k}:{}", go_print(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

/// Go's `%v` of a float64 (`strconv.FormatFloat(f, 'g', -1, 64)`): the
/// shortest digits, in exponent form when the exponent is < -4 or >= 6 (the
/// reason a value of 1000000 renders as 1e+06 in Helm).
fn go_float(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Go does.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    } else {
        format!("{f}")
    }
}

/// Go's `%q` (strconv.Quote) for the characters a chart may hold.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `printf` with the verbs the chart uses.
fn sprintf(format: &str, args: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars.next().ok_or("printf: trailing %")?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = args.next().ok_or("printf: missing argument")?;
        match (verb, arg) {
            ('s', Value::String(s)) => out.push_str(s),
            ('v', v) => out.push_str(&go_print(v)),
            ('d', Value::Number(n)) if n.is_i64() => out.push_str(&go_print(arg)),
            ('q', Value::String(s)) => out.push_str(&go_quote(s)),
            _ => return Err(format!("printf: %{verb} of {arg:?} is not supported")),
        }
    }
    if args.next().is_some() {
        return Err("printf: extra arguments".into());
    }
    Ok(out)
}

/// Helm's `toYaml` (sigs.k8s.io/yaml: JSON, then go-yaml v2's emitter):
/// block style, sorted keys, lists flush with their key, integral numbers
/// as integers, and strings quoted exactly when go-yaml quotes them: double
/// quotes for a string YAML 1.1 would read as something else (`"yes"`,
/// `"123"`, `""`), single quotes where plain style cannot hold it (`'a: b'`).
/// No final newline. Multi-line strings (go-yaml's `|-`) are refused.
fn to_yaml(v: &Value) -> Result<String, String> {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => yaml_map(m, 0, false, &mut out)?,
        Value::Array(a) if !a.is_empty() => yaml_list(a, 0, false, &mut out)?,
        scalar => out = yaml_scalar(scalar)?,
    }
    Ok(out.trim_end_matches('\n').to_string())
}

/// A map's entries at column `indent`; the first on the current line when
/// `inline` (after a list's "- ").
fn yaml_map(
    m: &Map<String, Value>,
    indent: usize,
    inline: bool,
    out: &mut String,
) -> Result<(), String> {
    for (i, (k, v)) in sorted(m).enumerate() {
        if !(inline && i == 0) {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&yaml_string(k)?);
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                yaml_map(inner, indent + 2, false, out)?;
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                yaml_list(a, indent, false, out)?;
            }
            scalar => {
                out.push(' ');
                out.push_str(&yaml_scalar(scalar)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

fn yaml_list(a: &[Value], indent: usize, inline: bool, out: &mut String) -> Result<(), String> {
    for (i, v) in a.iter().enumerate() {
        if !(inline && i == 0) {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str("- ");
        match v {
            Value::Object(m) if !m.is_empty() => yaml_map(m, indent + 2, true, out)?,
            Value::Array(inner) if !inner.is_empty() => yaml_list(inner, indent + 2, true, out)?,
            scalar => {
                out.push_str(&yaml_scalar(scalar)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

fn yaml_scalar(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            // JSON prints an integral float64 as an integer.
            Some(f) if f.fract() == 0.0 && f.abs() < 1e18 => (f as i64).to_string(),
            Some(f) => go_float(f),
            None => n.to_string(),
        },
        Value::String(s) => yaml_string(s)?,
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    })
}

fn yaml_string(s: &str) -> Result<String, String> {
    if s.contains('\n') {
        return Err(format!("toYaml: multi-line string {s:?} is not supported"));
    }
    let printable = |c: char| c == ' ' || !(c.is_control() || c == '\u{feff}');
    if !s.chars().all(printable) || yaml11_not_a_string(s) {
        Ok(yaml_double_quoted(s))
    } else if plain_allowed(s) {
        Ok(s.to_string())
    } else {
        Ok(format!("'{}'", s.replace('\'', "''")))
    }
}

/// Whether go-yaml v2 would resolve the plain scalar `s` to a non-string
/// (YAML 1.1: null, bool, int, float, base-60 number, timestamp).
fn yaml11_not_a_string(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "", "~", "null", "Null", "NULL", "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
        "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF",
        ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan",
        ".NaN", ".NAN",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    if !s.starts_with(|c: char| "+-.0123456789".contains(c)) {
        return false;
    }
    let plain = s.replace('_', "");
    let unsigned = plain.trim_start_matches(['+', '-']);
    let all = |t: &str, f: fn(char) -> bool| !t.is_empty() && t.chars().all(f);
    let radix = [
        ("0x", 16),
        ("0X", 16),
        ("0b", 2),
        ("0B", 2),
        ("0o", 8),
        ("0O", 8),
    ]
    .iter()
    .any(|(p, r)| {
        unsigned.strip_prefix(p).is_some_and(|d| {
            all(d, |c| c.is_ascii_hexdigit()) && i64::from_str_radix(d, *r).is_ok()
        })
    });
    let digits = |t: &str| all(t, |c| c.is_ascii_digit());
    // [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    let float = {
        let (mantissa, exp) = match unsigned.find(['e', 'E']) {
            Some(i) => (&unsigned[..i], Some(&unsigned[i + 1..])),
            None => (unsigned, None),
        };
        let mantissa_ok = match mantissa.split_once('.') {
            Some(("", frac)) => digits(frac),
            Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
            None => digits(mantissa),
        };
        mantissa_ok && exp.is_none_or(|e| digits(e.trim_start_matches(['+', '-'])))
    };
    // Base 60: [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?
    let base60 = {
        let (whole, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        let mut parts = whole.split(':');
        let head = parts.next().unwrap_or("");
        let rest: Vec<&str> = parts.collect();
        digits(head)
            && !rest.is_empty()
            && rest
                .iter()
                .all(|p| digits(p) && p.len() <= 2 && p.parse::<u32>().is_ok_and(|n| n < 60))
            && (frac.is_empty() || digits(frac))
    };
    // Timestamps start YYYY-M-D.
    let timestamp = {
        let mut it = s.splitn(3, '-');
        let (y, m, rest) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        let d: String = rest.chars().take_while(char::is_ascii_digit).collect();
        y.len() == 4
            && digits(y)
            && (1..=2).contains(&m.len())
            && digits(m)
            && (1..=2).contains(&d.len())
            && (rest.len() == d.len() || rest[d.len()..].starts_with(['T', 't', ' ']))
    };
    radix || float || base60 || timestamp
}

/// libyaml's test for plain style in block context.
fn plain_allowed(s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    let blank_at = |i: usize| chars.get(i).is_none_or(|c| *c == ' ');
    if s.starts_with("---") || s.starts_with("...") || s.starts_with(' ') || s.ends_with(' ') {
        return false;
    }
    if chars[0] == '-' && blank_at(1) || "?:".contains(chars[0]) && blank_at(1) {
        return false;
    }
    if "#,[]{}&*!|>'\"%@`".contains(chars[0]) {
        return false;
    }
    (1..chars.len()).all(|i| {
        let colon_blank = chars[i] == ':' && blank_at(i + 1);
        let blank_hash = chars[i] == '#' && chars[i - 1] == ' ';
        !colon_blank && !blank_hash
    })
}

fn yaml_double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            '\u{feff}' => out.push_str("\\uFEFF"),
            c if c.is_control() => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Turns every number into a float, as Helm's values loading does.
pub fn numbers_to_float(v: Value) -> Value {
    match v {
        Value::Number(n) => Number::from_f64(n.as_f64().unwrap_or_default())
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_to_float).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, numbers_to_float(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn render(src: &str, data: Value) -> Result<String, String> {
        let mut t = Templates::default();
        t.add_file("t", src)?;
        t.render_file("t", &data)
    }

    #[track_caller]
    fn ok(src: &str, data: Value) -> String {
        render(src, data).unwrap_or_else(|e| panic!("{src:?}: {e}"))
    }

    #[test]
    fn trim_markers_eat_whitespace_on_their_side_only() {
        assert_eq!(ok("a \n {{- \"b\" -}} \n c", json!({})), "abc");
        assert_eq!(ok("a {{ \"b\" -}}\n c", json!({})), "a bc");
        assert_eq!(ok("a\n{{- /* note */}}\nb", json!({})), "a\nb");
        assert_eq!(ok("{{/* c */ -}}\n x", json!({})), "x");
    }

    #[test]
    fn else_if_chains_share_one_end() {
        let src = "{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}";
        assert_eq!(ok(src, json!({"a": true})), "A");
        assert_eq!(ok(src, json!({"b": 1})), "B");
        assert_eq!(ok(src, json!({})), "C");
    }

    #[test]
    fn range_over_a_map_goes_in_key_order_with_key_and_value() {
        let src = "{{ range $k, $v := .m }}{{ $k }}={{ $v }},{{ end }}";
        assert_eq!(ok(src, json!({"m": {"b": 2, "a": 1}})), "a=1,b=2,");
        let src = "{{ range .l }}[{{ . }}]{{ else }}none{{ end }}";
        assert_eq!(ok(src, json!({"l": []})), "none");
    }

    #[test]
    fn with_rebinds_dot_and_dollar_stays_the_root() {
        let src = "{{ with .a }}{{ .b }}-{{ $.c }}{{ end }}";
        assert_eq!(ok(src, json!({"a": {"b": "x"}, "c": "y"})), "x-y");
    }

    #[test]
    fn a_missing_key_prints_nothing_but_a_field_of_nil_fails() {
        assert_eq!(ok("[{{ .nope }}]", json!({})), "[]");
        let err = render("{{ .nope.deeper }}", json!({})).unwrap_err();
        assert!(err.contains("nil pointer evaluating"), "{err}");
    }

    #[test]
    fn unknown_functions_fail_at_parse_time() {
        let err = render("{{ if false }}{{ upper .x }}{{ end }}", json!({})).unwrap_err();
        assert!(err.contains("\"upper\" not defined"), "{err}");
    }

    #[test]
    fn comparing_a_values_number_with_an_int_literal_fails_as_in_helm() {
        let data = numbers_to_float(json!({"port": 6443}));
        let err = render("{{ eq .port 6443 }}", data.clone()).unwrap_err();
        assert!(err.contains("incompatible types"), "{err}");
        assert_eq!(ok("{{ .port }} {{ .port | quote }}", data), "6443 \"6443\"");
    }

    #[test]
    fn floats_print_like_go() {
        assert_eq!(go_float(6443.0), "6443");
        assert_eq!(go_float(0.5), "0.5");
        assert_eq!(go_float(100000.0), "100000");
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(1234567.0), "1.234567e+06");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(0.00001), "1e-05");
    }

    #[test]
    fn variables_can_be_reassigned_and_scoped() {
        let src = "{{ $x := \"a\" }}{{ if true }}{{ $x = \"b\" }}{{ end }}{{ $x }}";
        assert_eq!(ok(src, json!({})), "b");
    }

    #[test]
    fn sprig_string_functions() {
        let src = r#"{{ "abcdef-" | trunc 7 | trimSuffix "-" }} {{ trunc -2 "abc" }} {{ replace "+" "_" "a+b" }} {{ join "," .l }} {{ default "d" "" }} {{ default "d" .x }}"#;
        assert_eq!(
            ok(src, json!({"l": ["a", "b"], "x": "y"})),
            "abcdef bc a_b a,b d y"
        );
        assert_eq!(ok("{{ \"a\\nb\" | nindent 2 }}", json!({})), "\n  a\n  b");
        assert_eq!(ok("{{ quote \"a\\\"b\" }}", json!({})), "\"a\\\"b\"");
    }

    #[test]
    fn include_and_template_render_defines() {
        let src = "{{ define \"x\" }}<{{ . }}>{{ end }}{{ include \"x\" 1 | quote }}{{ template \"x\" 2 }}";
        assert_eq!(ok(src, json!({})), "\"<1>\"<2>");
    }

    #[test]
    fn and_or_stop_at_the_deciding_operand() {
        assert_eq!(
            ok("{{ and .a .a.b }}", json!({})),
            "<no value>".replace("<no value>", "")
        );
        assert_eq!(ok("{{ or .x \"fallback\" }}", json!({})), "fallback");
    }

    #[test]
    fn required_fails_with_its_message() {
        let err = render("{{ required \"need x\" .x }}", json!({})).unwrap_err();
        assert!(err.contains("need x"), "{err}");
    }

    /// The expected text is what Helm 4.2.3's `toYaml` printed for the same map.
    #[test]
    fn to_yaml_quotes_strings_as_go_yaml_does() {
        let data = json!({"v": {
            "t": "true", "y": "yes", "n": "123", "e": "", "f": "1.5e3", "h": "0x1F",
            "d": "2001-12-14", "b60": "1:20", "colon": "a: b", "dash": "- x", "star": "*x",
            "hash": "a #b", "plain": "kubernetes.io/os", "flag": "--x=1", "q": "it's: x",
            "cpu": "100m", "ver": "v1.2.3", "ip": "10.0.0.1", "dot": "1.2.3", "tab": "a\tb",
            "u": "ünï", "end:": "x:", "qm": "?x", "q2": "? x", "neg": "-1", "und": "1_000",
            "oct": "0o17", "bin": "0b101", "e1": "1e5", "dotnum": ".5", "ver2": "1.2", "sp": " a",
        }});
        let want = [
            r#"b60: "1:20""#,
            r#"bin: "0b101""#,
            r#"colon: 'a: b'"#,
            r#"cpu: 100m"#,
            r#"d: "2001-12-14""#,
            r#"dash: '- x'"#,
            r#"dot: 1.2.3"#,
            r#"dotnum: ".5""#,
            r#"e: """#,
            r#"e1: "1e5""#,
            r#"'end:': 'x:'"#,
            r#"f: "1.5e3""#,
            r#"flag: --x=1"#,
            r#"h: "0x1F""#,
            r#"hash: 'a #b'"#,
            r#"ip: 10.0.0.1"#,
            r#""n": "123""#,
            r#"neg: "-1""#,
            r#"oct: "0o17""#,
            r#"plain: kubernetes.io/os"#,
            r#"q: 'it''s: x'"#,
            r#"q2: '? x'"#,
            r#"qm: ?x"#,
            r#"sp: ' a'"#,
            r#"star: '*x'"#,
            r#"t: "true""#,
            r#"tab: "a\tb""#,
            r#"u: ünï"#,
            r#"und: "1_000""#,
            r#"ver: v1.2.3"#,
            r#"ver2: "1.2""#,
            r#""y": "yes""#,
        ];
        assert_eq!(ok("{{ toYaml .v }}", data), want.join("\n"));
    }

    #[test]
    fn to_yaml_nests_maps_and_lists_like_go_yaml() {
        let data = numbers_to_float(json!({"v": {
            "l": [{"a": 1, "b": [1, 2]}, [3, 4]], "m": {"x": {}}, "z": [],
            "f": 2.5, "g": 0.00001, "big": 12345678,
        }}));
        assert_eq!(
            ok("{{ toYaml .v }}", data),
            "big: 12345678\nf: 2.5\ng: 1e-05\nl:\n- a: 1\n  b:\n  - 1\n  - 2\n- - 3\n  - 4\nm:\n  x: {}\nz: []"
        );
    }

    #[test]
    fn to_yaml_sorts_keys_and_prints_integral_floats_as_integers() {
        let data = numbers_to_float(json!({"v": {"b": [1, "x"], "a": 2.5, "c": 3}}));
        assert_eq!(ok("{{ toYaml .v }}", data), "a: 2.5\nb:\n- 1\n- x\nc: 3");
    }
}
