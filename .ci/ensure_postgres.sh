#!/usr/bin/env bash
# The deployment tests start a throwaway PostgreSQL cluster (initdb + pg_ctl): make sure a
# PostgreSQL server is installed. Debian keeps initdb in /usr/lib/postgresql/<version>/bin,
# off PATH; the tests look there too.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql
