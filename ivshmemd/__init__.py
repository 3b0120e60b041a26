"""ivshmemd: a drop-in, QEMU-compatible ivshmem server daemon."""

__version__ = "0.1.0"
