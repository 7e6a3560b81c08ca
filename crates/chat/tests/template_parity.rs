//! Chat templates rendered by `chat::ChatTemplate` against transformers' `apply_chat_template(tokenize=False)`:
//! Qwen3's template over system/multi-turn/tools/tool-call/thinking cases, and small templates for each HF
//! shim, from tests/fixtures/chat/template_goldens.json (scripts/fixtures/make_template_fixtures.py).

mod common;

use common::repo_path;
use moestream_chat::{ChatError, ChatTemplate, TemplateInput};
use serde_json::{Map, Value, json};

fn goldens() -> Value {
    let p = repo_path("tests/fixtures/chat/template_goldens.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("read goldens")).expect("parse goldens")
}

fn qwen3() -> ChatTemplate {
    let p = repo_path("assets/qwen3-tokenizer/tokenizer_config.json");
    let text = std::fs::read_to_string(&p).expect("tokenizer_config.json");
    ChatTemplate::from_tokenizer_config(&text, "qwen3").expect("compiles").expect("has a template")
}

fn render(t: &ChatTemplate, case: &Value) -> Result<String, ChatError> {
    let empty = Map::new();
    let input = TemplateInput {
        messages: &case["messages"],
        tools: case["tools"].as_array().map(|_| &case["tools"]),
        add_generation_prompt: case["add_generation_prompt"].as_bool().expect("add_generation_prompt"),
        extra: case["kwargs"].as_object().unwrap_or(&empty),
    };
    t.render(&input)
}

#[test]
fn every_golden_renders_byte_identically() {
    let g = goldens();
    let cases = g["cases"].as_array().expect("cases");
    assert!(cases.len() >= 35, "only {} cases", cases.len());
    let q = qwen3();
    let eos = g["eos_token"].as_str();
    let mut bad = Vec::new();
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let custom;
        let t = match c["template"].as_str() {
            None => &q,
            Some(src) => {
                custom = ChatTemplate::new(src, None, eos).unwrap_or_else(|e| panic!("{name}: {e}"));
                &custom
            }
        };
        let got = render(t, c);
        match (c.get("expected").and_then(Value::as_str), c.get("error").and_then(Value::as_str), got) {
            (Some(want), _, Ok(got)) if name == "strftime_now_shape" => {
                // The date differs from the day the goldens were made; its shape does not.
                assert_eq!(got.len(), want.len(), "{name}: {got:?}");
            }
            (Some(want), _, Ok(got)) if got != want => bad.push(format!("{name}:\n--- ours\n{got}\n--- HF\n{want}")),
            (Some(_), _, Ok(_)) => {}
            (Some(_), _, Err(e)) => bad.push(format!("{name}: we fail ({e}), HF renders")),
            (None, Some(msg), Err(ChatError::TemplateRejected(ours))) if ours == msg => {}
            (None, Some(msg), other) => bad.push(format!("{name}: HF raises {msg:?}, we give {other:?}")),
            (None, None, _) => panic!("{name}: golden has neither expected nor error"),
        }
    }
    if !bad.is_empty() {
        panic!("{} of {} templates differ from transformers:\n{}", bad.len(), cases.len(), bad.join("\n\n"));
    }
}

