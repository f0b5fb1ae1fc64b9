"""Export a fine-tuned checkpoint as a standalone Hugging Face model directory.

    python -m swallow_ft.export SOURCE --out DIR [--base MODEL] [--adapter-only] [--dtype DTYPE] [--storage DIR]

SOURCE is a `checkpoint-N` directory, a Determined checkpoint directory (metadata.json + checkpoint-N/),
a local run directory (runs/local_tiny: its latest registered checkpoint), a UUID with --storage DIR, or on
a cluster a checkpoint UUID or `best:<experiment id>` (downloaded without the optimizer state, see
checkpoint_files.py). LoRA adapters are merged into the base model; ZeRO-3
checkpoints whose saved weights are empty are rebuilt from the per-rank shards with DeepSpeed's own code. Weights
are written in the base model's dtype; the tokenizer's chat template is the run's prompt format (chat_template.py).
"""

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from swallow_ft.checkpoint_files import (ADAPTER_WEIGHTS, STEP_RE, base_warning, empty_tensors, has_whole_weights,
                                         local_model_dir, locate_checkpoint, read_user_data)
from swallow_ft.errors import UserError, exit_code_of

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REBUILD_FIX = "re-save with ds_configs/ds_config_stage_3.json"


# ----- reading the weights ----------------------------------------------------------------------
def _zero_tag(ckpt_dir: Path) -> Optional[str]:
    """The global_stepN folder holding per-rank ZeRO shards, `latest`'s first (DeepSpeed's own pointer)."""
    latest = ckpt_dir / "latest"
    steps = {int(m.group(1)): p.name for p in ckpt_dir.glob("global_step*") if (m := STEP_RE.match(p.name))}
    tags = ([latest.read_text().strip()] if latest.is_file() else []) + [steps[n] for n in sorted(steps, reverse=True)]
    return next((t for t in tags if any((ckpt_dir / t).glob("*zero_pp_rank_*"))), None)


def _consolidate(ckpt_dir: Path, tag: str, trainable_only: bool) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines meant for its own CLI
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag,
                                                            exclude_frozen_parameters=trainable_only)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{ckpt_dir / tag}: cannot rebuild the weights from the ZeRO shards ({exc}); "
                        f"{REBUILD_FIX}") from exc


def _saved_adapter_key(name: str, adapter_name: str = "default") -> str:
    """Module name -> peft's saved key: `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`. The same
    rule as peft's own save (the adapter name is removed as the second-to-last part, or the last part for bare
    parameters), so the rebuilt state dict loads exactly like a normally saved adapter."""
    if name.endswith(f".{adapter_name}"):
        return name[:-len(adapter_name) - 1]
    head, _, suffix = name.rpartition(".")
    return f"{head.removesuffix('.' + adapter_name)}.{suffix}"


def load_adapter(ckpt_dir: Path) -> tuple:
    """(adapter config, adapter state dict with peft's saved keys, how it was rebuilt for the report: "" when the
    saved tensors were whole), rebuilt from ZeRO-3 shards if they were saved empty."""
    ckpt_dir = Path(ckpt_dir)
    config_path, weights = ckpt_dir / "adapter_config.json", ckpt_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the checkpoint has {config_path.name} but no adapter weights")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    state, empty = load_file(str(weights)), empty_tensors(weights)
    if state and not empty:
        return config, state, ""
    tag = _zero_tag(ckpt_dir)
    if tag is None:
        what = f"tensor {empty[0]} has size 0" if empty else "holds no tensors"
        raise UserError(f"{weights}: {what} (saved under ZeRO-3 without stage3_gather_16bit_weights_on_model_save "
                        f"and no ZeRO shards to rebuild it from); {REBUILD_FIX}")
    consolidated = {_saved_adapter_key(name): tensor
                    for name, tensor in _consolidate(ckpt_dir, tag, trainable_only=True).items()}
    rebuilt = f" rebuilt from ZeRO-3 shards ({tag})"
    if not state:  # no names saved to go by: the trainable parameters are the adapter
        return config, consolidated, rebuilt
    missing = sorted(set(state) - set(consolidated))
    if missing:
        raise UserError(f"{ckpt_dir / tag}: the ZeRO shards lack {missing[0]} (and {len(missing) - 1} more) of "
                        f"{weights.name}; {REBUILD_FIX}")
    # The shards hold fp32 master weights; cast to what the file would have held had it been gathered.
    return config, {key: consolidated[key].to(state[key].dtype) for key in state}, rebuilt


