#!/bin/sh
# Start redis-server with the password from REDIS_PASSWORD written into a mode-600 config file
# (on a tmpfs in compose), so the password is in no command line (`ps`, /proc/*/cmdline, `docker
# inspect`'s Cmd) and no healthcheck command. compose.yaml's redis service runs it as its
# entrypoint:  redis-start.sh redis-server [redis options...]
# REDIS_SECRET_DIR: where the file goes (default /run/redis-secret). Then it hands over to the
# redis image's own docker-entrypoint.sh (which drops root for the `redis` user).
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD (e.g. openssl rand -hex 24)}"
case "$REDIS_PASSWORD" in
  *[!A-Za-z0-9._~-]*)
    echo "redis-start: REDIS_PASSWORD: use letters, digits and . _ ~ - only (it also goes into REDIS_URL); e.g. openssl rand -hex 24" >&2
    exit 2
    ;;
esac
dir="${REDIS_SECRET_DIR:-/run/redis-secret}"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
conf="$dir/redis.conf"
# masterauth too: a replica (or a master that sentinels turned into one) syncs with it
printf 'requirepass "%s"\nmasterauth "%s"\n' "$REDIS_PASSWORD" "$REDIS_PASSWORD" > "$conf"
chmod 600 "$conf"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
  chown -R redis:redis "$dir"
fi
# Not needed by the server: keep them out of its environment.
unset REDIS_PASSWORD REDISCLI_AUTH
[ "$#" -gt 0 ] || set -- redis-server
server="$1"
shift
exec docker-entrypoint.sh "$server" "$conf" "$@"
