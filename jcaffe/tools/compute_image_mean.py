"""compute_image_mean: the mean image of a dataset, as Caffe's tool.

    python -m jcaffe.tools.compute_image_mean [--backend B] INPUT_DB [OUTPUT_FILE]

INPUT_DB is a jcaffe dataset, a Caffe LMDB or a Caffe LevelDB (detected from its contents;
``--backend`` is accepted for Caffe's scripts and only used in messages). Encoded images are decoded
natively, as Caffe. OUTPUT_FILE receives the mean as a ``[1, C, H, W]`` float ``BlobProto``
(``mean.binaryproto``), written atomically. The per-channel means are printed as Caffe prints them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import numpy as np

from jcaffe.errors import JcaffeError
from jcaffe.tools._flags import normalize

_BACKENDS = {"lmdb": 1, "leveldb": 0, "tensorstore": None}


def compute_image_mean(input_db: str, output_file: str | None = None, *,
                       backend: str | None = None,
                       log: Callable[[str], None] = print) -> np.ndarray:
    """Returns the mean ``[C, H, W]`` float32 of ``input_db``; writes ``output_file`` if given."""
    from jcaffe.data.mean import channel_means, image_mean, write_mean_binaryproto
    from jcaffe.data.sources import open_source

    with open_source(input_db, _BACKENDS.get(backend or "", None)) as src:
        log(f"Opened {src.kind} {input_db}")
        log("Starting iteration")
        reported = [0]

        def progress(done: int) -> None:
            while reported[0] + 10000 <= done:
                reported[0] += 10000
                log(f"Processed {reported[0]} files.")

        mean = image_mean(src, progress=progress)
        if src.count % 10000:
            log(f"Processed {src.count} files.")
    if output_file:
        log(f"Write to {output_file}")
        write_mean_binaryproto(output_file, mean)
    log(f"Number of channels: {mean.shape[0]}")
    for c, v in enumerate(channel_means(mean)):
        log(f"mean_value channel [{c}]: {v:.6g}")
    return mean


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = normalize(argv, (), ("backend",))
    p = argparse.ArgumentParser(prog="compute_image_mean",
                                description="Compute the mean image of a set of images given by "
                                            "a jcaffe dataset, an LMDB or a LevelDB.")
    p.add_argument("input_db", metavar="INPUT_DB")
    p.add_argument("output_file", metavar="OUTPUT_FILE", nargs="?")
    p.add_argument("--backend", choices=sorted(_BACKENDS), default=None,
                   help="the database kind (detected from INPUT_DB; accepted for Caffe's scripts)")
    args = p.parse_args(argv)
    try:
        compute_image_mean(args.input_db, args.output_file, backend=args.backend)
    except JcaffeError as e:
        print(f"compute_image_mean: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
