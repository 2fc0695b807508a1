"""zim.client: talk to a zim server from Python (docs/protocol.md).

A blocking client, for scripts, tools and tests::

    from zim.client import connect

    with connect("tcp://127.0.0.1:8081") as alice:        # or "ws://127.0.0.1:8082/"
        alice.login("alice")                              # a new user: alice.user_id, alice.token
        alice.ok(3, {"name": "room1"})                    # join a channel
        alice.ok(4, {"channel": "room1", "content": "hi"})
        action, body = alice.recv_push(timeout=2.0)       # the next push (seq 0), if one comes

``ok`` raises ``ZimError`` for an error answer; ``call`` returns it as it came.

An asyncio client (``zim.client.aio``) that reconnects with its token, pulls and
acknowledges the mailbox, and delivers pushes in seq order per conversation with
no hole (filled from history when the server skipped or merged some)::

    from zim.client import connect_async

    async with await connect_async("ws://127.0.0.1:8082/", name="bob") as bob:
        await bob.join("room1")
        async for push in bob.pushes():                  # a Push: action 101/102, message, seq
            print(push.conversation, push.seq, push.content)

The wire format alone, without I/O (``zim.client.codec``), for clients with
their own event loop: packets to send, and splitters that take whole packets
out of the bytes read::

    from zim.client import split_tcp, tcp_packet

    sock.sendall(tcp_packet(9, 1, b"{}"))                  # heartbeat, seq 1
    buffer += sock.recv(65536)                             # a bytearray
    for action, seq, body in split_tcp(buffer):            # removes the whole packets
        ...

Compression on TCP: ``connect(url, compress=True)`` (and ``connect_async``) asks
at login and inflates what comes compressed; with your own loop, add
``login_compress`` to the login body and give the splitters ``inflate=True``.

WebSocket: ``ws_upgrade_request``/``check_ws_upgrade`` for the handshake,
``ws_packet`` (a masked binary frame), and ``split_ws`` or ``WsDecoder`` for
the server's frames.
"""
from zim.client.aio import Client as AsyncClient
from zim.client.aio import Push
from zim.client.aio import connect as connect_async
from zim.client.blocking import DEFAULT_TIMEOUT, Client, Closed, TcpClient, WsClient, ZimError, connect
from zim.client.codec import (DEFAULT_MAX_PACKET, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                              PACKET_HEAD, PACKET_HEAD_SIZE, TCP_HEADER, TCP_HEADER_SIZE, WS_GUID, Body, Packet,
                              ProtocolError, TcpDecoder, WsDecoder, apply_mask, check_ws_upgrade, close_payload,
                              SEQ_DEFLATED, decode_body, encode_body, inflate_body, login_body, login_compress,
                              mask_key, new_ws_key, parse_frame, parse_http_head, parse_ws_message, server_address,
                              split_frames, split_tcp, split_ws, take_tcp_packet, tcp_header, tcp_packet, ws_accept,
                              ws_close, ws_close_payload, ws_frame, ws_header, ws_message, ws_packet, ws_upgrade_accepted, ws_upgrade_request)

__all__ = [
    "AsyncClient", "Push", "connect_async",
    "DEFAULT_TIMEOUT", "Client", "Closed", "TcpClient", "WsClient", "ZimError", "connect",
    "DEFAULT_MAX_PACKET", "OP_BINARY", "OP_CLOSE", "OP_CONTINUATION", "OP_PING", "OP_PONG", "OP_TEXT",
    "PACKET_HEAD", "PACKET_HEAD_SIZE", "TCP_HEADER", "TCP_HEADER_SIZE", "WS_GUID", "Body", "Packet",
    "ProtocolError", "TcpDecoder", "WsDecoder", "apply_mask", "check_ws_upgrade", "close_payload",
    "SEQ_DEFLATED", "decode_body", "encode_body", "inflate_body", "login_body", "login_compress", "mask_key",
    "new_ws_key", "parse_frame", "parse_http_head", "parse_ws_message", "server_address",
    "split_frames", "split_tcp", "split_ws", "take_tcp_packet", "tcp_header", "tcp_packet", "ws_accept",
    "ws_close", "ws_close_payload", "ws_frame", "ws_header", "ws_message", "ws_packet", "ws_upgrade_accepted", "ws_upgrade_request",
]
