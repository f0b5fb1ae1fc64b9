"""Command-line arguments: the seed's dataclasses, parsed with HfArgumentParser.

Flags come from three places, appended in this order so that later ones win (argparse keeps the last
occurrence): the entrypoint's arguments after `run_clm.py`, `hyperparameters.training_arguments`
(the Determined searcher's sampled values), and, in local mode, the user's command-line overrides.
"""

import argparse
import difflib
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from transformers import HfArgumentParser, TrainingArguments

from swallow_ft.errors import UserError
from swallow_ft.memory import lora_target_names

REGIONAL_COMPILATION = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
# Under torch.compile Liger supplies only its fused loss, which runs outside the compiled layers; inside them inductor
# fuses RMSNorm, SwiGLU and RoPE itself, and Liger's Triton versions of those break or drift under torch.compile
# (linkedin/Liger-Kernel#174).
LIGER_UNDER_COMPILE = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "swiglu": False,
                       "rope": False}
ATTENTION_KERNELS = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Hub id or local directory of the base model, e.g. tokyotech-llm/Swallow-7b-instruct-v0.1."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to use when it differs from --model_name_or_path."})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to keep models downloaded from the Hub (default: HF_HOME)."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "dtype of the loaded base weights (default: 16 bits under --bf16/--fp16 for a LoRA base or "
                          "under DeepSpeed, else float32).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "Attention kernel. auto: flex_attention for packed rows on an Ampere or newer GPU (not "
                          "under ZeRO-3), else sdpa.", "choices": list(ATTENTION_KERNELS)})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped in the model repo. Off: Swallow needs none."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) on a frozen base instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA path. 0 (as in LLaMA-Factory and torchtune) skips a copy of every "
                          "adapted layer's input: part of the measured default in bench/RESULTS.md."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear."})

    @property
    def lora_targets(self) -> Union[str, List[str]]:
        """--lora_target_modules as peft and the memory model take it: "all-linear", or a list of module names."""
        return lora_target_names(self.lora_target_modules)


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset id, e.g. camel-ai/math (on the cluster, or cached)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local json/jsonl/csv/parquet file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation file."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the train split held out for eval when there is no validation split."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the train set (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the eval set."})
    dataset_shape: str = field(
        default="auto", metadata={"help": "Row shape: auto, camel-math, alpaca, messages or text.",
                                  "choices": ["auto", "camel-math", "alpaca", "messages", "text"]})
    prompt_format: str = field(
        default="auto",
        metadata={"help": "How rows are rendered: auto (from the model), swallow-instruct-v0.1 (Llama-2 chat), "
                          "swallow-instruct-v0 (Alpaca-JA), llama3, chat_template (the tokenizer's) or none "
                          "(raw text).",
                  "choices": ["auto", "swallow-instruct-v0.1", "swallow-instruct-v0", "llama3", "chat_template",
                              "none"]})
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System prompt for rows without one (swallow-instruct-v0.1 default: "
                                        "あなたは誠実で優秀な日本人のアシスタントです。; '' for none)."})
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Longest tokenised example / packed row (default: min(model max length, 2048))."})
    packing: bool = field(
        default=False, metadata={"help": "Pack examples into block_size rows (position_ids restart per example, "
                                         "no cross-example attention)."})
    overlong: str = field(
        default="truncate", metadata={"help": "Examples longer than block_size: truncate or drop.",
                                      "choices": ["truncate", "drop"]})
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip and count malformed rows instead of stopping at the first one."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenising."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenise instead of using the datasets cache."})


# Flags that existed in transformers 4 and are gone in 5, with what to do instead.
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy"}
REMOVED_FLAGS = {
    "--overwrite_output_dir": "resuming is decided by Determined on a cluster and by --fresh locally",
    "--logging_dir": "TensorBoard files go to the Determined TensorBoard path (runs/<name>/tensorboard locally)",
    "--use_auth_token": "set HF_TOKEN in the environment instead",
    "--token": "set HF_TOKEN in the environment instead; tokens never belong in flags or hyperparameters",
}
# Flags that still exist but would carry a secret into runs/<name>/flags.json, every checkpoint's training_args.bin
# and printed resume commands. hub_token is the only TrainingArguments field holding a secret in transformers 5.24.
REFUSED_FLAGS = {"--hub_token": REMOVED_FLAGS["--token"]}
DATACLASSES = (ModelArguments, DataTrainingArguments, TrainingArguments)


LOCAL_USAGE = ("Without a Determined cluster: python run_clm.py --config EXPERIMENT.yaml [--fresh] [--runs_dir runs] "
               "[any flag above, to override the experiment's]. --fresh forgets the experiment's checkpoints.")


