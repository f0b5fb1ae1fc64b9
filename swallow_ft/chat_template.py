"""The exported model's chat template: the run's prompt format and system prompt as Jinja, checked token for token.

Servers (vLLM, TGI, transformers' pipeline) prompt a model through `tokenizer.apply_chat_template`. The base's own
template would add a system block only when the caller passes one, where training always rendered the run's system
prompt; and it tokenises `<s>[INST] ...` as one string, where training tokenises the text after each special token
on its own (SentencePiece then starts it with a word boundary: `<s> ▁[ INST`, not `<s> [ INST`). Either way a served
model would be prompted with tokens it was never trained on. export therefore writes the template that
templates.PromptFormat.jinja generates and checks, on sample conversations, that apply_chat_template returns exactly
the ids that training's renderer gives (the ids compare generates from).
"""

from pathlib import Path
from typing import List, Optional, Tuple

from jinja2 import TemplateError

from swallow_ft.data.encoding import IGNORE, encode
from swallow_ft.data.templates import FORMATS, LLAMA3_SPECIALS, Conversation, PromptFormat, Turn
from swallow_ft.errors import UserError

# Single- and multi-turn, with and without a system message of their own, and with whitespace round the messages
# (stripped by the chat formats, kept by Alpaca-JA): each is checked as a generation prompt and as a whole.
SAMPLES = (
    Conversation(turns=[Turn("81 と 70 の和を求めなさい。", "151 です。")]),
    Conversation(turns=[Turn(" 富士山の高さは？\n", "3776 m です。\n")]),
    Conversation(turns=[Turn("1 と 2 の和は？", "3 です。"), Turn("2 倍すると？", "6 です。"),
                        Turn("Thanks!", "You're welcome.")]),
    Conversation(turns=[Turn("こんにちは", "こんにちは。"), Turn("元気？", "元気です。")],
                 system="簡潔に答えてください。\n"),
)
# Texts that follow a special token in the formats (a text run's first characters).
PROBES = ("[INST]", "user", "\n\n", "以下")


def text_prefix(tokenizer) -> Optional[str]:
    """What a template writes after a special token so that the text after it tokenises as it does on its own.

    " " for SentencePiece tokenizers that add a word boundary only at the start of a string (transformers 5's
    LlamaTokenizer, legacy=False); "" for legacy ones (which add it after every special token too) and for
    byte-level BPE (Llama-3), which adds none. None when neither gives training's tokens.
    """
    special = tokenizer.bos_token or tokenizer.eos_token
    if special is None:
        return None
    special_id = tokenizer.convert_tokens_to_ids(special)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return next((p for p in ("", " ") if all(ids(special + p + probe) == [special_id] + ids(probe)
                                             for probe in PROBES)), None)


def training_cases(fmt: PromptFormat, tokenizer, system_prompt: Optional[str]) -> List[Tuple[list, bool, List[int]]]:
    """(messages, add_generation_prompt, the ids training's renderer gives) for each sample the format renders."""
    cases = []
    for conv in SAMPLES:
        for for_generation in (True, False):
            try:
                ids, _ = encode(fmt.render(conv, tokenizer, system_prompt, for_generation), tokenizer,
                                fmt.literal_specials)
            # A conversation the format cannot hold: Alpaca-JA is single-turn, and a tokenizer's own template may
            # reject a system message (Mistral's and Gemma's "System role not supported"), so the run trained on none.
            except (UserError, TemplateError):
                continue
            messages = conv.messages()
            cases.append((messages[:-1] if for_generation else messages, for_generation, ids))
    return cases


def stop_token_ids(tokenizer, generation_config=None, fmt: Optional[PromptFormat] = None,
                   system_prompt: Optional[str] = None) -> List[int]:
    """The ids that end a reply: the tokenizer's EOS, Llama-3's <|eot_id|>, the token that closes a trained reply in
    FMT, and every EOS id of GENERATION_CONFIG (Llama-3.1-style configs list several: 128001, 128008, 128009).
    compare stops generating at them; export lists them in generation_config.json, so that servers stop there too."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids(LLAMA3_SPECIALS[-1])
    if eot is not None and eot != tokenizer.unk_token_id:
        ids.add(eot)
    if fmt is not None:
        ids.add(closing_token_id(fmt, tokenizer, system_prompt))
    ids.update(_eos_ids(generation_config))
    return sorted(i for i in ids if i is not None)


def _eos_ids(generation_config) -> List[int]:
    """A generation config's eos_token_id, which is one id, a list of them or None, as a list."""
    configured = getattr(generation_config, "eos_token_id", None)
    return list(configured) if isinstance(configured, (list, tuple)) else [configured]


