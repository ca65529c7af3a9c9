"""The one harness of bench/: where a measurement runs, what its peak memory means, where its
table goes. Standard library only at import, so any python (a vLLM venv too) can load it.

Isolation. :func:`run_child` runs ``prepare(*args)`` in a fresh python process and measures the
zero-argument callable it returns (:func:`measure`); :func:`run_command` runs any command. Both
pin the child to ``threads`` cores (``os.sched_setaffinity``, set before the child starts) and
give it ``threads`` compute threads (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in its
environment, ``torch.set_num_threads``); ``threads=None`` leaves a command unpinned.
:func:`isolate` does the same to the current process. The cores are the last ones this process
may use, as core 0 often also serves the machine's interrupts.

Peak memory, one definition: the extra resident memory a call needs, i.e. the process's peak RSS
during the call minus its RSS just before it. The kernel's high-water mark is reset first (``5``
into ``/proc/self/clear_refs``), then ``VmRSS`` is read, the call runs, and ``VmHWM`` is read
(``/proc/self/status``). That is what the benches report ("peak = extra RSS over the inputs"):
the interpreter, torch and the inputs made by ``prepare`` are not counted, and a fresh process
per case keeps an earlier case's allocator caches out of it. ``ru_maxrss`` cannot be reset and
counts everything since the process started; tracemalloc does not see torch's allocations.
Linux only.

Results. :func:`write_result` prints a report and writes ``bench/results/NAME-<machine>.md``
with the machine (CPU model, cores, torch, GPU) and the command line above the caller's text.
:func:`comparison` is the markdown table of ours beside a baseline with their ratio.
"""

from __future__ import annotations

import os
import pickle
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


# ------------------------------------------------------------------------------ peak memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the process's peak-RSS mark (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # a peak since process start would silently count the inputs too
        raise RuntimeError(
            f"cannot reset the peak-RSS mark ({e}); peak memory needs Linux "
            "with a writable /proc/self/clear_refs"
        ) from e


@dataclass
class Measured:
    """``value``: what the first call returned; ``times``: seconds of the first call, then of
    each repeat; ``peak_mib``: extra RSS during the first call (module docstring)."""

    value: Any
    times: list[float]
    peak_mib: float

    @property
    def seconds(self) -> float:
        return self.times[0]

    @property
    def best(self) -> float:
        """Fastest repeat; the first call only when there are none (it pays one-time costs such
        as thread pools, and noise on a shared machine only ever slows a run down)."""
        return min(self.times[1:]) if len(self.times) > 1 else self.times[0]


def measure(step: Callable[[], Any], repeats: int = 0) -> Measured:
    """Time ``step()`` and take its peak extra RSS, then time ``repeats`` more calls."""
    reset_peak_rss()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    value = step()
    times = [time.perf_counter() - t0]
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return Measured(value, times, peak_mib)


# -------------------------------------------------------------------------------- isolation
class ChildError(RuntimeError):
    """A child process failed; ``detail`` is the last line of its stderr (or its exit status)."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what}: {detail}")
        self.detail = detail


def pinned_cores(threads: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-threads:] if threads < len(allowed) else allowed


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def isolate(threads: int = 1) -> None:
    """Pin this process to ``threads`` cores with ``threads`` compute threads."""
    os.environ.update(thread_env(threads))
    os.sched_setaffinity(0, pinned_cores(threads))
    import torch  # after the environment is set, which torch reads at import

    torch.set_num_threads(threads)


def run_command(
    cmd: Sequence[str],
    *,
    threads: int | None = 1,
    cores: Sequence[int] | None = None,
    env: dict | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **kwargs)`` in a process pinned as :func:`isolate` would pin it, or
    to `cores` when given (one thread per core)."""
    if threads is None:
        return subprocess.run(list(cmd), env=env, **kwargs)
    cores = list(cores) if cores is not None else pinned_cores(threads)
    threads = len(cores)
    # A python trampoline sets the affinity, then execs: preexec_fn is unsafe in a threaded parent.
    pin = [
        sys.executable,
        "-c",
        f"import os, sys; os.sched_setaffinity(0, {cores}); os.execvp(sys.argv[1], sys.argv[1:])",
    ]
    env = {**(os.environ if env is None else env), **thread_env(threads)}
    return subprocess.run(pin + list(cmd), env=env, **kwargs)


def _torch_threads(threads: int) -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


_BOOT = (
    "import pickle, sys; path, script = pickle.load(sys.stdin.buffer); sys.path[:0] = path; "
    "import harness; harness._child_main(script, sys.stdin.buffer, sys.argv[1])"
)


