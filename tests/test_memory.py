"""The memory model against the real thing: meta-device Llamas, peft, DeepSpeed's estimators, autograd."""
import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from swallow_ft import memory
from swallow_ft.errors import UserError
from swallow_ft.gpus import gpu_memory_for_pool
from swallow_ft.memory import (
    KNOWN_SHAPES,
    SWALLOW_MODELS,
    GiB,
    ModelShape,
    context_problem,
    estimate,
    fits,
    shape_for,
    suggest_fixes,
)


def llama_config(shape: ModelShape, **extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                       tie_word_embeddings=shape.tie_word_embeddings,
                       max_position_embeddings=shape.max_positions or 2048, **extra)


TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176, vocab_size=1200,
                  max_positions=2048)
# Wide enough that activations dominate what autograd keeps: the shape the activation formula is measured on.
SMALL_LLAMA = ModelShape(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=688,
                         vocab_size=1000)


@pytest.mark.parametrize("name", ["swallow-7b", "swallow-70b", "llama-3-swallow-8b"])
def test_param_counts_match_a_meta_device_llama(name):
    shape = KNOWN_SHAPES[name]
    with torch.device("meta"):  # shapes only: a 70B model allocates nothing
        model = LlamaForCausalLM(llama_config(shape))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.largest_layer_params == max(sum(p.numel() for p in m.parameters(recurse=False))
                                             for m in model.modules())


def test_tied_embeddings_are_counted_once():
    shape = ModelShape(**{**TINY.__dict__, "tie_word_embeddings": True})
    model = LlamaForCausalLM(llama_config(shape))
    assert shape.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj", "lm_head"]])
