"""TCP into the guest with no host port, through a relay on a virtio-serial channel."""
