#!/bin/sh
# udhcpc event handler of the trio-qemu tiny guest.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route del default 2>/dev/null
            for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        fi
        if [ -n "$dns" ]; then
            : >/etc/resolv.conf
            for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        fi
        ;;
esac
exit 0
