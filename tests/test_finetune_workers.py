"""Fine-tuning on several workers (torchrun, Ray Train) and resuming after a kill: the same weights either way.

The launches are real: ``torchrun --nproc_per_node 2 -m stages.finetune``, the
stage with ``finetune.engine: ray`` on a local Ray instance, and the stage killed
with SIGKILL at random moments and started again. Each is compared with one
uninterrupted in-process run on the same photos (fp32 on the CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
import socket
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers_dvc import sample_slice
from helpers_images import make_class_folder, sha256
from torch import nn

from conftest import import_or_skip
from pipeline.backbones import load_backbone
from pipeline.config import FinetuneConfig, load_config
from pipeline.data.manifest import Row
from pipeline.data.transform import TransformSpec
from pipeline.errors import PipelineError
from pipeline.finetune.data import GlobalBatches, RowImages
from pipeline.bench.common import finetune_result, set_finetune, stage_env
from pipeline.finetune.distributed import Workers, backend_for, launched_by_torchrun, worker_device
from pipeline.finetune.network import FineTuneNet
from pipeline.finetune.resume import Checkpoints, run_key
from pipeline.finetune.stage import run_finetune
from pipeline.finetune.train import fit
from pipeline.raycluster import import_ray

ROOT = Path(__file__).resolve().parents[1]
# No validation slice: the last epoch is kept, so the weights compared are the trained ones (with one,
# the guard hands the sample's easy classes back to the warm-start head, equal in every run).
# Validation across workers: test_validation_is_gathered_across_workers_not_averaged.
SETTINGS = {"epochs": 2, "batch_size": 8, "device": "cpu", "precision": "fp32", "val_fraction": 0.0}


def _stage(path: Path, *cmd: str, check=True, timeout=600) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), cwd=path, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _outcome(path: Path) -> dict:
    """What a finished run left: its weights, test metrics, run record and epochs; then clears them for the next run."""
    out = finetune_result(path)
    shutil.rmtree(path / "models/finetune")
    (path / "reports/finetune_metrics.json").unlink()
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def photos_project(catsdogs, tmp_path_factory) -> Path:
    """Prepared and extracted: 40 sample photos, efficientnet_lite0; the stage then runs directly."""
    path = tmp_path_factory.mktemp("workers")
    sample_slice(catsdogs, path / "photos", 20)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder="photos", test_fraction=0.25)
    params["backbone"].update(name="efficientnet_lite0", weights="DEFAULT")
    params["extract"].update(device="cpu", precision="fp32")
    params["finetune"].update(SETTINGS)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _stage(path, sys.executable, "-m", "stages.prepare")
    _stage(path, sys.executable, "-m", "stages.extract")
    return path


@pytest.fixture(scope="module")
def one_process(photos_project) -> dict:
    """The reference: one uninterrupted in-process run."""
    set_finetune(photos_project, engine="local", workers=1, checkpoint_every=0)
    _stage(photos_project, sys.executable, "-m", "stages.finetune")
    return _outcome(photos_project)


#: Two workers sum the same gradients in another order; Adam's m/(sqrt(v)+eps) can turn the last bits of a
#: near-zero gradient into up to a learning rate (1e-4 here) per step: weights within 1e-3 after 8 steps.
#: The epochs' losses and accuracies, averages over photos, agree far closer (2e-6 seen).
WORKERS_WEIGHTS, WORKERS_EPOCHS = 1e-3, 1e-4


def _same_as_one_process(run: dict, one: dict, weights: float, epochs: float | None = None) -> None:
    n = one["finetune"]["n_test"]
    assert abs(run["finetune"]["accuracy"] - one["finetune"]["accuracy"]) * n <= 1 + 1e-9  # within one photo
    assert _max_diff(run["weights"], one["weights"]) <= weights
    assert run["epochs"].keys() == one["epochs"].keys() and "train/loss" in one["epochs"]
    for k, v in one["epochs"].items():
        assert run["epochs"][k] == pytest.approx(v, abs=epochs if epochs is not None else weights), k


@pytest.mark.slow
@pytest.mark.sample_data
def test_two_torchrun_workers_learn_what_one_process_learns(photos_project, one_process):
    res = _stage(photos_project, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "-m", "stages.finetune")
    run = _outcome(photos_project)
    assert run["finetune_run"]["engine"] == "torchrun" and run["finetune_run"]["world_size"] == 2
    assert "across 2 workers (torchrun)" in res.stdout
    # The weights compared are trained ones: equal weights must not mean "nothing trained".
    assert one_process["finetune_run"]["kept"] == "fine-tuned" and one_process["finetune_run"]["best_epoch"] == 2
    _same_as_one_process(run, one_process, WORKERS_WEIGHTS, WORKERS_EPOCHS)


@pytest.mark.slow
@pytest.mark.sample_data
def test_two_ray_train_workers_learn_what_one_process_learns(photos_project, one_process):
    import_or_skip("ray.train.torch", "Ray Train is not installed: pip install -e '.[ray]' (CI installs it)")
    set_finetune(photos_project, engine="ray", workers=2)
    try:
        res = _stage(photos_project, sys.executable, "-m", "stages.finetune")
    finally:
        set_finetune(photos_project, engine="local", workers=1)
    run = _outcome(photos_project)
    assert run["finetune_run"]["engine"] == "ray" and run["finetune_run"]["world_size"] == 2
    assert "on 2 Ray Train workers" in res.stdout
    _same_as_one_process(run, one_process, WORKERS_WEIGHTS, WORKERS_EPOCHS)
    # Ray's records went with the run's checkpoint folder once the model was written.
    assert not any((photos_project / "data/cache/finetune").iterdir())


def _start(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=path, env=stage_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_after_saves(path: Path, proc: subprocess.Popen, saves: int, delay: float, timeout=300) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after it wrote its checkpoint ``saves`` more times (a rename each)."""
    seen, deadline = set(), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for f in (path / "data/cache/finetune").glob("*/checkpoint.safetensors"):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            seen.add((st.st_ino, st.st_mtime_ns))
        if len(seen - _kill_after_saves.before) >= saves:
            time.sleep(delay)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.sample_data
