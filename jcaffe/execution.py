"""How each layer of a net runs: the one resolver of execution choices.

``Config`` states what the user asked for (platform, layout, formulations, ``scan``); each
layer's ``setup`` says what it can do (``nhwc_ok``, ``formulation``: its convolution at its
size, ``scan_ok``: whether that runs at full speed inside a loop). :func:`resolve` turns both
into a frozen table, one :class:`LayerPlan` per layer, computed once when the net is built:

* ``layout``: ``"NHWC"`` when the net keeps the layer's bottoms channels-last (the net's
  layout is NHWC, the layer has an ``apply_nhwc`` and is no data layer), else ``"NCHW"``;
* ``formulation``: the (De)Convolution formulation that layout runs (``"im2col"``,
  ``"onednn"``, ``"xla"``), None for other layers;
* ``scan``: whether the layer runs at full speed inside ``lax.scan`` / ``fori_loop``.

``Net.apply``, the Solver (many iterations per dispatch or one), ``jcaffe time`` and the
``Convolutions run as ...`` log line all read this table.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Sequence

from jcaffe import log

_log = log.get_logger("solver")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer runs (see the module docstring)."""

    layout: str
    formulation: str | None
    scan: bool

    @property
    def channels_last(self) -> bool:
        return self.layout == "NHWC"


class ExecutionPlan(Mapping):
    """The frozen per-layer table: layer key -> :class:`LayerPlan`, in the net's order."""

    def __init__(self, plans: Mapping[str, LayerPlan]):
        self._plans = types.MappingProxyType(dict(plans))

    def __getitem__(self, key: str) -> LayerPlan:
        return self._plans[key]

    def __iter__(self):
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)

    @property
    def scan_ok(self) -> bool:
        """Every layer runs at full speed in a loop: train steps may be fused."""
        return all(p.scan for p in self._plans.values())

    def formulations(self) -> list[str]:
        """The distinct convolution formulations, sorted."""
        return sorted({p.formulation for p in self._plans.values() if p.formulation})

    def __repr__(self) -> str:
        return f"ExecutionPlan({dict(self._plans)!r})"


def resolve(layers: Sequence, layout: str) -> ExecutionPlan:
    """The execution plan of ``layers`` (built with a resolved ``Config``) in a net whose
    internal layout is ``layout``."""
    plans = {}
    for layer in layers:
        channels_last = layout == "NHWC" and layer.nhwc_ok and not layer.is_data
        formulation = (layer.formulation(channels_last)
                       if layer.type in ("Convolution", "Deconvolution") else None)
        plans[layer.name] = LayerPlan("NHWC" if channels_last else "NCHW", formulation,
                                      bool(layer.scan_ok(channels_last)))
    return ExecutionPlan(plans)


def log_formulation(plan: ExecutionPlan, platform: str) -> None:
    """Says how the convolutions run, and on CPU why not as oneDNN kernels if not."""
    from jcaffe import onednn

    convs = plan.formulations()
    if not convs:
        return
    status = onednn.available() if platform == "cpu" else None
    why = ""
    if "onednn" in convs:
        why = f" ({status.detail})"
    elif status is not None and not status.ok:
        why = f" (oneDNN kernels not used: {status.detail})"
    _log.info("Convolutions run as %s%s", ", ".join(convs), why)
