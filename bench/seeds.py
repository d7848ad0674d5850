"""The demo chain on fresh synthetic seeds: its test scores as mean and spread, and the feature-selection
ablation against its random control.

    python bench/seeds.py                          # seeds 101 102 103 under /tmp/ihd-seeds
    python bench/seeds.py --seeds 7 8 9 --root /tmp/seeds --keep

For each seed, `demo.py` with its own settings (which pick the CNN+LSTM selection by out-of-fold
validation loss), then one more LSTM per member on `random:<k>` (k of the demo's first selection)
with the same settings: the control every selection must beat. `predict.py` then scores every
selection on the test truth. Nothing here feeds back into a choice: the demo's settings were chosen on
development seeds (bench/demo_choices.py), and these seeds are used once, for this report.
Prints one row per seed and the mean and standard deviation over seeds, and writes them to
<root>/seeds.json.
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
    """The demo on one seed, its random control, and every selection's validation and test scores."""
    settings = demo.parse_args(["--seed", str(seed), "--root", str(root), "--gradcam", "0"])
    started = time.perf_counter()
    demo.main(["--seed", str(seed), "--root", str(root), "--gradcam", "0"])
    demo_seconds = time.perf_counter() - started
    picked = predict_selection(root)
    control = control_selection(settings.selections)
    control_settings = demo.parse_args(["--seed", str(seed), "--root", str(root), "--selection", control])
    _, lstm_flags = demo.stages(control_settings)[2]
    train_lstm.main(lstm_flags)
    ablation = pd.read_csv(root / "models" / demo.RUN / "ablation.csv", index_col="model")
    dirs = [flag for pair in demo.folders(settings).items() for flag in pair]
    rows = {}
    for selection in [*settings.selections, control]:
        predict.main(["--run", demo.RUN, "--selection", selection, *dirs])
        scores = json.loads((root / "submissions" / f"{demo.RUN}-{selection_slug(selection)}-scores.json").read_text())
        rows[selection] = {"validation": float(ablation.loc[f"cnn+lstm {selection}", "weighted_log_loss"]),
                           "test": scores["scores"]["cnn+lstm"]}
    scores = rows[picked]
    test = json.loads((root / "submissions" / f"{demo.RUN}-{selection_slug(picked)}-scores.json").read_text())["scores"]
    return {"seed": seed, "demo_seconds": demo_seconds, "picked": picked, "prior": test["prior"], "cnn": test["cnn"],
            "cnn_lstm": scores["test"], "gain": 1 - scores["test"] / test["cnn"],
            "validation_cnn": float(ablation.loc["cnn", "weighted_log_loss"]), "selections": rows}


def predict_selection(root: Path) -> str:
    """The selection the demo's predict.py picked (from its submission's scores)."""
    return json.loads(next((root / "submissions").glob(f"{demo.RUN}-*-scores.json")).read_text())["selection"]


def report(results: list[dict], control: str) -> str:
    """Markdown: one row per seed, then mean and standard deviation over seeds."""
    selections = list(results[0]["selections"])
    lines = ["| seed | prior | CNN ensemble | CNN+LSTM (picked) | gain over CNN | "
             + " | ".join(f"{s} val / test" for s in selections) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(selections)]
    for r in results:
        cells = " | ".join(f"{r['selections'][s]['validation']:.4f} / {r['selections'][s]['test']:.4f}" for s in selections)
        lines.append(f"| {r['seed']} | {r['prior']:.4f} | {r['cnn']:.4f} | {r['cnn_lstm']:.4f} ({r['picked']}) | "
                     f"{100 * r['gain']:.1f}% | {cells} |")
    for name, function in (("mean", np.mean), ("std", np.std)):
        cells = " | ".join(f"{function([r['selections'][s]['validation'] for r in results]):.4f} / "
                           f"{function([r['selections'][s]['test'] for r in results]):.4f}" for s in selections)
        lines.append(f"| {name} | {function([r['prior'] for r in results]):.4f} | {function([r['cnn'] for r in results]):.4f} | "
                     f"{function([r['cnn_lstm'] for r in results]):.4f} | {100 * function([r['gain'] for r in results]):.1f}% | "
                     f"{cells} |")
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
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, root / f"seed-{seed}"))
        if not args.keep:
            shutil.rmtree(root / f"seed-{seed}")
    control = control_selection(demo.SELECTIONS)
    table = report(results, control)
    (root / "seeds.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{cpu_description()}; {load_description()}")
    print(table)
    return results


if __name__ == "__main__":
    main()
