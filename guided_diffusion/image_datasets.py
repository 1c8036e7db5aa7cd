"""
Training images: listing, labels, the original preprocessing, sharding and a
resumable infinite batch loader.

Order of random draws (reproducible with a seed, independent of num_workers):
epoch e of shard s is visited in the order np.random.default_rng([seed, s, e])
.permutation(n) (or file order with deterministic=True), cut into full batches; image
i of epoch e draws from np.random.default_rng([seed, s, e, i]): the crop's short
side, its top and left offsets (random_crop), then the flip (random_flip).
"""

import math
import os

import blobfile as bf
import numpy as np
import torch as th
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from . import dist_util, logger
from .file_writing import is_local
from .labels_file import class_names_from_file

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp")
# PIL modes of 16-bit grayscale images ("I": 32-bit integers, what older PIL gives).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_data(
    *,
    data_dir,               # folder (local or blobfile URL) searched recursively for images
    batch_size,             # images per batch on this rank
    image_size,             # side of the square crops
    class_cond=False,       # also yield {"y": int64 labels}
    deterministic=False,    # visit images in file order instead of shuffling every epoch
    random_crop=False,      # random 0.8-1.0 scale crops instead of the center crop
    random_flip=True,       # horizontal flips with probability 1/2
    class_from="prefix",    # labels from the file name before the first "_", or "folder"
    labels_file=None,       # or from this CSV of path,class rows (labels_file.py)
    num_classes=None,       # the model's number of classes, checked against the data
    seed=None,              # seed of shuffles, crops and flips (None: drawn at random)
    num_workers=1,          # DataLoader worker processes (0: load in this process)
    shard=None,             # this rank's shard (default: the process rank)
    num_shards=None,        # number of shards (default: the number of processes)
    class_names=None,       # the classes labels index (e.g. the training loader's
                            # class_names for validation data; None: this folder's, sorted)
):
    """
    Make an endless iterator of (images, kwargs) batches over a folder of images.

    Images are float32 NCHW tensors in [-1, 1]; kwargs is {"y": labels} with
    class_cond, else {}. Every rank reads its own shard (every num_shards-th file).
    The returned loader has state_dict()/load_state_dict() giving its position, and
    class_names: the class of each label (None without class_cond).

    :return: an ImageLoader.
    """
    for name, value in (("batch_size", batch_size), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: expected a positive integer")
    if labels_file and not class_cond:
        raise ValueError(f"labels_file={labels_file} with class_cond=False: the labels would not "
                         "be used; train a class-conditional model with class_cond=True")
    entries = list_image_files(data_dir)
    classes = None
    if class_cond:
        classes, class_names = class_labels(entries, class_from, class_names, data_dir=data_dir,
                                            labels_file=labels_file)
        if num_classes is not None and len(class_names) > num_classes:
            raise ValueError(
                f"{data_dir} has {len(class_names)} classes ({_preview(class_names)}) but the "
                f"model has {num_classes}: labels must be below {num_classes}"
            )
    shard = dist_util.get_rank() if shard is None else shard
    num_shards = dist_util.get_world_size() if num_shards is None else num_shards
    dataset = ImageDataset(
        image_size,
        [path for path, _ in entries],
        classes=classes,
        class_names=class_names if class_cond else None,
        shard=shard,
        num_shards=num_shards,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    if len(dataset) < batch_size:
        raise ValueError(
            f"shard {shard} of {num_shards} gets {len(dataset)} of the {len(entries)} images in "
            f"{data_dir} but batch_size={batch_size}: add images, lower batch_size or "
            "run fewer processes"
        )
    return ImageLoader(
        dataset, batch_size, shuffle=not deterministic, seed=seed, num_workers=num_workers
    )


def load_superres_data(*, data_dir, batch_size, large_size, small_size, class_cond=False, **kwargs):
    """
    Like load_data at large_size, with kwargs["low_res"] added: the batch downsampled
    to small_size by area averaging (F.interpolate mode="area").

    :param kwargs: further load_data keywords.
    :return: a LowResolutionLoader.
    """
    loader = load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
        **kwargs,
    )
    return LowResolutionLoader(loader, small_size)


def _preview(names, limit=5):
    """
    :return: the first few names joined by commas, with "..." if there are more.
    """
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def list_image_files(data_dir):
    """
    List images under a folder, recursively, in sorted order.

    In a local folder symbolic links are followed, each real folder once: a folder
    reached again through another link is skipped with a warning (its images are listed
    where it was reached first, in sorted order), and a link to a folder that contains
    it (a loop) is an error, as is a link named as an image whose target is missing.

    :param data_dir: a local folder or blobfile URL.
    :return: a list of (path, sub-folder names between data_dir and the file) pairs.
    """
    if not bf.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} is not a folder")
    entries = []
    if is_local(data_dir):
        real = os.path.realpath(data_dir)
        _collect_images(data_dir, (), entries, listed={real: data_dir}, open_folders=(real,))
    else:
        _collect_images(data_dir, (), entries)
    if not entries:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {data_dir} or its sub-folders"
        )
    return entries


