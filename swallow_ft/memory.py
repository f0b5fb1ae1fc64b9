"""Per-GPU memory of Llama-shaped (Swallow) fine-tuning, offline: `estimate()` splits the peak into parts so the
preflight can say which one is too large (model states as DeepSpeed's own estimators count them), and
`suggest_fixes()` walks the usual levers until a setting fits."""
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from swallow_ft.errors import UserError

GiB = 1024 ** 3
# CUDA context (~0.5 GiB with torch, cuBLAS and NCCL loaded) plus allocator fragmentation and workspaces.
CUDA_OVERHEAD_BYTES = int(1.5 * GiB)
FP32 = 4
ADAM_STATE_BYTES = 12      # fp32 master copy (4) + Adam's two fp32 moments (8)
DROPOUT_MASK_BYTES = 1     # CUDA's fused dropout keeps a bool mask (CPU keeps one in the input's dtype)
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = {"llama", "mistral"}  # same parameter layout; anything else we would count wrongly
_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")  # in ModelShape's field order


def lora_target_names(targets: Union[str, Sequence[str]]) -> Union[str, List[str]]:
    """--lora_target_modules as peft takes it: "all-linear", or module names from a list or the comma-separated text
    (blanks around and between commas ignored, as in "q_proj, v_proj,")."""
    if targets == "all-linear":
        return "all-linear"
    names = targets.split(",") if isinstance(targets, str) else targets
    return [name.strip() for name in names if name.strip()]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    max_positions: Optional[int] = None  # max_position_embeddings: the longest row RoPE was trained for
    rope_scaling: bool = False  # the config stretches RoPE (llama3, linear, dynamic): rows may be longer

    def config_sizes(self) -> Dict[str, int]:
        """The sizes as transformers config fields (hidden_size, ...): from_config's inverse, to build a model."""
        return dict(zip(_CONFIG_KEYS, astuple(self)))

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config (LlamaConfig fields) or the dict of a config.json."""
        get = config.get if isinstance(config, Mapping) else partial(getattr, config)
        model_type = get("model_type", None) or "llama"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: the memory model knows only {sorted(SUPPORTED_MODEL_TYPES)}")
        sizes = [get(key, None) for key in _CONFIG_KEYS]
        sizes[3] = sizes[3] or sizes[2]  # num_key_value_heads: no grouped-query attention unless the config says so
        if None in sizes:
            raise ValueError(f"the config lacks one of {', '.join(_CONFIG_KEYS)}")
        # transformers 5 calls it rope_parameters and always fills it (rope_type "default"); config.json files of
        # Llama-2 models say "rope_scaling": null.
        rope = get("rope_scaling", None) or get("rope_parameters", None) or {}
        scaled = (rope.get("rope_type") or rope.get("type") or "default") != "default"
        return cls(*sizes, bool(get("tie_word_embeddings", False)), model_type, get("max_position_embeddings", None),
                   scaled)

    def linear_dims(self) -> dict:
        """{module name: (in_features, out_features)} for every nn.Linear (bias-free in Llama)."""
        h, inter = self.hidden_size, self.intermediate_size
        kv = self.num_kv_heads * (h // self.num_heads)  # grouped-query attention: fewer k/v heads than q heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
                "lm_head": (h, self.vocab_size)}

    def linear_module_names(self) -> set:
        return set(self.linear_dims())

    @property
    def total_params(self) -> int:
        """Embedding, per layer the 7 linears and 2 RMSNorms, the final norm, and lm_head unless tied."""
        embedding = self.vocab_size * self.hidden_size
        per_layer = sum(i * o for name, (i, o) in self.linear_dims().items() if name in LAYER_LINEARS)
        per_layer += 2 * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embedding
        return embedding + self.num_layers * per_layer + self.hidden_size + lm_head

    @property
    def largest_layer_params(self) -> int:
        """Largest module's own parameters, as DeepSpeed's model_to_params counts them (a tied lm_head is the
        embedding): for Llama the vocab x hidden matrix, which ZeRO-3 must gather whole on every GPU."""
        return max(i * o for i, o in self.linear_dims().values())

    def lora_targets(self, targets: Union[str, Sequence[str]]) -> list:
        """peft's "all-linear" is every linear layer but the output layer (lm_head); else names, or the
        comma-separated string --lora_target_modules takes."""
        targets = lora_target_names(targets)
        if targets == "all-linear":
            return list(LAYER_LINEARS)
        unknown = set(targets) - self.linear_module_names()
        if unknown:
            raise ValueError(f"LoRA targets {sorted(unknown)} are not linear modules of {self.model_type}")
        return targets

    def lora_params(self, r: int, targets: Union[str, Sequence[str]] = "all-linear") -> int:
        """A (r x in) plus B (out x r) for each adapted module, in every layer (lm_head only once)."""
        dims = self.linear_dims()
        return sum(r * sum(dims[name]) * (1 if name == "lm_head" else self.num_layers)
                   for name in self.lora_targets(targets))


# Public config.json values; Swallow (Llama-2) extends the 32000-token vocabulary to 43176 for Japanese.
KNOWN_SHAPES = {
    "swallow-7b": ModelShape(4096, 32, 32, 32, 11008, 43176, max_positions=4096),
    "swallow-13b": ModelShape(5120, 40, 40, 40, 13824, 43176, max_positions=4096),
    "swallow-70b": ModelShape(8192, 80, 64, 8, 28672, 43176, max_positions=4096),
    "llama-3-swallow-8b": ModelShape(4096, 32, 32, 8, 14336, 128256, max_positions=8192),
    "llama-3-swallow-70b": ModelShape(8192, 80, 64, 8, 28672, 128256, max_positions=8192),
}
_ORG = "tokyotech-llm/"
# The Hub's tokyotech-llm Llama-architecture ids, by family and size. NVE ("no vocabulary expansion") keeps
# Llama-2's 32000-token tokenizer; Llama 3.1 and 3.3 keep Meta's config: 131072 positions by llama3 RoPE scaling.
_LLAMA2_SUFFIXES = {"7b": ("hf", "instruct-hf", "instruct-v0.1", "plus-hf", "NVE-hf", "NVE-instruct-hf"),
                    "13b": ("hf", "instruct-hf", "instruct-v0.1", "NVE-hf"),
                    "70b": ("hf", "instruct-hf", "instruct-v0.1", "NVE-hf", "NVE-instruct-hf")}
_LLAMA3_SUFFIXES = {("Llama-3", "8B"): ("v0.1", "Instruct-v0.1"), ("Llama-3", "70B"): ("v0.1", "Instruct-v0.1"),
                    ("Llama-3.1", "8B"): ("v0.1", "Instruct-v0.1", "v0.2", "Instruct-v0.2", "Instruct-v0.3", "v0.5",
                                          "Instruct-v0.5"),
                    ("Llama-3.1", "70B"): ("v0.1", "Instruct-v0.1", "Instruct-v0.3"),
                    ("Llama-3.3", "70B"): ("v0.4", "Instruct-v0.4")}
SWALLOW_MODELS = {
    **{f"{_ORG}Swallow-{size}-{suffix}": replace(KNOWN_SHAPES[f"swallow-{size}"],
                                                 **({"vocab_size": 32000} if "NVE" in suffix else {}))
       for size, suffixes in _LLAMA2_SUFFIXES.items() for suffix in suffixes},
    **{f"{_ORG}{family}-Swallow-{size}-{suffix}": replace(
        KNOWN_SHAPES[f"llama-3-swallow-{size.lower()}"],
        **({} if family == "Llama-3" else {"max_positions": 131072, "rope_scaling": True}))
       for (family, size), suffixes in _LLAMA3_SUFFIXES.items() for suffix in suffixes},
}
# Hub ids resolve whatever their case, so matching is exact but case-insensitive.
_BY_LOWER_ID = {name.lower(): name for name in SWALLOW_MODELS}
# Swallow-MS/MX (Mistral/Mixtral), Gemma-2- and Qwen-based Swallows are other architectures.
_OTHER_ARCHITECTURES = re.compile(r"swallow-m[sx]\b|mistral|mixtral|gemma|qwen")


def _unknown_model(name: str) -> UserError:
    # By the part after the organisation, which every known id shares and would make anything look close.
    bare = {known.split("/")[1].lower(): known for known in SWALLOW_MODELS}
    close = [bare[n] for n in difflib.get_close_matches(name.split("/")[-1].lower(), bare, n=3, cutoff=0.8)]
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"known: swallow_ft/memory.py SWALLOW_MODELS, e.g. {_ORG}Swallow-70b-instruct-v0.1")
    return UserError(f"{name} is not a known Swallow model id and not a local directory: check the spelling ({hint}); "
                     f"a model newer than that list passes once its config is cached (hf download {name} config.json)")


def shape_for(model_name_or_path: str, cache_dir: Optional[str] = None) -> Optional[ModelShape]:
    """The shape of a local model dir, a config in the HF cache, or a known Swallow hub id. Offline.

    None for a model whose shape cannot be known here (another architecture, another organisation's id that is not
    cached, a path that is not there); UserError for a name that cannot load: a directory without a readable
    config.json, or a Swallow id that does not exist (a typo, which would otherwise surface on the cluster as an
    OSError from every rank)."""
    from transformers import AutoConfig

    name = model_name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return _shape_or_none(json.loads((path / "config.json").read_text()))
        except FileNotFoundError:
            raise UserError(f"{name} is a directory without config.json: point it at the model's directory") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / 'config.json'}: cannot be read ({exc}): fix or re-download it") from None
    try:
        return _shape_or_none(AutoConfig.from_pretrained(name, cache_dir=cache_dir, local_files_only=True))
    except (OSError, KeyError, ValueError):  # not cached, or a config this transformers cannot read
        pass
    if name.lower() in _BY_LOWER_ID:
        return SWALLOW_MODELS[_BY_LOWER_ID[name.lower()]]
    # A hub id is ORG/NAME; anything else names a directory that is not there, which model.check_local_model_path
    # reports in run_clm.py's own words.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return None
    if ("swallow" in name.lower() or name.lower().startswith(_ORG)) and not _OTHER_ARCHITECTURES.search(name.lower()):
        raise _unknown_model(name)
    return None


def _shape_or_none(config) -> Optional[ModelShape]:
    try:
        return ModelShape.from_config(config)
    except ValueError:  # an architecture this model does not describe: no number beats a wrong one
        return None


def context_problem(shape: ModelShape, seq_len: int) -> Optional[str]:
    """Why rows of seq_len tokens are too long for the model, or None. Beyond max_position_embeddings RoPE meets
    positions it never saw in training (quality falls apart), unless the config scales RoPE for longer rows."""
    if shape.max_positions and seq_len > shape.max_positions and not shape.rope_scaling:
        return (f"{seq_len} tokens exceed the model's max_position_embeddings ({shape.max_positions}) and its config "
                "has no rope_scaling")
    return None


@dataclass
class MemoryEstimate:
    """Peak bytes on one GPU, by component."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def model_states(self) -> float:
        """What DeepSpeed's estimate_zero*_model_states_mem_needs call GPU memory."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.overhead

    def table(self) -> str:
        parts = [f"{f.name} {getattr(self, f.name) / GiB:.1f}" for f in fields(self)]
        return " | ".join(parts) + f" | total {self.total / GiB:.1f} GiB per GPU"

    __str__ = table


def _activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, lora: Optional[tuple],
                      gradient_checkpointing: bool, fused_loss: bool) -> float:
    """Peak of what autograd keeps for backward plus the loss's own buffers, per GPU; lora is (r, targets, dropout).

    Not Korthikanti et al. 2022's s*b*h*(34 + 5*a*s/h): that is GPT (GeLU, LayerNorm, dropout), and 5as/h is the
    s x s score matrix, which SDPA/flash attention never stores. We count HF's Llama layer, bytes per token (tested
    with saved_tensors_hooks): always each RMSNorm's fp32 upcast input (4h), attention's q, k, v and output
    (2h + 4kv + 2h), SwiGLU's gate, SiLU(gate) and up (6I); trainable weights also keep their inputs (2h per norm,
    2h after each norm, 2I for down_proj): 20h + 4kv + 8I in all. A frozen LoRA base keeps none of those; each
    adapted module keeps A's output, and A keeps its input: with LoRA dropout a copy plus mask per module, without
    it the input itself, shared by q/k/v and by gate/up (o_proj's input is attention's output, already kept).
    The loss (loss_bytes) peaks as backward starts, while all of that is still held.
    """
    dims = shape.linear_dims()
    h, kv, inter = shape.hidden_size, dims["k_proj"][1], shape.intermediate_size
    norm = FP32 * h + (0 if lora else 2 * act_bytes * h)
    per_layer = 2 * norm + act_bytes * (2 * h + 2 * kv + 3 * inter)
    if lora:
        r, targets, dropout = lora
        adapted = [name for name in shape.lora_targets(targets) if name in LAYER_LINEARS]
        if dropout:
            per_layer += sum((act_bytes + DROPOUT_MASK_BYTES) * dims[name][0] for name in adapted)
        else:
            inputs = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp",
                      "up_proj": "mlp", "down_proj": "down"}
            widths = {"attention": h, "mlp": h, "down": inter}
            per_layer += act_bytes * sum(widths[kind] for kind in {inputs[n] for n in adapted if n in inputs})
        per_layer += act_bytes * r * len(adapted)
    else:
        per_layer += act_bytes * inter
    # Checkpointing each decoder layer (as HF does) keeps only its 16-bit input; backward recomputes one at a time.
    layers = tokens * (shape.num_layers * act_bytes * h + per_layer if gradient_checkpointing
                       else shape.num_layers * per_layer)
    return layers + tokens * norm + loss_bytes(shape, tokens, act_bytes, fused_loss)  # + the final norm


# transformers' ForCausalLMLoss upcasts the logits (logits.float()) and runs cross_entropy = log_softmax + nll_loss.
# Its peak is as backward starts: the saved fp32 log-softmax, nll_loss's fp32 gradient of it and log_softmax's fp32
# gradient of the logits are live at once, 3 x 4 bytes per logit (tests/test_memory.py measures exactly that). The
# forward's peak is lower (bf16 logits 2 + fp32 copy 4 + log-softmax 4), and the Trainer drops the bf16 logits
# before backward.
LOSS_BYTES_PER_LOGIT = 3 * FP32


def loss_bytes(shape: ModelShape, tokens: int, act_bytes: int = 2, fused: bool = False) -> int:
    """Peak bytes of the language-model loss for `tokens` tokens on one GPU.

    fused: Liger's fused linear cross-entropy (--use_liger_kernel), which never forms the whole logits: it walks the
    tokens in chunks of next_power_of_2(ceil(tokens / ceil(V / h))) rows, so one chunk's 16-bit logits are about
    tokens x h, and keeps the 16-bit gradient of its input (tokens x h) from forward to backward and an fp32 loss
    per token (liger_kernel/ops/fused_linear_cross_entropy.py, 0.8.5; Triton, so not measured on CPU here)."""
    vocab, h = shape.vocab_size, shape.hidden_size
    if not fused:
        return tokens * vocab * LOSS_BYTES_PER_LOGIT
    rows = -(-tokens // -(-vocab // h))  # ceil(tokens / ceil(V / h))
    chunk = min(tokens, 1 << (rows - 1).bit_length())
    return act_bytes * (tokens * h + chunk * vocab) + FP32 * tokens


def estimate(shape: ModelShape, *, gpus: int, zero_stage: int, micro_batch: int, seq_len: int,
             lora_r: Optional[int] = None, lora_targets: Union[str, Sequence[str]] = "all-linear",
             lora_dropout: float = 0.0, gradient_checkpointing: bool, weight_bytes: int = 2,
             offload_optimizer: bool = False, offload_params: bool = False, fused_loss: bool = False
             ) -> MemoryEstimate:
    """Peak memory of one GPU for mixed-precision AdamW; zero_stage 0 is plain data parallelism.

    Per trainable parameter, each term is split across the GPUs from the ZeRO stage that shards it:
      16-bit weights (weight_bytes)          replicated, sharded from ZeRO-3
      16-bit gradients (weight_bytes)        replicated, sharded from ZeRO-2; at ZeRO-3 only one layer's lives
      fp32 gradients (4, ZeRO only)          sharded from ZeRO-1 (the partition the optimizer steps on)
      master copy + Adam moments (12)        sharded from ZeRO-1
    That is DeepSpeed's estimators split into parts: ZeRO-2 2P + 18P/N, ZeRO-3 18P/N + 4 * largest layer (one
    module gathered whole: its 16-bit weights and its 16-bit gradient before reduce-scatter). offload_optimizer
    moves the optimizer state and the fp32 and sharded 16-bit gradients to CPU, offload_params the weight shards.
    With LoRA only the adapters train; the frozen base keeps its 16-bit weights (sharded at ZeRO-3). Without ZeRO
    we still charge master copy and moments: AdamW straight on bf16 weights (4 bytes) loses small updates.
    fused_loss: Liger's fused linear cross-entropy (--use_liger_kernel) instead of transformers' loss on whole logits.
    """
    if gpus < 1 or micro_batch < 1 or seq_len < 1 or zero_stage not in (0, 1, 2, 3):
        raise ValueError("need gpus, micro_batch, seq_len >= 1 and zero_stage in 0..3")
    if offload_optimizer and zero_stage == 0 or offload_params and zero_stage != 3:
        raise ValueError("optimizer offload needs ZeRO-1..3 and parameter offload needs ZeRO-3")
    total = shape.total_params
    if lora_r:  # A and B are separate nn.Linear modules: the largest is r x the widest adapted dimension
        trainable = shape.lora_params(lora_r, lora_targets)
        largest_trainable = max(lora_r * max(shape.linear_dims()[name]) for name in shape.lora_targets(lora_targets))
    else:
        trainable, largest_trainable = total, shape.largest_layer_params

    if zero_stage == 3:  # the module being run is gathered whole and holds its whole gradient
        weights = weight_bytes * (shape.largest_layer_params + (0 if offload_params else total / gpus))
        grads16 = weight_bytes * largest_trainable
    elif zero_stage == 2:
        weights, grads16 = weight_bytes * total, 0 if offload_optimizer else weight_bytes * trainable / gpus
    else:
        weights, grads16 = weight_bytes * total, weight_bytes * trainable
    grads32 = 0 if offload_optimizer or zero_stage == 0 else FP32 * trainable / gpus
    optimizer = 0 if offload_optimizer else ADAM_STATE_BYTES * trainable / (gpus if zero_stage else 1)

    lora = (lora_r, lora_targets, lora_dropout) if lora_r else None
    activations = _activation_bytes(shape, micro_batch * seq_len, weight_bytes, lora, gradient_checkpointing,
                                    fused_loss)
    # The repo's DeepSpeed configs leave bucket sizes "auto": HF fills reduce_bucket_size = h^2 and
    # stage3_prefetch_bucket_size = 0.9 h^2 elements, both 16-bit buffers.
    buckets = weight_bytes * shape.hidden_size ** 2 * ((1 if zero_stage else 0) + (0.9 if zero_stage == 3 else 0))
    return MemoryEstimate(weights=weights, gradients=grads16 + grads32, optimizer=optimizer,
                          activations=activations, overhead=CUDA_OVERHEAD_BYTES + buckets)


def fits(estimate: MemoryEstimate, gpu_mem_gib: float, headroom: float = 0.9) -> bool:
    """headroom keeps 10% for what the model does not count: NCCL buffers, a layer's transient gradients in
    backward, allocator fragmentation beyond the fixed overhead."""
    return estimate.total <= gpu_mem_gib * GiB * headroom


def _levers(settings: dict) -> list:
    """Groups of ever stronger settings, cheapest first: micro-batch halves to 1, GPUs double to 64. Liger's fused
    loss costs no time but needs Triton and no ZeRO-3, so it comes after recomputation."""
    batch, gpus = settings["micro_batch"], settings["gpus"]
    return [[{"gradient_checkpointing": True}], [{"fused_loss": True}],
            [{"micro_batch": batch >> k} for k in range(1, batch.bit_length())],
            [{"zero_stage": 2}, {"zero_stage": 3}], [{"offload_optimizer": True}],
            [{"offload_optimizer": True, "offload_params": True}],  # parameters go only after the optimizer
            [{"gpus": gpus << k} for k in range(1, 7) if gpus << k <= 64]]


_WORDS = {"gradient_checkpointing": "--activation_checkpointing", "micro_batch": "micro-batch {}",
          "zero_stage": "ZeRO-{}", "fused_loss": {True: "--use_liger_kernel", False: "without --use_liger_kernel"},
          "offload_optimizer": "optimizer offload", "offload_params": "parameter offload", "gpus": "{} GPUs"}


def _describe(setting: dict, original: dict) -> str:
    return ", ".join(words[setting[key]] if isinstance(words, dict) else words.format(setting[key])
                     for key, words in _WORDS.items() if setting[key] != original[key])


def suggest_fixes(shape: ModelShape, gpu_mem_gib: float, *, max_suggestions: int = 3, headroom: float = 0.9,
                  **settings) -> list:
    """Changes to `settings` (estimate's keywords) that fit, as "--activation_checkpointing, micro-batch 2: 61.3 GiB
    per GPU"; [] if they fit already. A lever group's first fitting value is suggested and the search goes on
    without it, so later suggestions are alternatives, not the same fix made stronger; a group that does not fit
    is kept at its strongest value and the next lever is added on top of it.
    """
    original = {"offload_optimizer": False, "offload_params": False, "fused_loss": False, **settings}
    if fits(estimate(shape, **original), gpu_mem_gib, headroom):
        return []
    current, found = dict(original), []
    for group in _levers(original):
        for change in group:
            candidate = {**current, **change}
            if candidate["offload_optimizer"]:  # offload needs ZeRO: 3 for parameters, here 2+ for the optimizer
                candidate["zero_stage"] = 3 if candidate["offload_params"] else max(candidate["zero_stage"], 2)
            # Liger's fused loss reads lm_head's whole weight, which ZeRO-3 shards: the full logits come back.
            candidate["fused_loss"] = candidate["fused_loss"] and candidate["zero_stage"] < 3
            if candidate == current or candidate["zero_stage"] < current["zero_stage"] or any(
                    all(fix[key] in (original[key], candidate[key]) for key in fix) for fix, _ in found):
                continue  # nothing new, a weaker ZeRO stage, or a suggested fix plus more
            result = estimate(shape, **candidate)
            if fits(result, gpu_mem_gib, headroom):
                found.append((candidate, result.total))
                break
            current = candidate
        if len(found) >= max_suggestions:
            break
    return [f"{_describe(fix, original)}: {total / GiB:.1f} GiB per GPU" for fix, total in found]
