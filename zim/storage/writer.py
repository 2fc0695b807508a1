"""The writer process: the only process that touches the database after start-up.

The server (``zim.storage.durable.DurableStore``) sends it store operations over a Unix
socketpair, in zim's TCP framing: action = operation, body = orjson list of its
arguments. It answers every operation, in order, with one packet: same action,
seq = OK, FAILED, REFUSED or LIMIT, body = orjson of the result. Packets either way stay
under the link's limit (``--link-max-packet``, far above any of them: reads are
bounded by bytes, ``zim.storage.sqlite.PAGE_BYTES``); a frame over it, or a
broken one, ends the link without an answer.

Group commit: it reads whatever has arrived (everything queued while the last
commit ran), applies it all in one transaction, commits, and only then sends the
answers, in one write. So an answer means "committed": the server sends a client
its response only after that. A failed batch (I/O error, full disk) is rolled
back and every operation in it answered FAILED; so is every later one until the
server, having undone its own view of the failed ones, sends RESYNC. Hence an
answer OK also means every earlier operation was stored, except those answered
REFUSED: an operation the store refuses (the server checks first: a bug if
seen), or an answer too big to send, fails alone and nothing of it is stored.
LIMIT: an operation a quota refuses (a direct message to a full mailbox:
zim.storage.store.Quotas, in the writer's ``--settings``)
fails alone too, nothing of it stored, with body ``{"code", "message"}`` for
the client; the batch and every other operation go on.

Reads (history, mailbox) go through here too, in the same order as the writes:
a read sees every write sent before it.

Between batches, and after a batch once due, it prunes by the retention tiers a
bounded step at a time (``SQLiteStore.prune``).
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
from typing import Any, Callable

import orjson

from zim._codec import TcpDecoder, encode_tcp
from zim.ids import wall_clock_ms
from zim.process import die_with_parent
from zim.storage.batchstats import BatchStats
from zim.storage.retention import Retention
from zim.storage.sqlite import SQLiteStore
from zim.storage.store import CHANNEL, Quotas, StoreRefusal

log = logging.getLogger("zim.storage.writer")

(OP_CREATE_USER, OP_RENAME, OP_SUBSCRIBE, OP_UNSUBSCRIBE, OP_CHANNEL_MESSAGE, OP_USER_MESSAGE,
 OP_HISTORY, OP_MAILBOX, OP_ACK, OP_RESYNC) = range(1, 11)
OP_TOKEN_EPOCH = 11                   # a user's token generation raised (log out everywhere)
OP_CREATE_CHANNEL, OP_GRANT, OP_REVOKE_GRANT = 12, 13, 14   # private channels and their grants
OP_DELETE_CHANNEL = 15                # a channel, its memberships and history deleted (the server API)
# the archive behind SQLite (zim.storage.archiver): its queue's oldest rows, their
# confirmation, and a history page with the lowest seq it stands for
OP_ARCHIVE_PEEK, OP_ARCHIVE_DONE, OP_HISTORY_SPAN = 16, 17, 18
# Answer statuses (the seq field). FAILED: the batch was rolled back, and every
# later operation fails too until RESYNC. REFUSED: this operation alone was not
# done (a request the store refuses, an answer too big for the link); the rest go on.
# LIMIT: this operation alone was refused by a quota (body: {"code", "message"},
# the error the client gets); nothing of it is stored, the rest go on.
OK, FAILED, REFUSED, LIMIT = 0, 1, 2, 3
# The links' packet limit when none is given: zim._core.link_packet_limit of the
# largest --max-packet (the server passes its own, --link-max-packet)
LINK_MAX_PACKET = 65 * 1024 * 1024
READ_CHUNK = 1 << 20
PRUNE_ROWS = 2000                     # rows deleted per prune step


def _history(store: SQLiteStore, kind: str, key: Any, before: int | None, limit: int) -> list:
    messages, has_more = store.history(kind, key if kind == CHANNEL else tuple(key), before, limit)
    return [messages, has_more]


def _history_span(store: SQLiteStore, kind: str, key: Any, before: int | None, limit: int) -> list:
    return list(store.history_span(kind, key if kind == CHANNEL else tuple(key), before, limit))


OPERATIONS: dict[int, Callable[..., Any]] = {
    OP_CREATE_USER: SQLiteStore.create_user,
    OP_RENAME: SQLiteStore.set_user_name,
    OP_SUBSCRIBE: SQLiteStore.subscribe,
    OP_UNSUBSCRIBE: SQLiteStore.unsubscribe,
    OP_CHANNEL_MESSAGE: SQLiteStore.append_channel_message,
    OP_USER_MESSAGE: SQLiteStore.append_user_message,
    OP_HISTORY: _history,
    OP_MAILBOX: SQLiteStore.mailbox_pull,
    OP_ACK: SQLiteStore.mailbox_ack,
    OP_TOKEN_EPOCH: SQLiteStore.set_token_epoch,
    OP_CREATE_CHANNEL: SQLiteStore.create_channel,
    OP_GRANT: SQLiteStore.grant,
    OP_REVOKE_GRANT: SQLiteStore.revoke_grant,
    OP_DELETE_CHANNEL: SQLiteStore.delete_channel,
    OP_ARCHIVE_PEEK: SQLiteStore.archive_peek,
    OP_ARCHIVE_DONE: SQLiteStore.archive_done,
    OP_HISTORY_SPAN: _history_span,
}


class Writer:
    """Applies batches of operations to one SQLiteStore; see the module docstring."""

    def __init__(self, store: SQLiteStore, retention: Retention, link_max_packet: int = LINK_MAX_PACKET) -> None:
        self.store = store
        self.retention = retention
        self.link_max_packet = link_max_packet     # no answer goes over it (REFUSED instead)
        self.failed = False             # answering FAILED until RESYNC
        self.prune_at = time.monotonic() + retention.prune_every_s
        self.prune_from: str | None = None    # None: no pass under way
        self.pruned = 0

    def apply(self, packets: list[tuple[int, bytes]]) -> list[bytes]:
        """One batch: the answer packets, to be sent only now that it is committed."""
        store = self.store
        answers: list[bytes] = []
        first = -1                      # index of the batch's first answer (-1: no transaction)
        for op, body in packets:
            if op == OP_RESYNC:
                self.failed = False
                continue
            if self.failed:
                answers.append(encode_tcp(op, FAILED, b'"an earlier write failed"'))
                continue
            if first < 0:
                store.begin_batch()
                first = len(answers)
            try:
                value = OPERATIONS[op](store, *orjson.loads(body))
            except StoreRefusal as refusal:
                # a quota (a full mailbox): nothing of it was stored; the batch goes on
                answers.append(encode_tcp(op, LIMIT, orjson.dumps(refusal.as_dict())))
                continue
            except sqlite3.Error as exc:
                self._fail(answers, first, op, exc)
                first = -1
                continue
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                # a request the store refuses (the server checks first: a bug if seen)
                log.error("operation %d refused: %r", op, exc)
                answers.append(encode_tcp(op, REFUSED, orjson.dumps(f"refused: {exc!r}")))
                continue
            payload = orjson.dumps(value)
            if len(payload) + 8 > self.link_max_packet:
                # reads are bounded by bytes (PAGE_BYTES), so this is a bug if seen;
                # the server closes a link that brings it more than it carries
                log.error("operation %d: an answer of %d bytes is over the link's limit", op, len(payload))
                answers.append(encode_tcp(op, REFUSED, b'"answer too large"'))
                continue
            answers.append(encode_tcp(op, OK, payload))
        if first >= 0:
            try:
                store.commit_batch()
            except sqlite3.Error as exc:
                self._fail(answers, first, 0, exc)
        return answers

    def _fail(self, answers: list[bytes], first: int, op: int, exc: Exception) -> None:
        """The batch's transaction failed: roll back, answer all of it FAILED."""
        log.error("write failed, batch rolled back: %s", exc)
        if self.store._batch is not None:
            self.store.rollback_batch()
        reason = orjson.dumps(f"write failed: {exc}")
        for i in range(first, len(answers)):
            answers[i] = encode_tcp(int.from_bytes(answers[i][4:6], "big"), FAILED, reason)
        if op:
            answers.append(encode_tcp(op, FAILED, reason))
        self.failed = True

    def after_commit(self, checkpointer: Checkpointer) -> None:
        """Between batches: wake the checkpointer; finish its work if the WAL got big."""
        if checkpointer.wal_big:
            try:
                if self.store.checkpoint():
                    checkpointer.wal_big = False
            except sqlite3.Error as exc:
                log.warning("checkpoint failed: %s", exc)
        checkpointer.commits.set()

    # -- retention -----------------------------------------------------------
    def prune_due(self) -> bool:
        return self.prune_from is not None or time.monotonic() >= self.prune_at

    def prune_step(self) -> None:
        """One bounded pruning step (its own transaction)."""
        if self.prune_from is None:
            self.prune_from = ""
            self.pruned = 0
        try:
            deleted, self.prune_from = self.store.prune(self.retention, wall_clock_ms(),
                                                        self.prune_from, PRUNE_ROWS)
        except sqlite3.Error as exc:
            log.error("pruning failed: %s", exc)
            self.prune_from = None
            deleted = 0
        self.pruned += deleted
        if self.prune_from is None:
            if self.pruned:
                log.info("pruned %d messages", self.pruned)
            self.prune_at = time.monotonic() + self.retention.prune_every_s

    def next_timeout(self) -> float | None:
        if self.prune_from is not None:
            return 0.0
        return max(0.0, self.prune_at - time.monotonic())


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database from a second connection, so that
    the commits of the writer do not pay for it (SQLite's automatic checkpoint
    runs inside the commit that crosses its threshold: a latency spike every
    ~1,000 pages). The sqlite3 module lets go of the GIL while a checkpoint runs.

    A PASSIVE checkpoint never blocks the writer, but under steady writes it
    rarely finishes (new frames arrive while it copies), and the WAL starts over
    from its beginning only at a write that follows a finished checkpoint: left
    alone it would grow without end. So once the WAL holds ``restart_frames``,
    ``wal_big`` asks the writer to finish the job between two batches
    (``SQLiteStore.checkpoint``): by then this thread has copied nearly all of
    it, and the writer's next transaction starts the WAL over.
    ``journal_size_limit`` then cuts the file back."""

    INTERVAL = 0.05

    def __init__(self, path: str, restart_frames: int = 8192) -> None:   # 32 MiB of 4 KiB pages
        super().__init__(name="checkpoint", daemon=True)
        self.path = path
        self.restart_frames = restart_frames
        self.commits = threading.Event()    # set after commits: there is work
        self.wal_big = False

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self.commits.wait()
                self.commits.clear()
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.wal_big = frames >= self.restart_frames
                except sqlite3.Error as exc:
                    log.warning("checkpoint failed: %s", exc)
                time.sleep(self.INTERVAL)
        finally:
            conn.close()


def serve(sock: socket.socket, writer: Writer, checkpointer: Checkpointer | None = None,
          stats: BatchStats | None = None) -> None:
    """Read operations, apply them in batches, answer; until the server goes away."""
    decoder = TcpDecoder(writer.link_max_packet)
    fd = sock.fileno()
    buffer = bytearray(READ_CHUNK)      # reused: a fresh 1 MiB bytes per read costs an mmap
    view = memoryview(buffer)
    while True:
        ready, _, _ = select.select([fd], [], [], writer.next_timeout())
        if not ready:
            writer.prune_step()
            continue
        size = sock.recv_into(buffer)
        if not size:
            return                      # the server closed the link
        packets = []
        for event in decoder.feed(bytes(view[:size])):
            if event[0] != "packet":
                # nothing is written back: the server sees the link close
                log.error("broken link framing: %r; closing the link", event[0])
                return
            packets.append((event[1], event[3]))
        if packets:
            started = time.monotonic()
            answers = writer.apply(packets)
            if stats is not None:
                stats.record(len(packets), time.monotonic() - started)
            sock.sendall(b"".join(answers))
            if checkpointer is not None:
                writer.after_commit(checkpointer)
        if writer.prune_due():
            writer.prune_step()


def writer_settings(retention: Retention, quotas: Quotas, archive_private: bool = False,
                    archive_channels: bool = False) -> str:
    """The writer's ``--settings``: its retention policy, mailbox quotas and which
    messages it queues for the archive (``SQLiteStore.set_archiving``), as JSON."""
    return orjson.dumps({"retention": retention.as_dict(), "max_mailbox": quotas.max_mailbox,
                         "max_mailbox_bytes": quotas.max_mailbox_bytes,
                         "archive": [archive_private, archive_channels]}).decode()


def from_writer_settings(settings: dict) -> tuple[Retention, Quotas]:
    """What ``writer_settings`` gave; the channel quota is the server's to check (it
    has every channel in memory), so the writer's is off."""
    return (Retention.from_dict(settings["retention"]),
            Quotas(settings["max_mailbox"], settings["max_mailbox_bytes"], 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zim.storage.writer", description="zim's database writer (started by zim-server)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--link-max-packet", type=int, default=LINK_MAX_PACKET,
                        help="the largest packet on the link, either way (the server's Reactor.link_max_packet)")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--settings", type=orjson.loads, default=None,
                        help="the retention policy and the mailbox quotas, as writer_settings gives them "
                             "(checked once, by the server's options)")
    parser.add_argument("--stats-fd", type=int, default=-1,
                        help="shared memory for the batch figures (zim.storage.batchstats)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    os.umask(0o077)     # whatever SQLite creates next to the database is private (zim.datadir)
    # SIGINT (Ctrl-C reaches the whole process group) is the server's to act on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the server stopping, or dying) ends it at once: an open batch is
    # simply not committed, and none of its operations was answered
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    retention, quotas = from_writer_settings(args.settings) if args.settings else (Retention(), Quotas())
    sock = socket.socket(fileno=args.link_fd)
    sock.setblocking(True)
    try:
        store = SQLiteStore(args.db)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    store.checkpoint_automatically(False)
    store.set_quotas(quotas)
    if args.settings:
        store.set_archiving(*args.settings.get("archive", (False, False)))
    checkpointer = Checkpointer(args.db)
    checkpointer.start()
    try:
        serve(sock, Writer(store, retention, args.link_max_packet), checkpointer,
              BatchStats.attach(args.stats_fd) if args.stats_fd >= 0 else None)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
