"""bench/throughput.py on CPU: the tiny shape through the project's own training path (a smoke test, no timings)."""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
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
    assert report["plan_gpu_gib"] == (float(os.environ["PLAN_GPU_GIB"]) if os.environ.get("PLAN_GPU_GIB") else None)
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
        assert row["tokens_per_second_median"] > 0
        assert row["model_released"]  # nothing keeps an in-process recipe's model (its GPU memory) alive
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
    # The reference's DeepSpeed config (explicit buckets, DeepSpeed's AdamW and WarmupLR); its bf16 section is "auto".
    assert seed["precision"] == "bf16" and seed["deepspeed"] == "ds_config_seed.json"
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


def test_seed_uses_the_references_deepspeed_config(monkeypatch):
    """`seed` runs the reference's ZeRO-3 config (explicit buckets, DeepSpeed's AdamW and WarmupLR), not the "auto"
    buckets transformers sizes from the hidden size; where FusedAdam cannot be built, a twin with torch_adam."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import recipes

    seed = json.loads((REPO / "bench/ds_config_seed.json").read_text())
    zero = seed["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"],
            zero["sub_group_size"], zero["stage3_max_live_parameters"]) == (5e8, 5e7, 1e5, 1e9, 1e9)
    assert seed["optimizer"]["type"] == "AdamW" and seed["scheduler"]["type"] == "WarmupLR"
    assert seed["fp16"]["initial_scale_power"] == 16
    assert recipes.recipe("seed")["deepspeed"] == "bench/ds_config_seed.json"
    twin = json.loads((REPO / "bench/ds_config_seed_torchadam.json").read_text())
    assert twin["optimizer"]["params"].pop("torch_adam") is True and twin == seed
    monkeypatch.setattr(recipes, "CUDA", True)
    monkeypatch.setattr(recipes, "fused_adam_available", lambda: False)
    monkeypatch.setenv("PLAN_GPU_GIB", "79.6")
    on_gpu = recipes.resolve("seed", "swallow-7b", quiet=True)
    assert on_gpu["deepspeed"] == "bench/ds_config_seed_torchadam.json" and "FusedAdam" in on_gpu["note"]
    assert on_gpu["precision"] == "fp16"


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
           "PROFILE_STEPS": "1", "WHEEL_DIR": str(tmp_path / "no-wheels"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
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
    versions = (tmp_path / "versions.txt").read_text()
    assert "python" in versions and "PLAN_GPU_GIB 79.6" in versions and "determined " in versions
    # Planned as for an 80 GB H100 unless PLAN_GPU_GIB says otherwise, and the reports say so.
    assert skewed["plan_gpu_gib"] == random["plan_gpu_gib"] == 79.6 and skewed["plan_gpu_gib_from"] == "PLAN_GPU_GIB"
    assert all(r["steps_measured"] == 16 for r in skewed["rows"] + random["rows"])
    # A device run brings back only a few files: the profile tables travel packed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiles.tgz", "random.json", "random.log", "skewed.json",
                                                          "skewed.log", "versions.txt"]


def test_gpu_script_installs_missing_packages_from_wheels_or_says_what_is_missing(tmp_path):
    """A device image lacks some of the bench's packages: gpu.sh installs the carried wheels into SITE_DIR, imports
    again, and names what is still missing in error.txt (and one line on stderr) before running anything."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    dist = "bench_probe_pkg-1.0.dist-info"
    files = {"bench_probe_pkg/__init__.py": "",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: bench-probe-pkg\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(wheels / "bench_probe_pkg-1.0-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    env = {**os.environ, "BENCH_IMPORTS": "json,bench_probe_pkg,no_such_module_x", "WHEEL_DIR": str(wheels),
           "SITE_DIR": str(tmp_path / "site"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3 and (tmp_path / "site" / "bench_probe_pkg" / "__init__.py").exists()
    error = (out / "error.txt").read_text()
    assert "cannot import no_such_module_x " in error and "bench_probe_pkg" not in error and "README" in error
    assert result.stderr.strip().splitlines()[-1] == error.strip() and sorted(os.listdir(out)) == ["error.txt"]


def test_every_recipe_sees_the_same_examples_up_to_its_seq():
    """Example lengths are drawn against one base length, so `seed` (1024) and `default` (2048) train on the same
    examples, the long ones truncated, and the skewed ratio compares like with like."""
    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    short, long = (throughput.make_rows("skewed", seq, 50_000, 40, 1200, 0) for seq in (1024, 2048))
    assert len(short) >= 40 and max(map(len, long["input_ids"])) > 1024  # some examples are truncated
    for a, b, labels in zip(short["input_ids"], long["input_ids"], short["labels"]):
        assert a == b[:1024]
        assert any(x != throughput.IGNORE for x in labels)  # each truncated example still trains its last 30%


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
        throughput.run_in_child("seed", r, tiny_model, tmp_path, args, "random", deadline=started + 6)
    assert time.time() - started < 30
    time.sleep(1)  # what a kill missed is an orphan by now, still running
    left = subprocess.run(["pgrep", "-f", "--", f"--_work {tmp_path}"], capture_output=True, text=True)
    assert left.returncode == 1 and left.stdout == "", left  # 1: none matched (2 would be pgrep's usage error)


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


def test_data_prep_builds_cold_warm_and_repacked(tiny_model, tmp_path):
    """A smoke run of bench/data_prep.py (its timings mean nothing here): the same packed rows from a warm cache,
    fewer after --max_train_samples."""
    out = tmp_path / "data_prep.json"
    result = subprocess.run([sys.executable, "bench/data_prep.py", "--rows", "300", "--block_size", "256",
                             "--tokenizer", str(tiny_model), "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cold, warm, repacked = json.loads(out.read_text())["results"]
    assert cold["packed_train_rows"] == warm["packed_train_rows"] > repacked["packed_train_rows"] > 0
    assert 0.5 < cold["packing_efficiency"] <= 1 and "warm cache" in result.stdout
