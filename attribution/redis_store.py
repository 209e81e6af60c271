"""The Redis store: production state, batched, laid out for Redis Cluster.

Key layout (P = partition, b = bucket = crc32(id) mod `buckets`; `{...}` is the hash tag,
so everything one Lua script touches shares a slot):

- `fx:{pP}:u:b` hash enc(campaign, user) → packed `User`; `fx:{pP}:q` hash user → waiting
  queue; `fx:{pP}:pos` and `fx:{pP}:epoch`, the position and the owner's fencing epoch. All
  in the partition's slot, so the batch commit writes them atomically with the position.
- `fx:e:{b}:<generation>` event-id digest → "partition:offset" where it was read: duplicate
  marks, global (an id is a duplicate whichever user or partition repeats it), kept for
  `dedup_retention`. Written before the partition commit; a re-run after a crash finds its
  own partition and offset in the mark and knows it is not a duplicate.
- `fx:s:{b}` share_id → claim or `Share`; `fx:o:{b}` digest(campaign, order) → claim or
  `Order`; `fx:d:{b}` digest(campaign, device) → the users it bound; `fx:g:{b}`
  enc(campaign, group) → buyers and the completing event. In the id's own slot: any
  partition may claim or join them, one Lua script each.
- `fx:b:{campaign}` spent, per-entry draw answers and returns: the campaign's slot.
- `fx:bal:{b}` balances by enc(campaign, beneficiary), plus one high-water mark per partition
  (`~p<P>`: the last commit sequence applied), so a batch's credits apply once per bucket
  without a mark per entry. Credits travel through the partition's outbox
  (`fx:{pP}:out`, `fx:{pP}:seq`), written atomically with the commit. Readers
  (`balance()`) find a balance in one round trip.

Small hashes (≤ 128 fields, values ≤ 64 bytes) stay listpack-encoded. User, share and order
records are binary (varints, length-prefixed ids, derivable fields left out): a bound user's
record is about 35 bytes.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from typing import Any

import orjson
import redis

from attribution.events import parse_event
from attribution.model import BOUND, ORGANIC, SEED, Credit, Order, Share, User, entry_id
from attribution.queues import Queue
from attribution.store import Commit
from attribution.view import Key

_STATE_CODES = {SEED: "s", BOUND: "b", ORGANIC: "o"}
_STATES = {code: state for state, code in _STATE_CODES.items()}


def enc(*parts: str) -> str:
    """Join ids that may hold any character, unambiguously: each is length-prefixed."""
    return "".join(f"{len(p)}:{p}" for p in parts)


def dec(packed: str) -> list[str]:
    parts, i = [], 0
    while i < len(packed):
        colon = packed.index(":", i)
        size = int(packed[i:colon])
        parts.append(packed[colon + 1 : colon + 1 + size])
        i = colon + 1 + size
    return parts


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _text(value: str, out: bytearray) -> None:
    data = value.encode("utf-8", "surrogatepass")
    _varint(len(data), out)
    out += data


def _read_text(raw: bytes, i: int) -> tuple[str, int]:
    size, i = _read_varint(raw, i)
    return raw[i : i + size].decode("utf-8", "surrogatepass"), i + size


def _texts(values: tuple[str, ...], out: bytearray) -> None:
    _varint(len(values), out)
    for value in values:
        _text(value, out)


def _read_texts(raw: bytes, i: int) -> tuple[list[str], int]:
    count, i = _read_varint(raw, i)
    values = []
    for _ in range(count):
        value, i = _read_text(raw, i)
        values.append(value)
    return values, i


def pack_user(user_id: str, user: User) -> bytes:
    """Binary and compact (a bound user with three ancestors is ~35 bytes): state code,
    varints, length-prefixed ids; the root is left out when derivable (self for a seed,
    the last ancestor when the chain reaches it), and bound_at is entered_at."""
    out = bytearray(_STATE_CODES[user.state].encode())
    _varint(user.entered_at, out)
    if user.state == ORGANIC:
        return bytes(out)
    _varint(user.depth, out)
    out.append(int(user.first_purchase_done))
    _texts(user.ancestors, out)
    derived = user_id if user.state == SEED else (user.ancestors[-1] if len(user.ancestors) == user.depth else None)
    if user.root != derived:
        _text(user.root, out)
    return bytes(out)


def unpack_user(user_id: str, raw: bytes) -> User:
    state = _STATES[chr(raw[0])]
    entered, i = _read_varint(raw, 1)
    if state == ORGANIC:
        return User(ORGANIC, entered_at=entered)
    depth, i = _read_varint(raw, i)
    done = bool(raw[i])
    ancestors, i = _read_texts(raw, i + 1)
    if i < len(raw):
        root, i = _read_text(raw, i)
    else:
        root = user_id if state == SEED else ancestors[-1]
    return User(state, entered, root, depth, tuple(ancestors), entered if state == BOUND else None, done)


KINDS = ("bind_scanner", "bind_sharer", "first_purchase", "commission", "group_initiator", "clawback")


def owned(kind: bytes, event_id: str) -> bytearray:
    """Every share and order record starts with its kind and its owning event id (a 2-byte length, then the
    UTF-8 id): the claim scripts read the owner there, the rest is for Python alone."""
    data = event_id.encode("utf-8", "surrogatepass")
    return bytearray(kind + len(data).to_bytes(2, "big") + data)


def claim_record(event_id: str) -> bytes:
    return bytes(owned(b"c", event_id))


def _owner(raw: bytes) -> tuple[bytes, str, int]:
    size = int.from_bytes(raw[1:3], "big")
    return raw[:1], raw[3 : 3 + size].decode("utf-8", "surrogatepass"), 3 + size


def pack_share(share: Share) -> bytes:
    """Binary: the sharer is the first ancestor, the root is left out when the chain reaches it."""
    out = owned(b"s", share.event_id)
    _text(share.campaign, out)
    _varint(share.ts, out)
    _varint(share.depth, out)
    out.append(int(share.group))
    _texts(share.ancestors, out)
    if len(share.ancestors) != share.depth + 1:
        _text(share.root, out)
    return bytes(out)


def unpack_share(share_id: str, raw: bytes | None) -> Share | None:
    if not raw or raw[:1] != b"s":
        return None
    _, event_id, i = _owner(raw)
    campaign, i = _read_text(raw, i)
    ts, i = _read_varint(raw, i)
    depth, i = _read_varint(raw, i)
    group = bool(raw[i])
    ancestors, i = _read_texts(raw, i + 1)
    root = _read_text(raw, i)[0] if i < len(raw) else ancestors[-1]
    return Share(share_id, campaign, ancestors[0], event_id, ts, root, depth, tuple(ancestors), group)


def pack_order(order: Order) -> bytes:
    """The credits an order made, for its refund (binary; entry ids are derived, not stored)."""
    out = owned(b"o", order.event_id)
    _text(order.buyer, out)
    _varint(len(order.credits), out)
    for credit in order.credits:
        _text(credit.beneficiary, out)
        _varint(credit.amount, out)
        out.append(KINDS.index(credit.kind))
        _varint(credit.level, out)
    if order.refunded_by is not None:
        _text(order.refunded_by, out)
    return bytes(out)


def unpack_order(campaign: str, order_id: str, raw: bytes | None) -> Order | None:
    if not raw or raw[:1] != b"o":
        return None
    _, event_id, i = _owner(raw)
    buyer, i = _read_text(raw, i)
    count, i = _read_varint(raw, i)
    made = []
    for _ in range(count):
        who, i = _read_text(raw, i)
        amount, i = _read_varint(raw, i)
        kind = KINDS[raw[i]]
        level, i = _read_varint(raw, i + 1)
        made.append(Credit(entry_id(campaign, event_id, kind, level, who), who, amount, kind, level))
    refunded_by = _read_text(raw, i)[0] if i < len(raw) else None
    return Order(campaign, order_id, buyer, event_id, tuple(made), refunded_by)


def pack_queue(queue: Queue) -> bytes:
    """Queued events keep the bytes they arrived as (a dead letter carries them) and offsets."""
    raws = [(e.raw if e.raw is not None else orjson.dumps(e.to_dict())).decode() for e in queue.events]
    return orjson.dumps({"w": queue.waiting_on, "t": queue.since, "r": raws, "o": [e.offset for e in queue.events]})


def unpack_queue(packed: bytes) -> Queue:
    item = orjson.loads(packed)
    events = []
    for text, offset in zip(item["r"], item["o"], strict=True):
        raw = text.encode()
        events.append(replace(parse_event(raw), offset=offset, raw=raw))
    return Queue(events, item["w"], item["t"])


def digest_field(*parts: str) -> bytes:
    """A 10-byte field name for ids that are only looked up, never listed (orders, devices): shorter
    than the ids, and no collision in practice (80 bits)."""
    return hashlib.blake2b(enc(*parts).encode("utf-8", "surrogatepass"), digest_size=10).digest()


def event_digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=10).digest()


DAY_MS = 86_400_000


def _script(name: str) -> str:
    return resources.files("attribution").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


class RedisStore:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "fx",
        buckets: int = 16384,
        dedup_retention_ms: int = 7 * DAY_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.buckets = buckets
        self.dedup_retention_ms = dedup_retention_ms
        self.clock = clock
        self.epochs: dict[int, int] = {}
        self._scripts = {
            name: client.register_script(_script(name))
            for name in ("claim", "release", "device", "budget_draw", "budget_return", "group_join", "credit",
                         "commit", "seen", "mark")
        }

    @classmethod
    def from_url(cls, url: str, prefix: str = "fx", buckets: int = 16384) -> RedisStore:
        return cls(redis.Redis.from_url(url), prefix, buckets)

    # -- key names ------------------------------------------------------------------

    def _bucket(self, text: str) -> int:
        return zlib.crc32(text.encode("utf-8", "surrogatepass")) % self.buckets

    def _part(self, partition: int, suffix: str) -> str:
        return f"{self.prefix}:{{p{partition}}}:{suffix}"

    def user_key(self, partition: int, user_id: str) -> str:
        return self._part(partition, f"u:{self._bucket(user_id)}")

    def _global(self, kind: str, by: str) -> str:
        return f"{self.prefix}:{kind}:{{{self._bucket(by)}}}"

    def budget_key(self, campaign: str) -> str:
        return f"{self.prefix}:b:{{{enc(campaign)}}}"

    # -- fetch: reads and atomic operations in one pipeline -------------------------

    def fetch(self, partition: int, keys: list[Key]) -> dict[Key, Any]:
        pipe = self.r.pipeline(transaction=False)
        decoders = []
        draws: dict[str, list[Key]] = {}
        for key in keys:
            if key[0] == "budget":
                draws.setdefault(key[1], []).append(key)
                continue
            commands, decode = self._read(partition, key, pipe)
            decoders.append((key, len(commands), decode))
        for campaign, asked in draws.items():  # one script per campaign for all its draws, in order
            args = [asked[0][4]] + [value for key in asked for value in (key[2], key[3])]
            self._scripts["budget_draw"](keys=[self.budget_key(campaign)], args=args, client=pipe)
        replies = iter(pipe.execute())
        answers = {key: decode(*[next(replies) for _ in range(n)]) for key, n, decode in decoders}
        for asked in draws.values():
            answers.update(zip(asked, map(bool, next(replies)), strict=True))
        return answers

    def _read(self, partition: int, key: Key, pipe: Any) -> tuple[list, Callable[..., Any]]:
        """Queue the command(s) answering `key` on the pipeline; return them and a decoder."""
        kind, s = key[0], self._scripts
        if kind == "user":
            _, campaign, user_id = key
            reply = pipe.hget(self.user_key(partition, user_id), enc(campaign, user_id))
            return [reply], lambda raw: unpack_user(user_id, raw) if raw else None
        if kind == "seen":
            digest = event_digest(key[1])
            reply = s["seen"](keys=list(self._seen_keys(digest)), args=[digest], client=pipe)
            return [reply], lambda mark: mark.decode() if mark else None
        if kind == "share":
            share_id = key[1]
            return [pipe.hget(self._global("s", share_id), share_id)], lambda raw: unpack_share(share_id, raw)
        if kind == "order":
            _, campaign, order_id = key
            reply = pipe.hget(self._global("o", order_id), digest_field(campaign, order_id))
            return [reply], lambda raw: unpack_order(campaign, order_id, raw)
        if kind == "claim_share":
            _, share_id, event_id = key
            args = [share_id, event_id, claim_record(event_id)]
            return [s["claim"](keys=[self._global("s", share_id)], args=args, client=pipe)], bool
        if kind == "claim_order":
            _, campaign, order_id, event_id = key
            args = [digest_field(campaign, order_id), event_id, claim_record(event_id)]
            return [s["claim"](keys=[self._global("o", order_id)], args=args, client=pipe)], bool
        if kind == "device":
            _, campaign, device, user_id, limit = key
            args = [digest_field(campaign, device), user_id, limit]
            return [s["device"](keys=[self._global("d", device)], args=args, client=pipe)], bool
        if kind == "group_join":
            _, campaign, group_id, buyer, event_id, size = key
            args = [enc(campaign, group_id), buyer, event_id, size]
            return [s["group_join"](keys=[self._global("g", group_id)], args=args, client=pipe)], bool
        raise ValueError(f"unknown key kind {kind!r}")

    def _generation(self, length_ms: int) -> int:
        return int(self.clock() * 1000) // length_ms

    def _seen_keys(self, digest: bytes) -> tuple[str, str]:
        """This and the previous generation of an event id's duplicate mark (each lives a retention)."""
        generation = self._generation(self.dedup_retention_ms // 2)
        bucket = int.from_bytes(digest[:2], "big") % self.buckets
        return (f"{self.prefix}:e:{{{bucket}}}:{generation}", f"{self.prefix}:e:{{{bucket}}}:{generation - 1}")

    # -- commit ---------------------------------------------------------------------

    def commit(self, commit: Commit) -> None:
        """Two round trips. First, the cross-slot effects that must precede the commit (each
        idempotent: shares, orders, duplicate marks, released claims) and the partition's
        state, position and outbox in one fenced script. Then the outbox's credits and budget
        returns, each applied once per batch. A crash before the commit re-runs the batch,
        which changes nothing twice; a crash after it leaves the outbox, which the partition's
        next owner applies before anything else (`load_queues`)."""
        pipe = self.r.pipeline(transaction=False)
        self._effects(pipe, commit)
        payload = self._outbox_payload(commit)
        self._partition_commit(pipe, commit, payload)
        seq = pipe.execute()[-1]
        if seq:
            self._apply(commit.partition, int(seq), payload)

    def _effects(self, pipe: Any, commit: Commit) -> None:
        marks: dict[str, dict[bytes, str]] = {}
        for key, value in commit.writes.items():
            if key[0] == "seen":
                digest = event_digest(key[1])
                marks.setdefault(self._seen_keys(digest)[0], {})[digest] = value
            elif key[0] == "share":
                pipe.hset(self._global("s", key[1]), key[1], pack_share(value))
            elif key[0] == "order":
                _, campaign, order_id = key
                pipe.hset(self._global("o", order_id), digest_field(campaign, order_id), pack_order(value))
        for key in commit.releases:
            if key[0] == "claim_share":
                self._scripts["release"](keys=[self._global("s", key[1])], args=[key[1], key[2]], client=pipe)
            else:
                _, campaign, order_id, event_id = key
                args = [digest_field(campaign, order_id), event_id]
                self._scripts["release"](keys=[self._global("o", order_id)], args=args, client=pipe)
        for hkey, fields in marks.items():
            args = [self.dedup_retention_ms] + [value for pair in fields.items() for value in pair]
            self._scripts["mark"](keys=[hkey], args=args, client=pipe)

    def _outbox_payload(self, commit: Commit) -> bytes:
        """What the batch credits, grouped by balance bucket, and gives back to budgets."""
        if not commit.entries and not commit.budget_returns:
            return b""
        credits: dict[int, list] = {}
        for entry in commit.entries:
            credits.setdefault(self._bucket(entry.beneficiary), []).extend(
                [enc(entry.campaign, entry.beneficiary), entry.amount]
            )
        returns: dict[str, int] = {}
        for campaign, amount in commit.budget_returns:
            returns[campaign] = returns.get(campaign, 0) + amount
        return orjson.dumps({"c": credits, "r": returns}, option=orjson.OPT_NON_STR_KEYS)

    def _apply(self, partition: int, seq: int, payload: bytes) -> None:
        """Apply one outbox entry (idempotent per balance bucket and budget), then drop it."""
        item = orjson.loads(payload)
        pipe = self.r.pipeline(transaction=False)
        for bucket, pairs in item["c"].items():
            self._scripts["credit"](keys=[f"{self.prefix}:bal:{{{bucket}}}"], args=[partition, seq, *pairs],
                                    client=pipe)
        for campaign, amount in item["r"].items():
            self._scripts["budget_return"](keys=[self.budget_key(campaign)], args=[partition, seq, amount],
                                           client=pipe)
        pipe.hdel(self._part(partition, "out"), seq)
        pipe.execute()

    def _partition_commit(self, pipe: Any, commit: Commit, payload: bytes) -> None:
        """Users, queues, position and the outbox entry: one slot, one fenced script."""
        hashes: dict[str, dict[bytes | str, bytes]] = {}
        for key, value in commit.writes.items():
            if key[0] == "user":
                _, campaign, user_id = key
                hashes.setdefault(self.user_key(commit.partition, user_id), {})[enc(campaign, user_id)] = (
                    pack_user(user_id, value)
                )
        if commit.queues:
            hashes[self._part(commit.partition, "q")] = {
                user: pack_queue(queue) if queue else b"" for user, queue in commit.queues.items()
            }
        part = commit.partition
        keys = [self._part(part, "epoch"), self._part(part, "pos"), self._part(part, "seq"), self._part(part, "out")]
        epoch = self.epochs.get(commit.partition)
        args: list[Any] = ["" if epoch is None else epoch, "" if commit.position is None else commit.position, payload]
        for hkey, fields in hashes.items():
            keys.append(hkey)
            args.append(len(fields))
            for name, value in fields.items():
                args.extend([name, value])
        self._scripts["commit"](keys=keys, args=args, client=pipe)

    # -- partition ownership and reads for other services ---------------------------

    def acquire(self, partition: int) -> int:
        """Take a partition over: a new epoch fences every earlier owner out of its commits."""
        epoch = int(self.r.incr(self._part(partition, "epoch")))
        self.epochs[partition] = epoch
        return epoch

    def load_queues(self, partition: int) -> dict[str, Queue]:
        """Take over a partition's waiting queues, after applying what its outbox still holds."""
        for seq, payload in sorted((int(k), v) for k, v in self.r.hgetall(self._part(partition, "out")).items()):
            self._apply(partition, seq, payload)
        raw = self.r.hgetall(self._part(partition, "q"))
        return {user.decode(): unpack_queue(value) for user, value in raw.items()}

    def position(self, partition: int) -> int | None:
        raw = self.r.get(self._part(partition, "pos"))
        return int(raw) if raw is not None else None

    def balances(self, campaign: str | None = None) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key in self.r.scan_iter(match=f"{self.prefix}:bal:*", count=1000):
            for field, amount in self.r.hgetall(key).items():
                if field.startswith(b"~"):
                    continue  # a partition's high-water mark, not a balance
                c, user = dec(field.decode())
                if campaign is None or c == campaign:
                    out.setdefault(c, {})[user] = int(amount)
        return out

    def balance(self, campaign: str, beneficiary: str) -> int:
        """One balance, one round trip: what a client app asks after a 'you earned' push."""
        raw = self.r.hget(f"{self.prefix}:bal:{{{self._bucket(beneficiary)}}}", enc(campaign, beneficiary))
        return int(raw or 0)

    def nodes(self) -> list[tuple[str, str, Any]]:
        out = []
        for key in self.r.scan_iter(match=f"{self.prefix}:{{p*}}:u:*", count=1000):
            for field, raw in self.r.hgetall(key).items():
                campaign, user_id = dec(field.decode())
                out.append((campaign, user_id, unpack_user(user_id, raw)))
        return out
