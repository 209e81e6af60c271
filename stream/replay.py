"""`fission replay`: the engine over a JSONL file, outputs as files (SPEC 5.1)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from attribution.engine import BatchResult, Engine, Message
from attribution.model import Node

BATCH_LINES = 2000


@dataclass(slots=True)
class ReplaySummary:
    events: int
    outcomes: int
    entries: int
    nodes: int
    dead_letters: int


def read_messages(path: Path, batch_lines: int = BATCH_LINES) -> Iterator[tuple[list[Message], int]]:
    """Batches of non-blank lines (offset = line number), with the bytes read so far."""
    batch: list[Message] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            value = line.rstrip(b"\r\n")
            if number == 0:
                value = value.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the event
            if value.strip():
                batch.append(Message(value, number))
            if len(batch) >= batch_lines:
                yield batch, handle.tell()
                batch = []
        yield batch, handle.tell()


def replay(
    engine: Engine,
    events: Path,
    out: Path,
    progress: Callable[[int], None] | None = None,
    batch_lines: int = BATCH_LINES,
) -> ReplaySummary:
    """Run every event of `events` through `engine` and write ledger, outcomes, nodes, balances."""
    out.mkdir(parents=True, exist_ok=True)
    nodes: dict[tuple[str, str], Node] = {}
    balances: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts = {"events": 0, "outcomes": 0, "entries": 0, "dead_letters": 0}
    with (out / "ledger.jsonl").open("wb") as ledger, (out / "outcomes.jsonl").open("wb") as outcomes:

        def write(result: BatchResult) -> None:
            outcomes.write(b"".join(orjson.dumps(o) + b"\n" for o in result.outcomes))
            ledger.write(b"".join(orjson.dumps(e) + b"\n" for e in result.entries))
            for entry in result.entries:
                balances[entry.campaign][entry.beneficiary] += entry.amount
            for node in result.nodes:
                nodes[(node.campaign, node.user_id)] = node
            counts["outcomes"] += len(result.outcomes)
            counts["entries"] += len(result.entries)
            counts["dead_letters"] += len(result.dead_letters)

        for messages, read in read_messages(events, batch_lines):
            counts["events"] += len(messages)
            write(engine.process(0, messages))
            if progress:
                progress(read)
        write(engine.drain(0))
    with (out / "nodes.jsonl").open("wb") as handle:
        handle.write(b"".join(orjson.dumps(n) + b"\n" for _, n in sorted(nodes.items())))
    kept = {c: {u: a for u, a in sorted(by_user.items()) if a} for c, by_user in sorted(balances.items())}
    (out / "balances.json").write_bytes(orjson.dumps({c: b for c, b in kept.items() if b}, option=orjson.OPT_INDENT_2))
    return ReplaySummary(counts["events"], counts["outcomes"], counts["entries"], len(nodes), counts["dead_letters"])


def file_size(path: Path) -> int:
    return os.path.getsize(path)
