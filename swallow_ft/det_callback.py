"""DetCallback: connects the Hugging Face Trainer to a Determined Core API context.

Written for this package rather than subclassing `determined.transformers.DetCallback`, which refuses
to run off-cluster, crashes with ASHA searchers (`required_metrics` is never set) and on resume with
transformers 5 (`overwrite_output_dir` is gone), strips every speed metric, and only notices
preemption at logging steps. This one works with the cluster's contexts and with the local ones that
`swallow_ft.runtime` builds, so the same code path is exercised on a laptop and in the tests.
"""

import contextlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import determined as det
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from swallow_ft import checkpoints, searcher
from swallow_ft.errors import UserError
from swallow_ft.flops import flops_per_token, peak_flops

logger = logging.getLogger(__name__)


def training_complete(args: TrainingArguments, state: TrainerState) -> bool:
    if args.max_steps > 0:
        return state.global_step >= args.max_steps
    return (state.epoch or 0.0) >= args.num_train_epochs


class StepClock:
    """Seconds spent in optimizer steps, measured without making the host wait for the device.

    The host runs ahead of a GPU (SwallowTrainer reads nothing back inside a step), so its own clock says when steps
    were queued, not how long they took. On CUDA each step is bracketed by events on the stream and the events are
    read when the time is asked for, at a logging step, where the Trainer synchronises anyway. On a CPU host time is
    device time.
    """

    def __init__(self) -> None:
        self.cuda = False
        self.total = 0.0
        self._started: Any = None
        self._unread: List[tuple] = []  # (start, end) events not yet read
        self._since_read = 0.0

    def start(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is None:
            return
        if self.cuda:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._unread.append((self._started, ended))
        else:
            self._since_read += time.perf_counter() - self._started
        self._started = None

    def read(self) -> float:
        """Step seconds since the last read."""
        if self._unread:
            self._unread[-1][1].synchronize()
            self._since_read += sum(start.elapsed_time(end) for start, end in self._unread) / 1e3
            self._unread.clear()
        seconds, self._since_read = self._since_read, 0.0
        self.total += seconds
        return seconds


class DetCallback(TrainerCallback):
    """Report metrics and progress, upload checkpoints, restore, and honour preemption.

    Args:
        core_context: from `det.core.init()` (cluster) or `swallow_ft.runtime` (local).
        args: the TrainingArguments given to the Trainer.
        user_data: small JSON-able dict stored in every checkpoint as `user_data.json`.
        latest_checkpoint: storage id to resume from; defaults to the cluster's latest checkpoint.
        searcher_config: the experiment's `searcher` section; defaults to the cluster's.
        strict_searcher: raise (cluster) rather than warn (local) on a searcher/length mismatch.
    """

    def __init__(self, core_context: det.core.Context, args: TrainingArguments,
                 user_data: Optional[Dict[str, Any]] = None, latest_checkpoint: Optional[str] = None,
                 searcher_config: Optional[Dict[str, Any]] = None, strict_searcher: bool = True) -> None:
        super().__init__()
        self.core_context = core_context
        self.user_data = user_data
        info = det.get_cluster_info()
        self.trial_id = info.trial.trial_id if info and info.task_type == "TRIAL" else None
        if latest_checkpoint is None and self.trial_id is not None:
            latest_checkpoint = info.latest_checkpoint
        if searcher_config is None and self.trial_id is not None:
            searcher_config = info.trial._config.get("searcher")
        self.searcher_config = searcher_config or {}
        self.searcher_metric = self.searcher_config.get("metric")
        self._check_searcher(args, strict_searcher)

        if self.trial_id is not None:
            checkpoints.clear_earlier_attempts(core_context, args.output_dir)
        start = (checkpoints.download_starting_point(core_context, latest_checkpoint, args.output_dir, self.trial_id)
                 if latest_checkpoint else None)
        # The Trainer resumes this trial's own checkpoint; another trial's gives only its adapter (run_clm.main).
        self.resume_from_checkpoint = start.path if start and not start.warm_start else None
        self.warm_start = start if start and start.warm_start else None
        if start:
            logger.info("%s checkpoint %s (%s)", "warm-starting from" if start.warm_start else "resuming from",
                        latest_checkpoint, start.path)
        # Determined <= 0.37 tracks trial progress through searcher operations, and DSAT's
        # dsat_reporting_context needs the current one; 0.38 replaced them with report_progress.
        self.current_op = None
        if searcher.determined_version() < (0, 38) and core_context.searcher is not None:
            self.current_op = next(iter(core_context.searcher.operations()))

        self.last_train_report = self.last_eval_report = self.last_save = -1
        self.last_progress = 0.0
        self.preempted = False
        self.searcher_value: Optional[float] = None  # the last validation's searcher.metric, for Determined <= 0.37
        self.last_storage_id = latest_checkpoint if self.resume_from_checkpoint else None  # until a new one
        # Facts about the run added to every training report (e.g. packing_efficiency).
        self.constant_metrics: Dict[str, float] = {}
        self._tokens_at_last_log = self._tokens_at_start = None
        self._flops_per_token_over_peak: Optional[float] = None
        self.clock = StepClock()

    # ----- start-up -------------------------------------------------------------------------------
    def _check_searcher(self, args: TrainingArguments, strict: bool) -> None:
        problems = searcher.searcher_problems(self.searcher_config, args)
        if problems and strict:
            raise UserError("; ".join(problems))
        for problem in problems:
            logger.warning("%s (ignored locally: the searcher only runs on a cluster)", problem)
        missed = searcher.unevaluated_rungs(self.searcher_config, args)
        if missed:
            logger.warning("searcher %s judges trials at %s batches, where --eval_steps %s evaluates nothing: set "
                           "--eval_steps to a divisor of the rungs, or max_rungs/divisor/max_trials to rungs it "
                           "evaluates at",
                           self.searcher_config["name"], missed, args.eval_steps)

    # ----- per step -------------------------------------------------------------------------------
    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._tokens_at_start = self._tokens_at_last_log = state.num_input_tokens_seen
        peak = peak_flops()
        if model is not None and peak:
            self._flops_per_token_over_peak = flops_per_token(model) / peak

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.start(args.device)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.clock.stop()
        if state.is_world_process_zero:
            self._report_progress(args, state)
        # Every rank asks every step (the chief answers for all), so a preempted trial stops at the
        # next step boundary with a checkpoint instead of waiting for a logging step.
        if self._preemption_accepted(args, state):
            control.should_evaluate = False  # it evaluates when it finishes, after its restart
            control.should_save = True
            control.should_training_stop = True

    def _preemption_accepted(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Whether the master asked this trial to stop and it will; a collective, every rank calls it."""
        if self.preempted or not self.core_context.preempt.should_preempt(auto_ack=False):
            return False
        if training_complete(args, state):
            # Acknowledging asks the master to restart the trial later; exiting without it completes the trial.
            # A restart would load the whole model to train nothing.
            logger.info("preemption requested at the last step: finishing the trial instead")
            return False
        if self.core_context.distributed.rank == 0:
            self.core_context.preempt.acknowledge_preemption_signal()
        self.preempted = True
        return True

    def _report_progress(self, args: TrainingArguments, state: TrainerState) -> None:
        if args.max_steps > 0:
            progress = state.global_step / args.max_steps
        else:
            progress = (state.epoch or 0.0) / args.num_train_epochs
        # At most one report per percent: the master rate-limits progress updates.
        if progress - self.last_progress < 0.01 and progress < 1.0:
            return
        self.last_progress = progress
        if self.current_op is not None:
            self.current_op.report_progress(state.global_step if args.max_steps > 0 else state.epoch)
        else:
            self.core_context.train.report_progress(min(progress, 1.0))

    # ----- metrics --------------------------------------------------------------------------------
    def on_log(self, args, state: TrainerState, control, logs: Optional[Dict[str, Any]] = None, **kwargs):
        if not logs:
            return
        metrics = {k: v for k, v in logs.items() if k != "epoch" and isinstance(v, (int, float))}
        metrics["batches"] = state.global_step
        metrics["epochs"] = state.epoch
        if any(k.startswith("eval_") for k in logs):
            self._report_validation(state, metrics)
        elif not any(k.startswith("test_") for k in logs):
            self._report_training(args, state, {**self.constant_metrics, **metrics})

    def _report_training(self, args, state: TrainerState, metrics: Dict[str, Any]) -> None:
        tokens, seconds = state.num_input_tokens_seen, self.clock.read()
        if self._tokens_at_last_log is not None and seconds > 0:
            per_second = (tokens - self._tokens_at_last_log) / seconds
            metrics["tokens_per_second"] = per_second
            metrics["tokens_per_second_per_gpu"] = per_second / max(1, args.world_size)
            if self._flops_per_token_over_peak:  # model FLOPs utilisation, an estimate: see flops_per_token
                metrics["mfu"] = metrics["tokens_per_second_per_gpu"] * self._flops_per_token_over_peak
        self._tokens_at_last_log = tokens
        # The Trainer logs a run summary at the same step as the last in-loop log; the master
        # keeps one training row per step, so that second report is dropped (as upstream does).
        if state.global_step == self.last_train_report:
            return
        self.last_train_report = state.global_step
        if state.is_world_process_zero:
            self.core_context.train.report_metrics(group="training", steps_completed=state.global_step,
                                                   metrics=metrics)

    def _report_validation(self, state: TrainerState, metrics: Dict[str, Any]) -> None:
        if state.global_step == self.last_eval_report:
            return
        self.last_eval_report = state.global_step
        if self.searcher_metric and self.searcher_metric not in metrics:
            raise UserError(f"searcher.metric is {self.searcher_metric!r} but evaluation reports only "
                            f"{sorted(k for k in metrics if k.startswith('eval_'))}: change searcher.metric")
        self.searcher_value = metrics.get(self.searcher_metric or "eval_loss", self.searcher_value)
        if state.is_world_process_zero:
            self.core_context.train.report_metrics(group="validation", steps_completed=state.global_step,
                                                   metrics=metrics)

    # ----- checkpoints ----------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control, **kwargs):
        self.last_save = state.global_step
        folder = f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and self.user_data is not None:
            with open(os.path.join(args.output_dir, folder, "user_data.json"), "w") as f:
                json.dump(self.user_data, f)
        metadata = {"steps_completed": state.global_step}
        if self.trial_id is not None:
            metadata["trial_id"] = self.trial_id
        self.last_storage_id = checkpoints.upload_checkpoint(self.core_context, args.output_dir, folder, metadata)
        if self.core_context.distributed.local_rank == 0 and not state.is_world_process_zero:
            # The Trainer deletes old checkpoint folders on process 0 only; every other node keeps its ranks'
            # ZeRO shards of each one until its disk fills. They are in checkpoint storage now.
            rotate_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint, use_mtime=True)
        # A preemption that came during this step's evaluation or save stops the trial on this checkpoint, not after
        # another step and another checkpoint.
        if self._preemption_accepted(args, state):
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not (training_complete(args, state) or control.should_training_stop):
            return
        # The last chance to evaluate and checkpoint: Determined needs both at the end of a trial. A preempted
        # trial only checkpoints: it evaluates when it finishes, after its restart.
        if self.preempted:
            control.should_evaluate = False  # the Trainer's flow asks for one at the end of an epoch
        elif state.global_step > self.last_eval_report and args.eval_strategy != "no":
            control.should_evaluate = True
        if state.global_step > self.last_save:
            control.should_save = True

    def on_train_end(self, args, state: TrainerState, control, **kwargs):
        if self.current_op is not None and not self.preempted and state.is_world_process_zero:
            if self.searcher_value is not None:
                self.current_op.report_completed(self.searcher_value)

    def dsat_reporting(self):
        """Wrap trainer.train() in this: DSAT (Determined <= 0.37) collects each trial's result here."""
        try:
            from determined.pytorch import dsat
        except ImportError:  # Determined 0.38 removed DSAT
            return contextlib.nullcontext()
        if self.current_op is None:
            return contextlib.nullcontext()
        return dsat.dsat_reporting_context(self.core_context, op=self.current_op)

    # ----- for people ---------------------------------------------------------------------------
    def summary(self, state: TrainerState) -> Dict[str, Any]:
        tokens = state.num_input_tokens_seen - (self._tokens_at_start or 0)
        self.clock.read()
        # The whole run's: the log holds every evaluation (the Trainer logs each before on_log reports it), and a
        # resumed run restored the earlier ones with its checkpoint.
        eval_losses = [log["eval_loss"] for log in state.log_history if "eval_loss" in log]
        return {
            "steps_completed": state.global_step,
            "preempted": self.preempted,
            "first_eval_loss": eval_losses[0] if eval_losses else None,
            "last_eval_loss": eval_losses[-1] if eval_losses else None,
            "checkpoint": self.last_storage_id,
            "tokens_per_second": tokens / self.clock.total if self.clock.total else None,
        }
