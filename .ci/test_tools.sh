#!/usr/bin/env bash
# The system tools the tests run, as Debian packages: a PostgreSQL server (initdb + pg_ctl:
# the deployment tests start their own cluster), osmium-tool (splitting large extracts),
# Chromium (rendering the HTML maps) and Docker Compose (`config` resolves the compose file; no
# engine needed). `make test` and `make test-fast` call this first. Missing ones are installed
# with apt-get as root or with password-less sudo; otherwise one line says what is missing and
# the command that installs it, and the exit status is 2.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }

missing=() # installed with their recommended packages, as a user would
lean=()    # without: docker-compose recommends the Docker engine, postgresql a cron job
# Debian keeps initdb in /usr/lib/postgresql/<version>/bin, off PATH; the tests look there too.
have initdb || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || lean+=(postgresql)
have osmium || missing+=(osmium-tool)
have chromium || have chromium-browser || missing+=(chromium)
have docker-compose || docker compose version >/dev/null 2>&1 || lean+=(docker-compose)
all=("${missing[@]}" "${lean[@]}")
[ ${#all[@]} -eq 0 ] && exit 0

install="apt-get install -y ${all[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then sudo="sudo "; else sudo="none"; fi
fi
if ! have apt-get || [ "$sudo" = none ]; then
    echo "the tests need ${all[*]}: install with \`sudo $install\` (Debian/Ubuntu)" >&2
    exit 2
fi
echo "installing what the tests need: ${all[*]}" >&2
log="$(mktemp -t s2vec-test-tools.XXXXXX.log)"
export DEBIAN_FRONTEND=noninteractive
if ! {
    ${sudo}apt-get update -qq &&
        { [ ${#missing[@]} -eq 0 ] || ${sudo}apt-get install -y -qq "${missing[@]}"; } &&
        { [ ${#lean[@]} -eq 0 ] || ${sudo}apt-get install -y -qq --no-install-recommends "${lean[@]}"; }
} >"$log" 2>&1; then
    echo "could not install ${all[*]} (apt-get failed, see $log): run \`sudo $install\`" >&2
    exit 2
fi
rm -f "$log"
