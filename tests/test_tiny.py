"""Tiny Swallow: a real sentencepiece Llama tokenizer and a LlamaForCausalLM, loaded the normal way."""

import sentencepiece as spm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from swallow_ft.tiny import build


def test_tiny_swallow_loads_with_from_pretrained(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    # Swallow's conventions: BOS added, pad is <unk> (id 0) and never EOS.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    ids = tokenizer("富士山は日本で一番高い山です。").input_ids
    assert ids[0] == 1 and 2 not in ids


def test_tokenizer_is_real_sentencepiece_with_byte_fallback(tiny_model):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Swallow は日本語が得意です 🐦 鷲"  # the emoji and 鷲 are not in the training corpus
    assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert any(piece.startswith("<0x") for piece in sp.encode(text, out_type=str))
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_build_is_deterministic_and_cached(tiny_model, tmp_path):
    other = build(tmp_path / "tiny")
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert (other / name).read_bytes() == (tiny_model / name).read_bytes(), name
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    build(tmp_path / "tiny")  # up to date: nothing is rebuilt
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp
