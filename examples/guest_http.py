"""Serve HTTP from busybox httpd inside the tiny guest and fetch it from the host, with no
network device in the guest and no port of QEMU's on the host: once over a relay stream
(raw HTTP on a Trio stream), once through a forwarded host port with an ordinary HTTP client
(urllib, in a worker thread as it blocks).

The first run builds the guest (about 77 MB of Debian packages; the relay is compiled with
the host's C compiler); later runs reuse it.
Run: .venv/bin/python examples/guest_http.py
"""

from __future__ import annotations

import urllib.request

import trio

import trio_qemu
from trio_qemu.guest import ensure_guest

PAGE = b"<h1>Hello from the guest</h1>\n"


async def main() -> None:
    image = await ensure_guest(progress=print)
    async with trio_qemu.open_machine(image.config(name="http-demo")) as vm:
        await vm.shell.wait_ready(timeout=60)
        await vm.shell.run("mkdir -p /www", check=True)
        await vm.shell.copy_to(PAGE, "/www/index.html")
        await vm.shell.run("httpd -p 127.0.0.1:8080 -h /www", check=True)  # it daemonizes
        await vm.wait_for_open_port(8080, timeout=30)

        # 1. A stream into the guest: HTTP/1.0 by hand, the server closes when done.
        async with await vm.open_tcp_stream(8080) as stream:
            await stream.send_all(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
            response = bytearray()
            while chunk := await stream.receive_some():
                response += chunk
        head, _, body = bytes(response).partition(b"\r\n\r\n")
        print(f"over open_tcp_stream: {head.splitlines()[0].decode()} -> {body!r}")

        # 2. A real host socket for tools that need one (an HTTP client, ssh...).
        async with vm.forward_port(8080) as (host, port):
            url = f"http://{host}:{port}/index.html"
            with await trio.to_thread.run_sync(urllib.request.urlopen, url) as reply:
                body = await trio.to_thread.run_sync(reply.read)
                print(f"urllib through forward_port {host}:{port}: {reply.status} -> {body!r}")
        assert body == PAGE


if __name__ == "__main__":
    trio.run(main)
