"""Tests for guided_diffusion.logger: formats, averaging, directories, rank handling."""

import json

import pytest

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def restore_logger(isolated_logger):
    """Leave the module's current logger as it was before each test."""
    yield


class FakeComm:
    """An mpi4py-like communicator holding the other ranks' contributions."""

    def __init__(self, rank, others):
        self.rank = rank
        self.others = others
        self.sent = None

    def Get_rank(self):
        return self.rank

    def gather(self, obj, root=0):
        self.sent = obj
        return [obj] + self.others if self.rank == root else None

    def bcast(self, obj, root=0):
        if self.rank == root:
            return obj
        return "/nonexistent-root-dir" if isinstance(obj, str) else None  # root's folder; no refusal


def test_files_hold_the_step_values_and_means(tmp_path):
    logger.configure(str(tmp_path), ["log", "csv", "json"])
    logger.logkv("step", 1000)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.logkv_mean("loss", 6.0)
    assert logger.dumpkvs() == {"step": 1000, "loss": 3.0}
    logger.logkv("grad_norm", 0.5)
    logger.dumpkvs()
    logger.log("plain text line")
    csv_lines = (tmp_path / "progress.csv").read_text().splitlines()
    assert csv_lines == ["loss,step,grad_norm", "3.0,1000,", ",,0.5"]
    records = [json.loads(line) for line in (tmp_path / "progress.json").read_text().splitlines()]
    assert records == [{"loss": 3.0, "step": 1000}, {"grad_norm": 0.5}]
    text = (tmp_path / "log.txt").read_text()
    assert "| loss | 3        |\n| step | 1000     |" in text
    assert text.rstrip().endswith("plain text line")
    assert logger.get_dir() == str(tmp_path)


def test_a_reconfigured_csv_continues_the_existing_table(tmp_path):
    logger.configure(str(tmp_path), ["csv"])
    logger.logkv("step", 0)
    logger.dumpkvs()
    logger.configure(str(tmp_path), ["csv"])  # e.g. a resumed run in the same directory
    logger.logkv("step", 1)
    logger.logkv("loss", 0.5)
    logger.dumpkvs()
    assert (tmp_path / "progress.csv").read_text().splitlines() == ["step,loss", "0,", "1,0.5"]


def test_openai_logdir_is_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    logger.configure(format_strs=["log"])
    assert logger.get_dir() == str(tmp_path / "from_env")
    assert (tmp_path / "from_env" / "log.txt").exists()


def test_without_a_directory_a_timestamped_one_is_made(monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    logger.configure(format_strs=[])
    assert "openai-" in logger.get_dir()


def test_ranks_average_weighted_by_count_and_only_rank_zero_writes(tmp_path):
    # Rank 1 logged loss twice (mean 4.0) and rank 2 once (1.0); rank 0 once (1.0).
    others = [{"loss": (4.0, 2), "step": (7, 1)}, {"loss": (1.0, 1), "acc": (0.5, 1), "step": (7, 1)}]
    root = FakeComm(0, others)
    logger.configure(str(tmp_path), ["csv"], comm=root)
    logger.logkv_mean("loss", 1.0)
    logger.logkv("step", 7)
    written = logger.dumpkvs()
    assert written == {"loss": pytest.approx((1.0 + 8.0 + 1.0) / 4), "acc": 0.5, "step": 7}
    assert isinstance(written["step"], int)
    assert root.sent == {"loss": (1.0, 1), "step": (7, 1)}

    other = FakeComm(1, [])
    logger.configure(str(tmp_path / "rank1"), ["csv"], comm=other)
    assert logger.get_dir() == "/nonexistent-root-dir"
    logger.logkv("loss", 2.0)
    assert logger.dumpkvs() == {}


def test_other_ranks_get_suffixed_files(tmp_path):
    logger.configure(str(tmp_path), comm=FakeComm(0, []), format_strs=None)
    logger.Logger.CURRENT.close()
    comm = FakeComm(3, [])
    comm.bcast = lambda obj, root=0: obj
    logger.configure(str(tmp_path), comm=comm)
    logger.log("from rank three")
    assert "from rank three" in (tmp_path / "log-rank003.txt").read_text()


def test_integers_are_written_in_full_and_floats_with_three_digits(capsys):
    writer = logger.HumanOutputFormat(__import__("sys").stdout)
    writer.writekvs({"samples": 123456789, "loss": 0.123456})
    out = capsys.readouterr().out
    assert "| samples | 123456789 |" in out
    assert "| loss    | 0.123     |" in out


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown log format 'tensorflow': expected stdout, log, json, "
                                         "csv, tensorboard or wandb"):
        logger.configure(str(tmp_path), ["stdout", "tensorflow"])
    with pytest.raises(ValueError, match="the wandb log format needs a project"):
        logger.configure(str(tmp_path), ["wandb"])


