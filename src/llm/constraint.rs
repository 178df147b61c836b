//! Constrained decoding of a tool call: a small automaton over characters, built from the
//! offered tools, that accepts exactly
//! `<tool_call>{"name": "NAME", "arguments": {ARGS}}` where NAME is one of the offered names and
//! ARGS follow that tool's JSON schema (strings, integers, numbers, enums, booleans, nested
//! objects and arrays of those). A decoder masks every token whose text would leave the
//! automaton, so even a small model can only write a valid call.
//!
//! The automaton is a Pike VM program: [`ToolGrammar::start`] gives the set of live threads,
//! [`ToolGrammar::advance`] feeds characters, and a state [`is complete`](ToolGrammar::is_complete)
//! once the closing brace is written (nothing may follow it).

use serde_json::Value;

/// What starts a tool call in the local model's reply.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";

/// Integer ranges up to this many values are spelled out as choices, so that only in-range
/// values can be written; wider ranges accept any integer of up to [`MAX_DIGITS`] digits.
const MAX_SPELLED_RANGE: i64 = 256;
/// Most digits of an integer, or of either part of a number.
const MAX_DIGITS: usize = 9;
/// Nesting of objects and arrays the grammar follows; deeper schemas accept only `null`.
const MAX_DEPTH: usize = 4;
/// Most words in a string argument copied from the request.
const MAX_SPAN_WORDS: usize = 8;

/// How string arguments may be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringRule {
    /// Any string of up to this many characters (no escapes).
    Free {
        /// The most characters allowed.
        max_chars: usize,
    },
    /// A run of 1 to 8 consecutive words of this text (the user's request), punctuation at
    /// word edges dropped: a small model then cannot invent a title or a name.
    SpansOf(String),
}

/// The word runs of `text` that [`StringRule::SpansOf`] allows.
pub fn word_spans(text: &str) -> Vec<String> {
    let words: Vec<&str> = text
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| c.is_ascii_punctuation() && c != '\''))
        .filter(|w| !w.is_empty() && !w.contains(['"', '\\']))
        .collect();
    let mut spans = Vec::new();
    for start in 0..words.len() {
        for end in start + 1..=(start + MAX_SPAN_WORDS).min(words.len()) {
            spans.push(words[start..end].join(" "));
        }
    }
    spans.sort();
    spans.dedup();
    spans
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Inst {
    /// This character.
    Char(char),
    /// A character of a JSON string without escapes: not `"`, `\`, a control character or
    /// U+FFFD (a token holding part of a UTF-8 sequence).
    StrChar,
    /// An ASCII digit.
    Digit,
    /// Continue at both.
    Split(usize, usize),
    /// Continue there.
    Jmp(usize),
    /// The whole call is written.
    Match,
}

/// The automaton for one set of tools.
#[derive(Debug, Clone)]
pub struct ToolGrammar {
    program: Vec<Inst>,
    /// The offered tool names, in order.
    names: Vec<String>,
}

/// Live threads: sorted program counters, each at a character-consuming instruction or `Match`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrammarState(Vec<usize>);

impl GrammarState {
    /// True when no thread is left: the text so far cannot become a valid call.
    pub fn is_dead(&self) -> bool {
        self.0.is_empty()
    }
}

struct Compiler {
    program: Vec<Inst>,
    strings: StringRule,
}

/// One alternative of a choice: compiles itself into the program.
type Branch<'a> = Box<dyn FnOnce(&mut Compiler) + 'a>;

impl Compiler {
    fn emit(&mut self, inst: Inst) -> usize {
        self.program.push(inst);
        self.program.len() - 1
    }

    fn literal(&mut self, text: &str) {
        for c in text.chars() {
            self.emit(Inst::Char(c));
        }
    }

