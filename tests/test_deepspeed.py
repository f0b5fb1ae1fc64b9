"""Two ZeRO-3 ranks on CPU (gloo) under torchrun, started by run_clm.py from slots_per_trial."""

import re

from conftest import checkpoint_steps, read_metrics, run_clm


def test_two_rank_zero3_run_lands_both_shards_in_one_checkpoint(tiny_model, tmp_path):
    result = run_clm("--config", "experiments/local_tiny_ds3.yaml", "--runs_dir", tmp_path,
                     "--max_steps", 20, "--save_steps", 20, "--eval_steps", 20, "--logging_steps", 5)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "launching 2 processes" in result.stderr

    storage = tmp_path / "local_tiny_ds3" / "checkpoints"
    steps = checkpoint_steps(storage)
    assert list(steps.values()) == [20]
    ckpt = storage / next(iter(steps)) / "checkpoint-20"
    shards = sorted(p.name for p in (ckpt / "global_step20").iterdir())
    assert [s for s in shards if re.match(r"zero_pp_rank_\d_mp_rank_00_model_states\.pt", s)] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert sum("optim_states" in s for s in shards) == 2
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    # stage3_gather_16bit_weights_on_model_save: the adapter is saved whole, not as empty shards.
    assert (ckpt / "adapter_model.safetensors").stat().st_size > 10_000

    training = [r for r in read_metrics(tmp_path / "local_tiny_ds3" / "metrics.jsonl") if r["group"] == "training"]
    assert training[-1]["loss"] < training[0]["loss"]
    # One summary, from rank 0 only.
    assert result.stdout.count("Finished at step 20") == 1
