//! Chat templates: a model's Jinja template rendered the way HF `transformers` renders it
//! (`apply_chat_template(tokenize=False)`), with minijinja.
//!
//! HF runs templates in a Jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
//! extension, a `tojson` filter that is Python's `json.dumps(ensure_ascii=False)`, and the globals
//! `raise_exception` and `strftime_now`; templates also call Python `str`/`dict` methods. This module gives
//! minijinja the same: `pycompat` methods (plus `rsplit`), our own `tojson`, and a formatter that prints values
//! as Python's `str()` does (`True`, `None`, `1.0`). Templates are parity-tested against transformers
//! (tests/fixtures/chat/template_goldens.json).
//!
//! Owns finding a model's template (tokenizer_config.json, chat_template.jinja, GGUF metadata) and rendering it.
//! It must not know the OpenAI wire types: the server hands in messages as JSON values, already in HF's shape.

use std::path::Path;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use moestream_format::TensorIndex;
use moestream_format::gguf::{GgufFile, GgufValue};
use serde_json::{Map, Value as Json};

use crate::ChatError;

const NAME: &str = "chat_template";
/// Context names the renderer sets itself; `extra` may not override them.
const RESERVED: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// What a template renders: HF's `apply_chat_template` arguments.
#[derive(Debug, Clone, Copy)]
pub struct TemplateInput<'a> {
    /// An array of messages: `{"role", "content", "tool_calls"?, "reasoning_content"?, "tool_call_id"?, …}`,
    /// passed through unchanged (tool-call `arguments` may be a JSON string or an object; templates decide).
    pub messages: &'a Json,
    /// The tools list (OpenAI `tools`), or `None`, which templates see as `none` (as HF passes `tools=None`).
    pub tools: Option<&'a Json>,
    pub add_generation_prompt: bool,
    /// Further template variables (`enable_thinking`, any `chat_template_kwargs`); they may override
    /// `bos_token`/`eos_token`, as HF's keyword arguments do, but not the three above.
    pub extra: &'a Map<String, Json>,
}

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error `raise_exception` raises, found again in the error's source chain after rendering.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compile `source`. `bos_token`/`eos_token` are the strings templates see as `bos_token`/`eos_token`
    /// (absent tokens are undefined, as in HF).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // HF: jinja2 ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loopcontrols).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::TemplateSyntax(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(python_method);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
        });
        env.add_function("strftime_now", |fmt: String| -> Value {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            Value::from(strftime(&fmt, secs))
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| ChatError::TemplateSyntax(describe(&e)))?;
        Ok(ChatTemplate { env, bos_token: bos_token.map(str::to_string), eos_token: eos_token.map(str::to_string) })
    }

    /// The template of a tokenizer_config.json's text: `chat_template` as a string, or the one named "default"
    /// in a list of `{name, template}`. `Ok(None)` when it has none. `origin` names the file in errors.
    pub fn from_tokenizer_config(text: &str, origin: &str) -> Result<Option<Self>, ChatError> {
        let err = |msg: String| ChatError::TemplateLoad { path: origin.to_string(), msg };
        let cfg: Json = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let Some(source) = config_template(&cfg).map_err(err)? else { return Ok(None) };
        let (bos, eos) = (token_text(&cfg["bos_token"]), token_text(&cfg["eos_token"]));
        Self::new(&source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// The template of a model directory, as transformers finds it: `chat_template.jinja` if present, else
    /// `chat_template.json` (`{"chat_template": …}`), else tokenizer_config.json's `chat_template`. Special
    /// tokens come from tokenizer_config.json. `Ok(None)` when the directory has no template.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let read = |name: &str| -> Result<Option<String>, ChatError> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ChatError::TemplateLoad { path: p.display().to_string(), msg: e.to_string() }),
            }
        };
        let config_path = dir.join("tokenizer_config.json").display().to_string();
        let cfg: Json = match read("tokenizer_config.json")? {
            Some(t) => serde_json::from_str(&t)
                .map_err(|e| ChatError::TemplateLoad { path: config_path.clone(), msg: format!("not JSON: {e}") })?,
            None => Json::Null,
        };
        let source = if let Some(s) = read("chat_template.jinja")? {
            Some(s)
        } else if let Some(t) = read("chat_template.json")? {
            let path = dir.join("chat_template.json").display().to_string();
            let v: Json = serde_json::from_str(&t)
                .map_err(|e| ChatError::TemplateLoad { path: path.clone(), msg: format!("not JSON: {e}") })?;
            config_template(&v).map_err(|msg| ChatError::TemplateLoad { path, msg })?
        } else {
            config_template(&cfg).map_err(|msg| ChatError::TemplateLoad { path: config_path, msg })?
        };
        let Some(source) = source else { return Ok(None) };
        let (bos, eos) = (token_text(&cfg["bos_token"]), token_text(&cfg["eos_token"]));
        Self::new(&source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// The model's template: GGUF `tokenizer.chat_template` (with BOS/EOS from the token ids), or the
    /// directory's ([`ChatTemplate::from_dir`]). `Ok(None)` when the model ships none.
    pub fn from_index(index: &TensorIndex) -> Result<Option<Self>, ChatError> {
        match &index.gguf {
            Some(g) => Self::from_gguf(g),
            None => Self::from_dir(&index.root),
        }
    }

    fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ChatError> {
        let Some(v) = g.get("tokenizer.chat_template") else { return Ok(None) };
        let GgufValue::String(source) = v else {
            return Err(ChatError::TemplateLoad {
                path: g.path.display().to_string(),
                msg: "tokenizer.chat_template is not a string".into(),
            });
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens").ok();
        let token = |key: &str| -> Option<String> {
            let id = g.get(key)?.as_integer()?;
            tokens?.get(usize::try_from(id).ok()?).cloned()
        };
        let (bos, eos) = (token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"));
        Self::new(source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// Render the conversation to the prompt text.
    pub fn render(&self, input: &TemplateInput<'_>) -> Result<String, ChatError> {
        if !input.messages.is_array() {
            return Err(ChatError::TemplateInput("messages must be an array".into()));
        }
        if let Some(k) = RESERVED.iter().find(|k| input.extra.contains_key(**k)) {
            return Err(ChatError::TemplateInput(format!("`{k}` cannot be passed as a template variable")));
        }
        let mut ctx = std::collections::BTreeMap::<String, Value>::new();
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::from(e.as_str()));
        }
        for (k, v) in input.extra {
            ctx.insert(k.clone(), json_value(v));
        }
        ctx.insert("messages".into(), json_value(input.messages));
        ctx.insert("tools".into(), input.tools.map_or(Value::from(()), json_value));
        ctx.insert("add_generation_prompt".into(), Value::from(input.add_generation_prompt));
        let tmpl = self.env.get_template(NAME).map_err(|e| ChatError::TemplateRender(describe(&e)))?;
        tmpl.render(ctx).map_err(|e| match raised(&e) {
            Some(msg) => ChatError::TemplateRejected(msg),
            None => ChatError::TemplateRender(describe(&e)),
        })
    }
}

/// Messages as text-only chat templates (Qwen's among them) need them: `content` always a string. OpenAI
/// clients send `"content": null` beside `tool_calls`, and content as a list of parts; transformers renders
/// neither with Qwen3's template (it fails on both). `null` or a missing content becomes `""`; text parts are
/// joined with `\n` (as vLLM does for string-content templates); any other part is an error naming its type.
pub fn text_only_messages(messages: &Json) -> Result<Json, ChatError> {
    let list = messages.as_array().ok_or_else(|| ChatError::TemplateInput("messages must be an array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Json::Object(obj) = m else {
            return Err(ChatError::TemplateInput(format!("message {i} is not an object")));
        };
        let mut obj = obj.clone();
        let text = match obj.get("content") {
            None | Some(Json::Null) => String::new(),
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for p in parts {
                    match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => texts.push(t),
                        (ty, _) => {
                            let ty = ty.unwrap_or("untyped");
                            return Err(ChatError::TemplateInput(format!(
                                "message {i}: content part of type `{ty}` is not supported (text only)"
                            )));
                        }
                    }
                }
                texts.join("\n")
            }
            Some(other) => {
                return Err(ChatError::TemplateInput(format!("message {i}: content must be a string, not {other}")));
            }
        };
        obj.insert("content".into(), Json::String(text));
        out.push(Json::Object(obj));
    }
    Ok(Json::Array(out))
}

