"""A two-node scenario as a pytest test, with trio_qemu's pytest plugin.

Run it explicitly (it lives outside the project's ``testpaths``, so the test suite does not
collect it):

    .venv/bin/pytest examples/test_two_nodes.py
    .venv/bin/pytest -n 2 examples/test_two_nodes.py     # one test per process (pytest-xdist)

The plugin (registered when trio_qemu is installed; pytest-trio runs the async tests that use
``machine``, with or without ``trio_mode``) gives ``tiny_guest``, the cached guest image, and
``machine``, an async factory whose VMs are shut down when the test ends, passed or failed.
A failing test's report shows each VM's command line, console tail and QEMU output.
"""

from __future__ import annotations

import trio

from trio_qemu import Machine
from trio_qemu.guest import GuestImage
from trio_qemu.network import Link, Switch, ping, wait_carrier
from trio_qemu.pytest_plugin import MachineFactory


async def test_two_nodes_talk_over_a_link(machine: MachineFactory, tiny_guest: GuestImage) -> None:
    with Link("wire") as link:  # closes our copies of the link's fds on leaving
        configs = [
            link.attach(tiny_guest.config(name=name, memory=128), ip=f"10.0.0.{i}/24")
            for i, name in enumerate(("server", "client"), start=1)
        ]
        nodes: list[Machine] = []

        async def boot(index: int) -> None:
            nodes.append(await machine(configs[index], guest=True))  # waits for the shell

        async with trio.open_nursery() as nursery:  # both boot at once
            for index in range(2):
                nursery.start_soon(boot, index)
        link.release()  # the QEMUs hold the link now

        server = next(vm for vm in nodes if vm.name == "server")
        client = next(vm for vm in nodes if vm.name == "client")
        await wait_carrier(client, timeout=10)  # instant on virtio-net; e1000 takes 1-3 s

        # a one-shot TCP service on the server, fetched by the client
        await server.shell.run("(echo hello from server | nc -l -p 7000 >/dev/null &)")
        fetched = await client.shell.run("nc 10.0.0.1 7000 </dev/null", timeout=30)
        assert fetched.stdout == b"hello from server\n"

        result = await ping(client, link.address("server"), count=3, interval=0.2)
        assert result.ok, result.output


async def test_pulling_a_cable_at_the_switch(
    machine: MachineFactory, tiny_guest: GuestImage
) -> None:
    async with Switch("lan").running() as switch:  # forwards frames until the block ends
        a = await machine(
            switch.attach(tiny_guest.config(name="a", memory=128), ip="10.0.0.1/24"), guest=True
        )
        await machine(
            switch.attach(tiny_guest.config(name="b", memory=128), ip="10.0.0.2/24"), guest=True
        )
        switch.release()
        assert (await ping(a, "10.0.0.2", count=2, interval=0.2)).ok
        switch.set_link("b", False)  # the cable to b is pulled: nothing gets through
        assert (await ping(a, "10.0.0.2", count=2, interval=0.2, wait=1)).received == 0
        switch.set_link("b", True)
        assert (await ping(a, "10.0.0.2", count=2, interval=0.2)).ok
