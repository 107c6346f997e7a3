#!/bin/sh
# Run the QEMU guest agent on its virtio-serial port; restart it if it exits.
name=@AGENT_PORT@
port=/dev/virtio-ports/$name

# No virtio-serial device at all: nothing to serve.
for d in /sys/bus/virtio/drivers/virtio_console/virtio* ''; do [ -e "$d" ] && break; done
[ -n "$d" ] || exit 0

# The port's name may reach the guest after sysinit linked the others: look every 20 ms,
# for at most 20 s.
i=0
until [ -e "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        n=
        read -r n <"$p/name" 2>/dev/null
        [ "$n" = "$name" ] && ln -s "../${p##*/}" "$port" 2>/dev/null
    done
    [ -e "$port" ] && break
    i=$((i + 1))
    [ "$i" -le 1000 ] || exit 0
    usleep 20000
done

while :; do
    /@QGA_PATH@ -m virtio-serial -p "$port"
    echo "trio-qemu: qemu-ga exited with status $?; restarting it" >&2
    sleep 1
done
