"""The worker's executor: tasks in threads, proven-tiny functions inline on the loop."""

from __future__ import annotations

import asyncio
import threading
import time

from shoal.client.tasks import dumps_args, run_spec
from shoal.worker.executor import INLINE_AFTER, INLINE_MAX, Executor, LazyFunction


def where(delay=0.0):
    """The thread that ran the task (and, optionally, a pause first)."""
    if delay:
        time.sleep(delay)
    return threading.get_ident()


def _run_all(calls: list, inline: bool = True) -> tuple[list, int, Executor]:
    """Run ``calls`` (each: seconds to pause) one after another, as a worker
    does for one thread: the next starts when the previous one's outcome is
    back.  Returns the thread ids that ran them and the loop's own."""

    async def main():
        loop = asyncio.get_running_loop()
        results: list = []
        done = asyncio.Event()
        func = LazyFunction(1, run_spec(where))

        def on_done(outcomes):
            for out in outcomes:
                assert out.ok, out.traceback
                results.append(out.value)
            if len(results) == len(calls):
                done.set()
            else:
                start(len(results))

        ex = Executor(1, on_done, loop, inline=inline)

        def start(i):
            ex.submit(i, f"t{i}", dumps_args(((calls[i],), {})), {}, func)
            # Run inline: the outcome waits for the caller (the worker's
            # reactor takes it when it is done handling, as here).
            now = ex.take_inline()
            if now:
                loop.call_soon(on_done, now)

        start(0)
        await asyncio.wait_for(done.wait(), 10)
        ex.shutdown()
        return results, threading.get_ident(), ex

    return asyncio.run(main())


def test_tiny_function_runs_inline_after_proving_itself_in_threads():
    ran, loop_thread, ex = _run_all([0.0] * (INLINE_AFTER + 5))
    assert all(t != loop_thread for t in ran[:INLINE_AFTER])
    assert all(t == loop_thread for t in ran[INLINE_AFTER:])
    assert ex.inline_runs == 5


def test_one_slow_run_sends_a_function_back_to_the_threads_for_good():
    slow = INLINE_MAX * 4
    calls = [0.0] * INLINE_AFTER + [0.0, slow] + [0.0] * 4
    ran, loop_thread, ex = _run_all(calls)
    assert ran[INLINE_AFTER] == loop_thread and ran[INLINE_AFTER + 1] == loop_thread
    # After the slow (inline) run, everything goes to the threads again.
    assert all(t != loop_thread for t in ran[INLINE_AFTER + 2 :])
    assert ex.inline_runs == 2


def test_function_that_is_slow_from_the_start_never_runs_inline():
    ran, loop_thread, ex = _run_all([INLINE_MAX * 3] * (INLINE_AFTER + 3))
    assert loop_thread not in ran and ex.inline_runs == 0



def test_inline_running_can_be_turned_off():
    ran, loop_thread, ex = _run_all([0.0] * (INLINE_AFTER + 3), inline=False)
    assert loop_thread not in ran and ex.inline_runs == 0
