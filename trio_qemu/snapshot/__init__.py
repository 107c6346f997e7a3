"""Boot once, fork many: templates of a booted guest and copy-on-write clones of them.

A *template* is a guest booted once with its RAM in a file (``memory-backend-file``,
``share=on``), prepared, stopped and saved: only the device state goes into a file (a few
hundred KB; QEMU's ``x-ignore-shared`` capability leaves the file-backed RAM out). A *clone*
is a new QEMU with the same command line but a private copy-on-write mapping of that RAM
file (``share=off``) and ``-incoming defer``: it loads the device state and resumes where
the template stopped, in tens of milliseconds instead of a boot. Clones share the
template's pages until they write to them::

    from trio_qemu.snapshot import ensure_template, open_clone, open_clones

    async def prepare(vm):
        await vm.shell.run("echo ready > /root/state", check=True)

    image = await trio_qemu.ensure_guest()
    template = await ensure_template(image.config(), prepare=prepare)   # cached
    async with open_clone(template) as vm:               # an ordinary running Machine
        await vm.shell.run("cat /root/state")
    async with open_clones(template, 4) as vms:          # four at once
        ...

- :func:`ensure_template` finds the template in the cache or makes it (one boot, however
  many processes ask at once); :func:`open_template` makes one for a block only.
- :func:`open_clone` and :func:`open_clones` launch clones and restore them;
  :meth:`Template.config` and :func:`restore` are the two halves, for
  ``open_machines``/``start_machine``.
- A clone's config may change only per-machine fields (:data:`PER_MACHINE_FIELDS`: name,
  logs, timeouts...); anything the guest would see differently raises
  :class:`TemplateError` naming it, before QEMU starts.
- After a restore the guest's clock is set to the host's and its RNG re-seeded
  (``sync_guest``; a guest with a VM generation ID, as the tiny guest has, also reseeds its
  RNG itself as it resumes), then :func:`restore`'s ``setup`` command runs, in the same guest
  command. Otherwise the guest keeps the template's MAC address, IP address and host
  name: clones on a network get their own from :mod:`trio_qemu.network` (make the template
  from ``network.attach_template(config)``, attach each ``template.config(name=...)``
  with its ``ip=``, open them with ``network.open_clones``). A clone does not announce
  itself after the restore (QEMU's ``announce-rounds`` is set to 0): it would announce the
  template's MAC.

Measured here with ``benchmarks/clone.py`` (QEMU 7.2, TCG, 2 cores, the tiny guest with
256 MiB): saving takes ~10 ms and writes ~335 KB; a clone is running 60-80 ms after launch
(QEMU's own start-up of a q35 machine is ~55 ms of it) and answers its first shell command
after ~0.35-0.4 s (TCG translates the guest's code afresh in each process: ~0.35 CPU-s),
about 9x sooner than a boot; 8 clones at once all answer in ~2-2.6 s, 8x sooner than 8
boots; a clone's PSS is ~38 MiB against ~187 MiB for a booted guest.
"""

from .._util import publish as _publish
from ._clone import RESTORE_TIMEOUT, RNG_SEED_BYTES, open_clone, open_clones, restore
from ._make import DEFAULT_TIMEOUT, TEMPLATES_DIR, ensure_template, open_template
from ._template import PER_MACHINE_FIELDS, Template, TemplateError

__all__ = [
    "DEFAULT_TIMEOUT",
    "PER_MACHINE_FIELDS",
    "RESTORE_TIMEOUT",
    "RNG_SEED_BYTES",
    "TEMPLATES_DIR",
    "Template",
    "TemplateError",
    "ensure_template",
    "open_clone",
    "open_clones",
    "open_template",
    "restore",
]

_publish(__name__, globals(), __all__)
