#!/usr/bin/env python3
"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny test checkpoint.

    convert_tiny_hf_to_gguf.py LLAMACPP_SRC HF_DIR OUT.gguf OUTTYPE [CONVERTER_ARGS...]

CONVERTER_ARGS go to convert_hf_to_gguf.py unchanged (the hybrids need
`--no-mtp`: their tiny checkpoints have no MTP block, and without the flag
the converter's _QwenMtpMixin asserts that it found one).

Two things stand between the tiny fixtures and the unmodified converter, and
this wrapper does the least it can about each:

1. The tests/fixtures/hf checkpoints ship no tokenizer (vocab 256, token ids
   only). The converter's Qwen3MoeModel -> TextModel._set_vocab_gpt2 needs one
   loadable by transformers.AutoTokenizer. If HF_DIR has no tokenizer.json we
   work on a temporary COPY of HF_DIR and write a minimal byte-level BPE
   tokenizer there: ids 0..254 are the GPT-2 byte symbols of bytes 0..254 and
   id 255 is the single merge "Ġ Ġ" -> "ĠĠ" (llama.cpp refuses a BPE vocab
   without a merges list, and `tokenizers` refuses a merge whose result is not
   in the vocab). The vocabulary only matters for text; the fixtures feed ids.
2. get_vocab_base_pre() identifies the pre-tokenizer by hashing the encoding
   of a fixed string and raises for unknown hashes, which any toy vocab is. We
   replace only that method with one returning "qwen2" (the value real
   Qwen3-MoE GGUFs carry). Everything else — hparams, tensor names, tensor
   transforms (expert stacking), outtype handling — is the converter's own.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path


def bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_min_tokenizer(d: Path, vocab_size: int) -> None:
    assert vocab_size == 256, vocab_size
    sym = bytes_to_unicode()
    vocab = {sym[b]: b for b in range(255)}
    sp = sym[ord(" ")]
    vocab[sp + sp] = 255
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[sp, sp]],
        },
    }
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "clean_up_tokenization_spaces": False})
    )


def main() -> None:
    llama_src, hf_dir, out, outtype = sys.argv[1:5]
    extra = sys.argv[5:]
    hf_dir = Path(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = hf_dir
        if not (hf_dir / "tokenizer.json").exists():
            work = Path(tmp) / hf_dir.name
            shutil.copytree(hf_dir, work)
            cfg = json.loads((work / "config.json").read_text())
            write_min_tokenizer(work, cfg["vocab_size"])

        sys.path.insert(0, llama_src)
        sys.path.insert(0, str(Path(llama_src) / "gguf-py"))
        import convert_hf_to_gguf
        from conversion import base

        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
        sys.argv = ["convert_hf_to_gguf.py", str(work), "--outfile", out, "--outtype", outtype, *extra]
        convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
