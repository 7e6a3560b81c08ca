//! Replay a routing trace through the expert-cache eviction policies and print one JSON line per (slots, policy).
//!
//! `cargo run --release -p moestream-store --example simulate_trace -- TRACE.json [--slots 8,16,32,64]
//! [--policies lru,lfu:16,lfu:64,lfu:256]`
//!
//! TRACE.json is what `moestream run --trace-out` writes: {"num_experts", "top_k", "moe_layers", "experts": [...]}
//! with `experts` token-major, `[token][moe_layer][top_k]`.

use moestream_store::policy::{EvictionPolicy, simulate};

fn list<T>(s: &str, f: impl Fn(&str) -> Option<T>) -> Vec<T> {
    s.split(',').map(|x| f(x).unwrap_or_else(|| panic!("bad list item {x:?}"))).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut slots = vec![8usize, 16, 32, 64];
    let mut policies = list("lru,lfu:16,lfu:64,lfu:256", EvictionPolicy::parse);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--slots" => slots = list(&args.next().expect("--slots N,N,..."), |x| x.parse().ok()),
            "--policies" => policies = list(&args.next().expect("--policies P,P,..."), EvictionPolicy::parse),
            _ => path = Some(a),
        }
    }
    let path = path.expect("usage: simulate_trace TRACE.json [--slots 8,16] [--policies lru,lfu:64]");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let j: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let num = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{path}: no {k}")) as usize;
    let (e, k, layers) = (num("num_experts"), num("top_k"), num("moe_layers"));
    let trace: Vec<u32> = j["experts"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no experts"))
        .iter()
        .map(|x| x.as_u64().expect("expert id") as u32)
        .collect();
    let tokens = trace.len() / (layers * k);
    for &s in &slots {
        for &p in &policies {
            let r = simulate(&trace, e, k, layers, s, p);
            println!(
                "{}",
                serde_json::json!({
                    "trace": path, "num_experts": e, "top_k": k, "moe_layers": layers, "tokens": tokens,
                    "slots": s, "policy": p.name(), "hits": r.hits, "misses": r.misses, "hit_rate": r.hit_rate(),
                })
            );
        }
    }
}
