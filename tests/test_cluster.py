"""``cohort --scheduler`` on a real Dask cluster started outside the checkout, and the check
that refuses a cluster whose machines cannot run this project (``CLUSTER_MISMATCH``).

The scheduler and two workers run in a fresh virtual environment with the project
``pip install``-ed (``install_env``), started from a temporary folder without PYTHONPATH; a
third worker runs in one without the project. About 60 s on two cores.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
from conftest import free_port, free_ports
from install_env import ROOT, bare_env, clean_env, installed_env

from pipeline import __version__
from pipeline.cohort import cluster, probe
from pipeline.errors import ErrorCode, PipelineError
from pipeline.synthetic import phantom as P

TIMING = ["seconds", "started_utc", "finished_utc"]


def _start(python: Path, args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(python), "-m", "dask", *args], cwd=cwd, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _wait_for_workers(address: str, n: int, procs: list[subprocess.Popen]) -> None:
    from distributed import Client

    deadline = time.monotonic() + 120
    while True:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info(n_workers=-1)["workers"]) == n:
                    return
        except OSError:
            pass
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"cluster did not come up: {dead}"
        time.sleep(1)


@pytest.fixture(scope="module")
def envs(tmp_path_factory) -> dict:
    return {"installed": installed_env(tmp_path_factory.mktemp("installed")),
            "bare": bare_env(tmp_path_factory.mktemp("bare")),
            "outside": tmp_path_factory.mktemp("outside")}  # the processes' working folder


@pytest.fixture(scope="module")
def dask_cluster(envs):
    """``dask scheduler`` and two ``dask worker`` of the installed environment."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    python, cwd = envs["installed"], envs["outside"]
    procs = [_start(python, ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                             "--no-dashboard"], cwd)]
    try:
        procs += [_start(python, ["worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                  "--no-dashboard", "--name", f"w{i}"], cwd) for i in range(2)]
        _wait_for_workers(address, 2, procs)
        yield address
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Two small phantom knees with their segmentations (a manifest CSV)."""
    root = tmp_path_factory.mktemp("study")
    rows = []
    for i, side in enumerate(("left", "right")):
        spec = P.PhantomSpec(size=(130, 130, 100), spacing=(0.9, 0.9, 0.9), side=side,
                             fem_cart_mm=(2.0 - 0.2 * i, 2.0), seed=i)
        paths = P.write_phantom(P.generate(spec), root, stem=f"knee{i}")
        rows.append({"id": f"knee{i}", "image": paths["image"].name, "seg": paths["seg"].name})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "seg"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def _installed_cohort(envs, *args: str) -> subprocess.CompletedProcess:
    """``knee-pipeline cohort`` of the installed environment, run outside the checkout."""
    return subprocess.run([str(envs["installed"].parent / "knee-pipeline"), "cohort", *args],
                          cwd=envs["outside"], env=clean_env(), capture_output=True, text=True,
                          timeout=600)


def test_scheduler_run_equals_local_run(envs, dask_cluster, study, tmp_path: Path) -> None:
    local = subprocess.run(
        [sys.executable, "-m", "pipeline", "cohort", str(study), "--out", str(tmp_path / "local"),
         "--workers", "2"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr
    remote = _installed_cohort(envs, str(study), "--out", str(tmp_path / "remote"),
                               "--scheduler", dask_cluster)
    assert remote.returncode == 0, remote.stderr
    assert "2 worker(s)" in remote.stderr
    a = pd.read_csv(tmp_path / "local" / "cohort_results.csv")
    b = pd.read_csv(tmp_path / "remote" / "cohort_results.csv")
    assert list(b["status"]) == ["done", "done"] and len(b.columns) > 30
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), b.drop(columns=TIMING),
                                  check_exact=False, rtol=0, atol=1e-9)


@pytest.fixture
def mixed_cluster(envs):
    """A cluster no cohort has used yet (so no worker plugin of the project is registered, which
    a worker without the project could not even start with): a scheduler and a worker of the
    installed environment, and a worker of the environment without the project."""
    proc = subprocess.run([str(envs["bare"]), "-c", "import distributed, pipeline"],
                          cwd=envs["outside"], env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "No module named 'pipeline'" in proc.stderr, proc.stderr
    port, bare_port = free_ports(2)
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start(envs["installed"], ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                        "--no-dashboard"], envs["outside"])]
    try:
        procs.append(_start(envs["installed"], ["worker", address, "--host", "127.0.0.1",
                                                "--nthreads", "1", "--no-dashboard"],
                            envs["outside"]))
        procs.append(_start(envs["bare"], ["worker", address, "--host", "127.0.0.1",
                                           "--worker-port", str(bare_port), "--nthreads", "1",
                                           "--no-dashboard", "--name", "bare"], envs["outside"]))
        _wait_for_workers(address, 2, procs)
        yield address, f"tcp://127.0.0.1:{bare_port}"
    finally:
        _stop(procs)


def test_worker_without_the_project_is_refused(envs, mixed_cluster, study,
                                               tmp_path: Path) -> None:
    address, bare_worker = mixed_cluster
    out = tmp_path / "out"
    proc = _installed_cohort(envs, str(study), "--out", str(out), "--scheduler", address)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error[CLUSTER_MISMATCH]: worker {bare_worker} cannot import the "
                           "project (No module named 'pipeline'): pip install "), last
    assert last.endswith(" there"), last
    assert not list((out / "cases").iterdir())  # nothing was submitted

    from distributed import Client

    with Client(address, timeout=10) as client:
        infos = {w.address: w for w in cluster.check_workers(client)}
        assert bare_worker in infos and len(infos) == 2
        good = [w for a, w in infos.items() if a != bare_worker]
        assert all(w.problem is None and w.version == __version__ and w.nthreads == 1
                   and w.location and w.location.startswith(str(envs["installed"].parents[1]))
                   for w in good), good
        assert infos[bare_worker].version is None and infos[bare_worker].host
        # Should the probe travel by reference (the worker then cannot even unpickle it), the
        # refusal is just as specific.
        cloudpickle.unregister_pickle_by_value(probe)
        try:
            infos = {w.address: w for w in cluster.check_workers(client)}
        finally:
            cloudpickle.register_pickle_by_value(probe)
        assert infos[bare_worker].problem == ("cannot import the project "
                                              "(No module named 'pipeline')")
        assert all(infos[w.address].problem is None for w in good)
        assert cluster.check_scheduler(client).problem is None


def test_worker_that_cannot_start_is_named(envs, dask_cluster) -> None:
    """A worker without the project that joins once a cohort has registered its worker plugin
    fails to start yet stays listed: the check names it after its timeout instead of hanging."""
    from distributed import Client

    from pipeline.cohort.runner import SEGMENTER_PLUGIN, SegmenterPlugin

    with Client(dask_cluster, timeout=10) as client:
        client.register_plugin(SegmenterPlugin())
        port = free_port()
        stuck = _start(envs["bare"], ["worker", dask_cluster, "--host", "127.0.0.1",
                                      "--worker-port", str(port), "--nthreads", "1",
                                      "--no-dashboard", "--name", "stuck"], envs["outside"])
        try:
            _wait_for_workers(dask_cluster, 3, [stuck])
            t0 = time.monotonic()
            infos = {w.address: w for w in cluster.check_workers(client, timeout_s=5)}
            assert time.monotonic() - t0 < 15
        finally:
            _stop([stuck])  # first: a call to every worker would wait for it, too
            _wait_for_workers(dask_cluster, 2, [])
            client.unregister_worker_plugin(SEGMENTER_PLUGIN)
    assert infos[f"tcp://127.0.0.1:{port}"].problem == (
        "did not answer the project check (no answer within 5 s; see its log)")
    assert sum(w.problem is None for w in infos.values()) == 2


class _FakeClient:
    """What ``check_workers`` / ``check_scheduler`` use of a distributed ``Client``."""

    def __init__(self, workers: dict[str, dict], answers: dict, scheduler_answer=None):
        self.workers, self.answers = workers, answers
        self.scheduler_answer = scheduler_answer
        fake = self

        class Rpc:
            address = "tcp://10.0.0.1:8786"

            async def identity(self, n_workers=-1):
                return {"workers": fake.workers}

        self.scheduler = Rpc()
        self.model = "unset"

    def sync(self, fn, *args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    async def run(self, fn, model, *, workers, on_error, asynchronous, callback_timeout):
        assert fn is probe.probe and on_error == "return" and asynchronous
        self.model = model
        if self.answers[workers[0]] == "hang":  # a distributed Client times out the call
            await asyncio.wait_for(asyncio.sleep(callback_timeout + 1), callback_timeout)
        return {a: self.answers[a] for a in workers}

    def run_on_scheduler(self, fn, callback_timeout):
        return self.scheduler_answer or probe.probe()


def _answer(**changes) -> dict:
    version, digest = cluster.local_identity()
    return {"host": "h", "python": "3.11.7", "version": version, "location": "/x",
            "digest": digest, "import_error": None, "model_error": None, **changes}


def test_refusals_name_the_machine_the_reason_and_the_remedy() -> None:
    """Each problem a worker can have, as the one-line refusal says it (no cluster needed)."""
    cpu = {"nthreads": 4, "resources": {}}
    gpu = {"nthreads": 1, "resources": {"GPU": 1}}
    cases = [
        (_answer(version="0.0.9"), "runs knee-mri-app 0.0.9, not "),
        (_answer(digest="0" * 16), "runs other code of knee-mri-app"),
        (_answer(import_error=["pipeline.run", "No module named 'vtk'"]),
         "cannot import pipeline.run (No module named 'vtk')"),
        (RuntimeError("boom"), "cannot run the project check (RuntimeError: boom)"),
        (TimeoutError("no answer within 60 s"),
         "did not answer the project check (no answer within 60 s; see its log)"),
    ]
    for answer, reason in cases:
        client = _FakeClient({"tcp://a:1": cpu}, {"tcp://a:1": answer})
        with pytest.raises(PipelineError) as err:
            cluster.require_compatible(client, None)
        assert err.value.code is ErrorCode.CLUSTER_MISMATCH
        text = str(err.value)
        assert text.startswith(f"error[CLUSTER_MISMATCH]: worker tcp://a:1 {reason}"), text
        assert text.endswith(f"{cluster.install_hint()} there") and "\n" not in text

    # A model's files missing matter only on the workers that segment (GPU ones when any).
    missing = _answer(model_error="the files of model m are missing (/models/m)")
    client = _FakeClient({"tcp://cpu:1": cpu, "tcp://gpu:1": gpu},
                         {"tcp://cpu:1": missing, "tcp://gpu:1": _answer()})
    infos = cluster.require_compatible(client, "m")
    assert client.model == "m" and [w.gpus for w in infos] == [0.0, 1.0]
    client = _FakeClient({"tcp://cpu:1": cpu, "tcp://gpu:1": gpu},
                         {"tcp://cpu:1": _answer(), "tcp://gpu:1": missing})
    with pytest.raises(PipelineError, match=r"worker tcp://gpu:1 cannot use segmentation model "
                                            r"m \(the files of model m are missing"):
        cluster.require_compatible(client, "m")
    # The scheduler unpickles the task graph: it needs the project too. Every unfit machine is
    # named on the one line.
    client = _FakeClient({"tcp://a:1": cpu}, {"tcp://a:1": _answer(version=None, import_error=[
        "pipeline", "No module named 'pipeline'"])}, scheduler_answer=_answer(version="0.0.9"))
    with pytest.raises(PipelineError) as err:
        cluster.require_compatible(client)
    assert str(err.value).startswith(
        "error[CLUSTER_MISMATCH]: scheduler tcp://10.0.0.1:8786 runs knee-mri-app 0.0.9")
    assert str(err.value).endswith("; also worker tcp://a:1 (cannot import the project "
                                   "(No module named 'pipeline'))")


def test_workers_are_asked_at_once_each_within_the_timeout() -> None:
    cpu = {"nthreads": 1, "resources": {}}
    client = _FakeClient({f"tcp://w:{i}": cpu for i in range(3)},
                         {"tcp://w:0": _answer(), "tcp://w:1": "hang", "tcp://w:2": "hang"})
    t0 = time.monotonic()
    infos = cluster.check_workers(client, timeout_s=0.5)
    assert time.monotonic() - t0 < 1.4  # concurrently: not 0.5 s per silent worker
    assert [w.problem for w in infos] == [None] + 2 * [
        "did not answer the project check (no answer within 0.5 s; see its log)"]


def test_probe_here_knows_the_demo_model_and_refuses_unknown_ones() -> None:
    here = probe.probe("demo_phantom")
    assert here["version"] == __version__ and here["import_error"] is None
    assert here["digest"] == cluster.local_identity()[1] and here["model_error"] is None
    assert "unknown segmentation model" in probe.probe("no_such_model")["model_error"]
    assert "No module named" in probe._reason(ModuleNotFoundError("No module named 'x'"))