fn json_value(v: &Json) -> Value {
    Value::from(minijinja::value::Serde(v))
}

/// `chat_template` of a tokenizer_config.json (or chat_template.json): a string, or HF's list of named
/// templates, of which we use "default" (what `apply_chat_template` uses when no name is given).
fn config_template(cfg: &Json) -> Result<Option<String>, String> {
    match &cfg["chat_template"] {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(list) => {
            let named = |n: &str| list.iter().find(|t| t["name"] == n).and_then(|t| t["template"].as_str());
            match named("default") {
                Some(s) => Ok(Some(s.to_string())),
                None => {
                    let names: Vec<&str> = list.iter().filter_map(|t| t["name"].as_str()).collect();
                    Err(format!("chat_template lists {names:?} but no \"default\""))
                }
            }
        }
        other => Err(format!("chat_template is neither a string nor a list: {other}")),
    }
}

/// A special token in tokenizer_config.json: a string, or an AddedToken object with `content`.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn raised(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        cur = err.source();
    }
    None
}

/// An error with its location (minijinja puts line and template name in the display form).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        s = format!("{s}: {err}");
        cur = err.source();
    }
    s
}

/// `{{ value }}` prints as Python's `str(value)`, since that is what the template's authors saw.
fn python_formatter(out: &mut minijinja::Output<'_>, state: &mut State<'_, '_>, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined | ValueKind::String => return minijinja::escape_formatter(out, state, value),
        _ => python_str(value),
    };
    out.write_str(&text).map_err(|_| Error::new(ErrorKind::WriteFailure, "formatter"))
}

