"""GPT-2 trained with a hybrid-parallel plan that galvatron_fx searches for the cluster it runs on.

The demo: real text that ships with Python (its standard library's source, as bytes), four CPU processes, and
a memory budget that plain data parallelism does not meet, so the search mixes strategies and says why:

    galvatron-fx preprocess-data --stdlib --max-files 300 --output-prefix data/stdlib
    torchrun --nproc_per_node 4 examples/gpt2/train.py --data data/stdlib --memory-budget 3.5MiB --explain

On GPUs, the published size with your own corpus (preprocess it with --input FILE.jsonl --tokenizer gpt2):

    torchrun --nproc_per_node 8 examples/gpt2/train.py --size real --data data/corpus --seq 1024 --global-batch 256
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 examples/gpt2/train.py --size real ...

Add --plan plan.json to train with a plan from `galvatron-fx search` (or Galvatron's), --save DIR and
--resume auto to checkpoint and continue, --log-file run.jsonl for the figures; --help for the rest.
"""

import argparse

from galvatron_fx.training import add_training_arguments, train_example

if __name__ == "__main__":
    parser = add_training_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.set_defaults(seq=64, steps=40, lr=3e-3, lr_schedule="cosine", warmup_steps=4, clip_grad=1.0)
    train_example("gpt2", parser.parse_args())
