"""pytest fixtures for trio_qemu (registered through the ``pytest11`` entry point)."""
