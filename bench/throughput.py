"""Training throughput of the project's own path (parse_input_arguments -> load_model -> collators -> Trainer +
DetCallback) on a random-init model of a named shape, several recipes in one run. Columns: bench/README.md.
    python bench/throughput.py --shape swallow-7b --recipes seed,default,padded --data skewed --json bench/h100.json
"""
import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import determined as det  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from swallow_ft import memory, runtime, tiny  # noqa: E402
from swallow_ft.arguments import parse_input_arguments  # noqa: E402
from swallow_ft.data import build_collator  # noqa: E402  (the project's collators and packing)
from swallow_ft.data.encoding import IGNORE  # noqa: E402
from swallow_ft.data.packing import pack, packing_efficiency  # noqa: E402
from swallow_ft.det_callback import DetCallback  # noqa: E402
from swallow_ft.flops import flops_per_token  # noqa: E402
from swallow_ft.local_core import LocalTrainContext  # noqa: E402
from swallow_ft.model import load_model, load_tokenizer  # noqa: E402
from swallow_ft.trainer import SwallowTrainer  # noqa: E402

from measure import Counting, StepProfiler, Timer, free_gpu, matmul_ceiling  # noqa: E402
from recipes import CUDA, MODIFIERS, RECIPES, SHAPES, SMALL, planning_gib, resolve  # noqa: E402  (bench/recipes.py: what is measured)

def flags_for(r, model_dir, work):
    train_file = work / "unused.jsonl"  # check_arguments wants a data source; the rows are built in memory
    train_file.write_text('{"text": "x"}\n')
    total = r["warmup"] + r["steps"] + r["profile_steps"]
    flags = runtime.local_default_flags() + [
        "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(work / "out"),
        "--do_train", "--max_steps", str(total), "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", str(total), "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--learning_rate", "1e-4", "--per_device_train_batch_size", str(r["micro_batch"]),
        "--block_size", str(r["seq"]), "--attn_implementation", r["attn"], "--use_lora", "--lora_r", str(r["lora_r"]),
        "--lora_alpha", str(2 * r["lora_r"]), "--lora_target_modules", r["lora_targets"],
        "--lora_dropout", str(r["lora_dropout"]),
        f"--{r['precision']}", "--torch_dtype", {"bf16": "bfloat16", "fp16": "float16"}[r["precision"]]]
    gloo = bool(not CUDA and r["deepspeed"] and "--ddp_backend" not in flags)  # DeepSpeed's process group on CPU
    return (flags + ["--ddp_backend", "gloo"] * gloo + ["--packing"] * r["packing"]
            + ["--activation_checkpointing"] * bool(r["checkpointing"]) + ["--use_liger_kernel"] * r["liger"]
            + ["--torch_compile"] * r["compile"] + ["--logging_nan_inf_filter", "true"] * r["host_reads"]
            + (["--deepspeed", str(REPO / r["deepspeed"])] if r["deepspeed"] else []))


BASE_SEQ = 2048  # example lengths are drawn against this, whatever the recipe's seq, and then truncated to it


