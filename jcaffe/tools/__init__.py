"""Caffe's command-line tools, reimplemented for jcaffe's datasets.

* ``python -m jcaffe.tools.convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``
* ``python -m jcaffe.tools.compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]``
* ``jcaffe.tools.upgrade_proto``: ``upgrade_net_proto_text`` / ``upgrade_net_proto_binary`` /
  ``upgrade_solver_proto_text`` (the ``jcaffe upgrade_*`` commands)

Around training (``jcaffe <command>``, registered by :mod:`jcaffe.tools.commands`):

* ``parse_log LOG OUTDIR`` (:mod:`~jcaffe.tools.parse_log`, Caffe's tools/extra/parse_log.py)
* ``plot_training_log CHART_TYPE OUT.png LOG...`` (:mod:`~jcaffe.tools.plot_training_log`)
* ``draw_net NET OUT`` (:mod:`~jcaffe.tools.draw_net`, Caffe's python/draw_net.py)
* ``classify INPUT [OUTPUT.npy]`` (:mod:`~jcaffe.tools.classify`, Caffe's python/classify.py)
* ``extract_features WEIGHTS NET BLOBS DBS NUM_BATCHES`` (:mod:`~jcaffe.tools.extract_features`)

:mod:`~jcaffe.tools.progress` draws the progress bars (on a terminal only).

Flags are spelled as in Caffe (gflags style: ``--gray``, ``-backend=lmdb``, ``--shuffle=true``).
Each module also has a function API (``convert_imageset``, ``compute_image_mean``) and
``main(argv) -> int``.
"""
