"""Graph intake: a client's ``SubmitGraph`` becomes tasks in the scheduler core.

A graph is checked whole before any state changes (unknown dependencies,
functions never sent, cycles): a rejected graph names every wanted key in its
``GraphRejected`` and changes nothing.  Graphs larger than one message arrive
in parts, dependencies first; each part starts at once, held by a stand-in
client until the part that names the wanted keys arrives.

Part of the scheduler core (functions of ``SchedulerState``): no I/O, no clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import messages as m
from ..spec import find_cycle
from .records import FORGOTTEN, RELEASED, WAITING, ClientRecord, SchedulerTask

if TYPE_CHECKING:
    from .state import SchedulerState

# Suffix of the stand-in client that holds the parts of a graph in transit.
PART_HOLDER = "\x00graph-parts"


def submit_graph(state: "SchedulerState", cid: str, msg: m.SubmitGraph) -> None:
    gen = state._partial.get(cid)
    if gen is None:
        state._generation += 1
        gen = state._generation
    tasks = state.tasks
    new: dict = {}
    pairs: list = []
    tokens: dict = {}  # function token -> one string object for all its tasks
    for spec in msg.tasks:
        key = spec.key
        if type(key) is list:
            key = m.as_key(key)
        if key in tasks or key in new:
            continue  # known already: the existing task (and its data) wins
        run_spec = spec.run_spec
        if len(run_spec.frames) == 1:
            # Kept as bytes, wrapped again per Execute: a Payload and its
            # list cost ~110 bytes a task, held for the task's whole life.
            run_spec = bytes(run_spec.frames[0])
        ts = SchedulerTask(-1, key, run_spec, (-spec.priority, gen, spec.order))
        if spec.retries:
            ts.retries = spec.retries
        if spec.workers:
            ts.workers = frozenset(spec.workers)
            ts.allow_other_workers = spec.allow_other_workers
        if spec.resources:
            ts.resources = spec.resources
        if spec.scattered:
            ts.scattered = True
        func = spec.func
        if func:
            ts.func = tokens.setdefault(func, func)
        new[key] = ts
        pairs.append((ts, spec.deps))
    # Validate before touching any state: a rejected graph changes nothing.
    missing: dict = {}
    internal = False  # does any new task depend on another new one?
    functions, known_functions = msg.functions, state.functions
    for ts, spec_deps in pairs:
        if spec_deps:
            if len(spec_deps) > 1:
                # A key named twice is one input (counts of missing inputs assume so).
                spec_deps = list(dict.fromkeys(m.as_key(d) if type(d) is list else d for d in spec_deps))
            deps = []
            for d in spec_deps:
                if type(d) is list:
                    d = m.as_key(d)
                dts = new.get(d)
                if dts is not None:
                    internal = True
                else:
                    dts = tasks.get(d)
                    if dts is None:
                        missing.setdefault(ts.key, []).append(d)
                        continue
                deps.append(dts)
            ts.dependencies = deps
        if ts.func and ts.func not in functions and ts.func not in known_functions:
            missing.setdefault(ts.key, []).append(f"<function {ts.func}>")
    wanted = [m.as_key(k) for k in msg.wanted]
    unknown = [k for k in wanted if k not in new and k not in tasks]
    if missing or unknown:
        # Name every wanted key, so the client can fail each of its futures.
        keys = list(dict.fromkeys(wanted + list(missing)))
        reason = "; ".join(f"{k!r} depends on unknown keys {v[:5]!r}" for k, v in list(missing.items())[:5])
        if unknown:
            reason = (reason + "; " if reason else "") + f"unknown wanted keys {unknown[:5]!r}"
        state._cmds.client(cid, m.GraphRejected(keys, reason))
        state._drop_partial(cid)
        return
    cycle = find_cycle({k: [d.key for d in ts.dependencies] for k, ts in new.items()}) if internal else []
    if cycle:
        keys = list(dict.fromkeys(wanted + cycle))
        state._cmds.client(cid, m.GraphRejected(keys, f"the graph has a cycle through {cycle[:10]!r}"))
        state._drop_partial(cid)
        return
    for tok, payload in functions.items():
        known_functions.setdefault(tok, payload)
    refs, by_id = state.function_refs, state.by_id
    next_id = state._next_id
    for key, ts in new.items():
        ts.id = next_id
        next_id += 1
        tasks[key] = ts
        by_id[ts.id] = ts
        if ts.func:
            refs[ts.func] = refs.get(ts.func, 0) + 1
        for dep in ts.dependencies:
            dep.add_dependent(ts)
    state._next_id = next_id
    for tok in functions:
        if tok not in refs:
            del known_functions[tok]  # every task naming it was known already
    if msg.more:
        state._partial[cid] = gen
        _pin_part(state, cid, new)
        return
    client = state.clients[cid]
    recs: dict = {}
    for key in wanted:
        state._want(cid, client, tasks[key], recs)
    state._transitions(recs)
    state._drop_partial(cid)  # the whole graph is known: its parts' pins go
    for ts in new.values():
        if ts.state is RELEASED and not ts.dependents and not ts.wanted_by and tasks.get(ts.key) is ts:
            state._transitions({ts: FORGOTTEN})

def _pin_part(state: "SchedulerState", cid: str, new: dict) -> None:
    """A part of a larger graph: start it now, held by a stand-in client.

    Graphs are culled to what is wanted, so every task of a part is
    needed; starting each part as it arrives keeps every ``handle()``
    small and lets roots run while the rest is still arriving.  Only the
    part's sinks stay pinned: a task's later dependents hold it instead.
    """
    holder_id = cid + PART_HOLDER
    holder = state.clients.get(holder_id)
    if holder is None:
        holder = state.clients[holder_id] = ClientRecord(holder_id, "graph parts")
    recs: dict = {}
    for ts in new.values():
        ts.want(holder_id)
        holder.wants.add(ts)
        recs[ts] = WAITING
    state._transitions(recs)
    recs = {}
    for ts in new.values():
        for dep in ts.dependencies:
            if holder_id in dep.wanted_by:
                dep.unwant(holder_id)
                holder.wants.discard(dep)
                state._maybe_release(dep, recs)
    state._transitions(recs)
