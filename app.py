"""The diffusers-block demo: every acceleration, baseline and accelerated side by side, in the browser.

    python app.py                          # http://127.0.0.1:7860, on the GPU if there is one, else the CPU
    python app.py --host 0.0.0.0 --port 8080 --device cpu
    python app.py --share                  # also a public gradio.live link (needs internet access)

The tabs live in ``diffusers_block/demo/`` (one module each); this file only parses the options and launches.
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--device",
        default="auto",
        help="where the models run: cpu, cuda, cuda:N, or auto (cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    args.device = resolve_device(parser, args.device)
    return args


def resolve_device(parser: argparse.ArgumentParser, device: str) -> str:
    import torch  # imported here so that --help answers at once

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(
                f"--device {device}: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu"
            )
        try:
            torch.device(device)
        except RuntimeError:
            parser.error(f"--device {device}: not a device name; use cuda or cuda:N")
        return device
    parser.error(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diffusers_block.demo import THEME, build_demo

    demo = build_demo(args.device)
    print(f"diffusers-block demo: models on {args.device}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME)


if __name__ == "__main__":
    main()
