"""Plot measured perplexities (a results file of `layerprune eval` figures) against the pruning ratio.

    .venv/bin/python benches/plot_quality.py benches/results/quality_2026-12-01.json docs/quality_obs_ppl_vs_ratio.png

The results file lists runs as ``{"method", "target_ratio", "ppl", "command"}`` (dense with ratio 0), each figure
copied from the eval of the command beside it.
"""

from __future__ import annotations

import json
import sys

from layerprune.report.plots import plot_ppl_vs_ratio


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    runs = json.loads(open(sys.argv[1]).read())["runs"]
    plot_ppl_vs_ratio(runs, sys.argv[2])
    print(f"wrote {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
