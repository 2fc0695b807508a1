"""What bench/peers.py prints and writes: the table of figures, the ratios
of zim to each peer, docs/benchmarks.md and its chart docs/benchmarks.png
(``--write-docs``).
"""
from __future__ import annotations

import os
import shlex

import benchlib
from peers_wire import PAYLOAD_SIZE


DOCS_MD = os.path.join(benchlib.REPO_ROOT, "docs", "benchmarks.md")
DOCS_PNG = os.path.join(benchlib.REPO_ROOT, "docs", "benchmarks.png")


# -- reporting ---------------------------------------------------------------------------
def millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f} M"


def idle_label(result: dict) -> str:
    """The idle test's size: K connections, and their N channels each (``--idle-channels``)."""
    channels = result.get("idle_channels", 0)
    return f"{result['idle_connections']:,}" + (f", {channels} channels each" if channels else "")


def table(result: dict) -> list[str]:
    """The markdown table: one row per server."""
    counts = result["subscribers"]
    header = ["server"]
    for count in counts:
        header += [f"{count:,} subs: deliveries / server-CPU-s", f"{count:,} subs: deliveries / s"]
    header += ["loss", "bytes / delivery"]
    if result["idle_connections"]:
        header.append(f"bytes / idle connection ({idle_label(result)})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in result["servers"].items():
        if not entry["available"]:
            lines.append(f"| {name} | skipped: {entry['skipped']} |" + " |" * (len(header) - 2))
            continue
        row = [name]
        loss = 0
        sizes = set()
        for count in counts:
            part = entry["fanout"].get(str(count))
            if part is None:
                row += ["failed", "failed"]
                continue
            row += [millions(part["deliveries_per_cpu_second"]),
                    millions(part["deliveries_per_second"])]
            loss += part["loss"]
            sizes.add(part["delivery_bytes"])
        idle_part = entry.get("idle")
        row += [f"{loss:,}", "/".join(str(size) for size in sorted(sizes))]
        if result["idle_connections"]:
            row.append("failed" if idle_part is None
                       else f"{idle_part['bytes_per_connection']:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ratios(result: dict) -> list[str]:
    """zim relative to each peer: deliveries per server-CPU-second (zim ÷ peer, above 1:
    zim does more with a CPU-second) and idle memory (peer ÷ zim, above 1: zim holds
    a connection for less)."""
    zim = result["servers"].get("zim") or {}
    if not zim.get("available"):
        return []
    peers = [n for n, e in result["servers"].items() if n != "zim" and e.get("available")]
    header = ["figure", *[f"zim vs {name}" for name in peers]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def quotient(top: float | None, bottom: float | None) -> str:
        return "n/a" if not top or not bottom else f"{top / bottom:.2f}×"

    for count in result["subscribers"]:
        mine = (zim["fanout"].get(str(count)) or {}).get("deliveries_per_cpu_second")
        cells = [quotient(mine, (result["servers"][n]["fanout"].get(str(count)) or {}).get(
            "deliveries_per_cpu_second")) for n in peers]
        lines.append(f"| deliveries / server-CPU-s at {count:,} subscribers, zim ÷ peer | "
                     + " | ".join(cells) + " |")
    if result["idle_connections"]:
        mine = (zim.get("idle") or {}).get("bytes_per_connection")
        cells = [quotient((result["servers"][n].get("idle") or {}).get("bytes_per_connection"),
                          mine) for n in peers]
        lines.append("| bytes / idle connection, peer ÷ zim | " + " | ".join(cells) + " |")
    return lines


def write_docs(result: dict, lines: list[str]) -> None:
    """docs/benchmarks.md (the table, how it was measured, each run) and docs/benchmarks.png."""
    info = result["machine"]
    runs_text = []
    for name, entry in result["servers"].items():
        for count, part in entry.get("fanout", {}).items():
            figures = ", ".join(millions(r["deliveries_per_cpu_second"]) for r in part["runs"])
            runs_text.append(f"- {name}, {int(count):,} subscribers × {part['messages']:,} "
                             f"messages: {figures} deliveries per server-CPU-second; "
                             f"loss {part['loss']:,}")
        if entry.get("idle"):
            idle_part = entry["idle"]
            runs_text.append(
                f"- {name}, idle: {idle_part['connections']:,} connections, RSS "
                f"{idle_part['rss_before'] / 2**20:.1f} → "
                f"{idle_part['rss_after'] / 2**20:.1f} MiB"
                + ("" if "runs" not in idle_part else "; bytes per connection by run: " + ", ".join(
                    f"{r['bytes_per_connection']:,.0f}" for r in idle_part["runs"])))
        if entry.get("error"):
            runs_text.append(f"- {name}: FAILED: {entry['error'].splitlines()[0]}")
    versions = "\n".join(f"- {name}: {entry.get('version', '')} — "
                         + (f"`{shlex.join(entry['command'])}`" if entry.get("command")
                            else f"skipped ({entry.get('skipped')})")
                         for name, entry in result["servers"].items())
    messages = ", ".join(f"{int(n):,} at {int(count):,} subscribers"
                         for count, n in result["messages"].items())
    status = ("every run delivered every message (loss 0)" if result["ok"]
              else "**some runs failed or lost messages: see the Runs section**")
    relative = ratios(result)
    memory_gib = info["memory_bytes"] / 2**30
    same_work = f"""Every side does the same work: each connection subscribes to
{result.get('idle_channels')} channels, {result.get('idle_channels', 0) - 1} shared ones of \
{result.get('idle_channel_size'):,} members (each a different cut of the
connections) and one of its own, as `bench/idle_memory.py --channels-per-user`
(zim: log in as a new user, then join each channel with action 3; redis: one
SUBSCRIBE; NATS: CONNECT and a SUB each; asyncio: a SUB line each), at most 1,000
subscriptions in flight, then {result['settle']:g} s of quiet: (RSS after − RSS before) /
connections, the RSS summed over the server's process tree, the median of
{result.get('idle_runs', 1)} fresh server(s). Kernel socket memory is in none of them.
"""
    idle_text = "" if not result["idle_connections"] else f"""
**Idle memory.** {same_work}""" if result.get("idle_channels") else f"""
**Idle memory.** A fresh server, {result['idle_connections']:,} connections from one client
process, each doing what is natural for it (zim: log in as a new user; redis:
SUBSCRIBE; NATS: CONNECT and SUB; asyncio: SUB), then {result['settle']:g} s of quiet:
(RSS after − RSS before) / connections, the RSS summed over the server's process
tree. Kernel socket memory is in none of them. This is not the same work on each
side: a zim connection only logged in (a user, joined to no channel), while a
redis, NATS or asyncio connection is subscribed to a channel. A zim user in 12
channels costs more: `bench/idle_memory.py --channels-per-user 12` measures it
(README, "Benchmarks").
"""
    text = f"""# zim against its peers

zim, redis, NATS and a plain asyncio server on the same machine, measured the
same way by `bench/peers.py`. Generated by `bench/peers.py --write-docs` on
{result['date']}; the figures drift by ±25% from minute to minute on this
machine, measure your own.

    {result['command']}

Machine: {info['nproc']} cores, shared by the server and the clients; {memory_gib:.1f} GiB;
Linux {info['kernel']}; Python {info['python']}; open-files limit {info['open_files_limit']:,}.
Loopback only. Medians of {result['runs']} run(s); {status}.

{chr(10).join(lines)}

{chr(10).join(relative)}

![deliveries per server-CPU-second and bytes per idle connection](benchmarks.png)

## What is measured

**Fan-out.** A fresh server for each subscriber count: N subscribers of one
channel, in client processes of at most {result['per_process']:,} sockets each, and one
publisher sending messages of {PAYLOAD_SIZE} bytes ({messages}), with at
most {result['window']} unanswered. zim answers each send once it is stored, redis answers each
PUBLISH with its receiver count, the asyncio server answers OK; NATS answers
nothing, so its publisher sends a PING after every half window and counts the
PONGs. Every subscriber must receive every message: the subscribers count bytes
(each delivery of a peer has one exact size; zim's size is read by a sample
connection that parses every packet), one connection per client process checks
its whole stream, and *loss* is what did not arrive.
*Deliveries per server-CPU-second* = deliveries ÷ the user + system CPU time of
the server's process tree from the first send to the last delivery. That is the
figure to compare. The wall rate (*deliveries / s*) also depends on the Python
clients, which share the two cores with the server. *Bytes / delivery* is the
size of one delivery on the wire: zim pushes a whole message (id, seq, content,
sender, time, channel) in its own framing, the peers only the payload and a
short header.
{idle_text}
## The servers

Versions and command lines (PORT: a free loopback port; DIR: a temporary directory):

{versions}

Notes:

- **zim** runs with its default flags (`benchlib.Server`: one worker, loopback
  ports) but for `--channel-rate 0`: the default limit of 40 messages per second
  per channel would refuse the bench's stream. The durable SQLite store is on:
  every channel message is also committed to the database by the writer process
  before the send is answered (the writer's CPU is counted), and every user
  logged in by the idle test is stored.
- **redis** stores nothing (`--save "" --appendonly no`): pub/sub over RESP2,
  one thread.
- **nats** is core NATS (no JetStream: nothing stored). It is written in Go and
  multi-threaded, so it can use both cores; its CPU time is summed over its
  threads. The config file only sets `ping_interval: "1h"`, and the subscribers
  answer the one PING it sends each new connection before the runs, so no PING
  lands in a counted stream.
- **asyncio** is `bench/asyncio_server.py`, what a Python user would write: one
  `asyncio.Protocol` per connection, one `transport.write` per message per
  subscriber, one thread.

zim, redis and NATS queue a subscriber's messages and hand them to the kernel
in one write per subscriber per loop iteration (NATS: per flush of its writer);
the asyncio server makes one system call per delivery, and on loopback that
call also runs the receiving side's TCP work, which is where its CPU time goes.
redis copies each message into every subscriber's output buffer; zim frames it
once into the channel's buffer for the loop iteration and writes each
subscriber's slice straight from there (docs/architecture.md, "Broadcast"), so
its bytes are written to memory once, not once per subscriber: it sends twice
the bytes per delivery and still spends less CPU on each.

## Runs

{chr(10).join(runs_text)}

Reproduce: `apt-get install redis-server nats-server`, `pip install -e '.[bench]'`,
then the command above (see [bench/README.md](../bench/README.md)).
"""
    with open(DOCS_MD, "w") as out:
        out.write(text)
    plot(result, DOCS_PNG)
    print(f"wrote {os.path.relpath(DOCS_MD, benchlib.REPO_ROOT)} and "
          f"{os.path.relpath(DOCS_PNG, benchlib.REPO_ROOT)}")


def plot(result: dict, path: str) -> None:
    """Bar charts: deliveries per server-CPU-second for each N, bytes per idle connection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in result["servers"].items() if e["available"]]
    colors = {"zim": "#2b7bba", "redis": "#d62728", "nats": "#2ca02c", "asyncio": "#ff7f0e"}
    panels = [(f"deliveries per server-CPU-second (millions)\n{count:,} subscribers",
               [(result["servers"][n]["fanout"].get(str(count)) or {}).get(
                   "deliveries_per_cpu_second") for n in names], 1e6, "{:.2f}")
              for count in result["subscribers"]]
    if result["idle_connections"]:
        panels.append((f"server bytes per idle connection\n{idle_label(result)} "
                       "(lower is better)",
                       [(result["servers"][n].get("idle") or {}).get("bytes_per_connection")
                        for n in names], 1, "{:,.0f}"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    for axis, (title, values, scale, label) in zip(axes[0], panels):
        heights = [0 if v is None else v / scale for v in values]
        bars = axis.bar(names, heights, color=[colors.get(n, "grey") for n in names])
        for bar, value in zip(bars, values):
            axis.annotate("n/a" if value is None else label.format(value / scale),
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.margins(y=0.15)
        axis.spines[["top", "right"]].set_visible(False)
    figure.suptitle(f"zim and its peers, {result['date']} "
                    f"({result['machine']['nproc']} shared cores, loopback)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
