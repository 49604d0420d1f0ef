"""Shared helpers of the benchmarks: arguments, machine and version records, tables, JSON.

Benchmarks print ratios measured side by side in one run (alternating repetitions, medians),
never absolute pass/fail timings: the machines they run on are noisy and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--json OUT``, ``--data-dir``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small run (under two minutes)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write the figures to this JSON file")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"glue_data folder with the task TSVs (default: {DEFAULT_GLUE})",
    )
    return p


def glue_dir(arg: Path | None) -> Path:
    path = arg if arg is not None else DEFAULT_GLUE
    if not path.is_dir():
        sys.exit(f"GLUE data folder {path} does not exist; pass --data-dir")
    return path


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    from cache_store.manifest import library_versions

    return library_versions()


def command() -> str:
    """The command line that reproduces this run."""
    return " ".join(["python", "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return Path(sys.argv[0]).stem


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table; floats are printed as given (format them before)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(cells[0]), line, *(fmt(r) for r in cells[1:])])


def write_json(path: Path | None, name: str, figures: dict[str, Any]) -> None:
    """Write ``figures`` with the command, machine and library versions."""
    if path is None:
        return
    payload = {
        "benchmark": name,
        "command": command(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {path}")
