"""The master's bookkeeping done locally: checkpoint registry, retention, metric truncation, preemption."""

import json
import os
import signal

import pytest
from determined import core
from determined.common.storage import SharedFSStorageManager

from swallow_ft.local_core import (
    LocalCheckpointContext,
    LocalTrainContext,
    SignalPreemptContext,
    latest_checkpoint,
    read_jsonl,
    truncate_metrics,
)


def _context(tmp_path, storage_config, searcher=None):
    storage = tmp_path / "storage"
    storage.mkdir(exist_ok=True)
    train = LocalTrainContext(tmp_path / "metrics.jsonl", tmp_path / "tb")
    ckpt = LocalCheckpointContext(core.DummyDistributedContext(), SharedFSStorageManager(str(storage)),
                                  tmp_path / "checkpoints.jsonl", train,
                                  searcher=searcher or {"metric": "eval_loss", "smaller_is_better": True},
                                  storage_config=storage_config)
    return train, ckpt, storage


def _save(tmp_path, train, ckpt, step, eval_loss):
    train.report_metrics(group="validation", steps_completed=step, metrics={"eval_loss": eval_loss})
    src = tmp_path / "out" / f"checkpoint-{step}"
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"x" * step)
    return ckpt.upload(str(tmp_path / "out"), metadata={"steps_completed": step}, shard=True,
                       selector=lambda p: p.startswith(f"checkpoint-{step}/"))


def test_retention_keeps_latest_and_best_like_the_master(tmp_path):
    train, ckpt, storage = _context(tmp_path, {"save_trial_latest": 1, "save_trial_best": 1})
    ids = {step: _save(tmp_path, train, ckpt, step, loss) for step, loss in [(10, 2.0), (20, 1.5), (30, 1.7)]}
    assert sorted(p.name for p in storage.iterdir()) == sorted([ids[20], ids[30]])  # best and latest
    assert latest_checkpoint(tmp_path / "checkpoints.jsonl")["storage_id"] == ids[30]
    registry = read_jsonl(tmp_path / "checkpoints.jsonl")
    assert {r["storage_id"]: r["searcher_metric"] for r in registry} == {ids[20]: 1.5, ids[30]: 1.7}
    assert json.loads((storage / ids[30] / "metadata.json").read_text()) == {"steps_completed": 30}


def test_retention_respects_larger_counts_and_bigger_is_better(tmp_path):
    train, ckpt, storage = _context(tmp_path, {"save_trial_latest": 2, "save_trial_best": 1},
                                    searcher={"metric": "eval_loss", "smaller_is_better": False})
    ids = {step: _save(tmp_path, train, ckpt, step, loss) for step, loss in [(10, 9.0), (20, 1.0), (30, 2.0)]}
    assert sorted(p.name for p in storage.iterdir()) == sorted([ids[10], ids[20], ids[30]])
    _save(tmp_path, train, ckpt, 40, 3.0)
    assert ids[20] not in {p.name for p in storage.iterdir()}


def test_truncate_metrics_drops_rows_after_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"group": "training", "steps_completed": s}) + "\n" for s in (10, 20, 30)))
    truncate_metrics(path, 20)
    assert [r["steps_completed"] for r in read_jsonl(path)] == [10, 20]


def test_tensorboard_gets_the_same_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = LocalTrainContext(tmp_path / "m.jsonl", tmp_path / "tb")
    train.report_metrics(group="training", steps_completed=5, metrics={"loss": 1.25, "note": "skipped"})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("training/loss")] == [(5, 1.25)]


def test_signals_become_preemption_and_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    preempt = SignalPreemptContext(core.DummyDistributedContext()).start()
    assert preempt.should_preempt() is False
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempt.should_preempt() is True
    preempt.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts(tmp_path):
    preempt = SignalPreemptContext(core.DummyDistributedContext()).start()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preempt.close()


def test_flops_per_token_counts_matmul_weights_once_per_pass(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from swallow_ft.det_callback import flops_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    embedding = model.get_input_embeddings().weight
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    n = sum(p.numel() for p in model.parameters()) - embedding.numel() - norms  # every linear, lm_head included
    assert flops_per_token(model) == 6 * n  # full fine-tuning: forward, activation and weight gradients
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_lora = lora.get_nb_trainable_parameters()[0]
    assert flops_per_token(lora) == 4 * n + 6 * n_lora  # a frozen base gets no weight gradients


def test_flops_per_token_of_swallow_7b_lora_is_the_closed_form():
    """The Web UI's MFU and the bench's count the same FLOPs: 4N for the frozen 7B base + 6N for the adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from swallow_ft.det_callback import flops_per_token
    from swallow_ft.memory import KNOWN_SHAPES

    shape = KNOWN_SHAPES["swallow-7b"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                             intermediate_size=11008, vocab_size=43176))
        lora = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    norms = shape.hidden_size * (2 * shape.num_layers + 1)
    base = shape.total_params - shape.vocab_size * shape.hidden_size - norms
    assert flops_per_token(lora) == 4 * base + 6 * shape.lora_params(16)
    assert 4 * base == pytest.approx(4 * 6.6e9, rel=0.02)


@pytest.mark.parametrize("device_name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                                 ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                                 ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362),
                                                 ("NVIDIA L40", 181), ("NVIDIA GH200 480GB", 989),
                                                 ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_tells_variants_of_a_card_apart(device_name, tflops):
    from swallow_ft.det_callback import peak_flops

    assert peak_flops(device_name) == (tflops * 1e12 if tflops else None)
