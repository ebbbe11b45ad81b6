"""A disk that fills: a stage stops with one line naming the file and the space it needs, exits non-zero,
leaves no partial file visible, and the same command, once space is freed, resumes to a clean run's result.

The small disk is a size-limited tmpfs mounted for the test (root, or a user namespace's root); where mounts
are refused, a `sitecustomize` in the commands' PYTHONPATH makes writes under the folder fail with ENOSPC once
the files there would pass the limit (Ray workers inherit it), so the code under test is the same either way."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.crawl.run import crawl
from pipeline.shard.run import shard
from pipeline.world import World, WorldServer
from support import ROOT, crawl_config, run_in_process, stage_config, subprocess_env, world_config
from training.errors import megabytes

ERROR = (
    r"error: no space left on device writing {out}/\S+ \(needs (~|at least )\d+\.\d [kM]B, \d+\.\d [kM]B free\); "
    r"free space and run the same command again to resume"
)

# Writes under $PIXELMILL_SMALL_DISK fail with ENOSPC once the files there would hold more than the number of
# bytes in "$PIXELMILL_SMALL_DISK.limit" (a file, so that the test can free space between two commands).
SITECUSTOMIZE = """
import builtins, errno, io, os

_ROOT = os.path.abspath(os.environ["PIXELMILL_SMALL_DISK"])
_open = builtins.open


def _used():
    total = 0
    for folder, _, files in os.walk(_ROOT):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


class _SmallDiskFile(io.FileIO):
    def write(self, data):
        with _open(_ROOT + ".limit") as f:
            limit = int(f.read())
        if _used() + memoryview(data).nbytes > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _small_disk_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True,
                     opener=None):
    writing = any(c in mode for c in "wax") and "+" not in mode
    if writing and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(_ROOT + os.sep):
        raw = _SmallDiskFile(file, mode.replace("b", "").replace("t", ""), closefd=closefd, opener=opener)
        buffered = io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline)
    return _open(file, mode, buffering, encoding, errors, newline, closefd, opener)


builtins.open = io.open = _small_disk_open
"""


class SmallDisk:
    """A folder that holds `size` bytes: `path`, `env()` for the commands that write there, `resize(size)`."""

    def __init__(self, folder: Path, size: int):
        self.path = folder / "disk"
        self.path.mkdir(parents=True)
        self.site = None
        forced = os.environ.get("PIXELMILL_TEST_SMALL_DISK") == "wrapper"  # to test the fallback where mounts work
        if forced or not self._mount(size):
            self.site = folder / "site"
            self.site.mkdir()
            (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            self.resize(size)

    def _mount(self, size: int) -> bool:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True
        )
        return mounted.returncode == 0

    def resize(self, size: int) -> None:
        if self.site is None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)
        else:
            Path(f"{self.path}.limit").write_text(str(size))

    def env(self) -> dict:
        env = subprocess_env()
        if self.site is not None:
            env["PIXELMILL_SMALL_DISK"] = str(self.path)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        return env

    def close(self) -> None:
        if self.site is None:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@contextmanager
def small_disk(folder: Path, size: int):
    disk = SmallDisk(folder, size)
    try:
        yield disk
    finally:
        disk.close()


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_stopped_in_one_line(result: subprocess.CompletedProcess, out: Path) -> str:
    """Exit status 2 and nothing on stderr but the one line naming a file under `out` (Ray's C++ notice about its
    actor pool included: it goes to the log, training.quiet.native_lines_to_log); returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and re.fullmatch(ERROR.format(out=re.escape(str(out))), lines[0]), result.stderr[-3000:]
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, by path under `folder`."""
    found = {}
    for path in glob.glob(f"{folder}/**", recursive=True):
        if os.path.isfile(path):
            found[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return found


def assert_only_whole_files(out: Path, clean: Path, outputs: tuple[str, ...]) -> None:
    """No temporary file anywhere; every output file (those ending in `outputs`) that is visible is whole:
    byte for byte the clean run's file of that name. No manifest, no lock left behind."""
    written, expected = files(out), files(clean)
    assert not [name for name in written if ".tmp-" in name]
    visible = [name for name in written if name.endswith(outputs) and "/" not in name]
    assert all(written[name] == expected[name] for name in visible), visible
    assert "manifest.json" not in written and "_lock.json" not in written


