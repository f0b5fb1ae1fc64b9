"""Check an experiment offline, in seconds, before a GPU is spent.

    python -m swallow_ft.preflight EXPERIMENT.yaml [MORE.yaml ...] [--gpu-mem 80] [--determined-version 0.37] [--dsat]

Exits 0 and prints a per-GPU memory estimate when an experiment is fine; otherwise exits 1 with one
line per problem, each naming the file, the key and the fix. run_clm.py runs the argument, DeepSpeed,
model and memory checks again at start-up, before any weights load.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from swallow_ft import REPO_ROOT, expconf
from swallow_ft.arguments import (RENAMED_FLAGS, flag_fields, flag_value, is_chief_process, parse_input_arguments,
                                  split_equals, underscored, without_deepspeed)
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment
from swallow_ft.gpus import gpu_gib, gpu_memory_for_pool
from swallow_ft.searcher import determined_version, searcher_problems

logger = logging.getLogger(__name__)

LAUNCHERS = ("determined.launch.deepspeed", "determined.launch.torch_distributed", "determined.launch.horovod")
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# DSAT is launched from the CLI (python -m determined.pytorch.dsat asha EXPERIMENT.yaml .) with an ordinary experiment
# file: a DSAT experiment says so by this label, which the Web UI shows too.
DSAT_LABEL = "dsat"


@dataclass
class Findings:
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def find_file(name: str, experiment_dir: Path) -> Optional[Path]:
    """Entrypoint paths are relative to the context directory, usually the repo root."""
    for base in (experiment_dir, Path.cwd(), REPO_ROOT):
        if (base / name).is_file():
            return base / name
    return None


def check_entrypoint(exp: Experiment, flags: List[str], found: Findings) -> None:
    tokens = exp.entrypoint_tokens()
    launcher = next((t for t in tokens if t in LAUNCHERS), None)
    where = f"{exp.path}: entrypoint"
    if flag_value(flags, "--deepspeed") is not None and launcher != "determined.launch.deepspeed":
        found.problems.append(f"{where}: --deepspeed needs the DeepSpeed launcher: start it with "
                              "'python3 -m determined.launch.deepspeed python3 run_clm.py ...'")
    if exp.slots_per_trial > 1 and launcher is None:
        found.problems.append(f"{where}: slots_per_trial is {exp.slots_per_trial} but nothing starts one process per "
                              "GPU: prefix 'python3 -m determined.launch.torch_distributed' (or .deepspeed)")
    for old in sorted({underscored(flag) for flag in flags} & set(RENAMED_FLAGS)):
        found.problems.append(f"{where}: {old} was renamed {RENAMED_FLAGS[old]} in transformers 5 "
                              "(run_clm.py still accepts the old name, other tools do not): rename it")
    training_flags = ((exp.config.get("hyperparameters") or {}).get("training_arguments") or {})
    unknown = sorted(f"--{k}" for k in training_flags if f"--{k}" not in flag_fields())
    for flag in unknown:
        found.problems.append(f"{exp.path}: hyperparameters.training_arguments.{flag[2:]} is not a run_clm.py flag; "
                              "training_arguments keys become --flags, so rename or move it")


def check_deepspeed_config(path: Optional[Path], training_args, slots: int, found: Findings, where: str,
                           name: str) -> dict:
    """Parse the DeepSpeed JSON (path: where `--deepspeed name` was found, None if nowhere) and hold it to the
    Trainer's flags; returns the config ({} if missing or broken)."""
    if path is None or not path.is_file():
        found.problems.append(f"{where}: --deepspeed {name}: file not found next to the experiment or in the "
                              "context directory")
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        found.problems.append(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                              "fix it or start from ds_configs/")
        return {}
    zero = config.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        found.problems.append(f"{path}: zero_optimization.stage is {zero.get('stage')!r}; use 0, 1, 2 or 3")
    for precision, other in (("fp16", "bf16"), ("bf16", "fp16")):
        enabled = (config.get(precision) or {}).get("enabled", False)
        if getattr(training_args, precision) and enabled is False:
            fix = "use ds_configs/ds_config_stage_*_fp16.json" if precision == "fp16" else "set it to \"auto\""
            found.problems.append(
                f"{path}: {precision}.enabled is off or missing but {where} passes --{precision}: {fix}")
        if enabled is True and getattr(training_args, other):
            found.problems.append(f"{path}: {precision}.enabled is true but {where} passes --{other}: "
                                  f"set {precision}.enabled to \"auto\"")
    expected = {"train_micro_batch_size_per_gpu": training_args.per_device_train_batch_size,
                "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
                "train_batch_size": training_args.per_device_train_batch_size
                * training_args.gradient_accumulation_steps * slots}
    for key, value in expected.items():
        if config.get(key, "auto") not in ("auto", value):
            found.problems.append(f"{path}: {key} is {config[key]} but the flags and slots_per_trial={slots} give "
                                  f"{value}: set it to \"auto\"")
    scheduler = config.get("scheduler") or {}
    warmup = (scheduler.get("params") or {}).get("warmup_num_steps")
    if scheduler.get("type") in WARMUP_SCHEDULERS and warmup == "auto" and training_args.get_warmup_steps(1000) == 0:
        found.problems.append(f"{path}: scheduler {scheduler['type']} with warmup_num_steps \"auto\" fails on "
                              "deepspeed 0.19 when --warmup_steps is 0: remove the scheduler block (the Trainer's "
                              "scheduler is used) or pass --warmup_steps > 0")
    if (config.get("flops_profiler") or {}).get("enabled"):
        found.notes.append(f"{path}: flops_profiler is on: it profiles one step and prints a large report; "
                           "turn it off outside debugging")
    if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme") and "optimizer" not in config:
        found.problems.append(f"{path}: offload_optimizer needs DeepSpeed's CPU Adam: add an \"optimizer\" block "
                              "(see ds_configs/ds_config_stage_3_offload.json)")
    return config