def make_rows(kind, seq, count_tokens, min_rows, vocab, pad_id, seed=0):
    """The same stream of examples for every recipe of a data mode, each truncated to the recipe's seq.
    random: examples of BASE_SEQ tokens, all trained; skewed: log-normal lengths in [16, BASE_SEQ] (median 15% of
    BASE_SEQ), loss on the last 30% (the reply) of what is kept after truncation, so every row trains some tokens."""
    g = torch.Generator().manual_seed(seed)
    ids, labels, tokens = [], [], 0
    while tokens < count_tokens or len(ids) < min_rows:
        z = torch.randn(1, generator=g).item()  # median 15%, sigma 0.9: many short, a few long examples
        n = BASE_SEQ if kind == "random" else int(min(BASE_SEQ, max(16, 0.15 * BASE_SEQ * math.exp(0.9 * z))))
        row = torch.randint(3, vocab, (n,), generator=g)[:seq]
        row = torch.where(row == pad_id, 3, row).tolist()  # non-pad counting needs the pad id absent from data
        n = len(row)
        cut = 0 if kind == "random" else n - max(1, int(0.3 * n))
        ids, labels, tokens = ids + [row], labels + [[IGNORE] * cut + row[cut:]], tokens + n
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def run_recipe(name, r, model_dir, work, data, profiles=Path(".")):
    """One recipe in this process: the project's training path, timed. Returns the row (without MFU)."""
    work.mkdir(parents=True, exist_ok=True)
    model_args, data_args, training_args = parse_input_arguments({}, flags_for(r, model_dir, work))
    if training_args.deepspeed:
        runtime.join_deepspeed_comm(training_args)
    tokenizer = load_tokenizer(model_args)
    free_gpu(reset_peak=True)
    model = load_model(model_args, training_args, packing=data_args.packing)
    vocab, pad = model.config.vocab_size, tokenizer.pad_token_id
    rows_needed = r["micro_batch"] * (r["warmup"] + r["steps"] + r["profile_steps"]) * training_args.world_size
    # Enough tokens to fill every step's batch even when packed, so that no step starts a second epoch.
    train = make_rows(data, r["seq"], int(1.3 * rows_needed * r["seq"]), rows_needed, vocab, pad)
    if data_args.packing:
        train = pack(train, r["seq"])
    efficiency = packing_efficiency(train, r["seq"]) if data_args.packing else None
    # Packed batches at one width: the last rows of skewed data are a token or two short, and flex attention, compiled
    # by transformers, would recompile for the second width, maybe inside a measured step.
    collator = Counting(build_collator(tokenizer, packing=data_args.packing,
                                       width=r["seq"] if data_args.packing or r["compile"] else None), pad)
    logging_dir = work / "det"
    core = det.core._dummy_init(distributed=runtime.distributed_context(), checkpoint_storage=str(logging_dir / "ckpt"))
    core.train = LocalTrainContext(logging_dir / "metrics.jsonl", logging_dir / "tensorboard")
    timer = Timer()
    profiler = StepProfiler(r["warmup"] + r["steps"], r["profile_steps"],
                            profiles / f"profile-{safe(name)}-{data}.txt")
    with core:
        callback = DetCallback(core, training_args, strict_searcher=False)
        callback.constant_metrics.update({"packing_efficiency": efficiency} if efficiency is not None else {})
        trainer = SwallowTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                                 data_collator=collator, callbacks=[callback, timer, profiler])
        trainer.skip_lora_input_casts, trainer.fuse_lora = not r["peft_casts"], r["fused_lora"]
        trainer.defer_token_count = not r["host_reads"]
        timer.trainer = trainer
        trainer.train()
    callback.clock.read()  # the steps after the last log
    measured = slice(min(r["warmup"], len(timer.times) - 1), r["warmup"] + r["steps"])
    times, tokens = timer.times[measured], timer.tokens[measured]
    row = {"recipe": name, "data": data, **{k: r[k] for k in ("precision", "micro_batch", "seq", "packing", "lora_r",
                                                               "lora_targets", "lora_dropout", "liger",
                                                               "peft_casts", "fused_lora", "host_reads", "note")},
           "deepspeed": Path(r["deepspeed"]).name if r["deepspeed"] else None,
           "attn": model.config._attn_implementation,  # what --attn_implementation auto resolved to
           "compiled": compiled_regions(trainer.model_wrapped),
           "activation_checkpointing": bool(r["checkpointing"]), "world_size": training_args.world_size,
           "flops_per_token": flops_per_token(model),  # the callback's count, so the bench's MFU is the Web UI's
           "steps_measured": len(times), "tokens_per_second": sum(tokens) / sum(times),
           # the mean tokens of a measured step over the median step time: robust to one slow step
           "tokens_per_second_median": statistics.mean(tokens) / statistics.median(times), "steps_s": sum(times),
           # from the first measured step's start to the last one's end, gaps included
           "wall_s": timer.spans[measured][-1][1] - timer.spans[measured][0][0],
           "step_time": statistics.median(times),
           "max_step_s": max(times),  # far above the median: a recompile or allocator stall inside the measured steps
           "warmup_s": sum(timer.times[:r["warmup"]]),  # includes the compile of compiled recipes
           "fill_efficiency": collator.real / max(collator.slots, 1), "packing_efficiency": efficiency,
           # the callback's step clock (CUDA events, no sync; what the Web UI's tokens/s divides by) over this
           # timer's synchronised one, all steps
           "callback_clock_vs_timer": callback.clock.total / sum(timer.times),
           "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / memory.GiB if CUDA else None}
    if profiler.summary:
        profiler.summary["step_time"] = statistics.median(timer.times[r["warmup"] + r["steps"]:])
        busy = profiler.summary["gpu_kernel_s_per_step"]
        profiler.summary["gpu_busy"] = busy / profiler.summary["step_time"] if busy is not None else None
        row["profile"] = profiler.summary
    # Drop every reference to the model (the trainer holds it; timer, callback and profiler are held by the trainer
    # and timer holds it back; core, collator and data are freed with them) so that its memory is released here.
    model_ref = weakref.ref(model)
    timer.trainer = None
    del trainer, model, timer, profiler, callback, core, collator, train
    gc.collect()
    free_gpu()
    row["model_released"] = model_ref() is None  # False: something still holds the model (and its GPU memory)
    if CUDA:  # what this recipe left allocated would count in the next one's peak and could make it OOM
        row["left_allocated_gib"] = torch.cuda.memory_allocated() / memory.GiB
    return row


def compiled_regions(model):
    """What torch.compile wrapped in the model the Trainer ran: "model", "layers" (regional) or None."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        return "model"
    return "layers" if any(isinstance(m, OptimizedModule) for m in model.modules()) else None


def run_in_child(name, r, model_dir, work, args, data, deadline=None):
    """Run one recipe in a child process and read its row back. DeepSpeed needs a process group, so it runs under
    torchrun with one process; Liger patches transformers' modules globally, so it must not leak into other rows."""
    out = work / f"{safe(name)}-{data}.row.json"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if r["deepspeed"] else []
    cmd = [sys.executable, *launcher, __file__, "--shape", args.shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--data", data, "--_child", name, "--_model_dir", str(model_dir),
           "--_row_out", str(out), "--_work", str(work), "--profile-steps", str(args.profile_steps),
           "--profile-dir", str(profile_dir(args).resolve())]
    why = ("DeepSpeed recipe, running it under torchrun --nproc_per_node 1" if r["deepspeed"] else
           "Liger patches transformers globally, running it in its own process" if r["liger"] else
           f"{' '.join(f'{k}={v}' for k, v in r['env'].items())} needs a fresh process" if r["env"] else
           "the compiler's caches and recompile limits are per process, running it in its own" if r["compile"] else
           "running it in its own process")
    print(f"[bench] {name}: {why}", file=sys.stderr, flush=True)
    # Its own session, so that a recipe past the deadline is killed with everything it started (torchrun's ranks).
    child = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **r["env"]}, start_new_session=True)
    try:
        returncode = child.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        kill_tree(child.pid)
        child.wait()
        raise TimeoutError("killed at --deadline; its output is above") from None
    if returncode != 0 or not out.exists():
        raise RuntimeError(f"its child process failed (exit {returncode}); its output is above")
    return json.loads(out.read_text())


