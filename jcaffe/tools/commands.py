"""``jcaffe`` commands for the tools around training: ``parse_log``, ``plot_training_log``,
``draw_net``, ``classify`` and ``extract_features``.

Each command's module is imported when the command runs, so that ``jcaffe help`` stays cheap.
"""

from __future__ import annotations

import importlib

from jcaffe.cli import register_command

_TOOLS = {
    "parse_log": ("jcaffe.tools.parse_log",
                  "parse a training log into LOG.train / LOG.test CSV tables: LOG OUTDIR"),
    "plot_training_log": ("jcaffe.tools.plot_training_log",
                          "plot training logs (test accuracy/loss, lr, train loss): "
                          "CHART_TYPE OUT.png LOG..."),
    "draw_net": ("jcaffe.tools.draw_net",
                 "draw a net as a graph (png/svg/dot): NET OUT [--rankdir] [--phase]"),
    "classify": ("jcaffe.tools.classify",
                 "classify images with a trained model: INPUT [OUTPUT.npy] --model_def --pretrained_model"),
    "extract_features": ("jcaffe.tools.extract_features",
                         "write blobs of a net for N batches to datasets: "
                         "WEIGHTS NET BLOBS DBS NUM_BATCHES"),
}


def _command(module: str):
    def command(argv) -> int:
        return importlib.import_module(module).main(list(argv))

    return command


for _name, (_module, _help) in _TOOLS.items():
    register_command(_name, _help)(_command(_module))
