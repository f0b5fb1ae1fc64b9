"""bench/throughput.py on CPU: the tiny shape through the project's own training path (a smoke test, no timings)."""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO


def bench(tmp_path, *args, timeout):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench/throughput.py", "--shape", "tiny", "--steps", "4", "--warmup", "1",
                             "--data", "skewed", "--json", str(out), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["ceiling_tflops"] > 0
    assert "| recipe | tokens/s |" in result.stdout
    return {row["recipe"]: row for row in report["rows"]}, result


def test_default_and_padded_on_cpu(tiny_model, tmp_path):
    rows, result = bench(tmp_path, "--recipes", "default,padded,default+peftcasts,default+fusedlora,default+hostreads",
                         "--profile-steps", "1", timeout=300)
    assert set(rows) == {"default", "padded", "default+peftcasts", "default+fusedlora", "default+hostreads"}
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["step_time"] > 0 and row["steps_measured"] == 4
        # One more step, after the measured ones, under torch.profiler: ops counted, the table written.
        assert row["profile"]["steps"] == 1 and row["profile"]["aten_ops_per_step"] > 100
        assert "aten::mm" in (tmp_path / f"profile-{row['recipe'].replace('+', '_')}-skewed.txt").read_text()
        assert row["profile"]["gpu_busy"] is None and f"profile skewed {row['recipe']}:" in result.stdout
        assert row["peak_gpu_mem_gib"] is None and row["mfu"] > 0 and row["vs_seed"] is None
        assert row["deepspeed"] is None and row["seq"] == 256 and row["micro_batch"] == 4
        assert 0 < row["steps_s"] <= row["wall_s"]  # the span holds the measured steps and the gaps between them
        assert row["callback_clock_vs_timer"] == pytest.approx(1, abs=0.05)  # the Web UI's tokens/s clock
    # The bench trains in bf16 under autocast on CPU too: peft's casts add ops per step, fused LoRA layers remove some.
    ops = {name: row["profile"]["aten_ops_per_step"] for name, row in rows.items()}
    assert ops["default+peftcasts"] > ops["default"] > ops["default+fusedlora"]
    assert rows["default+peftcasts"]["peft_casts"] and rows["default+fusedlora"]["fused_lora"]
    assert not rows["default"]["fused_lora"]  # on a GPU only, unless forced
    # The Trainer's own token count, read every micro-step, counts the same tokens as SwallowTrainer's.
    assert rows["default+hostreads"]["host_reads"] and not rows["default"]["host_reads"]
    assert rows["default+hostreads"]["tokens_per_second"] * rows["default+hostreads"]["steps_s"] == pytest.approx(
        rows["default"]["tokens_per_second"] * rows["default"]["steps_s"])
    # Skewed lengths: packed rows are nearly full, padded batches are mostly padding. Not a timing assertion.
    assert rows["default"]["packing"] and not rows["padded"]["packing"]
    assert rows["default"]["packing_efficiency"] > rows["padded"]["fill_efficiency"]
    assert rows["default"]["fill_efficiency"] > rows["padded"]["fill_efficiency"]


def test_seed_runs_zero3_under_torchrun_on_cpu(tiny_model, tmp_path):
    # ~20 s once DeepSpeed's CPU shm-comm op is built (its first build adds ~50 s).
    rows, result = bench(tmp_path, "--recipes", "seed,default", timeout=300)
    seed = rows["seed"]
    assert "torchrun --nproc_per_node 1" in result.stderr
    assert "fp16 is refused on CPU" in result.stderr and "fp16 is refused on CPU" in seed["note"]
    assert seed["precision"] == "bf16" and seed["deepspeed"] == "ds_config_stage_3.json"
    assert seed["micro_batch"] == 1 and seed["seq"] == 1024 and seed["lora_targets"] == "q_proj,v_proj"
    assert seed["tokens_per_second"] > 0 and seed["step_time"] > 0
    assert seed["vs_seed"] == 1.0 and rows["default"]["vs_seed"] > 0
    # MFU's FLOPs count ZeRO-3-partitioned weights whole: the same count as the unsharded default's base.
    sys.path.insert(0, str(REPO / "bench"))
    from recipes import SHAPES

    shape = SHAPES["tiny"]
    base = shape.total_params - shape.vocab_size * shape.hidden_size - shape.hidden_size * (2 * shape.num_layers + 1)
    assert seed["flops_per_token"] == 4 * base + 6 * shape.lora_params(8, "q_proj,v_proj")
    assert rows["default"]["flops_per_token"] == 4 * base + 6 * shape.lora_params(16)