def test_lora_params_match_peft(targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(LlamaForCausalLM(llama_config(TINY)), LoraConfig(r=8, target_modules=targets))
    assert TINY.lora_params(8, targets) == model.get_nb_trainable_parameters()[0]


def test_unknown_lora_target_is_an_error():
    with pytest.raises(ValueError, match="wq"):
        TINY.lora_params(8, ["wq"])


@pytest.mark.parametrize("name", ["swallow-7b", "swallow-70b"])
@pytest.mark.parametrize("gpus", [4, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_match_deepspeeds_estimators(name, gpus, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = KNOWN_SHAPES[name]
    common = dict(gpus=gpus, micro_batch=1, seq_len=2048, gradient_checkpointing=True, offload_optimizer=offload)
    _, zero2_gpu = estimate_zero2_model_states_mem_needs(shape.total_params, gpus, num_nodes=1,
                                                         cpu_offload=offload, additional_buffer_factor=1.0)
    assert estimate(shape, zero_stage=2, **common).model_states == pytest.approx(zero2_gpu, abs=8)
    for offload_params in ([False, True] if offload else [False]):
        _, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, gpus, num_nodes=1, cpu_offload=offload,
            cpu_offload_params=offload_params, zero_init=1, additional_buffer_factor=1.0)
        mine = estimate(shape, zero_stage=3, offload_params=offload_params, **common)
        assert mine.model_states == pytest.approx(zero3_gpu, abs=8)


class LivePeak(TorchDispatchMode):
    """The peak bytes of the storages ops create while it is on, sampled after every op. A view or in-place result
    of an op's input is no new storage (so the weights never count); on CPU backward runs on the calling thread, so
    its ops are seen too. Intra-op scratch buffers are not: they are the kernel's, and differ from CUDA's anyway."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        self.live = {ptr: (ref, size) for ptr, (ref, size) in self.live.items() if not ref.expired()}
        for tensor in tree_flatten(out)[0]:
            if torch.is_tensor(tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                storage = tensor.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def training_step_bytes(model, tokens):
    """(bytes autograd keeps for backward, counted once per storage, parameters excluded; peak bytes live during
    forward and backward) for one step as the Trainer runs it: the outputs, logits included, go before backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with LivePeak() as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), live.peak


@pytest.mark.parametrize("lora_r, targets, dropout", [(None, None, 0.0), (8, "all-linear", 0.05),
                                                     (8, "all-linear", 0.0), (8, ["q_proj", "v_proj"], 0.0),
                                                     (8, ["o_proj", "down_proj"], 0.0)])
def test_activation_formula_matches_the_measured_peak(lora_r, targets, dropout, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(memory, "DROPOUT_MASK_BYTES", 2)  # CPU dropout keeps its mask in bf16, CUDA in bool

    torch.manual_seed(0)
    shape = SMALL_LLAMA
    model = LlamaForCausalLM(llama_config(shape, attn_implementation="sdpa"))
    if lora_r:
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=targets, lora_dropout=dropout))
        # As the Trainer does for peft under gradient checkpointing; else the first layer's input needs no grad.
        model.enable_input_require_grads()
    model = model.to(torch.bfloat16).train()
    batch, seq = 2, 256
    saved, peak = training_step_bytes(model, torch.randint(0, shape.vocab_size, (batch, seq)))
    predicted = estimate(shape, gpus=1, zero_stage=0, micro_batch=batch, seq_len=seq, lora_r=lora_r,
                         lora_targets=targets or "all-linear", lora_dropout=dropout,
                         gradient_checkpointing=False).activations
    assert predicted == pytest.approx(peak, rel=0.03)
    # The layers' part is what autograd saves: the peak adds the loss's two fp32 gradients of the logits.
    assert predicted - 2 * 4 * shape.vocab_size * batch * seq == pytest.approx(saved, rel=0.03)


@pytest.mark.parametrize("vocab", [43176, 128256])  # Swallow's and Llama 3's
def test_the_loss_peaks_at_three_fp32_copies_of_the_logits(vocab):
    """transformers' ForCausalLMLoss upcasts the logits and takes log_softmax: as backward starts, the saved fp32
    log-softmax and two fp32 gradients of the logits' size are live on top of every layer's activations. For a
    large vocabulary that is a large part of the peak (Llama-3.1-Swallow-70B at 8 x 2048: 23.5 GiB per GPU)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    shape = ModelShape(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=176,
                       vocab_size=vocab)
    base = LlamaForCausalLM._from_config(llama_config(shape, attn_implementation="sdpa"), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear")).to(torch.bfloat16).train()
    model.enable_input_require_grads()
    batch, seq = 2, 128
    tokens = torch.randint(0, vocab, (batch, seq))
    _, peak = training_step_bytes(model, tokens)
    logits = batch * seq * vocab
    assert memory.loss_bytes(shape, batch * seq) == 3 * 4 * logits
    predicted = estimate(shape, gpus=1, zero_stage=0, micro_batch=batch, seq_len=seq, lora_r=8,
                         gradient_checkpointing=False).activations
    assert predicted == pytest.approx(peak, rel=0.005)
    assert peak / (4 * logits) == pytest.approx(3.0, abs=0.02)

    # The loss alone: exactly the three fp32 copies, plus the bf16 logits (here a leaf, which the graph keeps; the
    # Trainer drops the model's before backward), the fp32 loss and backward's seed.
    with LivePeak() as live:
        loss = model.loss_function(logits=torch.zeros(batch, seq, vocab, dtype=torch.bfloat16, requires_grad=True),
                                   labels=tokens, vocab_size=vocab)
        loss.backward()
    assert live.peak == memory.loss_bytes(shape, batch * seq) + 2 * logits + 2 * 4


def test_liger_fused_loss_never_forms_the_logits():
    """--use_liger_kernel: chunks of about tokens x h logits instead of 12 bytes per logit (liger_kernel 0.8.5's
    chunking, not measured: Triton needs a GPU)."""
    shape, tokens = KNOWN_SHAPES["llama-3-swallow-8b"], 4 * 2048
    # ceil(128256 / 4096) = 32, so chunks of 8192 / 32 = 256 rows of the vocabulary; plus grad_input and the losses.
    assert memory.loss_bytes(shape, tokens, fused=True) == 2 * (tokens * 4096 + 256 * 128256) + 4 * tokens
    common = dict(gpus=1, zero_stage=0, micro_batch=4, seq_len=2048, lora_r=16, gradient_checkpointing=False)
    unfused, fused = estimate(shape, **common), estimate(shape, fused_loss=True, **common)
    saved = 12 * tokens * 128256 - memory.loss_bytes(shape, tokens, fused=True)
    assert unfused.activations - fused.activations == saved


def test_activation_formula_holds_for_fp32_adapters_under_autocast_as_swallow_trainer_runs_them():
    """In training the adapters are fp32 (peft's autocast_adapter_dtype) over a bf16 base, under autocast. peft's
    casts of each adapted layer's input to fp32 and back would make every lora_A keep its own bf16 copy of its input:
    4h bytes per token per layer more than the formula (8 GiB for 7B at 4 x 2048). SwallowTrainer skips them."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    shape = SMALL_LLAMA
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(llama_config(shape, attn_implementation="sdpa"), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear")).train()
    model.enable_input_require_grads()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch, seq = 2, 256
    tokens = torch.randint(0, shape.vocab_size, (batch, seq))
    predicted = estimate(shape, gpus=1, zero_stage=0, micro_batch=batch, seq_len=seq, lora_r=8,
                         gradient_checkpointing=False).activations
    saved, peak = {}, {}
    for skip in (True, False):
        with disable_input_dtype_casting(model, active=skip), torch.autocast("cpu", dtype=torch.bfloat16):
            saved[skip], peak[skip] = training_step_bytes(model, tokens)
    assert predicted == pytest.approx(peak[True], rel=0.03)
    assert saved[False] - saved[True] == 4 * shape.hidden_size * 2 * batch * seq * shape.num_layers


def test_under_deepspeed_adapters_follow_the_base_dtype_and_keep_what_the_formula_counts():
    """DeepSpeed runs without autocast, and ZeRO-3 leaves zero.Init models' dtypes alone. With peft's fp32 adapters
    on a bf16 base each adapted layer would keep an fp32 copy of its input; load_model creates them in bf16 instead."""
    from peft.tuners.lora import LoraLayer

    from swallow_ft.arguments import ModelArguments
    from swallow_ft.model import add_lora

    shape = SMALL_LLAMA
    batch, seq = 2, 256
    tokens = torch.randint(0, shape.vocab_size, (batch, seq))
    predicted = estimate(shape, gpus=1, zero_stage=3, micro_batch=batch, seq_len=seq, lora_r=8,
                         gradient_checkpointing=False).activations
    saved, peak = {}, {}
    for base_dtype in (True, False):
        torch.manual_seed(0)
        base = LlamaForCausalLM._from_config(llama_config(shape, attn_implementation="sdpa"), dtype=torch.bfloat16)
        model = add_lora(base, ModelArguments("tiny", lora_r=8), adapters_in_base_dtype=base_dtype).train()
        model.enable_input_require_grads()
        lora_a = next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_A["default"].weight
        assert lora_a.dtype == (torch.bfloat16 if base_dtype else torch.float32)
        saved[base_dtype], peak[base_dtype] = training_step_bytes(model, tokens)
    assert predicted == pytest.approx(peak[True], rel=0.03)
    assert saved[False] > 1.3 * saved[True]

def test_gradient_checkpointing_and_zero3_shrink_the_estimate():
    shape, common = KNOWN_SHAPES["swallow-7b"], dict(gpus=8, micro_batch=4, seq_len=4096)
    plain = estimate(shape, zero_stage=2, gradient_checkpointing=False, **common)
    checkpointed = estimate(shape, zero_stage=2, gradient_checkpointing=True, **common)
    assert checkpointed.activations < plain.activations / 5
    assert estimate(shape, zero_stage=3, gradient_checkpointing=True, **common).weights < checkpointed.weights / 4
    assert "total" in str(plain) and "GiB" in plain.table()


def test_offload_needs_zero():
    with pytest.raises(ValueError):
        estimate(TINY, gpus=1, zero_stage=2, micro_batch=1, seq_len=8, gradient_checkpointing=False,
                 offload_params=True)


def test_from_config_defaults_kv_heads_to_attention_heads():
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176,
              "vocab_size": 1200}
    assert ModelShape.from_config(config).num_kv_heads == 4


def test_shape_for_a_local_dir(tmp_path):
    llama_config(TINY).save_pretrained(tmp_path)
    assert shape_for(str(tmp_path)) == TINY


def test_a_local_config_with_rope_scaling_says_so(tmp_path):
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    llama_config(TINY, rope_scaling=scaled).save_pretrained(tmp_path)
    assert shape_for(str(tmp_path)).rope_scaling
    (tmp_path / "config.json").write_text(json.dumps({**llama_config(TINY).to_diff_dict(), "rope_scaling": None}))
    assert not shape_for(str(tmp_path)).rope_scaling  # Llama-2 configs say null


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "{d} is a directory without config.json: point it at the model's directory"),
    (lambda d: (d / "config.json").write_text("{"), "{d}/config.json: cannot be read (Expecting property name"),
])
def test_local_directories_that_hold_no_model_are_errors(make, message, tmp_path):
    make(tmp_path)
    with pytest.raises(UserError) as error:
        shape_for(str(tmp_path))
    assert str(error.value).startswith(message.format(d=tmp_path))
    assert "\n" not in str(error.value)


