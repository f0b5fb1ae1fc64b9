"""Training throughput of the project's own path (parse_input_arguments -> load_model -> collators -> Trainer +
DetCallback) on a random-init model of a named shape, several recipes in one run. Columns: bench/README.md.
    python bench/throughput.py --shape swallow-7b --recipes seed,default,padded --data skewed --json bench/h100.json
"""
import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import determined as det  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback  # noqa: E402

from swallow_ft import memory, runtime, tiny  # noqa: E402
from swallow_ft.arguments import parse_input_arguments  # noqa: E402
from swallow_ft.data import build_collator  # noqa: E402  (the project's collators and packing)
from swallow_ft.data.encoding import IGNORE  # noqa: E402
from swallow_ft.data.packing import pack, packing_efficiency  # noqa: E402
from swallow_ft.det_callback import DetCallback  # noqa: E402
from swallow_ft.local_core import LocalTrainContext  # noqa: E402
from swallow_ft.model import load_model, load_tokenizer  # noqa: E402

SHAPES = {"tiny": memory.ModelShape(64, 2, 4, 2, 176, 1200), **memory.KNOWN_SHAPES}
CUDA = torch.cuda.is_available()
# name -> settings; "auto" is decided per shape and device in resolve(). Add a recipe by adding an entry.
RECIPES = {
    # The reference's experiment: ZeRO-3 fp16, micro-batch 1 x 1024, LoRA r8 on q/v, no packing.
    "seed": dict(precision="fp16", deepspeed="ds_configs/ds_config_stage_3_fp16.json", micro_batch=1, seq=1024,
                 lora_r=8, lora_targets="q_proj,v_proj", packing=False, checkpointing=False),
    # This project's defaults: bf16, DeepSpeed only when one GPU is too small, packing, LoRA r16 on all linears.
    "default": dict(precision="bf16", deepspeed="auto", micro_batch=4, seq=2048, cpu_seq=256, lora_r=16,
                    lora_targets="all-linear", packing=True, checkpointing="auto"),
}
RECIPES["padded"] = {**RECIPES["default"], "packing": False}
CPU_DS_CONFIG = {"ds_configs/ds_config_stage_3_fp16.json": "ds_configs/ds_config_stage_3.json"}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def free_gpu(reset_peak=False):
    if CUDA:
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def resolve(name, shape_name, quiet=False):
    """Fill a recipe's "auto" settings for this shape and device."""
    r = dict(RECIPES[name], note="")
    if not CUDA and r["precision"] == "fp16":
        r["note"] = f"fp16 is refused on CPU: bf16 and {CPU_DS_CONFIG.get(r['deepspeed'], r['deepspeed'])} instead"
        if not quiet:
            print(f"[bench] {name}: {r['note']}", file=sys.stderr, flush=True)
        r["precision"], r["deepspeed"] = "bf16", CPU_DS_CONFIG.get(r["deepspeed"], r["deepspeed"])
    if not CUDA and "cpu_seq" in r:
        r["seq"] = r["cpu_seq"]
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / memory.GiB if CUDA else math.inf

    def fits(ckpt):  # one GPU, no ZeRO, by the preflight's memory model
        return memory.fits(memory.estimate(SHAPES[shape_name], gpus=1, zero_stage=0, micro_batch=r["micro_batch"],
                                           seq_len=r["seq"], lora_r=r["lora_r"], lora_targets=r["lora_targets"],
                                           gradient_checkpointing=ckpt), gpu_gib)
    if r["checkpointing"] == "auto":
        r["checkpointing"] = not fits(False)
    if r["deepspeed"] == "auto":
        r["deepspeed"] = None if fits(r["checkpointing"]) else "ds_configs/ds_config_stage_3.json"
    return r


def flags_for(r, model_dir, work):
    train_file = work / "unused.jsonl"  # check_arguments wants a data source; the rows are built in memory
    train_file.write_text('{"text": "x"}\n')
    total = r["steps"] + r["warmup"]
    flags = runtime.local_default_flags() + [
        "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(work / "out"),
        "--do_train", "--max_steps", str(total), "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", str(total), "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--learning_rate", "1e-4", "--per_device_train_batch_size", str(r["micro_batch"]),
        "--block_size", str(r["seq"]), "--attn_implementation", "sdpa", "--use_lora", "--lora_r", str(r["lora_r"]),
        "--lora_alpha", str(2 * r["lora_r"]), "--lora_target_modules", r["lora_targets"],
        f"--{r['precision']}", "--torch_dtype", {"bf16": "bfloat16", "fp16": "float16"}[r["precision"]]]
    gloo = bool(not CUDA and r["deepspeed"] and "--ddp_backend" not in flags)  # DeepSpeed's process group on CPU
    return (flags + ["--ddp_backend", "gloo"] * gloo + ["--packing"] * r["packing"]
            + ["--activation_checkpointing"] * bool(r["checkpointing"])
            + (["--deepspeed", str(REPO / r["deepspeed"])] if r["deepspeed"] else []))