def _is_image_name(name):
    """
    :return: whether a file name has one of IMAGE_EXTENSIONS (any case).
    """
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _collect_images(directory, folders, entries, listed=None, open_folders=None):
    """
    Append (path, folders) for every image under directory, depth first, sorted by name.

    :param directory: the folder to list.
    :param folders: the sub-folder names leading from data_dir to directory.
    :param entries: the list to append to.
    :param listed: for a local folder, the real path of every folder listed so far ->
        the path it was listed as (None: a blobfile URL, which has no links).
    :param open_folders: for a local folder, the real paths of directory and the
        folders above it, up to data_dir.
    """
    if listed is None:
        names, links = bf.listdir(directory), ()
    else:  # not bf.listdir: it stats every entry, which fails on a broken link
        with os.scandir(directory) as scan:
            found = list(scan)
        names = [entry.name for entry in found]
        links = {entry.name for entry in found if entry.is_symlink()}
    for name in sorted(names):
        path = bf.join(directory, name)
        if name in links and not os.path.exists(path):
            _broken_link(path, name)
        elif _is_image_name(name):
            entries.append((path, folders))
        elif bf.isdir(path):
            inner = folders + (name.rstrip("/"),)
            if listed is None:
                _collect_images(path, inner, entries)
                continue
            real = os.path.realpath(path)
            if real in open_folders:
                raise ValueError(
                    f"{path} is a symbolic link to {os.readlink(path)}, a folder that contains "
                    f"it ({real}): listing the images would loop forever; remove the link"
                )
            if real in listed:
                logger.warn(f"skipping {path}: it is {real}, whose images are already listed "
                            f"under {listed[real]} (each folder is read once)")
                continue
            listed[real] = path
            _collect_images(path, inner, entries, listed, open_folders + (real,))


def _broken_link(path, name):
    """
    Refuse a symbolic link named as an image whose target is missing; warn of any
    other (its target may have been a folder of images).

    :param path: a local symbolic link whose target does not exist.
    :param name: its file name.
    """
    link = f"a symbolic link to {os.readlink(path)}, which does not exist"
    if _is_image_name(name):
        raise ValueError(f"{path} is {link}: restore the image it points to, or remove the link")
    logger.warn(f"skipping {path}: {link}")


def _list_image_files_recursively(data_dir):
    """
    :param data_dir: a local folder or blobfile URL.
    :return: the sorted paths of the images under it (the original's helper).
    """
    return [path for path, _ in list_image_files(data_dir)]


def class_labels(entries, class_from, class_names=None, data_dir=None, labels_file=None):
    """
    Give each image an integer label: the index of its class name in class_names.

    :param entries: (path, folders) pairs from list_image_files.
    :param class_from: "prefix" (file name up to the first "_", as the original) or
        "folder" (the first sub-folder under data_dir).
    :param class_names: the classes the labels index, e.g. the training set's for
        validation images (None: the sorted names found in entries).
    :param data_dir: the folder entries were listed from; with class_from="folder" and
        no class_names, its first-level sub-folders without images are named in a
        warning, as they get no label (None: not looked at).
    :param labels_file: a CSV naming the class of every image (labels_file.py), in place of
        class_from "prefix" (None: class_from decides).
    :return: (labels, class names).
    """
    if labels_file and class_from == "folder":
        raise ValueError(f"class_from='folder' and labels_file={labels_file} are two sources of "
                         "labels: choose one")
    if labels_file:
        names = class_names_from_file(entries, labels_file)
    elif class_from == "prefix":
        names = [bf.basename(path).split("_")[0] for path, _ in entries]
    elif class_from == "folder":
        loose = [path for path, folders in entries if not folders]
        if loose:
            raise ValueError(
                f"class_from='folder' needs every image in a class sub-folder, but "
                f"{len(loose)} are directly in the data folder, e.g. {loose[0]}"
            )
        names = [folders[0] for _, folders in entries]
    else:
        raise ValueError(f"class_from={class_from!r}: expected 'prefix' or 'folder'")
    if class_names is None:
        class_names = sorted(set(names))
        if class_from == "folder" and data_dir is not None:
            _warn_of_empty_class_folders(data_dir, class_names)
    else:
        class_names = list(class_names)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        example = entries[names.index(unknown[0])][0]
        raise ValueError(
            f"classes {_preview(unknown)} are not among the {len(class_names)} given classes "
            f"({_preview(class_names)}), e.g. {example}: validation images must be of the "
            "training classes"
        )
    return [index[name] for name in names], class_names