def check_data(data_args, found: Findings) -> None:
    import datasets

    from swallow_ft.data.loading import detect_split_shapes, load_raw_datasets, source_name

    if data_args.dataset_name:
        found.notes.append(f"dataset {data_args.dataset_name}: not checked offline (it is downloaded on the cluster)")
        return
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the report is one line per finding
    try:
        raw = load_raw_datasets(data_args)
        shape = detect_split_shapes(raw, data_args)  # an empty file is refused by load_raw_datasets
        for split, ds in raw.items():
            check_rows(ds, source_name(data_args, split), shape, data_args.skip_bad_rows, found)
    except UserError as exc:
        found.problems.append(str(exc))
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()


def check_rows(dataset, source: str, shape: str, skip_bad_rows: bool, found: Findings) -> None:
    """Every row through to_conversation, the first step of tokenising: run_clm.py stops at the first bad row, or
    under --skip_bad_rows drops and counts them. Raises the first BadRow unless skip_bad_rows."""
    from swallow_ft.data.shapes import BadRow, row_name, to_conversation

    bad, first = 0, None
    for index, row in enumerate(dataset):
        try:
            to_conversation(row, shape, row_name(source, index))
        except BadRow as exc:
            if not skip_bad_rows:
                raise
            bad, first = bad + 1, first or str(exc)
    if bad == len(dataset):
        found.problems.append(f"{source}: every row is bad, so --skip_bad_rows leaves nothing to train on; the "
                              f"first: {first}")
    elif bad:
        found.notes.append(f"{source}: {bad} of {len(dataset)} rows would be skipped as bad (--skip_bad_rows); "
                           f"the first: {first}")


