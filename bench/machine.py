"""The machine a benchmark ran on, named the same way in every table.

    python bench/machine.py    # prints the CPU, the cores and the load now
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ihd.parallel import available_cores  # noqa: E402


def cpu_model() -> str:
    """The CPU model named in /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_description() -> str:
    """CPU model and the cores this process may use."""
    return f"{cpu_model()}, {available_cores()} cores"


def device_description() -> str:
    """The GPU TensorFlow computes on, or the CPU when it sees none."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        return f"GPU: {name} (x{len(gpus)}); host CPU: {cpu_description()}"
    return f"CPU: {cpu_description()}"


def load_description() -> str:
    """The load averages (runnable processes over 1, 5 and 15 minutes) beside the cores: above the
    core count, other work shared the machine during the measurement."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f}, {five:.1f}, {fifteen:.1f} (1, 5, 15 min) on {available_cores()} cores"


if __name__ == "__main__":
    print(f"{cpu_description()}; {load_description()}")
