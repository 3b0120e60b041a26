"""ivshmem-hello: an ivshmem peer plugin in its own package (see hello.py)."""