def test_a_path_that_is_not_there_is_left_to_run_clms_own_check(tmp_path):
    assert shape_for(str(tmp_path / "nope")) is None  # model.check_local_model_path says it, here and in run_clm.py


def test_shape_for_an_unsupported_architecture_is_none(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 4096}')
    assert shape_for(str(tmp_path)) is None


@pytest.mark.parametrize("hub_id, known", [
    ("tokyotech-llm/Swallow-70b-instruct-v0.1", "swallow-70b"),
    ("tokyotech-llm/Swallow-7b-hf", "swallow-7b"),
    ("tokyotech-llm/Swallow-13b-instruct-hf", "swallow-13b"),
    ("tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1", "llama-3-swallow-8b"),
    ("tokyotech-llm/Llama-3-Swallow-70B-v0.1", "llama-3-swallow-70b"),
    ("tokyotech-llm/swallow-70b-instruct-v0.1", "swallow-70b"),  # the Hub resolves ids whatever their case
])
def test_shape_for_known_hub_ids(hub_id, known, tmp_path):
    assert shape_for(hub_id, cache_dir=str(tmp_path)) == KNOWN_SHAPES[known]


@pytest.mark.parametrize("hub_id", ["tokyotech-llm/Llama-3.1-Swallow-70B-Instruct-v0.3",
                                    "tokyotech-llm/Llama-3.3-Swallow-70B-v0.4"])