fn python_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => python_repr(v),
    }
}

/// Python's `repr`, for values printed inside containers. Strings use Python's quote choice; non-printable
/// characters are escaped only for ASCII/Latin-1 controls (Python's full `isprintable` table is not carried).
fn python_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number if !v.is_integer() => f64::try_from(v.clone()).map(py_float).unwrap_or_default(),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut out = String::from(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) => {
                        out.push_str(&format!("\\x{:02x}", c as u32))
                    }
                    c => out.push(c),
                }
            }
            out.push(q);
            out
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = v.try_iter().map(|it| it.map(|x| python_repr(&x)).collect()).unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = v
                .try_iter()
                .map(|it| {
                    it.map(|k| {
                        let val = v.get_item(&k).unwrap_or_default();
                        format!("{}: {}", python_repr(&k), python_repr(&val))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for 1e-4 ≤ |x| < 1e16, else
/// `d.ddde±XX`.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // `{:e}` is Rust's shortest round-trip form, e.g. "-1.2345e-7".
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        format!("{sign}{}{frac}e{}{:02}", &digits[..1], if exp < 0 { '-' } else { '+' }, exp.unsigned_abs())
    }
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(i64::try_from(v).map_err(|e| e.with_source(NotJson("indent")))?.max(0) as usize),
        }),
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
        // Python drops the space after commas when indenting, to avoid trailing spaces.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = JsonStyle {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

#[derive(Debug)]
struct NotJson(&'static str);

impl std::fmt::Display for NotJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tojson: bad {}", self.0)
    }
}

impl std::error::Error for NotJson {}

struct JsonStyle {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn write_json(v: &Value, o: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    let not_serializable =
        |what: &str| Error::new(ErrorKind::InvalidOperation, format!("Object of type {what} is not JSON serializable"));
    match v.kind() {
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => {
            let x = f64::try_from(v.clone())?;
            out.push_str(&match x {
                x if x.is_nan() => "NaN".into(),
                x if x.is_infinite() => if x > 0.0 { "Infinity" } else { "-Infinity" }.into(),
                x => py_float(x),
            });
        }
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(('[', ']'), items.len(), o, depth, out, |i, out| write_json(&items[i], o, depth + 1, out))?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for k in v.try_iter()? {
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                    ValueKind::Bool | ValueKind::None => {
                        let mut s = String::new();
                        write_json(&k, o, depth, &mut s)?;
                        s
                    }
                    ValueKind::Number => python_repr(&k),
                    _ => return Err(not_serializable("key")),
                };
                let val = v.get_item(&k)?;
                entries.push((key, val));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(('{', '}'), entries.len(), o, depth, out, |i, out| {
                json_string(&entries[i].0, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_json(&entries[i].1, o, depth + 1, out)
            })?;
        }
        ValueKind::Bytes => return Err(not_serializable("bytes")),
        _ => return Err(not_serializable("object")),
    }
    Ok(())
}

fn write_container(
    (open, close): (char, char),
    n: usize,
    o: &JsonStyle,
    depth: usize,
    out: &mut String,
    mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |d: usize, out: &mut String| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            (0..d).for_each(|_| out.push_str(ind));
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(depth + 1, out);
        item(i, out)?;
    }
    newline(depth, out);
    out.push(close);
    Ok(())
}

