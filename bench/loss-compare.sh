#!/usr/bin/env bash
# Latency under random packet loss: a Weft pair (HTTP/3 over one QUIC
# connection) against a HAProxy pair (HTTP/2 multiplexed over TLS over TCP),
# both in front of weft-bench's backend, with the same loss on the link
# between the two proxies and none elsewhere:
#   - Weft: the weft-impair relay between the sidecars (--drop LOSS each way);
#   - HAProxy: iptables -m statistic dropping LOSS % of the link's TCP
#     segments each way (tc netem is not available on the build machine).
# One lost QUIC packet delays the streams whose bytes it carried; one lost
# TCP segment delays every HTTP/2 stream behind it on the connection.
#
# Everything runs in a network namespace this script creates and removes
# (needs root: ip netns, iptables). Usage, from the repository root after
#   cargo build --release -p weft-proxy -p weft-bench   (weft-ca: debug is enough)
#   cargo build --release -p weft-tests --bin weft-impair
#
#   bench/loss-compare.sh                      # 2 % loss, 10 s per run
#   LOSS=5 DURATION=20s CONNECTIONS=64 bench/loss-compare.sh
#
# Prints one line per (pair, loss) with requests, errors, p50, p99, p99.9, max.
set -euo pipefail

LOSS=${LOSS:-2}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
BIN=${BIN:-$PWD/target/release}

if [ -z "${WEFT_LOSS_NS:-}" ]; then
    ns="weft-loss-$$"
    ip netns add "$ns"
    trap 'ip netns del "$ns"' EXIT
    ip netns exec "$ns" ip link set lo up
    WEFT_LOSS_NS=$ns LOSS=$LOSS DURATION=$DURATION CONNECTIONS=$CONNECTIONS BIN=$BIN \
        ip netns exec "$ns" "$0" "$@"
    exit
fi

for b in weft weft-bench weft-impair; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (see the build commands at the top)" >&2; exit 2; }
done
# Only makes certificates: a debug build does as well.
CA=$BIN/weft-ca
[ -x "$CA" ] || CA=$PWD/target/debug/weft-ca
[ -x "$CA" ] || { echo "missing weft-ca (cargo build -p weft-ca)" >&2; exit 2; }
command -v haproxy >/dev/null || { echo "haproxy not found (apt-get install haproxy)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
spawn() { # name, command...
    local name=$1
    shift
    "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
}
wait_tcp() { # port
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$1; logs:" >&2
    tail -n 5 "$work"/*.log >&2
    exit 1
}
wait_ready() { # admin port
    for _ in $(seq 1 200); do
        curl -fs "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "sidecar with admin port $1 never became ready; logs in $work" >&2
    exit 1
}

td=bench.weft.local
"$CA" init --dir "$work/ca" --trust-domain $td >/dev/null
for side in client server; do
    "$CA" issue --dir "$work/ca" --spiffe-id "spiffe://$td/ns/bench/sa/$side" \
        --out "$work/$side" >/dev/null
    cat "$work/$side/cert.pem" "$work/$side/key.pem" >"$work/$side.pem"
done

spawn backend "$BIN/weft-bench" backend --listen 127.0.0.1:8080 --body-size 1024
wait_tcp 8080

# Weft: client sidecar (9001) → relay (udp 25108) → server sidecar (udp 15108).
cat >"$work/mesh.toml" <<EOF
trust_domain = "$td"
[services.bench]
endpoints = ["127.0.0.1:25108"]
[[services.bench.routes]]
name = "all"
retries = { attempts = 0 }
EOF
spawn weft-server "$BIN/weft" sidecar --mesh "$work/mesh.toml" --cert-dir "$work/server" \
    --inbound 127.0.0.1:15108 --admin 127.0.0.1:15100 --app 127.0.0.1:8080 --workers 1
spawn weft-client "$BIN/weft" sidecar --mesh "$work/mesh.toml" --cert-dir "$work/client" \
    --inbound 127.0.0.1:15208 --admin 127.0.0.1:15200 --upstream bench=127.0.0.1:9001 --workers 1
wait_ready 15100
wait_ready 15200

# HAProxy: client half (9101) → TLS 1.3 mTLS, HTTP/2 (link 9102) → server half → backend.
tls() { echo "ssl crt $work/$1.pem ca-file $work/server/bundle.pem verify required ssl-min-ver TLSv1.3"; }
head_cfg() {
    printf 'global\n    nbthread 1\n    maxconn 4096\ndefaults\n    mode http\n'
    printf '    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n'
}
{
    head_cfg
    printf 'frontend front\n    bind 127.0.0.1:9101\n    default_backend link\n'
    printf 'backend link\n    http-reuse always\n    server link 127.0.0.1:9102 %s alpn h2 proto h2\n' "$(tls client)"
} >"$work/haproxy-client.cfg"
{
    head_cfg
    printf 'frontend link\n    bind 127.0.0.1:9102 %s alpn h2,http/1.1\n    default_backend app\n' "$(tls server)"
    printf 'backend app\n    server app 127.0.0.1:8080\n'
} >"$work/haproxy-server.cfg"
spawn haproxy-server haproxy -db -f "$work/haproxy-server.cfg"
spawn haproxy-client haproxy -db -f "$work/haproxy-client.cfg"
wait_tcp 9102
wait_tcp 9101

impair_pid=
relay() { # loss percent: (re)start the relay in front of the server sidecar
    [ -n "$impair_pid" ] && { kill "$impair_pid"; wait "$impair_pid" 2>/dev/null || true; }
    "$BIN/weft-impair" --listen 127.0.0.1:25108 --target 127.0.0.1:15108 \
        --drop "$1" --seed 7 --report 0s >"$work/impair-$1.log" 2>&1 &
    impair_pid=$!
    pids+=("$impair_pid")
}
tcp_loss() { # loss percent on the HAProxy link, both directions
    iptables -F INPUT
    if [ "$1" != 0 ]; then
        local p
        p=$(awk "BEGIN { print $1 / 100 }")
        for dir in --dport --sport; do
            iptables -A INPUT -i lo -p tcp "$dir" 9102 -m statistic --mode random \
                --probability "$p" -j DROP
        done
    fi
}
run() { # name, url
    "$BIN/weft-bench" http -q --json -c "$CONNECTIONS" -d "$DURATION" "$2" |
        jq -r --arg n "$1" '"\($n)\t\(.requests)\t\(.errors)\t\(.latency.p50_ms)\t\(.latency.p99_ms)\t\(.latency.p999_ms)\t\(.latency.max_ms)"'
}

printf 'pair\trequests\terrors\tp50_ms\tp99_ms\tp99.9_ms\tmax_ms\n'
for loss in 0 "$LOSS"; do
    relay "$loss"
    tcp_loss "$loss"
    # Warm up: the QUIC connection (through the new relay) and the TLS link.
    curl -fs http://127.0.0.1:9001/ >/dev/null || true
    curl -fs http://127.0.0.1:9101/ >/dev/null || true
    run "weft-http loss=$loss%" http://127.0.0.1:9001/
    run "haproxy-h2 loss=$loss%" http://127.0.0.1:9101/
done
