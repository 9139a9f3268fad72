"""LLaMA trained with a hybrid-parallel plan that galvatron_fx searches for the cluster it runs on.

    torchrun --nproc_per_node 4 examples/llama/train.py                  # small config, CPU processes
    torchrun --nproc_per_node 8 examples/llama/train.py --size real      # LLaMA-2-7B, one GPU node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 examples/llama/train.py --size real

Add --plan plan.json to train with a plan from `galvatron-fx search` (or Galvatron's), --help for the rest.
"""

import argparse

from galvatron_fx.training import add_training_arguments, train_example

if __name__ == "__main__":
    parser = add_training_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    train_example("llama", parser.parse_args())