/// A JSON string as Python's json module writes it (lowercase `\u00xx`; with `ensure_ascii`, every non-ASCII
/// character as `\uXXXX`, astral ones as surrogate pairs).
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && c as u32 > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python string methods that minijinja-contrib's `pycompat` lacks, then `pycompat` itself.
fn python_method(state: &mut State<'_, '_>, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let (Some(s), "rsplit") = (value.as_str(), method) {
        let sep = args.first().filter(|a| !a.is_none()).map(|a| a.as_str().map(str::to_string));
        let maxsplit = args.get(1).map(|a| i64::try_from(a.clone())).transpose()?.unwrap_or(-1);
        let mut parts: Vec<String> = match sep {
            Some(None) => return Err(Error::new(ErrorKind::InvalidOperation, "rsplit: separator must be a string")),
            Some(Some(sep)) if sep.is_empty() => {
                return Err(Error::new(ErrorKind::InvalidOperation, "rsplit: empty separator"));
            }
            Some(Some(sep)) if maxsplit >= 0 => {
                s.rsplitn(maxsplit as usize + 1, sep.as_str()).map(str::to_string).collect()
            }
            Some(Some(sep)) => s.rsplit(sep.as_str()).map(str::to_string).collect(),
            None if maxsplit < 0 => s.split_whitespace().rev().map(str::to_string).collect(),
            None => {
                let mut out = Vec::new();
                let mut rest = s.trim_end();
                while out.len() < maxsplit as usize {
                    match rest.rfind(char::is_whitespace) {
                        Some(i) => {
                            out.push(rest[i..].trim_start().to_string());
                            rest = rest[..i].trim_end();
                        }
                        None => break,
                    }
                }
                if !rest.is_empty() {
                    out.push(rest.to_string());
                }
                out
            }
        };
        parts.reverse();
        return Ok(Value::from(parts));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `time.strftime` over a UTC timestamp, for `strftime_now` (HF uses local time; a server's is usually UTC).
/// Supports the directives chat templates use (`%d %b %Y`, `%B %d, %Y`, `%Y-%m-%d`, …) and glibc's `%-d`
/// (no padding); an unknown directive is copied through, as glibc does.
pub(crate) fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut it = fmt.chars().peekable();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = it.peek() == Some(&'-');
        if unpadded {
            it.next();
        }
        let num = |v: i64, w: usize| if unpadded { v.to_string() } else { format!("{v:0w$}") };
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m, 2)),
            Some('d') => out.push_str(&num(d, 2)),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num((hh + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('u') => out.push_str(&(weekday + 1).to_string()),
            Some('w') => out.push_str(&((weekday + 1) % 7).to_string()),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_float_matches_python_repr() {
        for (x, want) in [
            (1.0, "1.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (-0.0, "-0.0"),
            (1e-7, "1e-07"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.2345e100, "1.2345e+100"),
            (123456789.125, "123456789.125"),
            (9999999999999998.0, "9999999999999998.0"),
            (100.0, "100.0"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(py_float(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_formats_known_instants() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%B %-d, %Y", t), "July 26, 2024");
        assert_eq!(
            strftime("%Y-%m-%dT%H:%M:%S%z %A %a %j %I%p %y %% %Q", t),
            "2024-07-26T13:05:09+0000 Friday Fri 208 01PM 24 % %Q"
        );
        assert_eq!(strftime("%Y-%m-%d %A", 0), "1970-01-01 Thursday");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
        assert_eq!(strftime("trailing %", 0), "trailing %");
    }
}