def closing_token_id(fmt: PromptFormat, tokenizer, system_prompt: Optional[str] = None) -> Optional[int]:
    """The special token that closes a trained reply in FMT (</s>, Llama-3's <|eot_id|>, a ChatML template's
    <|im_end|>, which may be followed by trained text such as a newline); None when none does."""
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    try:
        ids, labels = encode(fmt.render(SAMPLES[0], tokenizer, system_prompt), tokenizer, fmt.literal_specials)
    except (UserError, TemplateError):
        return None
    return next((i for i, label in zip(reversed(ids), reversed(labels)) if label != IGNORE and i in specials), None)


def first_mismatch(tokenizer, cases) -> Optional[str]:
    """Where the tokenizer's apply_chat_template first differs from the training ids of CASES; None if nowhere."""
    for n, (messages, generation, expected) in enumerate(cases, 1):
        where = f"sample {n}, add_generation_prompt={generation}"
        try:
            got = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                                return_dict=False)
        except TemplateError as exc:
            return f"{where}: the template fails ({exc})"
        if got != expected:
            i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))

            def token(ids):
                return repr(tokenizer.convert_ids_to_tokens(ids[i])) if i < len(ids) else "the end"

            return f"{where}: token {i} is {token(got)} where training has {token(expected)}"
    return None


def save_tokenizer(tokenizer, directory: Path, settings: dict) -> str:
    """Save TOKENIZER to DIRECTORY with the chat template of the run's prompt SETTINGS (its user_data.json's
    prompt_format and system_prompt); returns export's line about it, "warning: ..." if it cannot give training's
    ids."""
    from transformers import AutoTokenizer

    name = settings.get("prompt_format")
    fmt = FORMATS.get(name)
    if fmt is None or fmt.jinja is None:
        tokenizer.save_pretrained(directory)
        why = f"the run trained on raw text, prompt_format {name}" if fmt else "user_data.json records no prompt format"
        return f"chat template: the checkpoint tokenizer's, unchanged ({why})"
    system = fmt.system_prompt(settings.get("system_prompt"))
    cases = training_cases(fmt, tokenizer, system)  # before the template changes: chat_template renders with it
    # The prefix is found on the tokenizer as it loads from the written files, and checked there too: a saved
    # tokenizer need not tokenise as the one in memory (transformers 5 drops LlamaTokenizer's legacy=True on save).
    tokenizer.save_pretrained(directory)
    template = fmt.jinja(tokenizer, system, text_prefix(AutoTokenizer.from_pretrained(directory)) or "")
    if template is not None:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(directory)
    problem = first_mismatch(AutoTokenizer.from_pretrained(directory), cases)
    if problem or template is None or not cases:
        reason = problem or ("the tokenizer's chat_template is not one string" if template is None
                             else "no sample conversation renders in this format")
        return (f"warning: chat template: apply_chat_template does not give the token ids the run trained on "
                f"({reason}); prompt this model with ids rendered by swallow_ft.data.templates, as compare does")
    with_system = "the run's system prompt when the messages bring none" if system else "no default system prompt"
    return (f"chat template: the run's {name} format with {with_system}; apply_chat_template gives training's "
            f"token ids (checked on {len(cases)} sample prompts)")


def save_stop_tokens(tokenizer, directory: Path, settings: dict) -> Optional[str]:
    """Add the ids that end the run's replies (stop_token_ids) to DIRECTORY's generation_config.json, which vLLM, TGI
    and pipeline stop at: a Llama-3 base trained in the llama3 format ends its replies with <|eot_id|>, where the
    base's config lists only <|end_of_text|>. Returns export's line about it; None when nothing was added, or when
    there is no config (an adapter: the base's own applies)."""
    from transformers import GenerationConfig

    if not (Path(directory) / "generation_config.json").is_file():
        return None
    config = GenerationConfig.from_pretrained(directory)
    fmt = FORMATS.get(settings.get("prompt_format"))
    ids = stop_token_ids(tokenizer, config, fmt, fmt and fmt.system_prompt(settings.get("system_prompt")))
    added = [i for i in ids if i not in _eos_ids(config)]
    if not added:
        return None
    config.eos_token_id = ids if len(ids) > 1 else ids[0]
    config.save_pretrained(directory)
    return (f"generation config: eos_token_id {ids}, with {', '.join(tokenizer.convert_ids_to_tokens(added))} "
            "added, so that servers stop where the run's replies end")
