#!/bin/sh
# Start a Redis Sentinel (compose.yaml's `ha` profile) without a password in any command line.
# On its first start it writes its config, mode 600, into SENTINEL_DIR (a volume: a sentinel
# rewrites its config as it learns the replicas, the other sentinels and each failover, and must
# find that again after a restart); later starts reuse it.
#   REDIS_PASSWORD            the master's and replicas' password (sentinel auth-pass)
#   REDIS_SENTINEL_PASSWORD   the sentinels' own password (optional; clients then need it too)
#   SENTINEL_MASTER_HOST / _PORT  the first master (default redis 6379), SENTINEL_MASTER_NAME
#   (mymaster), SENTINEL_PORT (26379), SENTINEL_QUORUM (2), SENTINEL_DOWN_AFTER_MS (5000),
#   SENTINEL_FAILOVER_TIMEOUT_MS (60000)
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD (e.g. openssl rand -hex 24)}"
for value in "$REDIS_PASSWORD" "${REDIS_SENTINEL_PASSWORD:-}"; do
  case "$value" in
    *[!A-Za-z0-9._~-]*)
      echo "sentinel-start: REDIS_PASSWORD / REDIS_SENTINEL_PASSWORD: use letters, digits and . _ ~ - only" >&2
      exit 2
      ;;
  esac
done
dir="${SENTINEL_DIR:-/data}"
name="${SENTINEL_MASTER_NAME:-mymaster}"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
conf="$dir/sentinel.conf"
if [ ! -s "$conf" ]; then
  {
    echo "port ${SENTINEL_PORT:-26379}"
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames no"
    echo "sentinel monitor $name ${SENTINEL_MASTER_HOST:-redis} ${SENTINEL_MASTER_PORT:-6379} ${SENTINEL_QUORUM:-2}"
    echo "sentinel down-after-milliseconds $name ${SENTINEL_DOWN_AFTER_MS:-5000}"
    echo "sentinel failover-timeout $name ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}"
    echo "sentinel parallel-syncs $name 1"
    echo "sentinel auth-pass $name \"$REDIS_PASSWORD\""
    if [ -n "${REDIS_SENTINEL_PASSWORD:-}" ]; then
      echo "requirepass \"$REDIS_SENTINEL_PASSWORD\""
    fi
  } > "$conf"
fi
chmod 600 "$conf"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
  chown -R redis:redis "$dir"
fi
unset REDIS_PASSWORD REDIS_SENTINEL_PASSWORD REDISCLI_AUTH
exec docker-entrypoint.sh redis-server "$conf" --sentinel
