"""Tests for guided_diffusion.image_datasets: preprocessing, labels, sharding, resume, errors."""

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from PIL import Image

from guided_diffusion.image_datasets import (
    ImageDataset,
    center_crop_arr,
    list_image_files,
    load_data,
    load_superres_data,
    random_crop_arr,
    read_image,
    to_8_bit,
)


def _pattern(height, width, seed=0):
    """A reproducible random RGB uint8 image array."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _write_images(folder, names, height=12, width=10):
    """Write one random PNG per name (names may contain sub-folders)."""
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(height, width, seed=i)).save(path)
    return folder


def test_center_crop_matches_box_halving_then_bicubic_then_center():
    image = Image.fromarray(_pattern(70, 100))
    # 70 >= 2*16 twice: 100x70 -> 50x35 -> 25x17 (BOX), then BICUBIC to short side 16.
    expected = image.resize((50, 35), Image.BOX).resize((25, 17), Image.BOX)
    expected = np.array(expected.resize((round(25 * 16 / 17), 16), Image.BICUBIC))
    left = (expected.shape[1] - 16) // 2
    np.testing.assert_array_equal(center_crop_arr(image, 16), expected[:, left : left + 16])


def test_random_crop_short_side_and_offsets_follow_the_seeded_draws():
    image = Image.fromarray(_pattern(30, 44))  # short side < 2 * 16: no BOX halving
    draws = np.random.default_rng(5)
    short_side = int(draws.integers(16, 21))  # ceil(16 / 1.0) .. ceil(16 / 0.8)
    resized = image.resize((round(44 * short_side / 30), short_side), Image.BICUBIC)
    arr = np.array(resized)
    top = int(draws.integers(arr.shape[0] - 16 + 1))
    left = int(draws.integers(arr.shape[1] - 16 + 1))
    result = random_crop_arr(image, 16, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(result, arr[top : top + 16, left : left + 16])


def test_batches_are_float32_nchw_in_range_with_prefix_labels(tmp_path):
    _write_images(tmp_path, ["b_1.png", "a_2.png", "b_3.png", "sub/c_4.png"])
    loader = load_data(
        data_dir=str(tmp_path), batch_size=4, image_size=8, class_cond=True,
        deterministic=True, random_flip=False, num_workers=0, seed=0,
    )
    images, kwargs = next(loader)
    assert images.shape == (4, 3, 8, 8) and images.dtype == th.float32
    assert -1.0 <= images.min() and images.max() <= 1.0
    # Sorted listing: a_2, b_1, b_3, sub/c_4; classes a=0, b=1, c=2.
    assert kwargs["y"].dtype == th.int64
    assert kwargs["y"].tolist() == [0, 1, 1, 2]
    expected = center_crop_arr(Image.fromarray(_pattern(12, 10, seed=1)), 8)
    expected = th.from_numpy(expected.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert th.equal(images[0], expected)


def test_folder_labels_use_the_first_sub_folder(tmp_path):
    _write_images(tmp_path, ["zebra/x_1.png", "ant/deep/er/y_2.png", "zebra/z.png"])
    loader = load_data(
        data_dir=str(tmp_path), batch_size=3, image_size=8, class_cond=True,
        class_from="folder", deterministic=True, num_workers=0, seed=0,
    )
    assert next(loader)[1]["y"].tolist() == [0, 1, 1]


def test_grayscale_rgba_palette_gif_webp_jpeg_all_become_rgb(tmp_path):
    base = Image.fromarray(_pattern(9, 9))
    base.convert("L").save(tmp_path / "gray.png")
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("P").save(tmp_path / "palette.gif")
    base.save(tmp_path / "photo.webp")
    base.save(tmp_path / "photo.JPEG")
    (tmp_path / "notes.txt").write_text("not an image, skipped")
    assert len(list_image_files(str(tmp_path))) == 5
    loader = load_data(data_dir=str(tmp_path), batch_size=5, image_size=8, num_workers=0, seed=0)
    images, _ = next(loader)
    assert images.shape == (5, 3, 8, 8)


def test_shards_are_disjoint_and_cover_all_files():
    paths = [f"img{i}.png" for i in range(7)]
    shards = [ImageDataset(8, paths, shard=s, num_shards=3).local_images for s in range(3)]
    assert sorted(sum(shards, [])) == sorted(paths)
    assert shards[1] == ["img1.png", "img4.png"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_saved_position_resumes_the_same_batches_across_epochs(tmp_path, num_workers):
    _write_images(tmp_path, [f"c{i % 2}_{i}.png" for i in range(5)])
    options = dict(
        data_dir=str(tmp_path), batch_size=2, image_size=8, class_cond=True,
        random_crop=True, seed=3, num_workers=num_workers,
    )
    reference = load_data(**options)
    batches = [next(reference) for _ in range(6)]  # 2 full batches per epoch: 3 epochs
    interrupted = load_data(**options)
    for _ in range(3):
        next(interrupted)
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["batch_index"] == 1
    resumed = load_data(**dict(options, seed=99))
    resumed.load_state_dict(state)
    for images, kwargs in batches[3:]:
        next_images, next_kwargs = next(resumed)
        assert th.equal(images, next_images) and th.equal(kwargs["y"], next_kwargs["y"])
    # Epochs are reshuffled: not every epoch starts with the same batch.
    assert not all(th.equal(batches[0][0], batches[k][0]) for k in (2, 4))


def test_different_seeds_give_different_crops(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"], height=20, width=20)
    first = [next(load_data(data_dir=str(tmp_path), batch_size=2, image_size=8,
                            random_crop=True, seed=s, num_workers=0))[0] for s in (0, 1)]
    assert not th.equal(first[0], first[1])


def test_superres_low_res_is_area_downsampling(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"], height=16, width=16)
    loader = load_superres_data(
        data_dir=str(tmp_path), batch_size=2, large_size=8, small_size=4, num_workers=0, seed=0
    )
    large, kwargs = next(loader)
    assert th.allclose(kwargs["low_res"], F.avg_pool2d(large, 2), atol=1e-6)
    assert loader.state_dict()["batch_index"] == 1


def test_empty_and_missing_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* found in .*empty"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=1, image_size=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_data(data_dir=str(tmp_path / "missing"), batch_size=1, image_size=8)


def test_shard_smaller_than_a_batch_is_an_error(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match="shard 1 of 2 gets 1 of the 3 images .* batch_size=2"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, shard=1, num_shards=2)


def test_corrupt_image_is_named(tmp_path):
    _write_images(tmp_path, ["good.png"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    loader = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        next(loader)


def test_more_classes_than_the_model_is_an_error(tmp_path):
    _write_images(tmp_path, ["a_1.png", "b_1.png", "c_1.png"])
    with pytest.raises(ValueError, match="has 3 classes \\(a, b, c\\) but the model has 2"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True, num_classes=2)


def test_folder_labels_need_sub_folders_and_class_from_is_checked(tmp_path):
    _write_images(tmp_path, ["loose.png", "cls/inside.png"])
    with pytest.raises(ValueError, match="1 are directly in the data folder, e.g. .*loose.png"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True, class_from="folder")
    with pytest.raises(ValueError, match="class_from='suffix': expected 'prefix' or 'folder'"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True, class_from="suffix")


def test_loading_a_state_from_another_dataset_is_an_error(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    loader = load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, num_workers=0)
    with pytest.raises(ValueError, match="saved with .*'num_images': 5"):
        loader.load_state_dict(dict(epoch=0, batch_index=0, seed=0, num_images=5, batch_size=1))


def test_iterating_does_not_touch_the_global_torch_generator(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    loader = load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, num_workers=0, seed=0)
    before = th.get_rng_state()
    for _ in range(3):  # crosses an epoch boundary, which starts a new DataLoader
        next(loader)
    assert th.equal(before, th.get_rng_state())


@pytest.mark.parametrize("argument", ["batch_size", "image_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_empty_batches_and_image_sizes_are_refused(tmp_path, argument, value):
    _write_images(tmp_path, ["a.png", "b.png"])
    options = dict(data_dir=str(tmp_path), batch_size=1, image_size=8, num_workers=0)
    with pytest.raises(ValueError, match=f"{argument}={value}: expected a positive integer"):
        load_data(**dict(options, **{argument: value}))


def test_sixteen_bit_grayscale_loads_as_its_eight_bit_version(tmp_path):
    gradient = np.linspace(0, 65535, 12 * 10).reshape(12, 10).astype(np.uint16)
    eight_bit = np.rint(gradient / 257).astype(np.uint8)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    Image.fromarray(eight_bit).save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    loader = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, deterministic=True,
                       random_flip=False, num_workers=0, seed=0)
    images, _ = next(loader)  # deep.png, flat.png
    assert (images[0] == 1.0).float().mean() < 0.1  # not clipped to white
    assert th.allclose(images[0], images[1], atol=2 / 255)  # [-1, 1]: 1/255 of the 8-bit range
    big_endian = Image.frombytes("I;16B", (10, 12), gradient.astype(">u2").tobytes())
    for image in (big_endian, Image.fromarray(gradient.astype(np.int32))):  # modes I;16B and I
        np.testing.assert_array_equal(np.asarray(to_8_bit(image, "x.png")), eight_bit)
        assert to_8_bit(image, "x.png").mode == "L"
    np.testing.assert_array_equal(np.asarray(read_image(str(tmp_path / "deep.png"))),
                                  np.asarray(read_image(str(tmp_path / "flat.png"))))


def test_float_and_out_of_range_integer_images_are_refused():
    with pytest.raises(ValueError, match="x.png is a floating-point image \\(PIL mode F\\)"):
        to_8_bit(Image.new("F", (2, 2), 0.5), "x.png")
    with pytest.raises(ValueError, match="y.png has 32-bit values from 0 to 70000"):
        to_8_bit(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "y.png")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB"])
def test_eight_bit_modes_convert_as_the_original(mode):
    image = Image.fromarray(_pattern(4, 4)).convert(mode)
    assert to_8_bit(image, "x.png") is image


def test_validation_labels_follow_the_training_class_map(tmp_path):
    train = _write_images(tmp_path / "train", ["cat_1.png", "dog_2.png", "emu_3.png"])
    val = _write_images(tmp_path / "val", ["dog_4.png", "emu_5.png"])  # no cat
    options = dict(batch_size=2, image_size=8, class_cond=True, deterministic=True,
                   num_workers=0, seed=0)
    training = load_data(data_dir=str(train), **options)
    assert training.class_names == ["cat", "dog", "emu"]
    validation = load_data(data_dir=str(val), class_names=training.class_names, **options)
    assert next(validation)[1]["y"].tolist() == [1, 2]  # dog = 1 as in training, not 0
    assert validation.class_names == ["cat", "dog", "emu"]
    _write_images(val, ["fox_6.png", "gnu_7.png"])
    with pytest.raises(ValueError, match="classes fox, gnu are not among the 3 given classes "
                                         "\\(cat, dog, emu\\), e.g. .*fox_6.png"):
        load_data(data_dir=str(val), class_names=training.class_names, **options)


def test_batches_are_pinned_for_the_gpu_only_when_cuda_is_available(tmp_path, monkeypatch):
    from guided_diffusion import image_datasets

    _write_images(tmp_path, ["a.png", "b.png"])
    options = dict(data_dir=str(tmp_path), batch_size=2, image_size=8, num_workers=0)
    assert load_data(**options).pin_memory is False  # no CUDA here
    made = []
    monkeypatch.setattr(image_datasets.th.cuda, "is_available", lambda: True)
    monkeypatch.setattr(image_datasets, "DataLoader",
                        lambda *args, **kwargs: made.append(kwargs) or iter([]))
    loader = load_data(**options)
    assert loader.pin_memory is True
    with pytest.raises(StopIteration):
        next(loader)
    assert made and made[0]["pin_memory"] is True


def _logged(isolated_logger, log_dir):
    """Send the logger's lines to log_dir/log.txt; return a function reading them."""
    isolated_logger.configure(str(log_dir), ["log"])
    return lambda: (log_dir / "log.txt").read_text()


