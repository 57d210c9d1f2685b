"""``python -m jcaffe.train SOLVER [flags]``: Caffe's ``caffe train`` (the command line lives in
``jcaffe.commands``).

    python -m jcaffe.train prototxt/lenet_solver.prototxt [--weights W] [--snapshot S] [--cpu]

``Trainer`` is the earlier name of :class:`jcaffe.solver.Solver`, and the pure step's names
(``jcaffe.train_step``) are importable from here too.
"""

from __future__ import annotations

import sys
from typing import Sequence

from jcaffe.solver import Solver
from jcaffe.train_step import (PRNGStreams, TrainState, init_state,  # noqa: F401
                               make_train_step, prng_streams, scan_steps, step_key)

Trainer = Solver


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jcaffe.train SOLVER [flags]`` is ``jcaffe train --solver=SOLVER [flags]``."""
    from jcaffe.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