def check_kernels(model_args, training_args, ds_config: dict, found: Findings, where: str,
                  on_this_machine: bool) -> None:
    """Kernel choices that would otherwise fail only after the weights are loaded. on_this_machine: also check
    that this machine can run them (run_clm.py at start-up; not preflight, which runs on a laptop)."""
    from importlib.util import find_spec

    zero3 = (ds_config.get("zero_optimization") or {}).get("stage") == 3
    if training_args.use_liger_kernel and zero3:
        found.problems.append(f"{where}: --use_liger_kernel with ZeRO-3: Liger's fused cross-entropy reads "
                              "lm_head.weight, which ZeRO-3 keeps sharded; drop --use_liger_kernel "
                              "(python -m swallow_ft.plan leaves it out under ZeRO-3)")
    if training_args.use_liger_kernel and model_args.use_lora and model_args.lora_targets != "all-linear" and \
            "lm_head" in model_args.lora_targets:
        found.problems.append(f"{where}: --lora_target_modules lm_head with --use_liger_kernel: Liger's fused loss "
                              "reads lm_head's base weight, so that adapter would never train; drop lm_head or "
                              "--use_liger_kernel")
    if not on_this_machine:
        return
    import torch

    if training_args.use_liger_kernel and not torch.cuda.is_available():
        found.problems.append(f"{where}: --use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton): drop it "
                              "to train on CPU")
    elif training_args.use_liger_kernel and find_spec("liger_kernel") is None:
        found.problems.append(f"{where}: --use_liger_kernel but liger-kernel is not installed: "
                              "pip install liger-kernel==0.8.5 (requirements.txt pins it)")
    if model_args.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        found.problems.append(f"{where}: --attn_implementation flex_attention has no backward pass on CPU: use auto "
                              "(it picks sdpa here) or sdpa")
    from swallow_ft.model import cpp_compiler, triton_compiler

    triton_users = [flag for flag, used in (("--use_liger_kernel", training_args.use_liger_kernel),
                                            ("--attn_implementation flex_attention",
                                             model_args.attn_implementation == "flex_attention"),
                                            ("--torch_compile", training_args.torch_compile)) if used]
    if triton_users and torch.cuda.is_available() and triton_compiler() is None:
        verb = "compile" if len(triton_users) > 1 else "compiles"
        found.problems.append(f"{where}: {' and '.join(triton_users)} {verb} Triton kernels, which needs a C "
                              "compiler, and there is none (CC, gcc, clang): install gcc in the image, or use sdpa, "
                              "no Liger and no --torch_compile")
    if training_args.torch_compile and not torch.cuda.is_available() and cpp_compiler() is None:
        found.problems.append(f"{where}: --torch_compile on CPU builds C++ kernels, which needs a C++ compiler, and "
                              "there is none (CXX, g++, clang++): install g++, or drop --torch_compile")
    if model_args.attn_implementation == "flash_attention_2" and find_spec("flash_attn") is None:
        found.problems.append(f"{where}: --attn_implementation flash_attention_2 needs the flash-attn package: "
                              "install it, or use auto (flex_attention for packed rows on a GPU, else sdpa)")


