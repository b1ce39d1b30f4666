"""Can a Dask cluster run this project's cohort? Ask it before submitting anything.

``check_workers(client, model)`` runs ``probe.probe`` on each worker (``client.run``) and
returns a ``WorkerInfo`` per worker: host, threads, resources (``GPU``), the project's version
and source digest there, and what keeps it from running a cohort, if anything: the project not
importable, another version or other code than this client's, the segmentation model unknown
or its local files missing. ``check_scheduler`` asks the scheduler the same (it unpickles the
task graph, so it needs the project too). ``require_compatible`` turns the first problem into
a one-line ``CLUSTER_MISMATCH`` refusal naming the machine and what to install there.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import cloudpickle

from .. import __version__
from ..errors import ErrorCode, PipelineError
from . import probe as _probe

DISTRIBUTION = "knee-mri-app"  # pyproject's [project] name
GPU = "GPU"  # the Dask resource a segmenting (GPU) worker offers
PACKAGE = Path(__file__).resolve().parents[1]  # this client's pipeline/
# A machine that has not answered by then counts as unfit (e.g. a worker that failed to start,
# say on a worker plugin it could not unpickle, yet is still listed by the scheduler).
CHECK_TIMEOUT_S = 60.0

# Sent by value: a worker without the project can still run the probe (it is stdlib-only).
if _probe.__name__ not in cloudpickle.list_registry_pickle_by_value():
    cloudpickle.register_pickle_by_value(_probe)


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the cohort sees it; ``problem`` is None when it can run cohort tasks."""

    address: str
    role: str = "worker"  # or "scheduler"
    name: str = ""
    host: str = ""
    nthreads: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    python: str = ""
    version: str | None = None  # the project's version there (None: not importable)
    location: str | None = None  # where its ``pipeline`` package lives there
    digest: str | None = None  # ``probe.source_digest`` of that package
    problem: str | None = None  # e.g. "cannot import the project (No module named 'pipeline')"

    @property
    def gpus(self) -> float:
        return float(self.resources.get(GPU, 0))


def local_identity() -> tuple[str, str]:
    """This client's project version and source digest (what every worker must match)."""
    return __version__, _probe.source_digest(str(PACKAGE))


def install_hint() -> str:
    """What to ``pip install`` on another machine to run this client's project: the checkout
    or the source it was installed from when that is known, else the distribution's version."""
    checkout = PACKAGE.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "app.py").is_file():
        return f"pip install {checkout}"
    try:
        dist = metadata.distribution(DISTRIBUTION)
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        direct = {}
    url = direct.get("url", "")
    if "vcs_info" in direct:
        vcs = direct["vcs_info"]
        return f"pip install {vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id', '')}".rstrip("@")
    if url.startswith("file://") and Path(unquote(urlparse(url).path)).exists():
        return f"pip install {unquote(urlparse(url).path)}"
    if url:
        return f"pip install {url}"
    return f"pip install {DISTRIBUTION}=={__version__}"


def workers_now(client) -> dict[str, dict]:
    """The scheduler's workers, asked now. (``Client.scheduler_info`` returns a cache that the
    client's own heartbeat may have just replaced by one without per-worker entries.)"""
    return client.sync(client.scheduler.identity, n_workers=-1).get("workers", {})


def check_workers(client, model: str | None = None, *,
                  timeout_s: float = CHECK_TIMEOUT_S) -> list[WorkerInfo]:
    """Probe every worker of ``client``'s cluster (all at once, each within ``timeout_s``);
    ``model``: the segmentation model the cohort will use (checked on the workers that would
    segment: those offering ``GPU`` when any does, else all)."""
    workers = workers_now(client)
    answers = client.sync(_ask_workers, client, list(workers), model, timeout_s)
    segmenting = _segmenting({a: w.get("resources", {}) for a, w in workers.items()})
    version, digest = local_identity()
    infos = []
    for address, w in sorted(workers.items()):
        answer = answers.get(address)
        if answer is None:  # left the cluster between the two calls
            continue
        facts = answer if isinstance(answer, dict) else {}
        infos.append(WorkerInfo(
            address=address, name=str(w.get("name", "")), host=facts.get("host", w.get("host", "")),
            nthreads=int(w.get("nthreads", 0)), resources=dict(w.get("resources", {})),
            python=facts.get("python", ""), version=facts.get("version"),
            location=facts.get("location"), digest=facts.get("digest"),
            problem=_problem(answer, version, digest, address in segmenting, model),
        ))
    return infos