def assert_same_outputs(out: Path, clean: Path, outputs: tuple[str, ...]) -> None:
    """The same output files with the same bytes; each tar's members and each parquet's rows equal too (what
    a reader sees, whatever the bytes)."""
    written, expected = files(out), files(clean)
    names = sorted(name for name in expected if name.endswith(outputs) and "/" not in name)
    assert names and sorted(n for n in written if n.endswith(outputs) and "/" not in n) == names
    for name in names:
        if name.endswith(".tar"):
            assert tar_members(out / name) == tar_members(clean / name)
        elif name.endswith(".parquet"):
            assert sorted_rows(out / name) == sorted_rows(clean / name)
        assert written[name] == expected[name], name


def tar_members(path: Path) -> list[tuple[str, str]]:
    with tarfile.open(path) as tar:
        return sorted((m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest()) for m in tar if m.isfile())


def sorted_rows(path: Path) -> list[str]:
    return sorted(repr(row) for row in pq.read_table(path).to_pylist())


def folder_bytes(folder: Path) -> int:
    return sum(len(data) for data in files(folder).values())


def crawl_command(urls, out) -> list[str]:
    settings = ["allow_networks=[127.0.0.1/32]", "timeout=1", "retries=1", "retry_backoff=0.05", "image_size=64"]
    return [sys.executable, "-m", "pipeline.crawl", f"input={urls}", f"output={out}", *settings,
            "max_bytes=1048576", "number_sample_per_shard=40", "processes=1", "progress=false"]  # fmt: skip


CRAWL_OUTPUTS = (".tar", ".parquet")


@pytest.fixture(scope="module")
def served_crawl(ray_local, tmp_path_factory):
    """A world served for the module's tests, its URL list, and a clean crawl of it: (urls, folder, manifest)."""
    folder = tmp_path_factory.mktemp("disk_full_world")
    world = World(world_config(n=120, slow_seconds=1.5))
    with WorldServer(world) as server:
        urls, _ = world.write(folder / "world", server.base_url)
        manifest = crawl(crawl_config(f"input={urls}", f"output={folder / 'raw'}"))
        yield urls, folder / "raw", manifest