class _Parser(HfArgumentParser):
    def __init__(self, dataclass_types):
        # No abbreviations: --hub_tok would otherwise reach the refused --hub_token, and --learning_rat be taken
        # silently for --learning_rate.
        super().__init__(dataclass_types, epilog=LOCAL_USAGE, allow_abbrev=False)

    def error(self, message):  # argparse would print the whole usage and exit; one line is enough
        raise UserError(f"run_clm.py: {message}")

    def _check_value(self, action, value):
        # argparse lists the choices but leaves the user to spot the near miss: --prompt_format llama-3 for llama3.
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}; did you mean {close[0]}?") from None


def dict2args(hparams: Dict[str, Any]) -> List[str]:
    """{"learning_rate": 1e-5} -> ["--learning_rate", "1e-5"] (the seed's helper)."""
    out = []
    for key, value in hparams.items():
        out.extend([f"--{key}", str(value)])
    return out


@functools.lru_cache(maxsize=1)
def flag_fields() -> Dict[str, str]:
    """Every spelling of every run_clm.py flag (--x_y, --x-y, --no_x) -> the dataclass field it sets."""
    return {flag: action.dest for action in HfArgumentParser(DATACLASSES)._actions
            for flag in action.option_strings if flag.startswith("--")}


FLAG_NAME = re.compile(r"--[A-Za-z_][\w-]*$")


def field_of(arg: str) -> Optional[str]:
    """The dataclass field a command-line word sets, in any spelling argparse takes (--x_y, --x-y, --no_x, --x=v,
    a renamed flag's old name); None for a value or an unknown flag."""
    name = arg.partition("=")[0]
    name = RENAMED_FLAGS.get(underscored(name), name)
    return flag_fields().get(name)


def given_fields(args: Sequence[str]) -> set:
    """The fields that args set, however each flag is spelt."""
    return {name for name in map(field_of, args) if name}


def flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    """The value args give a flag that takes one (--flag v or --flag=v, any spelling), None if they do not. The last
    occurrence wins, as in argparse, which is what run_clm.py will use."""
    wanted, value = field_of(flag), None
    if wanted is None:
        raise ValueError(f"{flag} is not a run_clm.py flag")
    words = split_equals(args)
    for word, following in zip(words, words[1:]):
        # --no_x sets field x too, but takes no value: the word after it is another flag
        if FLAG_NAME.match(word) and field_of(word) == wanted and underscored(word) != f"--no_{wanted}":
            value = following
    return value


def without_deepspeed(flags: Sequence[str]) -> List[str]:
    """The flags less --deepspeed: reading its config needs the ranks' process group, so a check made before they
    start (the local launcher, the preflight) parses the rest and reads the file itself."""
    out, skip = [], False
    for flag in split_equals(flags):
        if skip:
            skip = False
        elif field_of(flag) == "deepspeed":
            skip = True
        else:
            out.append(flag)
    return out


def is_chief_process() -> bool:
    """Rank 0, or the only process: the one that prints what every rank would. The launchers set RANK before
    run_clm.py starts, so this holds before anything is parsed."""
    return os.environ.get("RANK", "0") == "0"


def split_equals(args: Sequence[str]) -> List[str]:
    """--flag=value as --flag value, the form every check here looks for (argparse takes both)."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        out += [name, value] if eq and FLAG_NAME.match(name) else [arg]
    return out


def normalize_flags(args: Sequence[str]) -> List[str]:
    """Map renamed flags to their new names and refuse removed ones with the replacement."""
    out = []
    for arg in split_equals(args):
        name, eq, value = arg.partition("=")
        canonical = underscored(name)  # argparse takes --hub-token for --hub_token too
        if canonical in REFUSED_FLAGS:
            raise UserError(f"{name} is refused: remove it ({REFUSED_FLAGS[canonical]})")
        if canonical in REMOVED_FLAGS:
            raise UserError(f"{name} no longer exists in transformers 5: remove it ({REMOVED_FLAGS[canonical]})")
        out.append(RENAMED_FLAGS.get(canonical, name) + eq + value)
    return out


def underscored(arg: str) -> str:
    """A flag's --x_y spelling, without any =value: --x-y=1 -> --x_y."""
    name = arg.partition("=")[0]
    return "--" + name[2:].replace("-", "_") if name.startswith("--") else arg


def _unknown_flag_error(unknown: Sequence[str]) -> UserError:
    flags = [a for a in unknown if a.startswith("-")] or list(unknown)
    hints = []
    # Every flag is known in two spellings, --learning_rate and --learning-rate: suggest each once, and never a
    # refused one.
    candidates = sorted({underscored(f) for f in flag_fields()} - set(REFUSED_FLAGS))
    for flag in flags:
        close = difflib.get_close_matches(underscored(flag), candidates, n=2)
        hints.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
    return UserError(f"unknown run_clm.py flag(s): {', '.join(hints)}; `python run_clm.py --help` lists them")


