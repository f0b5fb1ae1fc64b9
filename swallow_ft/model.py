"""Tokenizer and model loading, with LoRA adapters from peft."""

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

from swallow_ft.arguments import ModelArguments
from swallow_ft.errors import UserError

logger = logging.getLogger(__name__)
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>")


def check_local_model_path(name: str) -> None:
    """A path that does not exist would otherwise be sent to the Hub as a repo id."""
    if name.startswith((".", "/", "~")) and not Path(name).is_dir():
        hint = " (run `make tiny` to build it)" if "tiny-swallow" in name else ""
        raise UserError(f"--model_name_or_path {name}: no such directory{hint}")


def from_pretrained(load, name: str, flag: str = "--model_name_or_path", **kwargs):
    """load(name, **kwargs), with the Hub's failures (offline and not cached, no such repo, a gated repo without a
    token) as one line: transformers raises them as a multi-line OSError, which would end the run in a traceback."""
    try:
        return load(name, **kwargs)
    except OSError as exc:
        if Path(name).exists():  # a local folder: a broken file in it is not a Hub problem
            raise
        raise UserError(f"{flag} {name}: {' '.join(str(exc).split())} (a Hub id is read from the HF cache when "
                        "offline, and HF_HUB_OFFLINE=1 skips the Hub's retries; a gated model needs HF_TOKEN or "
                        "`hf auth login`)") from exc


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    check_local_model_path(name)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name,
                                "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
                                cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Padding with EOS would mask EOS out of the loss and the model would never learn to stop.
        # Swallow (Llama-2 vocabulary) pads with <unk>, id 0; Llama-3.1 has a reserved pad token.
        vocab = tokenizer.get_vocab()
        candidates = [tokenizer.unk_token] + [t for t in PAD_CANDIDATES if t in vocab]
        pad = next((t for t in candidates if t is not None and vocab.get(t) != tokenizer.eos_token_id), None)
        if pad is None:
            raise UserError(f"{model_args.model_name_or_path}: no pad token other than EOS; add a pad token to "
                            "the tokenizer files (it must differ from EOS, or the model never learns to stop)")
        logger.info("padding with %s (id %d), not EOS", pad, vocab[pad])
        tokenizer.pad_token = pad
    return tokenizer


def resolve_dtype(model_args: ModelArguments, training_args: TrainingArguments):
    """The dtype the base weights load in: --torch_dtype, else 16 bits under --bf16/--fp16 where something else
    keeps fp32 weights for the optimizer (a frozen LoRA base: the adapters stay fp32; DeepSpeed: its master copy),
    else fp32. Fully trained weights in bf16 without DeepSpeed would take AdamW's updates in bf16, where most
    updates at fine-tuning learning rates round away (and fp16 gradients make the fp16 GradScaler refuse to step);
    in fp32 autocast still computes in 16 bits."""
    if model_args.torch_dtype == "auto":
        return "auto"
    sixteen_bit_master = not model_args.use_lora and not training_args.deepspeed
    if model_args.torch_dtype:
        dtype = getattr(torch, model_args.torch_dtype)
        if sixteen_bit_master and dtype in (torch.bfloat16, torch.float16):
            logger.warning("--torch_dtype %s with full fine-tuning and no DeepSpeed: AdamW updates %s weights, "
                           "and small updates round away; leave --torch_dtype out to train fp32 weights under "
                           "autocast", model_args.torch_dtype, model_args.torch_dtype)
        return dtype
    if (training_args.bf16 or training_args.fp16) and not sixteen_bit_master:
        return torch.bfloat16 if training_args.bf16 else torch.float16
    return torch.float32


