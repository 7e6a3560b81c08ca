//! `chat::parse::OutputParser` on data-driven cases: each input is parsed whole, split at every byte position
//! that is a char boundary, and fed one char at a time; every way must give the same events. Events are written
//! compactly: `C:` content, `R:` reasoning, `T<index>:name(arguments)`, joined by ` | `.

mod common;

use moestream_chat::{Event, OutputParser, ParserConfig, Specials, StreamDecoder};

const THINKING: ParserConfig = ParserConfig { starts_in_reasoning: true, reasoning: true, tool_calls: true };
const PLAIN: ParserConfig = ParserConfig { starts_in_reasoning: false, reasoning: true, tool_calls: true };
const NO_TOOLS: ParserConfig = ParserConfig { starts_in_reasoning: false, reasoning: true, tool_calls: false };
const NO_REASONING: ParserConfig = ParserConfig { starts_in_reasoning: true, reasoning: false, tool_calls: true };

const WEATHER: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 2}}\n</tool_call>";

fn cases() -> Vec<(&'static str, ParserConfig, String, &'static str)> {
    let s = |x: &str| x.to_string();
    vec![
        ("plain content", PLAIN, s("Hello, world."), "C:Hello, world."),
        ("empty output", PLAIN, s(""), ""),
        (
            "think block then answer",
            PLAIN,
            s("<think>\nLet me add.\n</think>\n\nThe answer is 4."),
            "R:Let me add. | C:The answer is 4.",
        ),
        ("empty think block (thinking disabled)", PLAIN, s("<think>\n\n</think>\n\nHi."), "C:Hi."),
        (
            "starts inside reasoning",
            THINKING,
            s("Reasoning here.\n</think>\n\nAnswer."),
            "R:Reasoning here. | C:Answer.",
        ),
        (
            "reasoning keeps inner newlines",
            THINKING,
            s("\nline 1\n\nline 2\n\n</think>\n\nA\n\nB\n"),
            "R:line 1\n\nline 2\n | C:A\n\nB\n",
        ),
        ("unterminated reasoning", THINKING, s("still thinking <b>and</b> <thi"), "R:still thinking <b>and</b> <thi"),
        (
            "reasoning may mention tags",
            THINKING,
            s("I could emit <tool_call> here.</think>ok"),
            "R:I could emit <tool_call> here. | C:ok",
        ),
        ("tool call", PLAIN, s(WEATHER), "T0:get_weather({\"city\":\"Zürich\",\"days\":2})"),
        (
            "content then tool call",
            PLAIN,
            format!("Let me check.\n{WEATHER}"),
            "C:Let me check. | T0:get_weather({\"city\":\"Zürich\",\"days\":2})",
        ),
        (
            "think, content, two calls",
            PLAIN,
            format!(
                "<think>\nNeed weather.\n</think>\n\nChecking.\n{WEATHER}\n<tool_call>\n{{\"name\": \"search\", \"arguments\": {{\"q\": \"a<b>c\", \"z\": null, \"a\": [1.5]}}}}\n</tool_call>\n"
            ),
            "R:Need weather. | C:Checking. | T0:get_weather({\"city\":\"Zürich\",\"days\":2}) | T1:search({\"q\":\"a<b>c\",\"z\":null,\"a\":[1.5]})",
        ),
        (
            "string arguments kept verbatim",
            PLAIN,
            s("<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>"),
            "T0:f({\"x\": 1})",
        ),
        ("missing arguments are {}", PLAIN, s("<tool_call>{\"name\": \"now\"}</tool_call>"), "T0:now({})"),
        (
            "parameters alias",
            PLAIN,
            s("<tool_call>{\"name\": \"f\", \"parameters\": {\"k\": true}}</tool_call>"),
            "T0:f({\"k\":true})",
        ),
        (
            "malformed JSON is content",
            PLAIN,
            s("A <tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call> B"),
            "C:A <tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call> B",
        ),
        (
            "no name is content",
            PLAIN,
            s("<tool_call>{\"arguments\": {}}</tool_call>"),
            "C:<tool_call>{\"arguments\": {}}</tool_call>",
        ),
        (
            "malformed then valid",
            PLAIN,
            format!("<tool_call>nope</tool_call>{WEATHER}"),
            "C:<tool_call>nope</tool_call> | T0:get_weather({\"city\":\"Zürich\",\"days\":2})",
        ),
        (
            "unterminated valid call",
            PLAIN,
            s("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n"),
            "T0:f({\"a\":1})",
        ),
        (
            "unterminated broken call",
            PLAIN,
            s("x<tool_call>\n{\"name\": \"f\", \"argu"),
            "C:x<tool_call>\n{\"name\": \"f\", \"argu",
        ),
        (
            "text after a call is content",
            PLAIN,
            format!("{WEATHER}\n\nDone."),
            "T0:get_weather({\"city\":\"Zürich\",\"days\":2}) | C:\n\nDone.",
        ),
        ("partial tags at the end are text", PLAIN, s("a <tool_ca"), "C:a <tool_ca"),
        (
            "lookalike tags are text",
            PLAIN,
            s("<toolcall> <think > </think> <tool_call"),
            "C:<toolcall> <think > </think> <tool_call",
        ),
        (
            "tool calls disabled",
            NO_TOOLS,
            format!("Hi\n{WEATHER}"),
            "C:Hi\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 2}}\n</tool_call>",
        ),
        ("reasoning disabled", NO_REASONING, s("<think>\nx\n</think>\n\ny"), "C:<think>\nx\n</think>\n\ny"),
        ("unicode around tags", PLAIN, s("<think>\n思考🤔\n</think>\n\n答案：🚀"), "R:思考🤔 | C:答案：🚀"),
        ("newline at end of content kept", PLAIN, s("a\n"), "C:a\n"),
    ]
}

