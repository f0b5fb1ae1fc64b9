"""The memory model against the real thing: meta-device Llamas, peft, DeepSpeed's estimators, autograd."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swallow_ft import memory
from swallow_ft.memory import (
    KNOWN_SHAPES,
    GiB,
    ModelShape,
    estimate,
    fits,
    gpu_memory_for_pool,
    shape_for,
    suggest_fixes,
)


def llama_config(shape: ModelShape, **extra) -> LlamaConfig:
    return LlamaConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
                       tie_word_embeddings=shape.tie_word_embeddings, **extra)


TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176, vocab_size=1200)


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


def saved_activation_bytes(model, tokens):
    """Bytes autograd keeps for backward, counted once per storage, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    return sum(saved.values())


@pytest.mark.parametrize("lora_r, targets, dropout", [(None, None, 0.0), (8, "all-linear", 0.05), (8, "all-linear", 0.0),
                                                     (8, ["q_proj", "v_proj"], 0.0), (8, ["o_proj", "down_proj"], 0.0)])
def test_activation_formula_matches_what_autograd_saves(lora_r, targets, dropout, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(memory, "DROPOUT_MASK_BYTES", 2)  # CPU dropout keeps its mask in bf16, CUDA in bool

    torch.manual_seed(0)
    shape = ModelShape(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=688,
                       vocab_size=1000)
    model = LlamaForCausalLM(llama_config(shape, attn_implementation="sdpa"))
    if lora_r:
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules=targets, lora_dropout=dropout))
        # As the Trainer does for peft under gradient checkpointing; else the first layer's input needs no grad.
        model.enable_input_require_grads()
    model = model.to(torch.bfloat16).train()
    batch, seq = 2, 256
    measured = saved_activation_bytes(model, torch.randint(0, shape.vocab_size, (batch, seq)))
    predicted = estimate(shape, gpus=1, zero_stage=0, micro_batch=batch, seq_len=seq, lora_r=lora_r,
                         lora_targets=targets or "all-linear", lora_dropout=dropout,
                         gradient_checkpointing=False).activations
    assert predicted == pytest.approx(measured, rel=0.03)



def test_activation_formula_holds_for_fp32_adapters_under_autocast_as_swallow_trainer_runs_them():
    """In training the adapters are fp32 (peft's autocast_adapter_dtype) over a bf16 base, under autocast. peft's
    casts of each adapted layer's input to fp32 and back would make every lora_A keep its own bf16 copy of its input:
    4h bytes per token per layer more than the formula (8 GiB for 7B at 4 x 2048). SwallowTrainer skips them."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    shape = ModelShape(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=688,
                       vocab_size=1000)
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(llama_config(shape, attn_implementation="sdpa"), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear")).train()
    model.enable_input_require_grads()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch, seq = 2, 256
    tokens = torch.randint(0, shape.vocab_size, (batch, seq))
    predicted = estimate(shape, gpus=1, zero_stage=0, micro_batch=batch, seq_len=seq, lora_r=8,
                         gradient_checkpointing=False).activations
    saved = {}
    for skip in (True, False):
        with disable_input_dtype_casting(model, active=skip), torch.autocast("cpu", dtype=torch.bfloat16):
            saved[skip] = saved_activation_bytes(model, tokens)
    assert predicted == pytest.approx(saved[True], rel=0.03)
    assert saved[False] - saved[True] == 4 * shape.hidden_size * 2 * batch * seq * shape.num_layers


def test_under_deepspeed_adapters_follow_the_base_dtype_and_keep_what_the_formula_counts():
    """DeepSpeed runs without autocast, and ZeRO-3 leaves zero.Init models' dtypes alone. With peft's fp32 adapters
    on a bf16 base each adapted layer would keep an fp32 copy of its input; load_model creates them in bf16 instead."""
    from peft.tuners.lora import LoraLayer

    from swallow_ft.arguments import ModelArguments
    from swallow_ft.model import add_lora

    shape = ModelShape(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=688,
                       vocab_size=1000)
    batch, seq = 2, 256
    tokens = torch.randint(0, shape.vocab_size, (batch, seq))
    predicted = estimate(shape, gpus=1, zero_stage=3, micro_batch=batch, seq_len=seq, lora_r=8,
                         gradient_checkpointing=False).activations
    saved, casts = {}, {}
    for base_dtype in (True, False):
        torch.manual_seed(0)
        base = LlamaForCausalLM._from_config(llama_config(shape, attn_implementation="sdpa"), dtype=torch.bfloat16)
        model = add_lora(base, ModelArguments("tiny", lora_r=8), adapters_in_base_dtype=base_dtype).train()
        model.enable_input_require_grads()
        lora_a = next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_A["default"].weight
        assert lora_a.dtype == (torch.bfloat16 if base_dtype else torch.float32)
        saved[base_dtype] = saved_activation_bytes(model, tokens)
    assert predicted == pytest.approx(saved[True], rel=0.03)
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


def test_shape_for_an_unsupported_architecture_is_none(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 4096}')
    assert shape_for(str(tmp_path)) is None


@pytest.mark.parametrize("hub_id, known", [
    ("tokyotech-llm/Swallow-70b-instruct-v0.1", "swallow-70b"),
    ("tokyotech-llm/Swallow-7b-hf", "swallow-7b"),
    ("tokyotech-llm/Swallow-13b-instruct-hf", "swallow-13b"),
    ("tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1", "llama-3-swallow-8b"),
    ("tokyotech-llm/Llama-3.1-Swallow-70B-Instruct-v0.3", "llama-3-swallow-70b"),
])
def test_shape_for_known_hub_ids(hub_id, known, tmp_path):
    assert shape_for(hub_id, cache_dir=str(tmp_path)) == KNOWN_SHAPES[known]


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


@pytest.mark.parametrize("pool, gib", [("h200-pool", 141), ("gpu-H100x8", 80), ("A100-80", 80), ("a10g", 24),
                                       ("L40S", 48), ("l4-spot", 24), ("rtx-a6000", 48), ("8xH100", 80),
                                       ("a100_40gb", 80), ("cpu-pool", None), ("pool4", None)])
def test_gpu_memory_for_pool(pool, gib):
    assert gpu_memory_for_pool(pool) == gib


def test_cheapest_fix_comes_first_and_later_ones_are_alternatives():
    settings = dict(gpus=8, zero_stage=2, micro_batch=8, seq_len=4096, gradient_checkpointing=False)
    suggestions = suggest_fixes(KNOWN_SHAPES["llama-3-swallow-8b"], 80, **settings)
    assert suggestions[0].startswith("--activation_checkpointing: ")
    assert not any("--activation_checkpointing" in s for s in suggestions[1:])  # not the same fix made stronger