    /// One of `alternatives`, each compiled by its closure; all continue after the last.
    fn choice(&mut self, alternatives: Vec<Branch<'_>>) {
        let n = alternatives.len();
        let mut jumps = Vec::new();
        for (i, alternative) in alternatives.into_iter().enumerate() {
            if i + 1 < n {
                let split = self.emit(Inst::Split(0, 0));
                alternative(self);
                jumps.push(self.emit(Inst::Jmp(0)));
                let next = self.program.len();
                self.program[split] = Inst::Split(split + 1, next);
            } else {
                alternative(self);
            }
        }
        let end = self.program.len();
        for j in jumps {
            self.program[j] = Inst::Jmp(end);
        }
    }

    /// Between `min` and `max` digits.
    fn digits(&mut self, min: usize, max: usize) {
        self.repeat(Inst::Digit, min, max);
    }

    /// `inst` between `min` and `max` times.
    fn repeat(&mut self, inst: Inst, min: usize, max: usize) {
        for _ in 0..min {
            self.emit(inst);
        }
        let mut splits = Vec::new();
        for _ in min..max {
            splits.push(self.emit(Inst::Split(0, 0)));
            self.emit(inst);
        }
        let end = self.program.len();
        for s in splits {
            self.program[s] = Inst::Split(s + 1, end);
        }
    }

    /// One of `options` (distinct strings), compiled as a trie so that options sharing a prefix
    /// share its threads.
    fn one_of(&mut self, options: &[String]) {
        let mut ends = false;
        let mut groups: std::collections::BTreeMap<char, Vec<String>> = Default::default();
        for option in options {
            let mut chars = option.chars();
            match chars.next() {
                None => ends = true,
                Some(c) => groups
                    .entry(c)
                    .or_default()
                    .push(chars.as_str().to_string()),
            }
        }
        let mut branches: Vec<Branch> = groups
            .into_iter()
            .map(|(c, rest)| {
                Box::new(move |s: &mut Self| {
                    s.emit(Inst::Char(c));
                    s.one_of(&rest);
                }) as Branch
            })
            .collect();
        if ends {
            branches.push(Box::new(|_: &mut Self| {}));
        }
        self.choice(branches);
    }

    /// A JSON string argument, as the [`StringRule`] says.
    fn string(&mut self) {
        self.emit(Inst::Char('"'));
        match self.strings.clone() {
            StringRule::Free { max_chars } => self.repeat(Inst::StrChar, 0, max_chars),
            StringRule::SpansOf(text) => {
                let spans = word_spans(&text);
                if spans.is_empty() {
                    self.repeat(Inst::StrChar, 0, 0);
                } else {
                    self.one_of(&spans);
                }
            }
        }
        self.emit(Inst::Char('"'));
    }

    fn json_string_literal(&mut self, text: &str) {
        self.literal(&Value::String(text.to_string()).to_string());
    }