def test_killed_twice_at_random_moments_it_resumes_to_the_uninterrupted_weights(photos_project, one_process):
    # 30 train photos in batches of 8, 2 epochs: 8 steps, a checkpoint after each (the last of an epoch
    # after its end). Two kills after 1-3 and 1-2 more checkpoints, and up to a step's time later:
    # mid-step, mid-write or between them.
    set_finetune(photos_project, checkpoint_every=1)
    rng = random.Random(int(os.environ.get("TL_KILL_SEED", "0")))
    logs = []
    _kill_after_saves.before = set()
    try:
        for most in (3, 2):
            proc = _start(photos_project)
            _kill_after_saves(photos_project, proc, rng.randint(1, most), rng.uniform(0.0, 1.0))
            logs.append(proc.communicate()[0])
            assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{logs[-1][-2000:]}"
            _kill_after_saves.before = {(f.stat().st_ino, f.stat().st_mtime_ns)
                                        for f in (photos_project / "data/cache/finetune").glob("*/checkpoint.safetensors")}
        res = _stage(photos_project, sys.executable, "-m", "stages.finetune")
    finally:
        set_finetune(photos_project, checkpoint_every=0)
    logs.append(res.stdout)
    text = "".join(logs)
    assert text.count("resuming from epoch") >= 2, f"a run did not resume, so it tested nothing:\n{text[-3000:]}"
    run = _outcome(photos_project)
    _same_as_one_process(run, one_process, 1e-6)
    assert run["finetune"] == one_process["finetune"]
    assert run["finetune_run"]["resumed_from"]
    assert not any((photos_project / "data/cache/finetune").iterdir()), "the checkpoint outlived the model"


