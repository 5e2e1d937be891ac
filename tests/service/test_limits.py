"""Request bodies within bounds: 413 before parsing (declared or streamed), and a client that
never finishes its body is answered 408 and cut off (a real uvicorn over a real socket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from tests.service.helpers import running_app, serving, settings_for


async def test_a_body_over_the_limit_gets_413_before_parsing(tiny_model_dir: Path) -> None:
    settings = settings_for("memory", tiny_model_dir, None, max_body_bytes=2048)
    async with running_app(settings) as client:
        big = json.dumps({"class_label": 1, "pad": "x" * 4000})
        declared = await client.post("/generate", content=big,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        assert declared.status_code == 413
        assert declared.json()["error"] == {
            "code": "payload_too_large", "field": "body",
            "message": f"request body too large: at most 2048 bytes, got {len(big)} bytes",
        }  # fmt: skip

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(10):
                yield b" " * 512

        streamed = await client.post("/generate", content=chunks())
        assert streamed.status_code == 413 and "got more" in streamed.text
        small = await client.post("/generate", json={"class_label": 1, "steps": 2})
        assert small.status_code == 200  # under the limit: replayed to the app intact


async def test_a_body_that_never_finishes_is_cut_off_with_408(tiny_model_dir: Path) -> None:
    settings = settings_for("memory", tiny_model_dir, None, body_timeout_s=0.5)
    async with serving(settings) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"class_label\": ")  # fmt: skip
        await writer.drain()
        began = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), timeout=10)  # read() returns at EOF
        waited = asyncio.get_running_loop().time() - began
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert waited >= 0.4  # it waited for the body before giving up (and then closed)
        # The server still answers others.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), timeout=10)).startswith(b"HTTP/1.1 200")
        writer.close()
