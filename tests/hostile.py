"""The harness of the adversarial suite: each hostile case runs in a process of its own under a memory cap and a
watchdog, and ends in one of the outcomes a user may be given.

A case is a function of no arguments that does one hostile thing through prefalign's public surface (a bad file,
manifest, option, checkpoint, endpoint answer...) and returns normally when prefalign behaved correctly (a counted
skip, a correct result), or raises. ``run`` forks a child per case (after the parent has imported the heavy
libraries, so a case costs milliseconds, not an interpreter start), caps the child's address space with
``RLIMIT_AS`` at what it already maps plus ``memory_mb``, and kills it after ``timeout`` seconds. The outcome:

- ``error``: the case raised an exception of an expected type whose text names what the case says it must name
  (the file, the field, the option and its allowed values...);
- ``ok``: the case returned;
- ``crash``: another exception, or an expected type whose text misses a required word;
- ``hang``: the watchdog fired;
- ``memory``: the child ran out of its memory cap (a ``MemoryError``, or killed by the kernel).
"""

from __future__ import annotations

import multiprocessing
import resource
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from prefalign.data.errors import DataError

#: The exceptions that count as a clear error when their text names what the case requires.
CLEAR = (DataError, ValueError, FileNotFoundError, PermissionError, RuntimeError, SystemExit, KeyError, TypeError)


@dataclass
class Case:
    """One hostile case.

    Attributes:
        name: a short id (becomes the pytest id).
        run: the hostile action.
        must_name: words (case-insensitive) a clear error must contain, e.g. the file name and the field.
        expect: ``"error"`` (must raise a clear error), ``"ok"`` (must behave correctly and return), or
            ``"error|ok"`` (either).
        errors: the exception types that count as clear (default ``CLEAR``).
        timeout: seconds before the watchdog kills the case.
        memory_mb: address space the case may add to what the process maps at its start.
    """

    name: str
    run: Callable[[], object]
    must_name: tuple[str, ...] = ()
    expect: str = "error"
    errors: tuple[type, ...] = CLEAR
    timeout: float = 60.0
    memory_mb: int = 1536
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Result:
    case: str
    outcome: str  # error | ok | crash | hang | memory
    detail: str

    @property
    def passed(self) -> bool:
        return self.outcome in self.expected

    expected: tuple[str, ...] = ()


def _mapped_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(case: Case, conn) -> None:
    # The parent's OpenMP thread pool does not survive the fork (GNU libgomp is not fork-safe): a child that asks for
    # it again waits forever. One thread needs no pool.
    import torch

    torch.set_num_threads(1)
    limit = _mapped_bytes() + case.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        case.run()
        conn.send(("ok", ""))
    except MemoryError:
        conn.send(("memory", "MemoryError"))
    except BaseException as error:  # noqa: BLE001 - every exception is an outcome to classify
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, case.errors) and all(word.lower() in text.lower() for word in case.must_name):
            conn.send(("error", text[:2000]))
        elif "out of memory" in text.lower() or "cannot allocate" in text.lower():
            conn.send(("memory", text[:2000]))
        else:
            conn.send(("crash", text[:2000] + "\n" + traceback.format_exc()[-3000:]))
    finally:
        conn.close()


def run(case: Case) -> Result:
    """Run one case in a forked child under its memory cap and watchdog."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(case, child))
    process.start()
    child.close()
    expected = tuple(case.expect.split("|"))
    if parent.poll(case.timeout):
        try:
            outcome, detail = parent.recv()
        except EOFError:
            outcome, detail = "memory", f"the child died (exit code {process.exitcode})"
        process.join(10)
    else:
        process.kill()
        process.join()
        outcome, detail = "hang", f"no outcome after {case.timeout:g} s"
    if process.is_alive():
        process.kill()
    if outcome == "ok" and process.exitcode not in (0, None):
        outcome, detail = "crash", f"exit code {process.exitcode}"
    return Result(case.name, outcome, detail, expected)


def run_all(cases: Iterable[Case]) -> list[Result]:
    return [run(case) for case in cases]


def counts(results: Iterable[Result]) -> dict[str, int]:
    """Results by outcome, for the report."""
    tally: dict[str, int] = {}
    for result in results:
        tally[result.outcome] = tally.get(result.outcome, 0) + 1
    return tally


def check(case: Case) -> Optional[str]:
    """Run ``case``; None when it passed, else why not (for ``assert check(case) is None``)."""
    result = run(case)
    if result.passed:
        return None
    return f"{case.name}: {result.outcome} (expected {case.expect}): {result.detail}"