@pytest.mark.slow
@pytest.mark.sample_data
def test_a_torchrun_worker_killed_mid_run_is_restarted_from_the_checkpoint(photos_project, one_process):
    set_finetune(photos_project, checkpoint_every=1)
    _kill_after_saves.before = set()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--max-restarts", "1",
                                 "--nproc_per_node", "2", "-m", "stages.finetune"], cwd=photos_project, env=stage_env(),
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        victim = _Child(proc.pid)
        _kill_after_saves(photos_project, victim, 3, 0.0)  # one worker dies; torchrun restarts the group
        out = proc.communicate(timeout=600)[0]
    finally:
        set_finetune(photos_project, checkpoint_every=0)
    assert proc.returncode == 0, out[-3000:]
    assert victim.killed and "resuming from epoch" in out, out[-3000:]
    run = _outcome(photos_project)
    assert run["finetune_run"]["engine"] == "torchrun" and run["finetune_run"]["resumed_from"]
    _same_as_one_process(run, one_process, WORKERS_WEIGHTS, WORKERS_EPOCHS)


class _Child:
    """The last worker torchrun started under ``pid``, as :func:`_kill_after_saves` kills it."""

    def __init__(self, pid: int):
        self.pid, self.killed = pid, False

    def poll(self):
        return None if Path(f"/proc/{self.pid}").exists() else 0

    def send_signal(self, sig) -> None:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        os.kill(int(children[-1]), sig)
        self.killed = True


def _params_with(tmp_path: Path, **finetune) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"].update(finetune)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path / "params.yaml"


@pytest.mark.parametrize("settings, says", [
    ({"workers": 0}, "finetune.workers must be a whole number >= 1, found 0"),
    ({"engine": "spark"}, "unknown finetune.engine 'spark'"),
    ({"checkpoint_every": -1}, "finetune.checkpoint_every must be a whole number >= 0"),
    ({"ray": {"address": 7}}, "finetune.ray.address must be a string"),
    ({"ray": {"cpus_per_worker": 0}}, "finetune.ray.cpus_per_worker"),
])
def test_bad_worker_params_are_one_line_errors(tmp_path, settings, says):
    with pytest.raises(PipelineError, match=re.escape(says)) as e:
        load_config(_params_with(tmp_path, **settings))
    assert "\n" not in str(e.value)


