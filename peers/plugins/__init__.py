"""The built-in plugins (registered through the ``ivshmem.peers`` entry points)."""