# ----- building the model -----------------------------------------------------------------------
def resolve_base(name: str, flag: str = "") -> str:
    """A local base path as the run gave it (relative to its repo root), or a Hub id unchanged. flag: the option
    NAME came from (compare's --base); without one NAME may be adapter_config.json's."""
    local = local_model_dir(name)
    if local:
        return str(local)
    if name and not name.startswith((".", "/", "~")):
        return name
    if flag:
        raise UserError(f"{flag} {name}: no such directory; pass the base model's directory or its Hub id")
    raise UserError(f"{name or 'adapter_config.json base_model_name_or_path (empty)'}: base model directory "
                    "not found; pass --base MODEL, the base the checkpoint was trained from")


def _dtype_for(model, whose: str, dtype: Optional[str]) -> tuple:
    """(dtype, why, for the report): --dtype, else the one MODEL's config.json records, so that a float32 base is
    not rounded to 16 bits on export; bfloat16 only when the config names none. Reads the config alone."""
    from transformers import AutoConfig

    if dtype:
        return dtype, "--dtype"
    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as exc:  # no such directory or Hub id, no config.json, offline, unreadable JSON
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{model}: cannot read {whose} config.json for the dtype to export in ({reason}); "
                        "pass --dtype") from exc
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if recorded is None:
        return "bfloat16", f"{whose} config.json names no dtype; --dtype to change"
    name = str(recorded).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"{model}/config.json: dtype {name} is not one of {', '.join(DTYPES)}; pass --dtype")
    return name, f"{whose} own, from its config.json; --dtype to change"


@contextlib.contextmanager
def _no_zero3_init():
    """from_pretrained partitions weights under zero.Init while a ZeRO-3 HfDeepSpeedConfig is alive in this
    process (TrainingArguments made earlier); the CLI runs in a fresh process, where there is none."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge(base: str, adapter_config: dict, adapter_state: dict, dtype):
    """The base model on CPU with the adapter merged in, as a plain transformers model."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with _no_zero3_init():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    # The base we were given wins over the path recorded at training time (peft warns when they differ).
    config = PeftConfig.from_peft_type(**{**adapter_config, "inference_mode": True, "base_model_name_or_path": base})
    model = get_peft_model(model, config)
    result = set_peft_model_state_dict(model, adapter_state)
    unloaded = [k for k in result.missing_keys if "lora_" in k] + list(result.unexpected_keys)
    if unloaded:
        raise UserError(f"adapter does not fit base {base}: {unloaded[0]} (and {len(unloaded) - 1} more) "
                        "not loaded; pass the base it was trained on with --base")
    # peft keeps LoRA weights in fp32 and casts the delta to the base dtype when merging.
    return model.merge_and_unload()


