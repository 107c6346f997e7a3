#!/bin/sh
# /sbin/shutdown for qemu-ga's guest-shutdown, which runs
#   shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"
# There are no run levels to go through: power off, halt or reboot at once.
action=poweroff
for arg in "$@"; do
    case "$arg" in
        -r) action=reboot ;;
        -H) action=halt ;;
        -P) action=poweroff ;;
    esac
done
sync
exec "$action" -f
