"""Tuning over TVM's RPC tracker (qlfx.kernels.rpc) on loopback: a tracker and two servers started and
stopped here as subprocesses (TVM's own ``tvm.exec.rpc_tracker`` / ``rpc_server``).

The tests that start servers are slow (each server imports tvm: ~30 s on a loaded 2-core machine) and
run with ``pytest -m slow``; the fast ones check the settings and the errors that need no server."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("tvm")

from qlfx.errors import UsageError  # noqa: E402
from qlfx.kernels import BranchProductSpec, tune_branch_product  # noqa: E402
from qlfx.kernels import rpc as qrpc  # noqa: E402
from qlfx.kernels import tuning  # noqa: E402

KEY = "qlfx-loopback"
TINY = BranchProductSpec(1, 8, 6, 6, 16, "pointwise")  # 8 points in its design space
START_TIMEOUT = 180  # seconds for the tracker and both servers to register, on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log) -> subprocess.Popen:
    # a session of its own: killing the group also ends the tracker's and server's worker processes
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class Loopback:
    def __init__(self, folder):
        self.port = _free_port()
        self.log = open(os.path.join(folder, "rpc.log"), "w")
        self.tracker = _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                               "--port-end", str(self.port + 1)], self.log)
        self.servers = []
        self.settings = qrpc.RPCSettings("127.0.0.1", self.port, KEY, session_timeout=60)

    def add_server(self) -> subprocess.Popen:
        port = _free_port()
        server = _start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{self.port}", "--key", KEY,
                         "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)], self.log)
        self.servers.append(server)
        return server

    def wait_for(self, servers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if len(qrpc.servers_with_key(self.settings, 2.0)) >= servers:
                    return
            except UsageError:
                pass  # tracker not listening yet
            for proc in [self.tracker] + self.servers:
                assert proc.poll() is None, f"an RPC process exited early; see {self.log.name}"
            time.sleep(1.0)
        raise AssertionError(f"{servers} servers did not register in {START_TIMEOUT}s; see {self.log.name}")

    def close(self) -> None:
        for proc in self.servers + [self.tracker]:
            _stop(proc)
        self.log.close()


@pytest.fixture
def tracker_only(tmp_path):
    pytest.importorskip("tornado")  # TVM's tracker needs it
    loop = Loopback(str(tmp_path))
    try:
        loop.wait_for(0)
        yield loop
    finally:
        loop.close()


@pytest.fixture
def loopback(tmp_path):
    pytest.importorskip("tornado")
    loop = Loopback(str(tmp_path))
    try:
        loop.add_server()
        loop.add_server()
        loop.wait_for(2)
        yield loop
    finally:
        loop.close()


# ----------------------------------------------------------------------------------------- fast
def test_tracker_address_parsing_and_bad_addresses():
    s = qrpc.RPCSettings.parse("10.0.0.2:9191", "board")
    assert (s.tracker_host, s.tracker_port, s.key, s.address) == ("10.0.0.2", 9191, "board", "10.0.0.2:9191")
    assert qrpc.RPCSettings.parse("myhost", "k").tracker_port == qrpc.DEFAULT_PORT
    for bad in ("host:port", ":9190", "host:0", "host:70000"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            qrpc.RPCSettings.parse(bad, "k")
    with pytest.raises(UsageError, match="--rpc-key"):
        qrpc.RPCSettings.parse("127.0.0.1:9190", None)


def test_unreachable_tracker_fails_fast_saying_how_to_start_one():
    settings = qrpc.RPCSettings("127.0.0.1", _free_port(), "k")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(UsageError) as error:
        settings.check()
    assert time.perf_counter() - start < 10  # not tvm's minute of retries
    assert "no RPC tracker answers" in str(error.value) and "tvm.exec.rpc_tracker" in str(error.value)


def test_progress_lines_have_done_total_best_and_time_left(capsys):
    report = qrpc.TrialProgress("[t] kernel k")
    report.started -= 10.0  # as if 10 s had passed
    report(2, 8, 12.5)
    line = capsys.readouterr().err.strip()
    assert line.startswith("[t] kernel k: trials 2/8, best 12.5 GFLOP/s, 10s elapsed")
    assert "~30s left" in line  # 10 s for 2 trials -> 30 s for the other 6
    report(0, 0, 3.0)
    assert "from the database" in capsys.readouterr().err


def test_cli_rpc_flags_are_checked_before_any_work(capsys):
    from qlfx.cli import main

    assert main(["tune", "qlnet-tiny", "--rpc-key", "k"]) == 2
    assert "--rpc-key has no effect without --rpc-tracker" in capsys.readouterr().err
    assert main(["tune", "qlnet-tiny", "--rpc-tracker", f"127.0.0.1:{_free_port()}", "--rpc-key", "k"]) == 2
    assert "no RPC tracker answers" in capsys.readouterr().err
    assert main(["tune", "qlnet-tiny", "--trials", "0"]) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err


def test_api_refuses_a_key_without_a_tracker():
    import qlfx

    with pytest.raises(UsageError, match="rpc_tracker"):
        qlfx.tune(None, rpc_key="k")
    with pytest.raises(UsageError, match="trials must be an integer >= 1"):
        qlfx.tune(None, trials=0)
    with pytest.raises(UsageError, match="no RPC tracker answers"):  # before the model is even looked at
        qlfx.tune(None, rpc_tracker=f"127.0.0.1:{_free_port()}", rpc_key="k")


# ----------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tracker_without_servers_of_the_key_is_a_clear_error(tracker_only):
    with pytest.raises(UsageError) as error:
        tracker_only.settings.check()
    assert f"no server with key '{KEY}'" in str(error.value) and "tvm.exec.rpc_server" in str(error.value)


def _records(db: str) -> list:
    with open(os.path.join(db, tuning.RECORD_FILE), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.slow
def test_tuning_over_two_loopback_servers_then_one_killed(loopback, tmp_path):
    """Trials measured by the servers; then a server killed mid-tuning costs only its in-flight
    trials: tuning completes on the other one and the database holds a valid best record."""
    settings = loopback.settings
    assert settings.check() == 2
    db = str(tmp_path / "db")
    tools = settings.builder_runner()
    first = tune_branch_product(TINY, None, 4, db, trials_per_iter=2, **tools)
    assert first.trials_run == 4 and math.isfinite(first.best_seconds) and first.best_seconds > 0
    assert len(_records(db)) == 4

    # a second spec, with one server killed after the first measured batch
    other = BranchProductSpec(1, 8, 6, 6, 24, "pointwise")
    killed = []

    def kill_one(done, total, best):
        if not killed:
            victim = loopback.servers[0]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            killed.append(done)

    second = tune_branch_product(other, None, 6, db, kill_one, trials_per_iter=2, **tools)
    assert killed and second.trials_run == 6
    assert math.isfinite(second.best_seconds) and second.best_seconds > 0
    tuning._check_json_lines(os.path.join(db, tuning.RECORD_FILE))  # every line is still JSON
    reopened = tuning.open_database(db)  # and MetaSchedule still loads it
    for spec in (TINY, other):
        found = tuning._best_record(reopened, tuning._workload_module(spec), tuning._as_target(None))
        assert found is not None and found[1] < 1e9
    assert len(qrpc.servers_with_key(settings)) == 1  # the tracker dropped the dead server
    again = tune_branch_product(other, None, 6, db)  # a database hit: nothing measured again
    assert again.trials_run == 0 and again.best_seconds == second.best_seconds


@pytest.mark.slow
def test_qlfx_tune_cli_over_loopback_writes_a_module_that_matches_the_model(loopback, tmp_path, capsys):
    import numpy as np
    import torch

    from qlfx.cli import main
    from qlfx.emit import tvm_runtime
    from qlfx.loading import load_model

    db, out = tmp_path / "db", tmp_path / "out" / "tuned.so"
    code = main(["tune", "qlnet-tiny", "--trials", "2", "--tuning-db", str(db), "--rpc-tracker",
                 loopback.settings.address, "--rpc-key", KEY, "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"2 server(s) with key '{KEY}'" in captured.err
    assert "trials 2/2" in captured.err and "left" in captured.err  # progress: done/total, best, time left
    assert "2 trials" in captured.out and out.exists()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the CLI's example input
    with torch.no_grad():
        ref = load_model("qlnet-tiny").eval()(x).numpy()
    got = tvm_runtime.load(str(out))(x.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