def parse_input_arguments(
    hparams: Dict[str, Any], argv: Optional[Sequence[str]] = None
) -> Tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse entrypoint flags plus `hparams["training_arguments"]` into the three dataclasses."""
    args = list(sys.argv[1:] if argv is None else argv)
    args.extend(dict2args(hparams.get("training_arguments") or {}))
    args = normalize_flags(args)
    given = given_fields(args)
    if "deepspeed" in given:
        args = _apply_dsat_overwrites(args, hparams)
    try:
        model_args, data_args, training_args, unknown = _Parser(DATACLASSES).parse_args_into_dataclasses(
            args, return_remaining_strings=True, look_for_args_file=False)
    except UserError:
        raise
    except ValueError as exc:  # TrainingArguments.__post_init__ rejecting a combination of flags
        raise UserError(f"invalid training flags: {' '.join(str(exc).split())}") from exc
    if unknown:
        raise _unknown_flag_error(unknown)
    if training_args.activation_checkpointing_kwargs is None:
        # Non-reentrant checkpointing works with frozen (LoRA) inputs without enable_input_require_grads.
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
        training_args.gradient_checkpointing_kwargs = training_args.activation_checkpointing_kwargs
    if "include_num_input_tokens_seen" not in given:
        training_args.include_num_input_tokens_seen = "non_padding"  # feeds tokens/s in the callback
    if "logging_nan_inf_filter" not in given:
        # The filter reads every micro-step's loss on the host, which makes the host wait for the GPU's backward before
        # it may queue the optimizer step; without it a diverged run logs nan instead of hiding it.
        training_args.logging_nan_inf_filter = False
    if model_args.use_lora and "ddp_find_unused_parameters" not in given:
        # The Trainer has DDP search for unused parameters in any model that is not a PreTrainedModel, a PeftModel
        # included: a walk of the autograd graph at every backward, for nothing, since every adapter gets a gradient.
        training_args.ddp_find_unused_parameters = False
    if training_args.torch_compile:
        # accelerate's regional compilation: one decoder layer is compiled and its code reused by all 32-80, where a
        # whole-model compile traces every layer into one graph and its compile time grows with depth. Read by the
        # Trainer's TorchDynamoPlugin; ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=false compiles the whole model.
        os.environ.setdefault(REGIONAL_COMPILATION, "true")
        if training_args.use_liger_kernel and training_args.liger_kernel_config is None:
            training_args.liger_kernel_config = dict(LIGER_UNDER_COMPILE)
    for paths, key in ((model_args, "model_name_or_path"), (model_args, "tokenizer_name"), (model_args, "cache_dir")):
        value = getattr(paths, key)
        if value and value.startswith("~"):  # a YAML value or --flag=~/x reaches us without a shell to expand it
            setattr(paths, key, os.path.expanduser(value))
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def parse_model_and_data(args: Sequence[str]) -> Tuple[ModelArguments, DataTrainingArguments]:
    """run_clm.py's model and data flags, for tools that train nothing: its training flags are taken and ignored,
    and anything else refused as run_clm.py refuses it."""
    model_args, data_args, rest = _Parser((ModelArguments, DataTrainingArguments)).parse_args_into_dataclasses(
        normalize_flags(args), return_remaining_strings=True, look_for_args_file=False)
    unknown = [arg for arg in rest if arg.startswith("--") and field_of(arg) is None]
    if unknown:
        raise _unknown_flag_error(unknown)
    return model_args, data_args


def _apply_dsat_overwrites(args: List[str], hparams: Dict[str, Any]) -> List[str]:
    """DSAT (Determined <= 0.37) passes DeepSpeed batch-size overwrites through hparams."""
    try:
        from determined.pytorch import dsat
    except ImportError:  # Determined 0.38 removed DSAT; nothing to overwrite.
        return args
    return dsat.get_hf_args_with_overwrites(args, hparams)


def check_arguments(model_args: ModelArguments, data_args: DataTrainingArguments,
                    training_args: TrainingArguments) -> None:
    if not (data_args.dataset_name or data_args.train_file):
        raise UserError("no training data: pass --dataset_name (Hub) or --train_file (local json/jsonl/csv/parquet)")
    if model_args.use_lora and model_args.lora_r < 1:
        raise UserError(f"--lora_r must be >= 1, got {model_args.lora_r}")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError("training length is zero: set --max_steps or --num_train_epochs")
