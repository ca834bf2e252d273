#!/usr/bin/env bash
# Adapter for the shared webhook-gateway benchmark's candidate contract: turns its BENCH_*
# variables into a waba-gateway config in $BENCH_WORKDIR and execs the gateway, so the harness's
# SIGTERM reaches the gateway itself.
#
#   ./run.sh --candidate 'bash /path/to/bench/candidate.sh'   (from the shared bench folder)
#
# Optional knobs (environment):
#   WABA_BENCH_WORKERS          [listen] workers (default 1)
#   WABA_BENCH_DEDUP_WINDOW_S   [outbox] dedup_window_s (default 0.000001, see below)
#   WABA_BENCH_LOG_LEVEL        [log] level (default warning: no access log line per request)
#   WABA_BENCH_TARGET_TOML      extra TOML lines for the [[targets]] table, e.g. retry waits
#   WABA_BENCH_POLL_INTERVAL_S  [dispatcher] poll_interval_s (default: the gateway's, 0.5). With
#                               workers > 1 only worker 0 dispatches, and it learns of a notification
#                               another worker stored only when it next polls
#   WABA_BENCH_PYTHON           interpreter (default python3)
#   WABA_BENCH_LOOP             [listen] loop: "asyncio" (default) or "uvloop"
#   WABA_BENCH_INSTALLED        "1": run the gateway installed in that interpreter's environment,
#                               not this checkout (bench/stages.py --python sets it)
#   WABA_BENCH_OUTBOX_URL       [outbox] url: the PostgreSQL outbox instead of the SQLite file
#                               (bench.py --outbox postgres sets it)
#   WABA_BENCH_FRONT_DOOR       "embedded": serve through create_app in aiohttp (embedded_app.py)
#                               instead of the gateway's own listener (workers must be 1)
#   WABA_BENCH_TRACING_ENDPOINT [tracing] enabled = true, exporting to this OTLP/HTTP base URL
#                               (bench/otlp_sink.py is a loopback collector); needs the otel extra
#   WABA_BENCH_ADMIN_PORT       [admin] enabled on 127.0.0.1 at this port (default: no admin API):
#                               harness.py reads the outbox writer's commits from its /metrics
#                               around each measured run. Idle otherwise; the counters it reads are
#                               kept whether it listens or not
#
# The harness posts one and the same body every time. With the production dedup window (7 days)
# every request after the first would be acknowledged as a duplicate and never stored again nor
# forwarded, which is not the path Meta's unique notifications take. A one-microsecond window keeps
# the dedup lookup on the ack path but lets every request be stored and forwarded; set
# WABA_BENCH_DEDUP_WINDOW_S=604800 to measure the duplicate path instead.
set -euo pipefail

for name in BENCH_LISTEN_HOST BENCH_LISTEN_PORT BENCH_TLS_CERT BENCH_TLS_KEY BENCH_CLIENT_CA \
    BENCH_CLIENT_CN BENCH_APP_SECRET BENCH_TARGET_URL BENCH_WEBHOOK_PATH BENCH_WORKDIR; do
  if [[ -z "${!name:-}" ]]; then
    echo "candidate.sh: $name is not set (see the shared bench README, 'Candidate contract')" >&2
    exit 2
  fi
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$BENCH_WORKDIR/waba-gateway.toml"
export WABA_BENCH_VERIFY_TOKEN="${WABA_BENCH_VERIFY_TOKEN:-bench-verify-token}"

# Strings are ${NAME} references that the gateway expands from the environment itself: no TOML
# quoting of paths, and the app secret never lands in the file.
cat >"$config" <<TOML
# Written by bench/candidate.sh for one benchmark run.

[listen]
host = "\${BENCH_LISTEN_HOST}"
port = ${BENCH_LISTEN_PORT}
path = "\${BENCH_WEBHOOK_PATH}"
workers = ${WABA_BENCH_WORKERS:-1}
loop = "${WABA_BENCH_LOOP:-asyncio}"

[tls]
cert_file = "\${BENCH_TLS_CERT}"
key_file = "\${BENCH_TLS_KEY}"
client_ca_file = "\${BENCH_CLIENT_CA}"
client_auth = "required"
client_cn = ["\${BENCH_CLIENT_CN}"]

[meta]
verify_tokens = ["\${WABA_BENCH_VERIFY_TOKEN}"]
app_secrets = ["\${BENCH_APP_SECRET}"]

[outbox]
$(if [[ -n "${WABA_BENCH_OUTBOX_URL:-}" ]]; then
    echo 'url = "${WABA_BENCH_OUTBOX_URL}"'
  else
    echo 'path = "${BENCH_WORKDIR}/outbox.sqlite3"'
  fi)
dedup_window_s = ${WABA_BENCH_DEDUP_WINDOW_S:-0.000001}

[[targets]]
name = "sink"
url = "\${BENCH_TARGET_URL}"
split = "none"
${WABA_BENCH_TARGET_TOML:-}

[admin]
$(if [[ -n "${WABA_BENCH_ADMIN_PORT:-}" ]]; then
    printf 'enabled = true\nhost = "127.0.0.1"\nport = %s\n' "$WABA_BENCH_ADMIN_PORT"
  else
    echo 'enabled = false'
  fi)

[dispatcher]
${WABA_BENCH_POLL_INTERVAL_S:+poll_interval_s = $WABA_BENCH_POLL_INTERVAL_S}

[log]
level = "${WABA_BENCH_LOG_LEVEL:-warning}"
$(if [[ -n "${WABA_BENCH_TRACING_ENDPOINT:-}" ]]; then
    printf '\n[tracing]\nenabled = true\nendpoint = "${WABA_BENCH_TRACING_ENDPOINT}"\n'
  fi)
TOML

# The repository root on the import path, so the gateway runs from a checkout without installing.
if [[ "${WABA_BENCH_INSTALLED:-}" != "1" ]]; then
  export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
else
  cd "$BENCH_WORKDIR"  # python -m puts the working directory first on the import path
fi
if [[ "${WABA_BENCH_FRONT_DOOR:-}" == "embedded" ]]; then
  exec "${WABA_BENCH_PYTHON:-python3}" "$HERE/embedded_app.py" --config "$config"
fi
exec "${WABA_BENCH_PYTHON:-python3}" -m gateway serve --config "$config"
