#!/usr/bin/env bash
# The demo: one node, three pods, the agent, traffic, what the agent sees, a short benchmark.
set -euo pipefail
bin=${1:-target/release}
comb="$bin/comb"
lab=demo
# This lab's agent by its socket: other labs (tests, other users) may have a node1 too.
at=(--socket "/run/comb/lab/$lab/node1.sock")

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { "$comb" lab down --name "$lab" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM

"$comb" lab down --name "$lab" >/dev/null 2>&1 || true
step "1. Bring up node1 with three pods (namespaces, veths, cgroups) and combd"
"$comb" lab up --name "$lab" examples/demo/pods.yaml
sleep 1

step "2. The agent's view: comb status"
"$comb" status "${at[@]}"

step "3. Endpoints: legacy opted out (comb.dev/splice: off)"
"$comb" endpoint list "${at[@]}"

# Only this lab's section: other labs (tests, other users) may run on the machine too.
web=$("$comb" lab list | awk -v lab="$lab:" '$1=="lab"{mine=($2==lab)} mine && $1=="web"{print $4}')
step "4. cart -> web over HTTP (spliced): curl http://$web:8080/"
"$comb" lab exec --name "$lab" shop/cart -- curl -s -o /dev/null -w 'HTTP %{http_code}, %{size_download} bytes in %{time_total}s\n' "http://$web:8080/"
step "   legacy -> web (not spliced: legacy opted out)"
"$comb" lab exec --name "$lab" shop/legacy -- curl -s -o /dev/null -w 'HTTP %{http_code}, %{size_download} bytes in %{time_total}s\n' "http://$web:8080/"

step "5. Splice counters: bytes went socket to socket, not through the veths"
"$comb" splice stats "${at[@]}"

step "6. Identity policy: only cart may reach web (examples/demo/policy.yaml)"
"$comb" apply -f examples/demo/policy.yaml --lab "$lab" "${at[@]}"
# Watch verdicts while two clients try; the monitor streams until stopped.
"$comb" monitor "${at[@]}" --pod shop/web > "/tmp/comb-demo-monitor.$$" 2>&1 &
mon=$!
sleep 0.5
"$comb" lab exec --name "$lab" shop/cart -- curl -s -o /dev/null -w 'cart -> web: HTTP %{http_code}\n' "http://$web:8080/"
"$comb" lab exec --name "$lab" shop/legacy -- curl -s -o /dev/null --max-time 1 -w 'legacy -> web: HTTP %{http_code} (dropped)\n' "http://$web:8080/" || true
sleep 0.5
kill "$mon" 2>/dev/null || true
wait "$mon" 2>/dev/null || true
step "   comb monitor --pod shop/web"
cat "/tmp/comb-demo-monitor.$$"
rm -f "/tmp/comb-demo-monitor.$$"
step "   comb endpoint policy get shop/web (the kernel's table for web)"
"$comb" endpoint policy get shop/web "${at[@]}"

step "7. A short splice benchmark (1 pair, 1 s each; 'comb bench splice' runs 5 pairs x 3 s)"
"$comb" bench splice --pairs 1 --secs 1

step "8. Teardown"
"$comb" lab down --name "$lab"
trap - EXIT INT TERM
echo "done: no namespaces, cgroups, pins or processes left behind"