def test_several_workers_in_one_process_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_params_with(tmp_path, workers=2, device="cpu"))
    with pytest.raises(PipelineError, match="finetune.workers is 2 with finetune.engine: local.*torchrun "
                                            "--nproc_per_node 2 -m stages.finetune"):
        run_finetune(cfg, prepared_dir="data/prepared", features_dir="data/features", out_dir="models/finetune",
                     live_dir="dvclive", reports_dir="reports", cache_dir="data/cache/finetune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_an_unreachable_ray_address_is_refused_in_seconds_not_minutes(tmp_path, monkeypatch):
    import_or_skip("ray.train.torch", "Ray Train is not installed: pip install -e '.[ray]' (CI installs it)")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(_params_with(tmp_path, engine="ray", workers=2, ray={"address": f"127.0.0.1:{port}"}))
    t = time.perf_counter()
    with pytest.raises(PipelineError, match=f"nothing answers at finetune.ray.address '127.0.0.1:{port}'"):
        run_finetune(cfg, prepared_dir="data/prepared", features_dir="data/features", out_dir="models/finetune",
                     live_dir="dvclive", reports_dir="reports", cache_dir="data/cache/finetune")
    assert time.perf_counter() - t < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_missing_ray_extra_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does when a package is not installed
    with pytest.raises(PipelineError, match=r"finetune.engine is 'ray' but Ray is not installed; install it with "
                                            r"pip install 'transfer-pipeline\[ray\]'"):
        import_ray("finetune.engine", "ray.train.torch")


# ------------------------------------------------------ the loop's parts, in-process

#: 64-pixel inputs on resnet18 with random weights: plumbing, ten times faster than 224 pixels.
SMALL = TransformSpec(72, 64, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FAST = FinetuneConfig(epochs=2, batch_size=4, val_fraction=0.0, device="cpu", precision="fp32")


def _tiny(tmp_path, n=6):
    folder = make_class_folder(tmp_path / "photos", {"red": n, "blue": n})
    rows = [Row(f"{c}/{f.name}", label, "train", sha256(f))
            for label, c in enumerate(("blue", "red")) for f in sorted((folder / c).iterdir())]
    return folder, rows


def _net(seed=0):
    torch.manual_seed(seed)
    bb = load_backbone("resnet18", "none")
    return FineTuneNet(bb.features, nn.Linear(bb.feature_dim, 2))


def _fit(net, folder, rows, checkpoints=None, val_rows=(), log=lambda s: None, workers=None, on_epoch=None,
         **changes):
    return fit(net, backbone="resnet18", root=folder, train_rows=rows, val_rows=list(val_rows),
               transform_spec=SMALL, cfg=dataclasses.replace(FAST, **changes), log=log,
               checkpoints=checkpoints, workers=workers, on_epoch=on_epoch)


def test_the_workers_shares_of_a_step_are_the_one_process_batch():
    for n, batch, world in ((10, 4, 2), (9, 4, 3), (5, 4, 2), (7, 3, 4)):
        alone = list(GlobalBatches(n, batch, seed=3, epoch=2))
        shares = [list(GlobalBatches(n, batch, seed=3, epoch=2, rank=r, world_size=world)) for r in range(world)]
        for step, items in enumerate(alone):
            together = sorted(item for share in shares for item in share[step])
            assert together == sorted(items)  # the same photos, each with the same augmentation seed
        assert sorted(i for b in alone for i, _ in b) == list(range(n))
        later = list(GlobalBatches(n, batch, seed=3, epoch=2, start=1))
        assert later == alone[1:]
    assert list(GlobalBatches(10, 4, seed=3, epoch=1)) != list(GlobalBatches(10, 4, seed=3, epoch=2))


def test_a_photos_augmentation_depends_on_its_seed_not_on_who_decodes_it(tmp_path):
    folder, rows = _tiny(tmp_path, 2)
    images = RowImages(folder, rows, SMALL.augment((0.25, 1.0), "trivialaugment", 0.5))
    a, b = images[(1, 1234)][0], images[(1, 1234)][0]
    torch.rand(5)  # the global generator moved on: no effect
    assert torch.equal(a, b) and torch.equal(a, images[(1, 1234)][0])
    assert not torch.equal(a, images[(1, 4321)][0])


def test_each_worker_trains_on_its_own_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert worker_device(cpu, 3, 0) == cpu
    assert worker_device(cuda, 1, 2) == torch.device("cuda", 1)
    with pytest.raises(PipelineError, match="worker 2 of this node has no GPU: the node has 2"):
        worker_device(cuda, 2, 2)
    assert backend_for(cpu) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                 "MASTER_PORT": "1"})
    assert not launched_by_torchrun({"RANK": "0"})


class _Killed(Exception):
    pass


