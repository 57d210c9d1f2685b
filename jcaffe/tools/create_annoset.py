"""The SSD fork's ``create_annoset`` / ``convert_annoset``: images with VOC-style XML
annotations into an LMDB of ``AnnotatedDatum`` records (what the AnnotatedData layer reads).

    python -m jcaffe.tools.create_annoset --label_map_file labelmap.prototxt \\
        ROOT/ LIST_FILE DB_NAME

``LIST_FILE`` lines are ``image_path xml_path`` (relative to ``ROOT``), as the fork's
``create_list.sh`` writes them. Each record, keyed ``%08d_<image_path>``: the image file's
own bytes as an encoded Datum (label -1, as the fork), annotation type BBOX, one
AnnotationGroup per label in order of first appearance, each object's box normalized by the
XML's ``size`` (``xmin / width`` ...), ``difficult`` from the XML, ``instance_id`` counting
within its group (the fork's ReadXMLToAnnotatedDatum). An object whose name the label map
does not know is an error naming the XML file; an XML without ``size`` takes the image's.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from typing import Callable, Sequence

from jcaffe.errors import DataError, JcaffeError
from jcaffe.proto import ssd_pb2


def read_voc_xml(path: str, name_to_label: dict[str, int], image_hw=None
                 ) -> list[ssd_pb2.AnnotationGroup]:
    """The AnnotationGroups of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: cannot read the annotation: {e}") from None
    try:
        width = int(root.findtext("size/width"))
        height = int(root.findtext("size/height"))
    except (TypeError, ValueError):
        if image_hw is None:
            raise DataError(f"{path}: no valid size/width and size/height") from None
        height, width = image_hw
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: no valid image width/height")
    groups: list[ssd_pb2.AnnotationGroup] = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in name_to_label:
            raise DataError(f"{path}: unknown object name '{name}' (not in the label map)")
        label = name_to_label[name]
        group = next((g for g in groups if g.group_label == label), None)
        if group is None:
            group = ssd_pb2.AnnotationGroup(group_label=label)
            groups.append(group)
        inst = group.annotation[-1].instance_id + 1 if len(group.annotation) else 0
        anno = group.annotation.add(instance_id=inst)
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: object '{name}' has no bndbox")
        try:
            xmin, ymin, xmax, ymax = (int(float(box.findtext(k, "0")))
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DataError(f"{path}: object '{name}': bndbox coordinates are not numbers") \
                from None
        b = anno.bbox
        b.xmin, b.ymin = xmin / width, ymin / height
        b.xmax, b.ymax = xmax / width, ymax / height
        b.difficult = (obj.findtext("difficult") or "0").strip() == "1"
    return groups


def create_annoset(root_folder: str, list_file: str, db_name: str, label_map_file: str, *,
                   overwrite: bool = False, log: Callable[[str], None] = print) -> int:
    """Writes the AnnotatedDatum LMDB ``db_name``; returns the number of records."""
    from jcaffe.data.annotated import label_map
    from jcaffe.data.image import decode_image
    from jcaffe.data.sources import write_lmdb

    names = label_map(label_map_file)
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [(n, l.split()) for n, l in enumerate(f, start=1) if l.strip()]
    except OSError as e:
        raise DataError(f"{list_file}: cannot read: {e.strerror or e}") from None
    for n, parts in lines:
        if len(parts) != 2:
            raise DataError(f"{list_file}:{n}: expected 'image_path annotation_path', got "
                            f"{len(parts)} fields")

    def records():
        for i, (n, (img, xml)) in enumerate(lines):
            ipath, apath = os.path.join(root_folder, img), os.path.join(root_folder, xml)
            try:
                with open(ipath, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise DataError(f"{list_file}:{n}: image '{ipath}': {e.strerror or e}") from None
            pixels = decode_image(data, None, where=f"{list_file}:{n}: image '{ipath}'")
            ad = ssd_pb2.AnnotatedDatum(type=ssd_pb2.AnnotatedDatum.BBOX)
            d = ad.datum
            d.channels, d.height, d.width = pixels.shape[2] if pixels.ndim == 3 else 1, \
                pixels.shape[0], pixels.shape[1]
            d.data, d.encoded, d.label = data, True, -1
            if os.path.exists(apath):
                ad.annotation_group.extend(read_voc_xml(apath, names, pixels.shape[:2]))
            yield f"{i:08d}_{img}", ad.SerializeToString()

    count = write_lmdb(db_name, records(), overwrite=overwrite)
    log(f"Processed {count} files.")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="create_annoset", description=__doc__.split("\n")[0])
    p.add_argument("root_folder")
    p.add_argument("list_file")
    p.add_argument("db_name")
    p.add_argument("--label_map_file", "-label_map_file", required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        create_annoset(a.root_folder, a.list_file, a.db_name, a.label_map_file,
                       overwrite=a.overwrite)
    except JcaffeError as e:
        print(f"create_annoset: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
