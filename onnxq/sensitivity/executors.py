"""Fan sensitivity evaluations out: in-process, over local worker processes, or over Ray.

Every executor returns the losses in the order of the jobs, and every worker builds the same
session from the same :class:`~onnxq.sensitivity.engine.EvalContext` (the fp32 reference is
computed once by the parent) and the same chunks of feeds, so the numbers do not depend on the
executor: the memory budget (``EvalContext.cache_bytes``) is each worker's, like the weights
every worker holds. Split between workers, it gave them smaller chunks, and onnxruntime's
results depend on the batch (its kernels change with it; a dynamically quantized activation
takes its range from the whole batch), so two Ray actors disagreed with one in the fourth
digit. Workers take large batches of jobs, since each batch runs the fp32 pass of every chunk
of feeds once.

Local worker processes share this machine's cores (``EvalContext.threads``: cores ÷ workers
each). Ray actors each reserve one CPU and run single-threaded sessions, spread over the
cluster's nodes, never more actors than the cluster has CPUs (an actor waiting for a CPU would
never start); the context goes to the object store once (the model and, for models over 2 GB,
its weights, which actors on one node then share), and batches of jobs are handed to whichever
actor is free, so a slow node or an expensive batch does not hold the others back.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from onnxq.errors import UsageError
from onnxq.progress import Progress
from onnxq.sensitivity.engine import EvalContext, Evaluator, EvaluatorUsage, Job

__all__ = ["ExecutorSpec", "parse_executor", "require_executor", "run_jobs"]

logger = logging.getLogger(__name__)

#: Fewest jobs sent to a worker at once (amortises inter-process traffic and the worker's fp32
#: passes over the chunks of feeds).
CHUNK = 8
#: Batches of jobs per worker (more: smoother progress; fewer: fewer fp32 passes).
BATCHES_PER_WORKER = 4

_WORKER: Evaluator | None = None


@dataclass(frozen=True)
class ExecutorSpec:
    """``local`` or ``ray`` (with an optional cluster address)."""

    kind: str
    address: str | None = None


def parse_executor(text: str) -> ExecutorSpec:
    """Parse ``local``, ``ray`` or ``ray:ADDRESS``.

    Raises:
        UsageError: anything else.
    """
    text = (text or "local").strip()
    if text == "local":
        return ExecutorSpec("local")
    if text == "ray":
        return ExecutorSpec("ray")
    if text.startswith("ray:") and len(text) > 4:
        return ExecutorSpec("ray", text[4:])
    raise UsageError(f"unknown executor {text!r}", "use local, ray or ray:ADDRESS")


def require_executor(text: str) -> ExecutorSpec:
    """Parse ``text`` and check that its backend is importable (fails before any work).

    Raises:
        UsageError: unknown executor, or ``ray`` without Ray installed.
    """
    spec = parse_executor(text)
    if spec.kind == "ray":
        _import_ray()
    return spec


def _import_ray():  # type: ignore[no-untyped-def]
    try:
        import ray  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise UsageError("the ray executor needs Ray", "install onnxq[ray]") from None
    return ray


def _init_worker(context: EvalContext) -> None:
    global _WORKER
    _WORKER = Evaluator(context)


def _run_chunk(jobs: Sequence[Job]) -> tuple[list[float], EvaluatorUsage]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.losses(jobs), _WORKER.usage()


def _chunks(jobs: Sequence[Job], workers: int) -> list[list[Job]]:
    size = max(CHUNK, math.ceil(len(jobs) / (BATCHES_PER_WORKER * max(workers, 1))))
    return [list(jobs[i:i + size]) for i in range(0, len(jobs), size)]


def run_jobs(
    context: EvalContext,
    jobs: Sequence[Job],
    *,
    workers: int = 0,
    executor: str = "local",
    progress: bool = False,
    local: Evaluator | None = None,
) -> tuple[list[float], EvaluatorUsage | None]:
    """Losses of ``jobs`` in order, and what the evaluators used (the workers' combined, when
    workers ran them; None for no jobs).

    Args:
        context: what each worker builds its session from (``reference`` set).
        jobs: the evaluations.
        workers: ``0``/``1``: in this process; ``N > 1``: N local processes (or N Ray actors).
        executor: ``local``, ``ray`` or ``ray:ADDRESS``.
        progress: a tqdm bar (runs done, rate, ETA) over the evaluations × chunks of feeds.
        local: an in-process evaluator to reuse when running in this process.
    """
    spec = parse_executor(executor)
    if not jobs:
        return [], None
    if spec.kind == "ray" or workers > 1:
        count = max(1, workers)
        threads = 1 if spec.kind == "ray" else max(1, (os.cpu_count() or 1) // count)
        worker_context = replace(context, threads=context.threads or threads)
        with Progress(len(jobs), f"sensitivity ({count} workers)", "evaluation", progress) as bar:
            if spec.kind == "ray":
                return _run_ray(worker_context, jobs, count, spec.address, bar.update)
            return _run_processes(worker_context, jobs, count, bar.update)
    evaluator = local or Evaluator(context)
    chunks = len(evaluator.chunks())
    desc = f"sensitivity ({len(jobs)} evaluations × {chunks} chunk{'s' if chunks > 1 else ''})"
    with Progress(evaluator.runs(jobs), desc, "run", progress) as bar:
        return evaluator.losses(jobs, bar.update), evaluator.usage()


def _run_processes(context: EvalContext, jobs: Sequence[Job], workers: int,
                   advance: Callable[[int], object]) -> tuple[list[float], EvaluatorUsage | None]:
    chunks = _chunks(jobs, workers)
    results: list[list[float] | None] = [None] * len(chunks)
    usage: dict[int, EvaluatorUsage] = {}  # the latest of each worker process (its totals so far)
    ctx = multiprocessing.get_context("spawn")  # onnxruntime thread pools do not survive fork
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(context,)) as pool:
        futures = {pool.submit(_run_chunk, chunk): i for i, chunk in enumerate(chunks)}
        for future in cf.as_completed(futures):
            index = futures[future]
            results[index], latest = future.result()
            usage[latest.process] = latest
            advance(len(chunks[index]))
    return [loss for chunk in results for loss in (chunk or [])], EvaluatorUsage.combined(list(usage.values()))


class _Actor:  # pragma: no cover - runs inside Ray workers
    """A Ray actor: one :class:`Evaluator`, built once, that runs every batch it is handed."""

    def __init__(self, context: EvalContext) -> None:
        self.evaluator = Evaluator(context)

    def losses(self, chunk: list[Job]) -> tuple[list[float], EvaluatorUsage]:
        return self.evaluator.losses(chunk), self.evaluator.usage()


def _actor_count(ray, wanted: int) -> int:  # type: ignore[no-untyped-def]
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if 0 < cpus < wanted:
        logger.warning("sensitivity: %d Ray actors asked for, the cluster has %d CPUs: running %d", wanted, cpus, cpus)
        return cpus
    return wanted


def _run_ray(context: EvalContext, jobs: Sequence[Job], actors: int, address: str | None,
             advance: Callable[[int], object]) -> tuple[list[float], EvaluatorUsage | None]:
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    ref = ray.put(context)
    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_Actor)
    pool = [remote.remote(ref) for _ in range(_actor_count(ray, actors))]
    chunks = _chunks(jobs, len(pool))
    results: list[list[float] | None] = [None] * len(chunks)
    usage: dict[int, EvaluatorUsage] = {}  # per actor (pids may repeat across nodes)
    waiting = list(range(len(chunks)))
    pending = {}
    try:
        for actor in pool[:len(chunks)]:
            index = waiting.pop(0)
            pending[actor.losses.remote(chunks[index])] = (index, actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for obj in done:
                index, actor = pending.pop(obj)
                results[index], usage[pool.index(actor)] = ray.get(obj)
                advance(len(chunks[index]))
                if waiting:
                    following = waiting.pop(0)
                    pending[actor.losses.remote(chunks[following])] = (following, actor)
    finally:
        for actor in pool:
            ray.kill(actor)
    return [loss for chunk in results for loss in (chunk or [])], EvaluatorUsage.combined(list(usage.values()))