def check_model_and_memory(model_args, data_args, training_args, slots: int, ds_config: dict,
                           gpu_mem: Optional[float], found: Findings, where: str, strict_memory: bool = True) -> None:
    from swallow_ft import memory

    try:
        shape = memory.shape_for(model_args.model_name_or_path, model_args.cache_dir)
    except UserError as exc:  # a mistyped Swallow id, a directory without a readable config: fails once per rank
        found.problems.append(f"{where}: --model_name_or_path {exc}")
        return
    if shape is None:
        found.notes.append(f"model {model_args.model_name_or_path}: config not available offline; "
                           "memory not estimated")
        return
    targets = model_args.lora_targets
    if model_args.use_lora and targets != "all-linear":
        missing = sorted(set(targets) - shape.linear_module_names())
        if missing:
            found.problems.append(f"{where}: --lora_target_modules: {', '.join(missing)} not in {shape.model_type}; "
                                  f"use some of {', '.join(sorted(shape.linear_module_names()))} or all-linear")
    too_long = data_args.block_size and memory.context_problem(shape, data_args.block_size)
    if too_long:
        found.problems.append(f"{where}: --block_size {data_args.block_size}: {too_long}: use --block_size "
                              f"{shape.max_positions} or less, or a model whose context is longer")
    zero = ds_config.get("zero_optimization") or {}  # {} without DeepSpeed: plain DDP, "ZeRO-0"
    settings = dict(
        gpus=slots, zero_stage=zero.get("stage", 0), micro_batch=training_args.per_device_train_batch_size,
        seq_len=data_args.block_size or 2048, lora_r=model_args.lora_r if model_args.use_lora else None,
        lora_targets=targets,
        lora_dropout=model_args.lora_dropout,
        gradient_checkpointing=training_args.activation_checkpointing,
        weight_bytes=2 if (training_args.bf16 or training_args.fp16) else 4,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"),
        offload_params=(zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"),
        # Liger's fused loss never forms the logits; under ZeRO-3 it cannot run at all (check_kernels says so).
        fused_loss=training_args.use_liger_kernel and zero.get("stage", 0) != 3)
    try:
        estimate = memory.estimate(shape, **settings)
    except ValueError as exc:  # a setting already reported above (bad stage, unknown module)
        found.notes.append(f"memory not estimated: {exc}")
        return
    summary = (f"memory per GPU: {estimate} ({shape.total_params / 1e9:.2f}B params, ZeRO-{settings['zero_stage']}, "
               f"{slots} GPU(s), micro-batch {settings['micro_batch']} x {settings['seq_len']} tokens)")
    if gpu_mem is None:
        found.notes.append(summary + "; GPU memory unknown, fit not checked (preflight takes --gpu-mem GIB)")
    elif memory.fits(estimate, gpu_mem):
        found.notes.append(summary + f"; fits {gpu_mem:g} GiB")
    else:
        fixes = memory.suggest_fixes(shape, gpu_mem, **settings)
        message = (f"{where}: {summary} does not fit {gpu_mem:g} GiB GPUs"
                   + (f"; would fit: {' | '.join(fixes[:3])}" if fixes else "; no setting tried fits"))
        (found.problems if strict_memory else found.notes).append(message)


def startup_checks(model_args, data_args, training_args, world_size: Optional[int] = None) -> None:
    """What run_clm.py re-checks before loading weights; problems stop it, memory only warns."""
    import torch

    found = Findings()
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = {}
    if training_args.deepspeed:
        ds_config = check_deepspeed_config(Path(training_args.deepspeed), training_args, world_size, found,
                                           "run_clm.py", training_args.deepspeed)
    check_kernels(model_args, training_args, ds_config, found, "run_clm.py", on_this_machine=True)
    gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    check_model_and_memory(model_args, data_args, training_args, world_size, ds_config, gpu_mem, found,
                           where="run_clm.py", strict_memory=False)
    if found.problems:
        raise UserError("\n".join(found.problems))
    if is_chief_process():
        for note in found.notes:
            logger.info(note)


def check_experiment(path, gpu_mem: Optional[float] = None, version: Optional[tuple] = None,
                     dsat: bool = False) -> Findings:
    """gpu_mem: GiB per GPU, as torch.cuda reports it (main reads --gpu-mem 80 as 79.1); default: the resource
    pool's card."""
    found = Findings()
    version = version or determined_version()
    try:
        exp = Experiment.load(path)
        found.problems += [f"{exp.path}: {message}" for message in expconf.validate(exp.config, version)]
        flags = split_equals(exp.script_args())
        check_entrypoint(exp, flags, found)
        note_cluster_names(exp, found)
        args = without_deepspeed(flags) + ["--use_cpu", "true"]
        # The entrypoint and the constants first, so that what a searched value breaks is blamed on it alone.
        parse_input_arguments(exp.sample_hparams(lambda dotted, spec: None), args)
        searched = exp.refused_search_values(args)
        if searched:
            found.problems += searched
            return found
        hparams = exp.sample_hparams()
        model_args, data_args, training_args = parse_input_arguments(hparams, args)
    except UserError as exc:
        found.problems.append(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
        return found
    labels = exp.config.get("labels")
    if (dsat or isinstance(labels, list) and DSAT_LABEL in labels) and version >= (0, 38):
        found.problems.append(f"{path}: DSAT needs Determined <= 0.37 (0.38 removed determined.pytorch.dsat): "
                              "use a 0.37 cluster and CLI (--determined-version 0.37 checks for one), or use the "
                              "planner: python -m swallow_ft.plan --model M --gpus N --gpu-mem GIB --write "
                              "EXPERIMENT.yaml")
    found.problems += [f"{path}: {problem}" for problem in searcher_problems(exp.searcher, training_args, version)]
    metric = exp.searcher.get("metric", "")
    if metric.startswith("eval_") and training_args.eval_strategy == "no":
        found.problems.append(f"{path}: searcher.metric is {metric} but evaluation is off: add --eval_strategy steps "
                              "and --eval_steps N to the entrypoint")
    ds_config = {}
    deepspeed_readable = True
    name = flag_value(flags, "--deepspeed")
    if name:
        ds_config = check_deepspeed_config(find_file(name, exp.path.parent), training_args, exp.slots_per_trial,
                                           found, str(path), name)
        deepspeed_readable = bool(ds_config)
    check_deepspeed_hyperparameter(hparams.get("deepspeed_config"), name, found, str(path))
    check_kernels(model_args, training_args, ds_config, found, str(path), on_this_machine=False)
    check_data(data_args, found)
    from swallow_ft.model import check_local_model_path

    try:  # run_clm.py checks it too, but only once every rank has started
        check_local_model_path(model_args.model_name_or_path)
    except UserError as exc:
        found.problems.append(f"{path}: {exc}")
        return found
    if not deepspeed_readable:
        found.notes.append("memory not estimated: the DeepSpeed config could not be read")
        return found
    pool = (exp.config.get("resources") or {}).get("resource_pool")
    gpu_mem = gpu_mem or (gpu_memory_for_pool(pool) if pool else None)
    check_model_and_memory(model_args, data_args, training_args, exp.slots_per_trial, ds_config, gpu_mem, found,
                           where=str(path))
    return found


def note_cluster_names(exp: Experiment, found: Findings) -> None:
    """The master refuses an experiment whose workspace, project or pool it does not have: the shipped YAMLs name the
    reference's (poc, swallow, A100), which are unlikely to be a user's."""
    named = {"workspace": exp.config.get("workspace"), "project": exp.config.get("project"),
             "resources.resource_pool": (exp.config.get("resources") or {}).get("resource_pool")}
    named = {key: value for key, value in named.items() if value}
    if named:
        found.notes.append(f"{', '.join(f'{key} {value}' for key, value in named.items())}: must exist on your cluster "
                           "(not checked offline): change or delete them (det workspace list, det project list "
                           "WORKSPACE, det workspace list-pools WORKSPACE)")


def check_deepspeed_hyperparameter(named: Optional[str], used: Optional[str], found: Findings, where: str) -> None:
    """The reference (and DSAT) name the DeepSpeed config twice: hyperparameters.deepspeed_config and --deepspeed."""
    if not isinstance(named, str) or used and os.path.normpath(named) == os.path.normpath(used):
        return
    found.problems.append(f"{where}: hyperparameters.deepspeed_config is {named} but the entrypoint trains with "
                          f"{f'--deepspeed {used}' if used else 'no --deepspeed'}: make them name the same file "
                          "(DSAT tunes the hyperparameter's file, and the Web UI shows it as the run's config)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swallow_ft.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", type=Path)
    parser.add_argument("--gpu-mem", type=float, help="GiB per GPU as torch.cuda reports it; the GB a card is sold by "
                        "(80, 40, 141) is read as that, as the planner reads it: 80 as 79.1 (default: from "
                        "resources.resource_pool)")
    parser.add_argument("--determined-version", help="check for this Determined version (default: installed)")
    parser.add_argument("--dsat", action="store_true", help="the experiment will be launched with DSAT (implied by "
                        f"labels: [{DSAT_LABEL}] in the YAML)")
    args = parser.parse_args(argv)
    version = tuple(int(p) for p in args.determined_version.split(".")[:2]) if args.determined_version else None
    gpu_mem = None if args.gpu_mem is None else gpu_gib(args.gpu_mem)[0]
    failed = False
    for path in args.experiments:
        found = check_experiment(path, gpu_mem=gpu_mem, version=version, dsat=args.dsat)
        for problem in found.problems:
            print(problem)
        for note in found.notes:
            print(f"  note: {note}")
        print(f"{path}: {'OK' if not found.problems else f'{len(found.problems)} problem(s)'}")
        failed |= bool(found.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