    /// A value matching `schema`.
    fn value(&mut self, schema: &Value, depth: usize) {
        if depth > MAX_DEPTH {
            self.literal("null");
            return;
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            let mut literals: Vec<String> = values.iter().map(Value::to_string).collect();
            literals.sort();
            literals.dedup();
            if !literals.is_empty() {
                self.one_of(&literals);
                return;
            }
        }
        if let Some(constant) = schema.get("const") {
            self.literal(&constant.to_string());
            return;
        }
        // `anyOf`/`oneOf` (schemars writes `Option<T>` this way in some versions): the first
        // branch that is not `null`.
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = schema.get(key).and_then(Value::as_array) {
                let branch = branches
                    .iter()
                    .find(|b| b.get("type").and_then(Value::as_str) != Some("null"))
                    .or(branches.first());
                if let Some(branch) = branch {
                    self.value(branch, depth + 1);
                    return;
                }
            }
        }
        match schema_type(schema) {
            Some("string") => self.string(),
            Some("integer") => self.integer(schema),
            Some("number") => {
                self.choice(vec![
                    Box::new(|c: &mut Self| c.literal("-")),
                    Box::new(|_: &mut Self| {}),
                ]);
                self.digits(1, MAX_DIGITS);
                self.choice(vec![
                    Box::new(|c: &mut Self| {
                        c.literal(".");
                        c.digits(1, MAX_DIGITS);
                    }),
                    Box::new(|_: &mut Self| {}),
                ]);
            }
            Some("boolean") => self.choice(vec![
                Box::new(|c: &mut Self| c.literal("true")),
                Box::new(|c: &mut Self| c.literal("false")),
            ]),
            Some("null") => self.literal("null"),
            Some("array") => {
                let items = schema.get("items").cloned().unwrap_or(Value::Null);
                self.literal("[");
                self.choice(vec![
                    Box::new(move |c: &mut Self| {
                        c.value(&items, depth + 1);
                        let split = c.emit(Inst::Split(0, 0));
                        c.literal(", ");
                        c.value(&items, depth + 1);
                        c.emit(Inst::Jmp(split));
                        let end = c.program.len();
                        c.program[split] = Inst::Split(split + 1, end);
                    }),
                    Box::new(|_: &mut Self| {}),
                ]);
                self.literal("]");
            }
            Some("object") => self.object(schema, depth),
            // No usable type: a string.
            _ => self.string(),
        }
    }

    fn integer(&mut self, schema: &Value) {
        let min = schema.get("minimum").and_then(Value::as_i64);
        let max = schema.get("maximum").and_then(Value::as_i64);
        if let (Some(min), Some(max)) = (min, max)
            && min <= max
            && max - min < MAX_SPELLED_RANGE
        {
            let values: Vec<String> = (min..=max).map(|v| v.to_string()).collect();
            self.one_of(&values);
            return;
        }
        if min.is_none_or(|m| m < 0) {
            self.choice(vec![
                Box::new(|c: &mut Self| c.literal("-")),
                Box::new(|_: &mut Self| {}),
            ]);
        }
        self.digits(1, MAX_DIGITS);
    }

    /// `{"a": A, "b": B}`: required properties always, then each optional one may be written
    /// or left out; both in the order of the schema's `properties` map as parsed (serde_json
    /// keeps keys sorted).
    fn object(&mut self, schema: &Value, depth: usize) {
        let properties: Vec<(String, Value)> = schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let (mandatory, optional): (Vec<_>, Vec<_>) = properties
            .into_iter()
            .partition(|(k, _)| required.contains(&k.as_str()));
        self.literal("{");
        let mut first = true;
        for (key, value) in &mandatory {
            if !first {
                self.literal(", ");
            }
            first = false;
            self.json_string_literal(key);
            self.literal(": ");
            self.value(value, depth + 1);
        }
        self.optional_properties(&optional, first, depth);
        self.literal("}");
    }

    /// The optional properties from the first, each written or left out. `first` says whether
    /// nothing was written yet (no comma before the next one). With `n` optional properties
    /// this is at most `2n` copies of the tail, not `2^n`: once one is written, the rest follow
    /// commas.
    fn optional_properties(&mut self, optional: &[(String, Value)], first: bool, depth: usize) {
        let Some(((key, value), rest)) = optional.split_first() else {
            return;
        };
        let (key, value) = (key.clone(), value.clone());
        self.choice(vec![
            Box::new(move |c: &mut Self| {
                if !first {
                    c.literal(", ");
                }
                c.json_string_literal(&key);
                c.literal(": ");
                c.value(&value, depth + 1);
                c.optional_properties(rest, false, depth);
            }),
            Box::new(move |c: &mut Self| c.optional_properties(rest, first, depth)),
        ]);
    }
}

/// The `type` of a schema; for a list such as `["string", "null"]` the first that is not null.
fn schema_type(schema: &Value) -> Option<&str> {
    match schema.get("type")? {
        Value::String(t) => Some(t),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or(Some("null")),
        _ => None,
    }
}

