"""Prompt formats: how a conversation becomes text pieces, and which pieces are trained.

A format renders a conversation into a list of pieces: `Text` (tokenised later, as one string with
its neighbours, so training sees exactly the tokens inference will) and `Special` (a token id from
the tokenizer's vocabulary, so user text that happens to contain "</s>" can never become a real EOS).
`trained` marks what the loss sees: assistant replies and the token that closes each reply.

Each chat format also writes itself as a Jinja chat template (for `apply_chat_template`, vLLM, TGI), here beside
its renderer so that the two cannot drift apart; swallow_ft/chat_template.py checks them token for token on export.
"""

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Union

from swallow_ft.errors import UserError

SWALLOW_SYSTEM_PROMPT = "あなたは誠実で優秀な日本人のアシスタントです。"
ALPACA_JA_NO_INPUT = ("以下に、あるタスクを説明する指示があります。"
                      "リクエストを適切に完了するための回答を記述してください。\n\n")
ALPACA_JA_WITH_INPUT = ("以下に、あるタスクを説明する指示があり、それに付随する入力が更なる文脈を提供しています。"
                        "リクエストを適切に完了するための回答を記述してください。\n\n")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Conversation:
    """One training example, whatever the dataset's shape. `text` alone means raw text."""

    turns: List[Turn] = field(default_factory=list)
    system: Optional[str] = None
    input: Optional[str] = None  # Alpaca's optional context, kept apart for the Alpaca-JA template
    text: Optional[str] = None

    def messages(self) -> List[Dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for i, turn in enumerate(self.turns):
            user = turn.user if not (i == 0 and self.input) else f"{turn.user}\n\n{self.input}"
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": turn.assistant}]
        return out


class Text(NamedTuple):
    text: str
    trained: bool = False


class Special(NamedTuple):
    token_id: int
    trained: bool = False


Piece = Union[Text, Special]


@dataclass
class PromptFormat:
    name: str
    render: Callable  # (conversation, tokenizer, system_prompt, for_generation) -> List[Piece]
    # chat templates write special tokens as text ("<s>"), so their text must be parsed for them
    literal_specials: bool = False
    default_system: Optional[str] = None  # what render uses when --system_prompt is not given
    takes_system: bool = True  # False: render ignores --system_prompt
    # (tokenizer, system prompt trained with, text_prefix) -> the Jinja chat template rendering this format;
    # None: the format has no chat form (raw text). text_prefix: see swallow_ft.chat_template.text_prefix.
    jinja: Optional[Callable] = None

    def system_prompt(self, requested: Optional[str]) -> Optional[str]:
        """The system prompt this format renders for --system_prompt `requested` (None: not given)."""
        if not self.takes_system:
            return None
        return self.default_system if requested is None else requested


def _require_chat(conv: Conversation, fmt: str) -> None:
    if conv.text is not None:
        raise UserError(f"prompt_format {fmt} needs conversations; rows with only a `text` column need "
                        "--prompt_format none")


def _open_turns(conv: Conversation, for_generation: bool) -> List[tuple]:
    """(user, assistant or None): with for_generation the last reply is left for the model."""
    turns = [(t.user, t.assistant) for t in conv.turns]
    if for_generation:
        turns[-1] = (turns[-1][0], None)
    return turns


def _system(conv: Conversation, default: Optional[str]) -> str:
    """The conversation's own system message, else the run's system prompt; stripped, as Meta's templates do."""
    return (conv.system if conv.system is not None else default or "").strip()


def render_llama2_chat(conv, tokenizer, system_prompt, for_generation=False) -> List[Piece]:
    """Swallow-*-instruct-v0.1: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s>`.

    Messages are stripped, as Meta's Llama-2 chat code and template do (`.strip()`), so that a stray newline in
    the data trains the same tokens that a chat template (jinja_llama2_chat) serves.
    """
    _require_chat(conv, "swallow-instruct-v0.1")
    system = _system(conv, FORMATS["swallow-instruct-v0.1"].system_prompt(system_prompt))
    pieces: List[Piece] = []
    for i, (user, reply) in enumerate(_open_turns(conv, for_generation)):
        if i == 0 and conv.input:
            user = f"{user}\n\n{conv.input}"
        user = user.strip()
        if i == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        pieces += [Special(tokenizer.bos_token_id), Text(f"[INST] {user} [/INST]")]
        if reply is not None:
            pieces += [Text(f" {reply.strip()} ", trained=True), Special(tokenizer.eos_token_id, trained=True)]
    return pieces


def render_alpaca_ja(conv, tokenizer, system_prompt, for_generation=False) -> List[Piece]:
    """Swallow-*-instruct-hf (v0): the Japanese Alpaca text format, single turn."""
    _require_chat(conv, "swallow-instruct-v0")
    if len(conv.turns) != 1 or conv.system:
        raise UserError("prompt_format swallow-instruct-v0 (Alpaca-JA) is single-turn with no system prompt; "
                        "use swallow-instruct-v0.1 or llama3 for multi-turn or system messages")
    (instruction, reply), = _open_turns(conv, for_generation)
    header = ALPACA_JA_WITH_INPUT if conv.input else ALPACA_JA_NO_INPUT
    body = f"### 指示:\n{instruction}\n\n" + (f"### 入力:\n{conv.input}\n\n" if conv.input else "") + "### 応答:"
    pieces: List[Piece] = [Special(tokenizer.bos_token_id), Text(header + body)]
    if reply is not None:
        pieces += [Text(f"\n{reply}", trained=True), Special(tokenizer.eos_token_id, trained=True)]
    return pieces


def render_llama3(conv, tokenizer, system_prompt, for_generation=False) -> List[Piece]:
    """Llama-3(.1)-Swallow-Instruct: header blocks closed by <|eot_id|>."""
    _require_chat(conv, "llama3")
    ids = dict(zip(LLAMA3_SPECIALS, tokenizer.convert_tokens_to_ids(list(LLAMA3_SPECIALS))))
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise UserError(f"prompt_format llama3 needs a Llama-3 tokenizer; this one lacks {', '.join(missing)}")

    def block(role, content, trained=False):
        return [Special(ids["<|start_header_id|>"]), Text(role), Special(ids["<|end_header_id|>"]),
                Text("\n\n"), Text(content, trained), Special(ids["<|eot_id|>"], trained)]

    # Contents stripped as Meta's Llama-3 template does (`message['content'] | trim`).
    system = _system(conv, system_prompt)
    pieces: List[Piece] = [Special(ids["<|begin_of_text|>"])] + (block("system", system) if system else [])
    for i, (user, reply) in enumerate(_open_turns(conv, for_generation)):
        pieces += block("user", (f"{user}\n\n{conv.input}" if i == 0 and conv.input else user).strip())
        if reply is None:
            pieces += [Special(ids["<|start_header_id|>"]), Text("assistant"), Special(ids["<|end_header_id|>"]),
                       Text("\n\n")]
        else:
            pieces += block("assistant", reply.strip(), trained=True)
    return pieces


def render_chat_template(conv, tokenizer, system_prompt, for_generation=False) -> List[Piece]:
    """The tokenizer's own Jinja chat template; replies are found by rendering growing prefixes."""
    _require_chat(conv, "chat_template")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--prompt_format chat_template: this tokenizer has no chat_template; pick a named format")
    messages = conv.messages() if conv.system or not system_prompt else (
        [{"role": "system", "content": system_prompt}] + conv.messages())
    if for_generation:
        messages = messages[:-1]

    def render(msgs, generation=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    full = render(messages, generation=for_generation)
    pieces: List[Piece] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], generation=True), render(messages[:i + 1])
        if not (through.startswith(prompt) and full.startswith(through)):
            raise UserError("this chat_template does not render conversations as growing prefixes, so the replies "
                            "cannot be located; use a named --prompt_format")
        pieces += [Text(full[done:len(prompt)]), Text(through[len(prompt):], trained=True)]
        done = len(through)
    return pieces + [Text(full[done:])]


