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


BASE = ["--model_name_or_path", "m", "--train_file", "data/camel_math_ja.jsonl", "--output_dir", "o", "--use_cpu",
        "true", "--max_steps", "3", "--learning_rate", "5e-3", "--use_lora", "--eval_strategy", "steps"]


def _changed(tmp_path, recorded_flags, flags):
    from swallow_ft.arguments import parse_input_arguments
    from swallow_ft.run_record import changed_flags, record_flags

    path = tmp_path / "flags.json"
    if isinstance(recorded_flags, list):
        record_flags(path, recorded_flags, parse_input_arguments({}, recorded_flags))
    else:
        path.write_text(recorded_flags)
    return changed_flags(path, flags, parse_input_arguments({}, flags))


@pytest.mark.parametrize("spelling", [
    ["--learning_rate", "0.005"],
    ["--learning-rate", "5e-3"],  # argparse's dash alias
    ["--learning_rate=5E-3"],
    ["--use_lora", "true"],
    ["--evaluation_strategy", "steps"],  # the transformers 4 name
    ["--lora_r", "16"],  # the default, now spelled out
    ["--max_steps", "30", "--eval_strategy", "no"],  # RESUMABLE_FLAGS
])
def test_the_same_run_spelled_differently_resumes(tmp_path, spelling):
    assert _changed(tmp_path, BASE, BASE + spelling) == []


@pytest.mark.parametrize("spelling, change", [
    (["--learning_rate", "1e-3"], "--learning_rate 0.005 -> 0.001"),
    (["--use_lora", "false"], "--use_lora true -> false"),
    (["--lora_r", "8"], "--lora_r 16 -> 8"),
    (["--system_prompt", "x"], "--system_prompt (unset) -> x"),
])
def test_a_different_run_is_named_by_its_parsed_values(tmp_path, spelling, change):
    assert _changed(tmp_path, BASE, BASE + spelling) == [change]


def test_a_flags_json_from_before_parsed_values_is_still_read(tmp_path):
    """It held each flag's text ({--flag: value}, a bare switch "")."""
    old = json.dumps({"--model_name_or_path": "m", "--train_file": "data/camel_math_ja.jsonl", "--output_dir": "o",
                      "--use_cpu": "true", "--max_steps": "3", "--learning_rate": "5e-3", "--use_lora": ""})
    assert _changed(tmp_path, old, BASE + ["--learning_rate", "0.005"]) == []
    assert _changed(tmp_path, old, BASE + ["--learning_rate", "1e-3"]) == ["--learning_rate 0.005 -> 0.001"]


@pytest.mark.parametrize("record", ["not json", "[]", json.dumps({"--no_such_flag": "1"})])
def test_an_unreadable_flags_json_does_not_block(tmp_path, record):
    assert _changed(tmp_path, record, BASE + ["--learning_rate", "1e-3"]) == []


def test_the_abort_line_names_the_step_a_rerun_resumes_from(tmp_path):
    from swallow_ft.local_core import abort_message

    assert abort_message(tmp_path / "checkpoints.jsonl") == "aborted: no checkpoint saved; a rerun starts from step 0"
    (tmp_path / "checkpoints.jsonl").write_text(
        "".join(json.dumps({"storage_id": s, "steps_completed": n, "searcher_metric": None}) + "\n"
                for s, n in (("a", 20), ("b", 40))))
    assert abort_message(tmp_path / "checkpoints.jsonl") == (
        "aborted: no checkpoint saved after step 40; a rerun resumes from there")


@pytest.mark.parametrize("scheduler, warned", [("cosine", True), ("constant", False)])
def test_a_resume_with_another_length_warns_that_the_schedule_changes(tmp_path, caplog, scheduler, warned):
    from swallow_ft.arguments import parse_input_arguments
    from swallow_ft.local_core import write_jsonl
    from swallow_ft.run_record import check_same_run, record_flags

    first = BASE + ["--max_steps", "300", "--lr_scheduler_type", scheduler]
    record_flags(tmp_path / "flags.json", first, parse_input_arguments({}, first))
    write_jsonl(tmp_path / "checkpoints.jsonl", [{"storage_id": "x", "steps_completed": 300}])
    longer = BASE + ["--max_steps", "340", "--lr_scheduler_type", scheduler]
    for _ in range(2):  # the second resume with 340 steps is not warned again
        check_same_run(tmp_path, tmp_path / "checkpoints.jsonl", longer, parse_input_arguments({}, longer))
    expected = [f"resuming with --max_steps 300 -> 340: the {scheduler} learning-rate schedule is recomputed for the "
                "new length, so the rate changes at the resumed step"] if warned else []
    assert [r.getMessage() for r in caplog.records if r.name == "swallow_ft.run_record"] == expected
