"""Local mode end to end: the experiment YAML trains tiny Swallow through real Core API contexts."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, checkpoint_steps, read_metrics, registered_steps, run_clm

CONFIG = "experiments/local_tiny.yaml"


def test_local_run_trains_checkpoints_and_reports(tiny_model, tmp_path):
    result = run_clm("--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 50, "--logging_steps", 10,
                     "--eval_steps", 20, "--save_steps", 20)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "local_tiny"

    rows = read_metrics(run_dir / "metrics.jsonl")
    training = [r for r in rows if r["group"] == "training"]
    validation = [r for r in rows if r["group"] == "validation"]
    assert [r["steps_completed"] for r in training] == [10, 20, 30, 40, 50]
    assert [r["steps_completed"] for r in validation] == [20, 40, 50]  # the last one forced, for the searcher
    assert training[-1]["loss"] < 0.85 * training[0]["loss"]
    assert validation[-1]["eval_loss"] < validation[0]["eval_loss"]
    # Speed metrics survive (upstream's callback strips them) and ours are non-padding tokens/s.
    assert all(r["tokens_per_second"] > 0 for r in training)
    assert "train_tokens_per_second" in training[0]
    assert 0.8 < training[0]["packing_efficiency"] <= 1.0  # local_tiny.yaml packs its examples

    # Checkpoints at 20 and 40 were collected by the default retention (latest 1, best 1).
    steps = checkpoint_steps(run_dir / "checkpoints")
    assert list(steps.values()) == [50] and registered_steps(run_dir) == steps
    final = next(iter(steps))
    ckpt = run_dir / "checkpoints" / final / "checkpoint-50"
    assert (ckpt / "adapter_model.safetensors").stat().st_size > 0
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "user_data.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    assert "Finished at step 50" in result.stdout
    assert f"checkpoints/{final}" in result.stdout
    assert re.search(r"throughput\s+[\d,]+ tokens/s", result.stdout)

    # Run again (a master restarting the finished trial does the same): 50 steps are not a whole number of epochs,
    # so the Trainer would resume mid-epoch and train a step 51. Nothing is trained, nothing is added.
    again = run_clm("--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 50, "--logging_steps", 10,
                    "--eval_steps", 20, "--save_steps", 20)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint-50 is at step 50, which is --max_steps: nothing left to train" in again.stderr
    assert "Finished at step 50" in again.stdout and f"checkpoints/{final}" in again.stdout
    assert "throughput  nothing trained" in again.stdout
    eval_line = next(line for line in result.stdout.splitlines() if "eval_loss" in line and "->" in line)
    assert eval_line in again.stdout  # read back from the checkpoint's log
    assert read_metrics(run_dir / "metrics.jsonl") == rows and checkpoint_steps(run_dir / "checkpoints") == steps


def _start(args, log):
    return subprocess.Popen([sys.executable, "run_clm.py", *map(str, args)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(run_dir, proc, timeout=300):
    deadline = time.time() + timeout
    while not registered_steps(run_dir):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def _final_adapter(run_dir, step):
    (checkpoint,) = (run_dir / "checkpoints").glob(f"*/checkpoint-{step}")
    return load_file(checkpoint / "adapter_model.safetensors")


def _resumed_step(output):
    match = re.search(r"resuming from checkpoint \S+ \(.*checkpoint-(\d+)\)", output)
    assert match, output[-3000:]
    return int(match.group(1))


def test_sigkill_then_rerun_resumes_from_the_saved_step(tiny_model, tmp_path):
    args = ["--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 300, "--save_steps", 10]
    run_dir = tmp_path / "local_tiny"
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, log)
        _wait_for_checkpoint(run_dir, proc)
        proc.kill()  # no chance to save or clean up
        proc.wait()
    saved = max(registered_steps(run_dir).values())
    assert saved < 300

    result = run_clm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _resumed_step(result.stderr) == saved
    assert "Finished at step 300" in result.stdout
    training = [r["steps_completed"] for r in read_metrics(tmp_path / "local_tiny" / "metrics.jsonl")
                if r["group"] == "training"]
    # Rows after the restored checkpoint were dropped, then training went on: no duplicate steps.
    assert training == sorted(set(training)) and training[-1] == 300
    # TensorBoard is told the same: the resumed run's event file starts by purging the steps after the checkpoint.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    starts = [event.step for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
              for event in EventFileLoader(str(path)).Load() if event.session_log.status == 1]  # SessionLog.START
    assert starts == [saved + 1]


def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_model, tmp_path):
    steps = 200  # the signal comes after the first checkpoint (step 100), long before the last step
    args = ["--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", steps]
    run_dir = tmp_path / "local_tiny"
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(args, log)
        _wait_for_checkpoint(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    output = (tmp_path / "first.log").read_text()
    stopped = int(re.search(r"Preempted at step (\d+)", output).group(1))
    assert stopped < steps
    # The save happened at the step boundary where training stopped, not at the last save_steps.
    assert max(registered_steps(run_dir).values()) == stopped
    assert "rerun without --fresh" in output

    result = run_clm(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _resumed_step(result.stderr) == stopped
    assert f"Finished at step {steps}" in result.stdout

    # Surviving preemption means the same model: the Trainer restores the data order, RNG, optimizer and schedule,
    # so the interrupted run ends with exactly the adapter of a run that never stopped.
    uninterrupted = run_clm(*args[:3], tmp_path / "uninterrupted", *args[4:])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    resumed, straight = (_final_adapter(runs / "local_tiny", steps) for runs in (tmp_path, tmp_path / "uninterrupted"))
    # The summary's first eval_loss is the whole run's, not the first since the resume.
    assert [line for line in result.stdout.splitlines() if "eval_loss   first" in line] == [
        line for line in uninterrupted.stdout.splitlines() if "eval_loss   first" in line]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in resumed)


def test_fresh_starts_over(tiny_model, tmp_path):
    args = ["--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 20, "--eval_steps", 10]
    assert run_clm(*args).returncode == 0
    run_dir = tmp_path / "local_tiny"
    # A run is found by its name: other training flags would resume checkpoints trained differently.
    other = run_clm(*args, "--learning_rate=1e-3", "--max_steps", 30)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} holds checkpoints trained with other flags (--learning_rate 0.005 -> "
        "0.001): pass --fresh to start over, or --runs_dir DIR to keep both")

    # Files that exist but cannot be used: --fresh used to delete the checkpoints, then stop on them.
    (run_dir / "comparison").mkdir()
    files, steps = _run_files(run_dir), registered_steps(run_dir)
    broken = tmp_path / "broken.jsonl"
    broken.write_text((REPO / "data/camel_math_ja.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n{broken\n",
                      encoding="utf-8")
    mistakes = [
        (("--train_file", str(broken)), rf"error: {re.escape(str(broken))} line 2: not valid JSON"),
        (("--model_name_or_path", "tokyotech-llm/Swallow-7b-instruct-v0.1"),  # neither cached nor reachable
         r"error: --model_name_or_path tokyotech-llm/Swallow-7b-instruct-v0\.1: We couldn't connect to"),
    ]
    for mistake, message in mistakes:
        result = run_clm(*args, *mistake, "--fresh", env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.match(message, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
        assert _run_files(run_dir) == files and registered_steps(run_dir) == steps
        assert (run_dir / "comparison").is_dir()

    result = run_clm(*args, "--max_steps", 10, "--fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" not in result.stderr
    assert sorted(checkpoint_steps(run_dir / "checkpoints").values()) == [10]
    assert not (run_dir / "comparison").exists()  # the report of the checkpoints --fresh deleted


def test_the_same_seed_trains_the_same_adapter(tiny_model, tmp_path):
    # The LoRA adapters are initialised before the Trainer exists, so --seed must be applied before the model loads.
    args = ["--config", CONFIG, "--max_steps", 3, "--logging_steps", 1, "--save_steps", 3, "--eval_strategy", "no"]
    adapters = []
    for run in ("first", "second"):
        result = run_clm(*args, "--runs_dir", tmp_path / run)
        assert result.returncode == 0, result.stderr[-3000:]
        adapters.append(_final_adapter(tmp_path / run / "local_tiny", 3))
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "local_tiny" / "metrics.jsonl")
               if r["group"] == "training"] for run in ("first", "second")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_a_run_with_nothing_to_resume_drops_what_a_killed_attempt_reported(tiny_model, tmp_path):
    """Killed before its first checkpoint, a run left metrics that the next attempt would otherwise repeat."""
    run_dir = tmp_path / "local_tiny"
    run_dir.mkdir()
    stale = {"group": "training", "steps_completed": 5, "loss": 9.9}
    (run_dir / "metrics.jsonl").write_text(json.dumps(stale) + "\n")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.stale").write_text("")
    result = run_clm("--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 5, "--logging_steps", 5,
                     "--eval_strategy", "no", "--save_steps", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert stale not in rows and [r["steps_completed"] for r in rows if r["group"] == "training"] == [5]
    assert not (run_dir / "tensorboard" / "events.out.tfevents.stale").exists()


SHORT = ["--config", CONFIG, "--max_steps", 2, "--save_steps", 2, "--eval_strategy", "no", "--logging_steps", 1]


def _run_files(run_dir):
    return {name: (run_dir / name).exists() for name in ("checkpoints", "checkpoints.jsonl", "metrics.jsonl",
                                                          "tensorboard", "flags.json")}


def test_fresh_with_a_mistake_refuses_before_deleting_anything(tiny_model, tmp_path):
    """The reviewed data loss: --fresh deleted the checkpoints and metrics, then the flags were refused."""
    assert run_clm(*SHORT, "--runs_dir", tmp_path).returncode == 0
    run_dir = tmp_path / "local_tiny"
    files, steps, metrics = _run_files(run_dir), registered_steps(run_dir), read_metrics(run_dir / "metrics.jsonl")
    assert all(files.values()) and list(steps.values()) == [2]
    mistakes = {
        ("--lerning_rate", "1e-3"):
            r"error: unknown run_clm\.py flag\(s\): --lerning_rate \(did you mean --learning_rate",
        ("--train_file", "data/missing.jsonl"): r"error: data/missing\.jsonl: data file not found: check the path given to --train_file$",
        ("--model_name_or_path", ".cache/nope"): r"error: --model_name_or_path \.cache/nope: no such directory$",
    }
    for mistake, message in mistakes.items():
        for fresh in ([], ["--fresh"]):
            result = run_clm(*SHORT, "--runs_dir", tmp_path, *mistake, *fresh)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
            assert re.match(message, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
            assert "trained with other flags" not in result.stderr  # the mistake is named, not a change of flags
            assert _run_files(run_dir) == files and registered_steps(run_dir) == steps
            assert read_metrics(run_dir / "metrics.jsonl") == metrics


def test_the_same_flags_spelled_differently_resume(tiny_model, tmp_path):
    assert run_clm(*SHORT, "--runs_dir", tmp_path).returncode == 0
    again = run_clm(*SHORT, "--runs_dir", tmp_path, "--learning-rate", "0.005", "--use_lora", "true",
                    "--evaluation_strategy", "no", "--lora_r=16")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is at step 2, which is --max_steps: nothing left to train" in again.stderr


def test_a_second_ctrl_c_aborts_in_one_line(tiny_model, tmp_path):
    run_dir = tmp_path / "local_tiny"
    with open(tmp_path / "run.log", "w") as log:
        proc = _start(["--config", CONFIG, "--runs_dir", tmp_path, "--max_steps", 300, "--save_steps", 2,
                       "--eval_strategy", "no"], log)
        _wait_for_checkpoint(run_dir, proc)
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while "SIGINT received" not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None and time.time() < deadline, "the first Ctrl-C was not acknowledged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # before the next step boundary, where the first one would save
        assert proc.wait(timeout=120) == 130
    output = (tmp_path / "run.log").read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    saved = max(registered_steps(run_dir).values())
    assert output.strip().splitlines()[-1] == (
        f"aborted: no checkpoint saved after step {saved}; a rerun resumes from there")


CTRL_C_IN_SET_UP = ("import swallow_ft.runtime as runtime\n"
                    "def prepare(argv):\n    raise KeyboardInterrupt\n"
                    "runtime.prepare = prepare\n")
# The first seconds go to run_clm.py's own imports (transformers, DeepSpeed, Determined): the signal arrives there.
CTRL_C_IN_IMPORTS = ("import os, signal, sys\n"
                     "class CtrlC:\n"
                     "    def find_spec(self, name, path=None, target=None):\n"
                     "        if name == 'transformers':\n            os.kill(os.getpid(), signal.SIGINT)\n"
                     "sys.meta_path.insert(0, CtrlC())\n")


@pytest.mark.parametrize("interrupt", [CTRL_C_IN_SET_UP, CTRL_C_IN_IMPORTS], ids=["set-up", "imports"])
def test_a_ctrl_c_before_training_ends_in_one_line(interrupt):
    """Before the run's signal handler exists, a Ctrl-C ends the process wherever it is, in one line."""
    script = interrupt + "import runpy\nrunpy.run_path('run_clm.py', run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", script, "--config", CONFIG], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "aborted before training started"


