#!/usr/bin/env python3
"""float64 transformers logits for a GGUF file's *dequantized* weights.

    gguf_f64_reference.py LLAMACPP_SRC HF_DIR MODEL.gguf TOKENS N_GREEDY OUT_PREFIX

Loads the HF checkpoint HF_DIR (for its config) with transformers in float64,
replaces every weight by gguf-py's dequantization of the matching tensor in
MODEL.gguf (the names the converter wrote, mapped back), and writes
  OUT_PREFIX.logits.f32         f32 [T, V], prompt logits (one full forward)
  OUT_PREFIX.greedy.json        {"greedy_tokens": [...], "top1_top2_gaps": [...],
                                 "prompt_router_gaps": [...]}
                                (greedy by full recompute, N_GREEDY tokens; router gaps per
                                prompt position, min over layers of k-th minus (k+1)-th
                                router logit)
This isolates the *weight* quantisation: an exact engine reading the GGUF must
reproduce these logits up to f32 rounding, whatever the activation precision
of llama.cpp's kernels. With MODEL.gguf == the F32 conversion this is the
plain HF f64 reference.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers


def main() -> None:
    llama_src, hf_dir, gguf_path, tokens, n_greedy, out = sys.argv[1:7]
    sys.path.insert(0, str(Path(llama_src) / "gguf-py"))
    import gguf
    from gguf.quants import dequantize

    prompt = [int(t) for t in tokens.split(",")]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    cfg = model.config
    sd = model.state_dict()

    r = gguf.GGUFReader(gguf_path)
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name] = a.reshape([int(x) for x in reversed(t.shape)])

    new = {}
    new["model.embed_tokens.weight"] = w["token_embd.weight"]
    new["model.norm.weight"] = w["output_norm.weight"]
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        new["lm_head.weight"] = w["output.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        new[p + "input_layernorm.weight"] = w[b + "attn_norm.weight"]
        new[p + "post_attention_layernorm.weight"] = w[b + "ffn_norm.weight"]
        for hf, gg in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
                       ("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")]:
            new[p + f"self_attn.{hf}.weight"] = w[b + gg + ".weight"]
        new[p + "mlp.gate.weight"] = w[b + "ffn_gate_inp.weight"]
        gate, up, down = w[b + "ffn_gate_exps.weight"], w[b + "ffn_up_exps.weight"], w[b + "ffn_down_exps.weight"]
        if p + "mlp.experts.gate_up_proj" in sd:
            new[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
            new[p + "mlp.experts.down_proj"] = down
        else:
            for e in range(gate.shape[0]):
                new[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
                new[p + f"mlp.experts.{e}.up_proj.weight"] = up[e]
                new[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
    missing = [k for k in sd if k not in new and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing, missing
    for k, v in new.items():
        assert tuple(sd[k].shape) == v.shape, (k, sd[k].shape, v.shape)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()}, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()

    # Router margin: per prompt position, the smallest (over MoE layers) gap between the k-th and
    # (k+1)-th largest router logit. Where it is tiny, a perturbation of the hidden state (llama.cpp's
    # activation quantisation) can swap an expert and move the logits by O(weight quantisation error).
    k = cfg.num_experts_per_tok
    gaps_by_layer = []

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        rl = (x @ mod.weight.T).sort(dim=-1, descending=True).values
        gaps_by_layer.append((rl[:, k - 1] - rl[:, k]).numpy())

    handles = [layer.mlp.gate.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].numpy()
        for h in handles:
            h.remove()
        router_gap = np.min(np.stack(gaps_by_layer), axis=0)
        logits.astype("<f4").tofile(out + ".logits.f32")
        seq, toks, gaps = list(prompt), [], []
        for _ in range(int(n_greedy)):
            row = model(torch.tensor([seq])).logits[0, -1].numpy()
            top = np.argsort(row)[::-1]
            toks.append(int(top[0]))
            gaps.append(float(row[top[0]] - row[top[1]]))
            seq.append(int(top[0]))
    Path(out + ".greedy.json").write_text(json.dumps(
        {"greedy_tokens": toks, "top1_top2_gaps": gaps, "prompt_router_gaps": [float(g) for g in router_gap]}
    ))
    print(f"{gguf_path}: greedy {toks} min gap {min(gaps):.4f}")


if __name__ == "__main__":
    main()