impl ToolGrammar {
    /// The grammar for OpenAI-style function tools (`{"type": "function", "function": {"name",
    /// "parameters"}}`), string arguments as `strings` says. Returns `None` when no tool has a
    /// name.
    pub fn new(tools: &[Value], strings: StringRule) -> Option<Self> {
        Self::with_opening(tools, strings, TOOL_CALL_OPEN)
    }

    /// As [`Self::new`], with `opening` instead of [`TOOL_CALL_OPEN`] before the JSON object
    /// (Qwen writes `<tool_call>` and a line break).
    pub fn with_opening(tools: &[Value], strings: StringRule, opening: &str) -> Option<Self> {
        let mut tools_by_name: Vec<(String, Value)> = Vec::new();
        for tool in tools {
            let function = tool.get("function").unwrap_or(tool);
            let Some(name) = function.get("name").and_then(Value::as_str) else {
                continue;
            };
            let parameters = function
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            tools_by_name.push((name.to_string(), parameters));
        }
        if tools_by_name.is_empty() {
            return None;
        }
        let names = tools_by_name.iter().map(|(n, _)| n.clone()).collect();
        let mut c = Compiler {
            program: Vec::new(),
            strings,
        };
        c.literal(opening);
        c.literal("{\"name\": ");
        c.choice(
            tools_by_name
                .into_iter()
                .map(|(name, parameters)| {
                    Box::new(move |c: &mut Compiler| {
                        c.json_string_literal(&name);
                        c.literal(", \"arguments\": ");
                        let mut parameters = parameters;
                        if schema_type(&parameters) != Some("object") {
                            parameters = serde_json::json!({"type": "object"});
                        }
                        c.object(&parameters, 0);
                    }) as Branch
                })
                .collect(),
        );
        c.literal("}");
        c.emit(Inst::Match);
        Some(Self {
            program: c.program,
            names,
        })
    }

    /// The offered tool names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Adds `pc` and what it reaches without consuming a character.
    /// `seen` lists the instructions visited (few: a list beats a bitmap the size of the
    /// program, which the token mask would allocate hundreds of thousands of times a token).
    fn add(&self, pc: usize, out: &mut Vec<usize>, seen: &mut Vec<usize>) {
        if seen.contains(&pc) {
            return;
        }
        seen.push(pc);
        match self.program[pc] {
            Inst::Split(a, b) => {
                self.add(a, out, seen);
                self.add(b, out, seen);
            }
            Inst::Jmp(a) => self.add(a, out, seen),
            _ => out.push(pc),
        }
    }

    /// Before the first character.
    pub fn start(&self) -> GrammarState {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        self.add(0, &mut out, &mut seen);
        out.sort_unstable();
        GrammarState(out)
    }

    /// After `c`; a dead state if `c` cannot follow.
    pub fn advance(&self, state: &GrammarState, c: char) -> GrammarState {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for &pc in &state.0 {
            let ok = match self.program[pc] {
                Inst::Char(x) => x == c,
                Inst::StrChar => c != '"' && c != '\\' && !c.is_control() && c != '\u{FFFD}',
                Inst::Digit => c.is_ascii_digit(),
                _ => false,
            };
            if ok {
                self.add(pc + 1, &mut out, &mut seen);
            }
        }
        out.sort_unstable();
        GrammarState(out)
    }

    /// After all of `text`; `None` as soon as a character cannot follow.
    pub fn advance_str(&self, state: &GrammarState, text: &str) -> Option<GrammarState> {
        let mut state = state.clone();
        for c in text.chars() {
            state = self.advance(&state, c);
            if state.is_dead() {
                return None;
            }
        }
        Some(state)
    }

    /// True when the call is complete: the only live thread is the end.
    pub fn is_complete(&self, state: &GrammarState) -> bool {
        !state.0.is_empty() && state.0.iter().all(|&pc| self.program[pc] == Inst::Match)
    }

