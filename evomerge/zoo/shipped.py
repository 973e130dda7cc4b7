"""The demo zoo as shipped data: the folders `evomerge zoo` built once, copied into place by
`evomerge demo` in a moment instead of two minutes of training (and the same numbers on every CPU:
the training's float sums depend on the CPU's kernels, a given zoo's scores much less).

Rebuild it after changing the zoo's recipe (`tests/test_shipped_zoo.py` fails until then):

    evomerge zoo runs/zoo && python -m evomerge.zoo.shipped runs/zoo

Size: four 0.6M-parameter float32 models and four router models, about 10 MB.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from evomerge.zoo.demo import SKILLS

SHIPPED = Path(__file__).resolve().parent / "demo_zoo"
MODELS = ("base", *SKILLS)


def install_shipped_zoo(out_dir: str | Path) -> dict[str, Path]:
    """Copy the shipped zoo to `out_dir` (zoo.json's router paths made absolute, as a build writes
    them); return `{"base": path, "<skill>": path}` like `build_zoo`."""
    out = Path(out_dir)
    if not (SHIPPED / "zoo.json").is_file():
        raise FileNotFoundError(f"{SHIPPED}: no shipped demo zoo in this installation")
    out.mkdir(parents=True, exist_ok=True)
    for item in [*MODELS, "routers"]:
        shutil.copytree(SHIPPED / item, out / item, dirs_exist_ok=True)
    meta = json.loads((SHIPPED / "zoo.json").read_text(encoding="utf-8"))
    meta["routers"] = {name: str(out / path) for name, path in meta["routers"].items()}
    meta["shipped"] = True
    (out / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {name: out / name for name in MODELS}


def ship(built: str | Path) -> Path:
    """Replace the shipped zoo with the zoo `evomerge zoo` built in `built` (a full build)."""
    built = Path(built)
    meta = json.loads((built / "zoo.json").read_text(encoding="utf-8"))
    if meta.get("quick"):
        raise ValueError(f"{built}: a quick zoo (--quick); ship a full build")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    SHIPPED.mkdir(parents=True)
    for item in [*MODELS, "routers"]:
        shutil.copytree(built / item, SHIPPED / item)
    meta["routers"] = {name: f"routers/{name}" for name in meta["routers"]}
    (SHIPPED / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return SHIPPED


if __name__ == "__main__":
    print(ship(sys.argv[1]))