def test_empty_class_folders_are_named_with_the_numbering_they_cause(tmp_path, isolated_logger):
    data = _write_images(tmp_path / "data", ["cat/a.png", "dog/deep/b.png", "dog/c.png"])
    (tmp_path / "data" / "emu").mkdir()
    (tmp_path / "data" / "fox").mkdir()
    (tmp_path / "data" / "fox" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "dog" / "nothing_here").mkdir()  # not a class folder: no warning
    log = _logged(isolated_logger, tmp_path / "log")
    options = dict(data_dir=str(data), batch_size=3, image_size=8, class_cond=True,
                   class_from="folder", deterministic=True, num_workers=0, seed=0)
    loader = load_data(**options)
    assert loader.class_names == ["cat", "dog"]
    assert next(loader)[1]["y"].tolist() == [0, 1, 1]
    warning = log()
    assert f"class folders without images in {data}: emu, fox; they get no label" in warning
    assert "the labels number the 2 non-empty folders (cat=0, dog=1)" in warning
    assert "adding images to one later renumbers the classes" in warning
    assert "nothing_here" not in warning
    # Labels numbered by given classes (validation data) are not renumbered: no warning.
    load_data(**dict(options, class_names=["cat", "dog", "emu"]))
    assert log().count("class folders without images") == 1


