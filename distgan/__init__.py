"""distgan: a distributed GAN trainer that scales the adversarial loop from one laptop core to many nodes.

The package is organised by responsibility (see docs/development.md, "Layout"):

    config.py       typed config tree, YAML + dotted overrides, validation (no torch)
    train.py        the entry point for every launcher (python -m, torchrun, accelerate launch)
    distributed.py  the only module that knows Accelerate / torch.distributed
    trainer.py      the adversarial step as named phases, the loop, state
    losses.py       adversarial losses and penalties (pure functions)
    models/         plain nn.Module families (dcgan)
    data/           datasets and per-rank batch streams

Importing distgan, its models or its losses loads neither accelerate, deepspeed nor wandb.
"""

__version__ = "0.1.0"