def run_child(
    prepare: Callable[..., Callable[[], Any]], *args, threads: int = 1, repeats: int = 0
) -> Measured:
    """In a fresh, pinned python: ``step = prepare(*args)`` (not measured), then
    ``measure(step, repeats)``. ``prepare`` must be defined at module level; ``step``'s return
    value comes back pickled, so return something small. Raises :class:`ChildError`."""
    main = sys.modules["__main__"]
    script = getattr(main, "__file__", None) if prepare.__module__ == "__main__" else None
    job = pickle.dumps(([str(BENCH), *sys.path], script)) + pickle.dumps(
        (prepare, args, threads, repeats)
    )
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        out = Path(tmp) / "result.pickle"
        res = run_command(
            [sys.executable, "-c", _BOOT, str(out)], threads=threads, input=job, capture_output=True
        )
        if res.returncode != 0 or not out.is_file():
            err = res.stderr.decode(errors="replace").strip().splitlines()
            raise ChildError(
                f"{getattr(prepare, '__name__', prepare)}{args}",
                err[-1] if err else f"rc={res.returncode}",
            )
        return pickle.loads(out.read_bytes())


def _child_main(script: str | None, stream, out_path: str) -> None:
    if script:  # the parent's script functions pickle as __main__.name: load it under that name
        import importlib.util

        spec = importlib.util.spec_from_file_location("__mp_main__", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules["__main__"] = sys.modules["__mp_main__"] = module
        spec.loader.exec_module(module)
    prepare, args, threads, repeats = pickle.load(stream)
    _torch_threads(threads)
    step = prepare(*args)
    _torch_threads(threads)  # in case prepare imported torch: its default caps at the core count
    result = measure(step, repeats)
    Path(out_path).write_bytes(pickle.dumps(result))


# ---------------------------------------------------------------------------------- results
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# Datasheet ceilings (dense bf16 FLOP/s, memory bytes/s) of the GPUs the benches judge against.
GPU_ROOFLINES = {
    "H100 SXM": (989e12, 3.35e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H200": (989e12, 4.8e12),
}


def gpu_roofline(name: str) -> tuple[str, tuple[float, float]]:
    """(label, (bf16 FLOP/s, bytes/s)) for a CUDA device name; H100 SXM where none matches."""
    if "H200" in name:
        return "H200", GPU_ROOFLINES["H200"]
    if "PCIe" in name:
        return "H100 PCIe", GPU_ROOFLINES["H100 PCIe"]
    return "H100 SXM", GPU_ROOFLINES["H100 SXM"]


def machine_line() -> str:
    import torch

    gpu = gpu_name()
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores ({platform.machine()}), "
        f"torch {torch.__version__}, {f'GPU {gpu}' if gpu else 'no GPU'}."
    )


def machine_tag(device: str = "cpu") -> str:
    """The file-name part for the device measured: ``cpu-2core``, ``cuda-h100-80gb-hbm3``."""
    if device == "cpu":
        return f"cpu-{os.cpu_count()}core"
    name = (gpu_name() or "unknown").lower().replace("nvidia ", "")
    return "cuda-" + "-".join(name.split())


def command_line(argv: Sequence[str] | None = None) -> str:
    """This run as one would type it from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    head = ["python", str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]]
    return shlex.join(head + list(argv[1:]))


def ratio(baseline: float | None, ours: float | None, digits: int = 2) -> str:
    """``baseline / ours`` as ``1.23×`` (a speed-up for times, a saving for memory); ``–`` when
    either is missing or ours is not positive."""
    if baseline is None or ours is None or ours <= 0:
        return "–"
    return f"{baseline / ours:.{digits}f}×"


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def comparison(
    rows: Iterable[tuple[str, float | None, float | None]],
    *,
    case: str = "case",
    ours: str = "ours",
    baseline: str = "baseline",
    unit: str = "s",
    fmt: str = "{:.3f}",
    digits: int = 2,
) -> list[str]:
    """Markdown table of ``(case, ours, baseline)``: ours beside the baseline and the ratio
    ``baseline / ours``."""

    def cell(x):
        return "–" if x is None else fmt.format(x)

    return table(
        [case, f"{ours} ({unit})", f"{baseline} ({unit})", f"{baseline} / {ours}"],
        [(c, cell(o), cell(b), ratio(b, o, digits)) for c, o, b in rows],
    )


def write_result(
    name: str,
    title: str,
    body: Sequence[str],
    *,
    device: str = "cpu",
    command: str | None = None,
    save: bool = True,
) -> Path | None:
    """Print ``title``, the machine and command line, then ``body``; unless ``save`` is false,
    also write that to ``bench/results/NAME-<machine>.md`` and return its path."""
    text = (
        "\n".join(
            [title, "", f"{machine_line()} Command: `{command or command_line()}`.", "", *body]
        ).rstrip()
        + "\n"
    )
    print(text, end="")
    if not save:
        return None
    path = RESULTS / f"{name}-{machine_tag(device)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
