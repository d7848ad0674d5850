"""The demo chain on fresh synthetic seeds: its test scores as mean and spread, and the feature-selection
ablation against its random control.

    python bench/seeds.py                          # seeds 101 102 103 under /tmp/ihd-seeds
    python bench/seeds.py --seeds 7 8 9 --root /tmp/seeds --keep

For each seed, `demo.py` with its own settings (which pick the CNN+LSTM selection by out-of-fold
validation loss), then one more LSTM per member on `random:<k>` (k of the demo's first selection)
with the same settings: the control every selection must beat. `predict.py` then scores every
selection on the test truth. Nothing here feeds back into a choice: the demo's settings were chosen on
development seeds (bench/demo_choices.py), and these seeds are used once, for this report.
Prints one row per seed and the mean and standard deviation over seeds. Each finished seed is saved
to <root>/seeds.json at once with the demo settings that made it, and a rerun with the same root and
settings resumes after it (a seed saved under other settings runs again).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
import predict  # noqa: E402
import train_lstm  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.features import parse_selection, selection_slug  # noqa: E402


def control_selection(selections: list[str]) -> str:
    """``random:<k>`` with the size of the first selection that has one."""
    sizes = [parse_selection(name)[1] for name in selections if parse_selection(name)[1]]
    return f"random:{sizes[0] if sizes else 32}"


def run_seed(seed: int, root: Path) -> dict:
    """The demo on one seed, its random control, every selection's validation and test scores, and what
    the demo's first member run alone scores on test."""
    argv = ["--seed", str(seed), "--root", str(root), "--gradcam", "0"]
    settings = demo.parse_args(argv)
    started = time.perf_counter()
    demo.main(argv)
    demo_seconds = time.perf_counter() - started
    picked = predict_selection(root)
    control = control_selection(settings.selections)
    _, lstm_flags = demo.stages(demo.parse_args([*argv, "--selection", control]))[2]
    train_lstm.main(lstm_flags)
    ablation = pd.read_csv(root / "models" / demo.RUN / "ablation.csv", index_col="model")
    dirs = [flag for pair in demo.folders(settings).items() for flag in pair]
    selections = {}
    for selection in [*settings.selections, control]:
        test = test_scores(root, demo.RUN, selection, dirs)
        selections[selection] = {"validation": float(ablation.loc[f"cnn+lstm {selection}", "weighted_log_loss"]),
                                 "test": test["cnn+lstm"]}
    ensemble = test_scores(root, demo.RUN, picked, dirs)
    alone = test_scores(root, f"{demo.RUN}-fold0", picked, dirs)
    return {"seed": seed, "demo_seconds": demo_seconds, "picked": picked, "prior": ensemble["prior"],
            "cnn": ensemble["cnn"], "cnn_lstm": ensemble["cnn+lstm"], "gain": 1 - ensemble["cnn+lstm"] / ensemble["cnn"],
            "fold0_cnn": alone["cnn"], "fold0_cnn_lstm": alone["cnn+lstm"],
            "validation_cnn": float(ablation.loc["cnn", "weighted_log_loss"]), "selections": selections}


def test_scores(root: Path, run: str, selection: str, dirs: list[str]) -> dict:
    """predict.py's test scores of one run and selection (prior, cnn, cnn+lstm)."""
    predict.main(["--run", run, "--selection", selection, *dirs])
    path = root / "submissions" / f"{run}-{selection_slug(selection)}-scores.json"
    return json.loads(path.read_text())["scores"]


def predict_selection(root: Path) -> str:
    """The selection the demo's predict.py picked (from its submission's scores)."""
    return json.loads(next((root / "submissions").glob(f"{demo.RUN}-*-scores.json")).read_text())["selection"]


def report(results: list[dict], control: str) -> str:
    """Markdown: one row per seed, then mean and standard deviation over seeds."""
    selections = list(results[0]["selections"])
    lines = ["| seed | prior | CNN ensemble | CNN+LSTM ensemble (picked) | gain over CNN | fold 0 alone: CNN / CNN+LSTM | "
             + " | ".join(f"{s} val / test" for s in selections) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(selections)]
    for r in results:
        cells = " | ".join(f"{r['selections'][s]['validation']:.4f} / {r['selections'][s]['test']:.4f}" for s in selections)
        lines.append(f"| {r['seed']} | {r['prior']:.4f} | {r['cnn']:.4f} | {r['cnn_lstm']:.4f} ({r['picked']}) | "
                     f"{100 * r['gain']:.1f}% | {r['fold0_cnn']:.4f} / {r['fold0_cnn_lstm']:.4f} | {cells} |")
    for name, function in (("mean", np.mean), ("std", np.std)):
        def over(key):
            return function([r[key] for r in results])

        cells = " | ".join(f"{function([r['selections'][s]['validation'] for r in results]):.4f} / "
                           f"{function([r['selections'][s]['test'] for r in results]):.4f}" for s in selections)
        lines.append(f"| {name} | {over('prior'):.4f} | {over('cnn'):.4f} | {over('cnn_lstm'):.4f} | "
                     f"{100 * over('gain'):.1f}% | {over('fold0_cnn'):.4f} / {over('fold0_cnn_lstm'):.4f} | {cells} |")
    beats = [s for s in selections if s != control
             and np.mean([r["selections"][s]["test"] for r in results]) < np.mean([r["selections"][control]["test"] for r in results])]
    lines.append(f"\nSelections whose mean test loss beats the {control} control: {', '.join(beats) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--root", default="/tmp/ihd-seeds")
    parser.add_argument("--keep", action="store_true", help="keep each seed's folders (deleted otherwise)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    print(f"{cpu_description()}; {load_description()}", flush=True)
    saved = root / "seeds.json"
    chain = demo.chain_record("folds", "cnn", "lstm", "selections")
    done = {r["seed"]: r for r in json.loads(saved.read_text()) if r.get("chain") == chain} if saved.exists() else {}
    for seed in args.seeds:
        if seed not in done:  # a rerun resumes after the last finished seed
            done[seed] = run_seed(seed, root / f"seed-{seed}") | {"chain": chain}
            saved.write_text(json.dumps(list(done.values()), indent=2) + "\n")
        if not args.keep and (root / f"seed-{seed}").exists():
            shutil.rmtree(root / f"seed-{seed}")
    results = [done[seed] for seed in args.seeds]
    control = control_selection(demo.SELECTIONS)
    table = report(results, control)
    print(f"{cpu_description()}; {load_description()}")
    print(table)
    return results


if __name__ == "__main__":
    main()
