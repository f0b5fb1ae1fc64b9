"""What the bench measures with: the step timer, the profiler, the token counter and the matmul ceiling."""
import time

import torch
from transformers import TrainerCallback

from recipes import CUDA


def sync():
    if CUDA:
        torch.cuda.synchronize()


def free_gpu(reset_peak=False):
    if CUDA:
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


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
    """Step time (on_step_begin -> on_step_end, synchronised on GPU) and non-pad tokens per optimizer step; spans keep
    each step's (start, end) so the gaps between steps (data loading, logging) can be measured too."""
    def __init__(self):
        self.times, self.tokens, self.spans, self._t0, self._seen = [], [], [], 0.0, 0
        self.trainer = None  # SwallowTrainer keeps its token count on the GPU until asked

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        self.spans.append((self._t0, time.perf_counter()))
        self.times.append(self.spans[-1][1] - self._t0)
        seen = self.trainer.tokens_seen()
        self.tokens.append(seen - self._seen)
        self._seen = seen


class StepProfiler(TrainerCallback):
    """torch.profiler over `steps` optimizer steps after `start` completed ones: where a step's time goes. The
    profiled steps come after the measured ones, so profiling never slows a measured step."""
    def __init__(self, start, steps, table_path):
        self.start, self.steps, self.table_path, self.summary, self._prof = start, steps, table_path, None, None

    def on_step_begin(self, args, state, control, **kw):
        if self.steps and state.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * CUDA
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()

    def on_step_end(self, args, state, control, **kw):
        if self._prof is None or state.global_step != self.start + self.steps:
            return
        sync()
        self._prof.stop()
        events = self._prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        self.summary = {"steps": self.steps,
                        "gpu_kernel_s_per_step": sum(e.self_device_time_total for e in kernels) / 1e6 / self.steps
                        if CUDA else None,
                        "kernels_per_step": sum(e.count for e in kernels) / self.steps if CUDA else None,
                        "aten_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / self.steps,
                        "table": str(self.table_path)}
        sort_by = "self_device_time_total" if CUDA else "self_cpu_time_total"
        self.table_path.parent.mkdir(parents=True, exist_ok=True)
        self.table_path.write_text(events.table(sort_by=sort_by, row_limit=40))
        self._prof = None


def matmul_ceiling(warmup_s=0.5, iters=100, repeats=3):
    """FLOP/s of one big matmul: 8192^3 bf16 on GPU (products for at least warmup_s first, so that clocks and cuBLAS
    settle, then the best of `repeats` timings of `iters` products), 1024^3 fp32 on CPU (3 warm-up, 10 timed: a quick
    sanity number)."""
    if not CUDA:
        warmup_s, iters, repeats = 0.0, 10, 1
    n, dtype, dev = (8192, torch.bfloat16, "cuda") if CUDA else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    c = torch.empty(n, n, dtype=dtype, device=dev)  # one output, reused: no allocation inside the timed loop
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup_s:
        for _ in range(10):
            torch.matmul(a, b, out=c)
        sync()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        sync()
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    del a, b, c
    free_gpu()  # what the allocator would otherwise keep from the recipes
    return best
