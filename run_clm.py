"""Fine-tune a Swallow model with the Hugging Face Trainer on Determined, or locally.

On a cluster (the experiment's entrypoint):
    python3 -m determined.launch.deepspeed python3 run_clm.py --model_name_or_path ... [HF flags]
Locally, from the same experiment file (checkpoints and metrics under runs/<name>/):
    python run_clm.py --config experiments/local_tiny.yaml [--fresh] [--any_flag value ...]
"""

import logging
import signal
import sys


def abort_before_training(*_signal):
    print("aborted before training started", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":  # a Ctrl-C in the seconds the imports below take ends in one line too, not their traceback
    signal.signal(signal.SIGINT, abort_before_training)

from transformers import set_seed

from hf_callback import DetCallback
from swallow_ft import launch, runtime
from swallow_ft.arguments import dict2args, parse_input_arguments  # noqa: F401  (the seed's public helpers)
from swallow_ft.checkpoints import check_warm_start
from swallow_ft.data import build_collator, build_datasets
from swallow_ft.errors import UserError
from swallow_ft.trainer import SwallowTrainer
from swallow_ft.model import load_model, load_tokenizer


def main(det_callback, tb_callback, model_args, data_args, training_args):
    set_seed(training_args.seed)  # before the LoRA adapters are initialised: the Trainer only seeds after that
    warm_start = det_callback.warm_start  # another trial's checkpoint: its adapter, then training from step 0
    if warm_start:
        check_warm_start(warm_start, model_args.use_lora, model_args.lora_r)
    tokenizer = load_tokenizer(model_args)
    data = build_datasets(data_args, training_args, tokenizer, model_args.model_name_or_path,
                          cache_dir=model_args.cache_dir)
    # Saved in every checkpoint, so that compare and the notebook prompt the model as it was trained ("auto" resolved).
    det_callback.user_data = {**(det_callback.user_data or {}), **data.prompt_settings()}
    if data.packing_efficiency is not None:
        det_callback.constant_metrics["packing_efficiency"] = data.packing_efficiency
    model = load_model(model_args, training_args, packing=data_args.packing,
                       adapter_from=warm_start.path if warm_start else None)
    trainer = SwallowTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        # Under torch.compile packed batches get one static shape, so the layers compile once.
        data_collator=build_collator(tokenizer, packing=data_args.packing,
                                     width=data.block_size if training_args.torch_compile else None),
        callbacks=[det_callback] + ([tb_callback] if tb_callback else []),
    )
    with det_callback.dsat_reporting():
        trainer.train(resume_from_checkpoint=det_callback.resume_from_checkpoint)
    return det_callback.summary(trainer.state)


def run(argv) -> int:
    job = runtime.prepare(argv)
    if job.training_args is None:  # a local multi-process run: start the ranks under torchrun
        return launch.relaunch(job, argv, script=__file__)
    with runtime.core_context(job) as core_context:
        det_callback = DetCallback(
            core_context, job.training_args,
            user_data={"finetuned_from": job.model_args.model_name_or_path,
                       "dataset": job.data_args.dataset_name or job.data_args.train_file},
            latest_checkpoint=job.latest_checkpoint,
            searcher_config=job.experiment.searcher if job.experiment else None,
            strict_searcher=not job.is_local)
        summary = main(det_callback, None, job.model_args, job.data_args, job.training_args)
        if core_context.distributed.rank == 0:
            runtime.print_summary(summary, job)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C raises where the process is
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        sys.exit(run(sys.argv[1:]))
    except UserError as exc:
        if runtime.is_chief_process():
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training (once it runs, a Ctrl-C is a preemption)
        abort_before_training()
