"""The on-cluster branch, run in-process with a faked ClusterInfo over the real Core API local contexts.

No Determined master runs here. `det._info._info` is set to a ClusterInfo the way the upstream harness
tests do, and `det.core.init` is pointed at Determined's own off-cluster context builder (real
shared-fs checkpoint storage, real searcher/preempt contexts), with our metrics file standing in
for the master's metric store.
"""

import json
import logging
from pathlib import Path

import determined as det
import pytest
from conftest import REPO, checkpoint_steps, read_metrics
from determined import core
from transformers import TrainerControl, TrainerState

import run_clm
from swallow_ft import checkpoints, det_callback, runtime
from swallow_ft import searcher as searcher_checks
from swallow_ft.errors import UserError
from swallow_ft.local_core import LocalTrainContext


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    """Returns fake(hparams, searcher, latest_checkpoint) which makes this process 'on-cluster'."""
    storage = tmp_path / "storage"

    def init(distributed=None, **_):
        context = core._dummy_init(distributed=distributed, checkpoint_storage=str(storage))
        context.train = LocalTrainContext(tmp_path / "reported.jsonl", tmp_path / "tb")
        return context

    monkeypatch.setattr(det.core, "init", init)

    def fake(hparams, searcher, latest_checkpoint=None, trial_id=7):
        trial = det.TrialInfo(trial_id=trial_id, experiment_id=3, trial_seed=0, hparams=hparams,
                              config={"searcher": searcher, "hyperparameters": hparams},
                              steps_completed=0, trial_run_id=1, debug=False, inter_node_network_interface=None)
        det._info._info = det.ClusterInfo(
            master_url="http://master.invalid:8080", cluster_id="c", agent_id="agent", slot_ids=[0],
            task_id="3.7", allocation_id="3.7.1", session_token="t", task_type="TRIAL",
            latest_checkpoint=latest_checkpoint, trial_info=trial)
        return storage

    yield fake
    det._info._info = None


