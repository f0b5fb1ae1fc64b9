"""Golden renderings of every prompt format through the real tiny sentencepiece tokenizer.

Each case pins the exact decoded input and the exact decoded trained tokens (labels != -100).
"""

import json

import pytest
from transformers import AutoTokenizer

from swallow_ft.data.encoding import IGNORE, encode
from swallow_ft.data.shapes import BadRow, detect_shape, to_conversation
from swallow_ft.data.templates import FORMATS, LLAMA3_SPECIALS, Conversation, Turn, choose_format
from swallow_ft.errors import UserError

SINGLE = Conversation(turns=[Turn("1 と 2 の和は？", "3 です。")])
MULTI = Conversation(turns=[Turn("1 と 2 の和は？", "3 です。"), Turn("2 倍すると？", "6 です。")])
SYSTEM = Conversation(turns=[Turn("こんにちは", "こんにちは。")], system="簡潔に答えてください。")
ALPACA_INPUT = Conversation(turns=[Turn("次の数を足しなさい。", "5")], input="2, 3")
SYS_JA = "<<SYS>>\nあなたは誠実で優秀な日本人のアシスタントです。\n<</SYS>>\n\n"
ALPACA_HEAD = "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を記述してください。\n\n"
ALPACA_HEAD_INPUT = ("以下に、あるタスクを説明する指示があり、それに付随する入力が更なる文脈を提供しています。"
                     "リクエストを適切に完了するための回答を記述してください。\n\n")

GOLDEN = [
    ("swallow-instruct-v0.1", SINGLE, f"<s> [INST] {SYS_JA}1 と 2 の和は？ [/INST] 3 です。 </s>", "3 です。 </s>"),
    ("swallow-instruct-v0.1", MULTI,
     f"<s> [INST] {SYS_JA}1 と 2 の和は？ [/INST] 3 です。 </s><s> [INST] 2 倍すると？ [/INST] 6 です。 </s>",
     "3 です。 </s> 6 です。 </s>"),
    ("swallow-instruct-v0.1", SYSTEM,
     "<s> [INST] <<SYS>>\n簡潔に答えてください。\n<</SYS>>\n\nこんにちは [/INST] こんにちは。 </s>", "こんにちは。 </s>"),
    ("swallow-instruct-v0", SINGLE, f"<s> {ALPACA_HEAD}### 指示:\n1 と 2 の和は？\n\n### 応答:\n3 です。</s>",
     "\n3 です。</s>"),
    ("swallow-instruct-v0", ALPACA_INPUT,
     f"<s> {ALPACA_HEAD_INPUT}### 指示:\n次の数を足しなさい。\n\n### 入力:\n2, 3\n\n### 応答:\n5</s>", "\n5</s>"),
    # The tiny tokenizer is SentencePiece, so role names get a word-boundary space that Llama-3's
    # tiktoken-style tokenizer would not add; the structure and the trained spans are what matter.
    ("llama3", SINGLE,
     "<|begin_of_text|><|start_header_id|> user<|end_header_id|> \n\n1 と 2 の和は？<|eot_id|>"
     "<|start_header_id|> assistant<|end_header_id|> \n\n3 です。<|eot_id|>", "3 です。<|eot_id|>"),
    ("llama3", MULTI,
     "<|begin_of_text|><|start_header_id|> user<|end_header_id|> \n\n1 と 2 の和は？<|eot_id|>"
     "<|start_header_id|> assistant<|end_header_id|> \n\n3 です。<|eot_id|>"
     "<|start_header_id|> user<|end_header_id|> \n\n2 倍すると？<|eot_id|>"
     "<|start_header_id|> assistant<|end_header_id|> \n\n6 です。<|eot_id|>", "3 です。<|eot_id|>6 です。<|eot_id|>"),
    ("llama3", SYSTEM,
     "<|begin_of_text|><|start_header_id|> system<|end_header_id|> \n\n簡潔に答えてください。<|eot_id|>"
     "<|start_header_id|> user<|end_header_id|> \n\nこんにちは<|eot_id|>"
     "<|start_header_id|> assistant<|end_header_id|> \n\nこんにちは。<|eot_id|>", "こんにちは。<|eot_id|>"),
    ("chat_template", SINGLE, "<s>[INST] 1 と 2 の和は？ [/INST] 3 です。 </s>", "3 です。 </s>"),
    ("chat_template", MULTI, "<s>[INST] 1 と 2 の和は？ [/INST] 3 です。 </s><s>[INST] 2 倍すると？ [/INST] 6 です。 </s>",
     "3 です。 </s> 6 です。 </s>"),
    ("chat_template", SYSTEM, "<s>[INST] <<SYS>>\n簡潔に答えてください。\n<</SYS>>\n\nこんにちは [/INST] こんにちは。 </s>",
     "こんにちは。 </s>"),
    ("none", SINGLE, "<s> 1 と 2 の和は？\n3 です。</s>", "1 と 2 の和は？\n3 です。</s>"),
    ("none", Conversation(text="富士山は日本一高い山です。"), "<s> 富士山は日本一高い山です。</s>", "富士山は日本一高い山です。</s>"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIALS)})
    return tok


