"""The pipelined stream: same flow and EPE as pair-by-pair calls, bounded queues, drops only for
live sources, failures raised to the caller, sinks fed, prompt close."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from edgeflow.errors import InputError

pytestmark = pytest.mark.tvm

H, W = 64, 128


@pytest.fixture(scope="module")
def engine(host_package):
    from edgeflow.runtime import load

    return load(host_package)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A generated 7-frame clip (PNG, lossless) with exact ground-truth flow, at 72x112."""
    from edgeflow.synth import video_frames

    d = tmp_path_factory.mktemp("clip")
    frames, flows = [], []
    for i, (img, flow) in enumerate(video_frames(np.random.default_rng(5), 7, (72, 112))):
        cv2.imwrite(str(d / f"frame_{i:03d}.png"), img)
        frames.append(img)
        flows.append(flow)
    return d, frames, flows[:-1]


def epe(a, b) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1)).mean())


def test_stream_gives_the_pair_by_pair_epe(engine, clip):
    from edgeflow.runtime.pipeline import STAGES

    d, frames, truth = clip
    seen = []
    stream = engine.stream(f"file://{d}", sinks=[seen.append])
    results = list(stream)
    assert [r.index for r in results] == list(range(6)) and [r.frame_id for r in results] == list(range(1, 7))
    assert [r.index for r in seen] == list(range(6)) and stream.dropped == 0 and stream.ended
    streamed = [epe(r.flow, gt) for r, gt in zip(results, truth)]
    paired = [epe(engine(frames[i], frames[i + 1]), gt) for i, gt in enumerate(truth)]
    np.testing.assert_allclose(streamed, paired, rtol=1e-5, atol=1e-6)
    for r in results:
        assert set(r.timings) == set(STAGES) and all(v >= 0 for v in r.timings.values())
        assert r.network_fps > 0 and r.pipeline_fps > 0 and r.latency > 0 and r.timestamp > 1e9
    s = stream.stats.summary()
    assert stream.stats.count == 6 and s["network_fps"] > 0 and s["pipeline_fps"] > 0


def test_ring_buffers_reach_the_network_without_a_copy(engine, clip):
    """Prepared frames are handed to the TVM runtime as DLPack tensors over the ring's memory;
    only inputs it cannot take as they are (misaligned, another dtype) are copied, to the same flow."""
    d, frames, _ = clip
    before = engine.input_copies
    assert len(list(engine.stream(f"file://{d}"))) == 6 and engine.input_copies == before
    x1, x2 = engine.prepare(frames[0]), engine.prepare(frames[1])
    handed = engine.run_tensor(x1, x2).copy()
    assert engine.input_copies == before
    odd = np.empty(x1.size + 1, np.float32)[1:].reshape(x1.shape)  # 4 bytes past an aligned start
    odd[...] = x1
    np.testing.assert_array_equal(engine.run_tensor(odd, x2.astype(np.float64)), handed)
    assert engine.input_copies == before + 2


def slow(seconds: float):
    def sink(result):
        time.sleep(seconds)
    return sink


def test_file_source_is_never_dropped_from(engine, clip):
    d, frames, _ = clip
    stream = engine.stream(f"file://{d}", sinks=[slow(0.05)], queue_size=1)
    assert [r.frame_id for r in stream] == list(range(1, 7)) and stream.dropped == 0


def test_live_policy_drops_the_oldest_and_counts(engine, clip):
    """Latest frame wins: with a slow consumer, frames are dropped, counted, and the rest stay in order."""
    d, frames, _ = clip

    def camera(count=60, fps=200.0):  # paced like a fast camera; the sink is slower
        for i in range(count):
            time.sleep(1 / fps)
            yield frames[i % 7]

    stream = engine.stream(camera(), sinks=[slow(0.05)], drop=True, queue_size=1)
    results = list(stream)
    ids = [r.frame_id for r in results]
    assert len(results) >= 2 and stream.dropped > 0 and ids == sorted(set(ids))
    assert len(results) + stream.dropped == 60 - 1  # every frame but the first ends a pair or is dropped
    assert results[-1].dropped == stream.dropped


def test_bounded_queues_in_flight(engine, clip):
    """A consumer that stops reading holds the stages back: at most a few frames are taken from the source."""
    d, frames, _ = clip
    taken = []

    def source():
        for i in range(1000):
            taken.append(i)
            yield frames[i % 7]

    stream = engine.stream(source(), queue_size=2)
    next(stream)
    time.sleep(0.5)
    held = len(taken)
    time.sleep(0.5)
    assert len(taken) == held <= 2 + 4 * 2 + 4  # the first pair, four full queues, one item in each stage
    stream.close()


def test_failure_is_raised_and_uri_sinks_aborted(engine, clip, tmp_path):
    d, frames, _ = clip
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        cv2.imwrite(str(bad / f"{i}.png"), frames[i])
    (bad / "3.png").write_bytes(b"not a png")
    video = tmp_path / "flow.mp4"
    stream = engine.stream(f"file://{bad}", sinks=[f"file://{video}"])
    with pytest.raises(InputError, match="3.png: not a readable image"):
        list(stream)
    assert not video.exists() and not list(tmp_path.glob(".flow*"))


def test_max_frames_and_close_stop_all_stages(engine, clip):
    d, _, _ = clip
    assert len(list(engine.stream(f"file://{d}", max_frames=2))) == 2
    before = threading.active_count()
    stream = engine.stream(f"file://{d}")
    next(stream)
    stream.close()
    assert threading.active_count() <= before
    assert list(stream) == []


def test_close_wakes_a_live_source_waiting_to_reopen(engine):
    """A camera that is gone: the stream waits in backoff; close() ends it at once, not after the delay."""
    from edgeflow.runtime.sources import Backoff

    stream = engine.stream("v4l2:///dev/video-edgeflow-absent", backoff=Backoff(attempts=None, initial=30))
    time.sleep(0.3)
    assert stream.source.state.startswith("lost: cannot open") and stream.source.failures >= 1
    t0 = time.monotonic()
    stream.close()
    assert time.monotonic() - t0 < 2.0


def test_cli_run_loops_a_file_source_into_two_sinks(host_package, clip, tmp_path, capsys):
    from edgeflow import read_flow
    from edgeflow.cli import main

    d, frames, _ = clip
    out, video = tmp_path / "flows", tmp_path / "flow.avi"
    assert main(["run", str(host_package), f"file://{d}", "--loop", "--max-frames", "10",
                 "-o", str(out), "-o", f"file://{video}"]) == 0
    assert len(list(out.glob("*.flo"))) == 10 and video.is_file()
    assert read_flow(out / "flow_00009.flo").shape == (72, 112, 2)
    line = capsys.readouterr().out
    assert line.startswith(f"10 flow fields from file://{d} -> {out}, file://{video}: pipeline")
