"""One system in its own process: `python -m benchmarks.worker`, driven over stdin/stdout by the runner.

Each worker loads one system (or measures the MatMul ceiling), so its peak
resident memory is that system's alone. Protocol: one JSON object per line.
The first line from the runner is ``{"spec": SystemSpec}`` or ``{"ceiling":
{"threads": n, "seconds": s}}``; after "ready", each ``{"cmd": "run"}`` runs one
batch and ``{"cmd": "exit"}`` ends the worker. Every reply carries the peak
RSS so far. Library chatter printed to stdout is redirected to stderr (the
worker's log), so the protocol channel stays clean.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, TextIO


def _protocol_channel() -> TextIO:
    """Keep the real stdout for replies and point fd 1 (Python and C prints) at stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    return channel


def _reply(channel: TextIO, **message: Any) -> None:
    from benchmarks.machine import current_rss_bytes, peak_rss_bytes

    message.setdefault("peak_rss_bytes", peak_rss_bytes())
    message.setdefault("rss_bytes", current_rss_bytes())
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def _load_images(paths: list[str], count: int) -> list[Any]:
    """The first `count` images of `paths`, taken in turn, each decoded once: only those a run captions are
    held, as they add to the worker's peak memory. Loaded as `edlight caption` and training load them (EXIF
    rotation applied, transparency on white): every system gets the same pixels. A plain convert("RGB")
    handed PyTorch and Optimum a phone photo on its side, which the engine then turned upright."""
    from engine.images import load_image

    decoded = [load_image(path) for path in paths[:count]]
    return [decoded[i % len(decoded)] for i in range(count)]


def serve(commands: TextIO, channel: TextIO) -> int:
    from benchmarks.timing import RunTiming, SystemSpec, load_system

    hello = json.loads(commands.readline() or "{}")
    if "ceiling" in hello:
        from benchmarks.ceiling import measure_ceiling

        ceiling = measure_ceiling(int(hello["ceiling"]["threads"]), float(hello["ceiling"]["seconds"]))
        _reply(channel, event="ceiling", ceiling=ceiling.to_dict())
        return 0
    spec = SystemSpec(**hello["spec"])
    start = time.perf_counter()
    system = load_system(spec)
    load_s = time.perf_counter() - start
    chosen = _load_images(spec.images, spec.images_per_run or spec.batch_size)
    batches = [chosen[first : first + spec.batch_size] for first in range(0, len(chosen), spec.batch_size)]
    _reply(channel, event="ready", load_s=load_s)
    for line in commands:
        command = json.loads(line)
        if command.get("cmd") == "exit":
            break
        if command.get("cmd") != "run":
            raise ValueError(f"unknown command {command!r}")
        timing = RunTiming.combined([system.run(batch) for batch in batches])
        _reply(channel, event="result", timing=timing.to_dict())
    _reply(channel, event="bye")
    return 0


def main() -> int:
    channel = _protocol_channel()
    try:
        return serve(sys.stdin, channel)
    except BaseException as exc:  # report anything, including KeyboardInterrupt, then die
        traceback.print_exc()
        _reply(channel, event="error", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