def test_llama_3_1_and_3_3_swallows_scale_rope_to_131072_positions(hub_id, tmp_path):
    shape = shape_for(hub_id, cache_dir=str(tmp_path))
    assert shape.max_positions == 131072 and shape.rope_scaling
    assert shape.total_params == KNOWN_SHAPES["llama-3-swallow-70b"].total_params


def test_every_known_id_is_an_exact_tokyotech_llm_llama_id():
    assert len(SWALLOW_MODELS) == 31  # 15 Llama-2 Swallows, 4 Llama-3, 10 Llama-3.1, 2 Llama-3.3
    assert all(name.startswith("tokyotech-llm/") and name.count("/") == 1 for name in SWALLOW_MODELS)
    assert "tokyotech-llm/Swallow-13b-NVE-instruct-hf" not in SWALLOW_MODELS  # never released


@pytest.mark.parametrize("hub_id, suggestion", [
    ("tokyotech-llm/Swallow-70b-instrct-v0.1", "did you mean tokyotech-llm/Swallow-70b-instruct-v0.1"),
    ("Swallow-70b-instruct-v0.1", "did you mean tokyotech-llm/Swallow-70b-instruct-v0.1"),
    ("tokyotech-llm/Swallow-70b-instruct-v0.2", "did you mean tokyotech-llm/Swallow-70b-instruct-v0.1"),
    ("tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.4",
     "did you mean tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0."),
    ("tokyotech-llm/totally-new", "known: swallow_ft/memory.py SWALLOW_MODELS"),
])
def test_a_mistyped_swallow_id_is_an_error_not_a_guess(hub_id, suggestion, tmp_path):
    """It used to match any name with "swallow" and "70b" in it, so the typo surfaced on the cluster, as an OSError
    from every rank."""
    with pytest.raises(UserError) as error:
        shape_for(hub_id, cache_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{hub_id} is not a known Swallow model id and not a local directory: check the "
                              f"spelling ({suggestion}")
    assert message.endswith(f"passes once its config is cached (hf download {hub_id} config.json)")


def test_a_cached_config_beats_the_list(tmp_path, monkeypatch):
    """A Swallow newer than SWALLOW_MODELS, once its config.json is in the HF cache, is read from there."""
    from huggingface_hub.constants import CONFIG_NAME

    hub_id = "tokyotech-llm/Llama-4-Swallow-8B-v0.1"
    snapshot = tmp_path / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    llama_config(TINY).to_json_file(snapshot / CONFIG_NAME)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert shape_for(hub_id, cache_dir=str(tmp_path)) == TINY


@pytest.mark.parametrize("shape, seq, problem", [
    (KNOWN_SHAPES["swallow-7b"], 4096, None),
    (KNOWN_SHAPES["swallow-7b"], 8192, "8192 tokens exceed the model's max_position_embeddings (4096) and its config "
                                       "has no rope_scaling"),
    (KNOWN_SHAPES["llama-3-swallow-8b"], 8192, None),
    (SWALLOW_MODELS["tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"], 32768, None),
    (ModelShape(64, 2, 4, 2, 176, 1200), 10 ** 6, None),  # a config without max_position_embeddings: unknown
])
def test_context_problem(shape, seq, problem):
    assert context_problem(shape, seq) == problem


@pytest.mark.parametrize("hub_id", ["some/unknown-model", "tokyotech-llm/Swallow-MS-7b-v0.1",
                                    "tokyotech-llm/Swallow-MX-8x7b-NVE-v0.1"])
def test_shape_for_unknown_is_none(hub_id, tmp_path):
    assert shape_for(hub_id, cache_dir=str(tmp_path)) is None


