"""Shared fixtures: small real image collections written to temporary folders."""

from __future__ import annotations

import os
import signal

# Triton decides at import whether its kernels run interpreted: set it before dtrain is imported,
# so that the fused mixup kernels can be checked on CPU tensors (backend="triton").
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PROCS = REPO / "tests" / "procs"  # the scripts tests run in a subprocess
CONFIGS = REPO / "configs"


def make_image(seed: int, side: int = 40, channels: int = 1) -> np.ndarray:
    """A random uint8 image, smooth with some texture: unlike white noise it survives JPEG and
    downscaling, and unlike a purely smooth one its perceptual hash is stable under a little
    noise (near-duplicate detection looks at its 16x16 lowest frequencies)."""
    rng = np.random.default_rng(seed)
    mode = "L" if channels == 1 else "RGB"

    def upsampled(cells: int) -> np.ndarray:
        grid = rng.integers(0, 256, size=(cells, cells, channels)).astype(np.uint8)
        image = Image.fromarray(grid[..., 0] if channels == 1 else grid, mode)
        return np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), np.float32)

    coarse = upsampled(6)
    return np.clip(0.75 * coarse + 0.25 * upsampled(side // 3), 0, 255).round().astype(np.uint8)


def near_copy(array: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(array.astype(int) + rng.integers(-3, 4, array.shape), 0, 255).astype(np.uint8)


def write_folder(
    root: Path, per_class: dict[str, int], fmt: str = "png", seed: int = 0, duplicates: int = 0
) -> Path:
    """`root/<class>/<i>.<fmt>`; the first `duplicates` images of each class also get a near copy
    (`<i>_dup.<fmt>`)."""
    offset = seed * 10_000
    for c, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = make_image(offset + c * 1000 + i)
            Image.fromarray(array).save(folder / f"{i:03d}.{fmt}")
            if i < duplicates:
                Image.fromarray(near_copy(array, i)).save(folder / f"{i:03d}_dup.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_folder(
        tmp_path / "images", {"benign": 30, "malignant": 30, "normal": 30}, duplicates=5
    )


def stripes(seed: int, vertical: bool, side: int = 32) -> np.ndarray:
    """Stripes at a random frequency and phase, plus noise: an easy, flip-proof two-class task
    whose images are still all different (they do not collapse into near-duplicate groups)."""
    rng = np.random.default_rng(seed)
    period = rng.uniform(4, 9)
    axis = np.arange(side) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi)
    wave = np.tile(np.sin(axis), (side, 1))
    image = 128 + 80 * (wave if vertical else wave.T) + rng.normal(0, 30, (side, side))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_stripes(root: Path, per_class: int) -> Path:
    for c, name in enumerate(("horizontal", "vertical")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(stripes(10_000 * c + i, vertical=bool(c))).save(
                root / name / f"{i:03d}.png"
            )
    return root


def stripes_dataset(root: Path, per_class: int, shard_size: int) -> Path:
    """A prepared two-class stripes dataset with 20% symmetric label noise."""
    from dtrain.prepare import PrepareConfig, prepare

    write_stripes(root / "img", per_class)
    return prepare(
        PrepareConfig(
            source=str(root / "img"),
            out=str(root / "ds"),
            noise="symmetric",
            noise_rate=0.2,
            shard_size=shard_size,
            progress=False,
        )
    )


def random_batch(size: int = 16, classes: int = 3, side: int = 32) -> dict:
    """A training batch of random one-channel views, all samples valid."""
    import torch

    return {
        "view1": torch.randn(size, 1, side, side),
        "view2": torch.randn(size, 1, side, side),
        "label": torch.randint(0, classes, (size,)),
        "valid": torch.ones(size, dtype=torch.bool),
    }


def free_port() -> int:
    """A port nobody holds now (tests never use a fixed one: others may hold 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_overrides(data: Path, run_dir: Path, batch_size: int, *extra: str) -> list[str]:
    """The small, fast training config every trainer test starts from: 32 px, timm's tiny
    test_resnet, 2 epochs, groups of 4, scores over the last epoch, one round, no progress bars."""
    return [
        f"data.path={data}",
        "data.image_size=32",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "model.backbone=test_resnet",
        "train.epochs=2",
        "train.progress=false",
        "method.group_size=4",
        "method.score_epochs=1",
        "train.refine_rounds=0",
        f"train.run_dir={run_dir}",
        *extra,
    ]


def copy_dataset(source: Path, target: Path) -> Path:
    """A private copy of a prepared dataset, for a test that damages or edits it."""
    import shutil

    return Path(shutil.copytree(source, target))


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard in place with `change(sample) -> sample` applied to each sample, keeping
    it one the loader takes as intact (`refresh_checksum`), whatever `change` put in it."""
    import webdataset as wds

    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(
                change(
                    {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
                )
            )
    refresh_checksum(path)


def refresh_checksum(path: Path) -> None:
    """Record a shard's current sha256 (and nothing else) in the `dataset.json` beside it."""
    import json

    from dtrain.prepare.shard_writer import sha256

    meta_path = path.parent / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["shards"][path.name]["sha256"] = sha256(path)
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def processes_with_env(entry: str, title: str = "") -> list[int]:
    """Processes whose environment holds `entry` (and whose command line starts with `title`):
    this test's Ray processes, agents renamed to `ray::...` included, and no other Ray here."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if entry.encode() in environ and command.startswith(title.encode()):
            found.append(int(proc.name))
    return found


def kill_processes_with_env(entry: str) -> None:
    for pid in processes_with_env(entry):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for signal `sig` (/proc's SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) & (1 << (sig - 1)))


@pytest.fixture(scope="session")
def torch_extensions(tmp_path_factory) -> Path:
    """One folder for DeepSpeed's JIT-compiled CPU op: compiled once per test session."""
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="session")
def cpu_env(torch_extensions) -> dict:
    """The environment of a launched training on this CPU machine: one thread per process,
    DeepSpeed on its CPU accelerator, its op compiled once per session."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(torch_extensions),
    }


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One real two-node SLURM cluster for the session (tests/slurm_cluster.py)."""
    from slurm_cluster import SlurmCluster, missing_commands

    missing = missing_commands()
    if missing:
        pytest.skip(
            f"SLURM is not installed here ({', '.join(missing)} missing); .ci/run installs "
            "slurm-wlm and munge with apt-get"
        )
    if os.geteuid() != 0:
        pytest.skip("bringing up munge and slurmd needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def submit_env(cluster, torch_extensions) -> dict:
    """A login shell's environment: no venv on PATH, the test cluster's config."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {
        **env,
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SLURM_CONF": str(cluster.conf),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(torch_extensions),
    }


@pytest.fixture
def ray_env():
    """A private Ray temp dir (short: Ray's socket paths must stay under 108 bytes); every
    process started with it is killed afterwards (never `ray stop`: it ends every Ray here)."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    kill_processes_with_env(f"RAY_TMPDIR={ray_tmp}")
    shutil.rmtree(ray_tmp, ignore_errors=True)
