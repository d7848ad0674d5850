"""How the demo's stage-2 settings are chosen: on out-of-fold validation of development seeds, never on test truth.

    python bench/demo_choices.py                           # development seeds 1 2 3 under /tmp/ihd-choices
    python bench/demo_choices.py --seeds 1 2 --candidate "--layers 1 --units 64"

For each development seed, demo.py's first two stages (the synthetic dataset and a CNN per fold), then,
for every candidate setting of the LSTM, train_lstm.py with the demo's selections on a copy of the
CNN runs: the fold ensemble scores each candidate out of fold, every labeled series by the member
that did not train on it. A candidate's score is its out-of-fold validation weighted log loss averaged
over the demo's selections and the seeds; the lowest wins. Two more candidates then start from the
grid's winner: with `--neighbour-differences`, and on features cached with `--tta flip` (each
member's features extracted again into features-flip/). No test truth is read. Seeds 101 and up are
left for bench/seeds.py, which reports the chosen settings on test once.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
import train_cnn  # noqa: E402
import train_lstm  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.ensemble import read_ensemble  # noqa: E402

# The candidates: the LSTM's depth and width (the paper's 3x256 among them) and its dropout.
SIZES = (("1", "64"), ("2", "128"), ("3", "256"))
DROPOUTS = ("0.3", "0.5")
CHAIN = demo.chain_record("folds", "cnn")  # what every candidate shares (the selections are a flag, in each row)
CANDIDATES = [f"--layers {layers} --units {units} --dropout {dropout}"
              for (layers, units), dropout in itertools.product(SIZES, DROPOUTS)]


def prepare_seed(seed: int, root: Path) -> None:
    """The demo's dataset and CNN runs for one seed (resumable: done stages are skipped by the stages)."""
    settings = demo.parse_args(["--seed", str(seed), "--root", str(root)])
    for module, flags in demo.stages(settings)[:2]:
        module.main(flags)


def candidate_models(root: Path, candidate: str) -> Path:
    """A models folder for one candidate: the CNN runs without any LSTM (copied once)."""
    folder = root / ("models-" + "_".join(candidate.replace("--", "").split()))
    if not folder.exists():
        shutil.copytree(root / "models", folder, ignore=shutil.ignore_patterns("lstm-*", "ablation.*"))
    return folder


def flipped_features(seed: int, root: Path) -> Path:
    """Every member's features extracted again with ``--tta flip`` into features-flip/ (resumable)."""
    settings = demo.parse_args(["--seed", str(seed), "--root", str(root)])
    dirs = demo.folders(settings)
    for member in read_ensemble(dirs["--models-dir"], demo.RUN)["members"]:
        train_cnn.main(["--dataset", demo.DATASET, "--run", member, "--extract-only", "--tta", "flip",
                        "--data-dir", dirs["--data-dir"], "--models-dir", dirs["--models-dir"],
                        "--features-dir", str(root / "features-flip")])
    return root / "features-flip"


def score_candidate(seed: int, root: Path, candidate: str, selection_names: list[str]) -> dict[str, float]:
    """Out-of-fold validation weighted log loss of each selection under ``candidate`` (LSTM flags, and
    ``--tta flip`` for features cached that way)."""
    models = candidate_models(root, candidate)
    selections = [item for name in selection_names for item in ("--selection", name)]
    flags = candidate.split()
    features = root / "features"
    if "--tta" in flags:
        at = flags.index("--tta")
        features = flipped_features(seed, root) if flags[at + 1] == "flip" else features
        del flags[at : at + 2]
    table = train_lstm.main(["--run", demo.RUN, *selections, *flags, "--models-dir", str(models),
                             "--features-dir", str(features)])
    return {name: float(table.loc[f"cnn+lstm {name}", "weighted_log_loss"]) for name in selection_names} | {
        "cnn": float(table.loc["cnn", "weighted_log_loss"])}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", default="/tmp/ihd-choices")
    parser.add_argument("--candidate", action="append", help="LSTM flags to score; repeatable (default: the grid)")
    parser.add_argument("--selection", dest="selections", action="append",
                        help=f"repeatable; default the demo's ({' '.join(demo.SELECTIONS)})")
    args = parser.parse_args(argv)
    selections = args.selections or list(demo.SELECTIONS)
    candidates = args.candidate or CANDIDATES
    if any(seed >= 101 for seed in args.seeds):
        raise SystemExit("seeds 101 and up are kept for bench/seeds.py's test report: choose on others")
    print(f"{cpu_description()}; {load_description()}", flush=True)
    rows = score_all(args.seeds, Path(args.root), candidates, selections, saved_rows(Path(args.root) / "choices.json"))
    if not args.candidate:
        best = ranked(rows).index[0]
        rows = score_all(args.seeds, Path(args.root), [f"{best} --neighbour-differences", f"{best} --tta flip"],
                         selections, rows)
    summary = ranked(rows)
    print(f"{cpu_description()}; {load_description()}")
    table = pd.DataFrame(rows)
    print(f"CNN alone, out of fold, mean over seeds: {table.groupby('seed')['cnn'].first().mean():.4f}")
    print(summary.to_string(float_format="%.4f"))
    print(f"chosen: {summary.index[0]}")
    return summary


def score_all(seeds: list[int], root: Path, candidates: list[str], selections: list[str], rows: list[dict]) -> list[dict]:
    """``rows`` (the scores saved so far) and, for every seed and candidate not scored yet, its scores, saved to
    <root>/choices.json as they come: a rerun resumes."""
    rows = list(rows)
    for seed in seeds:
        seed_root = root / f"seed-{seed}"
        prepare_seed(seed, seed_root)
        for candidate in candidates:
            if any(r["seed"] == seed and r["candidate"] == candidate for r in rows):
                continue
            rows.append({"seed": seed, "candidate": candidate, "chain": CHAIN,
                         **score_candidate(seed, seed_root, candidate, selections)})
            (root / "choices.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def saved_rows(path: Path) -> list[dict]:
    """The scores saved at ``path`` by a run of the same demo chain (``CHAIN``); those of another are dropped, and said."""
    rows = json.loads(path.read_text()) if path.exists() else []
    kept = [row for row in rows if row.get("chain") == CHAIN]
    if len(kept) < len(rows):
        print(f"{path}: {len(rows) - len(kept)} saved scores were made with other demo settings than "
              f"{CHAIN}: scored again", flush=True)
    return kept


def ranked(rows: list[dict]) -> pd.DataFrame:
    """Candidates by their mean out-of-fold validation loss (over selections, then seeds), best first."""
    table = pd.DataFrame(rows)
    selections = [c for c in table.columns if c not in ("seed", "candidate", "cnn", "chain")]
    table["mean_over_selections"] = table[selections].mean(axis=1)
    summary = table.groupby("candidate")[[*selections, "mean_over_selections"]].mean().sort_values("mean_over_selections")
    summary["spread_over_seeds"] = table.groupby("candidate")["mean_over_selections"].std()
    summary["seeds"] = table.groupby("candidate")["seed"].nunique()
    return summary


if __name__ == "__main__":
    main()
