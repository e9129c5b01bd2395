"""Does the routing hook's per-call host sync cost wall-clock? The shipped image student, routed as shipped (the
timestep read with ``.item()``) and routed by the scheduler's step index (no sync), timed round-robin; and the
device-to-host syncs of one run of each counted with torch.cuda.set_sync_debug_mode.

    python benchmarks/labs/distill/sync_probe.py OUT_DIR
"""

import json
import statistics
import sys
import warnings
from functools import partial

import torch

from diffusers_block.bench.cache import round_robin_seconds
from diffusers_block.distill import apply, disable_blockwise_flow, enable_blockwise_flow, load
from diffusers_block.eval.digits import balanced_labels, generate_digits
from diffusers_block.zoo import load_digits_image_pipeline, model_path

shipped_forward = apply.SegmentRoutingHook.new_forward


def by_step_index(self, module, *args, **kwargs):
    scheduler = self._pipeline().scheduler
    index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
    student = self.students[self.schedule.segment_of_step[index]]
    if not self._guided():
        return student(*args, **kwargs)
    return apply._run_on_second_half(student, args, kwargs)


def main(out: str) -> None:
    pipe, encoder = load_digits_image_pipeline(device="cuda")
    pipe.set_progress_bar_config(disable=True)
    student = load(model_path("digits-image-distilled"))
    labels = balanced_labels(30)
    modes = {"item-sync (shipped)": shipped_forward, "step-index (no sync)": by_step_index}

    def run(mode: str, batch_labels=labels):
        apply.SegmentRoutingHook.new_forward = modes[mode]
        return generate_digits(pipe, encoder, batch_labels, student.num_steps, 1.0, seed=0)

    enable_blockwise_flow(pipe, student)
    outputs = {mode: run(mode) for mode in modes}
    syncs = {}
    for mode in modes:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run(mode, labels[:10])
            torch.cuda.set_sync_debug_mode(0)
        syncs[mode] = sum("synchroniz" in str(w.message) for w in caught)
    times = round_robin_seconds({mode: partial(run, mode) for mode in modes}, 9, torch.device("cuda"))
    apply.SegmentRoutingHook.new_forward = shipped_forward
    disable_blockwise_flow(pipe)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "samples": len(labels),
        "same_output": bool(torch.equal(*outputs.values())),
        "syncs_per_run_of_10": syncs,
        "median_s": {mode: statistics.median(t) for mode, t in times.items()},
        "times_s": times,
    }
    print(json.dumps(result, indent=1))
    with open(f"{out}/sync-probe.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