def test_a_resumed_run_ends_where_the_unbroken_one_does(tmp_path):
    folder, rows = _tiny(tmp_path)
    unbroken = _net()
    _fit(unbroken, folder, rows)
    store = Checkpoints(tmp_path / "cache", "a" * 64)

    def die_in_epoch_2(epoch, m):  # after its last step, before its end's checkpoint
        if epoch == 2:
            raise _Killed

    with pytest.raises(_Killed):
        _fit(_net(), folder, rows, store, on_epoch=die_in_epoch_2, checkpoint_every=1)
    said, epochs = [], []
    resumed = _net(seed=5)  # every weight comes from the checkpoint
    result = _fit(resumed, folder, rows, Checkpoints(tmp_path / "cache", "a" * 64, said.append),
                  log=said.append, on_epoch=lambda e, m: epochs.append(e), checkpoint_every=1)
    assert result.resumed_from == "epoch 2, step 2", said  # 12 photos, batches of 4: steps 1 and 2 of 3 saved
    assert any("resuming from epoch 2, step 2 of 3" in s for s in said)
    assert epochs == [1, 2]  # epoch 1 replayed from the checkpoint (DVCLive's log starts empty), then 2
    for k, v in unbroken.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_torn_checkpoint_is_ignored_and_the_run_starts_over(tmp_path):
    folder, rows = _tiny(tmp_path)
    store = Checkpoints(tmp_path / "cache", "c" * 64)
    _fit(_net(), folder, rows, store, epochs=1)
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])  # what a kill during a plain write would leave
    said = []
    assert store.load() is None
    result = _fit(_net(), folder, rows, Checkpoints(tmp_path / "cache", "c" * 64, said.append), epochs=1)
    assert result.resumed_from is None
    assert any("ignoring the unreadable checkpoint" in s for s in said), said


def test_a_checkpoint_of_other_params_is_not_loaded(tmp_path):
    folder, rows = _tiny(tmp_path)
    store = Checkpoints(tmp_path / "cache", "d" * 64)
    _fit(_net(), folder, rows, store, epochs=1)
    other = Checkpoints(tmp_path / "cache", "d" * 16 + "e" * 48)  # the same folder, another run's key
    said = []
    other.log = said.append
    assert other.load() is None
    assert any("written for other params or photos" in s for s in said), said
    # The keys differ whenever what is learned differs, and never for where it runs.
    key = functools.partial(run_key, backbone={"backbone": "resnet18"}, precision="fp32", train_rows=rows,
                            val_rows=[], start=_net().state_dict())
    base = key(FAST.learned_dict())
    assert key(dataclasses.replace(FAST, workers=4, engine="ray", checkpoint_every=3).learned_dict()) == base
    assert key(dataclasses.replace(FAST, lr_head=1e-3).learned_dict()) != base
    assert run_key(FAST.learned_dict(), backbone={"backbone": "resnet18"}, precision="fp32", train_rows=rows[1:],
                   val_rows=[], start=_net().state_dict()) != base
    assert run_key(FAST.learned_dict(), backbone={"backbone": "resnet18"}, precision="fp32", train_rows=rows,
                   val_rows=[], start=_net(seed=1).state_dict()) != base


def _two_workers(rank, port, folder, rows, val, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = _net()
        workers = Workers("torchrun", rank, 2, torch.device("cpu"))
        result = _fit(net, folder, rows, val_rows=val, workers=workers, val_fraction=0.25)
        if rank == 0:
            torch.save({"history": result.history, "state": net.state_dict()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_validation_is_gathered_across_workers_not_averaged(tmp_path):
    folder, rows = _tiny(tmp_path, 7)
    # 3 validation photos on 2 workers: shares of 2 and 1, where a mean of the workers' means is wrong.
    val, train = rows[:2] + rows[-1:], rows[2:-1]
    torch.set_num_threads(1)
    alone = _net()
    history = _fit(alone, folder, train, val_rows=val, val_fraction=0.25).history
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_two_workers, args=(port, folder, train, val, out), nprocs=2)
    two = torch.load(out, weights_only=True)
    assert [h["epoch"] for h in two["history"]] == [h["epoch"] for h in history] == [0, 1, 2]
    for h1, h2 in zip(history, two["history"]):
        for k in ("val/loss", "val/accuracy", "train/loss", "train/accuracy"):
            if k in h1:
                assert h2[k] == pytest.approx(h1[k], abs=WORKERS_EPOCHS), (h1["epoch"], k)
    for k, v in alone.state_dict().items():
        assert torch.allclose(v, two["state"][k], atol=WORKERS_WEIGHTS), k
