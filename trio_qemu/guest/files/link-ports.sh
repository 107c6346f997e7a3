#!/bin/sh
# Link /dev/virtio-ports/<name> to every virtio-serial port whose name is known (what udev
# does elsewhere). Run by busybox init at sysinit, before the agents start.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    n=
    read -r n <"$p/name" 2>/dev/null
    [ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
done
exit 0