def entrypoint(tiny_model, tmp_path, max_steps=10):
    return ["--model_name_or_path", str(tiny_model), "--train_file", str(REPO / "data/camel_math_ja.jsonl"),
            "--use_lora", "--do_train", "--do_eval", "--max_steps", str(max_steps), "--eval_strategy", "steps",
            "--eval_steps", "10", "--save_steps", "10", "--logging_steps", "5", "--per_device_train_batch_size", "8",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--seed", "1"]


SINGLE = {"name": "single", "metric": "eval_loss", "max_length": {"batches": 10}}


def test_cluster_hparams_become_flags(cluster, tiny_model, tmp_path):
    cluster({"training_arguments": {"learning_rate": 0.002, "lora_r": 4}}, SINGLE)
    job = runtime.prepare(entrypoint(tiny_model, tmp_path) + ["--evaluation_strategy", "steps"])
    assert job.cluster_info is not None and not job.is_local
    assert job.training_args.learning_rate == 0.002
    assert job.model_args.lora_r == 4
    assert job.training_args.eval_strategy == "steps"
    assert job.training_args.output_dir == str(tmp_path / "out" / "trial-7")  # trials may share a node's /tmp


def test_cluster_trial_trains_then_restores_latest_checkpoint(cluster, tiny_model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="swallow_ft")
    storage = cluster({"training_arguments": {"learning_rate": 0.003}}, SINGLE)
    assert run_clm.run(entrypoint(tiny_model, tmp_path)) == 0
    (first_id, first_step), = checkpoint_steps(storage).items()
    assert first_step == 10
    metadata = json.loads((storage / first_id / "metadata.json").read_text())
    assert metadata["trial_id"] == 7

    # The master restarts the trial (e.g. after preemption) with a longer budget and the latest
    # checkpoint: training must continue from step 10, in a fresh container's output_dir.
    searcher = {"name": "single", "metric": "eval_loss", "max_length": {"batches": 20}}
    cluster({"training_arguments": {"learning_rate": 0.003}}, searcher, latest_checkpoint=first_id)
    assert run_clm.run(entrypoint(tiny_model, tmp_path / "second", max_steps=20)) == 0
    assert f"resuming from checkpoint {first_id}" in caplog.text
    assert sorted(checkpoint_steps(storage).values()) == [10, 20]
    reported = read_metrics(tmp_path / "reported.jsonl")
    second_run = [r["steps_completed"] for r in reported if r["group"] == "training"][2:]
    assert second_run == [15, 20]  # nothing before the restored step was trained again


@pytest.mark.parametrize("searcher, problem", [
    ({"name": "adaptive_asha", "metric": "eval_loss", "time_metric": "batches", "max_time": 10, "max_trials": 4},
     None),
    ({"name": "adaptive_asha", "metric": "eval_loss", "time_metric": "batches", "max_time": 100, "max_trials": 4},
     "searcher.max_time is 100 batches but --max_steps gives batches=10"),
    ({"name": "adaptive_asha", "metric": "eval_loss", "time_metric": "batch", "max_time": 10, "max_trials": 4},
     "searcher.time_metric is 'batch', which the trial never reports"),
    ({"name": "single", "metric": "eval_los", "max_length": {"batches": 10}},
     "searcher.metric is 'eval_los', which evaluation never reports"),
    ({"name": "single", "metric": "eval_loss", "max_length": {"batches": 50}},
     "searcher.max_length is {batches: 50} but --max_steps gives batches=10"),
])
def test_cluster_searcher_length_checks(cluster, tiny_model, tmp_path, searcher, problem):
    cluster({}, searcher)
    job = runtime.prepare(entrypoint(tiny_model, tmp_path))
    with runtime.core_context(job) as context:
        if problem is None:  # upstream crashes here with AttributeError: required_metrics
            callback = det_callback.DetCallback(context, job.training_args)
            assert callback.searcher_metric == "eval_loss"
        else:
            with pytest.raises(UserError, match=problem.replace("{", r"\{").replace("}", r"\}")):
                det_callback.DetCallback(context, job.training_args)


@pytest.mark.parametrize("metric", ["eval_loss", "eval_samples_per_second"])
def test_legacy_determined_drives_searcher_operations(cluster, tiny_model, tmp_path, monkeypatch, caplog, metric):
    """Determined <= 0.37: progress and the final searcher.metric go through the searcher operation."""
    monkeypatch.setattr(searcher_checks, "determined_version", lambda: (0, 37))
    caplog.set_level(logging.INFO, logger="determined.core")
    cluster({}, {**SINGLE, "metric": metric})
    assert run_clm.run(entrypoint(tiny_model, tmp_path)) == 0
    assert "progress report: 10/1" in caplog.text
    last = [r for r in read_metrics(tmp_path / "reported.jsonl") if r["group"] == "validation"][-1]
    assert f"SearcherOperation Complete: searcher_metric={last[metric]}\n" in caplog.text


def test_legacy_determined_refuses_searchers_of_several_operations(cluster, tiny_model, tmp_path, monkeypatch):
    """ASHA on Determined <= 0.37 hands a trial its rungs as successive operations; one trial follows one."""
    monkeypatch.setattr(searcher_checks, "determined_version", lambda: (0, 37))
    cluster({}, {"name": "adaptive_asha", "metric": "eval_loss", "max_length": {"batches": 10}, "max_trials": 4})
    job = runtime.prepare(entrypoint(tiny_model, tmp_path))
    with runtime.core_context(job) as context:
        with pytest.raises(UserError, match="searcher adaptive_asha on Determined .* use Determined 0.38, or a single"):
            det_callback.DetCallback(context, job.training_args)


class MasterSaysPreempt(core.DummyPreemptContext):
    """The master's preemption signal, as the chief's PreemptContext reports it; counts acknowledgements."""

    acks = 0

    def should_preempt(self, auto_ack=True):
        if auto_ack:
            self.acknowledge_preemption_signal()
        return True

    def acknowledge_preemption_signal(self):
        self.acks += 1


@pytest.mark.parametrize("step, stops", [(5, True), (10, False)])
def test_a_preemption_is_acknowledged_unless_it_comes_at_the_last_step(cluster, tiny_model, tmp_path, step, stops):
    """An acknowledged trial is restarted: at the last step that would load the model again to train nothing, so
    the trial finishes instead (evaluates, saves, exits unacknowledged: complete)."""
    cluster({}, SINGLE)
    job = runtime.prepare(entrypoint(tiny_model, tmp_path, max_steps=10))
    with runtime.core_context(job) as context:
        context.preempt = MasterSaysPreempt(context.distributed).start()
        callback = det_callback.DetCallback(context, job.training_args)
        control, state = TrainerControl(), TrainerState(global_step=step, epoch=0.5)
        callback.on_step_end(job.training_args, state, control)
        assert (context.preempt.acks, callback.preempted, control.should_training_stop) == (stops, stops, stops)
        assert control.should_save is stops
        callback.on_epoch_end(job.training_args, state, control)
        assert control.should_evaluate is not stops and control.should_save


def test_cluster_refuses_non_trial_tasks(cluster):
    cluster({}, SINGLE)
    det._info._info.task_type = "NOTEBOOK"
    with pytest.raises(UserError, match="runs as a Determined trial"):
        runtime.prepare([])


def test_searcher_metric_must_be_reported(cluster, tiny_model, tmp_path):
    cluster({}, {"name": "single", "metric": "eval_accuracy", "max_length": {"batches": 10}})
    with pytest.raises(UserError, match="searcher.metric is 'eval_accuracy'"):
        run_clm.run(entrypoint(tiny_model, tmp_path))


def test_det_callback_is_ours_not_upstreams():
    from determined.transformers import DetCallback as Upstream

    import hf_callback

    assert not issubclass(hf_callback.DetCallback, Upstream)
    assert Path(hf_callback.__file__).parent == REPO


def test_the_shipped_search_evaluates_at_every_asha_rung(caplog):
    """0.38 ASHA judges a trial at max_time / divisor^k batches, by the latest validation at or after the rung."""
    from swallow_ft.arguments import parse_input_arguments
    from swallow_ft.experiment import Experiment

    experiment = Experiment.load(REPO / "experiments/swallow_7b_search.yaml")
    _, _, args = parse_input_arguments({}, experiment.script_args() + ["--use_cpu", "true"])
    assert searcher_checks.asha_rungs(experiment.searcher) == [25, 100, 400]
    assert searcher_checks.unevaluated_rungs(experiment.searcher, args) == []

    # Without max_rungs, and with enough trials that the master does not cap the rungs at log(max_trials)/log(4)+1.
    five_rungs = {**{key: value for key, value in experiment.searcher.items() if key != "max_rungs"},
                  "max_trials": 256}
    assert searcher_checks.asha_rungs(five_rungs) == [1, 6, 25, 100, 400]
    args.eval_steps = 50
    assert searcher_checks.unevaluated_rungs(five_rungs, args) == [1, 6, 25]
    with caplog.at_level(logging.WARNING, logger="swallow_ft.det_callback"):
        det_callback.DetCallback(core._dummy_init(), args, searcher_config=five_rungs, strict_searcher=False)
    assert "judges trials at [1, 6, 25] batches, where --eval_steps 50 evaluates nothing" in caplog.text


def adapter_of(storage, storage_id):
    from safetensors.torch import load_file

    return load_file(next((storage / storage_id).glob("checkpoint-*/adapter_model.safetensors")))


def test_another_trials_checkpoint_warm_starts_the_adapter(cluster, tiny_model, tmp_path, caplog):
    """searcher.source_trial_id: Determined hands trial 8 trial 7's checkpoint. Trial 8 starts from its adapter, at
    step 0 with its own hyperparameters (not trial 7's optimizer, schedule and step, which would end it at once)."""
    caplog.set_level(logging.INFO, logger="swallow_ft")
    storage = cluster({"training_arguments": {"learning_rate": 0.003}}, SINGLE)
    assert run_clm.run(entrypoint(tiny_model, tmp_path)) == 0
    (source_id, _), = checkpoint_steps(storage).items()

    cluster({"training_arguments": {"learning_rate": 0.0}}, SINGLE, latest_checkpoint=source_id, trial_id=8)
    assert run_clm.run(entrypoint(tiny_model, tmp_path)) == 0
    assert f"warm-starting from checkpoint {source_id}" in caplog.text
    (warm_id, steps), = {k: v for k, v in checkpoint_steps(storage).items() if k != source_id}.items()
    assert steps == 10 and json.loads((storage / warm_id / "metadata.json").read_text())["trial_id"] == 8
    second = [r for r in read_metrics(tmp_path / "reported.jsonl") if r["group"] == "training"][2:]
    assert [r["steps_completed"] for r in second] == [5, 10] and {r["learning_rate"] for r in second} == {0.0}
    source, warm = adapter_of(storage, source_id), adapter_of(storage, warm_id)
    assert source.keys() == warm.keys() and all((source[k] == warm[k]).all() for k in source)  # lr 0: unchanged


@pytest.mark.parametrize("flags, problem", [
    (["--lora_r", "4"],
     "has LoRA rank 16 and this trial --lora_r 4: warm-starting needs the same rank; set --lora_r 16"),
    (["--use_lora", "false"], "this project warm-starts LoRA runs from a LoRA checkpoint only"),
])
def test_a_warm_start_that_cannot_fit_stops_before_the_model_loads(cluster, tiny_model, tmp_path, monkeypatch,
                                                                     flags, problem):
    storage = cluster({}, SINGLE)
    assert run_clm.run(entrypoint(tiny_model, tmp_path)) == 0
    (source_id, _), = checkpoint_steps(storage).items()
    cluster({}, SINGLE, latest_checkpoint=source_id, trial_id=8)
    monkeypatch.setattr(run_clm, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match=problem):
        run_clm.run(entrypoint(tiny_model, tmp_path) + flags)


def test_a_restart_clears_what_an_earlier_attempt_left_on_the_node(cluster, tiny_model, tmp_path):
    """Where /tmp outlives the container, a crashed attempt's checkpoint-N folder would be offered again beside the
    restarted trial's own shards of step N, and Determined refuses an upload with two versions of a file."""
    cluster({}, SINGLE)
    job = runtime.prepare(entrypoint(tiny_model, tmp_path))
    leftovers = [Path(job.training_args.output_dir, name, "zero_pp_rank_1.pt")
                 for name in ("checkpoint-10/global_step10", "restored/0a1b")]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True)
        leftover.write_bytes(b"from the crashed attempt")
    kept = Path(job.training_args.output_dir, "notes.txt")
    kept.write_text("not ours")
    with runtime.core_context(job) as context:
        det_callback.DetCallback(context, job.training_args)
    assert not any(leftover.parent.parent.exists() for leftover in leftovers) and kept.exists()