def render_raw(conv, tokenizer, system_prompt, for_generation=False) -> List[Piece]:
    """Continual pre-training on raw text: everything is trained, as HF run_clm did. For generation (compare) the
    text up to the last reply, for the model to continue: without it the prompt would hold the answer."""
    if conv.text is not None:
        return [Special(tokenizer.bos_token_id), Text(conv.text, trained=True),
                Special(tokenizer.eos_token_id, trained=True)]
    parts = [part for i, (user, reply) in enumerate(_open_turns(conv, for_generation))
             for part in (user, conv.input if i == 0 else None, reply) if part]
    if for_generation:
        return [Special(tokenizer.bos_token_id), Text("\n".join(parts) + "\n")]
    return [Special(tokenizer.bos_token_id), Text("\n".join(parts), trained=True),
            Special(tokenizer.eos_token_id, trained=True)]


# ----- the same formats as Jinja chat templates ---------------------------------------------------
# Each mirrors its renderer above piece for piece. All text is written as {{ '...' }} expressions, never as bare
# template text, because transformers compiles templates with trim_blocks, which would eat a newline after a tag.
# `p` is the text that follows a special token wherever the renderer starts a new Text run: the renderer
# tokenises that run on its own (SentencePiece then prefixes a word boundary), the template as part of one string.
def _lit(text: str) -> str:
    """A Jinja string literal: JSON's escapes are a subset of the ones Jinja decodes."""
    return json.dumps(text, ensure_ascii=False)


def _jinja_system(system_prompt: Optional[str]) -> str:
    """Sets `system` (as _system does) and drops a leading system message from `messages`."""
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
            "{%- else -%}{%- set system = " + _lit((system_prompt or "").strip()) + " -%}{%- endif -%}")


