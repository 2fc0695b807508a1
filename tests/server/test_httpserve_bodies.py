"""zim.httpserve with request bodies and late answers (what the server API needs):
bodies reach the handler, are bounded (413, Content-Length or chunked), and an
answer the handler gives later (``Request.respond``) holds the connection's next
requests until it has left, without holding the loop."""
from __future__ import annotations

from tests.server import http_loop
from tests.server.http_loop import RawClient, port_of

loop, serve = http_loop.loop, http_loop.serve      # fixtures

METHODS = ("GET", "POST", "DELETE")


def echo(request):
    return 200, [("X-Method", request.method)], request.body or request.target.encode()


def test_a_body_reaches_the_handler_and_the_connection_goes_on(loop, serve):
    client = RawClient(port_of(serve(echo, methods=METHODS, max_body_size=1024)))
    client.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    assert client.response().body == b"hello"
    client.send(b"DELETE /y HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert client.response().body == b"abcde"
    assert client.get("/z").body == b"/z"


def test_a_body_over_the_bound_is_413_and_closed(loop, serve):
    port = port_of(serve(echo, methods=METHODS, max_body_size=1024))
    client = RawClient(port)
    client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n")     # refused by its head
    assert client.response().status == 413
    assert client.closed_by_server()
    client = RawClient(port)
    client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"200\r\n" + b"a" * 512 + b"\r\n" + b"201\r\n" + b"b" * 513 + b"\r\n")
    assert client.response().status == 413
    assert client.closed_by_server()


def test_methods_not_served_are_405_with_the_callers_error_shape(loop, serve):
    server = serve(echo, methods=METHODS, error_answer=lambda status, message: ([], b"{%d}" % status))
    client = RawClient(port_of(server))
    client.request("PUT", "/")
    answer = client.response()
    assert (answer.status, answer.body) == (405, b"{405}")


def test_a_late_answer_holds_the_next_request_until_it_has_left(loop, serve):
    waiting = []

    def handler(request):
        if request.target == "/later":
            waiting.append(request)
            return None
        return echo(request)

    server = serve(handler, methods=METHODS)
    client = RawClient(port_of(server))
    client.send(b"GET /later HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    loop.wait_until(lambda: len(waiting) == 1)
    other = RawClient(port_of(server))
    assert other.get("/meanwhile").body == b"/meanwhile"       # the loop serves others meanwhile
    loop.call(lambda: waiting[0].respond(201, [], b"done"))
    first = client.response()
    assert (first.status, first.body) == (201, b"done")
    assert client.response().body == b"/next"                  # parsed only after the first left
    loop.call(lambda: waiting[0].respond(200, [], b"twice"))   # a second answer is ignored
    assert client.get("/again").body == b"/again"


def test_a_client_gone_while_its_answer_waits_goes_once_answered(loop, serve):
    """(Its socket is not read meanwhile, so its close is seen with the answer:
    a closed client and one that half-closed after its request look alike until then.)"""
    waiting = []
    server = serve(lambda request: waiting.append(request), methods=METHODS)
    client = RawClient(port_of(server))
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    loop.wait_until(lambda: len(waiting) == 1)
    client.sock.close()
    loop.call(lambda: waiting[0].respond(200, [], b"late"))
    loop.wait_until(lambda: server.clients == 0)
    loop.call(lambda: waiting[0].respond(200, [], b"again"))   # no client: nothing happens
