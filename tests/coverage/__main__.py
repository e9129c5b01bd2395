"""``python -m tests.coverage [--write] [--render]``: print each class's outcome; write docs/coverage.json and
render the README and docs/supported-models.md tables from it."""

from __future__ import annotations

import argparse

from .render import JSON_PATH, outcomes, rendered


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.coverage", description=__doc__)
    parser.add_argument("--write", action="store_true", help="write docs/coverage.json")
    parser.add_argument("--render", action="store_true", help="regenerate the README and supported-models tables")
    args = parser.parse_args()
    results = outcomes()
    for result in results:
        print(f"{result.cls:45s} {result.outcome:10s} {result.block_lists or result.reason}")
    for path, text in rendered(results).items():
        if (path == JSON_PATH and args.write) or (path != JSON_PATH and args.render):
            path.write_text(text)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