def _warn_of_empty_class_folders(data_dir, class_names):
    """
    Warn of the first-level sub-folders of data_dir that hold no images (at any depth):
    they get no label, so filling one later renumbers the classes after it.

    :param data_dir: the data folder.
    :param class_names: the sorted names of the sub-folders that hold images.
    """
    names = os.listdir(data_dir) if is_local(data_dir) else bf.listdir(data_dir)
    folders = [name.rstrip("/") for name in names if bf.isdir(bf.join(data_dir, name))]
    empty = sorted(set(folders) - set(class_names))
    if empty:
        numbering = ", ".join(f"{name}={label}" for label, name in enumerate(class_names[:5]))
        logger.warn(
            f"class folders without images in {data_dir}: {_preview(empty)}; they get no label, "
            f"and the labels number the {len(class_names)} non-empty folders ({numbering}"
            f"{', ...' if len(class_names) > 5 else ''}), so adding images to one later "
            "renumbers the classes after it"
        )


class ImageDataset(Dataset):
    """
    One shard of a list of images, preprocessed to square float32 CHW arrays in [-1, 1].
    """

    def __init__(
        self,
        resolution,             # side of the output images
        image_paths,            # all image paths (every rank passes the same list)
        classes=None,           # integer label per path, or None
        class_names=None,       # the class name of each label, or None
        shard=0,                # this dataset keeps paths shard, shard + num_shards, ...
        num_shards=1,           # number of shards
        random_crop=False,      # random_crop_arr instead of center_crop_arr
        random_flip=True,       # flip horizontally with probability 1/2
        seed=0,                 # seed of the per-image crop and flip draws
    ):
        """
        See the argument comments.
        """
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.class_names = class_names
        self.shard = shard
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """
        :param epoch: the epoch whose crop and flip draws __getitem__ makes.
        """
        self.epoch = epoch

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        path = self.local_images[idx]
        pil_image = read_image(path)
        rng = np.random.default_rng([self.seed, self.shard, self.epoch, idx])
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=rng)
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.transpose(arr, [2, 0, 1]), out_dict


def read_image(path):
    """
    Read an image file as RGB: 8-bit modes (grayscale, RGBA, palette, CMYK, ...) are
    converted as the original did (PIL's convert("RGB"); alpha is dropped), 16-bit
    grayscale is first scaled to 8 bits (to_8_bit).

    :param path: a local path or blobfile URL.
    :return: a PIL image in mode "RGB".
    """
    try:
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return to_8_bit(pil_image, path).convert("RGB")


def to_8_bit(pil_image, path):
    """
    Scale a 16-bit grayscale image (PIL modes I;16, I;16B, I;16L and I, as PNG
    decodes 16-bit grayscale) to 8 bits: round(value / 257), so 65535 -> 255 and an
    8-bit image stored as 16-bit (value * 257) gets its 8-bit values back. PIL's own
    conversion clips every value above 255 to white.

    :param pil_image: a PIL image.
    :param path: its file, named in errors.
    :return: the image in mode "L" if it was 16-bit, else unchanged.
    """
    if pil_image.mode == "F":
        raise ValueError(
            f"{path} is a floating-point image (PIL mode F): save it with 8 or 16 bits per channel"
        )
    if pil_image.mode not in _SIXTEEN_BIT_MODES:
        return pil_image
    values = np.asarray(pil_image, dtype=np.int64)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(
            f"{path} has 32-bit values from {values.min()} to {values.max()} (PIL mode "
            f"{pil_image.mode}): expected 16-bit values in [0, 65535]"
        )
    return Image.fromarray(np.rint(values / 257).astype(np.uint8))


