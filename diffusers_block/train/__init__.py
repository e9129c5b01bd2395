"""Training and distillation loops for the models this repo ships (see ``python -m diffusers_block.train -h``)."""
