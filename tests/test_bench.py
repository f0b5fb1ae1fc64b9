"""bench/throughput.py on CPU: the tiny shape through the project's own training path (a smoke test, no timings)."""

import json
import subprocess
import sys

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
    rows, _ = bench(tmp_path, "--recipes", "default,padded", timeout=240)
    assert set(rows) == {"default", "padded"}
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["step_time"] > 0 and row["steps_measured"] == 4
        assert row["peak_gpu_mem_gib"] is None and row["mfu"] > 0 and row["vs_seed"] is None
        assert row["deepspeed"] is None and row["seq"] == 256 and row["micro_batch"] == 4
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


def test_recipes_combine_with_modifiers():
    sys.path.insert(0, str(REPO / "bench"))
    import recipes

    r = recipes.recipe("default+flex+dropout+mb8+seq4096")
    assert r["attn"] == "flex_attention" and r["lora_dropout"] == 0.05 and r["micro_batch"] == 8 and r["seq"] == 4096
    assert recipes.recipe("padded")["packing"] is False and recipes.recipe("default")["lora_dropout"] == 0.0
    with pytest.raises(ValueError, match="unknown modifier 'fast' in 'default\\+fast'"):
        recipes.recipe("default+fast")
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