def _resize_short_side(pil_image, short_side):
    """
    Halve the image with BOX filtering while its short side is at least 2 * short_side,
    then resize it with BICUBIC so that its short side is short_side.

    :return: the resized PIL image.
    """
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """
    Resize so the short side is image_size and cut the central square.

    :param pil_image: an RGB PIL image.
    :param image_size: the side of the result.
    :return: a uint8 array of shape [image_size, image_size, 3].
    """
    arr = np.array(_resize_short_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0, rng=None):
    """
    Resize so the short side is a random size in [image_size / max_crop_frac,
    image_size / min_crop_frac] and cut a square at a random position.

    :param pil_image: an RGB PIL image.
    :param image_size: the side of the result.
    :param min_crop_frac: smallest fraction of the short side the crop covers.
    :param max_crop_frac: largest fraction of the short side the crop covers.
    :param rng: a numpy Generator for the three draws (a fresh one if None).
    :return: a uint8 array of shape [image_size, image_size, 3].
    """
    rng = np.random.default_rng() if rng is None else rng
    min_short_side = math.ceil(image_size / max_crop_frac)
    max_short_side = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(min_short_side, max_short_side + 1))
    arr = np.array(_resize_short_side(pil_image, short_side))
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[top : top + image_size, left : left + image_size]


class ImageLoader:
    """
    An endless iterator of full batches, epoch after epoch, whose position can be
    saved (state_dict) and restored (load_state_dict) for exact resumption.
    """

    def __init__(self, dataset, batch_size, shuffle=True, seed=None, num_workers=1, pin_memory=None):
        """
        :param dataset: an ImageDataset (or any dataset with set_epoch and seed and
            class_names attributes).
        :param batch_size: images per batch; the last partial batch of an epoch is dropped.
        :param shuffle: visit each epoch in a new random order.
        :param seed: seed of the order and of the dataset's draws (None: drawn at random).
        :param num_workers: DataLoader worker processes.
        :param pin_memory: batches in page-locked memory, so that copies to the GPU can
            overlap computation (None: when CUDA is available).
        """
        self.dataset = dataset
        self.pin_memory = th.cuda.is_available() if pin_memory is None else pin_memory
        self.class_names = dataset.class_names
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else seed
        self.dataset.seed = self.seed
        self.epoch = 0
        self.batch_index = 0
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = self._start_epoch()
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch += 1
            self.batch_index = 0
            self._batches = self._start_epoch()
            batch = next(self._batches)
        self.batch_index += 1
        return batch

    def batches_per_epoch(self):
        """
        :return: the number of full batches in one pass over the dataset.
        """
        return len(self.dataset) // self.batch_size

    def _start_epoch(self):
        """
        :return: an iterator over the remaining batches of self.epoch.
        """
        count = len(self.dataset)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.dataset.shard, self.epoch])
            order = rng.permutation(count)
        else:
            order = np.arange(count)
        batches = order[: self.batches_per_epoch() * self.batch_size].reshape(-1, self.batch_size)
        self.dataset.set_epoch(self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches[self.batch_index :].tolist(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: starting an epoch must not draw from torch's global one.
            generator=th.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def state_dict(self):
        """
        :return: the position and seed, as plain ints, for load_state_dict.
        """
        return dict(
            epoch=self.epoch,
            batch_index=self.batch_index,
            seed=self.seed,
            num_images=len(self.dataset),
            batch_size=self.batch_size,
        )

    def load_state_dict(self, state):
        """
        Continue from a saved position; the next batch is the one that followed it.

        :param state: a dict from state_dict().
        """
        expected = dict(num_images=len(self.dataset), batch_size=self.batch_size)
        saved = {key: state[key] for key in expected}
        if saved != expected:
            raise ValueError(
                f"data loader state was saved with {saved} but this loader has {expected}: "
                "resume with the same data_dir, batch_size and number of processes"
            )
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"]
        self.seed = state["seed"]
        self.dataset.seed = self.seed
        self._batches = None


class LowResolutionLoader:
    """
    Wraps a loader, adding kwargs["low_res"]: the images area-downsampled to small_size.
    """

    def __init__(self, loader, small_size):
        """
        :param loader: an ImageLoader of high-resolution batches.
        :param small_size: the side of the low-resolution images.
        """
        self.loader = loader
        self.small_size = small_size
        self.class_names = loader.class_names

    def __iter__(self):
        return self

    def __next__(self):
        large_batch, model_kwargs = next(self.loader)
        model_kwargs["low_res"] = F.interpolate(large_batch, self.small_size, mode="area")
        return large_batch, model_kwargs

    def state_dict(self):
        """
        :return: the wrapped loader's state.
        """
        return self.loader.state_dict()

    def load_state_dict(self, state):
        """
        :param state: a dict from state_dict().
        """
        self.loader.load_state_dict(state)