def make_rows(kind, seq, count_tokens, min_rows, vocab, pad_id, seed=0):
    """random: rows of exactly seq tokens, all trained; skewed: log-normal lengths in [16, seq], loss on the
    last 30% (the reply)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels, tokens = [], [], 0
    while tokens < count_tokens or len(ids) < min_rows:
        z = torch.randn(1, generator=g).item()  # median 15% of seq, sigma 0.9: many short, a few long examples
        n = seq if kind == "random" else int(min(seq, max(16, 0.15 * seq * math.exp(0.9 * z))))
        row = torch.randint(3, vocab, (n,), generator=g)
        row = torch.where(row == pad_id, 3, row).tolist()  # non-pad counting needs the pad id absent from data
        cut = 0 if kind == "random" else n - max(1, int(0.3 * n))
        ids, labels, tokens = ids + [row], labels + [[IGNORE] * cut + row[cut:]], tokens + n
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


class Counting:
    """Wraps a collator to count real tokens and token slots in the batches it builds."""
    def __init__(self, inner, pad_id):
        self.inner, self.pad_id, self.real, self.slots = inner, pad_id, 0, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.real += int((batch["input_ids"] != self.pad_id).sum())
        self.slots += batch["input_ids"].numel()
        return batch


class Timer(TrainerCallback):
    """Step time (on_step_begin -> on_step_end, synchronised on GPU) and non-pad tokens per optimizer step."""
    def __init__(self):
        self.times, self.tokens, self._t0, self._seen = [], [], 0.0, 0

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen


def run_recipe(name, r, model_dir, work, data):
    """One recipe in this process: the project's training path, timed. Returns the row (without MFU)."""
    work.mkdir(parents=True, exist_ok=True)
    model_args, data_args, training_args = parse_input_arguments({}, flags_for(r, model_dir, work))
    if training_args.deepspeed:
        runtime._join_deepspeed_comm(training_args)
    tokenizer = load_tokenizer(model_args)
    free_gpu(reset_peak=True)
    model = load_model(model_args, training_args)
    vocab, pad = model.config.vocab_size, tokenizer.pad_token_id
    rows_needed = r["micro_batch"] * (r["steps"] + r["warmup"]) * training_args.world_size
    # Enough tokens to fill every step's batch even when packed, so that no step starts a second epoch.
    train = make_rows(data, r["seq"], int(1.3 * rows_needed * r["seq"]), rows_needed, vocab, pad)
    if data_args.packing:
        train = pack(train, r["seq"])
    efficiency = packing_efficiency(train, r["seq"]) if data_args.packing else None
    collator = Counting(build_collator(tokenizer, packing=data_args.packing), pad)
    logging_dir = work / "det"
    core = det.core._dummy_init(distributed=runtime.distributed_context(), checkpoint_storage=str(logging_dir / "ckpt"))
    core.train = LocalTrainContext(logging_dir / "metrics.jsonl", logging_dir / "tensorboard")
    timer = Timer()
    with core:
        callback = DetCallback(core, training_args, strict_searcher=False)
        callback.constant_metrics.update({"packing_efficiency": efficiency} if efficiency is not None else {})
        trainer = Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                          data_collator=collator, callbacks=[callback, timer])
        trainer.train()
    measured = slice(min(r["warmup"], len(timer.times) - 1), None)
    times, tokens = timer.times[measured], timer.tokens[measured]
    row = {"recipe": name, **{k: r[k] for k in ("precision", "micro_batch", "seq", "packing", "lora_r",
                                                 "lora_targets", "note")},
           "deepspeed": Path(r["deepspeed"]).name if r["deepspeed"] else None,
           "activation_checkpointing": bool(r["checkpointing"]), "world_size": training_args.world_size,
           "steps_measured": len(times), "tokens_per_second": sum(tokens) / sum(times),
           "step_time": statistics.median(times),
           "fill_efficiency": collator.real / max(collator.slots, 1), "packing_efficiency": efficiency,
           "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / memory.GiB if CUDA else None}
    del trainer, model
    gc.collect()
    free_gpu()
    return row


def run_in_child(name, r, model_dir, work, args):
    """DeepSpeed needs a process group: run the recipe under torchrun with one process, read its row back."""
    out = work / f"{name}.row.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           "--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", args.data,
           "--_child", name, "--_model_dir", str(model_dir), "--_row_out", str(out), "--_work", str(work)]
    print(f"[bench] {name}: DeepSpeed recipe, running it under torchrun --nproc_per_node 1", file=sys.stderr)
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0 or not out.exists():
        raise SystemExit(f"recipe {name} failed in its torchrun child (exit {result.returncode})")
    return json.loads(out.read_text())


