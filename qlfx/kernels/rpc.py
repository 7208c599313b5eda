"""Tuning over TVM's RPC tracker: MetaSchedule's builder/runner pair for boards and machines a user registers.

A user starts TVM's own tracker and servers (nothing of qlfx runs there)::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190            # needs `pip install tornado`
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY          # on every board / machine

and tunes with ``qlfx tune MODEL --rpc-tracker HOST:9190 --rpc-key KEY`` (or ``qlfx.tune(...,
rpc_tracker=..., rpc_key=...)``). Candidates are *built here* (:class:`ExportingBuilder`: in-process
``tirx.build`` + ``export_library`` to a shared object, which RPCRunner uploads) and *measured there*
by MetaSchedule's own ``RPCRunner`` (one measurement per tracker session, so trials spread over every
free server with the key).

Failure model: a server that dies takes only its in-flight trials with it. MetaSchedule records
those as failed runs (run seconds 1e10), which qlfx's record lookup
(:func:`qlfx.kernels.tuning._valid_seconds`) ignores; the database files stay valid JSON lines; the
tracker drops the dead server and hands later trials to the others.

Note the tracker and server port ranges: ``tvm.exec.rpc_tracker`` / ``rpc_server`` search
``[--port, --port-end)``, default end 9199, so a port above 9199 needs ``--port-end`` as well.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import UsageError

DEFAULT_PORT = 9190


@dataclass
class RPCSettings:
    """Where to measure: a tracker address and the key its servers registered with.

    ``session_timeout``: seconds one measurement may take on a server (longer: reported as failed);
    ``number``/``repeat``/``min_repeat_ms``: timing of each candidate (time_evaluator semantics);
    ``max_workers``: measurements in flight at once (default: the number of servers with the key).
    """

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout: float = 60.0
    priority: int = 1
    number: int = 5
    repeat: int = 3
    min_repeat_ms: int = 20
    max_workers: int | None = None
    _tools: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, tracker: str, key: str | None, **options) -> "RPCSettings":
        """``"HOST:PORT"`` (or ``"HOST"``: port 9190) and a key -> settings; bad input -> UsageError."""
        if not key:
            raise UsageError(f"an RPC tracker ({tracker}) needs the key its servers registered with "
                             "(--rpc-key KEY / rpc_key=..., the --key given to tvm.exec.rpc_server)")
        text = str(tracker).strip()
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(DEFAULT_PORT)
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not host or not 0 < port < 65536:
            raise UsageError(f"RPC tracker '{tracker}' is not HOST:PORT (e.g. 127.0.0.1:9190)")
        return cls(host, port, str(key), **options)

    @property
    def address(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    def rpc_config(self) -> Any:
        return ms.runner.RPCConfig(tracker_host=self.tracker_host, tracker_port=self.tracker_port,
                                   tracker_key=self.key, session_priority=self.priority,
                                   session_timeout_sec=int(math.ceil(self.session_timeout)))

    def check(self, connect_timeout: float = 5.0) -> int:
        """Number of servers registered with the key; a UsageError saying what to start otherwise."""
        servers = servers_with_key(self, connect_timeout)
        if not servers:
            summary = _tracker_summary(self, connect_timeout)
            keys = sorted({item["key"].split(":", 1)[-1] for item in summary.get("server_info", [])})
            raise UsageError(
                f"the RPC tracker at {self.address} has no server with key '{self.key}'"
                + (f" (it has: {', '.join(keys)})" if keys else " (it has no servers)")
                + f". Start one: python -m tvm.exec.rpc_server --tracker {self.address} --key {self.key}")
        return len(servers)

    def builder_runner(self) -> dict:
        """``{"builder": ..., "runner": ...}`` for ms.tune_tasks; made once (the runner's worker pool
        starts processes), after :meth:`check`."""
        if not self._tools:
            workers = self.max_workers or self.check()
            self._tools["builder"] = ExportingBuilder()
            self._tools["runner"] = ms.runner.RPCRunner(
                self.rpc_config(),
                ms.runner.EvaluatorConfig(number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms,
                                          enable_cpu_cache_flush=False),
                max_workers=workers)
        return dict(self._tools)


def _tracker_summary(settings: RPCSettings, connect_timeout: float) -> dict:
    """The tracker's summary; an unreachable address fails in ``connect_timeout`` seconds (tvm's own
    client retries for a minute) with what to do."""
    try:
        with socket.create_connection((settings.tracker_host, settings.tracker_port), timeout=connect_timeout):
            pass
    except OSError as error:
        raise UsageError(
            f"no RPC tracker answers at {settings.address} ({error.strerror or error}). Start one: "
            f"python -m tvm.exec.rpc_tracker --host {settings.tracker_host} --port {settings.tracker_port} "
            f"--port-end {settings.tracker_port + 1} (it needs `pip install tornado`), or fix --rpc-tracker"
        ) from None
    try:
        return tvm.rpc.connect_tracker(settings.tracker_host, settings.tracker_port).summary()
    except Exception as error:  # noqa: BLE001 -- something listens there, but not a TVM tracker
        raise UsageError(f"{settings.address} accepts connections but does not answer as a TVM RPC tracker "
                         f"({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''})"
                         ) from None


def servers_with_key(settings: RPCSettings, connect_timeout: float = 5.0) -> list[tuple[str, int]]:
    """Addresses of the servers the tracker lists under ``settings.key``."""
    summary = _tracker_summary(settings, connect_timeout)
    return [tuple(item["addr"]) for item in summary.get("server_info", [])
            if item["key"].split(":", 1)[-1] == settings.key]


# ------------------------------------------------------------------------------------- builder
@derived_object
class ExportingBuilder(ms.builder.PyBuilder):
    """Builds candidates with ``tvm.tirx.build`` in this process and exports each as a shared object
    that RPCRunner uploads. MetaSchedule's LocalBuilder does the same in fresh worker processes,
    each of which first imports tvm's tensor intrinsics (~30 s of CPU apiece on a small machine)."""

    def build(self, build_inputs: list[Any]) -> list[Any]:
        results = []
        for build_input in build_inputs:
            # RemoveBuildArtifact deletes dirname(artifact_path) after the run: one folder per artifact.
            folder = tempfile.mkdtemp(prefix="qlfx_rpc_")
            path = os.path.join(folder, "candidate.so")
            try:
                module = tvm.tirx.build(build_input.mod, target=build_input.target)
                module.export_library(path)
            except Exception as error:  # noqa: BLE001 -- a candidate that fails to build is a failed trial
                results.append(ms.builder.BuilderResult(None, f"ExportingBuilder: {error}"))
                continue
            results.append(ms.builder.BuilderResult(path, None))
        return results


# ------------------------------------------------------------------------------------ progress
class TrialProgress:
    """``progress(done, total, best_gflops)`` for :func:`qlfx.kernels.tune_branch_product`: one line per
    measured batch with trials done / total, the best so far, elapsed time and an estimate of the time
    left (elapsed / done x remaining)."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream
        self.started = time.perf_counter()

    def line(self, done: int, total: int, best: str) -> str:
        if total == 0:
            return f"{self.label}: from the database, best {best}"
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (total - done) if done else math.nan
        eta = "" if math.isnan(left) else f", ~{_duration(left)} left"
        return f"{self.label}: trials {done}/{total}, best {best}, {_duration(elapsed)} elapsed{eta}"

    def __call__(self, done: int, total: int, best_gflops: float) -> None:
        best = f"{best_gflops:.1f} GFLOP/s" if best_gflops > 0 else "none yet"
        print(self.line(done, total, best), file=self.stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