def triton_compiler() -> Optional[str]:
    """Triton builds a small C launcher for each kernel on first use, with $CC, else gcc, else clang."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def cpp_compiler() -> Optional[str]:
    """torch.compile on CPU (inductor) builds C++ kernels with $CXX, else g++, else clang++."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def flex_attention_available() -> bool:
    """flex_attention's Triton kernels on this machine's GPU. Ampere (compute capability 8.0) or newer: on older cards
    (V100, T4) they are far slower than sdpa or do not run (pytorch/pytorch#164813)."""
    from transformers.utils import is_torch_flex_attn_available

    triton = importlib.util.find_spec("triton") is not None and triton_compiler() is not None
    return (torch.cuda.is_available() and triton and is_torch_flex_attn_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def choose_attention(requested: str, packing: bool) -> str:
    """Resolve --attn_implementation auto.

    flex_attention for packed rows on a GPU: its block-sparse kernels skip the masked-out blocks of the
    block-diagonal mask that packing needs, where SDPA must take an explicit mask and leave its fastest kernel
    (bench/RESULTS.md: +7% tokens/s on an H100). Elsewhere sdpa. Under ZeRO-3 sdpa too, until flex is
    measured there: the 70B job must work the first time.
    """
    if requested != "auto":
        return requested
    from transformers.integrations import is_deepspeed_zero3_enabled

    if packing and flex_attention_available() and not is_deepspeed_zero3_enabled():
        return "flex_attention"
    return "sdpa"


def load_model(model_args: ModelArguments, training_args: TrainingArguments, packing: bool = False,
               adapter_from: Optional[str] = None):
    """Load the base model (partitioned at load time under ZeRO-3) and wrap it with LoRA if asked.

    TrainingArguments must exist before this call: with a ZeRO-3 config it registers DeepSpeed's
    zero.Init, so each rank only ever materialises its own shard of a 70B model in host RAM.
    adapter_from: a checkpoint folder whose adapter weights the new adapters start from (a warm start).
    """
    attention = choose_attention(model_args.attn_implementation, packing)
    if attention != model_args.attn_implementation:
        logger.info("attention: %s (--attn_implementation %s)", attention, model_args.attn_implementation)
    model = from_pretrained(
        AutoModelForCausalLM.from_pretrained, model_args.model_name_or_path, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, dtype=resolve_dtype(model_args, training_args),
        attn_implementation=attention, trust_remote_code=model_args.trust_remote_code)
    # The KV cache is for generation; in training it costs memory and breaks packed attention.
    model.config.use_cache = False
    if model_args.use_lora:
        # DeepSpeed trains without autocast and keeps fp32 master weights of its own. peft's fp32 adapters on a 16-bit
        # base would make it cast every adapted layer's input to fp32, run the adapters in fp32 and keep those fp32
        # copies for backward; ZeRO-1/2 cast them back to 16 bits, ZeRO-3's zero.Init models are left as they are.
        deepspeed_16bit = bool(training_args.deepspeed) and (training_args.bf16 or training_args.fp16)
        model = add_lora(model, model_args, adapters_in_base_dtype=deepspeed_16bit)
        if adapter_from:
            load_adapter_weights(model, adapter_from)
    return model


def load_adapter_weights(model, checkpoint: str) -> None:
    """Copy a saved adapter's weights into the model's adapters, which must have the same targets and rank."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(model, load_peft_weights(checkpoint, device="cpu"))
    # Every base weight is "missing" from an adapter's file; only an adapter weight left out is a mismatch.
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise UserError(f"{checkpoint}: its adapter does not fit this run's LoRA layers ({len(missing)} missing, "
                        f"{len(result.unexpected_keys)} unexpected weights, e.g. "
                        f"{(missing + list(result.unexpected_keys))[0]}): use the --lora_target_modules it was "
                        "trained with")
    logger.info("LoRA adapters start from %s", checkpoint)


def add_lora(model, model_args: ModelArguments, adapters_in_base_dtype: bool = False):
    from peft import LoraConfig, get_peft_model

    target_modules = model_args.lora_targets
    if isinstance(target_modules, list):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = sorted(set(target_modules) - names)
        if missing:
            raise UserError(f"--lora_target_modules: {', '.join(missing)} not in {model.config.model_type} "
                            f"(its linear layers include q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    config = LoraConfig(task_type="CAUSAL_LM", r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                        lora_dropout=model_args.lora_dropout, target_modules=target_modules)
    # By default peft keeps 16-bit models' adapters in fp32 for the optimizer (autocast_adapter_dtype).
    model = get_peft_model(model, config, autocast_adapter_dtype=not adapters_in_base_dtype)
    trainable, total = model.get_nb_trainable_parameters()
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%), in %s", model_args.lora_r,
                model_args.lora_target_modules,
                f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), str(dtype).replace("torch.", ""))
    return model