def test_nve_models_keep_the_llama2_vocabulary(tmp_path):
    assert shape_for("tokyotech-llm/Swallow-7b-NVE-hf", cache_dir=str(tmp_path)).vocab_size == 32000


def test_suggestions_for_70b_full_fine_tuning_on_one_gpu_all_fit():
    shape = KNOWN_SHAPES["swallow-70b"]
    settings = dict(gpus=1, zero_stage=0, micro_batch=4, seq_len=2048, gradient_checkpointing=False)
    assert not fits(estimate(shape, **settings), 80)
    suggestions = suggest_fixes(shape, 80, **settings)
    assert suggestions and all(s.endswith("GiB per GPU") for s in suggestions)
    assert "parameter offload" in suggestions[0]
    for suggestion in suggestions:  # each string names a setting; rebuild it and check it really fits
        fixed = dict(settings, gradient_checkpointing="--activation_checkpointing" in suggestion)
        for part in suggestion.split(":")[0].split(", "):
            if part.startswith("micro-batch"):
                fixed["micro_batch"] = int(part.split()[-1])
            elif part.startswith("ZeRO-"):
                fixed["zero_stage"] = int(part[5:])
            elif part.endswith("GPUs"):
                fixed["gpus"] = int(part.split()[0])
        fixed["offload_params"] = "parameter offload" in suggestion
        fixed["offload_optimizer"] = "optimizer offload" in suggestion
        assert fits(estimate(shape, **fixed), 80), suggestion


def test_70b_lora_zero3_fits_four_80gb_gpus():
    result = estimate(KNOWN_SHAPES["swallow-70b"], gpus=4, zero_stage=3, micro_batch=1, seq_len=4096, lora_r=16,
                      gradient_checkpointing=True)
    assert fits(result, 80)
    assert result.weights > 30 * GiB  # the frozen 16-bit base, a quarter of 138 GB per GPU
    assert suggest_fixes(KNOWN_SHAPES["swallow-70b"], 80, gpus=4, zero_stage=3, micro_batch=1, seq_len=4096,
                         lora_r=16, gradient_checkpointing=True) == []


@pytest.mark.parametrize("pool, gib", [("h200-pool", 139.7), ("gpu-H100x8", 79.1), ("A100-80", 79.1), ("a10g", 21.9),
                                       ("L40S", 44.4), ("l4-spot", 21.9), ("rtx-a6000", 47.4), ("8xH100", 79.1),
                                       ("a100_40gb", 39.4), ("A100", 79.1), ("cpu-pool", None), ("pool4", None),
                                       ("A100-SXM4-40GB", 39.4), ("a100-pcie-40gb", 39.4), ("40gb-a100", 39.4),
                                       ("a100-2x40gb", 39.4), ("a100-40gb-spot", 39.4), ("v100-16gb", 15.8)])
def test_gpu_memory_for_pool_is_what_torch_reports(pool, gib):
    """Not the GB the card is sold by: torch.cuda reports 79.11 GiB for an H100 80GB, 39.5 for an A100 40GB."""
    assert gpu_memory_for_pool(pool) == gib


def test_cheapest_fix_comes_first_and_later_ones_are_alternatives():
    settings = dict(gpus=8, zero_stage=2, micro_batch=4, seq_len=4096, gradient_checkpointing=False)
    suggestions = suggest_fixes(KNOWN_SHAPES["llama-3-swallow-8b"], 80, **settings)
    assert suggestions[0].startswith("--activation_checkpointing: ")
    assert not any("--activation_checkpointing" in s for s in suggestions[1:])  # not the same fix made stronger


def test_ligers_fused_loss_is_suggested_and_dropped_for_zero3():
    """At 8 x 4096 tokens a 128,256 vocabulary's loss alone takes 47 GiB; Liger's fused loss, which ZeRO-3 rules
    out, takes well under one."""
    big = dict(gpus=8, zero_stage=2, micro_batch=8, seq_len=4096, gradient_checkpointing=False)
    suggestions = suggest_fixes(KNOWN_SHAPES["llama-3-swallow-8b"], 80, **big)
    assert suggestions[0] == "--activation_checkpointing, --use_liger_kernel: 48.9 GiB per GPU"
    needs_zero3 = dict(gpus=4, zero_stage=2, micro_batch=2, seq_len=2048, lora_r=16, gradient_checkpointing=True,
                       fused_loss=True)
    assert suggest_fixes(KNOWN_SHAPES["llama-3-swallow-70b"], 80, **needs_zero3) == [
        "micro-batch 1, ZeRO-3, without --use_liger_kernel: 43.5 GiB per GPU"]