_ALTERNATE = ("{%- if message['role'] not in ('user', 'assistant') or (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) -%}{{ raise_exception('after an optional system message, roles must "
              "alternate user, assistant, user, ...') }}{%- endif -%}")


def jinja_llama2_chat(tokenizer, system_prompt, p: str) -> str:
    return (_jinja_system(system_prompt) + "{%- for message in messages -%}" + _ALTERNATE +
            "{%- if message['role'] == 'user' -%}{{ bos_token + " + _lit(p + "[INST] ") + " }}"
            "{%- if loop.first and system -%}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif -%}"
            "{{ message['content'] | trim + ' [/INST]' }}"
            "{%- else -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif -%}{%- endfor -%}")


def jinja_alpaca_ja(tokenizer, system_prompt, p: str) -> str:
    return ("{%- if messages | length not in (1, 2) or messages[0]['role'] != 'user' or messages | length == 2 "
            "and messages[1]['role'] != 'assistant' -%}{{ raise_exception('swallow-instruct-v0 (Alpaca-JA) is "
            "single-turn with no system prompt: one user message, then the reply') }}{%- endif -%}"
            "{{ bos_token + " + _lit(p + ALPACA_JA_NO_INPUT + "### 指示:\n") + " + messages[0]['content'] + "
            "'\\n\\n### 応答:' }}"
            "{%- if messages | length == 2 -%}{{ '\\n' + messages[1]['content'] + eos_token }}{%- endif -%}")


def jinja_llama3(tokenizer, system_prompt, p: str) -> str:
    def header(role):
        return _lit("<|start_header_id|>" + p) + f" + {role} + " + _lit("<|end_header_id|>" + p + "\n\n")

    return ("{{ '<|begin_of_text|>' }}" + _jinja_system(system_prompt) +
            "{%- if system -%}{{ " + header("'system'") + " + system + '<|eot_id|>' }}{%- endif -%}"
            "{%- for message in messages -%}" + _ALTERNATE +
            "{{ " + header("message['role']") + " + message['content'] | trim + '<|eot_id|>' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + header("'assistant'") + " }}{%- endif -%}")


def jinja_own(tokenizer, system_prompt, p: str) -> Optional[str]:
    """The tokenizer's own template, given the run's system prompt when the messages bring none (as
    render_chat_template does); None when its template is not a single string."""
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str) or not system_prompt:
        return own if isinstance(own, str) else None
    return ("{%- if not (messages and messages[0]['role'] == 'system' and messages[0]['content']) -%}"
            "{%- set messages = [{'role': 'system', 'content': " + _lit(system_prompt) + "}] + (messages[1:] "
            "if messages and messages[0]['role'] == 'system' else messages) -%}{%- endif %}" + own)


FORMATS = {
    "swallow-instruct-v0.1": PromptFormat("swallow-instruct-v0.1", render_llama2_chat,
                                          default_system=SWALLOW_SYSTEM_PROMPT, jinja=jinja_llama2_chat),
    "swallow-instruct-v0": PromptFormat("swallow-instruct-v0", render_alpaca_ja, takes_system=False,
                                        jinja=jinja_alpaca_ja),
    "llama3": PromptFormat("llama3", render_llama3, jinja=jinja_llama3),
    "chat_template": PromptFormat("chat_template", render_chat_template, literal_specials=True, jinja=jinja_own),
    "none": PromptFormat("none", render_raw, takes_system=False),
}


def choose_format(requested: str, model_name: str, tokenizer, shape: str) -> PromptFormat:
    """`auto` picks the format the model was instruction-tuned with, from its name and vocabulary."""
    fmt = _choose_format(requested, model_name, tokenizer, shape)
    # Every format but llama3 (its own <|begin_of_text|>) and chat_template (the template's text) opens with BOS
    # and closes with EOS by id: without them the ids would hold None, found only once the weights have loaded.
    if fmt.name not in ("llama3", "chat_template"):
        missing = [name for name in ("bos_token", "eos_token") if getattr(tokenizer, f"{name}_id") is None]
        if missing:
            raise UserError(f"prompt_format {fmt.name} needs the tokenizer's {' and '.join(missing)}, and "
                            f"{model_name}'s has none: set it in its tokenizer_config.json, or choose "
                            "--prompt_format chat_template")
    return fmt


def _choose_format(requested: str, model_name: str, tokenizer, shape: str) -> PromptFormat:
    if requested != "auto":
        if requested not in FORMATS:
            raise UserError(f"--prompt_format {requested!r} is not one of auto, {', '.join(FORMATS)}")
        return FORMATS[requested]
    name = model_name.lower()
    if shape == "text":
        return FORMATS["none"]
    if "<|eot_id|>" in tokenizer.get_vocab() or "llama-3" in name:
        return FORMATS["llama3"]
    if "instruct-hf" in name or "instruct-v0" in name and "instruct-v0.1" not in name:
        return FORMATS["swallow-instruct-v0"]
    return FORMATS["swallow-instruct-v0.1"]  # the seed's model; also the Llama-2 family's own chat format
