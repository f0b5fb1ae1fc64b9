"""The experiment's searcher section against the Trainer's flags: problems a trial would only meet on the master.

Determined 0.38 judges an ASHA trial by the validation metrics it reports, at rungs counted in `time_metric` units,
and stops it once it reports `max_time` of them; if these disagree with --max_steps or --eval_steps the search
silently trains or judges something other than what it schedules. What Determined itself refuses at
`det experiment create` (a missing max_time, an unknown searcher) is swallow_ft/expconf.py's to report.
"""

import difflib
import math
from typing import Any, Dict, List, Optional, Tuple

import determined as det
from transformers import TrainingArguments


def determined_version() -> tuple:
    return tuple(int(p) for p in det.__version__.split(".")[:2] if p.isdigit())


# Searchers that, up to Determined 0.37, lengthen a trial by handing it one operation after another.
LEGACY_MULTI_OPERATION = ("adaptive_asha", "async_halving", "adaptive", "adaptive_simple", "pbt")
ASHA_LIKE = ("adaptive_asha", "async_halving")
# DetCallback.on_log adds these progress counters to every validation report; the 0.38 master reads
# metrics[time_metric] from each one and fails the experiment if it is not there (asha_stopping.go, getMetric).
TIME_METRICS = ("batches", "epochs")
# What one evaluation reports: run_clm.py gives the Trainer no compute_metrics, so evaluate() logs only its loss and
# speed (transformers' Trainer.evaluate / speed_metrics); DetCallback adds the time metrics.
EVAL_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second") + TIME_METRICS


def check_searcher_length(searcher: Dict[str, Any], args: TrainingArguments,
                          version: Optional[tuple] = None) -> Optional[str]:
    """Return why the searcher's training length disagrees with the Trainer's, or None.

    Determined 0.38 ASHA searchers count `max_time` in `time_metric` units (batches or epochs) and
    stop a trial when it reports that much progress; if that differs from --max_steps or
    --num_train_epochs the search silently trains a different budget than the one it schedules.
    version: the Determined version the experiment runs on, (major, minor); default the installed one.
    """
    version = tuple(version or determined_version())
    if args.max_steps > 0:
        unit, length, flag = "batches", args.max_steps, "--max_steps"
    else:
        unit, length, flag = "epochs", args.num_train_epochs, "--num_train_epochs"
    name = searcher.get("name")
    if name in LEGACY_MULTI_OPERATION and version < (0, 38):
        return (f"searcher {name} on Determined {'.'.join(map(str, version))} gives each trial several searcher "
                f"operations, and this callback follows one per trial: use Determined 0.38, or a single, random or "
                f"grid searcher")
    if name in ASHA_LIKE:
        # 0.38 reads max_time/time_metric and ignores max_length; without both it refuses the experiment.
        time_metric, max_time = searcher.get("time_metric"), searcher.get("max_time")
        if time_metric is None or max_time is None:
            return None
        if time_metric not in TIME_METRICS:
            return (f"searcher.time_metric is {time_metric!r}, which the trial never reports"
                    f"{_did_you_mean(str(time_metric), TIME_METRICS)}: the master would fail at the first validation; "
                    f"use time_metric: {unit} and max_time: {length}, matching {flag}")
        if (time_metric, max_time) != (unit, length):
            return (f"searcher.max_time is {max_time} {time_metric} but {flag} gives {unit}={length}; "
                    f"set max_time: {length} and time_metric: {unit}, or change {flag}")
        return None
    max_length = searcher.get("max_length")
    if isinstance(max_length, dict) and max_length:
        search_unit, search_len = next(iter(max_length.items()))
        if (search_unit, search_len) != (unit, length):
            return (f"searcher.max_length is {{{search_unit}: {search_len}}} but {flag} gives {unit}={length}; "
                    f"make them equal (max_length is deprecated on Determined 0.38: prefer max_time/time_metric)")
    elif isinstance(max_length, int):
        return f"searcher.max_length needs a unit: use max_length: {{{unit}: {length}}} (or max_time/time_metric)"
    return None


def reported_metrics(args: TrainingArguments) -> Tuple[str, ...]:
    """The names in every validation report of run_clm.py with these flags."""
    tokens = args.include_num_input_tokens_seen not in ("no", False, None)  # Trainer.log adds it to every log
    return EVAL_METRICS + (("num_input_tokens_seen",) if tokens else ())