#[test]
fn qwen3_template_from_a_synth_gguf_and_a_synth_directory() {
    use moestream_format::TensorIndex;
    use moestream_synth::{Preset, SynthFormat, SynthOptions, SynthTokenizer, synth};
    let dir = tempfile::tempdir().expect("tempdir");
    let g = goldens();
    let case = g["cases"].as_array().expect("cases").iter().find(|c| c["name"] == "tools_with_system").expect("case");
    for (format, path) in
        [(SynthFormat::GgufQ8_0, dir.path().join("q.gguf")), (SynthFormat::HfBf16, dir.path().join("hf"))]
    {
        let mut o = SynthOptions::new(Preset::TinyQwen3Moe, format, &path);
        o.tokenizer = SynthTokenizer::Qwen3;
        o.layers = Some(1);
        synth(&o).expect("synth");
        let t = ChatTemplate::from_index(&TensorIndex::open(&path).expect("index")).expect("load").expect("present");
        assert_eq!(render(&t, case).expect("render"), case["expected"].as_str().expect("expected"), "{format:?}");
    }
    // The synthetic tokenizer's ChatML template, from GGUF metadata.
    let p = dir.path().join("s.gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &p)).expect("synth");
    let t = ChatTemplate::from_index(&TensorIndex::open(&p).expect("index")).expect("load").expect("present");
    let messages = json!([{"role": "user", "content": "hi"}]);
    let out = t
        .render(&TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: &Map::new() })
        .expect("render");
    assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn template_sources_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    assert!(ChatTemplate::from_dir(d).expect("empty dir").is_none());
    // A list of named templates: "default" is used; without one, the error names the choices.
    let cfg = json!({"eos_token": {"content": "</s>"}, "chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]});
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).expect("write");
    let msgs = json!([]);
    let input = TemplateInput { messages: &msgs, tools: None, add_generation_prompt: false, extra: &Map::new() };
    assert_eq!(ChatTemplate::from_dir(d).expect("load").expect("present").render(&input).expect("render"), "D</s>");
    // chat_template.jinja beside it wins, as in transformers.
    std::fs::write(d.join("chat_template.jinja"), "J{{ messages | length }}").expect("write");
    assert_eq!(ChatTemplate::from_dir(d).expect("load").expect("present").render(&input).expect("render"), "J0");
    let bad = json!({"chat_template": [{"name": "tool_use", "template": "T"}]}).to_string();
    let e = ChatTemplate::from_tokenizer_config(&bad, "cfg.json").expect_err("no default");
    assert!(e.to_string().contains("tool_use") && e.to_string().contains("cfg.json"), "{e}");
    assert!(ChatTemplate::from_tokenizer_config("{}", "x").expect("no template").is_none());
    assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(ChatError::TemplateSyntax(_))));
    // Bad input is an error, never a panic.
    let t = ChatTemplate::new("{{ messages[0].content.upper() }}", None, None).expect("compile");
    let not_array = json!({"role": "user"});
    let e = t.render(&TemplateInput { messages: &not_array, ..input }).expect_err("not an array");
    assert!(matches!(e, ChatError::TemplateInput(_)), "{e}");
    let number = json!([{"role": "user", "content": 3}]);
    assert!(matches!(t.render(&TemplateInput { messages: &number, ..input }), Err(ChatError::TemplateRender(_))));
    let mut extra = Map::new();
    extra.insert("messages".into(), json!([]));
    assert!(matches!(t.render(&TemplateInput { extra: &extra, ..input }), Err(ChatError::TemplateInput(_))));
    let undefined = ChatTemplate::new("{{ nothing | tojson }}", None, None).expect("compile");
    assert!(matches!(undefined.render(&input), Err(ChatError::TemplateRender(_))));
}

#[test]
fn openai_shaped_content_is_made_text_for_the_template() {
    use moestream_chat::template::text_only_messages;
    let q = qwen3();
    let raw = json!([
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]);
    let empty = Map::new();
    let input = |m| TemplateInput { messages: m, tools: None, add_generation_prompt: true, extra: &empty };
    // As in transformers, the raw shape does not render (null + string, list.startswith) …
    assert!(matches!(q.render(&input(&raw)), Err(ChatError::TemplateRender(_))));
    // … and the text-only shape renders as the equivalent string messages do.
    let fixed = text_only_messages(&raw).expect("text only");
    let strings = json!([
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": "", "tool_calls": raw[1]["tool_calls"]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]);
    assert_eq!(q.render(&input(&fixed)).expect("render"), q.render(&input(&strings)).expect("render"));
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    let e = text_only_messages(&image).expect_err("image");
    assert!(e.to_string().contains("image_url"), "{e}");
    assert!(text_only_messages(&json!([3])).is_err());
    assert!(text_only_messages(&json!({"role": "user"})).is_err());
}
