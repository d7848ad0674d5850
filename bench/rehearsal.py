"""A rehearsal at scale: a synthetic dataset of about a tenth of the real one through every stage.

    python bench/rehearsal.py                              # 1,950 training + 350 test studies, ~87,000 slices
    python bench/rehearsal.py --scale 0.01 --root /tmp/r1  # the same chain on a hundredth, to compare

Each stage runs as the command a user types, in its own process: the synthetic generator (real-size
512x512 DICOM files), `prepare_data.py` (index and slice store), `train_cnn.py` (a tiny CNN, one fold,
then the embeddings of every slice), `train_lstm.py` (the demo's LSTM on the demo's first selection) and
`predict.py` (the test set's submission, validated, with a few Grad-CAM pictures). For each stage:
wall time, and peak memory as the largest sum of proportional set sizes (PSS) over the stage's process
tree (its workers included), sampled every half second, beside the largest single process's peak
resident set; and how busy the stage kept the cores (the CPU time of its processes, sampled alike,
over wall time and cores). A stage's seconds per 1,000 slices and its peak memory at two scales say
what grows with the dataset and what the full 874,035 slices cost on this machine.

Results go to <root>/rehearsal.json as each stage ends, with the command that made it; a rerun skips
stages already measured with the same command. A stage that was interrupted and rerun resumes its own
work, so its time covers only the rest: it is marked "resumed".
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.flags import positive_float  # noqa: E402
from ihd.io import read_json, write_json  # noqa: E402

REAL_SLICES = 874_035
TENTH = (1_950, 350)  # synthetic studies hold ~38 slices, a little more than real ones: ~87,000 slices
RUN = "rehearsal"
CNN = ["--backbone", "tiny", "--weights", "none", "--image-size", "128", "--epochs", "1", "--fold", "0"]
SAMPLE_SECONDS = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def process_usage(pid: int) -> tuple[int, int, float] | None:
    """(PSS bytes now, peak resident bytes, CPU seconds so far) of one process; None when it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            pss = next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
        with open(f"/proc/{pid}/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, StopIteration):
        return None
    return pss, peak, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime


class TreeUsage(threading.Thread):
    """Samples a process tree until stopped: ``peak_pss`` is the largest summed PSS seen, ``largest`` the
    largest peak resident set of one process, ``cpu_seconds`` the CPU time of every process seen (as
    last sampled: up to ``SAMPLE_SECONDS`` of each process's last moments are missed)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_pss, self.largest, self.done = pid, 0, 0, threading.Event()
        self.cpu: dict[int, float] = {}

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            total = 0
            for pid in process_tree(self.pid):
                usage = process_usage(pid)
                if usage is not None:
                    total += usage[0]
                    self.largest = max(self.largest, usage[1])
                    self.cpu[pid] = usage[2]
            self.peak_pss = max(self.peak_pss, total)


def measure(command: list[str], log: Path) -> dict:
    """Run ``command`` with its output in ``log``; its wall time, CPU time and peak memory. Exits on failure."""
    print(f"\n$ {' '.join(command)}   (output in {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeUsage(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        sampler.done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[1]} failed: see {log}")
    # wait4's ru_maxrss: the largest of the process and its waited-for descendants (not a pool's workers,
    # which the forkserver waits for; the sampler sees those)
    return {"seconds": round(seconds, 1), "cpu_seconds": round(sampler.cpu_seconds, 1),
            "peak_tree_pss_bytes": sampler.peak_pss,
            "largest_process_rss_bytes": max(sampler.largest, usage.ru_maxrss * 1024)}


def stage_commands(root: Path, train_studies: int, test_studies: int) -> list[tuple[str, list[str]]]:
    """Each stage's name and command line."""
    python = sys.executable
    settings = demo.parse_args(["--root", str(root)])
    dirs = demo.folders(settings)
    raw = Path(dirs["--data-dir"]) / demo.DATASET / "raw"
    size = ["--train-studies", str(train_studies), "--test-studies", str(test_studies)]

    def flags(*names: str) -> list[str]:
        return [item for name in names for item in (name, dirs[name])]

    return [
        ("generate", [python, "-m", "ihd.synthetic", "--out", str(raw), *size]),
        ("prepare", [python, "prepare_data.py", "--synthetic", "--dataset", demo.DATASET, *size, "--size", "128",
                     "--folds", str(demo.FOLDS), *flags("--data-dir")]),
        ("train_cnn", [python, "train_cnn.py", "--dataset", demo.DATASET, "--run", RUN, *CNN,
                       *flags("--data-dir", "--models-dir", "--features-dir")]),
        ("train_lstm", [python, "train_lstm.py", "--run", RUN, "--selection", demo.SELECTIONS[0], *demo.LSTM,
                        *flags("--models-dir", "--features-dir")]),
        ("predict", [python, "predict.py", "--run", RUN, "--gradcam", "2", "--gradcam-studies", "4",
                     *flags("--data-dir", "--models-dir", "--features-dir", "--submissions-dir")]),
    ]


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def dataset_slices(root: Path) -> int:
    """Slices in the prepared dataset's index."""
    import pandas as pd
    return len(pd.read_parquet(root / "data" / demo.DATASET / "index.parquet", columns=["image_id"]))


def report(record: dict) -> None:
    """A Markdown table of the stages, with each stage's cost per 1,000 slices and at the real size."""
    slices = record.get("slices")
    print(f"\n{record['studies']:,} studies, {slices or '?'} slices; {record['machine']}")
    print("| stage | wall time | CPU busy | epochs | s per 1,000 slices | at 874,035 slices (this CPU) "
          "| peak memory (tree PSS) | largest process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in record["stages"].items():
        if "seconds" not in result:
            continue
        per_k = result["seconds"] / slices * 1000 if slices else float("nan")
        hours = per_k * REAL_SLICES / 1000 / 3600
        resumed = " (resumed)" if result.get("resumed") else ""
        busy = f"{result['cpu_seconds'] / result['seconds'] / os.cpu_count():.0%}" if "cpu_seconds" in result else ""
        memory = [result[key] / 2**30 for key in ("peak_tree_pss_bytes", "largest_process_rss_bytes")]
        print(f"| {name}{resumed} | {result['seconds'] / 60:.1f} min | {busy} | {result.get('epochs', '')} | "
              f"{per_k:.2f} | {hours:.1f} h | {memory[0]:.2f} GB | {memory[1]:.2f} GB |")
    for name, size in record.get("sizes", {}).items():
        print(f"{name}: {size / 2**20:,.0f} MB on disk")


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the rehearsal and print its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ihd-rehearsal"))
    parser.add_argument("--scale", type=positive_float, default=0.1,
                        help="the fraction of the real study count; 0.1 is the rehearsal")
    args = parser.parse_args(argv)
    train_studies, test_studies = (max(1, round(n * args.scale / 0.1)) for n in TENTH)
    args.root.mkdir(parents=True, exist_ok=True)
    path = args.root / "rehearsal.json"
    record = read_json(path) if path.is_file() else {}
    if record.get("studies") != train_studies + test_studies:
        record = {"studies": train_studies + test_studies, "stages": {}}
    record["machine"] = f"{cpu_description()}; {load_description()}"
    for name, command in stage_commands(args.root, train_studies, test_studies):
        done = record["stages"].get(name, {})
        if done.get("command") == command and "seconds" in done:
            print(f"{name}: measured before, {done['seconds']:.0f} s")
            continue
        resumed = done.get("command") == command  # started with this command before, never finished
        record["stages"][name] = {"command": command, "resumed": resumed}
        write_json(path, record)
        record["stages"][name].update(measure(command, args.root / f"{name}.log"))
        if name == "prepare":
            record["slices"] = dataset_slices(args.root)
        if name.startswith("train"):
            log = (args.root / f"{name}.log").read_text()
            # the line that ends each epoch, not the progress lines within it ("epoch 1: step ...")
            record["stages"][name]["epochs"] = len(re.findall(r"^epoch \d+: (?!step)", log, re.MULTILINE))
        write_json(path, record)
        result = record["stages"][name]
        print(f"{name}: {result['seconds'] / 60:.1f} min, peak memory {result['peak_tree_pss_bytes'] / 2**30:.2f} GB",
              flush=True)
    data = args.root / "data" / demo.DATASET
    record["sizes"] = {"raw DICOM": folder_bytes(data / "raw"), "slice store and index": folder_bytes(data) -
                       folder_bytes(data / "raw"), "embeddings": folder_bytes(args.root / "features")}
    write_json(path, record)
    report(record)
    return record


if __name__ == "__main__":
    main()
