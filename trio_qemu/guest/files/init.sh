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

name=trio-guest ip_addr= gw= iface=eth0 extra= cmdline=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        trio.hostname=*) name=${arg#*=} ;;
        trio.ip=*) ip_addr=${arg#*=} ;;
        trio.gw=*) gw=${arg#*=} ;;
        trio.iface=*) iface=${arg#*=} ;;
        trio.modules=*) extra=$(echo "${arg#*=}" | tr , ' ') ;;
    esac
done
echo "$name" >/proc/sys/kernel/hostname
# Load a driver only for the devices present: each module costs tens of milliseconds under
# TCG, and so does every process, hence built-ins (read, echo) wherever they do. The drivers
# come from @BOOT_MODULES@.
modprobe -q virtio_pci 2>/dev/null
mods=
for d in /sys/bus/virtio/devices/*; do
    id=
    read -r id 2>/dev/null <"$d/device" || continue
    case $id in
        0x0001) mods="$mods virtio_net" ;;
        0x0002) mods="$mods virtio_blk" ;;
        0x0003) mods="$mods virtio_console" ;;
        0x0009) mods="$mods 9pnet_virtio 9p" ;;
        0x0013) mods="$mods vmw_vsock_virtio_transport" ;;
    esac
done
for d in /sys/bus/pci/devices/*; do
    vendor= id=
    read -r vendor 2>/dev/null <"$d/vendor" && read -r id 2>/dev/null <"$d/device" || continue
    case $vendor:$id in
        0x8086:0x100c | 0x8086:0x100e | 0x8086:0x100f) mods="$mods e1000" ;;
        0x8086:0x10d3) mods="$mods e1000e" ;;
    esac
done
[ -z "$mods$extra" ] || modprobe -a -q $mods $extra 2>/dev/null
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
