"""Benchmarks: ``python -m diffusers_block.bench <command> --help`` (commands are listed in ``__main__.py``)."""