@pytest.mark.slow
def test_crawl_on_a_full_disk_stops_in_one_line_and_resumes_to_a_clean_crawl(served_crawl, tmp_path):
    urls, clean, clean_manifest = served_crawl
    size = folder_bytes(clean)
    with small_disk(tmp_path, size // 2) as disk:
        out = disk.path / "raw"
        full = run(crawl_command(urls, out), disk.env())
        assert_stopped_in_one_line(full, out)
        assert_only_whole_files(out, clean, CRAWL_OUTPUTS)

        disk.resize(size * 4)
        run_in_process(crawl, crawl_command(urls, out))  # the resume, with room again
        assert_same_outputs(out, clean, CRAWL_OUTPUTS)
        manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["content_hash"] == clean_manifest["content_hash"] and manifest["counts"] == clean_manifest["counts"]


def selection_of(raw: Path, folder: Path) -> Path:
    """A selection (the filter's layout) that keeps every success of the crawl in `raw`."""
    rows = [r for p in sorted(raw.glob("0*.parquet")) for r in pq.read_table(p).to_pylist() if r["status"] == "success"]
    folder.mkdir()
    table = pa.table({"key": [r["key"] for r in rows], "shard": [f"{r['key'][:5]}.tar" for r in rows],
                      "keep": [True] * len(rows)})  # fmt: skip
    pq.write_table(table, folder / "selection.parquet")
    (folder / "manifest.json").write_text(json.dumps({"content_hash": "every success of " + str(raw)}))
    return folder


@pytest.mark.slow
def test_shard_on_a_full_disk_names_the_tar_and_its_size_then_resumes_to_a_clean_shard_set(served_crawl, tmp_path):
    _, raw, _ = served_crawl
    selection = selection_of(raw, tmp_path / "selection")
    options = [f"input={raw}", f"selection={selection}", "samples_per_shard=10", "processes=1", "progress=false"]
    clean = tmp_path / "clean"
    clean_manifest = shard(stage_config("shard", *options, f"output={clean}"))
    size = folder_bytes(clean)
    with small_disk(tmp_path, size // 2) as disk:
        out = disk.path / "shards"
        command = [sys.executable, "-m", "pipeline.shard", *options, f"output={out}", "ray.num_cpus=2"]
        line = assert_stopped_in_one_line(run(command, disk.env()), out)
        # The tar's exact size: the space to free is known before a byte of it is written.
        name = re.search(rf"{re.escape(str(out))}/(\S+) ", line).group(1)
        assert f"needs ~{megabytes(len((clean / name).read_bytes()))}," in line
        assert_only_whole_files(out, clean, (".tar", "sizes.json"))

        disk.resize(size * 4)
        run_in_process(shard, command)  # the resume, with room again
        assert_same_outputs(out, clean, (".tar", "sizes.json"))
        manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["content_hash"] == clean_manifest["content_hash"]


# A training run as training/train.py makes one (a Lightning Trainer whose ModelCheckpoint writes
# `checkpoints/last.ckpt`, resumed from it when it exists, under `run_command`), small enough for seconds.
TRAINING = """
import sys, torch, pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from training.checkpoint_io import AtomicCheckpointIO
from training.errors import run_command

class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 512)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

def train(cfg):
    pl.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.randn(8, 64), torch.randn(8, 512)), batch_size=8)  # a step an epoch
    model = Regression()
    checkpoints = ModelCheckpoint(dirpath=f"{cfg['output']}/checkpoints", every_n_train_steps=1, save_last=True,
                                  save_top_k=0)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints], plugins=[AtomicCheckpointIO()],
                         default_root_dir=cfg["output"])
    last = f"{cfg['output']}/checkpoints/last.ckpt"
    import os
    trainer.fit(model, data, ckpt_path=last if os.path.exists(last) else None)
    torch.save(model.state_dict(), cfg["weights"])

run_command(train, {"output": sys.argv[1], "weights": sys.argv[2]})
"""


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_and_training_resumes_from_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINING)
    clean = run([sys.executable, str(script), str(tmp_path / "clean"), str(tmp_path / "clean.pt")], subprocess_env())
    assert clean.returncode == 0, clean.stderr[-3000:]
    checkpoint = len((tmp_path / "clean" / "checkpoints" / "last.ckpt").read_bytes())
    # Room for one checkpoint and a half: the second is written beside the first before it replaces it.
    with small_disk(tmp_path, checkpoint * 3 // 2) as disk:
        out = disk.path / "run"
        command = [sys.executable, str(script), str(out), str(tmp_path / "resumed.pt")]
        line = assert_stopped_in_one_line(run(command, disk.env()), out)
        assert line.startswith(f"error: no space left on device writing {out}/checkpoints/last.ckpt (needs ~")
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]  # the first, whole
        assert torch_load(out / "checkpoints" / "last.ckpt")["epoch"] == 0

        disk.resize(checkpoint * 4)
        resumed = run(command, disk.env())
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert torch_load(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    weights, expected = torch_load(tmp_path / "resumed.pt"), torch_load(tmp_path / "clean.pt")
    assert weights.keys() == expected.keys() and all(weights[k].equal(expected[k]) for k in expected)


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=False)


def test_a_wrapper_quoting_a_full_disk_yields_the_named_error_it_carries(tmp_path):
    """Ray can hand over a worker's failure as an error whose text quotes the whole traceback, full disk
    included: the DiskFullError further down the chain, naming the file and its size, is the message."""
    from training.errors import DiskFullError, user_error

    named = DiskFullError(str(tmp_path / "00000.tar"), needed=120_000, free=4_096)

    class Wrapper(Exception):  # a RayTaskError that could not become a DiskFullError itself
        cause = named

    try:
        try:
            raise named from OSError(28, "No space left on device")
        except DiskFullError as err:
            raise Wrapper("Traceback ...\nOSError: [Errno 28] No space left on device") from err
    except Wrapper as wrapped:
        assert user_error(wrapped, {"output": str(tmp_path)}) is named
    bare = OSError(28, "No space left on device")  # nobody named it: the output is the best guess
    assert f"writing {tmp_path} (" in str(user_error(bare, {"output": str(tmp_path)}))
