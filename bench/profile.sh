#!/usr/bin/env bash
# Profile one Weft sidecar pair under load: the built-in backend, a server
# and a client sidecar (release binaries, 1 worker each), `weft-bench` load
# through them, and `perf record` (cpu-clock sampling, which works in VMs
# without hardware counters) on each sidecar. Writes flat profiles by
# shared object and by symbol into OUTDIR.
#
#   cargo build --release -p weft-proxy -p weft-ca -p weft-bench
#   bench/profile.sh http 10 bench-results/profile-http   # closed loop, 32 connections
#   bench/profile.sh tcp  10 bench-results/profile-tcp    # bulk, 4 streams
#   RATE=1000 bench/profile.sh http 10 ...                # open loop at 1,000 req/s
#   SYSCALLS=1 RATE=1000 bench/profile.sh http 10 ...     # count system calls (strace -c) instead
set -euo pipefail

mode=${1:-http}
secs=${2:-10}
out=${3:-bench-results/profile-$mode}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
ca=$bin/weft-ca
[ -x "$ca" ] || ca=$root/target/debug/weft-ca
for b in "$bin/weft" "$bin/weft-bench" "$ca"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p weft-proxy -p weft-ca -p weft-bench" >&2; exit 2; }
done
command -v perf >/dev/null || { echo "perf not found (Debian: linux-perf)" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { # $1: tcp or udp
  python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
wait_for() { # $1: file, $2: text
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

"$ca" init --dir "$work/ca" --trust-domain bench.weft.local >/dev/null
for side in client server; do
  "$ca" issue --dir "$work/ca" --spiffe-id "spiffe://bench.weft.local/ns/bench/sa/$side" --out "$work/$side" >/dev/null
done

"$bin/weft-bench" backend --listen 127.0.0.1:0 --body-size 1024 >"$work/backend.out" &
pids+=($!)
wait_for "$work/backend.out" "ready"
backend=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$work/backend.out")

inbound=$(free_port udp)
upstream=$(free_port tcp)
protocol=http
[ "$mode" = tcp ] && protocol=tcp
cat >"$work/mesh.toml" <<EOF
trust_domain = "bench.weft.local"
[services.bench]
protocol = "$protocol"
endpoints = ["127.0.0.1:$inbound"]
EOF

RUST_LOG=warn "$bin/weft" sidecar --mesh "$work/mesh.toml" --cert-dir "$work/server" --workers 1 \
  --inbound "127.0.0.1:$inbound" --admin 127.0.0.1:0 --app "$backend" >"$work/server.out" 2>"$work/server.err" &
server=$!
pids+=($server)
RUST_LOG=warn "$bin/weft" sidecar --mesh "$work/mesh.toml" --cert-dir "$work/client" --workers 1 \
  --inbound 127.0.0.1:0 --admin 127.0.0.1:0 --upstream "bench=127.0.0.1:$upstream" >"$work/client.out" 2>"$work/client.err" &
client=$!
pids+=($client)
wait_for "$work/server.out" "ready"
wait_for "$work/client.out" "ready"

# Warm up (QUIC handshake, pools), then record both sidecars while the load runs.
if [ "$mode" = tcp ]; then
  "$bin/weft-bench" tcp "127.0.0.1:$upstream" -s 1 -d 300ms -q >/dev/null
else
  "$bin/weft-bench" http "http://127.0.0.1:$upstream/" -c 2 -d 300ms -q >/dev/null
fi
if [ -n "${SYSCALLS:-}" ]; then
  # Count system calls instead of sampling (strace slows the sidecars: use with RATE=).
  command -v strace >/dev/null || { echo "strace not found" >&2; exit 2; }
  timeout -s INT "$secs" strace -c -f -p "$server" -o "$out/server.syscalls.txt" &
  perf_server=$!
  timeout -s INT "$secs" strace -c -f -p "$client" -o "$out/client.syscalls.txt" &
  perf_client=$!
else
  perf record -e cpu-clock -F 1999 -p "$server" -o "$out/server.perf.data" -- sleep "$secs" 2>/dev/null &
  perf_server=$!
  perf record -e cpu-clock -F 1999 -p "$client" -o "$out/client.perf.data" -- sleep "$secs" 2>/dev/null &
  perf_client=$!
fi
if [ "$mode" = tcp ]; then
  "$bin/weft-bench" tcp "127.0.0.1:$upstream" -s 4 -d "${secs}s" -q | tee "$out/load.txt"
else
  "$bin/weft-bench" http "http://127.0.0.1:$upstream/" -c 32 ${RATE:+--rate $RATE} -d "${secs}s" -q | tee "$out/load.txt"
fi
wait "$perf_server" "$perf_client" || true
if [ -n "${SYSCALLS:-}" ]; then
  for side in client server; do echo "== $side sidecar: system calls"; head -14 "$out/$side.syscalls.txt"; done
  exit 0
fi
for side in client server; do
  perf report -i "$out/$side.perf.data" --no-children --sort dso --stdio 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -15 >"$out/$side.by-dso.txt" || true
  perf report -i "$out/$side.perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+$//' >"$out/$side.by-symbol.txt" || true
  # The same samples summed by component: Rust crate, libc allocator or
  # copies, crypto, and the kernel by subsystem.
  python3 - "$out/$side.by-symbol.txt" >"$out/$side.by-component.txt" <<'PY'
import re, sys, collections
totals = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, kind, sym = float(m.group(1)), m.group(2), m.group(3).strip()
    if kind == "k":
        if re.search(r"udp|ip_|inet|skb|dev_|net_|sock|gso|gro", sym): c = "kernel: UDP/IP, sockets"
        elif re.search(r"tcp", sym): c = "kernel: TCP"
        elif re.search(r"sched|switch|futex|epoll|wake|idle|poll|irq|spin", sym): c = "kernel: scheduling, epoll, futex, locks"
        elif re.search(r"copy|memcpy|memmove|iter", sym): c = "kernel: copies"
        else: c = "kernel: other (syscall entry, memory, timers)"
    elif sym.startswith("aws_lc") or "ring" in sym[:8]:
        c = "crypto (aws-lc)"
    elif re.match(r"(__)?mem(move|cpy|set|cmp)", sym):
        c = "libc: memcpy/memmove"
    elif re.search(r"malloc|free|_int_|unlink_chunk|realloc|tcache|consolidate", sym):
        c = "libc: malloc/free"
    else:
        # The implementing type's crate; for impls on primitives, the trait's.
        m2 = (re.match(r"^<?&?(?:mut )?(?:dyn )?([A-Za-z_][A-Za-z0-9_]*)::", sym)
              or re.match(r"^<[^<>]*? as ([A-Za-z_][A-Za-z0-9_]*)::", sym))
        c = ("rust: " + m2.group(1)) if m2 else ("other: " + sym[:40])
    totals[c] += pct
for c, pct in totals.most_common(25):
    print(f"{pct:6.2f}%  {c}")
PY
  echo "== $side sidecar: where the samples fall"
  head -14 "$out/$side.by-component.txt"
done
echo "profiles in $out"
