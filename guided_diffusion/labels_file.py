"""
Labels files: a CSV with the header `path,class`, one row per image, the path relative
to the data folder and the class a name (e.g. scripts/cluster_labels.py's `cluster_03`).
The third source of labels beside file-name prefixes and class sub-folders; as with
those, the labels number the sorted class names.
"""

import csv
import io
import posixpath

import blobfile as bf

from .file_writing import atomic_write

HEADER = ("path", "class")


def relative_path(path, folders):
    """
    :param path: an image path from image_datasets.list_image_files.
    :param folders: the sub-folder names between the data folder and the image.
    :return: the image's path relative to the data folder, with "/" separators.
    """
    return posixpath.join(*folders, bf.basename(path))


def read_labels_file(labels_file):
    """
    Read a labels file, refusing a wrong header, an empty or repeated path, an empty
    class and a file with fewer than two classes (guidance needs at least two).

    :param labels_file: the CSV's local path or blobfile URL.
    :return: a dict of relative image path -> class name, in file order.
    """
    if not bf.exists(labels_file):
        raise FileNotFoundError(f"labels_file={labels_file} does not exist")
    with bf.BlobFile(labels_file, "rb") as f:
        text = f.read().decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(cell.strip() for cell in rows[0]) != HEADER:
        raise ValueError(f"labels_file={labels_file}: expected the header 'path,class', "
                         f"found {','.join(rows[0]) if rows else 'an empty file'!r}")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"labels_file={labels_file} line {line}: expected 'path,class' with "
                             f"both filled, found {','.join(row)!r}")
        path = posixpath.normpath(row[0].strip())
        if path in labels:
            raise ValueError(f"labels_file={labels_file} line {line}: {path} is listed twice")
        labels[path] = row[1].strip()
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise ValueError(f"labels_file={labels_file} has {len(classes)} class "
                         f"({', '.join(classes) or 'no rows'}): guidance needs at least two")
    return labels


def class_names_from_file(entries, labels_file):
    """
    The class name of each image, from a labels file that lists exactly the images.

    :param entries: (path, folders) pairs from image_datasets.list_image_files.
    :param labels_file: the CSV (see read_labels_file).
    :return: a list of class names, one per entry.
    """
    labels = read_labels_file(labels_file)
    paths = [relative_path(path, folders) for path, folders in entries]
    unlisted = [path for path in paths if path not in labels]
    missing = sorted(set(labels) - set(paths))
    fix = "one row per image, each path relative to data_dir"
    if unlisted:
        raise ValueError(f"labels_file={labels_file} has no row for {len(unlisted)} images of the "
                         f"data folder: {_first(unlisted)}; expected {fix}")
    if missing:
        raise ValueError(f"labels_file={labels_file} lists {len(missing)} paths with no image in "
                         f"the data folder: {_first(missing)}; expected {fix}")
    return [labels[path] for path in paths]


def _first(paths, limit=5):
    """
    :return: the first few paths joined by commas, with the count of the others.
    """
    more = len(paths) - limit
    return ", ".join(paths[:limit]) + (f" and {more} more" if more > 0 else "")


def write_labels_file(labels_file, paths, class_names):
    """
    Write a labels file atomically.

    :param labels_file: the CSV's local path or blobfile URL.
    :param paths: the images' paths relative to the data folder.
    :param class_names: the class name of each image.
    """
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(zip(paths, class_names))
    atomic_write(labels_file, lambda f: f.write(text.getvalue().encode("utf-8")))
