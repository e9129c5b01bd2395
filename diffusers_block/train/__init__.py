"""Training and distillation loops for the models this repo ships (see ``python -m diffusers_block.train -h``)."""

from .._extras import require

for _module in ("accelerate", "tqdm"):  # the loop's own packages; the digits data asks for scikit-learn where it loads
    require("train", _module)
