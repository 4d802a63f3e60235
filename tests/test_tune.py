"""Tuning (MetaSchedule, `edgeflow tune`) and fleets (TVM RPC): real tracker, real servers, real builds.

The fleet is a TVM RPC tracker and two CPU rpc_servers on loopback, each a subprocess in its own
process group on free ports, stopped at the end. Tasks are the smallest kernels of flownet2-s at
64x64 and a couple of trials each, so the tests measure the machinery, not the search.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tvm

KEY = "edgeflow-test"
SIZE = (64, 64)
TASK = "conv2d_transpose1"  # the 2-channel flow upsampler at 1/32 scale: the smallest kernel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def _stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(what: str, check, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not come up within {timeout} s")


@pytest.fixture(scope="module")
def fleet():
    """'127.0.0.1:PORT' of a tracker with two CPU servers registered under KEY."""
    from tvm import rpc

    port = _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)])]
    try:
        _wait_for("the tracker", lambda: rpc.connect_tracker("127.0.0.1", port).summary() is not None)
        env = dict(os.environ, TVM_NUM_THREADS="1")
        for _ in range(2):
            p = _free_port()
            procs.append(_start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", KEY,
                                 "--host", "127.0.0.1", "--port", str(p), "--port-end", str(p + 1)], env=env))
        _wait_for("two servers", lambda: rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"][KEY]["free"]
                  == 2)
        yield f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            _stop(p)


@pytest.fixture(scope="module")
def rpc_db(fleet, tmp_path_factory):
    """A database of TASK tuned over RPC (2 trials)."""
    from edgeflow.compile.tune import tune

    db = tmp_path_factory.mktemp("rpc") / "db"
    lines = []
    result = tune("flownet2-s", target="host", input_size=SIZE, db=db, trials=2, tasks=TASK, rpc_tracker=fleet,
                  rpc_key=KEY, progress=lines.append)
    return db, result, lines


def test_tune_over_rpc_measures_on_the_fleet(rpc_db, fleet):
    db, result, lines = rpc_db
    meta = json.loads((db / "edgeflow-tuning.json").read_text())
    assert meta["runner"].startswith(f"rpc key {KEY} at {fleet}") and "2 devices" in meta["runner"]
    task = meta["tasks"][TASK]
    assert task["trials"] >= 2 and task["best_ms"] > 0 and task["hand_ms"] > 0
    assert result.tuned == [TASK] and TASK in result.summary()
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1 and any(TASK in line and "trials" in line for line in lines)


def test_compile_applies_the_records_that_beat_the_hand_schedule(rpc_db, tmp_path, monkeypatch):
    """Only records measured faster than the hand schedule are applied; the package records them
    and still matches torch (compile checks EPE)."""
    from edgeflow.compile import compile
    from edgeflow.runtime.format import read_package

    monkeypatch.setenv("EDGEFLOW_CACHE", str(tmp_path / "cache"))
    db, _, _ = rpc_db
    meta_path = db / "edgeflow-tuning.json"
    meta = json.loads(meta_path.read_text())
    task = meta["tasks"][TASK]
    # slower than the hand schedule: kept out
    slow = dict(meta, tasks={TASK: dict(task, hand_ms=task["best_ms"] / 2)})
    slow_db = tmp_path / "slow"
    _copy_db(db, slow_db, slow)
    pkg = compile("flownet2-s", target="host", input_size=SIZE, weights="random", out=tmp_path / "a.tar",
                  tuning_db=slow_db)
    assert pkg.manifest["tuning"]["applied"] == 0
    # faster: applied, named with its workload hash
    fast = dict(meta, tasks={TASK: dict(task, hand_ms=task["best_ms"] * 2)})
    fast_db = tmp_path / "fast"
    _copy_db(db, fast_db, fast)
    pkg = compile("flownet2-s", target="host", input_size=SIZE, weights="random", out=tmp_path / "b.tar",
                  tuning_db=fast_db)
    tuning = read_package(pkg.path).manifest["tuning"]
    assert tuning["db_target"]["name"] == "host"
    assert tuning["records_sha256"] == hashlib.sha256((db / "database_tuning_record.json").read_bytes()).hexdigest()
    if tuning["rejected"]:  # the tuned kernel computed something else than the hand one: kept out
        assert tuning["applied"] == 0 and tuning["rejected"][0]["task"] == TASK
        assert not tuning["rejected"][0]["max_error"] or tuning["rejected"][0]["max_error"] > 1e-4
    else:
        assert tuning["applied"] == 1 and "1 tuned kernels" in pkg.summary()
        used = tuning["workloads"][0]
        assert used["task"] == TASK and used["workload"] == task["workload"] and used["tuned_ms"] < used["hand_ms"]
    assert pkg.manifest["accuracy"]["epe_vs_torch"] <= 0.01


def _copy_db(src: Path, dest: Path, meta: dict) -> None:
    dest.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json"):
        (dest / name).write_bytes((src / name).read_bytes())
    (dest / "edgeflow-tuning.json").write_text(json.dumps(meta))


def test_remote_bench_runs_the_package_on_the_fleet(fleet, host_package, capsys):
    from edgeflow.benchmark import bench_remote
    from edgeflow.cli import main

    r = bench_remote(host_package, rpc_tracker=fleet, rpc_key=KEY, runs=3, warmup=1)
    assert r["device"] == f"rpc key {KEY} at {fleet}"
    assert 0 < r["stats"]["edgeflow"]["min_ms"] <= r["ms"]["edgeflow"] <= r["stats"]["edgeflow"]["max_ms"]
    assert r["epe_vs_torch"]["edgeflow"] < 0.02
    assert main(["bench", str(host_package), "--rpc-tracker", fleet, "--rpc-key", KEY, "--runs", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"] == [64, 128]


def test_rpc_errors_are_one_line(fleet, host_package, tmp_path, capsys):
    from edgeflow.cli import main

    assert main(["bench", str(host_package), "--rpc-tracker", fleet, "--rpc-key", "nobody"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no device is registered" in err and KEY in err
    port = _free_port()
    assert main(["tune", "--target", "host", "--size", "64x64", "--db", str(tmp_path / "x"), "--rpc-tracker", f"127.0.0.1:{port}",
                 "--rpc-key", KEY]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the tracker" in err
    assert main(["bench", str(host_package), "--rpc-tracker", "nohost", "--rpc-key", KEY]) == 3
    assert "--rpc-tracker" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_foreign_databases_are_refused(rpc_db, tmp_path, capsys):
    """Another model, size or target: one line naming the database, for compile and for tune."""
    from edgeflow.cli import main

    db, _, _ = rpc_db
    cases = [(["compile", "flownet2-c", "--target", "host", "--size", "64x64"], "tuned for model flownet2-s"),
             (["compile", "flownet2-s", "--target", "host", "--size", "64x128"], "tuned for 64x64"),
             (["compile", "flownet2-s", "--target", "aarch64-cpu", "--size", "64x64"], "tuned for target host"),
             (["tune", "flownet2-cs", "--target", "host", "--size", "64x64"], "tuned for model flownet2-s")]
    for args, words in cases:
        flag = "--tuning-db" if args[0] == "compile" else "--db"
        assert main([*args, flag, str(db), "--weights", "random"] if args[0] == "compile" else [*args, flag, str(db)]) \
            == 3, args
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and words in errors[0] and str(db) in errors[0], errors
    (tmp_path / "junk").mkdir()
    assert main(["compile", "--target", "host", "--tuning-db", str(tmp_path / "junk")]) == 3
    assert "not a tuning database" in capsys.readouterr().err


def test_tuning_resumes_after_a_kill(tmp_path):
    """`edgeflow tune --background` is killed after its first measured batch; the rerun keeps
    those trials and measures only what is missing."""
    from edgeflow.compile.tune import tune

    db = tmp_path / "db"
    args = ["tune", "flownet2-s", "--target", "host", "--size", "64x64", "--trials", "4", "--db", str(db),
            "--tasks", f"{TASK},conv2d_transpose3"]
    out = subprocess.run([sys.executable, "-c", "import sys; from edgeflow.cli import main; sys.exit(main())",
                          *args, "--background"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split("pid ")[1].split(")")[0])
    meta_path = db / "edgeflow-tuning.json"

    def first_batch():
        return json.loads(meta_path.read_text())["tasks"][TASK]["trials"] > 0

    try:
        _wait_for("the first measured batch", first_batch, timeout=600)
        from edgeflow.errors import InputError

        with pytest.raises(InputError, match=f"another edgeflow tune \\(pid {pid}\\) is tuning it"):
            tune("flownet2-s", target="host", input_size=SIZE, db=db, trials=4, tasks=TASK)
    finally:
        os.killpg(pid, signal.SIGKILL)
    _wait_for("the killed tuner to exit", lambda: not Path(f"/proc/{pid}").exists() or
              Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", timeout=30)
    before = json.loads(meta_path.read_text())["tasks"]
    assert "task 1/2" in (db / "tune.log").read_text()
    records = (db / "database_tuning_record.json").read_text()
    (db / "database_tuning_record.json").write_text(records + records.splitlines()[-1][:20])  # a cut-off line
    from edgeflow.errors import EdgeflowError

    try:
        result = tune("flownet2-s", target="host", input_size=SIZE, db=db, trials=4,
                      tasks=f"{TASK},conv2d_transpose3")
    except EdgeflowError as e:  # say what the killed run left behind
        pytest.fail(f"{type(e).__name__}: {e}; db holds {sorted(p.name for p in db.iterdir())}; tune.log ends "
                    f"{(db / 'tune.log').read_text()[-600:]!r}")
    after = result.meta["tasks"]
    assert after[TASK]["trials"] >= 4 and after["conv2d_transpose3"]["trials"] >= 4
    assert after[TASK]["hand_ms"] == before[TASK]["hand_ms"]  # measured once, by the first run
    # batches of 2: the rerun tunes the first task again only if the kill left it short
    assert (TASK in result.tuned) == (before[TASK]["trials"] < 4)
    assert after[TASK]["trials"] - before[TASK]["trials"] <= max(0, 4 - before[TASK]["trials"]) + 1
    kept = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    assert len(kept) >= len(records.splitlines())


def test_tune_refuses_bad_arguments(tmp_path):
    from edgeflow.compile.tune import tune
    from edgeflow.errors import InputError

    with pytest.raises(InputError, match="tuning covers CPU targets"):
        tune(target="jetson", input_size=SIZE, db=tmp_path / "a")
    with pytest.raises(InputError, match="rpc_tracker= and rpc_key="):
        tune(target="aarch64-cpu", input_size=SIZE, db=tmp_path / "a")
    with pytest.raises(InputError, match="give both"):
        tune(target="host", input_size=SIZE, db=tmp_path / "a", rpc_tracker="127.0.0.1:1")
    with pytest.raises(InputError, match="trials=0"):
        tune(target="host", input_size=SIZE, db=tmp_path / "a", trials=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(InputError, match="is not a tuning database"):
        tune(target="host", input_size=SIZE, db=tmp_path / "full")
    assert not np.any([p.exists() for p in [tmp_path / "a"]])


def test_verify_catches_wrong_and_out_of_bounds_schedules():
    """MetaSchedule measures candidates without checking them: compile compares each tuned
    kernel with the hand schedule on random inputs, reads past the inputs showing as NaN."""
    from tvm import te

    from edgeflow import targets
    from edgeflow.compile.tune import VERIFY_TOLERANCE, verify, workload

    target = targets.get("host").tvm_target()
    a = te.placeholder((4, 64), name="a")

    def kernel(fn):
        return workload(te.create_prim_func([a, te.compute((4, 64), fn, name="out")]))

    key = kernel(lambda i, j: a[i, j] + 1)
    assert verify(key, key, target) == 0
    assert verify(key, kernel(lambda i, j: a[i, j] + 1.5), target) > VERIFY_TOLERANCE
    assert np.isnan(verify(key, kernel(lambda i, j: a[i, j + 1] + 1), target))  # one element past the end
