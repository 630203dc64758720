"""Which trained run a make target serves, printed for the shell, or one line saying why none.

    python -m fnemm_studies.pick flickr8k F8K_OUT   # RUN STORE: the benchmark's best run
    python -m fnemm_studies.pick photos F8K_OUT     # RUN: the benchmark's best, else the demo's
"""

from __future__ import annotations

import sys

from fnemm.io.errors import FnemmError
from fnemm_studies.study import best_run, photo_model


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("flickr8k", "photos"):
        print("usage: python -m fnemm_studies.pick {flickr8k,photos} BENCHMARK_OUT", file=sys.stderr)
        return 2
    try:
        if argv[0] == "flickr8k":
            print(*best_run(argv[1]))
        else:
            print(photo_model(argv[1]))
    except FnemmError as e:
        print(f"fnemm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
