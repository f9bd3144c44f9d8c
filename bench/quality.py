"""Selection quality: the G2IS paper's Table 1 at small scale, as one resumable grid (issue 7).

    ./scripts/fetch-data                                       # BIG-bench task files (BBH tests, NI pool)
    .venv/bin/python bench/quality.py --preset cpu-hour --work quality-work
    .venv/bin/python bench/quality.py --preset cpu-hour --work quality-work --report docs   # table + plot
    .venv/bin/python bench/quality.py --preset cpu-scarce --work scarce-work --report docs/quality  # issue 18

Runs data -> warmup -> gradients -> graph -> selections -> fine-tuning -> evaluation with the real
SmolLM2-135M-Instruct in `--work` (its own Neo4j database under work/neo4j) and keeps every result in
work/results.json; re-running the same command resumes, a different config for the same folder is refused.
`--set key=value` (TOML values) or `--config file.toml` override the preset. `--report DIR` writes
DIR/quality-<preset>.json (results without local paths), the markdown table and the plot.
`--analyse-only` runs nothing and reports what the work folder has evaluated so far (a grid still running
or cut short).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.study import quality  # noqa: E402


def overrides(args) -> dict:
    values = {}
    if args.config:
        values.update(tomllib.loads(Path(args.config).read_text()))
    for item in args.set:
        key, _, value = item.partition("=")
        values.update(tomllib.loads(f"{key} = {value}"))
    return values


def report(state: dict, out: Path, preset: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    public = {k: state.get(k) for k in ("preset", "config", "stage_seconds", "graph", "rows", "summary", "overlap")}
    public.update({k: state[k] for k in ("paired", "residuals") if k in state})
    public["selections"] = [{k: v for k, v in s.items() if k != "out_dir"} for s in state["selections"].values()]
    public["pool"] = {k: state["data"]["pool_manifest"][k] for k in ("n_records", "sha256", "datasets",
                                                                     "dropped_overlapping", "near_duplicates")}
    public["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    (out / f"quality-{preset}.json").write_text(json.dumps(public, indent=1))
    tables = [quality.markdown_table(state), quality.selection_table(state)]
    if state.get("paired"):
        tables += [quality.study_table(state), quality.diagnostics_table(state)]
    (out / f"quality-{preset}.md").write_text("\n\n".join(tables) + "\n")
    quality.plot(state, out / f"quality-{preset}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-hour", choices=sorted(quality.PRESETS))
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--config", help="TOML file of overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report", type=Path, help="write the public results, table and plot here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--analyse-only", action="store_true",
                        help="run nothing: tables and report from what --work has evaluated so far")
    args = parser.parse_args()
    config = quality.load_config(args.preset, overrides(args))
    if args.analyse_only:
        state = quality.analyse_saved(args.work, config, args.preset)
    else:
        state = quality.run_study(args.work, config, args.preset, progress=not args.quiet)
    print(quality.markdown_table(state))
    print(json.dumps(state["stage_seconds"]))
    if args.report:
        report(state, args.report, args.preset)


if __name__ == "__main__":
    main()
