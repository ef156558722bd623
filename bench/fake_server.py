"""A fake OpenAI-compatible streaming server, to measure what bench/serve.py's client costs.

Answers `GET /v1/models` and streams `max_tokens` one-word chunks (then a usage chunk and `[DONE]`) for any
POST to `/v1/completions` or `/v1/chat/completions`, with `--itl-ms` between chunks (0: as fast as it can),
as chunked HTTP/1.1 SSE like a real server. No model, next to no CPU of its own when --itl-ms > 0.

    python bench/fake_server.py --port 8999 --itl-ms 10 &
    python bench/serve.py --base-url http://127.0.0.1:8999 --num-prompts 256 --max-concurrency 32 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, itl: float) -> None:
    try:
        request_line = await reader.readline()
        if not request_line:
            return
        method, path, _ = request_line.decode().split(" ", 2)
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.strip().lower() == "content-length":
                length = int(v)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if method == "GET":
            data = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(data), data))
            await writer.drain()
            return
        chat = path.endswith("/chat/completions")
        n = int(body.get("max_tokens") or 16)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")

        def send(obj) -> None:
            ev = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))

        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            fin = "length" if i == n - 1 else None
            choice = ({"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": fin} if chat
                      else {"index": 0, "text": f" w{i}", "finish_reason": fin})
            send({"id": "fake-1", "object": kind, "created": created, "model": "fake", "choices": [choice]})
            await writer.drain()
            if itl:
                await asyncio.sleep(itl)
        if (body.get("stream_options") or {}).get("include_usage"):
            send({"id": "fake-1", "object": kind, "created": created, "model": "fake", "choices": [],
                  "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}})
        send(b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(port: int, itl: float) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, itl), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8999)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.port, a.itl_ms / 1000))
    except ImportError:
        asyncio.run(serve(a.port, a.itl_ms / 1000))


if __name__ == "__main__":
    main()