def test_scoped_configure_restores_the_previous_logger(tmp_path):
    logger.configure(str(tmp_path / "outer"), ["log"])
    with logger.scoped_configure(str(tmp_path / "inner"), ["log"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.log("inside")
    assert logger.get_dir() == str(tmp_path / "outer")
    # The outer logger was kept open, so it still writes.
    logger.log("after the block")
    assert "after the block" in (tmp_path / "outer" / "log.txt").read_text()
    assert "inside" in (tmp_path / "inner" / "log.txt").read_text()


def test_levels_filter_log_lines(tmp_path):
    logger.configure(str(tmp_path), ["log"])
    logger.set_level(logger.WARN)
    logger.info("hidden")
    logger.warn("shown")
    text = (tmp_path / "log.txt").read_text()
    assert "shown" in text and "hidden" not in text


def test_profile_kv_adds_the_elapsed_time(tmp_path):
    logger.configure(str(tmp_path), ["log"])
    with logger.profile_kv("load"):
        pass
    assert logger.getkvs()["wait_load"] >= 0.0


def test_a_log_dir_that_is_not_a_folder_is_refused_naming_it(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=f"log_dir={tmp_path}/a_file is a file, not a folder: give the run a folder"):
        logger.configure(str(tmp_path / "a_file"), ["log"])
    with pytest.raises(ValueError, match=f"log_dir={tmp_path}/a_file/run cannot be made: {tmp_path}/a_file "
                                         "is a file, not a folder"):
        logger.configure(str(tmp_path / "a_file" / "run"), ["log"])
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match=r"is a file, not a folder: .*OPENAI_LOGDIR"):
        logger.configure(format_strs=["log"])
    assert (tmp_path / "a_file").read_text() == ""


@pytest.mark.slow
@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("script, flags", [
    ("image_train.py", ["--data_dir", "DATA", "--image_size", "8", "--num_channels", "32",
                        "--num_res_blocks", "1", "--channel_mult", "1", "--attention_resolutions", "",
                        "--batch_size", "2", "--num_workers", "0", "--max_steps", "1"]),
    ("image_sample.py", ["--model_path", "missing.pt", "--num_samples", "2", "--batch_size", "2"]),
])
@pytest.mark.slow
def test_scripts_refuse_a_log_dir_that_is_a_file_without_a_traceback(
    tmp_path, tiny_image_dir, script, flags, inside
):
    from test_sample_scripts import run_script

    (tmp_path / "a_file").write_text("")
    log_dir = tmp_path / "a_file" / "run" if inside else tmp_path / "a_file"
    flags = [tiny_image_dir if flag == "DATA" else flag for flag in flags]
    result = run_script(script, [*flags, "--log_dir", log_dir], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    expected = f"cannot be made: {tmp_path}/a_file is a file, not a folder" if inside else "is a file, not a folder"
    assert f"{script}: --log_dir {log_dir} {expected}" in result.stderr
    assert (tmp_path / "a_file").read_text() == ""


class _OtherRankComm:
    """A comm seen from rank 1 of 2, whose rank 0 could not start a tracking format."""

    def __init__(self, refusal):
        self.refusal = refusal

    def Get_rank(self):
        return 1

    def bcast(self, obj, root=0):
        return obj if isinstance(obj, str) else self.refusal  # the folder, then rank 0's refusal


def test_a_format_rank_zero_cannot_start_stops_every_rank(tmp_path, isolated_logger):
    refusal = (ValueError, "LOG/tb is not a folder")
    with pytest.raises(ValueError, match="LOG/tb is not a folder"):
        isolated_logger.configure(str(tmp_path), format_strs=["log"], comm=_OtherRankComm(refusal))
    isolated_logger.configure(str(tmp_path), format_strs=["log"], comm=_OtherRankComm(None))
    assert isolated_logger.get_dir() == str(tmp_path)
