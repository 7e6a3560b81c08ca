//! Messages → prompt text: the model's own chat template (`moestream_chat::ChatTemplate`, rendered as
//! transformers does), or, for a model that ships none, a plain Qwen-style ChatML formatter.

use moestream_chat::{ChatError, TemplateInput};
use serde_json::{Map, Value};

use crate::AppState;
use crate::error::ApiError;
use crate::wire::ChatMessage;

/// The prompt of a chat request, ending with the assistant's generation prompt. `enable_thinking` (the
/// top-level field) is passed to the template unless `kwargs` sets it.
pub fn chat_prompt(
    s: &AppState,
    messages: &[ChatMessage],
    tools: Option<&Vec<Value>>,
    kwargs: Option<&Map<String, Value>>,
    enable_thinking: Option<bool>,
) -> Result<String, ApiError> {
    let values: Vec<Value> = messages.iter().map(ChatMessage::to_template_value).collect();
    let tools = tools.filter(|t| !t.is_empty()).map(|t| Value::Array(t.clone()));
    let mut extra = kwargs.cloned().unwrap_or_default();
    if let Some(t) = enable_thinking {
        extra.entry("enable_thinking").or_insert(Value::Bool(t));
    }
    let Some(template) = &s.template else {
        let thinking = extra.get("enable_thinking").and_then(Value::as_bool);
        let o = TemplateOptions {
            tools: tools.and_then(|t| t.as_array().cloned()),
            enable_thinking: thinking,
            add_generation_prompt: true,
        };
        return Ok(chatml(&values, &o));
    };
    let messages = Value::Array(values);
    let input =
        TemplateInput { messages: &messages, tools: tools.as_ref(), add_generation_prompt: true, extra: &extra };
    template.render(&input).map_err(|e| match e {
        ChatError::TemplateRejected(_) | ChatError::TemplateInput(_) => {
            ApiError::bad_request("messages", e.to_string())
        }
        other => ApiError::internal(other.to_string()),
    })
}

/// Whether the prompt leaves the model inside a reasoning block (templates that always think end the
/// generation prompt with `<think>\n`), so the output parser starts in reasoning.
pub fn ends_in_think(prompt: &str) -> bool {
    prompt.trim_end().ends_with("<think>")
}

/// Options a template receives besides the messages.
#[derive(Debug, Clone, Default)]
pub struct TemplateOptions {
    pub tools: Option<Vec<Value>>,
    pub enable_thinking: Option<bool>,
    pub add_generation_prompt: bool,
}

/// Render `messages` (HF-shaped JSON objects: role, content, tool_calls, …) the way Qwen3's template does for
/// the common cases: tools listed in the system turn, tool results as `<tool_response>` user turns, and an empty
/// think block when thinking is off.
pub fn chatml(messages: &[Value], o: &TemplateOptions) -> String {
    let mut s = String::new();
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let first_is_system = messages.first().is_some_and(|m| str_of(m, "role") == "system");
    if let Some(tools) = o.tools.as_ref().filter(|t| !t.is_empty()) {
        s.push_str("<|im_start|>system\n");
        if first_is_system {
            s.push_str(&str_of(&messages[0], "content"));
            s.push_str("\n\n");
        }
        s.push_str("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n");
        s.push_str("You are provided with function signatures within <tools></tools> XML tags:\n<tools>");
        for t in tools {
            s.push('\n');
            s.push_str(&t.to_string());
        }
        s.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments ");
        s.push_str("within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, ");
        s.push_str("\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
    }
    let mut prev_tool = false;
    for (i, m) in messages.iter().enumerate() {
        let role = str_of(m, "role");
        if i == 0 && first_is_system && o.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            continue;
        }
        let content = str_of(m, "content");
        if role == "tool" {
            if !prev_tool {
                s.push_str("<|im_start|>user");
            }
            s.push_str("\n<tool_response>\n");
            s.push_str(&content);
            s.push_str("\n</tool_response>");
            let next_is_tool = messages.get(i + 1).is_some_and(|n| str_of(n, "role") == "tool");
            if !next_is_tool {
                s.push_str("<|im_end|>\n");
            }
            prev_tool = true;
            continue;
        }
        prev_tool = false;
        let role = if role == "developer" { "system".to_string() } else { role };
        s.push_str("<|im_start|>");
        s.push_str(&role);
        s.push('\n');
        s.push_str(&content);
        if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
            for c in calls {
                let f = c.get("function").unwrap_or(c);
                let call = serde_json::json!({"name": f.get("name"), "arguments": f.get("arguments")});
                if !content.is_empty() || !s.ends_with('\n') {
                    s.push('\n');
                }
                s.push_str("<tool_call>\n");
                s.push_str(&call.to_string());
                s.push_str("\n</tool_call>");
            }
        }
        s.push_str("<|im_end|>\n");
    }
    if o.add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
        if o.enable_thinking == Some(false) {
            s.push_str("<think>\n\n</think>\n\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_with_tools_and_tool_results() {
        let msgs = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}),
            json!({"role": "tool", "content": "42"}),
        ];
        let o = TemplateOptions {
            tools: Some(vec![json!({"type": "function"})]),
            enable_thinking: Some(false),
            add_generation_prompt: true,
        };
        let p = chatml(&msgs, &o);
        assert!(p.starts_with("<|im_start|>system\n# Tools"), "{p}");
        assert!(p.contains("<|im_start|>user\nhi<|im_end|>\n"), "{p}");
        assert!(p.contains("<tool_call>\n{\"name\":\"f\",\"arguments\":{\"x\":1}}\n</tool_call><|im_end|>"), "{p}");
        assert!(p.contains("<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"), "{p}");
        assert!(p.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{p}");
    }
}
