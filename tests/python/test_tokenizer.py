"""synth's tokenizer.json through HF `tokenizers`, and the GGUF tokenizer arrays against it."""

import json
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFReader
from tokenizers import Tokenizer

SAMPLES = [
    "Hello, world! The result is ok.",
    "日本語のテキストと中文",
    "emoji 🦀🚀 and ZWJ 👩‍💻",
    "tabs\tand   runs   of    spaces\n\n\nnewlines  \r\n end ",
    "",
]
CHAT = "<|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def hf_dir(ms):
    return ms.synth("hf-bf16")


@pytest.fixture(scope="module")
def tok(hf_dir):
    return Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok_json(hf_dir):
    return json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    if text:
        assert ids and all(0 <= i < tok.get_vocab_size() for i in ids)


def test_byte_level_covers_unseen_text(tok):
    # CJK/emoji are not in the tiny merge table: they must fall back to byte tokens, never to an unknown token.
    text = "中🦀"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) >= len(text.encode("utf-8")) // 2
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok, hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert start is not None and end is not None
    assert end == cfg["eos_token_id"]
    assert tok.token_to_id("<|endoftext|>") == cfg["bos_token_id"]
    enc = tok.encode(CHAT, add_special_tokens=False)
    assert enc.ids[0] == start and enc.ids[-1] == end
    assert enc.ids.count(start) == 1 and enc.ids.count(end) == 1
    middle = tok.decode(enc.ids[1:-1], skip_special_tokens=False)
    assert middle == "user\nhi"
    assert tok.decode(enc.ids, skip_special_tokens=False) == CHAT
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_config_agrees(tok, hf_dir):
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    for sid, t in tc["added_tokens_decoder"].items():
        assert tok.token_to_id(t["content"]) == int(sid), t


@pytest.mark.parametrize("fmt", ["gguf-q4_0", "gguf-q8_0", "gguf-f16"])
def test_gguf_vocab_matches_tokenizer_json(ms, tok_json, fmt):
    r = GGUFReader(ms.synth(fmt))
    tokens = r.get_field("tokenizer.ggml.tokens").contents()
    types = r.get_field("tokenizer.ggml.token_type").contents()
    merges = r.get_field("tokenizer.ggml.merges").contents()
    assert r.get_field("tokenizer.ggml.pre").contents() == "qwen2"

    by_id = {i: s for s, i in tok_json["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok_json["added_tokens"]}
    assert not set(by_id) & set(added), "added tokens overlap the BPE vocab"
    by_id.update({i: t["content"] for i, t in added.items()})
    real = len(by_id)
    assert sorted(by_id) == list(range(real)), "tokenizer.json ids are not contiguous from 0"
    assert real < len(tokens)
    assert tokens[:real] == [by_id[i] for i in range(real)]
    for i in range(real, len(tokens)):
        assert tokens[i] == f"[PAD{i}]" and types[i] == 5, (i, tokens[i], types[i])  # 5 = UNUSED
    for i in range(real):
        if i in added:
            assert types[i] in (3, 4), (i, types[i])  # CONTROL or USER_DEFINED
        else:
            assert types[i] == 1, (i, types[i])  # NORMAL

    json_merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    assert merges == json_merges

    assert r.get_field("tokenizer.ggml.eos_token_id").contents() == tokens.index("<|im_end|>")


# --- synth --tokenizer qwen3: the real Qwen3 tokenizer in GGUF metadata and HF files -----------------------------

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "qwen3-tokenizer"
PARITY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "chat" / "tokenizer_parity.json"
QWEN3 = ("--tokenizer", "qwen3", "--layers", "1")


@pytest.fixture(scope="module")
def qwen3_gguf(ms):
    return ms.synth("gguf-q4_0", extra=QWEN3)


def test_qwen3_gguf_vocab_and_merges_equal_tokenizer_json(qwen3_gguf):
    """gguf-py reads synth's GGUF: tokens, types, merges and ids must be the asset tokenizer.json's."""
    tj = json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    r = GGUFReader(qwen3_gguf)
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    assert len(tokens) == len(types) == 151936

    by_id = {i: s for s, i in tj["model"]["vocab"].items()}
    added = {t["id"]: t for t in tj["added_tokens"]}
    assert len(by_id) == 151643 and len(added) == 26
    for i in range(len(tokens)):
        if i in by_id:
            assert (tokens[i], types[i]) == (by_id[i], 1), i  # NORMAL
        elif i in added:
            t = added[i]
            control = t["special"] or (t["content"].startswith("<|") and t["content"].endswith("|>"))
            assert (tokens[i], types[i]) == (t["content"], 3 if control else 4), i  # CONTROL / USER_DEFINED
        else:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", 5), i  # UNUSED
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert len(merges) == 151387

    assert field("tokenizer.ggml.bos_token_id") == 151643
    assert field("tokenizer.ggml.eos_token_id") == tokens.index(cfg["eos_token"]) == 151645
    assert field("tokenizer.ggml.padding_token_id") == tokens.index(cfg["pad_token"]) == 151643
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == cfg["chat_template"]
    assert field("qwen3moe.block_count") == 1
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert list(emb.shape) == [256, 151936]  # gguf-py lists dims innermost first


def test_qwen3_hf_dir_ships_the_asset_files(ms):
    d = ms.synth("hf-bf16", extra=QWEN3)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / f).read_bytes() == (ASSETS / f).read_bytes(), f
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (151936, 151643, 151645)


def test_qwen3_gguf_with_llama_tokenize(qwen3_gguf, tmp_path):
    """Optional: llama.cpp's own tokenizer on synth's GGUF gives tokenizer.json's ids (scripts/build-llamacpp.sh)."""
    exe = Path(__file__).resolve().parents[2] / ".cache" / "llamacpp" / "bin" / "llama-tokenize"
    if not exe.is_file():
        pytest.skip(f"{exe} not built (scripts/build-llamacpp.sh builds it)")
    cases = json.loads(PARITY.read_text(encoding="utf-8"))["cases"]
    checked = 0
    for c in cases[:400]:
        # llama.cpp does not NFC-normalise (HF's Qwen tokenizer does), so only texts NFC leaves alone compare.
        if not c["text"] or c["text"] != c["decoded"]:
            continue
        f = tmp_path / "case.txt"
        f.write_bytes(c["text"].encode("utf-8"))
        r = subprocess.run([str(exe), "-m", str(qwen3_gguf), "-f", str(f), "--ids", "--no-bos", "--no-escape",
                            "--log-disable"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ids = json.loads(r.stdout.strip().splitlines()[-1])
        assert ids == c["ids"], c["text"]
        checked += 1
    assert checked > 300
