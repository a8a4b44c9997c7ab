"""One rank of a local data-parallel run, started by torchrun (no service needed):

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m icd_core.ddp_main spec.yaml out/ [--resume]

Every rank runs `run_spec` with its `RankGroup`; rank 0 writes the run folder. Started without
torchrun it is one plain process (no DDP): the baseline a group is compared against. `--stop-at K` stops
cooperatively after step K (checkpointed, as a cancel would), for resume checks.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .engine.callbacks import Callback, TrainingStopped
from .engine.distributed import DEFAULT_TIMEOUT_S, TORCHRUN, RankGroup, die_with_parent, in_torchrun
from .runner import run_spec
from .spec import load_spec


class StopAtStep(Callback):
    """Ask for a stop once step `at` is done."""

    def __init__(self, at: int):
        self.at = at
        self.step = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step

    def should_stop(self) -> bool:
        return self.step >= self.at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--stop-at", type=int, default=None)
    timeout = float(os.environ.get("ICD_DDP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    parser.add_argument("--timeout-s", type=float, default=timeout, help="collective timeout (lost peer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"rank {os.environ.get('RANK', '?')} %(levelname)s %(message)s")
    if in_torchrun():
        die_with_parent(TORCHRUN)
    spec = load_spec(args.spec)
    group = RankGroup.join(spec.device, args.timeout_s) if in_torchrun() else None
    main_rank = group is None or group.is_main
    callbacks = [StopAtStep(args.stop_at)] if args.stop_at is not None and main_rank else []
    try:
        run_spec(spec, args.output_dir, callbacks=callbacks, resume=args.resume, cache_dir=args.cache_dir, group=group)
    except TrainingStopped as stop:
        logging.info("stopped at step %d", stop.step)
    finally:
        if group is not None:
            group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
