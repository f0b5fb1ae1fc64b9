"""Write a plan into an experiment YAML (python -m swallow_ft.plan --write): the entrypoint's planned run_clm.py flags
and launcher, resources.slots_per_trial and, where the experiment has it, hyperparameters.deepspeed_config.

The file is edited as text, so that its comments and layout stay. Text edits can go wrong where YAML and sh meet: a
folded `entrypoint: >-` block, quotes, the $VAR and ~ that sh expands on the cluster, a flag spelt --flag=value or
followed by a value argparse takes with it. So the new text is read back as Determined and sh will read it, and refused
(UserError) unless it gives the planned GPUs and, word for word, the entrypoint the plan wants: the file gets that plan
or stays as it was, never a run that trains something else.
"""
import re
import shlex
from pathlib import Path
from typing import List

import yaml

from swallow_ft.errors import UserError

# The run_clm.py flags a plan sets, with how many values each takes: the entrypoint's own are dropped.
PLANNED = {"--per_device_train_batch_size": 1, "--per_device_eval_batch_size": 1, "--gradient_accumulation_steps": 1,
           "--block_size": 1, "--deepspeed": 1, "--packing": 0, "--bf16": 0, "--fp16": 0,
           "--activation_checkpointing": 0, "--gradient_checkpointing": 0, "--use_liger_kernel": 0}
# What sh expands in a word, as Experiment expands it: a variable (os.path.expandvars' pattern) or a leading ~ with
# its first slash, which must stay unquoted for sh to expand it.
_EXPANDED = re.compile(r"\$(?:\w+|\{[^}]*\})|^~[\w.-]*/?")


def _unplanned(tokens: List[str]) -> List[int]:
    """Indices of the entrypoint's words the plan does not set. A flag may be spelt --flag=value or --flag-name, and
    HfArgumentParser gives boolean fields an optional value (nargs="?"): argparse takes the word after --bf16 as its
    value unless it starts with '-', so --bf16 true goes with it."""
    from swallow_ft.arguments import FLAG_NAME, flag_fields

    fields = flag_fields()
    planned = {fields[flag]: values for flag, values in PLANNED.items()}
    keep, i = [], 0
    while i < len(tokens):
        name, eq, _ = tokens[i].partition("=")
        values = planned.get(fields.get(name)) if FLAG_NAME.match(name) else None
        if values is None:
            keep.append(i)
        elif not eq:
            i += values or (i + 1 < len(tokens) and not tokens[i + 1].startswith("-"))
        i += 1
    return keep


def _expanding(exp) -> List[set]:
    """For each word after run_clm.py, the positions of the $ and ~ that sh expands. expand=False gives a quoted '$5'
    and an unquoted $HOME alike; read again with each of them escaped, one sh would expand (unquoted, or a $ in double
    quotes) reads back bare, while in single quotes (or escaped, or a ~ in double quotes) the backslash stays."""
    from swallow_ft.experiment import Experiment

    words, entrypoint = exp.script_args(expand=False), exp.config.get("entrypoint")
    if not isinstance(entrypoint, str):  # a list runs without a shell: nothing expands
        return [set() for _ in words]
    escaped = Experiment(exp.path, {**exp.config, "entrypoint": re.sub(r"([$~])", r"\\\1", entrypoint)})
    found = []
    for word, read in zip(words, escaped.script_args(expand=False)):
        positions, j = set(), 0
        for i, char in enumerate(word):
            literal = char in "$~" and read[j] == "\\"
            positions |= {i} if char in "$~" and not literal else set()
            j += 1 + literal
        found.append(positions)
    return found


def _shell_word(word: str, expanding: set) -> str:
    """The word as sh must read it to give it back: shlex-quoted, but with what sh expanded left for it to expand. A
    variable always goes in double quotes, because sh would split an unquoted one's value on spaces, where the
    experiment's own reading of the entrypoint (Experiment.entrypoint_tokens) never does."""
    parts, last = [], 0
    for m in (m for m in _EXPANDED.finditer(word) if m.start() in expanding):
        parts += [word[last:m.start()], m[0]]
        last = m.end()
    parts.append(word[last:])
    if len(parts) == 1:
        return shlex.quote(word)
    return "".join((part if part.startswith("~") else f'"{part}"') if i % 2 else shlex.quote(part) if part else ""
                   for i, part in enumerate(parts))


def rewritten(path: Path, flags: List[str], gpus: int) -> str:
    """The experiment's text with a plan in it: its run_clm.py flags (plan.flags_for) in the entrypoint, with the same
    micro-batch for evaluation, the launcher they need, slots_per_trial and, where the experiment has it (the
    reference's and DSAT's), hyperparameters.deepspeed_config; comments stay. A UserError if reading it back would
    not give the GPUs and the entrypoint's words the plan wants."""
    from swallow_ft.experiment import Experiment

    exp = Experiment.load(path)
    words = exp.script_args(expand=False)  # $VAR stays $VAR in the file
    keep = _unplanned(words)
    at = flags.index("--per_device_train_batch_size") + 2  # evaluation takes the same micro-batch, after it
    flags = flags[:at] + ["--per_device_eval_batch_size", flags[at - 1]] + flags[at:]
    config = flags[flags.index("--deepspeed") + 1] if "--deepspeed" in flags else None
    expanding = _expanding(exp)
    args = [(words[i], _shell_word(words[i], expanding[i])) for i in keep] + [(flag, flag) for flag in flags]
    launcher = ("python3 -m determined.launch.deepspeed\n  " if config
                else "python3 -m determined.launch.torch_distributed\n  " if gpus > 1 else "")
    lines, i = [], 0
    while i < len(args):
        takes_value = i + 1 < len(args) and not args[i + 1][0].startswith("--")
        lines.append(" ".join(shell for _, shell in args[i:i + 2]) if takes_value else args[i][1])
        i += 2 if takes_value else 1
    block = "entrypoint: >-\n  " + launcher + "python3 run_clm.py\n" + "".join(f"  {line}\n" for line in lines)
    text = re.sub(r"^entrypoint: >-\n(?:  .*(?:\n|$))+", lambda _: block, path.read_text(), count=1, flags=re.M)
    # The key itself, not a mention of it in a comment (local_tiny_ds3.yaml's header has one).
    text = re.sub(r"^( +slots_per_trial:[ \t]*)\d+", rf"\g<1>{gpus}", text, count=1, flags=re.M)
    # DSAT tunes the file this hyperparameter names, and the Web UI shows it as the run's DeepSpeed config.
    text = re.sub(r"^( +deepspeed_config: ).*\n", lambda m: f"{m[1]}{config}\n" if config else "", text, count=1,
                  flags=re.M)
    new, head = Experiment(path, yaml.safe_load(text)), launcher.split() + ["python3", "run_clm.py"]
    if new.slots_per_trial != gpus:
        raise UserError(f"--write {path}: resources has no `slots_per_trial: N` line to set to {gpus}: add one, as "
                        f"experiments/swallow_7b.yaml has, or plan for --gpus {exp.slots_per_trial}")
    if any(new.entrypoint_tokens(expand) != head + [exp.script_args(expand)[i] for i in keep] + flags
           for expand in (False, True)):
        raise UserError(f"--write {path}: its entrypoint cannot be rewritten word for word: write it as an "
                        "`entrypoint: >-` block, one flag and its value per line, as experiments/swallow_7b.yaml does")
    return text


def write_into(path: Path, flags: List[str], gpus: int) -> None:
    path.write_text(rewritten(path, flags, gpus))