def build_model_dir(shape_name, dest):
    """Random-init weights of the shape plus the tiny tokenizer (pad/eos ids), loadable by from_pretrained."""
    shape = SHAPES[shape_name]
    tokenizer = AutoTokenizer.from_pretrained(tiny.build())
    config = LlamaConfig(**dict(zip(memory._CONFIG_KEYS, astuple(shape))), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    need = 2 * shape.total_params * 1.05
    if shape_name != "tiny" and shutil.disk_usage(dest.parent).free < need:
        raise SystemExit(f"{shape_name}: needs {need / 1e9:.0f} GB free under {dest.parent} for the random "
                         "bf16 weights; pass --workdir on a larger disk")
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA and shape_name != "tiny" else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32 if shape_name == "tiny" else torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del model
    free_gpu()
    return dest


def matmul_ceiling():
    """FLOP/s of one big matmul: 8192^3 bf16 on GPU, 1024^3 fp32 on CPU."""
    n, dtype, dev, iters = (8192, torch.bfloat16, "cuda", 20) if CUDA else (1024, torch.float32, "cpu", 10)
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    [a @ b for _ in range(3)]  # warm-up
    sync()
    t0 = time.perf_counter()
    [a @ b for _ in range(iters)]
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def flops_per_token(shape, r):
    """6N for full fine-tuning; 4N for a frozen base (forward 2N + input gradients 2N) plus 6N of the adapters.
    N counts the matmul weights (embedding lookup excluded, lm_head included); attention scores are not counted."""
    n_base = shape.total_params - shape.vocab_size * shape.hidden_size
    return 6 * n_base if not r["lora_r"] else 4 * n_base + 6 * shape.lora_params(r["lora_r"], r["lora_targets"])


def table(rows):
    lines = ["| recipe | tokens/s | vs seed | step s | fill | peak GiB | MFU | settings |", "|---" * 8 + "|"]
    for x in rows:
        lines.append(" | ".join([
            f"| {x['recipe']}", f"{x['tokens_per_second']:,.0f}",
            "n/a" if x["vs_seed"] is None else f"{x['vs_seed']:.2f}x",
            f"{x['step_time']:.3f}", f"{100 * x['fill_efficiency']:.0f}%",
            "n/a" if x["peak_gpu_mem_gib"] is None else f"{x['peak_gpu_mem_gib']:.1f}", f"{100 * x['mfu']:.1f}%",
            f"{x['precision']}, {x['deepspeed'] or 'no DeepSpeed'}, {x['micro_batch']}x{x['seq']}, "
            f"{'packed' if x['packing'] else 'padded'}, ckpt {'on' if x['activation_checkpointing'] else 'off'}, "
            f"LoRA r{x['lora_r']} {x['lora_targets']} |"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--recipes", default="seed,default,padded")
    p.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=4, help="steps run first and not measured")
    p.add_argument("--data", choices=["random", "skewed"], default="random")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path, default=None, help="where the random model is written (temp dir)")
    for hidden in ("--_child", "--_model_dir", "--_row_out", "--_work"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:  # inside the torchrun child
        r = {**resolve(args._child, args.shape, quiet=True), "steps": args.steps, "warmup": args.warmup}
        row = run_recipe(args._child, r, Path(args._model_dir), Path(args._work) / args._child, args.data)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args._row_out).write_text(json.dumps(row))
        return 0
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if set(names) - set(RECIPES):
        p.error(f"unknown recipe(s) {', '.join(sorted(set(names) - set(RECIPES)))}; known: {', '.join(RECIPES)}")
    if not CUDA and args.shape != "tiny":
        p.error(f"--shape {args.shape} needs a GPU; on CPU use --shape tiny")
    ceiling = matmul_ceiling()
    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="swallow-bench-", dir=args.workdir))
    rows, distributed = [], "LOCAL_RANK" in os.environ  # already under torchrun/deepspeed: all in-process
    try:
        model_dir = build_model_dir(args.shape, work / "model")
        for name in names:
            r = {**resolve(name, args.shape), "steps": args.steps, "warmup": args.warmup}
            row = (run_in_child(name, r, model_dir, work, args) if r["deepspeed"] and not distributed
                   else run_recipe(name, r, model_dir, work / name, args.data))
            row["mfu"] = row["tokens_per_second"] * flops_per_token(shape, r) / (ceiling * row["world_size"])
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seed = next((x for x in rows if x["recipe"] == "seed"), None)
    for x in rows:
        x["vs_seed"] = x["tokens_per_second"] / seed["tokens_per_second"] if seed else None
    device = torch.cuda.get_device_name(0) if CUDA else f"cpu ({os.cpu_count()} cores)"
    print(f"\n{args.shape} on {device}, {args.data} data, {args.steps} measured steps after {args.warmup} warm-up; "
          f"matmul ceiling {ceiling / 1e12:.2f} TFLOP/s\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
               "shape": args.shape, "data": args.data, "ceiling_tflops": ceiling / 1e12, "rows": rows}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
