"""``python -m tools.bench <name> [--out_dir output/bench] [--quick]`` with name in BENCHMARKS or ``all``."""

from __future__ import annotations

import importlib

import fire

BENCHMARKS = ("sinkhorn", "cost_volume", "cost_volume_window", "specknet", "botm", "lssc", "lssc3d", "pacs",
              "registration3d")


def _runner(name: str):
    def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3):
        return importlib.import_module(f"tools.bench.{name}").run(
            out_dir=out_dir, quick=quick, device=device, repeats=repeats
        )

    run.__doc__ = f"Run the {name} benchmark."
    return run


def run_all(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3):
    """Run every benchmark in turn."""
    return {name: _runner(name)(out_dir=out_dir, quick=quick, device=device, repeats=repeats) for name in BENCHMARKS}


def main() -> None:
    fire.Fire({**{n: _runner(n) for n in BENCHMARKS}, "all": run_all})


if __name__ == "__main__":
    main()