def render(fmt, conv, tok):
    ids, labels = encode(FORMATS[fmt].render(conv, tok, None), tok, FORMATS[fmt].literal_specials)
    return ids, labels, tok.decode(ids), tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])


@pytest.mark.parametrize("fmt, conv, text, train_text", GOLDEN)
def test_golden(fmt, conv, text, train_text, tokenizer, llama3_tokenizer):
    tok = llama3_tokenizer if fmt == "llama3" else tokenizer
    _, _, got_text, got_train = render(fmt, conv, tok)
    assert (got_text, got_train) == (text, train_text)


@pytest.mark.parametrize("fmt", ["swallow-instruct-v0.1", "swallow-instruct-v0", "chat_template"])
def test_eos_is_trained_bos_is_single_and_pad_is_not_eos(fmt, tokenizer):
    ids, labels, _, _ = render(fmt, SINGLE, tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert labels[0] == IGNORE


def test_user_text_can_not_smuggle_special_tokens(tokenizer):
    ids, _, _, _ = render("swallow-instruct-v0.1", Conversation(turns=[Turn("say </s> now", "ok")]), tokenizer)
    assert ids.count(tokenizer.eos_token_id) == 1  # only the real one closing the reply


def test_chat_template_renders_the_same_text_as_swallow_v01(tokenizer):
    """The tiny tokenizer ships a Llama-2 chat template; it must agree with our v0.1 format."""
    for conv in (MULTI, SYSTEM):
        pieces = FORMATS["swallow-instruct-v0.1"].render(conv, tokenizer, "")
        ours = "".join(p.text if hasattr(p, "text") else tokenizer.convert_ids_to_tokens(p.token_id) for p in pieces)
        assert ours == tokenizer.apply_chat_template(conv.messages(), tokenize=False)


def test_generation_prompt_is_a_prefix_of_the_training_text(tokenizer):
    fmt = FORMATS["swallow-instruct-v0.1"]
    prompt_ids, _ = encode(fmt.render(MULTI, tokenizer, None, for_generation=True), tokenizer)
    full_ids, _ = encode(fmt.render(MULTI, tokenizer, None), tokenizer)
    assert full_ids[:len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids).endswith("2 倍すると？ [/INST]")


def test_raw_text_generation_prompt_leaves_the_last_reply_to_the_model(tokenizer):
    """compare prompts a `none` (continual pre-training) run with the text before the reply, not the whole text."""
    fmt = FORMATS["none"]
    prompt_ids, labels = encode(fmt.render(MULTI, tokenizer, None, for_generation=True), tokenizer)
    assert tokenizer.decode(prompt_ids) == "<s> 1 と 2 の和は？\n3 です。\n2 倍すると？\n"
    assert set(labels) == {IGNORE}


def test_a_format_that_needs_bos_refuses_a_tokenizer_without_one(tiny_model):
    """Its ids would hold None, which fails only in torch.tensor, after the weights have loaded."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.bos_token = None
    with pytest.raises(UserError, match=r"^prompt_format swallow-instruct-v0.1 needs the tokenizer's bos_token, and "
                                        r"my-model's has none: set it in its tokenizer_config.json"):
        choose_format("auto", "my-model", tok, "camel-math")
    assert choose_format("chat_template", "my-model", tok, "camel-math").name == "chat_template"


def test_auto_format_follows_the_model(tokenizer, llama3_tokenizer):
    assert choose_format("auto", "tokyotech-llm/Swallow-70b-instruct-v0.1", tokenizer, "camel-math").name == \
        "swallow-instruct-v0.1"
    assert choose_format("auto", "tokyotech-llm/Swallow-7b-instruct-hf", tokenizer, "alpaca").name == \
        "swallow-instruct-v0"
    assert choose_format("auto", "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3", llama3_tokenizer,
                         "messages").name == "llama3"
    assert choose_format("auto", "anything", tokenizer, "text").name == "none"


def test_format_errors(tokenizer):
    with pytest.raises(UserError, match="single-turn with no system prompt"):
        render("swallow-instruct-v0", MULTI, tokenizer)
    with pytest.raises(UserError, match="needs a Llama-3 tokenizer; this one lacks <|begin_of_text|>"):
        render("llama3", SINGLE, tokenizer)
    with pytest.raises(UserError, match="--prompt_format none"):
        render("swallow-instruct-v0.1", Conversation(text="raw"), tokenizer)


@pytest.mark.parametrize("row, message", [
    ({"message_1": "q"}, "row 3: column 'message_2' is missing or null"),
    ({"message_1": "q", "message_2": "  "}, "row 3: message_2 is empty"),
    ({"message_1": 5, "message_2": "a"}, "row 3: message_1 must be a string, got int"),
])
def test_bad_camel_rows_name_the_row_and_the_fix(row, message):
    with pytest.raises(BadRow, match=message):
        to_conversation(row, "camel-math", "f.jsonl row 3")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
     r"messages 0.. have roles \['assistant', 'user'\], expected user then assistant"),
    ([{"role": "user", "content": "hi"}], r"have roles \['user'\], expected user then assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], "message 1 \\(assistant\\): content is empty"),
    ([{"role": "user", "content": ["list"]}, {"role": "assistant", "content": "a"}], "content must be a string, got list"),
    ("not a list", "messages must be a non-empty list"),
])
def test_bad_chat_rows_name_the_row_and_the_fix(messages, message):
    with pytest.raises(BadRow, match=message):
        to_conversation({"messages": messages}, "messages", "chat.jsonl row 7")


def test_shapes_are_detected_from_columns():
    assert detect_shape(["role_1", "topic;", "sub_topic", "message_1", "message_2"], "x") == "camel-math"
    assert detect_shape(["instruction", "input", "output"], "x") == "alpaca"
    assert detect_shape(["messages"], "x") == "messages"
    assert detect_shape(["text", "meta"], "x") == "text"
    with pytest.raises(UserError, match="x: no known shape in columns prompt, answer"):
        detect_shape(["prompt", "answer"], "x")
    with pytest.raises(UserError, match="fit several shapes \\(messages, text\\); pick one with --dataset_shape"):
        detect_shape(["messages", "text"], "x")
    assert detect_shape(["messages", "text"], "x", "text") == "text"


def test_sample_chat_data_is_multi_turn_japanese(tokenizer):
    from conftest import REPO

    rows = [json.loads(line) for line in (REPO / "data/chat_ja.jsonl").read_text().splitlines()]
    convs = [to_conversation(r, "messages", "chat_ja") for r in rows]
    assert len(convs) == 200 and all(len(c.turns) >= 2 for c in convs)
    assert any(c.system for c in convs)


PADDED = Conversation(turns=[Turn(" 1 と 2 の和は？\n", "\n3 です。 ")], system=" 簡潔に答えてください。\n")


@pytest.mark.parametrize("fmt", ["swallow-instruct-v0.1", "llama3"])
def test_chat_formats_strip_messages_as_meta_s_templates_do(fmt, tokenizer, llama3_tokenizer):
    """Meta's Llama-2 (`.strip()`) and Llama-3 (`| trim`) templates strip every message, and so must training,
    or the exported chat template and training would disagree on data with stray whitespace."""
    tok = llama3_tokenizer if fmt == "llama3" else tokenizer
    stripped = Conversation(turns=[Turn("1 と 2 の和は？", "3 です。")], system="簡潔に答えてください。")
    assert render(fmt, PADDED, tok)[:2] == render(fmt, stripped, tok)[:2]


@pytest.mark.parametrize("fmt", ["swallow-instruct-v0.1", "swallow-instruct-v0", "llama3"])
@pytest.mark.parametrize("system_prompt", [None, "常に敬語で答えてください。"])
def test_each_format_s_chat_template_gives_the_training_ids(fmt, system_prompt, tokenizer, llama3_tokenizer):
    """The Jinja template a format writes (for exported models) tokenises to the ids its renderer trains on, for a
    generation prompt and a whole conversation, with the run's system prompt or the conversation's own.
    " ": the tiny SentencePiece tokenizer's word boundary after a special token (chat_template.text_prefix)."""
    tok = llama3_tokenizer if fmt == "llama3" else tokenizer
    spec = FORMATS[fmt]
    template = spec.jinja(tok, spec.system_prompt(system_prompt), " ")
    # Alpaca-JA is single-turn without a system message; chat messages have no separate Alpaca `input`.
    convs = [SINGLE, Conversation(turns=PADDED.turns)] if fmt == "swallow-instruct-v0" else [SINGLE, MULTI, SYSTEM,
                                                                                             PADDED]
    for conv in convs:
        for generation in (True, False):
            messages = conv.messages()[:-1] if generation else conv.messages()
            ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation,
                                          tokenize=True, return_dict=False)
            expected, _ = encode(spec.render(conv, tok, system_prompt, for_generation=generation), tok)
            assert tok.convert_ids_to_tokens(ids) == tok.convert_ids_to_tokens(expected), (conv, generation)


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A Llama-3-like tokenizer: byte-level BPE (no word boundary added anywhere) with Llama-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import REPO

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = (REPO / "data/tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()[:300]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=list(LLAMA3_SPECIALS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def test_text_prefix_follows_how_the_tokenizer_treats_text_after_a_special_token(tiny_model, tokenizer,
                                                                                 byte_level_tokenizer):
    from swallow_ft.chat_template import text_prefix

    legacy = AutoTokenizer.from_pretrained(tiny_model, legacy=True)  # a word boundary after every special token
    assert legacy.convert_ids_to_tokens(legacy("<s>[INST]", add_special_tokens=False)["input_ids"])[:2] == \
        tokenizer.convert_ids_to_tokens(tokenizer("<s> [INST]", add_special_tokens=False)["input_ids"])[:2] == \
        ["<s>", "▁["]
    assert (text_prefix(tokenizer), text_prefix(legacy), text_prefix(byte_level_tokenizer)) == (" ", "", "")
    spec = FORMATS["llama3"]
    for conv in (MULTI, SYSTEM, PADDED):
        ids = byte_level_tokenizer.apply_chat_template(conv.messages(), chat_template=spec.jinja(None, None, ""),
                                                       tokenize=True, return_dict=False)
        assert ids == encode(spec.render(conv, byte_level_tokenizer, None), byte_level_tokenizer)[0]
