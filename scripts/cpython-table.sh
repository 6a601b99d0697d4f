#!/usr/bin/env bash
# CPython's regression tests inside forkvm sandboxes beside the same tests on this host,
# as a markdown table (passed / failed+errors / skipped per module, then the totals).
#
#   scripts/cpython-table.sh [MODULE…]      (default: the threads/event-loop/sockets set)
#
# Needs a built forkvm (target/release/forkvm) and, for the host column, Debian's
# python3 with libpython3.11-testsuite (apt-get install libpython3.11-testsuite).
set -euo pipefail

cd "$(dirname "$0")/.."
FORKVM=${FORKVM:-target/release/forkvm}
HOST_PYTHON=${HOST_PYTHON:-/usr/bin/python3}
LOGS=${LOGS:-$(mktemp -d /tmp/cpython-table.XXXXXX)}
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
  MODULES=(test_threading test_thread test_threading_local test_queue test_concurrent_futures
           test_signal test_asyncio test_socket test_selectors test_epoll test_poll
           test_select test_socketserver test_sched test_context test_faulthandler)
fi

# Options per module: resources it needs, and tests no sandbox or host can run here.
options() {
  case $1 in
    test_socketserver) echo "-u network" ;;
    test_socket) echo "-i *VSOCK*" ;;           # the host may have a vsock device that hangs
    *) echo "" ;;
  esac
}

# "passed failed+errors skipped" from a unittest summary ("- - -" when there is none).
counts() {
  local log=$1 ran verdict field
  ran=$(grep -E '^Ran [0-9]+ tests?' "$log" | tail -1 | awk '{print $2}')
  verdict=$(grep -E '^(OK|FAILED \()' "$log" | tail -1)
  if [ -z "$ran" ] || [ -z "$verdict" ]; then echo "- - -"; return; fi
  field() { echo "$verdict" | grep -oE "$1=[0-9]+" | cut -d= -f2 | head -1; }
  local f e s
  f=$(field failures); e=$(field errors); s=$(field skipped)
  f=${f:-0}; e=${e:-0}; s=${s:-0}
  echo "$((ran - f - e - s)) $((f + e)) $s"
}

echo "| module | sandbox passed | sandbox failed | sandbox skipped | host passed | host failed | host skipped |"
echo "|---|---|---|---|---|---|---|"
totals=(0 0 0 0 0 0)
for module in "${MODULES[@]}"; do
  # shellcheck disable=SC2046
  timeout 1000 "$FORKVM" run --timeout 900 -- /usr/bin/python3 -m test -v "$module" \
    $(options "$module") > "$LOGS/$module.sandbox.log" 2>&1 || true
  # shellcheck disable=SC2046
  (cd /tmp && timeout 1000 "$HOST_PYTHON" -m test -v "$module" $(options "$module")) \
    > "$LOGS/$module.host.log" 2>&1 || true
  read -r sp sf ss <<< "$(counts "$LOGS/$module.sandbox.log")"
  read -r hp hf hs <<< "$(counts "$LOGS/$module.host.log")"
  echo "| $module | $sp | $sf | $ss | $hp | $hf | $hs |"
  i=0
  for n in $sp $sf $ss $hp $hf $hs; do
    [ "$n" != "-" ] && totals[i]=$((totals[i] + n))
    i=$((i + 1))
  done
done
echo "| **total** | **${totals[0]}** | ${totals[1]} | ${totals[2]} | **${totals[3]}** | ${totals[4]} | ${totals[5]} |"
echo "logs: $LOGS" >&2