async def _ask_workers(client, addresses: list[str], model: str | None,
                       timeout_s: float) -> dict:
    async def ask(address: str):
        try:
            answers = await client.run(_probe.probe, model, workers=[address], on_error="return",
                                       asynchronous=True, callback_timeout=timeout_s)
        except TimeoutError:
            return address, TimeoutError(f"no answer within {timeout_s:g} s")
        return address, answers.get(address)

    return dict(await asyncio.gather(*(ask(a) for a in addresses)))


def check_scheduler(client, *, timeout_s: float = CHECK_TIMEOUT_S) -> WorkerInfo:
    """The scheduler as ``check_workers`` sees a worker (it needs the project, not a model)."""
    address = client.scheduler.address
    try:
        answer = client.run_on_scheduler(_probe.probe, callback_timeout=timeout_s)
    except Exception as exc:  # the probe could not run there, or did not answer
        answer = exc
    version, digest = local_identity()
    facts = answer if isinstance(answer, dict) else {}
    return WorkerInfo(address=address, role="scheduler", name="scheduler",
                      host=facts.get("host", ""), python=facts.get("python", ""),
                      version=facts.get("version"), location=facts.get("location"),
                      digest=facts.get("digest"),
                      problem=_problem(answer, version, digest, False, None))


def require_compatible(client, model: str | None = None) -> list[WorkerInfo]:
    """``check_scheduler`` and ``check_workers``, refusing with ``CLUSTER_MISMATCH`` (one line:
    the first unfit machine, why, what to install there; the others after it) when any is
    unfit. Returns the workers' infos."""
    infos = check_workers(client, model)
    unfit = [w for w in [check_scheduler(client), *infos] if w.problem]
    if unfit:
        first = unfit[0]
        message = f"{first.role} {first.address} {first.problem}: {_remedy(first)}"
        if len(unfit) > 1:
            others = ", ".join(f"{w.role} {w.address} ({w.problem})" for w in unfit[1:])
            message += f"; also {others}"
        raise PipelineError(ErrorCode.CLUSTER_MISMATCH, message)
    return infos


def _segmenting(resources: dict[str, dict]) -> set[str]:
    gpu = {a for a, r in resources.items() if r.get(GPU, 0) > 0}
    return gpu or set(resources)


def _problem(answer, version: str, digest: str, segments: bool, model: str | None) -> str | None:
    missing = re.search(r"No module named '(pipeline[\w.]*)'", str(answer))
    if isinstance(answer, BaseException) and missing:  # the probe came by reference after all
        return f"cannot import the project ({missing.group(0)})"
    if isinstance(answer, TimeoutError):
        return f"did not answer the project check ({answer}; see its log)"
    if isinstance(answer, BaseException):  # the probe itself could not run there
        return f"cannot run the project check ({type(answer).__name__}: {answer})"
    module, reason = answer.get("import_error") or (None, None)
    if answer.get("version") is None:
        return f"cannot import the project ({reason})"
    if answer["version"] != version:
        return f"runs {DISTRIBUTION} {answer['version']}, not {version} as this client"
    if answer.get("digest") != digest:
        return (f"runs other code of {DISTRIBUTION} {version} than this client "
                f"({answer.get('location')})")
    if module is not None:
        return f"cannot import {module} ({reason})"
    if segments and model is not None and answer.get("model_error"):
        return f"cannot use segmentation model {model} ({answer['model_error']})"
    return None


def _remedy(info: WorkerInfo) -> str:
    if info.problem and info.problem.startswith("cannot use segmentation model"):
        return "put the model's files at the same path there, or choose another --model"
    return f"{install_hint()} there"
