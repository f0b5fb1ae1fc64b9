"""Two ZeRO-3 ranks on CPU (gloo) under torchrun, started by run_clm.py from slots_per_trial."""

import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, checkpoint_steps, read_metrics, registered_steps, run_clm

ARGS = ["--config", "experiments/local_tiny_ds3.yaml", "--max_steps", 30, "--save_steps", 10, "--eval_steps", 10,
        "--logging_steps", 5]


def test_zero3_ranks_preempt_together_and_resume_into_one_sharded_checkpoint(tiny_model, tmp_path):
    """With activation checkpointing, as swallow_70b_ds3.yaml trains: ZeRO-3, LoRA and recomputation together."""
    args = ARGS + ["--activation_checkpointing"]
    run_dir = tmp_path / "local_tiny_ds3"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "run_clm.py", *map(str, args), "--runs_dir", str(tmp_path)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not registered_steps(run_dir):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # reaches only the launcher, which preempts both ranks
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    first = log_path.read_text()
    assert "launching 2 processes" in first
    stopped = int(re.search(r"Preempted at step (\d+)", first).group(1))
    assert 10 <= stopped < 30 and max(registered_steps(run_dir).values()) == stopped

    result = run_clm(*args, "--runs_dir", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"checkpoint-{stopped})" in result.stderr  # both ranks resumed from the preemption checkpoint
    # ZeRO-3 does not cast zero.Init models: the adapters are created in bf16, so peft casts no input to fp32.
    assert re.search(r"LoRA r=16 on all-linear: [\d,]+ trainable of [\d,]+ parameters \([\d.]+%\), in bfloat16",
                     result.stderr)
    assert result.stdout.count("Finished at step 30") == 1  # one summary, from rank 0 only
    assert "FutureWarning" not in result.stderr  # the pinned libraries' deprecations, every step (swallow_ft/__init__)

    steps = checkpoint_steps(run_dir / "checkpoints")
    assert 30 in steps.values()
    ckpt = run_dir / "checkpoints" / next(k for k, v in steps.items() if v == 30) / "checkpoint-30"
    shards = sorted(p.name for p in (ckpt / "global_step30").iterdir())
    assert [s for s in shards if re.match(r"zero_pp_rank_\d_mp_rank_00_model_states\.pt", s)] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert sum("optim_states" in s for s in shards) == 2
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    # stage3_gather_16bit_weights_on_model_save: the adapter is saved whole, not as empty shards.
    assert (ckpt / "adapter_model.safetensors").stat().st_size > 10_000

    training = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["group"] == "training"]
    steps_reported = [r["steps_completed"] for r in training]
    assert steps_reported == sorted(set(steps_reported))  # the resumed run repeated no step
    assert [s for s in steps_reported if s % 5 == 0] == [5, 10, 15, 20, 25, 30]
    assert training[-1]["loss"] < training[0]["loss"]


def test_a_second_ctrl_c_aborts_every_rank_even_beside_another_runs_ports(tiny_model, tmp_path):
    """Determined's broadcast server binds fixed ports (12360/12361) unless told otherwise: a second local run, or
    anything else holding them, would break this one. And torchrun puts each rank in a session of its own, so killing
    torchrun's process group on the second Ctrl-C used to leave the ranks running, and saving."""
    import socket

    held = []
    for port in (12360, 12361):
        s = socket.socket()
        try:
            s.bind(("", port))
            s.listen()
            held.append(s)
        except OSError:  # already taken by something else: the point is made either way
            s.close()
    log_path = tmp_path / "run.log"
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "run_clm.py", *map(str, ARGS), "--runs_dir", str(tmp_path)],
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            while not registered_steps(tmp_path / "local_tiny_ds3"):
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            before = registered_steps(tmp_path / "local_tiny_ds3")
            proc.send_signal(signal.SIGINT)  # preempt: the ranks start saving at the next step boundary
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)  # abort without saving
            proc.wait(timeout=60)
    finally:
        for s in held:
            s.close()
    assert proc.returncode == 130
    assert (f"aborted: no checkpoint saved after step {max(before.values())}; a rerun resumes from there"
            in log_path.read_text())
    time.sleep(0.5)
    survivors = subprocess.run(["pgrep", "-f", f"--runs_dir {tmp_path}"], capture_output=True, text=True).stdout
    assert survivors == "", log_path.read_text()[-3000:]
    time.sleep(5)  # orphaned ranks would have finished their save and registered it by now
    assert registered_steps(tmp_path / "local_tiny_ds3") == before
    assert "launching 2 processes" in log_path.read_text()


def test_a_data_error_in_two_ranks_ends_in_its_one_line(tiny_model, tmp_path):
    """Not in torchrun's ChildFailedError traceback and report, which used to follow the rank's own error line."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"message_1": "q", "message_2": "a"}\n{broken\n', encoding="utf-8")
    result = run_clm("--config", "experiments/local_tiny_ds3.yaml", "--runs_dir", tmp_path, "--train_file", broken)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert f"error: {broken} line 2: not valid JSON" in result.stderr


@pytest.mark.parametrize("ending, line, code", [
    ("sys.exit(3)", "error: rank 0 stopped with exit code 3; its output is above", 3),
    ("os.kill(os.getpid(), signal.SIGKILL)", "error: rank 0 stopped with signal SIGKILL; its output is above", 1),
])
def test_a_rank_that_crashes_is_named_with_its_exit_code_or_signal(tmp_path, ending, line, code):
    from swallow_ft.launch import TORCHRUN

    script = tmp_path / "rank.py"
    script.write_text(f"import os, signal, sys\nprint('rank output')\n{ending}\n")
    result = subprocess.run([sys.executable, "-c", TORCHRUN, "--standalone", "--nproc_per_node=1", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == code and "rank output" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == line and "Traceback" not in result.stderr, result.stderr