def test_zero_shards_resume_only_on_as_many_ranks(tmp_path):
    shards = tmp_path / "checkpoint-10" / "global_step10"
    shards.mkdir(parents=True)
    for rank in range(4):
        (shards / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    checkpoints.check_same_world_size(str(tmp_path / "checkpoint-10"), "abc", 4)
    with pytest.raises(UserError, match="holds DeepSpeed ZeRO optimizer shards of 4 ranks and this trial runs 8: set "
                                        "resources.slots_per_trial: 4"):
        checkpoints.check_same_world_size(str(tmp_path / "checkpoint-10"), "abc", 8)


def test_a_preemption_during_an_evaluation_or_save_stops_on_that_checkpoint(cluster, tiny_model, tmp_path):
    """Noticed in on_save, it stops the trial there: no further step, no second checkpoint, no evaluation."""
    cluster({}, {**SINGLE, "max_length": {"batches": 20}})
    job = runtime.prepare(entrypoint(tiny_model, tmp_path, max_steps=20))
    args = job.training_args
    Path(args.output_dir, "checkpoint-10").mkdir(parents=True)
    Path(args.output_dir, "checkpoint-10", "adapter_model.safetensors").write_bytes(b"weights")
    with runtime.core_context(job) as context:
        context.preempt = MasterSaysPreempt(context.distributed).start()
        callback = det_callback.DetCallback(context, args)
        control, state = TrainerControl(), TrainerState(global_step=10, epoch=0.5)
        callback.on_save(args, state, control)
        assert (context.preempt.acks, callback.preempted, control.should_training_stop) == (1, True, True)
        control.should_evaluate = True  # the Trainer's flow at the end of an epoch
        callback.on_epoch_end(args, state, control)
        assert not control.should_evaluate and not control.should_save
        callback.on_save(args, state, TrainerControl())  # asks once
        assert context.preempt.acks == 1
