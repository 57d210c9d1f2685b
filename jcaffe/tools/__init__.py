"""Caffe's command-line tools, reimplemented for jcaffe's datasets.

* ``python -m jcaffe.tools.convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``
* ``python -m jcaffe.tools.compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]``
* ``jcaffe.tools.upgrade_proto``: ``upgrade_net_proto_text`` / ``upgrade_net_proto_binary`` /
  ``upgrade_solver_proto_text`` (the ``jcaffe upgrade_*`` commands)

Flags are spelled as in Caffe (gflags style: ``--gray``, ``-backend=lmdb``, ``--shuffle=true``).
Each module also has a function API (``convert_imageset``, ``compute_image_mean``) and
``main(argv) -> int``.
"""