    /// True when `text` is a whole valid call.
    pub fn accepts(&self, text: &str) -> bool {
        self.advance_str(&self.start(), text)
            .is_some_and(|s| self.is_complete(&s))
    }

    /// The text every valid call must continue with from `state`: characters while exactly one
    /// may come next, up to the end of the call. Empty when the next character is a choice.
    pub fn forced_text(&self, state: &GrammarState) -> String {
        let mut text = String::new();
        let mut state = state.clone();
        while !self.is_complete(&state) {
            match self.next_chars(&state).as_deref() {
                Some(&[c]) => {
                    state = self.advance(&state, c);
                    if state.is_dead() {
                        break;
                    }
                    text.push(c);
                }
                _ => break,
            }
        }
        text
    }

    /// The same language from `state` on, written as a GBNF grammar (llama.cpp's
    /// `grammars/README.md`: `root ::= ...`, string literals, character classes, `|` with an
    /// empty alternative), so that llama.cpp's sampler can enforce it: one rule `pN` per
    /// instruction that something jumps to, each a run of literal characters, string
    /// characters and digits followed by its continuation.
    pub fn gbnf(&self, state: &GrammarState) -> String {
        let mut targets = vec![false; self.program.len()];
        for inst in &self.program {
            match *inst {
                Inst::Split(a, b) => {
                    targets[a] = true;
                    targets[b] = true;
                }
                Inst::Jmp(a) => targets[a] = true,
                _ => {}
            }
        }
        let mut todo: Vec<usize> = Vec::new();
        let reference = |pc: usize, todo: &mut Vec<usize>| -> String {
            if self.program[pc] == Inst::Match {
                String::new()
            } else {
                todo.push(pc);
                format!("p{pc}")
            }
        };
        let roots: Vec<String> = state.0.iter().map(|&pc| reference(pc, &mut todo)).collect();
        let mut out = format!("root ::= {}\n", alternatives(&roots));
        let mut written = vec![false; self.program.len()];
        while let Some(entry) = todo.pop() {
            if std::mem::replace(&mut written[entry], true) {
                continue;
            }
            let mut body: Vec<String> = Vec::new();
            let mut literal = String::new();
            let mut pc = entry;
            let flush = |literal: &mut String, body: &mut Vec<String>| {
                if !literal.is_empty() {
                    body.push(gbnf_literal(literal));
                    literal.clear();
                }
            };
            loop {
                if pc != entry && targets[pc] {
                    flush(&mut literal, &mut body);
                    body.push(reference(pc, &mut todo));
                    break;
                }
                match self.program[pc] {
                    Inst::Char(c) => literal.push(c),
                    Inst::StrChar => {
                        flush(&mut literal, &mut body);
                        body.push(r#"[^"\\\x00-\x1F\x7F-\x9F\uFFFD]"#.into());
                    }
                    Inst::Digit => {
                        flush(&mut literal, &mut body);
                        body.push("[0-9]".into());
                    }
                    Inst::Split(a, b) => {
                        flush(&mut literal, &mut body);
                        let pair = [reference(a, &mut todo), reference(b, &mut todo)];
                        body.push(format!("({})", alternatives(&pair)));
                        break;
                    }
                    Inst::Jmp(a) => {
                        flush(&mut literal, &mut body);
                        body.push(reference(a, &mut todo));
                        break;
                    }
                    Inst::Match => {
                        flush(&mut literal, &mut body);
                        break;
                    }
                }
                pc += 1;
            }
            body.retain(|b| !b.is_empty());
            if body.is_empty() {
                body.push("\"\"".into());
            }
            out.push_str(&format!("p{entry} ::= {}\n", body.join(" ")));
        }
        out
    }

    /// The characters that may come next in `state` (for a fast first-character filter);
    /// `None` when any string character may.
    pub fn next_chars(&self, state: &GrammarState) -> Option<Vec<char>> {
        let mut chars = Vec::new();
        for &pc in &state.0 {
            match self.program[pc] {
                Inst::Char(c) => chars.push(c),
                Inst::Digit => chars.extend('0'..='9'),
                Inst::StrChar => return None,
                _ => {}
            }
        }
        chars.sort_unstable();
        chars.dedup();
        Some(chars)
    }
}

/// `options` as a GBNF alternation; an empty option is GBNF's empty alternative.
fn alternatives(options: &[String]) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for option in options {
        if !unique.contains(&option.as_str()) {
            unique.push(option);
        }
    }
    if unique.len() == 1 && !unique[0].is_empty() {
        return unique[0].to_string();
    }
    unique.join(" | ")
}

