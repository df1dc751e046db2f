"""The engine client's framing (gpud/proxy/upstream.py), as properties over what an engine
may send: any body in any chunking, with extensions and trailers, split at any points
between reads; and bad framing, which must end in a clean UpstreamError, never a hang.

Each example runs over a real socket pair: the client's request goes out on it, the
engine's answer is fed to the connection's protocol in exactly the generated pieces (so
the split points are the ones hypothesis chose, not the kernel's), and an end of input is
a real close of the engine's end.
"""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.proxy.upstream import UpstreamClient, UpstreamError, UpstreamResponse, _Conn

BASE = "http://127.0.0.1:9"  # never dialled: the connection is made on a socket pair
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


async def exchange(wire: bytes, cuts: list[int], close: bool) -> tuple[_Conn, bytes | Exception,
                                                                          int]:
    """POST once; the engine answers `wire` in pieces cut at `cuts`, then closes if `close`.
    Returns the connection, the body read or the exception raised, and how many
    connections are idle in the pool afterwards (1: it was kept for the next request)."""
    client = UpstreamClient()
    pool = client._pool(BASE)
    engine, ours = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Conn(pool), sock=ours)
    pool.put(conn)
    post = asyncio.ensure_future(client.post(BASE, "/v1/completions", b"{}"))
    await asyncio.sleep(0)  # the request is on the socket
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(wire)}), len(wire)]
    try:
        async with asyncio.timeout(5):  # a hang fails the test
            for a, b in itertools.pairwise(bounds):
                conn.data_received(wire[a:b])
                await asyncio.sleep(0)
                if conn.closed:
                    break
            if close:
                engine.close()
            try:
                resp: UpstreamResponse = await post
                out: bytes | Exception = await resp.read()
            except UpstreamError as e:
                out = e
            await asyncio.sleep(0)  # a close from the engine's side is seen
            return conn, out, sum(not c.closed for c in pool.idle)
    finally:
        engine.close()
        client.close()


def run(wire: bytes, cuts: list[int], close: bool = False) -> tuple[_Conn, bytes | Exception,
                                                                       int]:
    return asyncio.run(exchange(wire, cuts, close))


def chunked(body: bytes, sizes: list[int], ext: bool, trailers: list[tuple[str, str]],
            upper: bool) -> bytes:
    out, pos = b"", 0
    for n in sizes:
        piece = body[pos:pos + n]
        if not piece:
            break
        pos += len(piece)
        size = (b"%X" if upper else b"%x") % len(piece)
        out += size + (b";name=value" if ext else b"") + b"\r\n" + piece + b"\r\n"
    if pos < len(body):
        rest = body[pos:]
        out += b"%x\r\n" % len(rest) + rest + b"\r\n"
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + out


bodies = st.binary(max_size=3000)
cuts = st.lists(st.integers(0, 4000), max_size=40)
trailer = st.tuples(st.from_regex(r"X-[A-Za-z]{1,8}", fullmatch=True),
                    st.from_regex(r"[a-z0-9]{0,12}", fullmatch=True))


@settings(max_examples=300, deadline=None)
@given(bodies, st.lists(st.integers(1, 700), max_size=12), st.booleans(),
       st.lists(trailer, max_size=3), st.booleans(), cuts)
def test_a_chunked_body_arrives_whole_however_it_is_framed_and_split(
        body: bytes, sizes: list[int], ext: bool, trailers: list[tuple[str, str]],
        upper: bool, cut: list[int]) -> None:
    _, out, idle = run(chunked(body, sizes, ext, trailers, upper), cut)
    assert out == body
    assert idle == 1  # the connection went back to the pool, open


@settings(max_examples=200, deadline=None)
@given(bodies, cuts)
def test_a_content_length_body_arrives_whole_however_it_is_split(
        body: bytes, cut: list[int]) -> None:
    wire = HEAD_OK + b"Content-Length: %d\r\n\r\n" % len(body) + body
    _, out, idle = run(wire, cut)
    assert out == body and idle == 1


@settings(max_examples=100, deadline=None)
@given(bodies, cuts)
def test_a_body_without_framing_ends_where_the_engine_closes(body: bytes, cut: list[int]) -> None:
    _, out, idle = run(HEAD_OK + b"\r\n" + body, cut, close=True)
    assert out == body and idle == 0  # such a connection is never reused


BAD = {
    "chunk size not hex": HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk longer than its size": HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n",
    "negative length": HEAD_OK + b"Content-Length: -1\r\n\r\n",
    "two lengths": HEAD_OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "bad status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "head too large": HEAD_OK + b"X-Big: " + b"a" * (80 * 1024) + b"\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD))
@settings(max_examples=25, deadline=None)
@given(cut=cuts)
def test_bad_framing_is_a_clean_error_never_a_hang(case: str, cut: list[int]) -> None:
    conn, out, idle = run(BAD[case], cut, close=True)
    assert isinstance(out, UpstreamError), (case, out)
    assert conn.closed and idle == 0  # a broken connection is never reused


@settings(max_examples=50, deadline=None)
@given(cuts)
def test_bytes_beyond_the_answer_keep_the_answer_and_drop_the_connection(cut: list[int]) -> None:
    wire = HEAD_OK + b"Content-Length: 2\r\n\r\nok" + HEAD_OK + b"Content-Length: 0\r\n\r\n"
    conn, out, idle = run(wire, cut)
    assert out == b"ok" and conn.closed and idle == 0


@settings(max_examples=100, deadline=None)
@given(bodies.filter(bool), st.booleans(), st.data())
def test_an_answer_cut_short_is_an_error_never_a_short_body(
        body: bytes, use_chunks: bool, data: st.DataObject) -> None:
    if use_chunks:
        wire = chunked(body, [], False, [], False)
    else:
        wire = HEAD_OK + b"Content-Length: %d\r\n\r\n" % len(body) + body
    end = data.draw(st.integers(0, len(wire) - 1), label="engine dies after this many bytes")
    _, out, idle = run(wire[:end], data.draw(cuts), close=True)
    assert isinstance(out, UpstreamError), out
    assert idle == 0