def _full_model(ckpt_dir: Path, dtype):
    """A fully fine-tuned checkpoint's model: its saved weights, or the ZeRO shards when those are empty."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if has_whole_weights(ckpt_dir):
        with _no_zero3_init():
            return AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype), "saved weights"
    tag = _zero_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir}: no model weights (missing or of size 0) and no ZeRO shards to rebuild them "
                        f"from; {REBUILD_FIX}")
    state = _consolidate(ckpt_dir, tag, trainable_only=False)
    with _no_zero3_init():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt_dir), dtype=dtype)
    incompatible = model.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        bad = (incompatible.missing_keys or incompatible.unexpected_keys)[0]
        raise UserError(f"{ckpt_dir / tag}: the ZeRO shards do not match config.json ({bad}); {REBUILD_FIX}")
    ranks = len(list((ckpt_dir / tag).glob("*zero_pp_rank_*model_states.pt")))
    return model, f"consolidated ZeRO-3 shards ({tag}, {ranks} ranks)"


# ----- writing ----------------------------------------------------------------------------------
def _base_and_dtype(ckpt: Path, base, adapter_only: bool, dtype: Optional[str]) -> tuple:
    """(the resolved base or None, the dtype to write or None, why): from the configs alone, before any weights."""
    adapter_config = ckpt / "adapter_config.json"
    if adapter_config.is_file():
        recorded = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        base_name = resolve_base(base or recorded or "")
        if adapter_only:  # written as trained: LoRA weights are small and kept in fp32 by peft, so no --dtype
            return base_name, None, ""
    elif adapter_only:
        raise UserError(f"{ckpt}: no adapter here (a full fine-tuning checkpoint); drop --adapter-only")
    else:  # the base a full fine-tuning started from, whose dtype export keeps: not needed with --dtype alone
        name = base or (None if dtype else read_user_data(ckpt).get("finetuned_from"))
        if not (name or dtype):
            raise UserError(f"{ckpt}: no user_data.json naming the base model (finetuned_from), whose dtype export "
                            "keeps; pass --base MODEL or --dtype DTYPE")
        base_name = name and resolve_base(name, flag="--base" if base else "")
    # The base's dtype, not the checkpoint's: without DeepSpeed full fine-tuning trains (and saves) fp32 weights
    # whatever the base's dtype (model.resolve_dtype), which would double a bf16 model's size.
    return (base_name, *_dtype_for(base_name, "the base's", dtype))


def _write_weights(ckpt: Path, model_dir: Path, base_name, adapter_only: bool, dtype, why: str) -> str:
    """Write the model (or adapter) weights and config; returns what was done, for the report."""
    if not (ckpt / "adapter_config.json").is_file():
        model, how = _full_model(ckpt, DTYPES[dtype])
        model.save_pretrained(model_dir)
        return f"fully fine-tuned model from {how}, {dtype} ({why})"
    config, state, rebuilt = load_adapter(ckpt)
    lora = f"adapter of r={config.get('r')}, alpha={config.get('lora_alpha')}{rebuilt}"
    if not adapter_only:
        merge(base_name, config, state, dtype).save_pretrained(model_dir)
        return f"merged {lora} into {base_name}, {dtype} ({why})"
    # A local base is recorded by its absolute path: a relative one would only load from the directory it is
    # relative to. Hub ids stay as they are.
    recorded = str(Path(base_name).resolve()) if Path(base_name).is_dir() else base_name
    write_adapter(model_dir, {**config, "base_model_name_or_path": recorded}, state)
    return f"{lora} only, for base {base_name}"


def write_adapter(directory: Path, adapter_config: dict, adapter_state: dict) -> Path:
    """An adapter directory that PeftModel.from_pretrained loads (e.g. load_adapter's rebuilt result)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return directory


def export(source, out: Path, base=None, adapter_only=False, dtype=None, storage=None) -> Path:
    """Write SOURCE as a model directory at OUT that loads with AutoModelForCausalLM.from_pretrained.
    dtype: None writes the weights in the base model's own dtype (see _dtype_for)."""
    from transformers import AutoTokenizer

    # Imported here: chat_template imports swallow_ft.data, and with it datasets.
    from swallow_ft.chat_template import save_stop_tokens, save_tokenizer

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUT and renamed at the end, so a failure never leaves a half-written model there.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ref = locate_checkpoint(str(source), storage, download_dir=staging / "download")
        ckpt, model_dir = ref.path, staging / "model"
        warning = base and base_warning(base, ckpt, "--base")
        if warning:
            print(warning, file=sys.stderr, flush=True)
        base_name, dtype, why = _base_and_dtype(ckpt, base, adapter_only, dtype)
        # The checkpoint's tokenizer carries the pad token the run trained with; its chat template is replaced by
        # the run's prompt format, so that servers prompt the model with the tokens it was trained on. Before the
        # weights: a problem with it then costs seconds, not a 70B merge.
        tokenizer_from = ckpt if (ckpt / "tokenizer_config.json").is_file() else base_name
        if tokenizer_from is None:
            raise UserError(f"{ckpt}: no tokenizer saved in the checkpoint; pass --base MODEL to take it from")
        settings = read_user_data(ckpt)
        template = save_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_from)), model_dir, settings)
        what = _write_weights(ckpt, model_dir, base_name, adapter_only, dtype, why)
        stops = save_stop_tokens(AutoTokenizer.from_pretrained(model_dir), model_dir, settings)
        if (ckpt / "user_data.json").is_file():  # the run's data and prompt settings: compare reads them here too
            shutil.copy2(ckpt / "user_data.json", model_dir / "user_data.json")
        if out.exists():
            out.rmdir()  # empty, checked above
        model_dir.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # A downloaded checkpoint's directory was in the staging area, gone now: its UUID finds it again.
    print(f"wrote {out}: {what} (checkpoint {ref.describe(with_path=staging not in ckpt.parents)})", flush=True)
    print("\n".join(line for line in (template, stops) if line), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swallow_ft.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint-N dir, Determined checkpoint dir, run dir, UUID or best:<exp id>")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--base", help="base model for an adapter (default: adapter_config.json's)")
    parser.add_argument("--adapter-only", action="store_true", help="write the adapter, do not merge it")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="of the written weights (default: the base model's own, from its config.json; "
                             "bfloat16 if it names none)")
    parser.add_argument("--storage", help="checkpoint storage directory holding <uuid>/ (for a UUID source)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: export(args.source, args.out, base=args.base, adapter_only=args.adapter_only,
                                       dtype=args.dtype, storage=args.storage))


if __name__ == "__main__":
    sys.exit(main())