def test_two_ddp_ranks_train_lora_under_the_torch_distributed_launcher(tiny_model, tmp_path):
    """experiments/swallow_13b.yaml's path in miniature: plain DDP (gloo), two ranks, LoRA. DDP is told that every
    parameter it syncs gets a gradient (the Trainer would have it search the autograd graph each step, and PyTorch
    warns when that search finds nothing); a LoRA parameter left without one would stop the second step instead."""
    text = (REPO / CONFIG).read_text(encoding="utf-8")
    config = tmp_path / "ddp.yaml"
    config.write_text(text.replace("slots_per_trial: 1", "slots_per_trial: 2").replace(
        "\n  python3 run_clm.py", "\n  python3 -m determined.launch.torch_distributed\n  python3 run_clm.py"))
    result = run_clm("--config", config, "--runs_dir", tmp_path, "--max_steps", 20, "--save_steps", 10,
                     "--eval_steps", 10, "--logging_steps", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr and "--nproc_per_node=2" in result.stderr
    assert "find_unused_parameters=True" not in result.stderr
    assert result.stdout.count("Finished at step 20") == 1
    run_dir = tmp_path / "local_tiny"
    training = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["group"] == "training"]
    assert [r["steps_completed"] for r in training] == [5, 10, 15, 20]
    assert training[-1]["loss"] < training[0]["loss"]
    steps = checkpoint_steps(run_dir / "checkpoints")
    assert list(steps.values()) == [20]
    assert (run_dir / "checkpoints" / next(iter(steps)) / "checkpoint-20" / "adapter_model.safetensors").exists()


