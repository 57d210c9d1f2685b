"""jcaffe: Caffe's nets and solvers as pure, jit-compiled JAX functions.

Data flow: prototxt -> ``read_net`` / ``read_solver`` (upgraded to Caffe's current format) ->
``Net`` (layers as pure functions over a ``{layer name: [blobs]}`` pytree) -> the pure train
step (``jcaffe.train_step``) with Caffe's update rules as optax transformations
(``jcaffe.sgd_solvers``) -> compiled programs (``jcaffe.programs``) -> Caffe's Solver loop
(``jcaffe.Solver``) -> Caffe-style logs and ``.caffemodel`` / ``.solverstate`` snapshots.
"""

from __future__ import annotations

from jcaffe._lazy import lazy_attributes

__version__ = "0.1.0"

# Public names, imported on first use so that `import jcaffe` stays cheap.
_LAZY = {
    "read_net": "jcaffe.prototxt",
    "read_solver": "jcaffe.prototxt",
    "read_net_binary": "jcaffe.prototxt",
    "upgrade_net": "jcaffe.upgrade",
    "upgrade_solver": "jcaffe.upgrade",
    "filter_net": "jcaffe.netstate",
    "Net": "jcaffe.net",
    "Config": "jcaffe.config",
    "load_caffemodel": "jcaffe.caffemodel",
    "save_caffemodel": "jcaffe.caffemodel",
    "build_solver": "jcaffe.sgd_solvers",
    "learning_rate": "jcaffe.sgd_solvers",
    "Solver": "jcaffe.solver",
    "Trainer": "jcaffe.train",
    "JcaffeError": "jcaffe.errors",
    "Classifier": "jcaffe.classifier",
    "Detector": "jcaffe.classifier",
    "net_spec": "jcaffe.net_spec",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
