"""
Tests for guided_diffusion.clustering (k-means, purity, normalised mutual information,
UNet features) and scripts/cluster_labels.py: its errors, the npz and unet features,
and the round trip cluster_labels.py -> image_train.py --labels_file (the classes
recorded, a resume with another labels file refused).
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch as th

from guided_diffusion.checkpoint import read_sidecar
from guided_diffusion.clustering import (
    kmeans_labels, middle_block_features, normalized_mutual_information, purity,
)
from guided_diffusion.labels_file import read_labels_file
from guided_diffusion.script_util import create_model
from test_labels_file import TINY_MODEL, TRAIN, write_csv, write_two_tone_images
from test_sample_scripts import run_script

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- clustering


def test_purity_and_nmi_of_a_small_example_by_hand():
    # Classes [0, 0, 1, 1], clusters [0, 0, 0, 1]: joint [[1/2, 0], [1/4, 1/4]], class marginals
    # (1/2, 1/2), cluster marginals (3/4, 1/4).
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    entropies = math.log(2) - (0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert purity([0, 0, 1, 1], [0, 0, 0, 1]) == 0.75
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(
        mutual / (entropies / 2), rel=1e-12)
    assert normalized_mutual_information(["a", "a", "b"], [5, 5, 5]) == 0.0
    assert normalized_mutual_information([1, 1], [2, 2]) == 1.0


def test_well_separated_features_are_clustered_exactly():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 20
    true = np.repeat(np.arange(4), 25)
    features = centers[true] + rng.normal(size=(100, 16))
    clusters = kmeans_labels(features, 4, seed=0)
    assert purity(true, clusters) == 1.0
    assert normalized_mutual_information(true, clusters) == pytest.approx(1.0)
    assert np.array_equal(clusters, kmeans_labels(features, 4, seed=0))  # seeded


def test_digits_without_labels_cluster_well_above_chance():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()  # 1797 8x8 images, 10 classes of about 180
    clusters = kmeans_labels(digits.data, 10, seed=0)
    # Measured: purity 0.74 to 0.79 and NMI 0.70 to 0.74 over seeds 0-2; chance is about 0.1.
    assert purity(digits.target, clusters) > 0.6
    assert normalized_mutual_information(digits.target, clusters) > 0.6


@pytest.mark.parametrize("features, num_clusters, expected", [
    (np.zeros((5, 2)), 1, "num_clusters=1: expected 2 to 5"),
    (np.zeros((5, 2)), 6, "num_clusters=6: expected 2 to 5"),
    (np.full((5, 2), np.nan), 2, "NaN or inf"),
    (np.zeros(5), 2, r"shape \(5,\): expected \[N x D\]"),
])
def test_kmeans_refuses_bad_arguments(features, num_clusters, expected):
    with pytest.raises(ValueError, match=expected):
        kmeans_labels(features, num_clusters)


def test_middle_block_features_are_pooled_per_image():
    model = create_model(8, 32, 1, channel_mult="1", attention_resolutions="8", num_head_channels=32)
    x = th.randn(3, 3, 8, 8)
    features = middle_block_features(model, x, th.tensor([10, 10, 10]))
    assert features.shape == (3, 32)
    alone = middle_block_features(model, x[1:2], th.tensor([10]))
    assert th.allclose(features[1:2], alone, atol=1e-5)
    assert not model.middle_block._forward_hooks


# ---------------------------------------------------------------------- the script


@pytest.fixture
def images(tmp_path):
    return write_two_tone_images(tmp_path / "images")


@pytest.fixture
def script(isolated_logger):
    """The script's module, logging to this test's standard output."""
    isolated_logger.Logger.CURRENT = None  # the next log makes a stdout logger anew
    path = REPO / "scripts" / "cluster_labels.py"
    spec = importlib.util.spec_from_file_location("cluster_labels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_npz_features_give_a_labels_file_and_a_report(script, images, tmp_path, capsys):
    pytest.importorskip("sklearn")
    entries = script.list_image_files(str(images))
    features = np.array([[1.0, 0.0] if "light_" in path else [0.0, 1.0] for path, _ in entries])
    np.savez(tmp_path / "features.npz", features)
    out = tmp_path / "labels.csv"
    script.main(["--data_dir", str(images), "--num_clusters", "2", "--features", "npz",
                 "--features_npz", str(tmp_path / "features.npz"), "--out", str(out),
                 "--report_against", "prefix"])
    labels = read_labels_file(str(out))
    assert set(labels.values()) == {"cluster_00", "cluster_01"}
    assert len({labels["light_1.png"], labels["more/light_7.png"]}) == 1
    assert labels["light_1.png"] != labels["dark_0.png"]
    logged = capsys.readouterr().out
    assert "8 images in clusters of sizes [4, 4]" in logged
    assert "purity 1.0000, NMI 1.0000" in logged
    assert script.report_agreement(entries, str(out), "prefix") == dict(purity=1.0, nmi=1.0)


@pytest.mark.parametrize("argv, error, expected", [
    (["--num_clusters", "1"], ValueError, "--num_clusters 1: expected 2 to 8, the number of images"),
    (["--num_clusters", "9"], ValueError, "--num_clusters 9: expected 2 to 8"),
    (["--num_clusters", "2", "--features", "npz", "--features_npz", "{tmp}/short.npz"], ValueError,
     r"--features_npz .*short.npz: arr_0 has shape \(3, 2\) but --data_dir .* has 8 images: "
     r"expected \[8 x D\]"),
    (["--num_clusters", "2", "--features", "npz"], FileNotFoundError, "--features npz needs an .npz"),
    (["--num_clusters", "2", "--features", "unet"], FileNotFoundError, "--features unet needs the"),
    (["--num_clusters", "2", "--features", "inception", "--inception_path", "{tmp}/none.pt"],
     FileNotFoundError, "(?s)Get the Inception-v3.*and put it in"),
])
def test_the_script_refuses_bad_flags(script, images, tmp_path, argv, error, expected):
    np.savez(tmp_path / "short.npz", np.zeros((3, 2)))
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    with pytest.raises(error, match=expected):
        script.main(["--data_dir", str(images), "--out", str(tmp_path / "out.csv"), *argv])
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_unet_clusters_train_a_conditional_model_and_a_changed_file_is_refused(images, tmp_path):
    run_script("image_train.py", ["--data_dir", images, *TINY_MODEL, *TRAIN,
                                  "--log_dir", tmp_path / "base"])
    labels_file = tmp_path / "labels.csv"
    clustered = run_script("cluster_labels.py", [
        "--data_dir", images, "--num_clusters", "2", "--features", "unet", "--model_path",
        tmp_path / "base" / "ema_0.9999_000002.pt", "--feature_timestep", "5", "--batch_size", "3",
        "--out", labels_file, "--report_against", "prefix"])
    assert "8 images in clusters of sizes" in clustered.stdout and "purity" in clustered.stdout
    assert set(read_labels_file(str(labels_file)).values()) == {"cluster_00", "cluster_01"}
    train = ["--data_dir", images, *TINY_MODEL, *TRAIN, "--class_cond", "True", "--num_classes", "3",
             "--labels_file", labels_file, "--log_dir", tmp_path / "conditional"]
    run_script("image_train.py", train)
    checkpoint = tmp_path / "conditional" / "model000002.pt"
    assert read_sidecar(str(checkpoint))["class_names"] == ["cluster_00", "cluster_01"]
    paths = read_labels_file(str(labels_file))
    three = [(path, f"cluster_0{index % 3}") for index, path in enumerate(paths)]
    write_csv(labels_file, three)
    refused = run_script("image_train.py", [*train, "--resume_checkpoint", checkpoint,
                                            "--max_steps", "4"], check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (f"--resume_checkpoint {checkpoint} was trained with other classes (2 classes -> 3)"
            in refused.stderr)


@pytest.mark.slow  # Inception-v3 at 299 x 299 on the CPU: about 20 s
def test_inception_features_with_given_weights(script, images, tmp_path, capsys):
    pytest.importorskip("sklearn")
    from test_inception import random_state_dict

    th.save(random_state_dict(seed=5), tmp_path / "inception-2015-12-05.pt")
    script.main(["--data_dir", str(images), "--num_clusters", "2", "--features", "inception",
                 "--inception_path", str(tmp_path / "inception-2015-12-05.pt"),
                 "--image_size", "16", "--batch_size", "3", "--out", str(tmp_path / "labels.csv")])
    assert "clustering 8 feature vectors of length 2048" in capsys.readouterr().out
    assert len(read_labels_file(str(tmp_path / "labels.csv"))) == 8