def kill_tree(pid):
    """SIGKILL pid, everything below it and their process groups. torchrun starts each rank in a session of its own,
    out of reach of killing torchrun's group: on a GPU box a rank left behind holds memory and compute."""
    root = psutil.Process(pid)
    root.suspend()  # no new children while they are collected
    for process in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()


def profile_dir(args):
    return args.profile_dir or (args.json.parent if args.json else Path("."))


def safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def build_model_dir(shape_name, dest):
    """Random-init weights of the shape plus the tiny tokenizer (pad/eos ids), loadable by from_pretrained; a
    complete one already at dest (from --model-dir) is reused."""
    marker = dest / "bench-shape.json"
    if marker.exists() and json.loads(marker.read_text()) == {"shape": shape_name}:
        print(f"[bench] reusing the random {shape_name} model in {dest}", file=sys.stderr, flush=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    shape = SHAPES[shape_name]
    tokenizer = AutoTokenizer.from_pretrained(tiny.build())
    config = LlamaConfig(**shape.config_sizes(), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    need = 2 * shape.total_params * 1.05
    dest.parent.mkdir(parents=True, exist_ok=True)
    if shape_name not in SMALL and shutil.disk_usage(dest.parent).free < need:
        raise SystemExit(f"{shape_name}: needs {need / 1e9:.0f} GB free under {dest.parent} for the random "
                         "bf16 weights; pass --workdir or --model-dir on a larger disk")
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA and shape_name not in SMALL else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32 if shape_name in SMALL else torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del model
    free_gpu()
    marker.write_text(json.dumps({"shape": shape_name}))  # last: a half-written model is never reused
    return dest


def table(rows):
    lines = ["| data | recipe | tokens/s | vs seed | step s | fill | peak GiB | MFU | settings |", "|---" * 9 + "|"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['data']} | {x['recipe']} | failed: {x['error']} |||||||")
            continue
        lines.append(" | ".join([
            f"| {x['data']}", x["recipe"], f"{x['tokens_per_second']:,.0f}",
            "n/a" if x["vs_seed"] is None else f"{x['vs_seed']:.2f}x",
            f"{x['step_time']:.3f}", f"{100 * x['fill_efficiency']:.0f}%",
            "n/a" if x["peak_gpu_mem_gib"] is None else f"{x['peak_gpu_mem_gib']:.1f}", f"{100 * x['mfu']:.1f}%",
            f"{x['precision']}, {x['deepspeed'] or 'no DeepSpeed'}, {x['micro_batch']}x{x['seq']}, "
            f"{'packed' if x['packing'] else 'padded'}, ckpt {'on' if x['activation_checkpointing'] else 'off'}, "
            f"LoRA r{x['lora_r']} {x['lora_targets']} dropout {x['lora_dropout']:g}, {x['attn']}"
            f"{', liger' if x['liger'] else ''}{', compiled ' + x['compiled'] if x.get('compiled') else ''} |"]))
    return "\n".join(lines)


def with_ratios(rows):
    """vs_seed: tokens/s over seed's tokens/s on the same data, when seed ran in this invocation."""
    seeds = {x["data"]: x["tokens_per_second"] for x in rows if x["recipe"] == "seed" and "error" not in x}
    for x in rows:
        if "error" not in x:
            x["vs_seed"] = x["tokens_per_second"] / seeds[x["data"]] if x["data"] in seeds else None
    return rows


def write_report(report, path):
    with_ratios(report["rows"])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--recipes", default="seed,default,padded",
                   help=f"comma-separated; each a recipe ({', '.join(RECIPES)}) with optional +modifiers "
                        f"({', '.join(MODIFIERS)}, mbN, seqN, rN), e.g. default+flex+liger")
    p.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=4, help="steps run first and not measured")
    p.add_argument("--data", default="random", help="random, skewed, or both comma-separated (each recipe per data)")
    p.add_argument("--json", type=Path, help="written after every row, so an interrupted run keeps its rows")
    p.add_argument("--workdir", type=Path, default=None, help="where the random model is written (temp dir)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="keep the random model here and reuse it on the next run with the same --shape")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the measured steps, profile this many with torch.profiler (summary in the row)")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="where the profile tables go (default: next to --json, else here)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no recipe after this many seconds (the ones left are listed as skipped)")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time by which everything must be done: a recipe starts only if the time left is "
                        "1.5x the longest so far (at least 60 s), and one in its own process is killed at it")
    for hidden in ("--_child", "--_model_dir", "--_row_out", "--_work"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:  # inside the child process
        r = {**resolve(args._child, args.shape, quiet=True), "steps": args.steps, "warmup": args.warmup,
             "profile_steps": args.profile_steps}
        row = run_recipe(args._child, r, Path(args._model_dir), Path(args._work) / safe(args._child), args.data,
                         profile_dir(args))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args._row_out).write_text(json.dumps(row))
        return 0
    started = time.monotonic()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    datas = [d.strip() for d in args.data.split(",") if d.strip()]
    if set(datas) - {"random", "skewed"}:
        p.error(f"--data {args.data}: each must be random or skewed")
    try:
        planned = [(name, {**resolve(name, args.shape, quiet=True), "steps": args.steps, "warmup": args.warmup,
                           "profile_steps": args.profile_steps}) for name in names]
    except ValueError as e:
        p.error(str(e))
    if not CUDA and args.shape not in SMALL:
        p.error(f"--shape {args.shape} needs a GPU; on CPU use --shape {' or '.join(SMALL)}")
    ceiling = matmul_ceiling()
    device = torch.cuda.get_device_name(0) if CUDA else f"cpu ({os.cpu_count()} cores)"
    plan_gib = planning_gib()  # what the "auto" settings were planned for: this GPU's memory or $PLAN_GPU_GIB
    plan_gib = None if math.isinf(plan_gib) else round(plan_gib, 2)
    planned_for = "no GPU limit" if plan_gib is None else f"planned for {plan_gib:g} GiB" + (
        " ($PLAN_GPU_GIB)" if os.environ.get("PLAN_GPU_GIB") else "")
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "shape": args.shape, "data": args.data, "plan_gpu_gib": plan_gib,
              "plan_gpu_gib_from": "PLAN_GPU_GIB" if os.environ.get("PLAN_GPU_GIB") else "device",
              "ceiling_tflops": ceiling / 1e12, "rows": [], "skipped": []}
    print(f"[bench] {args.shape} on {device}, {planned_for}; matmul ceiling {ceiling / 1e12:.2f} TFLOP/s",
          file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="swallow-bench-", dir=args.workdir))
    distributed = "LOCAL_RANK" in os.environ  # already under torchrun/deepspeed: all in-process
    isolate = False  # set once an in-process recipe leaves GPU memory behind: the rest run in their own processes
    longest = 0.0  # seconds of the longest recipe so far, to judge whether the next one fits before --deadline
    try:
        model_dir = build_model_dir(args.shape, args.model_dir or work / "model")
        for data in datas:
            for name, r in planned:
                needed = max(60.0, 1.5 * longest) * (2 if r["compile"] else 1)
                if args.budget_s is not None and time.monotonic() - started > args.budget_s or \
                        args.deadline is not None and args.deadline - time.time() < needed:
                    report["skipped"].append(f"{data}:{name}")
                    print(f"[bench] {name} on {data}: skipped, past --budget-s or too close to --deadline",
                          file=sys.stderr)
                    continue
                recipe_started = time.monotonic()
                print(f"[bench] {name} on {data} data ({time.monotonic() - started:.0f} s in)", file=sys.stderr,
                      flush=True)
                try:
                    own_process = r["deepspeed"] or r["liger"] or r["env"] or r["compile"] or isolate
                    row = (run_in_child(name, r, model_dir, work, args, data, args.deadline)
                           if own_process and not distributed
                           else run_recipe(name, r, model_dir, work / safe(name), data, profile_dir(args)))
                    if row.get("left_allocated_gib", 0) > 1 and not own_process:
                        isolate = True
                        print(f"[bench] {name} left {row['left_allocated_gib']:.1f} GiB allocated: the remaining "
                              "recipes run in their own processes", file=sys.stderr, flush=True)
                    row["mfu"] = row["tokens_per_second"] * row["flops_per_token"] / (ceiling * row["world_size"])
                except Exception as e:  # one failed recipe (an OOM, a missing kernel) must not lose the others
                    row = {"recipe": name, "data": data, "error": f"{type(e).__name__}: {e}"[:300]}
                gc.collect()  # whatever an in-process recipe left, before the next one's peak is measured
                free_gpu()
                longest = max(longest, time.monotonic() - recipe_started)
                print(f"[bench] row: {json.dumps(row)}", file=sys.stderr, flush=True)
                report["rows"].append(row)
                write_report(report, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(report, args.json)
    rows = report["rows"]
    print(f"\n{args.shape} on {device}, {planned_for}, {args.data} data, {args.steps} measured steps after "
          f"{args.warmup} warm-up; matmul ceiling {ceiling / 1e12:.2f} TFLOP/s\n")
    print(table(rows))
    for x in (x for x in rows if x.get("profile")):
        prof = x["profile"]
        gpu = (f"GPU kernels busy {100 * prof['gpu_busy']:.0f}% of the step ({prof['gpu_kernel_s_per_step']:.3f} "
               f"of {prof['step_time']:.3f} s), {prof['kernels_per_step']:,.0f} kernels/step, " if CUDA else "")
        print(f"profile {x['data']} {x['recipe']}: {gpu}{prof['aten_ops_per_step']:,.0f} aten ops/step; "
              f"{prof['table']}")
    if report["skipped"]:
        print(f"\nskipped (past --budget-s): {', '.join(report['skipped'])}")
    return 1 if any("error" in x for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