def test_a_symlink_loop_is_refused_naming_the_link_and_its_target(tmp_path):
    _write_images(tmp_path / "data", ["a/x.png", "a/b/y.png"])
    (tmp_path / "data" / "a" / "b" / "loop").symlink_to(tmp_path / "data" / "a")
    with pytest.raises(ValueError, match=f"{tmp_path}/data/a/b/loop is a symbolic link to "
                                         f"{tmp_path}/data/a, a folder that contains it .*remove the link"):
        list_image_files(str(tmp_path / "data"))
    (tmp_path / "data" / "a" / "b" / "loop").unlink()
    (tmp_path / "data" / "a" / "up").symlink_to("..")  # relative, to data_dir itself
    with pytest.raises(ValueError, match=r"data/a/up is a symbolic link to \.\., a folder that contains it"):
        list_image_files(str(tmp_path / "data"))


def test_linked_folders_are_followed_and_each_real_folder_read_once(tmp_path, isolated_logger):
    _write_images(tmp_path / "shared", ["s1.png", "s2.png"])
    data = _write_images(tmp_path / "data", ["c/own.png"])
    (data / "a").symlink_to(tmp_path / "shared")
    (data / "b").symlink_to(tmp_path / "shared")
    (data / "c" / "sibling").symlink_to(data / "a")  # a link to a sibling folder is no loop
    log = _logged(isolated_logger, tmp_path / "log")
    entries = list_image_files(str(data))
    assert entries == [(f"{data}/a/s1.png", ("a",)), (f"{data}/a/s2.png", ("a",)),
                       (f"{data}/c/own.png", ("c",))]
    assert f"skipping {data}/b: it is {tmp_path}/shared, whose images are already listed under {data}/a" in log()
    assert f"skipping {data}/c/sibling" in log()


