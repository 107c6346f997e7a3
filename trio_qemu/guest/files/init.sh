#!/bin/busybox sh
# /init of the trio-qemu tiny guest (written by trio_qemu.guest).
# Kernel command-line hooks: trio.hostname=NAME  trio.ip=ADDR/PREFIX|dhcp  trio.gw=ADDR
#                            trio.iface=eth0  trio.modules=mod1,mod2
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

name=trio-guest ip_addr= gw= iface=eth0 extra=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        trio.hostname=*) name=${arg#*=} ;;
        trio.ip=*) ip_addr=${arg#*=} ;;
        trio.gw=*) gw=${arg#*=} ;;
        trio.iface=*) iface=${arg#*=} ;;
        trio.modules=*) extra=$(echo "${arg#*=}" | tr , ' ') ;;
    esac
done
hostname "$name"
modprobe -a -q @BOOT_MODULES@ $extra 2>/dev/null
ip link set lo up

if [ -n "$ip_addr" ]; then
    ip link set "$iface" up
    if [ "$ip_addr" = dhcp ]; then
        udhcpc -i "$iface" -n -q -t 10 -T 1 -s /etc/udhcpc/default.script >/dev/null 2>&1 ||
            echo "trio-qemu: DHCP on $iface failed"
    else
        ip addr add "$ip_addr" dev "$iface"
        [ -z "$gw" ] || ip route add default via "$gw" dev "$iface"
    fi
fi

# busybox init takes over as PID 1 (see /etc/inittab): it starts the shell agent and the
# console shell with default signal handling (so Ctrl-C works), respawns the console shell,
# reaps orphans, and handles poweroff/reboot.
echo @READY@
exec /bin/busybox init