/// `text` as a GBNF string literal (`"..."` with `\"`, `\\` and `\xHH` escapes).
fn gbnf_literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn free() -> StringRule {
        StringRule::Free { max_chars: 40 }
    }

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "musicPlayer", "parameters": {
                "type": "object",
                "properties": {"query": {"type": ["string", "null"]}}
            }}}),
            json!({"type": "function", "function": {"name": "set_volume", "parameters": {
                "type": "object",
                "properties": {"volume": {"type": "integer", "minimum": 1, "maximum": 100}},
                "required": ["volume"]
            }}}),
            json!({"type": "function", "function": {"name": "mixed", "parameters": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["fast", "slow"]},
                    "loud": {"type": "boolean"},
                    "gain": {"type": "number"},
                    "count": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["mode", "loud"]
            }}}),
        ]
    }

    #[test]
    fn gbnf_defines_every_rule_it_references_once() {
        let g = ToolGrammar::with_opening(&tools(), free(), "<tool_call>\n").unwrap();
        let state = g.advance_str(&g.start(), "<tool_call>\n").unwrap();
        let text = g.gbnf(&state);
        assert!(text.starts_with("root ::= "), "{text}");
        let defined: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once(" ::= ").map(|(name, _)| name))
            .collect();
        let mut unique = defined.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), defined.len(), "a rule defined twice");
        for line in text.lines() {
            let (_, body) = line.split_once(" ::= ").unwrap();
            // Names outside literals and classes: strip those first.
            let mut names = String::new();
            let (mut in_literal, mut in_class, mut escaped) = (false, false, false);
            for c in body.chars() {
                if escaped {
                    escaped = false;
                    continue;
                }
                match c {
                    '\\' if in_literal || in_class => escaped = true,
                    '"' if !in_class => in_literal = !in_literal,
                    '[' if !in_literal => in_class = true,
                    ']' if in_class => in_class = false,
                    c if !in_literal && !in_class => names.push(c),
                    _ => {}
                }
            }
            for name in names.split(|c: char| !c.is_ascii_alphanumeric()) {
                if name.starts_with('p') && name.len() > 1 {
                    assert!(defined.contains(&name), "{name} is not defined in {text}");
                }
            }
        }
        // The names and the fixed text are literals; string characters a class.
        assert!(text.contains(r#""{\"name\": ""#), "{text}");
        assert!(text.contains("[0-9]"));
        assert!(text.contains(r#"[^"\\\x00-\x1F\x7F-\x9F\uFFFD]"#));
    }

    #[test]
    fn accepts_valid_calls_only() {
        let g = ToolGrammar::new(&tools(), free()).unwrap();
        let call = |body: &str| format!("{TOOL_CALL_OPEN}{body}");
        for ok in [
            r#"{"name": "musicPlayer", "arguments": {}}"#,
            r#"{"name": "musicPlayer", "arguments": {"query": "just over the horizon"}}"#,
            r#"{"name": "set_volume", "arguments": {"volume": 1}}"#,
            r#"{"name": "set_volume", "arguments": {"volume": 100}}"#,
            r#"{"name": "mixed", "arguments": {"loud": true, "mode": "fast"}}"#,
            r#"{"name": "mixed", "arguments": {"loud": false, "mode": "slow", "count": 42, "gain": -1.5}}"#,
            r#"{"name": "mixed", "arguments": {"loud": false, "mode": "slow", "count": 7, "tags": ["a", "b c"]}}"#,
            r#"{"name": "mixed", "arguments": {"loud": false, "mode": "slow", "tags": []}}"#,
        ] {
            assert!(g.accepts(&call(ok)), "should accept {ok}");
            // Every serialised call parses as JSON with the offered name.
            let v: Value = serde_json::from_str(ok).unwrap();
            assert!(g.names().contains(&v["name"].as_str().unwrap().to_string()));
        }
        for bad in [
            r#"{"name": "rm_rf", "arguments": {}}"#,
            r#"{"name": "set_volume", "arguments": {}}"#,
            r#"{"name": "set_volume", "arguments": {"volume": 0}}"#,
            r#"{"name": "set_volume", "arguments": {"volume": 101}}"#,
            r#"{"name": "set_volume", "arguments": {"volume": "10"}}"#,
            r#"{"name": "mixed", "arguments": {"loud": true, "mode": "medium"}}"#,
            r#"{"name": "mixed", "arguments": {"loud": 1, "mode": "fast"}}"#,
            r#"{"name": "mixed", "arguments": {"mode": "fast", "loud": true}}"#,
            r#"{"name": "mixed", "arguments": {"loud": true, "mode": "fast", "count": 1.5}}"#,
            r#"{"name": "musicPlayer", "arguments": {"query": "a"b"}}"#,
            r#"{"name": "musicPlayer", "arguments": {}} trailing"#,
        ] {
            assert!(!g.accepts(&call(bad)), "should reject {bad}");
        }
        // Text that is not a call dies at its first character.
        assert!(g.advance_str(&g.start(), "Hello").is_none());
    }

    #[test]
    fn completion_is_only_at_the_end() {
        let g = ToolGrammar::new(&tools(), free()).unwrap();
        let prefix =
            format!(r#"{TOOL_CALL_OPEN}{{"name": "set_volume", "arguments": {{"volume": 5"#);
        let s = g.advance_str(&g.start(), &prefix).unwrap();
        assert!(!g.is_complete(&s));
        // "5" may go on to "50" or close.
        let next = g.next_chars(&s).unwrap();
        assert!(next.contains(&'0') && next.contains(&'}'));
        let s = g.advance_str(&s, "}}").unwrap();
        assert!(g.is_complete(&s));
        assert!(g.advance_str(&s, " ").is_none());
    }

    #[test]
    fn no_named_tools_no_grammar() {
        assert!(ToolGrammar::new(&[], free()).is_none());
        assert!(ToolGrammar::new(&[json!({"type": "function", "function": {}})], free()).is_none());
    }

    #[test]
    fn strings_are_capped_or_copied_from_the_request() {
        let call = |q: &str| {
            format!(r#"{TOOL_CALL_OPEN}{{"name": "musicPlayer", "arguments": {{"query": "{q}"}}}}"#)
        };
        let g = ToolGrammar::new(&tools(), StringRule::Free { max_chars: 5 }).unwrap();
        assert!(g.accepts(&call("abcde")));
        assert!(!g.accepts(&call("abcdef")));
        let g = ToolGrammar::new(
            &tools(),
            StringRule::SpansOf("Play the song \"just over\" the horizon, please!".into()),
        )
        .unwrap();
        for ok in [
            "horizon",
            "just over the horizon",
            "Play the song",
            "please",
        ] {
            assert!(g.accepts(&call(ok)), "{ok}");
        }
        for bad in ["", "horizon,", "please the", "Queen", "song the", "play"] {
            assert!(!g.accepts(&call(bad)), "{bad}");
        }
        assert_eq!(word_spans("a b"), vec!["a", "a b", "b"]);
    }
}