def test_recipes_combine_with_modifiers():
    sys.path.insert(0, str(REPO / "bench"))
    import recipes

    r = recipes.recipe("default+flex+dropout+mb8+seq4096")
    assert r["attn"] == "flex_attention" and r["lora_dropout"] == 0.05 and r["micro_batch"] == 8 and r["seq"] == 4096
    assert recipes.recipe("padded")["packing"] is False and recipes.recipe("default")["lora_dropout"] == 0.0
    with pytest.raises(ValueError, match="unknown modifier 'fast' in 'default\\+fast'"):
        recipes.recipe("default+fast")
    assert recipes.recipe("seed+r16")["lora_r"] == 16 and recipes.recipe("default+qv")["lora_targets"] == "q_proj,v_proj"
    assert recipes.SHAPES["tiny-32l"].num_layers == recipes.SHAPES["swallow-7b"].num_layers  # 7B's depth, tiny width
    compiled = recipes.recipe("default+compilefull+expseg")  # environment variables from several modifiers add up
    assert compiled["compile"] and compiled["env"] == {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "false",
                                                       "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert recipes.recipe("default")["env"] == {}
    on_cpu = recipes.resolve("default", "tiny", quiet=True)
    assert on_cpu["liger"] is False and on_cpu["micro_batch"] == 4 and on_cpu["seq"] == 256


def test_bad_recipe_and_budget(tiny_model, tmp_path):
    bad = subprocess.run([sys.executable, "bench/throughput.py", "--recipes", "default+liger"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("liger needs a GPU (Triton kernels)")
    # Past --budget-s no recipe starts; the JSON says which were skipped (and is written as rows come in).
    rows, result = bench(tmp_path, "--recipes", "default,padded", "--data", "skewed,random", "--budget-s", "0",
                         timeout=120)
    assert rows == {} and "skipped (past --budget-s): skewed:default, skewed:padded" in result.stdout


def test_gpu_script_runs_end_to_end_on_the_tiny_shape(tiny_model, tmp_path):
    # bench/gpu.sh is what a session with a GPU runs in one call; this checks the script, not any timing (`seed` under
    # torchrun has its own test above).
    env = {**os.environ, "SHAPE": "tiny", "RECIPES_SKEWED": "padded,default+expseg", "RECIPES_RANDOM": "default+compile",
           "PROFILE_STEPS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    skewed, random = (json.loads((tmp_path / f"{d}.json").read_text()) for d in ("skewed", "random"))
    assert [r["recipe"] for r in skewed["rows"]] == ["padded", "default+expseg"] and skewed["skipped"] == []
    assert [r["recipe"] for r in random["rows"]] == ["default+compile"]
    assert random["rows"][0]["compiled"] == "layers" and skewed["rows"][1]["compiled"] is None
    # The compile happens in the warm-up steps, which is why they are not measured.
    assert random["rows"][0]["warmup_s"] > random["rows"][0]["step_time"] * 4
    assert all(r["profile"]["aten_ops_per_step"] > 0 for r in skewed["rows"] + random["rows"])
    with tarfile.open(tmp_path / "profiles.tgz") as tar:
        assert "./profile-default_expseg-skewed.txt" in tar.getnames()
    assert "python" in (tmp_path / "versions.txt").read_text()
    # A device run brings back only a few files: the profile tables travel packed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiles.tgz", "random.json", "random.log", "skewed.json",
                                                          "skewed.log", "versions.txt"]


def test_a_recipe_past_the_deadline_is_killed_with_its_processes(tiny_model, tmp_path):
    """gpu.sh's one deadline: a recipe in its own process (here under torchrun, as `seed` runs) is killed at it, and
    the caller turns that into an error row; nothing it started is left running."""
    sys.path.insert(0, str(REPO / "bench"))
    import throughput
    from recipes import resolve

    args = argparse.Namespace(shape="tiny", steps=2, warmup=1, profile_steps=0, profile_dir=tmp_path, json=None)
    r = {**resolve("seed", "tiny", quiet=True), "steps": 2, "warmup": 1, "profile_steps": 0}
    started = time.time()
    with pytest.raises(TimeoutError, match="killed at --deadline"):
        throughput.run_in_child("seed", r, tiny_model, tmp_path, args, "random", deadline=started + 3)
    assert time.time() - started < 30
    left = subprocess.run(["pgrep", "-f", f"--_work {tmp_path}"], capture_output=True, text=True)
    assert left.stdout == ""


def test_trainer_overhead_script_measures_the_bookkeeping_calls():
    result = subprocess.run([sys.executable, "bench/trainer_overhead.py"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "739 parameters, 448 trainable" in result.stdout  # the 7B module structure, all-linear LoRA r16
    for call in ("Trainer.floating_point_ops", "SwallowTrainer.floating_point_ops", "model.zero_grad()"):
        assert f"ms  {call}" in result.stdout


def test_recipes_are_planned_for_the_gpu_size_asked(monkeypatch):
    """PLAN_GPU_GIB=79.6 on a bigger card gives the micro-batch an 80 GB H100 gets (bench/RESULTS.md, 2026-11-28):
    79.6 is nvidia-smi's 81,559 MiB, torch.cuda reports 79.1, and the 7B plan is the same at both."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import recipes

    from swallow_ft.gpus import gpu_gib
    from swallow_ft.plan import plan

    monkeypatch.delenv("PLAN_GPU_GIB", raising=False)
    assert recipes.planning_gib() == float("inf")  # no GPU here: every recipe fits
    monkeypatch.setenv("PLAN_GPU_GIB", "79.6")
    assert recipes.planning_gib() == 79.6
    nvidia_smi, torch_cuda = (plan(recipes.SHAPES["swallow-7b"], gpus=1, gpu_mem=gib, seq=2048, lora=True,
                                   global_batch=64).setting for gib in (79.6, gpu_gib(80, "h100")[0]))
    assert nvidia_smi == torch_cuda and torch_cuda.micro_batch == 4 and not torch_cuda.checkpointing
