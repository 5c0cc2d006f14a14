"""Compare two output folders of bench/same_behaviour.sh: weights tensor by tensor, sample files byte by byte, json
fields and metrics.jsonl rows with times and paths aside. Prints one line per check and exits 1 if any differs.

    python bench/same_behaviour.py OUT_BEFORE OUT_AFTER

A weight file's bytes are not compared: safetensors writes its metadata in an order that changes from process to
process, so the same weights make different files (and reflow pairs' teacher_sha256, the hash of that file, differs
with them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMES = {"seconds", "date", "versions", "seconds_per_image", "samples_per_s", "max_memory_gib"}
PATHS = {"teacher", "weights", "teacher_sha256", "checkpoint"}
WEIGHTS = ["default/checkpoints/step_0003000/ema.safetensors", "default/checkpoints/step_0003000/model.safetensors",
           "mnist/checkpoints/step_0000020/ema.safetensors", "mnist/checkpoints/step_0000010/model.safetensors"]
FOLDERS = ["s_toy", "s_toy_heun", "s_toy_dopri", "s_toy_sde", "pairs_toy", "s_mnist", "s_mnist_inpaint",
           "default/samples", "mnist/samples"]


def without(row: dict, keys: set[str]) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


def checks(a: Path, b: Path):
    """(equal, what) for every check."""
    for rel in WEIGHTS:
        x, y = load_file(a / rel), load_file(b / rel)
        yield x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{rel}: {len(x)} tensors bitwise"
    for folder in FOLDERS:
        names = [sorted(p.name for p in (d / folder).iterdir() if p.suffix != ".json") for d in (a, b)]
        same = names[0] == names[1] and all((a / folder / n).read_bytes() == (b / folder / n).read_bytes()
                                            for n in names[0])
        yield same, f"{folder}: {len(names[0])} files byte for byte"
        for info in sorted((a / folder).glob("*.json")):
            x, y = (json.loads((d / folder / info.name).read_text()) for d in (a, b))
            yield without(x, TIMES | PATHS) == without(y, TIMES | PATHS), \
                f"{folder}/{info.name}: fields equal (date, paths aside)"
    for run in ("default", "mnist"):
        logs = [[without(json.loads(line), TIMES) for line in (d / run / "metrics.jsonl").read_text().splitlines()]
                for d in (a, b)]
        yield logs[0] == logs[1], f"{run}/metrics.jsonl: {len(logs[0])} rows equal (samples/s aside)"
        x, y = (json.loads((d / run / "eval/report.json").read_text())["rows"] for d in (a, b))
        yield len(x) == len(y) and all(r.keys() == s.keys() and without(r, TIMES | PATHS) == without(s, TIMES | PATHS)
                                       for r, s in zip(x, y)), \
            f"{run}/eval/report.json: {len(x)} rows, the same fields, each equal (seconds, date, versions, paths aside)"


def main() -> None:
    results = list(checks(Path(sys.argv[1]), Path(sys.argv[2])))
    for equal, what in results:
        print(("equal   " if equal else "DIFFERS ") + what)
    differ = sum(not equal for equal, _ in results)
    print("all equal" if not differ else f"{differ} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