def check_searcher_metric(searcher: Dict[str, Any], args: TrainingArguments) -> Optional[str]:
    """Why searcher.metric is not in the validation reports, or None: otherwise the trial loads the model and
    only fails at its first evaluation."""
    metric, reported = searcher.get("metric"), reported_metrics(args)
    if not isinstance(metric, str) or metric in reported:
        return None  # a missing metric is expconf's: the master refuses the experiment
    return (f"searcher.metric is {metric!r}, which evaluation never reports{_did_you_mean(metric, reported)}; "
            f"set it to one of {', '.join(reported)}")


def asha_brackets(searcher: Dict[str, Any]) -> List[Tuple[List[int], int]]:
    """(rungs, max_trials) of each bracket the Determined 0.38 master runs for an ASHA searcher; [] for others.

    As master/pkg/searcher/adaptive_asha.go (makeBrackets, getBracketMaxTrials) and asha_stopping.go (makeRungs)
    compute them: adaptive_asha caps max_rungs at int(log(max_time)/log(divisor)) + 1 and
    int(log(max_trials)/log(divisor)) + 1 (unless bracket_rungs names the brackets), then its mode picks the brackets'
    rung counts: aggressive [n], standard (n-1)//2+1 .. n, conservative 1 .. n. async_halving is one bracket of
    num_rungs, uncapped. A bracket of k rungs judges at max_time / divisor^j, j < k. The caps truncate float logs as
    the master does; at exact powers of a divisor that is no power of 2 the quotient may fall just short (Python's
    log(243)/log(3) is 4.999...), and Go's math.Log need not round as C's log does: avoid such max_trials/max_time.
    """
    name, max_time, max_trials = searcher.get("name"), searcher.get("max_time"), searcher.get("max_trials")
    divisor = searcher.get("divisor") or 4
    valid = _count(max_time) and _count(max_trials) and _number(divisor) and divisor > 1
    if name not in ASHA_LIKE or not searcher.get("time_metric") or not valid:
        return []  # not a search the 0.38 master would start (expconf reports why)
    if name == "async_halving":
        if not _count(searcher.get("num_rungs")):
            return []
        counts, trials = [searcher["num_rungs"]], [max_trials]
    else:
        counts, max_rungs = searcher.get("bracket_rungs") or [], searcher.get("max_rungs") or 5
        if not isinstance(counts, list):
            return []
        counts = list(counts)
        if not counts and _count(max_rungs):
            most = min(max_rungs, int(math.log(max_time) / math.log(divisor)) + 1,
                       int(math.log(max_trials) / math.log(divisor)) + 1)
            low = {"aggressive": most, "standard": (most - 1) // 2 + 1, "conservative": 1}.get(
                searcher.get("mode") or "standard", most + 1)
            counts = list(range(low, most + 1))
        if not counts or not all(_count(k) for k in counts):
            return []
        counts.sort(reverse=True)  # the master starts the brackets that stop the most trials first
        weights, total = [divisor ** (k - 1) / k for k in counts], 0.0  # about equal step budgets per bracket
        for weight in weights:  # summed in order, as Go does: int() below truncates the last bit's difference
            total += weight
        trials = [max(int(weight / total * max_trials), 1) for weight in weights]
        trials[0] += max(max_trials - sum(trials), 0)
    return [([max(int(max_time / divisor ** j), 1) for j in reversed(range(k))], n) for k, n in zip(counts, trials)]


def asha_rungs(searcher: Dict[str, Any]) -> List[int]:
    """Where a Determined 0.38 ASHA searcher judges trials, in its time_metric: every bracket's rungs (asha_brackets).

    For max_time 400, divisor 4, max_rungs 5 and max_trials 12 that is [100, 400], not five rungs: 12 trials cap the
    brackets at 2 rungs ([100, 400] and [400])."""
    return sorted({rung for rungs, _ in asha_brackets(searcher) for rung in rungs})


def unevaluated_rungs(searcher: Dict[str, Any], args: TrainingArguments) -> List[int]:
    """The ASHA rungs (in batches) at which no evaluation happens: the searcher judges them by a later one."""
    if searcher.get("time_metric") != "batches" or args.eval_strategy != "steps":
        return []
    every = args.eval_steps if args.eval_steps >= 1 else max(1, round(args.eval_steps * args.max_steps))
    return [rung for rung in asha_rungs(searcher) if rung % every and rung < args.max_steps]


def searcher_problems(searcher: Dict[str, Any], args: TrainingArguments,
                      version: Optional[tuple] = None) -> List[str]:
    """Every problem of `searcher` (an experiment's searcher section) with these flags; [] when none.
    version: the Determined version the experiment will run on, (major, minor); default the installed one."""
    if not searcher:
        return []
    problems = (check_searcher_length(searcher, args, version), check_searcher_metric(searcher, args))
    return [problem for problem in problems if problem]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