fn show(events: &[Event]) -> String {
    // Merge across pushes first, as a client appending deltas would.
    let mut merged: Vec<Event> = Vec::new();
    for e in events {
        match (merged.last_mut(), e) {
            (Some(Event::Content(a)), Event::Content(b)) | (Some(Event::Reasoning(a)), Event::Reasoning(b)) => {
                a.push_str(b)
            }
            _ => merged.push(e.clone()),
        }
    }
    merged
        .iter()
        .map(|e| match e {
            Event::Content(s) => format!("C:{s}"),
            Event::Reasoning(s) => format!("R:{s}"),
            Event::ToolCall { index, name, arguments, .. } => format!("T{index}:{name}({arguments})"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn run(config: ParserConfig, pieces: &[&str]) -> Vec<Event> {
    let mut p = OutputParser::new(config);
    let mut out = Vec::new();
    for piece in pieces {
        let events = p.push(piece);
        assert!(
            events.iter().all(|e| !matches!(e, Event::Content(s) | Event::Reasoning(s) if s.is_empty())),
            "empty event for {pieces:?}"
        );
        out.extend(events);
    }
    out.extend(p.finish());
    out
}

#[test]
fn every_case_parses_the_same_at_every_split_point() {
    let mut bad = Vec::new();
    let all = cases();
    for (name, config, input, want) in &all {
        let whole = show(&run(*config, &[input]));
        if whole != *want {
            bad.push(format!("{name}: whole input gives\n  {whole:?}\nwant\n  {want:?}"));
            continue;
        }
        for i in (0..=input.len()).filter(|&i| input.is_char_boundary(i)) {
            for j in (i..=input.len()).filter(|&j| input.is_char_boundary(j)).step_by(7) {
                let got = show(&run(*config, &[&input[..i], &input[i..j], &input[j..]]));
                if got != *want {
                    bad.push(format!("{name}: split at {i},{j} gives {got:?}"));
                }
            }
        }
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        let got = show(&run(*config, &refs));
        if got != *want {
            bad.push(format!("{name}: char by char gives {got:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} failures (of {} cases), first:\n{}",
        bad.len(),
        all.len(),
        bad[..bad.len().min(8)].join("\n")
    );
}

#[test]
fn holds_back_only_a_possible_tag_prefix() {
    let mut p = OutputParser::new(PLAIN);
    assert_eq!(p.push("Hello <"), vec![Event::Content("Hello ".into())]);
    assert_eq!(p.push("to"), vec![]);
    assert_eq!(p.push("y> and"), vec![Event::Content("<toy> and".into())]);
    assert_eq!(p.push(" more\n"), vec![Event::Content(" more".into())]); // "\n" may precede <tool_call>
    assert_eq!(p.push("x"), vec![Event::Content("\nx".into())]);
    assert_eq!(p.push("<thin"), vec![]);
    assert_eq!(p.push("king"), vec![Event::Content("<thinking".into())]);
    let mut r = OutputParser::new(THINKING);
    assert_eq!(r.push("\nstep one"), vec![Event::Reasoning("step one".into())]);
    assert_eq!(r.push("\n</th"), vec![]);
    assert_eq!(r.push("ink>\n\nok"), vec![Event::Content("ok".into())]);
}

#[test]
fn tool_call_indexes_count_up_and_ids_are_distinct() {
    let text = format!("{WEATHER}{WEATHER}{WEATHER}");
    let mut p = OutputParser::new(PLAIN);
    let mut events = p.push(&text);
    events.extend(p.finish());
    let ids: Vec<(usize, String)> = events
        .iter()
        .map(|e| match e {
            Event::ToolCall { index, id, .. } => (*index, id.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1, 2]);
    let distinct: std::collections::HashSet<&String> = ids.iter().map(|x| &x.1).collect();
    assert_eq!(distinct.len(), 3);
    assert!(ids.iter().all(|(_, id)| id.starts_with("call_")));
    // After finish the parser starts a new output (indexes from 0 again).
    let again = p.push(WEATHER);
    assert!(matches!(&again[..], [Event::ToolCall { index: 0, .. }]), "{again:?}");
}

#[test]
fn qwen3_tokens_through_stream_decoder_into_the_parser() {
    // The server's path: token ids → StreamDecoder (special tokens skipped; Qwen3's <think>/<tool_call> are not
    // special) → OutputParser, one token at a time.
    let tok = common::qwen3_tokenizer();
    let text = format!("<think>\n用户问天气🌦️\n</think>\n\nLet me check.\n{WEATHER}<|im_end|>");
    let ids = tok.encode(&text).expect("encode");
    let mut d = StreamDecoder::with_specials(Specials::Skip);
    let mut p = OutputParser::new(PLAIN);
    let mut events = Vec::new();
    for &id in &ids {
        events.extend(p.push(&d.push(&tok, id).expect("decode")));
    }
    events.extend(p.push(&d.finish(&tok).expect("finish")));
    events.extend(p.finish());
    assert_eq!(show(&events), "R:用户问天气🌦️ | C:Let me check. | T0:get_weather({\"city\":\"Zürich\",\"days\":2})");
}
