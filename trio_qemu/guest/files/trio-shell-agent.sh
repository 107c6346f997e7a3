#!/bin/sh
# trio-qemu guest shell agent (see trio_qemu/_shell.py for the protocol).
# Usage: trio-shell-agent /dev/virtio-ports/org.trio-qemu.shell
port=${1:?usage: trio-shell-agent PORT}
work=/run/trio-shell
mkdir -p "$work" /dev/virtio-ports

link_ports() {
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        n=
        read -r n <"$p/name" 2>/dev/null
        [ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
    done
}

# No virtio-serial device at all: nothing to serve.
for d in /sys/bus/virtio/drivers/virtio_console/virtio* ''; do [ -e "$d" ] && break; done
[ -n "$d" ] || exit 0

# virtio_console learns port names from QEMU asynchronously, and the kernel offers nothing a
# shell can block on for it: look again every 20 ms, for at most 20 s.
i=0
until [ -e "$port" ]; do
    link_ports
    [ -e "$port" ] && break
    i=$((i + 1))
    [ "$i" -le 1000 ] || exit 1
    usleep 20000
done

# worker ID MAX DIR: run DIR/cmd, then queue its result for the writer.
# The command leads a session (and process group) of its own, and looks at the kill flag only
# once it does: a kill request that came before that is seen there, and one that comes after
# finds the process group (from the K handler, or from here once the pid is recorded).
worker() {
    id=$1 max=$2 d=$3
    in=/dev/null
    [ -e "$d/in" ] && in=$d/in
    # The session's shell sources the command's file ($0), with no arguments left.
    setsid sh -c '[ -e "$1" ] && exit 137; set --; . "$0"' "$d/cmd" "$d/kill" \
        <"$in" >"$d/out" 2>"$d/err" 3>&- 4>&- &
    pid=$!
    echo "$pid" >"$d/pid"
    [ -e "$d/kill" ] && kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid"
    printf 'R %s %s %s\n' "$id" "$?" "$max" >&4
}

# writer: the only one who writes to the host once started, one reply at a time, so the
# results of commands that end close together never interleave on the channel. It takes
# "R ID RC MAX" (a worker's command ended) and "P ID" (a ping) lines from the queue.
# A run's directory is marked sent and its files emptied (finish) as its result goes out,
# and removed with others every REMOVE_EVERY results: one rm for many runs instead of an mv
# and an rm for each (each process costs milliseconds under TCG).
REMOVE_EVERY=32

# finish DIR: a run's result is read; before its last line goes to the host, mark the run
# sent (a kill request that comes after this is ignored, see K) and empty its files (their
# data goes now, not with the directory), all with built-in redirections: no process.
# "true", not ":", as in K: this shell must outlive a failed redirection.
finish() {
    true 2>/dev/null >"$1/sent"
    true 2>/dev/null >"$1/out"
    true 2>/dev/null >"$1/err"
    [ ! -e "$1/in" ] || true 2>/dev/null >"$1/in"
}

writer() {
    sent= nsent=0
    while read -r what id rc max; do
        case "$what" in
        P)
            printf '#P %s\n' "$id"
            ;;
        R)
            d=$work/$id
            # stat is a process of its own: only when there is output to measure.
            if [ -s "$d/out" ] || [ -s "$d/err" ]; then
                set -- $(stat -c %s "$d/out" "$d/err" 2>/dev/null) 0 0
            else
                set -- 0 0
            fi
            if [ $(($1 + $2)) -gt "$max" ]; then
                finish "$d"
                printf '#X %s %s %s %s\n' "$id" "$rc" "$1" "$2"
            else
                printf '#B %s %s %s %s\n' "$id" "$rc" "$1" "$2"
                [ "$1" = 0 ] || base64 "$d/out"
                printf '#M %s\n' "$id"
                [ "$2" = 0 ] || base64 "$d/err"
                finish "$d"
                printf '#E %s %s\n' "$id" "$rc"
            fi
            sent="$sent $d" nsent=$((nsent + 1))
            if [ "$nsent" -ge "$REMOVE_EVERY" ]; then
                rm -rf -- $sent 2>/dev/null
                sent= nsent=0
            fi
            ;;
        esac
    done
}

exec 3<>"$port" || exit 1
cd /
# The queue: a FIFO held open for reading and writing (so it never ends), then unlinked.
queue=$work/queue.$$
rm -f "$queue"
mkfifo "$queue" && exec 4<>"$queue" || exit 1
rm -f "$queue"
printf '#R %s\n' "$$" >&3
set -f
writer <&4 >&3 &
while :; do
    line=
    if ! IFS= read -r line <&3 && [ -z "$line" ]; then
        sleep 1  # end of file: nobody on the host side; look again later
        continue
    fi
    set -- $line
    case "$1" in
    P)
        [ "$#" = 3 ] && [ "$2" = "$3" ] && printf 'P %s\n' "$2" >&4
        ;;
    R)
        [ "$#" = 6 ] && [ "$2" = "$6" ] || continue
        case "$2" in *[!0-9a-z-]*) continue ;; esac
        case "$3$4" in *[!0-9]*) continue ;; esac
        d=$work/$2
        mkdir "$d" 2>/dev/null || continue
        if [ "$4" != 0 ]; then
            dd bs=65536 count=$(($4 + 1)) iflag=count_bytes,fullblock <&3 2>/dev/null |
                base64 -d >"$d/in" 2>/dev/null
        fi
        # printf is a built-in: the command's file is written without a new process.
        if [ "$5" = - ]; then true >"$d/cmd"; else printf '%b' "$5" >"$d/cmd"; fi
        worker "$2" "$3" "$d" &
        ;;
    K)
        [ "$#" = 3 ] && [ "$2" = "$3" ] || continue
        case "$2" in *[!0-9a-z-]*) continue ;; esac
        # Only while the run's directory exists and its result is not sent. "true", not
        # ":": a failed redirection of a special built-in would end this shell.
        [ -e "$work/$2/sent" ] && continue
        if true 2>/dev/null >"$work/$2/kill"; then
            pid=
            read -r pid 2>/dev/null <"$work/$2/pid"
            [ -z "$pid" ] || [ -e "$work/$2/sent" ] || kill -KILL -- "-$pid" 2>/dev/null
        fi
        ;;
    esac
done
