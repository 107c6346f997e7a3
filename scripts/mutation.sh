#!/usr/bin/env bash
# Mutation testing of one library module with mutmut 3, on demand (never in CI: too slow).
#
#   scripts/mutation.sh MODULE [PYTEST_ARGS...]
#
# MODULE is a short name (util, events, console, qmp, machine, shell, ...) or a path such as
# trio_qemu/_util.py. PYTEST_ARGS choose the tests; without them, the tests listed below for
# MODULE. mutmut changes one thing at a time in MODULE (a `<` into `<=`, a constant, a dropped
# argument...) and runs the tests that reach the changed function: a mutant the tests let
# through ("survived") is a change of behaviour nothing checks. Triage: docs/mutation.md.
#
# It works in a scratch copy of the working tree (uncommitted edits included), never in the
# tree itself: $MUTATION_DIR, by default ${TMPDIR:-/tmp}/trio_qemu-mutation/MODULE, emptied at
# the start and kept at the end, so that `mutmut show NAME` / `mutmut browse` run there.
# MUTATION_JOBS sets the number of parallel mutants (default: the number of CPUs).
# Needs `pip install -e '.[qa]'`. Exits non-zero if mutmut fails or a mutant survives
# (or has no test that reaches it).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
if [ ! -x "$venv/bin/mutmut" ]; then
    echo "mutmut is not installed: $venv/bin/pip install -e '.[qa]'" >&2
    exit 2
fi
if [ $# -lt 1 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

module=$1
shift
case $module in
    */*) path=$module; name=$(basename "$module" .py); name=${name#_} ;;
    *) name=${module#_}; path=trio_qemu/_$name.py ;;
esac
if [ ! -f "$root/$path" ]; then
    echo "no such module: $path" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    selection=("$@")
else
    case $name in
        # Pure, fast tests: no QEMU.
        util) selection=(tests/test_util.py) ;;
        events) selection=(tests/test_events.py) ;;
        # The socketpair tests only: the two real-QEMU (SeaBIOS) tests take seconds each.
        console) selection=(tests/test_console.py -k "not test_qemu_") ;;
        # Real QEMU: minutes per mutant on a loaded machine (docs/mutation.md, "Next").
        qmp) selection=(tests/test_qmp_faults.py tests/test_qmp_qemu.py tests/test_interrupts.py) ;;
        machine) selection=(tests/test_machine.py tests/test_machine_faults.py tests/test_launch_errors.py) ;;
        shell) selection=(tests/test_shell.py) ;;
        *)
            echo "no default tests for $name: pass the pytest arguments that select them" >&2
            exit 2
            ;;
    esac
fi

work=${MUTATION_DIR:-${TMPDIR:-/tmp}/trio_qemu-mutation/$name}
case $work in
    "$root" | "$root"/*) echo "MUTATION_DIR must be outside the tree: $work" >&2; exit 2 ;;
esac
# Only ever empty a directory this script made (it leaves a marker file in it).
if [ -d "$work" ] && [ -n "$(ls -A "$work")" ] && [ ! -e "$work/.trio_qemu-mutation" ]; then
    echo "$work is not empty and was not made by this script: choose another MUTATION_DIR" >&2
    exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.trio_qemu-mutation"
cp -a "$root/trio_qemu" "$root/tests" "$root/pyproject.toml" "$work/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +

# The copy's [tool.mutmut] gets what to mutate and which tests to run.
"$venv/bin/python" - "$work/pyproject.toml" "$path" "${selection[@]}" <<'EOF'
import json
import sys
import tomllib
from pathlib import Path

pyproject, path, selection = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
text = pyproject.read_text()
header = "[tool.mutmut]\n"
if text.count(header) != 1:
    sys.exit("pyproject.toml needs exactly one [tool.mutmut] table")
added = f"only_mutate = {json.dumps([path])}\n"
added += f"pytest_add_cli_args_test_selection = {json.dumps(selection)}\n"
text = text.replace(header, header + added)
tomllib.loads(text)
pyproject.write_text(text)
EOF

echo "== mutmut: $path, tests: ${selection[*]}, in $work"
cd "$work"
start=$(date +%s)
status=0
"$venv/bin/mutmut" run --max-children "${MUTATION_JOBS:-$(nproc)}" || status=$?
echo
echo "== $path: $(($(date +%s) - start)) s"
"$venv/bin/mutmut" export-cicd-stats >/dev/null
"$venv/bin/python" - <<'EOF'
import json

stats = json.load(open("mutants/mutmut-cicd-stats.json"))
print(", ".join(f"{key} {value}" for key, value in stats.items()))
EOF
echo "== not killed (mutmut show NAME, in $work):"
"$venv/bin/mutmut" results
if [ "$status" -ne 0 ]; then
    echo "mutmut failed (exit $status)" >&2
    exit "$status"
fi
# Timeouts were caught (the tests hung or looped); anything else listed (survived, no tests,
# suspicious...) is for triage.
survivors=$("$venv/bin/mutmut" results | grep -v ': timeout$' | grep -c ': ' || true)
[ "$survivors" -eq 0 ]