SUMMARY = {"preempted": True, "steps_completed": 4, "first_eval_loss": 2.0, "last_eval_loss": 1.5,
           "checkpoint": None, "tokens_per_second": None}


def test_the_resume_command_is_what_the_run_was_given_less_fresh(tiny_model, tmp_path, monkeypatch, capsys):
    """run_clm.run(argv) (as tests and the notebook call it) printed sys.argv as the command to resume with."""
    from swallow_ft import runtime

    monkeypatch.setattr(sys, "argv", ["pytest", "-k", "something else"])
    job = runtime.prepare(["--config", CONFIG, "--runs_dir", str(tmp_path), "--fresh", "--max_steps", "4"])
    runtime.print_summary(SUMMARY, job)
    assert (f"  resume      rerun without --fresh: python run_clm.py --config {CONFIG} --runs_dir {tmp_path} "
            "--max_steps 4") in capsys.readouterr().out


def test_the_ranks_are_started_without_fresh_and_the_launch_is_logged_as_such(tmp_path, monkeypatch, caplog):
    import logging

    from swallow_ft import launch, runtime
    from swallow_ft.experiment import Experiment

    started = []

    class Child:
        pid = 0

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", lambda cmd, **kwargs: started.append(cmd) or Child())
    job = runtime.Job(experiment=Experiment.load(REPO / "experiments/local_tiny_ds3.yaml"), run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="swallow_ft"):
        assert launch.relaunch(job, ["--config", "x.yaml", "--fresh", "--seed", "3"], script="run_clm.py") == 0
    assert started[0][-5:] == ["run_clm.py", "--config", "x.yaml", "--seed", "3"]
    assert [(r.name, r.getMessage().split(":")[0]) for r in caplog.records] == [
        ("swallow_ft.launch", "launching 2 processes")]


def test_more_ranks_than_gpus_is_fine_when_asked_to_run_on_the_cpu_in_any_spelling(monkeypatch):
    from swallow_ft import runtime
    from swallow_ft.errors import UserError
    from swallow_ft.experiment import Experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    job = runtime.Job(experiment=Experiment.load(REPO / "experiments/local_tiny_ds3.yaml"))
    with pytest.raises(UserError, match="slots_per_trial is 2 but this machine has 1 GPU"):
        runtime.check_gpus(job, ["--seed", "1"])
    for flags in (["--use_cpu", "true"], ["--use-cpu", "true"], ["--use-cpu=true"]):
        runtime.check_gpus(job, runtime.split_equals(flags))