def test_a_broken_link_to_an_image_is_named_and_one_to_a_folder_warned_of(tmp_path, isolated_logger):
    data = _write_images(tmp_path / "data", ["ok.png"])
    (data / "gone_folder").symlink_to(tmp_path / "nowhere")
    log = _logged(isolated_logger, tmp_path / "log")
    assert list_image_files(str(data)) == [(f"{data}/ok.png", ())]
    assert f"skipping {data}/gone_folder: a symbolic link to {tmp_path}/nowhere, which does not exist" in log()
    (data / "sub").mkdir()
    (data / "sub" / "gone.PNG").symlink_to(tmp_path / "moved.png")
    with pytest.raises(ValueError, match=f"{data}/sub/gone.PNG is a symbolic link to {tmp_path}/moved.png, "
                                         "which does not exist: restore the image it points to, or remove"):
        list_image_files(str(data))


def _train_on(data_dir, log_dir, *flags):
    """Run image_train.py as a user types it, at a tiny size, for one step."""
    from test_sample_scripts import run_script

    return run_script("image_train.py", [
        "--data_dir", data_dir, "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
        "--channel_mult", "1", "--attention_resolutions", "", "--diffusion_steps", "50",
        "--batch_size", "2", "--num_workers", "0", "--max_steps", "1", "--save_interval", "1",
        "--log_dir", log_dir, *flags], check=False)


@pytest.mark.slow
def test_image_train_refuses_a_symlink_loop_and_a_broken_image_link_without_a_traceback(tmp_path):
    data = _write_images(tmp_path / "data", ["a/x.png", "a/y.png"])
    (data / "a" / "loop").symlink_to(data / "a")
    looped = _train_on(data, tmp_path / "log1")
    assert looped.returncode == 1 and "Traceback" not in looped.stderr, looped.stderr[-3000:]
    assert f"image_train.py: {data}/a/loop is a symbolic link to {data}/a" in looped.stderr
    assert "remove the link" in looped.stderr
    (data / "a" / "loop").unlink()
    (data / "a" / "z.png").symlink_to(tmp_path / "moved.png")
    broken = _train_on(data, tmp_path / "log2")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr[-3000:]
    assert f"{data}/a/z.png is a symbolic link to {tmp_path}/moved.png, which does not exist" in broken.stderr


@pytest.mark.slow
def test_image_train_warns_of_an_empty_class_folder(tmp_path):
    data = _write_images(tmp_path / "data", ["cat/a.png", "dog/b.png"])
    (data / "ant").mkdir()
    run = _train_on(data, tmp_path / "log", "--class_cond", "True", "--num_classes", "3",
                    "--class_from", "folder")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "class folders without images in" in run.stdout and ": ant; they get no label" in run.stdout
    assert "the labels number the 2 non-empty folders (cat=0, dog=1)" in run.stdout
