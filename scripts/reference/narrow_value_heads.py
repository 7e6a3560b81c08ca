#!/usr/bin/env python3
"""Make a Qwen3.5-MoE / Qwen3-Next HF checkpoint whose value head dim equals its key head dim.

    narrow_value_heads.py HF_DIR OUT_DIR

llama.cpp's qwen35moe and qwen3next loaders take both GDN head dims from `ssm.state_size`
(src/models/qwen35moe.cpp and qwen3next.cpp: `head_v_dim = hparams.ssm_d_state`), so they reject a checkpoint
with dv != dk, which tests/fixtures/hf/{qwen35moe_small, qwen35moe_r3_fused_layout, qwen3next_small} all are
(dv 24 vs dk 16, 12 vs 8). This keeps the first dk channels of every value head: the v rows of the qkv(z)
projection and of the conv kernel, the z rows, ssm_norm, and the matching columns of out_proj. Everything else
(weights, prompt) is unchanged. The result is a valid checkpoint of the same class; it has no transformers
reference, so the tests compare it with llama.cpp only (the unnarrowed fixtures carry the transformers check).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((src / "config.json").read_text())
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    r = hv // hk
    nd = dk
    t = load_file(src / "model.safetensors")
    res = {}
    for name, w in t.items():
        if ".linear_attn." not in name:
            res[name] = w
            continue
        if name.endswith("in_proj_qkv.weight"):
            qk, v = w[: 2 * hk * dk], w[2 * hk * dk :]
            w = np.concatenate([qk, v.reshape(hv, dv, -1)[:, :nd].reshape(hv * nd, -1)])
        elif name.endswith("in_proj_z.weight"):
            w = w.reshape(hv, dv, -1)[:, :nd].reshape(hv * nd, -1)
        elif name.endswith("in_proj_qkvz.weight"):
            g = w.reshape(hk, 2 * dk + 2 * r * dv, -1)
            qk = g[:, : 2 * dk]
            v = g[:, 2 * dk : 2 * dk + r * dv].reshape(hk, r, dv, -1)[:, :, :nd].reshape(hk, r * nd, -1)
            z = g[:, 2 * dk + r * dv :].reshape(hk, r, dv, -1)[:, :, :nd].reshape(hk, r * nd, -1)
            w = np.concatenate([qk, v, z], axis=1).reshape(hk * (2 * dk + 2 * r * nd), -1)
        elif name.endswith("conv1d.weight"):
            qk, v = w[: 2 * hk * dk], w[2 * hk * dk :]
            w = np.concatenate([qk, v.reshape(hv, dv, *w.shape[1:])[:, :nd].reshape(hv * nd, *w.shape[1:])])
        elif name.endswith("linear_attn.norm.weight"):
            w = w[:nd]
        elif name.endswith("out_proj.weight"):
            w = w.reshape(w.shape[0], hv, dv)[:, :, :nd].reshape(w.shape[0], hv * nd)
        res[name] = np.ascontiguousarray(w)
    out.mkdir(parents=True, exist_ok=True)
    save_file(res, out / "model.safetensors", metadata={"format": "pt"})
    cfg["linear_value_head_dim"] = nd
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    ref = json.loads((src / "reference.json").read_text())
    (out / "reference.json").write_text(
        json.dumps({"prompt_tokens": ref["prompt_tokens"], "narrowed_from": src.name, "value_head_dim": nd}) + "\n"
    )
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")


if __name__ == "__main__":
    main()
